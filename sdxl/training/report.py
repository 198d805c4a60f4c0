"""The training report, tarred under report/ in trained_model.tar:

  loss.png     the loss per step, raw and smoothed, with the learning rate on a second axis
  samples.png  a grid of samples: one row per prompt (each with its own seed), one column per sampled step; the last
               column is the trained model as the tar holds it
  report.json  the inputs, the dataset (every caption and where it came from, the masks), steps, time, losses and
               learning rates exactly as plotted, the grid's layout, peak memory

Made on the main process only. Sampling at a step runs between optimizer steps; a resumed run has no samples or losses
from before the step it resumed at (report.json says where it resumed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sdxl.preprocess.provenance import read_provenance
from sdxl.training import report_plots, samples
from sdxl.training.samples import SampleSettings

log = logging.getLogger(__name__)

LOSS_PLOT, SAMPLES_GRID, REPORT_JSON = "loss.png", "samples.png", "report.json"
RANDOM_WEIGHTS_SAMPLE_STEPS = 4  # random test weights draw noise at any step count: keep their sampling short


@dataclass(frozen=True)
class ReportSettings:
    samples: SampleSettings | None = field(default_factory=SampleSettings)  # None: no sample grid


def peak_memory() -> dict[str, int | None]:
    """Peak device memory (CUDA) and the process's peak resident memory (VmHWM), in bytes."""
    resident = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                resident = int(line.split()[1]) * 1024
    except OSError:
        pass
    device = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return {"cuda_max_allocated_bytes": device, "process_peak_resident_bytes": resident}


class TrainingReport:
    def __init__(self, settings: ReportSettings, trainer, vae, weights_root: Path, dataset_dir: Path, start: int):
        from diffusers import DDPMScheduler

        from sdxl.model import weights

        self.settings, self.trainer, self.vae = settings, trainer, vae
        # The base's scheduler_config.json as the predictor reads it (not the DDPM view of it the trainer uses).
        self.scheduler_config = DDPMScheduler.load_config(Path(weights_root) / weights.BASE.folder / "scheduler")
        self.dataset_dir, self.start = Path(dataset_dir), start
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.lrs: list[list[float]] = []
        self.columns: list[tuple[int, list]] = []  # (step, images)
        self.sample_settings = settings.samples
        self.started = time.perf_counter()
        self.sample_steps = self.sample_settings.steps(trainer.total_steps) if self.sample_settings else []
        self.sampling_seconds = 0.0
        if start == 0:
            self._maybe_sample(0)

    def record(self, step: int, loss: float, lrs: list[float]) -> None:
        """After each optimizer step: log the loss, and sample if this is one of the sampled steps."""
        self.steps.append(step)
        self.losses.append(float(loss))
        self.lrs.append([float(lr) for lr in lrs])
        self._maybe_sample(step)

    def _maybe_sample(self, step: int) -> None:
        if step not in self.sample_steps:
            return
        started = time.perf_counter()
        try:
            images = samples.draw(self.trainer, self.vae, self.scheduler_config, self.sample_settings)
        except Exception as error:  # a report must never cost the training: go on without samples
            log.warning(
                "report: sampling at step %d failed (%s: %s); no more samples", step, type(error).__name__, error
            )
            self.sample_steps, self.columns = [], []
            return
        self.columns.append((step, images))
        self.sampling_seconds += time.perf_counter() - started
        log.info("report: sampled %d prompt(s) at step %d (%.1fs)", len(images), step, time.perf_counter() - started)

    def write_safely(self, folder: Path, seconds: float) -> Path | None:
        """write(), or None (logged) if it fails: the trained weights matter more than their report."""
        try:
            return self.write(folder, seconds)
        except Exception as error:
            log.warning("report: not written (%s: %s)", type(error).__name__, error)
            return None

    def write(self, folder: Path, seconds: float) -> Path:
        """loss.png, samples.png (if sampled) and report.json into `folder` (created); returns it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in (LOSS_PLOT, SAMPLES_GRID, REPORT_JSON):  # a rerun in the same folder starts clean
            (folder / name).unlink(missing_ok=True)
        summary = self._summary(seconds)
        if self.steps:
            figure = report_plots.loss_figure(self.steps, self.losses, [lrs[0] for lrs in self.lrs])
            summary["loss_plot"] = {"x": list(self.steps), "lines": report_plots.plotted_series(figure)}
            report_plots.save_figure(figure, folder / LOSS_PLOT)
        if self.columns:
            report_plots.grid([images for _, images in self.columns]).save(folder / SAMPLES_GRID)
        (folder / REPORT_JSON).write_text(json.dumps(summary, indent=2) + "\n")
        log.info("report: %s", ", ".join(sorted(p.name for p in folder.iterdir())))
        return folder

    def _summary(self, seconds: float) -> dict:
        trainer = self.trainer
        config = trainer.config
        settings = self.sample_settings
        return {
            "inputs": config.to_dict(),
            "dataset": self._dataset(),
            "steps": {"total": trainer.total_steps, "resumed_from": self.start, "done": self.start + len(self.steps)},
            "seconds": {"training": round(seconds, 3), "sampling": round(self.sampling_seconds, 3)},
            "steps_per_second": round(len(self.steps) / seconds, 4) if seconds > 0 else None,
            "losses": self.losses,
            "learning_rates": self.lrs,
            "final_loss": self.losses[-1] if self.losses else None,
            "samples": None
            if not self.columns
            else {
                "grid": SAMPLES_GRID,
                "tile_size": self.columns[0][1][0].width,
                "columns_steps": [step for step, _ in self.columns],
                "rows_prompts": settings.prompt_texts(config.token_string),
                **{k: v for k, v in asdict(settings).items() if k != "prompts"},
                "how_to_reproduce": "the last column is what the predictor draws with this tar at lora_scale 1 "
                "with the same prompt, seed, scheduler, steps, guidance and size, without the watermark",
            },
            "peak_memory": peak_memory(),
        }

    def _dataset(self) -> dict:
        examples = self.trainer.examples
        sources = read_provenance(self.dataset_dir)
        images = []
        for example in examples:
            row = {
                "file": example.name,
                "caption": example.caption,
                "mask_coverage": round(float(example.mask.mean()), 4),
            }
            row.update(sources.get(example.name, {}))
            images.append(row)
        return {"size": len(examples), "resolution": self.trainer.config.resolution, "images": images}


@contextlib.contextmanager
def staged_report(report: TrainingReport | None, parent: Path, seconds: float):
    """The report's files in a temporary folder under `parent` (None without a report, or if writing it failed),
    removed on exit: the report lives in the tar only."""
    if report is None:
        yield None
        return
    Path(parent).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=".report-", dir=parent))
    try:
        yield report.write_safely(folder, seconds)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def sample_settings_for(weights_root: Path, settings: ReportSettings | None) -> ReportSettings | None:
    """Random test weights draw noise whatever the step count: sample them with few steps."""
    from dataclasses import replace

    from sdxl.model import weights

    if settings is None or settings.samples is None or not weights.random_architecture(weights_root):
        return settings
    if settings.samples != SampleSettings():  # the caller chose: keep it
        return settings
    return replace(settings, samples=replace(settings.samples, num_inference_steps=RANDOM_WEIGHTS_SAMPLE_STEPS))

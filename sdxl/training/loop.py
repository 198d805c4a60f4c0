"""Train SDXL on a preprocessed folder with accelerate: a UNet LoRA (or the whole UNet) plus textual inversion of
the new tokens in both text encoders, on a masked denoising loss. Runs the same in one process or data-parallel
under `accelerate launch`; only the main process logs progress and writes trained_model.tar.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from sdxl.training import budget, checkpoints
from sdxl.training.config import RESUME_INDEPENDENT, TrainingConfig
from sdxl.training.dataset import read_examples
from sdxl.training.export import TAR_NAME, write_trained_model_tar
from sdxl.training.models import Components, load_components
from sdxl.training.progress import Progress
from sdxl.training.report import ReportSettings, TrainingReport, sample_settings_for, staged_report
from sdxl.training.trainer import StepInfo, Trainer

log = logging.getLogger(__name__)


@dataclass
class TrainingResult:
    tar_path: Path | None  # None on processes other than the main one
    steps: int  # the final step
    resumed_from: int  # 0 for a fresh run
    seconds: float
    loss: float


def _mixed_precision() -> str:
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _make_accelerator():
    from accelerate import Accelerator

    return Accelerator(
        cpu=not torch.cuda.is_available(),  # on CPU, several processes talk through gloo
        mixed_precision=_mixed_precision(),
        step_scheduler_with_optimizer=False,  # the lr scheduler steps once per optimizer step, on every process
    )


def _resume_point(config: TrainingConfig, output_dir: Path, num_processes: int):
    """(config with the checkpoint's seed if it had none, checkpoint or None). Refuses a mismatching checkpoint."""
    checkpoint = checkpoints.latest(output_dir)
    if checkpoint is None:
        return config.with_seed(), None
    state = checkpoints.read_state(checkpoint)
    mismatches = config.resume_mismatches(state["config"])
    if state["num_processes"] != num_processes:
        mismatches.append(f"num_processes: {state['num_processes']} in the checkpoint, {num_processes} now")
    if mismatches:
        raise ValueError(
            f"{checkpoint} was made with other inputs ({'; '.join(mismatches)}); "
            "use the same inputs to resume, or a fresh output folder"
        )
    return TrainingConfig.from_dict({**state["config"], **_resume_independent(config)}), checkpoint


def _agree_on_seed(accelerator, config: TrainingConfig) -> TrainingConfig:
    """Every process trains with the main process's seed (a random one is drawn there)."""
    if accelerator.num_processes == 1:
        return config
    from accelerate.utils import broadcast_object_list

    return replace(config, seed=broadcast_object_list([config.seed])[0])


def _resume_independent(config: TrainingConfig) -> dict:
    return {name: getattr(config, name) for name in RESUME_INDEPENDENT}


def _make_scheduler(config: TrainingConfig, optimizer, total_steps: int):
    from diffusers.optimization import get_scheduler

    if config.lr_scheduler == "constant" and config.lr_warmup_steps:
        log.info("lr_scheduler constant: the learning rates stay fixed; lr_warmup_steps applies to linear only")
    return get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=total_steps
    )


@dataclass
class _Run:
    """What the steps of one run share: its processes, its (resolved) inputs, where checkpoints go."""

    accelerator: Any
    config: TrainingConfig
    output_dir: Path
    write_checkpoints: bool

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def train(
    config: TrainingConfig,
    dataset_dir: Path,
    weights_root: Path,
    output_dir: Path,
    *,
    tar_path: Path | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    keep_checkpoints: bool = False,
    write_checkpoints: bool = True,
    report: ReportSettings | None = ReportSettings(),
) -> TrainingResult:
    """Train and write trained_model.tar (to `tar_path`, default OUTPUT/trained_model.tar); resume from the newest
    checkpoint in `output_dir` if one exists. A failure leaves checkpoints (to resume from) but no tar.
    `write_checkpoints=False` when `output_dir` does not outlive the run: nothing could resume from them, and a full
    fine-tune's checkpoint is the size of the UNet."""
    output_dir, tar_path = Path(output_dir), Path(tar_path or Path(output_dir) / TAR_NAME)

    # 1. Processes, and the checkpoint to resume from (it decides the seed when none was given).
    run, checkpoint = _start(config, output_dir, write_checkpoints)

    # 2. The data, and the memory it and the models will take, checked before any model is loaded.
    examples = _read_data(run, dataset_dir, weights_root)

    # 3. Models, trainable parameters, caches, optimizer and lr scheduler; everything seeded.
    trainer, components = _make_trainer(run, examples, weights_root)

    # 4. Resume.
    start = _resume(run, trainer, checkpoint, len(examples))

    # 5. The loop: checkpoints every checkpointing_steps; a failure says where it stopped.
    progress = Progress(trainer.total_steps, start, run.config.verbose, enabled=run.main)
    report = sample_settings_for(weights_root, report)
    recorder = None
    if run.main and report is not None:  # the report samples with the modules being trained (step 0: before training)
        recorder = TrainingReport(report, trainer, components.vae, weights_root, dataset_dir, start)
    done, loss = _steps(run, trainer, start, progress, recorder, on_step)

    # 6. The main process writes the tar; checkpoints go once it exists.
    result_tar = _export(run, trainer, recorder, progress, tar_path, keep_checkpoints)
    if run.main:
        log.info(
            "trained %d steps in %.1fs (%.2f steps/s)",
            done - start,
            progress.seconds(),
            progress.steps_per_second(done),
        )
    run.accelerator.wait_for_everyone()
    return TrainingResult(result_tar, done, start, progress.seconds(), loss)


def _start(config: TrainingConfig, output_dir: Path, write_checkpoints: bool) -> tuple[_Run, Path | None]:
    accelerator = _make_accelerator()
    config, checkpoint = _resume_point(config, output_dir, accelerator.num_processes)
    run = _Run(accelerator, _agree_on_seed(accelerator, config), output_dir, write_checkpoints)
    if run.main:
        log.info("training inputs: %s", run.config.to_dict())
        if not write_checkpoints:
            log.info("checkpointing_steps=%d: no checkpoints are written, as no later run can resume this one",
                     run.config.checkpointing_steps)  # fmt: skip
    return run, checkpoint


def _read_data(run: _Run, dataset_dir: Path, weights_root: Path) -> list:
    examples = read_examples(
        dataset_dir,
        run.config.resolution,
        run.config.token_string,
        "".join(run.config.new_tokens),
        min_images=run.accelerator.num_processes,
    )
    accelerator = run.accelerator
    budget.check(run.config, len(examples), weights_root, accelerator.device, accelerator.mixed_precision != "no")
    return examples


def _make_trainer(run: _Run, examples: list, weights_root: Path) -> tuple[Trainer, Components]:
    """(trainer ready to step, the loaded components); the optimizer and scheduler are prepared, checkpoint hooks set."""
    from accelerate.utils import set_seed

    set_seed(run.config.seed)
    components = load_components(weights_root)
    trainer = Trainer(run.config, examples, components, run.accelerator)
    optimizer = torch.optim.AdamW(trainer.optimizer_groups())
    trainer.prepare(optimizer, _make_scheduler(run.config, optimizer, trainer.total_steps))
    checkpoints.register_hooks(run.accelerator, trainer.trainable_state, trainer.load_trainable_state)
    return trainer, components


def _resume(run: _Run, trainer: Trainer, checkpoint: Path | None, n_images: int) -> int:
    """The step to start from: the checkpoint's (its states loaded), or 0."""
    start = 0
    if checkpoint is not None:
        run.accelerator.load_state(str(checkpoint))
        start = checkpoints.read_state(checkpoint)["step"]
        if run.main:
            log.info("resumed from %s at step %d of %d", checkpoint, start, trainer.total_steps)
    if run.main:
        checkpoints.remove_partial(run.output_dir)
        log.info(
            "%d steps from step %d: batch %d x %d process(es), %d image(s), %d step(s) per epoch, resolution %d",
            trainer.total_steps,
            start,
            trainer.batch,
            run.accelerator.num_processes,
            n_images,
            trainer.steps_per_epoch,
            run.config.resolution,
        )
    return start


def _steps(
    run: _Run,
    trainer: Trainer,
    start: int,
    progress: Progress,
    recorder: TrainingReport | None,
    on_step: Callable[[StepInfo], None] | None,
) -> tuple[int, float]:
    """Steps `start` to the end; returns (the last step done, its loss). A failure is logged with where it stopped."""
    done, loss = start, float("nan")
    try:
        for step in range(start, trainer.total_steps):
            loss, lrs = trainer.step(step)
            done = step + 1
            progress.update(done, loss, lrs)
            if recorder is not None:
                recorder.record(done, loss, lrs)
            if run.write_checkpoints and done % run.config.checkpointing_steps == 0 and done < trainer.total_steps:
                state = {"num_processes": run.accelerator.num_processes, "config": run.config.to_dict()}
                checkpoints.save(run.accelerator, run.output_dir, done, state)
            if on_step is not None:
                on_step(StepInfo(done, trainer.total_steps, loss, lrs, trainer))
    except BaseException as error:
        saved = checkpoints.latest(run.output_dir)
        log.error(
            "training stopped after step %d of %d (%s: %s); %s",
            done,
            trainer.total_steps,
            type(error).__name__,
            error,
            f"rerun with the same inputs and output folder to resume from {saved}" if saved else "no checkpoint yet",
        )
        raise
    return done, loss


def _export(
    run: _Run,
    trainer: Trainer,
    recorder: TrainingReport | None,
    progress: Progress,
    tar_path: Path,
    keep_checkpoints: bool,
) -> Path | None:
    """The main process writes the tar (returned; None elsewhere) and then drops the checkpoints."""
    run.accelerator.wait_for_everyone()
    if not run.main:
        return None
    trained = trainer.trained_weights()
    with staged_report(recorder, tar_path.parent, progress.seconds()) as trained.report_dir:
        result_tar = write_trained_model_tar(tar_path, trained)
    if not keep_checkpoints:
        checkpoints.remove_all(run.output_dir)
    return result_tar

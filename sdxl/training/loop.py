"""Train SDXL on a preprocessed folder with accelerate: a UNet LoRA (or the whole UNet) plus textual inversion of
the new tokens in both text encoders, on a masked denoising loss. Runs the same in one process or data-parallel
under `accelerate launch`; only the main process logs progress and writes trained_model.tar.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sdxl.training import budget, checkpoints
from sdxl.training.config import RESUME_INDEPENDENT, TrainingConfig
from sdxl.training.dataset import read_examples
from sdxl.training.export import TAR_NAME, write_trained_model_tar
from sdxl.training.models import load_components
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
    accelerator = _make_accelerator()
    main = accelerator.is_main_process
    config, checkpoint = _resume_point(config, output_dir, accelerator.num_processes)
    config = _agree_on_seed(accelerator, config)
    if main:
        log.info("training inputs: %s", config.to_dict())
        if not write_checkpoints:
            log.info("checkpointing_steps=%d: no checkpoints are written, as no later run can resume this one",
                     config.checkpointing_steps)  # fmt: skip

    # 2. The data, and the memory it and the models will take, checked before any model is loaded.
    examples = read_examples(
        dataset_dir,
        config.resolution,
        config.token_string,
        "".join(config.new_tokens),
        min_images=accelerator.num_processes,
    )
    budget.check(config, len(examples), weights_root, accelerator.device, accelerator.mixed_precision != "no")

    # 3. Models, trainable parameters and caches; everything seeded.
    from accelerate.utils import set_seed

    set_seed(config.seed)
    components = load_components(weights_root)
    trainer = Trainer(config, examples, components, accelerator)

    # 4. Optimizer and lr scheduler on the parameters that train; data parallel wrapping; checkpoint hooks.
    optimizer = torch.optim.AdamW(trainer.optimizer_groups())
    trainer.prepare(optimizer, _make_scheduler(config, optimizer, trainer.total_steps))
    checkpoints.register_hooks(accelerator, trainer.trainable_state, trainer.load_trainable_state)

    # 5. Resume.
    start = 0
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        start = checkpoints.read_state(checkpoint)["step"]
        if main:
            log.info("resumed from %s at step %d of %d", checkpoint, start, trainer.total_steps)
    if main:
        checkpoints.remove_partial(output_dir)
        log.info(
            "%d steps from step %d: batch %d x %d process(es), %d image(s), %d step(s) per epoch, resolution %d",
            trainer.total_steps,
            start,
            trainer.batch,
            accelerator.num_processes,
            len(examples),
            trainer.steps_per_epoch,
            config.resolution,
        )

    # 6. The loop: checkpoints every checkpointing_steps; a failure says where it stopped.
    progress = Progress(trainer.total_steps, start, config.verbose, enabled=main)
    report = sample_settings_for(weights_root, report)
    recorder = None
    if main and report is not None:  # the report samples with the modules being trained (step 0: before training)
        recorder = TrainingReport(report, trainer, components.vae, weights_root, dataset_dir, start)
    done, loss = start, float("nan")
    try:
        for step in range(start, trainer.total_steps):
            loss, lrs = trainer.step(step)
            done = step + 1
            progress.update(done, loss, lrs)
            if recorder is not None:
                recorder.record(done, loss, lrs)
            if write_checkpoints and done % config.checkpointing_steps == 0 and done < trainer.total_steps:
                state = {"num_processes": accelerator.num_processes, "config": config.to_dict()}
                checkpoints.save(accelerator, output_dir, done, state)
            if on_step is not None:
                on_step(StepInfo(done, trainer.total_steps, loss, lrs, trainer))
    except BaseException as error:
        saved = checkpoints.latest(output_dir)
        log.error(
            "training stopped after step %d of %d (%s: %s); %s",
            done,
            trainer.total_steps,
            type(error).__name__,
            error,
            f"rerun with the same inputs and output folder to resume from {saved}" if saved else "no checkpoint yet",
        )
        raise

    # 7. The main process writes the tar; checkpoints go once it exists.
    accelerator.wait_for_everyone()
    result_tar = None
    if main:
        trained = trainer.trained_weights()
        with staged_report(recorder, tar_path.parent, progress.seconds()) as trained.report_dir:
            result_tar = write_trained_model_tar(tar_path, trained)
        if not keep_checkpoints:
            checkpoints.remove_all(output_dir)
        log.info(
            "trained %d steps in %.1fs (%.2f steps/s)",
            done - start,
            progress.seconds(),
            progress.steps_per_second(done),
        )
    accelerator.wait_for_everyone()
    return TrainingResult(result_tar, done, start, progress.seconds(), loss)

"""Train SDXL on a preprocessed folder with accelerate: a UNet LoRA (or the whole UNet) plus textual inversion of
the new tokens in both text encoders, on a masked denoising loss. Runs the same in one process or data-parallel
under `accelerate launch`; only the main process logs progress and writes trained_model.tar.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from sdxl.training import checkpoints, conditioning, sampling
from sdxl.training.config import TrainingConfig
from sdxl.training.dataset import Example, read_examples, size_conditioning
from sdxl.training.export import TAR_NAME, TrainedWeights, write_trained_model_tar
from sdxl.training.models import Components, count_params, load_components
from sdxl.training.progress import Progress
from sdxl.training.tokens import NewTokens

log = logging.getLogger(__name__)

LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")  # the UNet's attention projections
UNET_WEIGHT_DECAY = 1e-4
MAX_GRAD_NORM = 1.0
VAE_ENCODE_CHUNK = 4


@dataclass
class StepInfo:
    """What a step hook sees after each optimizer step (tests use it to inspect and to inject failures)."""

    step: int  # steps done, 1-based
    total: int
    loss: float
    lrs: list[float]  # the learning rate of each optimizer group in this step
    trainer: Trainer = field(repr=False)


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


class Trainer:
    """The state of one training run; `train()` below drives it step by step."""

    def __init__(self, config: TrainingConfig, examples: list[Example], components: Components, accelerator):
        self.config, self.examples, self.accelerator = config, examples, accelerator
        self.device = accelerator.device
        self.tokenizers = components.tokenizers
        self.text_encoders = components.text_encoders
        self.unet = components.unet
        self.noise_scheduler = components.noise_scheduler
        self.batch = sampling.per_process_batch(config.train_batch_size, len(examples), accelerator.num_processes)
        self.steps_per_epoch = sampling.steps_per_epoch(len(examples), self.batch, accelerator.num_processes)
        self.total_steps = config.total_steps(self.steps_per_epoch)
        self.tokens = NewTokens(
            config.new_tokens, self.tokenizers, self.text_encoders, sampling.generator(config.seed, "tokens")
        )
        self.time_ids = torch.tensor([size_conditioning(config.resolution)], dtype=torch.float32, device=self.device)
        self._make_trainable()
        self._cache_latents(components.vae)
        self._cache_text()

    # Setup ------------------------------------------------------------------------------------------------------

    def _make_trainable(self) -> None:
        config = self.config
        if config.is_lora:
            from peft import LoraConfig

            self.unet.add_adapter(
                LoraConfig(
                    r=config.lora_rank,
                    lora_alpha=config.lora_rank,
                    init_lora_weights="gaussian",
                    target_modules=list(LORA_TARGET_MODULES),
                )
            )
        else:
            self.unet.requires_grad_(True)
        if config.trains_text_encoders:
            self.tokens.train_only_new_rows()
        for module in (self.unet, *self.text_encoders):
            module.to(self.device)
        if config.is_lora and self.accelerator.mixed_precision != "no":
            from diffusers.training_utils import cast_training_params

            frozen_dtype = torch.bfloat16 if self.accelerator.mixed_precision == "bf16" else torch.float16
            self.unet.to(frozen_dtype)
            cast_training_params(self.unet, dtype=torch.float32)  # the LoRA itself trains in fp32
        self.unet.train()
        what = f"LoRA rank {config.lora_rank} on {', '.join(LORA_TARGET_MODULES)}" if config.is_lora else "full UNet"
        log.info(
            "training %s: %.2fM of the UNet's %.1fM params (lr %g); textual inversion: %s",
            what,
            count_params(self.unet, trainable_only=True) / 1e6,
            count_params(self.unet) / 1e6,
            config.lora_lr if config.is_lora else config.unet_learning_rate,
            f"{len(config.new_tokens)} tokens x 2 encoders (lr {config.ti_lr})"
            if config.trains_text_encoders
            else "off (ti_lr 0; text embeddings cached)",
        )

    @torch.no_grad()
    def _cache_latents(self, vae) -> None:
        """Encode every image once; keep the latent distribution so each step draws its own sample."""
        vae.to(self.device)
        means, stds = [], []
        pixels = torch.stack([e.pixels for e in self.examples])
        for chunk in pixels.split(VAE_ENCODE_CHUNK):
            dist = vae.encode(chunk.to(self.device, vae.dtype)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
        self.latent_mean, self.latent_std = torch.cat(means), torch.cat(stds)
        self.latent_scale = vae.config.scaling_factor
        self.latent_shift = getattr(vae.config, "shift_factor", None) or 0.0
        size = self.latent_mean.shape[-2:]
        masks = torch.stack([e.mask for e in self.examples]).to(self.device)
        self.latent_masks = F.adaptive_avg_pool2d(masks, size)  # the share of each latent cell inside the mask
        vae.to("cpu")
        log.info("cached %d latents of shape %s", len(self.examples), tuple(self.latent_mean.shape[1:]))

    @torch.no_grad()
    def _cache_text(self) -> None:
        self.input_ids = [ids.to(self.device) for ids in conditioning.tokenize(self.tokenizers, self._captions())]
        self.cached_text = None
        if not self.config.trains_text_encoders:
            self.cached_text = conditioning.encode(self.text_encoders, self.input_ids)
            log.info("cached the text embeddings of %d captions", len(self.examples))

    def _captions(self) -> list[str]:
        return [e.caption for e in self.examples]

    def optimizer_groups(self) -> list[dict]:
        config = self.config
        unet_params = [p for p in self.unet.parameters() if p.requires_grad]
        groups = [
            dict(
                params=unet_params,
                lr=config.lora_lr if config.is_lora else config.unet_learning_rate,
                weight_decay=UNET_WEIGHT_DECAY,
            )
        ]
        if config.trains_text_encoders:  # no weight decay: rows without gradient must not move
            groups.append(dict(params=self.tokens.weights, lr=config.ti_lr, weight_decay=0.0))
        return groups

    def prepare(self, optimizer, lr_scheduler):
        """Wrap for data parallelism; keep the unwrapped modules for state and export."""
        trained = [self.unet] + (self.text_encoders if self.config.trains_text_encoders else [])
        prepared = self.accelerator.prepare(*trained, optimizer, lr_scheduler)
        self.unet_forward, self.text_forward = prepared[0], list(prepared[1 : len(trained)]) or self.text_encoders
        self.optimizer, self.lr_scheduler = prepared[-2], prepared[-1]

    # State -------------------------------------------------------------------------------------------------------

    def trainable_state(self) -> dict[str, torch.Tensor]:
        state = {f"unet.{n}": p for n, p in self.unet.named_parameters() if p.requires_grad}
        state.update({f"tokens.{k}": v for k, v in self.tokens.rows().items()})
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        unet_state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
        expected = {n for n, p in self.unet.named_parameters() if p.requires_grad}
        if set(unet_state) != expected:
            raise ValueError("the checkpoint's trainable UNet parameters do not match this run's (LoRA rank? is_lora?)")
        self.unet.load_state_dict(unet_state, strict=False)
        self.tokens.load_rows({k.removeprefix("tokens."): v for k, v in state.items() if k.startswith("tokens.")})

    def trained_weights(self) -> TrainedWeights:
        trained = TrainedWeights(
            embeddings=self.tokens.rows(), token_map=self.config.token_map, training_params=self.config.to_dict()
        )
        if self.config.is_lora:
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            trained.unet_lora_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))
        else:
            trained.unet_state_dict = self.unet.state_dict()
        return trained

    # One step ----------------------------------------------------------------------------------------------------

    def loss(self, step: int) -> torch.Tensor:
        accelerator, config = self.accelerator, self.config
        index = sampling.batch_indices(
            config.seed, step, len(self.examples), self.batch, accelerator.num_processes, accelerator.process_index
        ).to(self.device)
        draw = sampling.generator(config.seed, "noise", step, accelerator.process_index)
        mean, std = self.latent_mean[index], self.latent_std[index]
        sample = mean + std * torch.randn(mean.shape, generator=draw).to(self.device)
        latents = (sample - self.latent_shift) * self.latent_scale
        noise = torch.randn(latents.shape, generator=draw).to(self.device)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(index),), generator=draw)
        timesteps = timesteps.to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        prompt_embeds, pooled = self._text(index)
        added = {"text_embeds": pooled, "time_ids": self.time_ids.repeat(len(index), 1)}
        with accelerator.autocast():
            prediction = self.unet_forward(noisy, timesteps, prompt_embeds, added_cond_kwargs=added).sample
        return masked_mse(prediction.float(), target.float(), self.latent_masks[index])

    def _text(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cached_text is not None:
            return self.cached_text[0][index], self.cached_text[1][index]
        return conditioning.encode(self.text_forward, [ids[index] for ids in self.input_ids])

    def step(self, step: int) -> tuple[float, list[float]]:
        """One optimizer step; returns the loss averaged over processes and the learning rates used."""
        loss = self.loss(step)
        self.accelerator.backward(loss)
        if self.config.trains_text_encoders:
            self.tokens.mask_gradients()
        trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.accelerator.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.accelerator.reduce(loss.detach(), "mean").item(), lrs


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked latent cells only (mask [B, 1, h, w] in [0, 1])."""
    weight = mask.expand_as(prediction)
    return ((prediction - target) ** 2 * weight).sum() / weight.sum().clamp(min=1e-8)


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
    from sdxl.training.config import RESUME_INDEPENDENT

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
) -> TrainingResult:
    """Train and write trained_model.tar (to `tar_path`, default OUTPUT/trained_model.tar); resume from the newest
    checkpoint in `output_dir` if one exists. A failure leaves checkpoints (to resume from) but no tar."""
    output_dir, tar_path = Path(output_dir), Path(tar_path or Path(output_dir) / TAR_NAME)

    # 1. Processes, and the checkpoint to resume from (it decides the seed when none was given).
    accelerator = _make_accelerator()
    main = accelerator.is_main_process
    config, checkpoint = _resume_point(config, output_dir, accelerator.num_processes)
    config = _agree_on_seed(accelerator, config)
    if main:
        log.info("training inputs: %s", config.to_dict())

    # 2. The data, checked before any model is loaded.
    examples = read_examples(
        dataset_dir,
        config.resolution,
        config.token_string,
        "".join(config.new_tokens),
        min_images=accelerator.num_processes,
    )

    # 3. Models, trainable parameters and caches; everything seeded.
    from accelerate.utils import set_seed

    set_seed(config.seed)
    trainer = Trainer(config, examples, load_components(weights_root), accelerator)

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
    done, loss = start, float("nan")
    try:
        for step in range(start, trainer.total_steps):
            loss, lrs = trainer.step(step)
            done = step + 1
            progress.update(done, loss, lrs)
            if done % config.checkpointing_steps == 0 and done < trainer.total_steps:
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
        result_tar = write_trained_model_tar(tar_path, trainer.trained_weights())
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

"""One training run's state and its step: trainable parameters (a UNet LoRA or the whole UNet, plus the new
tokens' rows), cached latents (and text embeddings when the text encoders are frozen), and the masked denoising loss.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sdxl.training import conditioning, sampling
from sdxl.training.config import TrainingConfig
from sdxl.training.dataset import Example, size_conditioning
from sdxl.training.export import TrainedWeights
from sdxl.training.models import Components
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
        self.unet.enable_gradient_checkpointing()  # SDXL at 1024 px needs it on a GPU; results are the same
        self.unet.train()
        what = f"LoRA rank {config.lora_rank} on {', '.join(LORA_TARGET_MODULES)}" if config.is_lora else "full UNet"
        log.info(
            "training %s: %.2fM of the UNet's %.1fM params (lr %g); textual inversion: %s",
            what,
            self.unet.num_parameters(only_trainable=True) / 1e6,
            self.unet.num_parameters() / 1e6,
            config.lora_lr if config.is_lora else config.unet_learning_rate,
            f"{len(config.new_tokens)} tokens x 2 encoders (lr {config.ti_lr})"
            if config.trains_text_encoders
            else "off (ti_lr 0; text embeddings cached)",
        )

    @torch.no_grad()
    def _cache_latents(self, vae) -> None:
        """Encode every image once; keep the latent distribution so each step draws its own sample. Pixels are read
        chunk by chunk, so only one chunk of full-size images is ever in memory."""
        vae.to(self.device)
        means, stds, masks = [], [], []
        for start in range(0, len(self.examples), VAE_ENCODE_CHUNK):
            chunk = self.examples[start : start + VAE_ENCODE_CHUNK]
            pixels = torch.stack([e.pixels for e in chunk])
            dist = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
            full_masks = torch.stack([e.mask for e in chunk]).to(self.device)
            masks.append(F.adaptive_avg_pool2d(full_masks, means[-1].shape[-2:]))  # share of each cell in the mask
        self.latent_mean, self.latent_std = torch.cat(means), torch.cat(stds)
        self.latent_masks = torch.cat(masks)
        self.latent_scale = vae.config.scaling_factor
        self.latent_shift = getattr(vae.config, "shift_factor", None) or 0.0
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
            trained.lora_alpha = float(self.config.lora_rank)  # the LoraConfig above: alpha = rank
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

"""Widgets the model nodes of both families declare alike (loaders, text encode, sampler, LoRA loader, memory
estimate: :mod:`.k5`, :mod:`.ltx2`), built here once with each family's tooltips and steps.

Only the widget definitions are shared; each node still lists its inputs in its own order, which is frozen once
released (saved workflows store widget values by position).
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..core.attention import BACKENDS
from ..core.family import LatentFormat
from ..core.weights import WEIGHT_DTYPES as _WEIGHT_DTYPES
from . import host

#: The loaders' ``weight_dtype`` options (:data:`cinetune.core.weights.WEIGHT_DTYPES`).
WEIGHT_DTYPES = list(_WEIGHT_DTYPES)
#: Compute dtypes of text encoders and VAEs by widget value.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: Largest width and height (px) and frame count the video widgets offer.
MAX_SIZE = 4096
MAX_FRAMES = 1025


def weight_dtype_input(tooltip: str) -> io.Combo.Input:
    """A model loader's ``weight_dtype`` (:data:`WEIGHT_DTYPES`, default ``"default"``: as stored)."""
    return io.Combo.Input("weight_dtype", options=WEIGHT_DTYPES, default="default", tooltip=tooltip)


def attention_input(tooltip: str) -> io.Combo.Input:
    """A model loader's ``attention`` kernel (:data:`cinetune.core.attention.BACKENDS`, default ``"sdpa"``)."""
    return io.Combo.Input("attention", options=list(BACKENDS), default="sdpa", tooltip=tooltip)


def block_swap_inputs(swap_tooltip: str, pinned_tooltip: str) -> list:
    """A model loader's ``blocks_to_swap`` (0..200, default 0) and ``use_pinned_memory`` (default on)."""
    return [
        io.Int.Input("blocks_to_swap", default=0, min=0, max=200, tooltip=swap_tooltip),
        io.Boolean.Input("use_pinned_memory", default=True, tooltip=pinned_tooltip),
    ]


def text_encoder_dtype_input(tooltip: str) -> io.Combo.Input:
    """A text encoder loader's compute ``dtype`` (a key of :data:`DTYPES`, default bf16)."""
    return io.Combo.Input("dtype", options=["bf16", "fp16", "fp32"], default="bf16", tooltip=tooltip)


def vae_dtype_input() -> io.Combo.Input:
    """A VAE loader's compute ``dtype`` (a key of :data:`DTYPES`, default fp32)."""
    return io.Combo.Input("dtype", options=["fp32", "bf16", "fp16"], default="fp32",
                          tooltip="VAE compute dtype; fp32 is safest, bf16 halves memory on GPUs.")


def prompt_inputs(prompt_tooltip: str, negative_default: str, negative_tooltip: str) -> list:
    """A text encode node's multiline ``prompt`` (default empty) and ``negative_prompt`` (the family's official
    negative prompt by default)."""
    return [
        io.String.Input("prompt", multiline=True, default="", tooltip=prompt_tooltip),
        io.String.Input("negative_prompt", multiline=True, default=negative_default, tooltip=negative_tooltip),
    ]


def video_size_inputs(latent_format: LatentFormat, *, width: str, height: str, frames: str | None = None) -> list:
    """``width`` (default 768) and ``height`` (default 512) in steps of the family's size multiple, and with a
    ``frames`` tooltip the frame count (default 121) in steps of its temporal factor (``4k+1``, ``8k+1``)."""
    multiple = latent_format.size_multiple
    inputs = [
        io.Int.Input("width", default=768, min=multiple, max=MAX_SIZE, step=multiple, tooltip=width),
        io.Int.Input("height", default=512, min=multiple, max=MAX_SIZE, step=multiple, tooltip=height),
    ]
    if frames is not None:
        inputs.append(io.Int.Input("frames", default=121, min=1, max=MAX_FRAMES, step=latent_format.temporal_factor,
                                   tooltip=frames))
    return inputs


def seed_input(tooltip: str) -> io.Int.Input:
    """A sampler's noise ``seed`` (64 bits, with ComfyUI's control after generate)."""
    return io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                        tooltip=tooltip)


def lora_loader_inputs(model: io.Custom, family: str, *, lora_tooltip: str, strength_tooltip: str) -> list:
    """A LoRA loader's ``model`` socket (``family``: its name in node names, e.g. ``"K5"``), ``lora_name`` (a file
    in models/loras) and ``strength`` (-10..10)."""
    return [
        model.Input("model", tooltip=f"From {family} Model Loader (or another {family} LoRA Loader)."),
        io.Combo.Input("lora_name", options=host.model_names("loras"), tooltip=lora_tooltip),
        io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05, tooltip=strength_tooltip),
    ]


def estimate_optimizer_input(*, optional: bool = False) -> io.Combo.Input:
    """A memory estimate's ``optimizer`` (the state size it counts)."""
    return io.Combo.Input("optimizer", options=["adamw", "adamw8bit"], default="adamw", optional=optional,
                          tooltip="Training: optimizer state size (AdamW 8 B per parameter, 8-bit 2 B).")

"""What the model nodes of both families share at run time (the nodes: :mod:`.k5`, :mod:`.ltx2`): the model
handle's common fields, loading a DiT with its block-swap setting, sampling with a handle's LoRAs and block swap,
encoding a prompt pair, the LoRA loader, and the activation dtype of LoRA training."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from comfy_api.latest import io

from ..core.lora import LoRAWeights, loras_applied
from ..core.offload import model_on_device
from ..training.runs import check_blocks_to_swap
from . import host
from .checks import CinetuneNode
from .handles import PlacedModel

T = TypeVar("T")


@dataclass
class ModelHandle(PlacedModel):
    """The fields every family's model handle has (a family adds its own after them and its ``blocks``).

    Attributes:
        model: the loaded DiT. config: its family config. variant: its family variant (``.id`` names it).
        attention_backend: the dense attention kernel (:data:`cinetune.core.attention.BACKENDS`).
        path: the file it was loaded from.
        blocks_to_swap: transformer blocks streamed from CPU memory (0: all on the GPU).
        use_pinned_memory: pin the CPU copies of swapped blocks.
        loras: ``(name, weights, strength)`` applied unmerged while sampling; the shared base weights never change.
        weight_dtype: the loader's ``weight_dtype`` (recorded in a training run's recipe, so a headless run loads the
            same weights).
    """

    model: torch.nn.Module
    config: Any
    variant: Any
    attention_backend: str
    path: Path
    blocks_to_swap: int = 0
    use_pinned_memory: bool = True
    loras: tuple[tuple[str, LoRAWeights, float], ...] = ()
    weight_dtype: str = "default"


def load_dit(load: Callable[..., T], path: Path, weight_dtype: str) -> T:
    """``load(path, weight_dtype=weight_dtype, device="cpu")`` outside inference mode: ComfyUI runs nodes in
    inference mode, and weights made there are inference tensors that LoRA training cannot use.

    Raises:
        whatever ``load`` raises (file problems, unknown ``weight_dtype``).
    """
    with torch.inference_mode(False):
        return load(path, weight_dtype=weight_dtype, device="cpu")


def block_swap(blocks_to_swap: int, use_pinned_memory: bool, total: int, model_name: str) -> dict[str, Any]:
    """The handle fields of a block-swap setting: ``blocks_to_swap`` and ``use_pinned_memory`` (off where the host
    disallows pinned memory, ComfyUI ``--disable-pinned-memory``).

    Raises:
        TrainingError (a ValueError): more blocks to swap than the model's ``total`` (names ``model_name`` and the
            most allowed).
    """
    check_blocks_to_swap(blocks_to_swap, total, model_name)
    return dict(blocks_to_swap=blocks_to_swap, use_pinned_memory=use_pinned_memory and host.pinned_memory_allowed())


@contextmanager
def sampling(handle: ModelHandle) -> Iterator[torch.device]:
    """Inference with ``handle``'s model: ComfyUI's own models are freed, the handle's LoRAs applied unmerged and its
    blocks placed on the compute device (block swap, :meth:`~.handles.PlacedModel.placement`) until the block ends;
    yields the compute device."""
    device = host.compute_device()
    host.free_host_models()
    loras = [(weights, strength) for _, weights, strength in handle.loras]
    with (torch.inference_mode(), loras_applied(handle.model, loras),
          model_on_device(handle.model, handle.blocks, device, **handle.placement())):
        yield device


def encode_prompt_pair(text_encoder: Any, encode: Callable[[str], Any], prompt: str,
                       negative_prompt: str) -> tuple[Any, Any]:
    """``(encode(prompt), encode(negative_prompt))`` with ``text_encoder`` on the compute device, in inference mode,
    each result moved to the CPU (``.to("cpu")``); the encoder goes back where ComfyUI keeps it afterwards."""
    with host.on_compute_device(text_encoder), torch.inference_mode():
        return encode(prompt).to("cpu"), encode(negative_prompt).to("cpu")


def training_dtype(device) -> torch.dtype:
    """Activation dtype of LoRA training: bf16 on CUDA, fp32 elsewhere (bf16 matmuls are slow on CPUs)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


class LoRALoaderNode(CinetuneNode):
    """Base of both families' LoRA loaders: adds the LoRA file to the model handle for sampling
    (:meth:`~.handles.PlacedModel.with_lora`; inputs from :func:`~.common_inputs.lora_loader_inputs`)."""

    @classmethod
    def execute(cls, model, lora_name, strength) -> io.NodeOutput:
        return io.NodeOutput(model.with_lora(lora_name, strength))

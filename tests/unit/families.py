"""The tiny Kandinsky 5 and LTX-2 DiTs behind one interface, so the tests of the shared code run on both families.

Each :class:`TinyFamily` hands a test what the shared code takes from a family — the model, its blocks, its LoRA
targets, its fp8 keep rule, its tiny file and loader — plus inputs and a forward that returns one tensor to compare.
Tests take a family with ``@each_family`` (a ``fam`` argument, ids ``k5`` and ``ltx2``).

Expected LoRA and fp8 layer lists are written out from each family's published description (not computed with the
rule under test): Kandinsky 5 — 6 LoRA layers per text block, 10 per visual block, the same layers quantised;
LTX-2 — the q/k/v/out projections of the six attention modules of every block; fp8 for every attention projection
and feed-forward Linear of blocks 1–42 (block 0 and 43–47 stay high precision, so in the 2-block tiny model only
block 1 is quantised).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from cinetune.core.checkpoint import Checkpoint
from cinetune.core.family import ModelFamily
from cinetune.k5.config import K5Config
from cinetune.k5.dit import Kandinsky5DiT, k5_fp8_keep_high_precision, load_k5_dit
from cinetune.k5.family import K5_FAMILY
from cinetune.k5.tiny import TINY_DIT_DIMS, seeded_tensor, write_tiny_dit
from cinetune.ltx2.config import (
    CONNECTOR_PREFIXES,
    DIT_PREFIX,
    LTX2TransformerConfig,
    ltx2_fp8_keep_high_precision,
    tiny_transformer_metadata,
)
from cinetune.ltx2.dit import LTX2DiT
from cinetune.ltx2.family import LTX2_FAMILY
from cinetune.ltx2.loader import load_ltx2_dit
from cinetune.ltx2.rope import audio_positions, video_positions
from cinetune.ltx2.tiny import write_tiny_checkpoint

Inputs = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TinyFamily:
    """One family's tiny DiT and the values the shared code takes from the family.

    Attributes:
        id: short test id (``"k5"``, ``"ltx2"``).
        family: the registered :class:`~cinetune.core.family.ModelFamily` (``lora_targets``, ``lora_within``, name).
        new: the tiny DiT with its own initialisation, on the current default device (``meta`` inside
            ``with torch.device("meta")``).
        block_lists: names of the model's block lists, in execution order.
        make_inputs: ``seed -> inputs`` for :attr:`forward` (float32).
        forward: ``(model, inputs, backend) -> tensor`` — the prediction as one tensor (LTX-2: video and audio
            velocities, flattened and concatenated, so both streams count).
        keep: the family's fp8 keep rule (True = stays high precision).
        lora_paths: ``model -> [module path]``, the layers the family's LoRA targets, in module order.
        fp8_paths: ``model -> [module path]``, the Linear layers the keep rule quantises.
        write_file: ``(path, seed) -> path``, the family's tiny checkpoint file in its published layout.
        select: the DiT's tensors of an opened tiny file under the model's own names.
        load: ``(path, weight_dtype) -> model`` through the family's loader.
        dit_file_prefix, dit_file_metadata: key prefix and safetensors metadata of a file holding only the DiT that
            :attr:`load` reads (K5: the official layout, neither; LTX-2: a ComfyUI split DiT file,
            ``model.diffusion_model.`` and the ``config`` metadata naming the tiny transformer).
    """

    id: str
    family: ModelFamily
    new: Callable[[], nn.Module]
    block_lists: tuple[str, ...]
    make_inputs: Callable[[int], Inputs]
    forward: Callable[[nn.Module, Inputs, str], torch.Tensor]
    keep: Callable[[str], bool]
    lora_paths: Callable[[nn.Module], list[str]]
    fp8_paths: Callable[[nn.Module], list[str]]
    write_file: Callable[[Path, int], Path]
    select: Callable[[Checkpoint], Checkpoint]
    load: Callable[[Path, str], nn.Module]
    dit_file_prefix: str = ""
    dit_file_metadata: dict[str, str] | None = None

    def __str__(self) -> str:
        return self.id

    def build(self, seed: int = 0) -> nn.Module:
        """The tiny DiT, frozen and in eval mode as the loaders return it, with deterministic random values
        everywhere (seeded by parameter name; the official inits zero the modulations and output layers, which
        would hide every block)."""
        model = self.new()
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(seeded_tensor(seed, name, tuple(p.shape)))
        return model.eval().requires_grad_(False)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The model's blocks in execution order (what block swap and checkpointing take)."""
        return [b for name in self.block_lists for b in model.get_submodule(name)]

    def block_prefixes(self, model: nn.Module) -> list[str]:
        """``"<list>.<i>."`` of every block, in execution order."""
        return [f"{name}.{i}." for name in self.block_lists for i in range(len(model.get_submodule(name)))]

    def gradient_checkpointing(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Recompute each block in backward, as the trainer does (one checkpoint per block)."""
        from cinetune.training.trainer import gradient_checkpointing

        return gradient_checkpointing(self.blocks(model))

    def inputs(self, seed: int = 1) -> Inputs:
        return self.make_inputs(seed)

    def run(self, model: nn.Module, inputs: Inputs, backend: str = "sdpa") -> torch.Tensor:
        return self.forward(model, inputs, backend)


# ---------------------------------------------------------------------------------------------------------------
# Kandinsky 5: 1 text block, 2 visual blocks (k5/tiny.py TINY_DIT_DIMS)

K5_TINY = K5Config(**TINY_DIT_DIMS)
_K5_TEXT_LAYERS = ("self_attention.to_query", "self_attention.to_key", "self_attention.to_value",
                   "self_attention.out_layer", "feed_forward.in_layer", "feed_forward.out_layer")
_K5_CROSS_LAYERS = ("cross_attention.to_query", "cross_attention.to_key", "cross_attention.to_value",
                    "cross_attention.out_layer")
_K5_VISUAL_LAYERS = _K5_TEXT_LAYERS[:4] + _K5_CROSS_LAYERS + _K5_TEXT_LAYERS[4:]


def _k5_inputs(seed: int) -> Inputs:
    """One sample: noisy | conditioning latent | mask (33 channels, 2×4×4 latent), 5 text tokens, σ = 0.7."""
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(1, K5_TINY.visual_embed_dim, 2, 4, 4, generator=g),
                text=torch.randn(1, 5, K5_TINY.in_text_dim, generator=g),
                pooled=torch.randn(1, K5_TINY.in_text_dim2, generator=g), timestep=torch.tensor([700.0]))


def _k5_forward(model: nn.Module, inp: Inputs, backend: str) -> torch.Tensor:
    return model(inp["x"], inp["text"], inp["pooled"], inp["timestep"], attention_backend=backend)


def _k5_paths(model: nn.Module, text_layers: tuple[str, ...], visual_layers: tuple[str, ...]) -> list[str]:
    cfg = model.config
    return ([f"text_transformer_blocks.{i}.{t}" for i in range(cfg.num_text_blocks) for t in text_layers]
            + [f"visual_transformer_blocks.{j}.{t}" for j in range(cfg.num_visual_blocks) for t in visual_layers])


K5 = TinyFamily(
    id="k5", family=K5_FAMILY, new=lambda: Kandinsky5DiT(K5_TINY),
    block_lists=("text_transformer_blocks", "visual_transformer_blocks"),
    make_inputs=_k5_inputs, forward=_k5_forward, keep=k5_fp8_keep_high_precision,
    lora_paths=lambda m: _k5_paths(m, _K5_TEXT_LAYERS, _K5_VISUAL_LAYERS),
    fp8_paths=lambda m: _k5_paths(m, _K5_TEXT_LAYERS, _K5_VISUAL_LAYERS),
    write_file=write_tiny_dit, select=lambda ckpt: ckpt,
    load=lambda path, weight_dtype: load_k5_dit(path, weight_dtype=weight_dtype).model)


# ---------------------------------------------------------------------------------------------------------------
# LTX-2: 2 dual-stream blocks (ltx2/config.py tiny_transformer_metadata)

LTX2_TINY = LTX2TransformerConfig.from_metadata(tiny_transformer_metadata())
_LTX2_ATTENTIONS = ("attn1", "attn2", "audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn")
_LTX2_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
_LTX2_FEED_FORWARDS = ("ff.net.0.proj", "ff.net.2", "audio_ff.net.0.proj", "audio_ff.net.2")
#: Latent grid F', H', W' of the LTX-2 inputs, audio latent steps, text tokens.
LTX2_GRID, LTX2_AUDIO_TOKENS, LTX2_TEXT_TOKENS = (2, 2, 3), 5, 4


def _ltx2_inputs(seed: int) -> Inputs:
    """One sample with image-to-video style per-token σ: the first latent frame clean (σ = 0), the rest at 0.7."""
    g = torch.Generator().manual_seed(seed)
    F, H, W = LTX2_GRID
    video_sigma = torch.full((1, F * H * W), 0.7)
    video_sigma[:, : H * W] = 0.0
    c = LTX2_TINY
    return dict(
        video=torch.randn(1, F * H * W, c.in_channels, generator=g),
        audio=torch.randn(1, LTX2_AUDIO_TOKENS, c.audio_in_channels, generator=g),
        video_sigma=video_sigma, audio_sigma=torch.full((1, LTX2_AUDIO_TOKENS), 0.7),
        video_context=torch.randn(1, LTX2_TEXT_TOKENS, c.caption_channels, generator=g),
        audio_context=torch.randn(1, LTX2_TEXT_TOKENS, c.caption_channels, generator=g),
        video_positions=video_positions(F, H, W, fps=24.0), audio_positions=audio_positions(LTX2_AUDIO_TOKENS))


def _ltx2_forward(model: nn.Module, inp: Inputs, backend: str) -> torch.Tensor:
    before = model.attention_backend
    model.attention_backend = backend
    try:
        rest = {k: v for k, v in inp.items() if k not in ("video", "audio")}
        video, audio = model(inp["video"], inp["audio"], **rest)
    finally:
        model.attention_backend = before
    return torch.cat([video.flatten(), audio.flatten()])


def _ltx2_lora_paths(model: nn.Module) -> list[str]:
    return [f"transformer_blocks.{i}.{a}.{p}" for i in range(model.config.num_layers)
            for a in _LTX2_ATTENTIONS for p in _LTX2_PROJECTIONS]


def _ltx2_fp8_paths(model: nn.Module) -> list[str]:
    quantised = [i for i in range(model.config.num_layers) if 1 <= i <= 42]
    return [f"transformer_blocks.{i}.{layer}" for i in quantised
            for layer in [f"{a}.{p}" for a in _LTX2_ATTENTIONS for p in _LTX2_PROJECTIONS] + list(_LTX2_FEED_FORWARDS)]


LTX2 = TinyFamily(
    id="ltx2", family=LTX2_FAMILY, new=lambda: LTX2DiT(LTX2_TINY), block_lists=("transformer_blocks",),
    make_inputs=_ltx2_inputs, forward=_ltx2_forward, keep=ltx2_fp8_keep_high_precision,
    lora_paths=_ltx2_lora_paths, fp8_paths=_ltx2_fp8_paths, write_file=write_tiny_checkpoint,
    select=lambda ckpt: ckpt.select(DIT_PREFIX, exclude=tuple(DIT_PREFIX + c for c in CONNECTOR_PREFIXES)),
    load=lambda path, weight_dtype: load_ltx2_dit(path, weight_dtype=weight_dtype).model,
    dit_file_prefix=DIT_PREFIX, dit_file_metadata={"config": json.dumps({"transformer": tiny_transformer_metadata()})})


FAMILIES: tuple[TinyFamily, ...] = (K5, LTX2)
#: Run a test once per family: ``@each_family`` then a ``fam`` argument.
each_family = pytest.mark.parametrize("fam", FAMILIES, ids=str)


def tiny_file_writer(folder: Path) -> Callable[[TinyFamily], Path]:
    """``fam -> path`` of the family's tiny file in ``folder``, written on first use (seed 0)."""
    written: dict[str, Path] = {}

    def get(fam: TinyFamily) -> Path:
        if fam.id not in written:
            written[fam.id] = fam.write_file(Path(folder) / f"tiny_{fam.id}.safetensors", 0)
        return written[fam.id]

    return get

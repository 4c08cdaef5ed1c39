"""Kandinsky 5 video DiT (Lite 2B / Pro 19B / Image Lite 6B) and its checkpoint loader.

Architecture and numerics: kandinskylab/kandinsky-5 ``kandinsky/models/dit.py`` and ``kandinsky/models/nn.py``; the
same network as diffusers ``Kandinsky5Transformer3DModel`` (``diffusers/models/transformers/transformer_kandinsky.py``),
against which the tests check parity. The layers, their precision (float32 modulation, norms, RoPE and residual
update; the rest in the input dtype) and the RoPE decisions are in :mod:`cinetune.k5.blocks`.

Data flow for latents ``[B, C, T, H, W]`` (C = 33 = noisy 16 | conditioning 16 | mask 1):

1. patchify (1, 2, 2) with feature order (pt, ph, pw, C) → Linear → tokens ``[B, S, D]``, S = T·(H/2)·(W/2);
2. text: Linear(3584 → D) → LayerNorm; time: sinusoid of size D (cos first, timestep = 1000·σ) → MLP, plus pooled
   CLIP (Linear → LayerNorm) = conditioning vector ``c [B, time_dim]``;
3. text blocks: modulated self-attention (1-D RoPE, key padding mask) + FFN;
4. visual blocks: modulated self-attention (3-D RoPE, full or NABLA) + cross-attention to text (no RoPE) + FFN;
5. modulated LayerNorm → Linear(D → 64) → unpatchify with feature order (C, pt, ph, pw) → velocity
   ``[B, 16, T, H, W]``.

Decisions:

- **Text padding**: a key padding mask (``text_mask``) in text self-attention and cross-attention, as the current
  official code (``text_token_padding=True``); equivalent, for the valid tokens, to dropping the padding
  (older official code, diffusers, musubi-tuner). Text RoPE positions are 0..L−1 either way.
- **Batch**: B > 1 is supported (per-sample modulation), unlike the batch-1 official code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core.attention import check_backend
from ..core.checkpoint import CheckpointError, TensorInfo, open_checkpoint
from ..core.weights import check_weight_dtype, load_weights
from . import detect  # noqa: F401 - registers the Kandinsky 5 checkpoint kind
from .blocks import (FF_CHUNK_TOKENS, LAYER_NORM_EPS, MAX_PERIOD, RMS_NORM_EPS, Attention, FeedForward, Modulation,
                     OutLayer, TextBlock, TextEmbeddings, TimeEmbeddings, VisualBlock, VisualEmbeddings, apply_rope,
                     gated_residual, modulate, patchify, rope_1d, rope_3d, sinusoid_frequencies, timestep_sinusoid,
                     unpatchify)
from .config import EXPECTED_FILE, MARKER_KEY, K5Config, NotK5CheckpointError, detect_config
from .nabla import NablaConfig, check_nabla_grid, fractal_permutation

__all__ = [
    "Kandinsky5DiT", "LoadedK5DiT", "load_k5_dit", "k5_fp8_keep_high_precision",
    # the layers, defined in k5/blocks.py
    "FF_CHUNK_TOKENS", "LAYER_NORM_EPS", "MAX_PERIOD", "RMS_NORM_EPS", "Attention", "FeedForward", "Modulation",
    "OutLayer", "TextBlock", "TextEmbeddings", "TimeEmbeddings", "VisualBlock", "VisualEmbeddings", "apply_rope",
    "gated_residual", "modulate", "patchify", "rope_1d", "rope_3d", "sinusoid_frequencies", "timestep_sinusoid",
    "unpatchify",
]


def _float_tensor(name: str, t, ndim: int, shape_hint: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.ndim != ndim or not t.is_floating_point():
        got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a float tensor {shape_hint}, got {got}")
    return t


class Kandinsky5DiT(nn.Module):
    """The Kandinsky 5 diffusion transformer (official ``DiffusionTransformer3D``), batched.

    State-dict keys are exactly the official ones (and diffusers'); text blocks live in ``text_transformer_blocks``,
    visual blocks in ``visual_transformer_blocks`` (one ``nn.Module`` per block, for block swap and checkpointing).

    Args:
        config: :class:`~cinetune.k5.config.K5Config`.
    """

    def __init__(self, config: K5Config) -> None:
        super().__init__()
        if not isinstance(config, K5Config):
            raise TypeError(f"config must be a K5Config, got {type(config).__name__}")
        self.config = config
        D, Tm, Fd, hd = config.model_dim, config.time_dim, config.ff_dim, config.head_dim
        self.time_embeddings = TimeEmbeddings(D, Tm)
        self.text_embeddings = TextEmbeddings(config.in_text_dim, D)
        self.pooled_text_embeddings = TextEmbeddings(config.in_text_dim2, Tm)
        self.visual_embeddings = VisualEmbeddings(config.visual_embed_dim, D, config.patch_size)
        self.text_transformer_blocks = nn.ModuleList(TextBlock(D, Tm, Fd, hd) for _ in range(config.num_text_blocks))
        self.visual_transformer_blocks = nn.ModuleList(
            VisualBlock(D, Tm, Fd, hd) for _ in range(config.num_visual_blocks))
        self.out_layer = OutLayer(D, Tm, config.out_visual_dim, config.patch_size)

    def _check_inputs(self, x, text, pooled, timestep, text_mask, rope_scale):
        cfg = self.config
        _float_tensor("x", x, 5, f"[B, {cfg.visual_embed_dim}, T, H, W]")
        B, C, T, H, W = x.shape
        if C != cfg.visual_embed_dim:
            what = ("noisy latent 16 | conditioning latent 16 | mask 1" if cfg.visual_cond else "latent")
            raise ValueError(f"x has {C} channels; this DiT takes {cfg.visual_embed_dim} ({what})")
        pt, ph, pw = cfg.patch_size
        if T % pt or H % ph or W % pw or min(T, H, W) == 0:
            raise ValueError(f"latent size T×H×W = {T}×{H}×{W} must be a non-zero multiple of the patch size "
                             f"{cfg.patch_size} (latent H and W even, i.e. pixel sizes multiples of 16)")
        _float_tensor("text", text, 3, f"[B, L, {cfg.in_text_dim}]")
        if text.shape[0] != B or text.shape[2] != cfg.in_text_dim or text.shape[1] == 0:
            raise ValueError(f"text must be [B={B}, L≥1, {cfg.in_text_dim}] (Qwen2.5-VL hidden states), "
                             f"got {list(text.shape)}")
        _float_tensor("pooled", pooled, 2, f"[B, {cfg.in_text_dim2}]")
        if tuple(pooled.shape) != (B, cfg.in_text_dim2):
            raise ValueError(f"pooled must be [B={B}, {cfg.in_text_dim2}] (CLIP pooled output), "
                             f"got {list(pooled.shape)}")
        if not isinstance(timestep, torch.Tensor):
            timestep = torch.tensor(float(timestep), device=x.device)
        if timestep.numel() not in (1, B) or timestep.ndim > 1:
            raise ValueError(f"timestep must be a scalar or [B={B}] (1000·σ), got shape {list(timestep.shape)}")
        timestep = timestep.reshape(-1).float().expand(B)
        if text_mask is not None:
            if (not isinstance(text_mask, torch.Tensor) or text_mask.dtype != torch.bool
                    or tuple(text_mask.shape) != tuple(text.shape[:2])):
                got = f"{text_mask.dtype} {list(text_mask.shape)}" if isinstance(text_mask, torch.Tensor) else text_mask
                raise ValueError(f"text_mask must be bool [B, L] = {list(text.shape[:2])} (True = real token), "
                                 f"got {got}")
            if not bool(text_mask.any(dim=1).all()):
                raise ValueError("text_mask has a sample with no real token; every prompt needs at least one token")
            if bool(text_mask.all()):
                text_mask = None
        try:
            scale = tuple(float(s) for s in rope_scale)
        except (TypeError, ValueError):
            scale = ()
        if len(scale) != 3 or not all(s > 0 and math.isfinite(s) for s in scale):
            raise ValueError(f"rope_scale must be three positive numbers (t, h, w), e.g. (1, 2, 2); got {rope_scale}")
        return timestep, text_mask, scale

    def forward(self, x: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor, timestep: torch.Tensor | float, *,
                text_mask: torch.Tensor | None = None, rope_scale: tuple[float, float, float] = (1.0, 2.0, 2.0),
                attention_backend: str = "sdpa", nabla: NablaConfig | None = None) -> torch.Tensor:
        """Predict the flow-matching velocity ``v = ε − x0``.

        Args:
            x: ``[B, visual_embed_dim, T, H, W]`` latent in the compute dtype (fp32, bf16 or fp16): noisy latent
                (16) | conditioning latent (16) | mask (1) for video checkpoints; H, W latent size (even).
            text: ``[B, L, in_text_dim]`` Qwen2.5-VL hidden states (cast to ``x.dtype``).
            pooled: ``[B, in_text_dim2]`` CLIP-L pooled output (cast to ``x.dtype``).
            timestep: ``[B]`` (or scalar) float, ``1000·σ``.
            text_mask: bool ``[B, L]``, True = real token, or None (all real).
            rope_scale: RoPE position divisors (t, h, w): (1, 2, 2) SD, (1, 3.16, 3.16) HD, (1, 1, 1) image models.
            attention_backend: :mod:`cinetune.core.attention` backend for dense attention.
            nabla: NABLA settings for the visual self-attention, or None for full attention. Tokens are put into
                fractal order (with their RoPE) before the visual blocks and back before the out layer.

        Returns:
            Velocity ``[B, 16, T, H, W]`` in ``x.dtype``.

        Raises:
            ValueError: shapes/dtypes wrong (the message gives the expected shape); with NABLA, latent H/2 or W/2
                not a multiple of 8 (pixel sizes not multiples of 128); bad rope_scale or text_mask.
            AttentionBackendError: unknown or missing attention backend.
        """
        timestep, text_mask, scale = self._check_inputs(x, text, pooled, timestep, text_mask, rope_scale)
        check_backend(attention_backend)
        cfg = self.config
        pt, ph, pw = cfg.patch_size
        grid = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
        perm = inv = None
        if nabla is not None:
            if not isinstance(nabla, NablaConfig):
                raise ValueError(f"nabla must be a NablaConfig or None, got {type(nabla).__name__}")
            if pt != 1:
                raise ValueError(f"NABLA needs temporal patch size 1, this DiT has {pt}")
            check_nabla_grid(*grid)
            perm, inv = fractal_permutation(*grid, device=x.device)
        dtype = x.dtype

        c = self.time_embeddings(timestep) + self.pooled_text_embeddings(pooled.to(dtype)).float()
        txt = self.text_embeddings(text.to(dtype))
        visual = self.visual_embeddings(x)

        text_rope = rope_1d(txt.shape[1], cfg.head_dim, x.device)
        for block in self.text_transformer_blocks:
            txt = block(txt, c, text_rope, text_mask, attention_backend)

        visual_rope = rope_3d(grid, cfg.axes_dims, scale, x.device)
        if perm is not None:
            visual, visual_rope = visual[:, perm], visual_rope[perm]
        for block in self.visual_transformer_blocks:
            visual = block(visual, txt, c, visual_rope, text_mask, attention_backend, nabla, grid)
        if inv is not None:
            visual = visual[:, inv]
        return self.out_layer(visual, c, grid)


# ---------------------------------------------------------------------------------------------------------------
# Loading

# Prefix → layout name. Official files have no prefix; ComfyUI checkpoints nest the DiT under model.diffusion_model.
_PREFIXES = (("model.diffusion_model.", "comfyui"), ("diffusion_model.", "comfyui"), ("transformer.", "diffusers"))
_DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
_DIFFUSERS_FILE = "diffusion_pytorch_model.safetensors"
_BLOCK_LISTS = ("text_transformer_blocks", "visual_transformer_blocks")
_K5_HIGH_PRECISION_PREFIXES = ("time_embeddings.", "text_embeddings.", "pooled_text_embeddings.",
                               "visual_embeddings.", "out_layer.")


def k5_fp8_keep_high_precision(name: str) -> bool:
    """Kandinsky 5 rule for weight-only fp8: which Linear layers stay in high precision (the ``keep`` argument of
    :func:`~cinetune.core.quant.quantize_linear_weights_fp8` and :func:`~cinetune.core.quant.save_fp8_checkpoint`).

    Kept: the time, text, pooled-text and visual embeddings, every modulation (``*modulation*``: they compute shift,
    scale and gate in float32 for every block), norms, and the final ``out_layer.*`` (it produces the velocity
    directly). Quantised: the attention projections and both feed-forward layers of every text and visual block —
    86 % of the Lite parameters (88 % of Pro); the modulations hold most of the rest (14 % / 12 %).

    Sources and choice: the official fp8 recipe (ai-forever ``create_fp8_full.py``, torchao dynamic-activation fp8)
    keeps the embeddings and the out layer in high precision; kohya-ss/musubi-tuner (``kandinsky5``, ``--fp8_scaled``)
    quantises only keys under the text/visual blocks and the out layer, never norms. Here the embeddings and the out
    layer are kept as officially, and the modulations too although both sources quantise them: their output (shift,
    scale and gate of every block, computed in float32 on purpose) acts on every token, so fp8 there would trade
    accuracy in every block for 14 % of the weight memory. The official recipe also keeps every
    ``feed_forward.out_layer`` because it quantises *activations* and the GELU output has a long tail; with
    weight-only fp8 (activations stay in the compute dtype) that reason does not apply, so those layers are
    quantised here, as in musubi-tuner.

    This rule decides what *this pack* quantises on load; layers a pre-quantised file stores in fp8 stay fp8 (see
    :func:`load_k5_dit`).

    Args:
        name: qualified module name inside the DiT, e.g. ``"visual_transformer_blocks.3.self_attention.to_query"``.

    Returns:
        True to keep the layer in high precision.
    """
    full = name + "."
    return full.startswith(_K5_HIGH_PRECISION_PREFIXES) or "modulation" in name or "norm" in name


@dataclass
class LoadedK5DiT:
    """Result of :func:`load_k5_dit`.

    Attributes:
        model: the DiT, in eval mode with ``requires_grad=False``.
        config: detected :class:`K5Config`.
        layout: ``"official"`` (no prefix), ``"comfyui"`` (``model.diffusion_model.`` prefix) or ``"diffusers"``
            (a diffusers transformer folder / shard index, or a ``transformer.`` prefix).
        path: the file or folder loaded.
        dtypes: histogram of the *stored* tensor dtypes of the DiT weights (scales not counted), e.g.
            ``{"BF16": 780, "F32": 34}``.
        fp8_layout: the file's fp8 layout (:class:`~cinetune.core.checkpoint.FP8Scheme`): ``"musubi"``,
            ``"comfyui"``, ``"comfyui_mixed"``, ``"weight_scale"``, ``"unscaled"`` (a plain fp8 cast), or None.
    """

    model: Kandinsky5DiT
    config: K5Config
    layout: str
    path: Path
    dtypes: dict[str, int] = field(default_factory=dict)
    fp8_layout: str | None = None


def _first(items, n: int = 10) -> str:
    items = sorted(items)
    more = f" … (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _resolve_files(path: Path) -> tuple[Path, str | None, dict]:
    """Return (the file or shard index to open, layout hint, diffusers config.json contents)."""
    if path.is_dir():
        for folder in (path, path / "transformer"):
            if (folder / _DIFFUSERS_INDEX).is_file():
                path = folder / _DIFFUSERS_INDEX
                break
            if (folder / _DIFFUSERS_FILE).is_file():
                path = folder / _DIFFUSERS_FILE
                break
        else:
            raise CheckpointError(
                f"{path}: folder holds neither {_DIFFUSERS_FILE} nor {_DIFFUSERS_INDEX} (also looked in transformer/); "
                f"expected {EXPECTED_FILE}, or a diffusers Kandinsky 5 transformer folder.")
    config_json = path.parent / "config.json"
    diffusers_config: dict = {}
    if config_json.is_file() and path.name in (_DIFFUSERS_FILE, _DIFFUSERS_INDEX):
        try:
            diffusers_config = json.loads(config_json.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{config_json}: unreadable diffusers config ({e}).") from e
    diffusers = bool(diffusers_config) or path.name.endswith(".index.json")
    return path, ("diffusers" if diffusers else None), diffusers_config


def _select_prefix(infos: Mapping[str, TensorInfo]) -> tuple[str, str]:
    if MARKER_KEY in infos:
        return "", "official"
    for prefix, layout in _PREFIXES:
        if prefix + MARKER_KEY in infos:
            return prefix, layout
    return "", "official"


def _expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}


def _check_keys(path: Path, config: K5Config, found: Mapping[str, TensorInfo],
                expected: Mapping[str, tuple[int, ...]]) -> None:
    missing = set(expected) - set(found)
    unexpected = set(found) - set(expected)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors: {_first(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors: {_first(unexpected)}")
    bad = [f"{k} {list(found[k].shape)} (expected {list(expected[k])})" for k in sorted(set(found) & set(expected))
           if tuple(found[k].shape) != expected[k]]
    if bad:
        problems.append(f"{len(bad)} tensors with wrong shapes: {_first(bad)}")
    if problems:
        family = config.family if config.family != "custom" else "custom-size"
        raise CheckpointError(
            f"{path}: not a complete Kandinsky 5 {family} DiT (model_dim {config.model_dim}, "
            f"{config.num_text_blocks} text + {config.num_visual_blocks} visual blocks): " + "; ".join(problems)
            + f". Expected {EXPECTED_FILE} as published, without extra or missing tensors; re-download the file.")


def load_k5_dit(path: str | os.PathLike, *, weight_dtype: str = "default",
                device: str | torch.device = "cpu") -> LoadedK5DiT:
    """Load a Kandinsky 5 DiT checkpoint, detecting its dims (:func:`~cinetune.k5.config.detect_config`) and layout.

    Accepted: the official ``.safetensors`` (no prefix); ComfyUI checkpoints (``model.diffusion_model.`` prefix,
    other non-DiT tensors never read); diffusers transformer weights — a ``diffusion_pytorch_model.safetensors``
    file, a sharded ``…index.json``, or the folder holding them (or its parent with ``transformer/``). Diffusers 0.42
    ``Kandinsky5Transformer3DModel`` uses the official tensor names, so no renaming is needed; its ``config.json``
    supplies ``axes_dims`` when present. PyTorch pickles (``.pt``/``.pth``/``.bin``) are read too.

    The file is read tensor by tensor (:class:`~cinetune.core.checkpoint.Checkpoint`, never memory-mapped), each
    tensor converted to its target dtype as it arrives, so host memory stays near the loaded model's size plus one
    tensor: a 19B Pro file loads as fp8 on a host with less memory than the file. On the CPU each transformer block
    is read into one buffer of block swap's master layout, which :class:`~cinetune.core.offload.BlockSwap` takes over
    without copying.

    fp8 files (every layout :attr:`~cinetune.core.checkpoint.Checkpoint.fp8` reads: musubi-tuner, ComfyUI scaled fp8
    and mixed precision, ``weight_scale`` files, plain fp8 casts): each layer the file stores in fp8 becomes an
    :class:`~cinetune.core.quant.FP8Linear` holding the stored codes and scales unchanged (scales as float32, an exact
    conversion; scale 1 for a plain cast) — with ``weight_dtype`` ``"default"`` or ``"fp8_e4m3fn"``, whichever layers
    these are (musubi files also quantise the modulations and the out layer). With ``"bf16"``/``"fp16"``/``"fp32"``
    those layers are dequantised on load instead, ``W = q · s`` in float32 rounded once to the dtype (no memory
    saving; the way to run fp8 files on a device that cannot hold float8).

    Args:
        path: file or folder.
        weight_dtype: ``"default"`` keeps each tensor's stored dtype (a file with fp32 modulation and bf16 elsewhere
            stays so; the forward casts at use; pre-quantised layers stay fp8); ``"bf16"``, ``"fp16"``, ``"fp32"``
            cast every float tensor and dequantise pre-quantised layers; ``"fp8_e4m3fn"`` keeps pre-quantised
            layers and stores every other block Linear weight in float8 with a per-tensor scale (see
            :func:`k5_fp8_keep_high_precision`), the rest as stored.
        device: where the weights go.

    Returns:
        :class:`LoadedK5DiT`.

    Raises:
        ValueError: unknown ``weight_dtype``.
        FP8DeviceError: fp8 weights would be kept on a device that cannot cast float8 (use ``weight_dtype="bf16"``).
        NotK5CheckpointError: the file is another kind of model (LTX-2, VAE, text encoder, LoRA, …); the message says
            which and what was expected.
        CheckpointError: missing/truncated/unreadable file, not enough host memory (with what to do), missing or
            unexpected tensors (listed), wrong shapes; in an fp8 file: an fp8 weight without scale where the layout
            requires one, a scale without fp8 weight, a scale of the wrong shape, fp8 on a tensor that is not a
            Linear weight, NVFP4/4-bit layers (each names the key).
    """
    check_weight_dtype(weight_dtype)
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: file not found. Expected {EXPECTED_FILE}.")
    target_path, layout_hint, diffusers_config = _resolve_files(path)
    try:
        ckpt = open_checkpoint(target_path)
    except CheckpointError as e:
        raise CheckpointError(f"{e} Expected {EXPECTED_FILE}.") from e

    prefix, layout = _select_prefix(ckpt.infos)
    dit = ckpt.select(prefix)
    try:
        scheme = dit.fp8
    except CheckpointError:
        if MARKER_KEY not in dit.infos:  # another model's fp8 file: say what it is rather than what its scales lack
            try:
                detect_config(dit.infos)
            except NotK5CheckpointError as e:
                raise NotK5CheckpointError(f"{path}: {e}") from e
        raise
    dit_infos = dit.model_infos()
    try:
        config = detect_config(dit_infos)
    except NotK5CheckpointError as e:
        raise NotK5CheckpointError(f"{path}: {e}") from e
    if diffusers_config.get("axes_dims") and tuple(diffusers_config["axes_dims"]) != config.axes_dims:
        axes = tuple(int(a) for a in diffusers_config["axes_dims"])
        try:
            config = dataclasses.replace(config, axes_dims=axes)
        except ValueError as e:
            raise CheckpointError(f"{path}: config.json axes_dims {axes} do not fit the weights: {e}") from e
    if layout_hint is not None and prefix == "":
        layout = layout_hint

    with torch.device("meta"):
        model = Kandinsky5DiT(config)
    expected = _expected_shapes(model)  # FP8Linear and CastLinear share the keys weight/bias; scales come apart
    _check_keys(path, config, dit_infos, expected)
    blocks = [f"{name}.{i}." for name in _BLOCK_LISTS for i in range(len(getattr(model, name)))]
    load_weights(model, dit, list(expected), weight_dtype=weight_dtype, keep=k5_fp8_keep_high_precision,
                 block_prefixes=blocks, device=device)
    histogram: dict[str, int] = {}
    for name in expected:
        histogram[dit_infos[name].dtype] = histogram.get(dit_infos[name].dtype, 0) + 1
    return LoadedK5DiT(model=model, config=config, layout=layout, path=path, dtypes=histogram,
                       fp8_layout=scheme.layout)

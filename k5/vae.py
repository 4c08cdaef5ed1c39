"""Kandinsky 5 video VAE: the HunyuanVideo causal 3D VAE, run by ``diffusers.AutoencoderKLHunyuanVideo``.

Shapes (HunyuanVideo, arXiv 2412.03603; k5.md §7): video ``[B, 3, F, H, W]`` in [-1, 1] with ``F = 4k + 1`` and
H, W multiples of 8 ↔ latent ``[B, 16, k + 1, H/8, W/8]`` (the first frame is encoded alone, then 4 frames per
latent frame). Latents here are **raw**: Kandinsky 5 multiplies them by :data:`SCALING_FACTOR` (0.476986, no
shift) before the DiT and divides after; ComfyUI's ``LATENT`` also stores raw VAE latents, so callers do the
scaling.

Files (:func:`load_k5_vae`):

- diffusers ``vae/diffusion_pytorch_model.safetensors`` (``hunyuanvideo-community/HunyuanVideo``), with the
  ``config.json`` beside it when present;
- the original Tencent ``pytorch_model.pt``: the same tensor names (diffusers' conversion script has an empty
  VAE rename table), possibly wrapped in ``"state_dict"`` and prefixed ``vae.``;
- ComfyUI's repack ``hunyuan_video_vae_bf16.safetensors`` (Comfy-Org/HunyuanVideo_repackaged): ComfyUI's own
  LDM-style names. The name mapping is the inverse of the one ComfyUI applies when it reads diffusers VAEs
  (``comfy/diffusers_convert.py`` ``convert_vae_state_dict``; ComfyUI 0.3.75 builds this VAE in ``comfy/sd.py``
  from ``comfy.ldm.modules.diffusionmodules.model`` with ``conv3d=True``, ``time_compress=4`` when it finds
  ``decoder.conv_in.conv.weight``): ``encoder.down.{i}.block.{j}`` ↔ ``encoder.down_blocks.{i}.resnets.{j}``,
  ``down.{i}.downsample`` ↔ ``down_blocks.{i}.downsamplers.0``, ``decoder.up.{n-1-i}`` ↔ ``decoder.up_blocks.{i}``
  (reverse order), ``mid.block_{1,2}`` ↔ ``mid_block.resnets.{0,1}``, ``mid.attn_1.{norm,q,k,v,proj_out}`` ↔
  ``mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}`` (1×1×1 conv weights ↔ linear weights),
  ``nin_shortcut`` ↔ ``conv_shortcut``, ``norm_out`` ↔ ``conv_norm_out``. That the Comfy-Org file uses these
  names (and not Tencent's) is reported by users whose Tencent-layout loaders list exactly these as unexpected
  keys (kijai/ComfyUI-HunyuanVideoWrapper issues #248, #307). Checked once against ComfyUI 0.3.75 itself: its
  ``convert_vae_state_dict`` output of the tiny VAE loads strictly into its HunyuanVideo ``AutoencoderKL`` and
  this module's inverse maps it back exactly.

  Note from that check: ComfyUI 0.3.75 runs the mid-block attention over all frames at once, while diffusers
  (and the official HunyuanVideo/K5 code) masks it causally (a frame attends to itself and earlier frames); the
  convolutions match exactly and single images agree, videos do not. Cinetune keeps the causal attention.

Without a config.json the config is read from the tensor shapes: block widths, layers per block, latent channels,
mid-block attention. GroupNorm groups cannot be seen in shapes; the HunyuanVideo value 32 is used (widths must
be multiples of 32). Compression ×8 spatial / ×4 temporal is the HunyuanVideo structure for 4 blocks.

Tiling: diffusers' spatial tiles (default 256 px, stride 192 → 64 px blended overlap) and temporal tiles (16
frames, stride 12) — the diffusers defaults, also what musubi-tuner samples with. The official K5 code sizes
tiles from free GPU memory instead; fixed tiles keep results independent of the GPU. With ``tiling=False`` the
whole video goes through in one pass (diffusers' frame-wise batching is switched off too), which is exact but
needs memory proportional to F·H·W.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from ..core.wrapped import WrappedVideoVAE
from ..core.checkpoint import (
    CheckpointError,
    assign_state_dict,
    check_materialised,
    describe_checkpoint,
    load_state_dict,
    read_safetensors_header,
)

if TYPE_CHECKING:
    from diffusers import AutoencoderKLHunyuanVideo

#: Kandinsky 5 / HunyuanVideo latent scale (no shift): DiT latent = raw latent × SCALING_FACTOR.
SCALING_FACTOR = 0.476986

#: HunyuanVideo VAE config (hunyuanvideo-community/HunyuanVideo ``vae/config.json``; k5.md §7).
HUNYUAN_VIDEO_VAE_CONFIG: dict = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2, "act_fn": "silu", "norm_num_groups": 32, "scaling_factor": SCALING_FACTOR,
    "spatial_compression_ratio": 8, "temporal_compression_ratio": 4, "mid_block_add_attention": True,
}

#: ``progress(done, total)``: called after each VAE tile (total = the number of tiles of the call).
TileProgress = Callable[[int, int], None]

_EXPECTED = ("Expected the HunyuanVideo VAE used by Kandinsky 5 in models/vae: hunyuan_video_vae_bf16.safetensors, "
             "diffusers vae/diffusion_pytorch_model.safetensors, or Tencent's pytorch_model.pt.")
_PREFIXES = ("vae.", "first_stage_model.")
_ATTN_LDM_TO_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


class K5VAE(WrappedVideoVAE):
    """HunyuanVideo VAE with Kandinsky 5 conventions (raw latents, 4k+1 frames, [-1, 1] pixels).

    Args:
        model: a ``diffusers.AutoencoderKLHunyuanVideo``.
        tiling: default for :meth:`encode`/:meth:`decode` (per-call override).
        tile_size, tile_stride: spatial tile and stride in pixels (multiples of 8, stride < size).
        tile_frames, tile_frames_stride: temporal tile and stride in video frames (multiples of 4, stride < size).
    Raises:
        ValueError: invalid tile sizes.
    """

    def __init__(self, model: "AutoencoderKLHunyuanVideo", *, tiling: bool = True, tile_size: int = 256,
                 tile_stride: int = 192, tile_frames: int = 16, tile_frames_stride: int = 12):
        super().__init__(model)
        s, t = model.config.spatial_compression_ratio, model.config.temporal_compression_ratio
        if tile_size % s or tile_stride % s or not 0 < tile_stride < tile_size:
            raise ValueError(f"Spatial tiles must be multiples of {s} px with 0 < stride < size; "
                             f"got size {tile_size}, stride {tile_stride} (default 256/192).")
        if tile_frames % t or tile_frames_stride % t or not 0 < tile_frames_stride < tile_frames:
            raise ValueError(f"Temporal tiles must be multiples of {t} frames with 0 < stride < size; "
                             f"got {tile_frames}/{tile_frames_stride} (default 16/12).")
        self.tiling = tiling
        self.tile_size, self.tile_stride = tile_size, tile_stride
        self.tile_frames, self.tile_frames_stride = tile_frames, tile_frames_stride

    def _set_tiling(self, tiling: bool | None) -> None:
        on = self.tiling if tiling is None else bool(tiling)
        m = self.model
        m.use_tiling = on
        m.use_framewise_encoding = on
        m.use_framewise_decoding = on
        m.tile_sample_min_height = m.tile_sample_min_width = self.tile_size
        m.tile_sample_stride_height = m.tile_sample_stride_width = self.tile_stride
        m.tile_sample_min_num_frames = self.tile_frames
        m.tile_sample_stride_num_frames = self.tile_frames_stride

    def _tiles(self, frames: int, height: int, width: int, tiling: bool | None, *, frame_tile: int,
               frame_stride: int, size_tile: int, size_stride: int) -> int:
        # diffusers AutoencoderKLHunyuanVideo (_encode/_decode, tiled_*, _temporal_tiled_*): temporal tiles when the
        # clip is longer than one tile, each split into spatial tiles when wider or taller than one tile.
        on = self.tiling if tiling is None else bool(tiling)
        temporal = math.ceil(frames / frame_stride) if on and frames > frame_tile else 1
        spatial = (math.ceil(height / size_stride) * math.ceil(width / size_stride)
                   if on and (height > size_tile or width > size_tile) else 1)
        return temporal * spatial

    def encode_tiles(self, shape: Sequence[int], tiling: bool | None = None) -> int:
        """How many encoder passes :meth:`encode` makes for a video of ``shape`` ``[B, 3, F, H, W]`` (1 untiled)."""
        _, _, f, h, w = shape
        return self._tiles(f, h, w, tiling, frame_tile=self.tile_frames, frame_stride=self.tile_frames_stride,
                           size_tile=self.tile_size, size_stride=self.tile_stride)

    def decode_tiles(self, shape: Sequence[int], tiling: bool | None = None) -> int:
        """How many decoder passes :meth:`decode` makes for a latent of ``shape`` ``[B, 16, T, h, w]`` (1 untiled)."""
        _, _, n, h, w = shape
        s, t = self.spatial_ratio, self.temporal_ratio
        return self._tiles(n, h, w, tiling, frame_tile=self.tile_frames // t, frame_stride=self.tile_frames_stride // t,
                           size_tile=self.tile_size // s, size_stride=self.tile_stride // s)

    @torch.no_grad()
    def encode(self, video: torch.Tensor, *, tiling: bool | None = None, sample: bool = False,
               generator: torch.Generator | None = None, progress: TileProgress | None = None) -> torch.Tensor:
        """Encode a video into raw latents.

        Args:
            video: ``[B, 3, F, H, W]`` in [-1, 1], F = 4k+1, H and W multiples of 8; any float dtype/device.
            tiling: override the instance default (see the module docstring).
            sample: draw ``mean + std·ε`` from the posterior (with ``generator``) instead of taking its mean (the
                default, deterministic).
            generator: random generator for ``sample=True``.
            progress: ``progress(done, total)`` after each tile (:meth:`encode_tiles` tiles); may raise to stop.
        Returns:
            Raw latent ``[B, 16, (F-1)/4 + 1, H/8, W/8]``, float32, on the VAE's device (not scaled).
        Raises:
            ValueError: wrong layout, frame count or size (the message names the nearest valid values), or values
                far outside [-1, 1].
        """
        self.check_video_shape(video.shape)
        if not video.is_floating_point():
            raise ValueError(f"Expected float pixels in [-1, 1]; got dtype {video.dtype}. Convert with x/127.5 - 1.")
        peak = video.detach().abs().max().item() if video.numel() else 0.0
        if peak > 1.5:
            raise ValueError(f"Pixels must be in [-1, 1]; got values up to {peak:.3g}. "
                             "For 0..255 images use x/127.5 - 1, for 0..1 images 2x - 1.")
        self._set_tiling(tiling)
        with _count_passes(self.model.encoder, self.encode_tiles(video.shape, tiling), progress):
            posterior = self.model.encode(video.to(self.device, self.dtype)).latent_dist
        z = posterior.sample(generator=generator) if sample else posterior.mode()
        return z.float()

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, *, tiling: bool | None = None,
               progress: TileProgress | None = None) -> torch.Tensor:
        """Decode raw latents into video.

        Args:
            latent: raw latent ``[B, 16, T, h, w]`` (divide DiT latents by :data:`SCALING_FACTOR` first).
            tiling: override the instance default.
            progress: ``progress(done, total)`` after each tile (:meth:`decode_tiles` tiles); may raise to stop.
        Returns:
            Video ``[B, 3, 4(T-1)+1, 8h, 8w]``, float32, nominally in [-1, 1] (not clamped), on the VAE's device.
        Raises:
            ValueError: not 5-D or wrong channel count.
        """
        if latent.ndim != 5 or latent.shape[1] != self.latent_channels:
            raise ValueError(f"Expected a latent [B, {self.latent_channels}, T, H/8, W/8]; got shape "
                             f"{tuple(latent.shape)}.")
        self._set_tiling(tiling)
        with _count_passes(self.model.decoder, self.decode_tiles(latent.shape, tiling), progress):
            return self.model.decode(latent.to(self.device, self.dtype)).sample.float()


@contextmanager
def _count_passes(module: torch.nn.Module, total: int, progress: TileProgress | None) -> Iterator[None]:
    """Report ``progress(done, total)`` after each forward of ``module`` inside the block (diffusers runs one per tile),
    and ``(total, total)`` when the block completes."""
    if progress is None:
        yield
        return
    done = 0

    def counted(*_):
        nonlocal done
        done += 1
        progress(min(done, total), total)

    handle = module.register_forward_hook(counted)
    try:
        yield
    finally:
        handle.remove()
    progress(total, total)


# ----------------------------------------------------------------------------------------------------------------
# Loading


def _ldm_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a ComfyUI/LDM-layout HunyuanVideo VAE state dict to diffusers names (see the module docstring)."""
    ups = [int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up\.(\d+)\.", k))]
    n_up = max(ups) + 1 if ups else 0
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        k = re.sub(r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2.", key)
        k = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", k)
        k = re.sub(r"^decoder\.up\.(\d+)\.block\.(\d+)\.",
                   lambda m: f"decoder.up_blocks.{n_up - 1 - int(m.group(1))}.resnets.{m.group(2)}.", k)
        k = re.sub(r"^decoder\.up\.(\d+)\.upsample\.",
                   lambda m: f"decoder.up_blocks.{n_up - 1 - int(m.group(1))}.upsamplers.0.", k)
        k = re.sub(r"^(encoder|decoder)\.mid\.block_(\d+)\.",
                   lambda m: f"{m.group(1)}.mid_block.resnets.{int(m.group(2)) - 1}.", k)
        m = re.match(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)$", k)
        if m:
            k = f"{m.group(1)}.mid_block.attentions.0.{_ATTN_LDM_TO_DIFFUSERS[m.group(2)]}.{m.group(3)}"
            if m.group(2) != "norm" and m.group(3) == "weight" and t.ndim > 2:
                t = t.reshape(t.shape[0], t.shape[1])
        k = k.replace(".nin_shortcut.", ".conv_shortcut.")
        k = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", k)
        out[k] = t
    return out


def _strip_prefixes(names: Sequence[str]) -> str:
    for p in _PREFIXES:
        if names and sum(n.startswith(p) for n in names) * 2 >= len(names):
            return p
    return ""


def vae_config_from_shapes(shapes: Mapping[str, Sequence[int]]) -> dict:
    """``AutoencoderKLHunyuanVideo`` config from diffusers-named tensor shapes.

    Reads block widths (``encoder.down_blocks.{i}.resnets.0.conv2.conv.weight``), layers per block, latent
    channels (``decoder.conv_in.conv.weight`` dim 1), in/out channels, mid-block attention; GroupNorm groups = 32
    (HunyuanVideo; not visible in shapes).
    Raises:
        CheckpointError: widths not multiples of 32 (groups unknown: put config.json beside the file) or tensors
            missing.
    """
    blocks = sorted({int(m.group(1)) for n in shapes if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", n))})
    try:
        widths = [shapes[f"encoder.down_blocks.{i}.resnets.0.conv2.conv.weight"][0] for i in blocks]
        latent = shapes["decoder.conv_in.conv.weight"][1]
        in_ch = shapes["encoder.conv_in.conv.weight"][1]
        out_ch = shapes["decoder.conv_out.conv.weight"][0]
    except KeyError as e:
        raise CheckpointError(f"HunyuanVideo VAE tensor {e} is missing; the file is incomplete.") from None
    layers = len({n.split(".")[4] for n in shapes if n.startswith("encoder.down_blocks.0.resnets.")})
    groups = HUNYUAN_VIDEO_VAE_CONFIG["norm_num_groups"]
    if any(w % groups for w in widths):
        raise CheckpointError(f"VAE block widths {widths} are not multiples of {groups}: the GroupNorm layout is "
                              "unknown. Put the model's config.json beside the file.")
    return {**HUNYUAN_VIDEO_VAE_CONFIG, "in_channels": in_ch, "out_channels": out_ch, "latent_channels": latent,
            "block_out_channels": widths, "layers_per_block": layers,
            "down_block_types": ["HunyuanVideoDownBlock3D"] * len(widths),
            "up_block_types": ["HunyuanVideoUpBlock3D"] * len(widths),
            "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in shapes}


def _folder_config(path: Path) -> dict | None:
    cfg = path.parent / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if data.get("_class_name") == "AutoencoderKLHunyuanVideo" else None


def load_k5_vae(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", **tiling) -> K5VAE:
    """Load the HunyuanVideo VAE from any of its published layouts (see the module docstring).

    Args:
        path: ``.safetensors`` (diffusers or ComfyUI layout) or ``.pt``/``.pth``/``.ckpt`` (Tencent; may be wrapped
            in ``"state_dict"`` and prefixed ``vae.``), or a diffusers ``vae`` folder.
        dtype: parameter and compute dtype (fp32 safest; bf16/fp16 halve memory on GPUs).
        device: where the VAE is placed.
        **tiling: keyword arguments of :class:`K5VAE` (``tiling``, ``tile_size``, …).
    Returns:
        A :class:`K5VAE`.
    Raises:
        CheckpointError: missing/truncated file, or not a HunyuanVideo VAE (the message says what the file looks
            like and what was expected).
    """
    from diffusers import AutoencoderKLHunyuanVideo

    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob("diffusion_pytorch_model*.safetensors"))
        if not candidates:
            raise CheckpointError(f"{path}: no diffusion_pytorch_model.safetensors in this folder. {_EXPECTED}")
        path = candidates[0]
    if path.suffix.lower() == ".safetensors":
        shapes = {n: i.shape for n, i in read_safetensors_header(path)[0].items()}  # validate before loading
        sd = None
    else:
        sd = load_state_dict(path)
        shapes = {n: tuple(t.shape) for n, t in sd.items()}
    prefix = _strip_prefixes(list(shapes))
    inner = {n[len(prefix):]: s for n, s in shapes.items() if n.startswith(prefix)}
    comfy_layout = "decoder.up.0.block.0.conv1.conv.weight" in inner
    if not comfy_layout and "decoder.up_blocks.0.resnets.0.conv1.conv.weight" not in inner:
        raise CheckpointError(f"{path}: this looks like {describe_checkpoint(shapes)}, not a HunyuanVideo VAE. "
                              f"{_EXPECTED}")
    conv_in = inner.get("decoder.conv_in.conv.weight", ())
    if len(conv_in) != 5 or conv_in[1] != 16:
        raise CheckpointError(f"{path}: this looks like {describe_checkpoint(shapes)}; Kandinsky 5 needs the "
                              "original HunyuanVideo VAE with 16 latent channels (not HunyuanVideo 1.5's). "
                              + _EXPECTED)
    if sd is None:
        sd = load_state_dict(path)
    sd = {k[len(prefix):]: v.to(dtype) for k, v in sd.items() if k.startswith(prefix)}
    if comfy_layout:
        sd = _ldm_to_diffusers(sd)
    config = _folder_config(path) or vae_config_from_shapes({k: tuple(v.shape) for k, v in sd.items()})
    with torch.device("meta"):
        model = AutoencoderKLHunyuanVideo.from_config(config)
    assign_state_dict(model, sd, path)
    check_materialised(model)
    return K5VAE(model.to(device), **tiling)

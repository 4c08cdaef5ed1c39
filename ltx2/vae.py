"""LTX-2 video VAE, run by ``diffusers.AutoencoderKLLTX2Video``, with the official checkpoint's key names.

Geometry (ltx2.md §4; Lightricks/LTX-2 ``packages/ltx-core/src/ltx_core/model/video_vae/video_vae.py``): pixels
``[B, 3, F, H, W]`` in [-1, 1] with ``F = 8k + 1`` and H, W multiples of 32 ↔ latents ``[B, 128, k + 1, H/32, W/32]``
(patchify 4×4, then three 2× stages in space and three in time; the first frame is encoded alone).

Normalisation: the official encoder returns the posterior mean normalised per channel,
``z = (μ − mean-of-means) / std-of-means``, and the decoder un-normalises first (``ltx_core/model/video_vae/ops.py``
``PerChannelStatistics``). :meth:`LTX2VideoVAE.encode` and :meth:`LTX2VideoVAE.decode` work on these normalised
latents, the form the DiT samples in; :meth:`~LTX2VideoVAE.normalize` / :meth:`~LTX2VideoVAE.denormalize` convert
to and from raw latents (the spatial upsampler runs on raw latents).

Keys: the official file stores the VAE under ``vae.`` as ``encoder.*``, ``decoder.*`` and
``per_channel_statistics.{mean-of-means, std-of-means, mean-of-stds, mean-of-stds_over_std-of-means, channel}``.
Official blocks are one flat list per side; diffusers groups them (huggingface/diffusers
``scripts/convert_ltx2_to_diffusers.py`` ``LTX_2_0_VIDEO_VAE_RENAME_DICT``; ltx2.md §10):

- ``encoder.down_blocks.{2i}`` (res_x) ↔ ``encoder.down_blocks.{i}``; ``encoder.down_blocks.{2i+1}`` (space-to-depth
  downsampler) ↔ ``encoder.down_blocks.{i}.downsamplers.0``; the last res_x ↔ ``encoder.mid_block``;
- ``decoder.up_blocks.0`` ↔ ``decoder.mid_block``; ``decoder.up_blocks.{2i+1}`` (depth-to-space upsampler) ↔
  ``decoder.up_blocks.{i}.upsamplers.0``; ``decoder.up_blocks.{2i+2}`` ↔ ``decoder.up_blocks.{i}``;
- ``res_blocks`` ↔ ``resnets``; ``decoder.last_time_embedder`` ↔ ``decoder.time_embedder``;
  ``decoder.last_scale_shift_table`` ↔ ``decoder.scale_shift_table``;
- ``per_channel_statistics.mean-of-means`` / ``std-of-means`` ↔ the ``latents_mean`` / ``latents_std`` buffers. The
  other three statistics are unused by the network; they are kept beside it so :meth:`~LTX2VideoVAE.official_state_dict`
  gives the file's tensors back.

Config: the file's ``config.vae`` metadata (official block lists, padding modes, ``causal_decoder``) with the 19B
values (:data:`LTX2_19B_VAE_CONFIG`) for missing keys; block widths, layer counts, strides and noise injection are
read from the tensor shapes. Decoder timestep conditioning is on exactly when ``decoder.last_time_embedder.*``
tensors exist (the 19B metadata is not published verbatim; diffusers converts the 19B VAE without it, ltx2.md §4).
When on, decoding follows the official ``VideoDecoder.forward``: ``z ← 0.975·z + 0.025·ε`` on the normalised
latent, then the decoder runs with timestep 0.05 (scaled by the file's ``timestep_scale_multiplier``).

Tiling (defaults: official ``TilingConfig.default()``, ``ltx_core/model/video_vae/tiling.py``): spatial tiles of 512 px
overlapping by 64 px, temporal tiles of 64 frames overlapping by 24. Each tile passes through the network alone, so
activation memory is bounded by the tile size, whatever the video size.

- Decode: spatial tiles are blended with complementary linear ramps over the overlap. A temporal tile that does not
  start the video begins at the latent before its span, whose single decoded frame lands on the last frame of that
  latent's 8-frame group (the causal alignment of the official ``split_temporal_latents``); that frame is decoded as a
  first frame, so the ramp gives it weight 0. The decoder sees at most ``tile_frames/8 + 1`` latent frames and
  ``tile_size/32`` latents per side.
- Encode: tiles are cut, not blended (as the official encoder tiling): spatially each tile drops the latents within
  half the overlap of an inner edge (where the convolutions saw padding instead of neighbours); temporally, a tile
  that does not start the video starts ``tile_frames_overlap`` frames early to give the causal encoder past context,
  and drops the latents of those frames and of its first frame (encoded as a single image). Each tile has
  ``tile_frames + 1`` frames at most.

The output buffer is the full video (decode) or latent (encode), on the VAE's device.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from torch import Tensor

from ..core.wrapped import WrappedVideoVAE
from ..core.checkpoint import CheckpointError, assign_state_dict, check_materialised, load_state_dict

if TYPE_CHECKING:
    from diffusers import AutoencoderKLLTX2Video

#: Statistics tensors of the official file (``per_channel_statistics.<name>``), each ``[latent_channels]``.
STATISTICS = ("mean-of-means", "std-of-means", "mean-of-stds", "mean-of-stds_over_std-of-means", "channel")

#: 19B ``config.vae`` (reconstructed, ltx2.md §4; official ltx-core VAE config and diffusers'
#: ``get_ltx2_video_vae_config("2.0")``). Used only for keys the file's metadata lacks.
LTX2_19B_VAE_CONFIG: dict = {
    "dims": 3, "in_channels": 3, "out_channels": 3, "latent_channels": 128, "patch_size": 4,
    "norm_layer": "pixel_norm", "latent_log_var": "uniform", "causal_decoder": False, "timestep_conditioning": False,
    "encoder_spatial_padding_mode": "zeros", "decoder_spatial_padding_mode": "reflect",
    "encoder_blocks": [
        ["res_x", {"num_layers": 4}], ["compress_space_res", {"multiplier": 2}],
        ["res_x", {"num_layers": 6}], ["compress_time_res", {"multiplier": 2}],
        ["res_x", {"num_layers": 6}], ["compress_all_res", {"multiplier": 2}],
        ["res_x", {"num_layers": 2}], ["compress_all_res", {"multiplier": 2}],
        ["res_x", {"num_layers": 2}]],
    "decoder_blocks": [
        ["res_x", {"num_layers": 5, "inject_noise": False}], ["compress_all", {"residual": True, "multiplier": 2}],
        ["res_x", {"num_layers": 5, "inject_noise": False}], ["compress_all", {"residual": True, "multiplier": 2}],
        ["res_x", {"num_layers": 5, "inject_noise": False}], ["compress_all", {"residual": True, "multiplier": 2}],
        ["res_x", {"num_layers": 5, "inject_noise": False}]],
}

#: Official timestep-conditioned decoding (``ltx_core`` ``VideoDecoder``: ``decode_timestep``, ``decode_noise_scale``).
DECODE_TIMESTEP = 0.05
DECODE_NOISE_SCALE = 0.025

# official encoder downsampler → (diffusers downsample_type, stride (t, h, w))
_DOWN = {"compress_space_res": ("spatial", (1, 2, 2)), "compress_time_res": ("temporal", (2, 1, 1)),
         "compress_all_res": ("spatiotemporal", (2, 2, 2))}
# official decoder upsampler → (diffusers upsample_type, stride (t, h, w))
_UP = {"compress_space": ("spatial", (1, 2, 2)), "compress_time": ("temporal", (2, 1, 1)),
       "compress_all": ("spatiotemporal", (2, 2, 2))}
_SUPPORTED = ("Supported: the LTX-2 layout of alternating res_x and compress_*_res blocks (encoder) / res_x and "
              "compress_* blocks (decoder), pixel_norm, uniform log-variance, 3-D convolutions.")


def tiny_config() -> dict:
    """A small ``config.vae`` in the official metadata form: 128 latent channels, ×32 space, ×8 time, one res layer
    per block and channel multiplier 1 (every stage 128 wide), no timestep conditioning. For tests and the tiny
    combined model."""
    res = ["res_x", {"num_layers": 1}]
    dec_res = ["res_x", {"num_layers": 1, "inject_noise": False}]
    up = ["compress_all", {"residual": True, "multiplier": 1}]
    return {**LTX2_19B_VAE_CONFIG, "timestep_conditioning": False,
            "encoder_blocks": [res, ["compress_space_res", {"multiplier": 1}], res,
                               ["compress_time_res", {"multiplier": 1}], res, ["compress_all_res", {"multiplier": 1}],
                               res, ["compress_all_res", {"multiplier": 1}], res],
            "decoder_blocks": [dec_res, up, dec_res, up, dec_res, up, dec_res]}


# ----------------------------------------------------------------------------------------------------------------
# Config


def _block(entry: Sequence) -> tuple[str, dict]:
    name, params = entry[0], entry[1] if len(entry) > 1 else {}
    return str(name), ({"num_layers": params} if isinstance(params, int) else dict(params))


def _alternating(blocks: list[tuple[str, dict]], kinds: Mapping, side: str) -> None:
    names = [n for n, _ in blocks]
    ok = len(names) % 2 == 1 and all(n == "res_x" for n in names[::2]) and all(n in kinds for n in names[1::2])
    if not ok:
        raise CheckpointError(f"LTX-2 video VAE {side} blocks {names} are not supported. {_SUPPORTED}")


def diffusers_config(config: Mapping) -> dict:
    """``AutoencoderKLLTX2Video`` keyword arguments from an official ``config.vae`` dict.

    Official block lists (``ltx_core/model/video_vae/video_vae.py`` ``_make_encoder_block`` / ``_make_decoder_block``):
    ``decoder_blocks`` is listed from the pixel side and built in reverse; ``compress_*_res`` multiplies the width by
    ``multiplier`` (default 2); ``compress_all`` divides it by ``multiplier`` (default 1) and honours ``residual``
    (default False), which ``compress_space``/``compress_time`` do not. diffusers takes the decoder lists in encoder
    order and reverses them itself, except ``upsample_type``.
    Raises:
        CheckpointError: a layout diffusers' LTX-2 VAE cannot run (group norm, other block kinds, 2-D convolutions),
            or inconsistent compression between encoder and decoder.
    """
    cfg = {**LTX2_19B_VAE_CONFIG, **config}
    for key, want in (("dims", 3), ("norm_layer", "pixel_norm"), ("latent_log_var", "uniform")):
        if cfg[key] != want:
            raise CheckpointError(f"LTX-2 video VAE with {key}={cfg[key]!r} is not supported. {_SUPPORTED}")
    enc = [_block(b) for b in cfg["encoder_blocks"]]
    dec = [_block(b) for b in reversed(cfg["decoder_blocks"])]  # decode order
    _alternating(enc, _DOWN, "encoder")
    _alternating(dec, _UP, "decoder")

    patch, latent = int(cfg["patch_size"]), int(cfg["latent_channels"])
    width, widths = latent, []
    for _, p in enc[1::2]:
        width *= int(p.get("multiplier", 2))
        widths.append(width)
    mults = [int(p.get("multiplier", 1)) if n == "compress_all" else 1 for n, p in dec[1::2]]
    width, befores = latent * math.prod(mults), []
    for m in mults:
        befores.append(width)
        width //= m

    def ratios(kinds, blocks):
        strides = [kinds[n][1] for n, _ in blocks[1::2]]
        return math.prod(s[0] for s in strides), patch * math.prod(s[1] for s in strides)

    (t_enc, s_enc), (t_dec, s_dec) = ratios(_DOWN, enc), ratios(_UP, dec)
    if (t_enc, s_enc) != (t_dec, s_dec):
        raise CheckpointError(f"LTX-2 video VAE encoder compresses ×{s_enc} space / ×{t_enc} time but the decoder "
                              f"expands ×{s_dec} / ×{t_dec}; the config is inconsistent.")
    n_down = len(widths)
    return {
        "in_channels": int(cfg["in_channels"]), "out_channels": int(cfg["out_channels"]), "latent_channels": latent,
        "block_out_channels": tuple(widths), "down_block_types": ("LTX2VideoDownBlock3D",) * n_down,
        "layers_per_block": tuple(int(p["num_layers"]) for _, p in enc[::2]),
        "spatio_temporal_scaling": (True,) * n_down,
        "downsample_type": tuple(_DOWN[n][0] for n, _ in enc[1::2]),
        "decoder_block_out_channels": tuple(reversed(befores)),
        "decoder_layers_per_block": tuple(int(p["num_layers"]) for _, p in reversed(dec[::2])),
        "decoder_spatio_temporal_scaling": (True,) * len(mults),
        "decoder_inject_noise": tuple(bool(p.get("inject_noise", False)) for _, p in reversed(dec[::2])),
        "upsample_type": tuple(_UP[n][0] for n, _ in dec[1::2]),
        "upsample_residual": tuple(n == "compress_all" and bool(p.get("residual", False))
                                   for n, p in reversed(dec[1::2])),
        "upsample_factor": tuple(reversed(mults)),
        "timestep_conditioning": bool(cfg["timestep_conditioning"]),
        "patch_size": patch, "patch_size_t": 1, "resnet_norm_eps": 1e-6, "scaling_factor": 1.0,
        "encoder_causal": True, "decoder_causal": bool(cfg["causal_decoder"]),
        "encoder_spatial_padding_mode": cfg["encoder_spatial_padding_mode"],
        "decoder_spatial_padding_mode": cfg["decoder_spatial_padding_mode"],
        "spatial_compression_ratio": s_enc, "temporal_compression_ratio": t_enc,
    }


def _indices(shapes: Mapping, prefix: str) -> list[int]:
    return sorted({int(m.group(1)) for n in shapes if (m := re.match(re.escape(prefix) + r"(\d+)\.", n))})


def _res_block(shapes: Mapping, prefix: str) -> tuple[int, int, bool] | None:
    """(width, layers, inject_noise) of a res_x block, or None when ``prefix`` is not one."""
    first = shapes.get(f"{prefix}res_blocks.0.conv1.conv.weight")
    if first is None:
        return None
    layers = len(_indices(shapes, f"{prefix}res_blocks."))
    return first[0], layers, f"{prefix}res_blocks.0.per_channel_scale1" in shapes


def config_from_shapes(shapes: Mapping[str, Sequence[int]], metadata: Mapping | None = None) -> dict:
    """Official-form ``config.vae`` for the VAE tensors ``shapes`` (official names without ``vae.``).

    Block kinds, widths (multipliers), layer counts, noise injection, channels and patch size come from the shapes;
    timestep conditioning is on iff ``decoder.last_time_embedder.*`` exists. Everything else (padding modes,
    ``causal_decoder``, the decoder upsamplers' ``residual`` flags, which no tensor shows) comes from ``metadata``,
    else from :data:`LTX2_19B_VAE_CONFIG`.
    Raises:
        CheckpointError: tensors missing or a block layout that is not the LTX-2 one.
    """
    meta = {**LTX2_19B_VAE_CONFIG, **(metadata or {})}
    try:
        enc_in, enc_out = shapes["encoder.conv_in.conv.weight"], shapes["encoder.conv_out.conv.weight"]
        dec_in, dec_out = shapes["decoder.conv_in.conv.weight"], shapes["decoder.conv_out.conv.weight"]
    except KeyError as e:
        raise CheckpointError(f"LTX-2 video VAE tensor vae.{e.args[0]} is missing; the file is incomplete.") from None
    in_ch = int(meta["in_channels"])
    patch = math.isqrt(enc_in[1] // in_ch)
    if patch * patch * in_ch != enc_in[1]:
        raise CheckpointError(f"LTX-2 video VAE encoder.conv_in takes {enc_in[1]} channels, not {in_ch}·p² for a "
                              "square patch; the file is not an LTX-2 video VAE.")

    def side(prefix: str, out_width: int, make_down: bool) -> list[list]:
        blocks: list[list] = []
        idx = _indices(shapes, prefix)
        for pos, j in enumerate(idx):
            res = _res_block(shapes, f"{prefix}{j}.")
            if res is not None:
                _, layers, noise = res
                blocks.append(["res_x", {"num_layers": layers} if make_down else
                               {"num_layers": layers, "inject_noise": noise}])
                continue
            conv = shapes.get(f"{prefix}{j}.conv.conv.weight")
            if conv is None:
                raise CheckpointError(f"LTX-2 video VAE block vae.{prefix}{j} is neither a res_x block nor a "
                                      f"resampler. {_SUPPORTED}")
            nxt = _res_block(shapes, f"{prefix}{idx[pos + 1]}.") if pos + 1 < len(idx) else None
            next_width = nxt[0] if nxt else out_width
            if make_down:  # conv out = next_width / prod(stride); next_width = in · multiplier
                kind = {2: "compress_time_res", 4: "compress_space_res", 8: "compress_all_res"}.get(
                    next_width // conv[0])
                blocks.append([kind, {"multiplier": next_width // conv[1]}])
            else:  # conv out = in · prod(stride) / multiplier; next_width = in / multiplier
                mult = conv[1] // next_width
                kind = {2: "compress_time", 4: "compress_space", 8: "compress_all"}.get(conv[0] * mult // conv[1])
                blocks.append([kind, {"multiplier": mult}])
            if kind is None:
                raise CheckpointError(f"LTX-2 video VAE resampler vae.{prefix}{j} has an unsupported shape {conv}.")
        return blocks

    encoder_blocks = side("encoder.down_blocks.", enc_out[1], True)
    decode_order = side("decoder.up_blocks.", dec_out[1], False)
    meta_dec = [_block(b) for b in reversed(meta["decoder_blocks"])]
    for pos, (name, params) in enumerate(decode_order):
        if name.startswith("compress"):
            same = pos < len(meta_dec) and meta_dec[pos][0] == name
            # a residual flag has no tensor: the metadata's, else the 19B value (residual compress_all)
            params["residual"] = bool(meta_dec[pos][1].get("residual", False)) if same else name == "compress_all"
    return {**meta, "in_channels": in_ch, "out_channels": dec_out[0] // (patch * patch),
            "latent_channels": dec_in[1], "patch_size": patch, "encoder_blocks": encoder_blocks,
            "decoder_blocks": list(reversed(decode_order)),
            "timestep_conditioning": any(n.startswith("decoder.last_time_embedder.") for n in shapes)}


# ----------------------------------------------------------------------------------------------------------------
# Keys


def _to_diffusers_key(key: str, n_down: int) -> str:
    def enc(m: re.Match) -> str:
        j = int(m.group(1))
        if j == 2 * n_down:
            return "encoder.mid_block."
        return f"encoder.down_blocks.{j // 2}." + ("downsamplers.0." if j % 2 else "")

    def dec(m: re.Match) -> str:
        j = int(m.group(1))
        if j == 0:
            return "decoder.mid_block."
        return f"decoder.up_blocks.{(j - 1) // 2}." + ("upsamplers.0." if j % 2 else "")

    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.", enc, key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.", dec, key)
    key = re.sub(r"^decoder\.last_(time_embedder|scale_shift_table)", r"decoder.\1", key)
    return key.replace(".res_blocks.", ".resnets.")


def _to_official_key(key: str, n_down: int) -> str:
    def enc(m: re.Match) -> str:
        if m.group(1) is None:
            return f"encoder.down_blocks.{2 * n_down}."
        return f"encoder.down_blocks.{2 * int(m.group(1)) + (1 if m.group(2) else 0)}."

    def dec(m: re.Match) -> str:
        if m.group(1) is None:
            return "decoder.up_blocks.0."
        return f"decoder.up_blocks.{2 * int(m.group(1)) + (1 if m.group(2) else 2)}."

    key = re.sub(r"^encoder\.(?:mid_block|down_blocks\.(\d+)(\.downsamplers\.0)?)\.", enc, key)
    key = re.sub(r"^decoder\.(?:mid_block|up_blocks\.(\d+)(\.upsamplers\.0)?)\.", dec, key)
    key = re.sub(r"^decoder\.(time_embedder|scale_shift_table)", r"decoder.last_\1", key)
    return key.replace(".resnets.", ".res_blocks.")


# ----------------------------------------------------------------------------------------------------------------
# Tiling geometry


def _spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Windows ``[start, end)`` of ``tile`` covering ``[0, length)``, neighbours overlapping by ``overlap``; the last
    one ends at ``length`` (it is never shorter than ``overlap + 1``)."""
    if length <= tile:
        return [(0, length)]
    stride = tile - overlap
    count = -(-(length - overlap) // stride)
    spans = [(i * stride, i * stride + tile) for i in range(count)]
    spans[-1] = (spans[-1][0], length)
    return spans


def _ramp(length: int, starts_at_zero: bool) -> Tensor:
    """Rising weights over an overlap of ``length`` outputs; the falling side uses ``1 − ramp`` so the pair sums to 1.
    ``starts_at_zero``: the first output gets weight 0 (a temporal tile's first frame)."""
    i = torch.arange(length, dtype=torch.float32)
    return i / length if starts_at_zero else (i + 1) / (length + 1)


def _decode_axis(spans: list[tuple[int, int]], scale: int, extra: int) -> list[tuple[slice, slice, Tensor]]:
    """Per tile along one axis: latent input slice, output slice, blend weights. A span ``[s, e)`` reads latents
    ``[s, e + extra)`` and writes outputs ``[scale·s, scale·e + extra)`` (``extra`` = 1 on the time axis, where spans
    count 8-frame groups after the first frame)."""
    tiles = []
    for k, (s, e) in enumerate(spans):
        w = torch.ones(scale * (e - s) + extra)
        if k > 0:
            n = scale * (spans[k - 1][1] - s) + extra
            w[:n] = _ramp(n, extra == 1)
        if k + 1 < len(spans):
            n = scale * (e - spans[k + 1][0]) + extra
            w[-n:] = 1 - _ramp(n, extra == 1)
        tiles.append((slice(s, e + extra), slice(scale * s, scale * e + extra), w))
    return tiles


def _encode_axis(spans: list[tuple[int, int]], scale: int, extra: int,
                 overlap: int) -> list[tuple[slice, slice, slice]]:
    """Per tile along one axis: pixel input slice, slice of the tile's latents kept, where they go. Spatial
    (``extra`` 0): neighbours split their overlap in the middle. Temporal (``extra`` 1, spans in 8-frame groups):
    a tile's latents ``[s, e]``; every tile after the first keeps only the latents past the previous tile's end."""
    cuts = [0]
    for k in range(1, len(spans)):
        cuts.append(spans[k - 1][1] + 1 if extra else spans[k][0] + overlap // 2)
    cuts.append(spans[-1][1] + extra)
    return [(slice(scale * s, scale * e + extra), slice(cuts[k] - s, cuts[k + 1] - s), slice(cuts[k], cuts[k + 1]))
            for k, (s, e) in enumerate(spans)]


# ----------------------------------------------------------------------------------------------------------------


class LTX2VideoVAE(WrappedVideoVAE):
    """The LTX-2 video VAE with official conventions: [-1, 1] pixels, 8k+1 frames, normalised latents.

    Args:
        model: a ``diffusers.AutoencoderKLLTX2Video``.
        statistics: the official ``per_channel_statistics`` tensors other than ``mean-of-means``/``std-of-means``
            (which live in the model's ``latents_mean``/``latents_std``), kept for :meth:`official_state_dict`.
        tiling: default for :meth:`encode`/:meth:`decode` (per-call override).
        tile_size, tile_overlap: spatial tile and overlap in pixels (multiples of 32, 64 ≤ overlap < size).
        tile_frames, tile_frames_overlap: temporal tile and overlap in frames (multiples of 8, 16 ≤ overlap < size).
    Raises:
        ValueError: invalid tile sizes.
    """

    def __init__(self, model: "AutoencoderKLLTX2Video", statistics: Mapping[str, Tensor] | None = None, *,
                 tiling: bool = True, tile_size: int = 512, tile_overlap: int = 64, tile_frames: int = 64,
                 tile_frames_overlap: int = 24):
        super().__init__(model)
        self.statistics = dict(statistics or {})
        s, t = self.spatial_ratio, self.temporal_ratio
        if tile_size % s or tile_overlap % s or not 2 * s <= tile_overlap < tile_size:
            raise ValueError(f"Spatial tiles must be multiples of {s} px with {2 * s} ≤ overlap < size; got size "
                             f"{tile_size}, overlap {tile_overlap} (default 512/64).")
        if tile_frames % t or tile_frames_overlap % t or not 2 * t <= tile_frames_overlap < tile_frames:
            raise ValueError(f"Temporal tiles must be multiples of {t} frames with {2 * t} ≤ overlap < size; got "
                             f"{tile_frames}/{tile_frames_overlap} (default 64/24).")
        self.tiling = tiling
        self.tile_size, self.tile_overlap = tile_size, tile_overlap
        self.tile_frames, self.tile_frames_overlap = tile_frames, tile_frames_overlap

    # -- construction ------------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Mapping | None = None, **tiling) -> "LTX2VideoVAE":
        """Random-initialised VAE (diffusers' default init, the current torch seed) from an official ``config.vae``
        dict (default :func:`tiny_config`), float32 on the CPU. Statistics are drawn too (means ~ N(0, 0.1²), stds
        in [0.5, 1.5), ``channel`` = 0..C−1), so normalisation is not the identity."""
        from diffusers import AutoencoderKLLTX2Video

        model = AutoencoderKLLTX2Video(**diffusers_config(config if config is not None else tiny_config()))
        c = model.config.latent_channels
        with torch.no_grad():
            model.latents_mean.copy_(torch.randn(c) * 0.1)
            model.latents_std.copy_(torch.rand(c) + 0.5)
        stds = torch.rand(c) + 0.5
        stats = {"mean-of-stds": stds, "mean-of-stds_over_std-of-means": stds / model.latents_std,
                 "channel": torch.arange(c, dtype=torch.float32)}
        return cls(model, stats, **tiling)

    @classmethod
    def from_official_state_dict(cls, state_dict: Mapping[str, Tensor], config: Mapping | None = None, *,
                                 dtype: torch.dtype = torch.float32, source: str = "LTX-2 video VAE",
                                 **tiling) -> "LTX2VideoVAE":
        """Build from the official tensors.

        Args:
            state_dict: the ``vae.*`` tensors of the official file with ``vae.`` removed (a leading ``vae.`` is
                also accepted).
            config: the file's ``config.vae`` metadata dict, or None (19B values; sizes always from the shapes).
            dtype: parameter and compute dtype (float32 is safest; bf16 halves memory on GPUs).
            source: file name for error messages.
            **tiling: keyword arguments of :class:`LTX2VideoVAE`.
        Raises:
            CheckpointError: not an LTX-2 video VAE, missing/unexpected tensors or statistics, unsupported layout.
        """
        from diffusers import AutoencoderKLLTX2Video

        sd = {k.removeprefix("vae."): v for k, v in state_dict.items()}
        if not any(k.startswith("encoder.down_blocks.") for k in sd) or "decoder.conv_in.conv.weight" not in sd:
            raise CheckpointError(f"{source}: the tensors ({', '.join(list(sd)[:3])}, …) are not an LTX-2 video VAE "
                                  "(expected encoder.down_blocks.*, decoder.up_blocks.*, per_channel_statistics.*).")
        missing = [n for n in STATISTICS[:2] if f"per_channel_statistics.{n}" not in sd]
        if missing:
            raise CheckpointError(f"{source}: per_channel_statistics.{missing[0]} is missing; the LTX-2 video VAE "
                                  "needs its latent statistics (they are stored as vae.per_channel_statistics.*).")
        meta = config_from_shapes({k: tuple(v.shape) for k, v in sd.items()}, config)
        dcfg = diffusers_config(meta)
        n_down = len(dcfg["block_out_channels"])
        extra = {n: sd.pop(f"per_channel_statistics.{n}") for n in STATISTICS[2:]
                 if f"per_channel_statistics.{n}" in sd}
        converted = {"latents_mean": sd.pop("per_channel_statistics.mean-of-means"),
                     "latents_std": sd.pop("per_channel_statistics.std-of-means")}
        converted.update({_to_diffusers_key(k, n_down): v for k, v in sd.items()})
        with torch.device("meta"):
            model = AutoencoderKLLTX2Video(**dcfg)
        assign_state_dict(model, {k: v.to(dtype) for k, v in converted.items()}, source)
        check_materialised(model)
        return cls(model, extra, **tiling)

    @classmethod
    def from_diffusers_folder(cls, path: str | Path, *, dtype: torch.dtype = torch.float32,
                              **tiling) -> "LTX2VideoVAE":
        """Load a diffusers snapshot's ``vae/`` folder (``config.json`` + ``diffusion_pytorch_model*.safetensors``).

        The folder has no ``mean-of-stds``/``mean-of-stds_over_std-of-means``/``channel`` statistics, so
        :meth:`official_state_dict` of such a VAE lacks them.
        Raises:
            CheckpointError: no config or weights, another model class, or tensors that do not match the config.
        """
        from diffusers import AutoencoderKLLTX2Video

        path = Path(path)
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: no readable config.json ({e}); expected a diffusers vae/ folder.") from e
        if config.get("_class_name") != "AutoencoderKLLTX2Video":
            raise CheckpointError(f"{path}: config.json is for {config.get('_class_name')!r}, not the LTX-2 video VAE "
                                  "(AutoencoderKLLTX2Video).")
        files = sorted(path.glob("diffusion_pytorch_model*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no diffusion_pytorch_model*.safetensors beside config.json.")
        # Keys an older config may lack, where the diffusers class defaults differ from LTX-2: the official decoder
        # is not causal, and the class derives the compression as patch·2^stages (wrong with a temporal-only stage).
        config.setdefault("decoder_causal", False)
        stride = dict(_DOWN.values())  # diffusers downsample_type → (t, h, w)
        strides = [stride[t] for t in config.get("downsample_type") or ("spatial", "temporal", "spatiotemporal",
                                                                         "spatiotemporal")]
        config["spatial_compression_ratio"] = config.get("spatial_compression_ratio") or (
            config.get("patch_size", 4) * math.prod(st[1] for st in strides))
        config["temporal_compression_ratio"] = (config.get("temporal_compression_ratio")
                                                or math.prod(st[0] for st in strides))
        sd: dict[str, Tensor] = {}
        for f in files:
            sd.update(load_state_dict(f))
        with torch.device("meta"):
            model = AutoencoderKLLTX2Video.from_config(config)
        assign_state_dict(model, {k: v.to(dtype) for k, v in sd.items()}, path)
        check_materialised(model)
        return cls(model, None, **tiling)

    def official_state_dict(self) -> dict[str, Tensor]:
        """The VAE's tensors under their official names (without ``vae.``), statistics included."""
        n_down = len(self.model.config.block_out_channels)
        out: dict[str, Tensor] = {}
        for k, v in self.model.state_dict().items():
            if k == "latents_mean":
                out["per_channel_statistics.mean-of-means"] = v
            elif k == "latents_std":
                out["per_channel_statistics.std-of-means"] = v
            else:
                out[_to_official_key(k, n_down)] = v
        out.update({f"per_channel_statistics.{n}": v for n, v in self.statistics.items()})
        return out

    # -- properties --------------------------------------------------------------------------------------------

    @property
    def timestep_conditioning(self) -> bool:
        """Whether the decoder is timestep-conditioned (decoding then adds noise; see the module docstring)."""
        return bool(self.model.config.timestep_conditioning)

    # -- normalisation -----------------------------------------------------------------------------------------

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        shape = (1, -1, 1, 1, 1)
        return (self.model.latents_mean.to(like.device, like.dtype).view(shape),
                self.model.latents_std.to(like.device, like.dtype).view(shape))

    def normalize(self, latents: Tensor) -> Tensor:
        """Raw VAE latents → normalised: ``(x − mean-of-means) / std-of-means`` per channel (official
        ``PerChannelStatistics.normalize``). ``latents``: ``[B, C, F', H', W']``; same dtype/device out."""
        mean, std = self._stats(latents)
        return (latents - mean) / std

    def denormalize(self, latents: Tensor) -> Tensor:
        """Normalised latents → raw: ``x·std-of-means + mean-of-means`` per channel (official ``un_normalize``)."""
        mean, std = self._stats(latents)
        return latents * std + mean

    # -- encode / decode ---------------------------------------------------------------------------------------

    def _use_tiling(self, tiling: bool | None) -> bool:
        return self.tiling if tiling is None else bool(tiling)

    def _encode_mean(self, pixels: Tensor) -> Tensor:
        h = self.model.encoder(pixels.to(self.device, self.dtype))
        return h[:, : self.latent_channels].float()  # [means, log-variances]: the posterior mean

    @torch.no_grad()
    def encode(self, pixels: Tensor, *, tiling: bool | None = None,
               progress: Callable[[int, int], None] | None = None) -> Tensor:
        """Encode a video into normalised latents (the posterior mean, then :meth:`normalize`).

        Args:
            pixels: ``[B, 3, F, H, W]`` in [-1, 1], F = 8k+1, H and W multiples of 32; any float dtype/device.
            tiling: override the instance default (see the module docstring).
            progress: ``progress(done, total)`` after each tile (one untiled); may raise to stop.
        Returns:
            ``[B, 128, (F−1)/8 + 1, H/32, W/32]``, float32, on the VAE's device.
        Raises:
            ValueError: wrong layout, frame count or size (the message names the nearest valid values), non-float
                input or values far outside [-1, 1].
        """
        self.check_video_shape(pixels.shape)
        if not pixels.is_floating_point():
            raise ValueError(f"Expected float pixels in [-1, 1]; got dtype {pixels.dtype}. Convert with x/127.5 - 1.")
        peak = pixels.detach().abs().max().item() if pixels.numel() else 0.0
        if peak > 1.5:
            raise ValueError(f"Pixels must be in [-1, 1]; got values up to {peak:.3g}. "
                             "For 0..255 images use x/127.5 - 1, for 0..1 images 2x - 1.")
        if not self._use_tiling(tiling):
            z = self.normalize(self._encode_mean(pixels))
            _report(progress, 1, 1)
            return z
        b, _, f, h, w = pixels.shape
        s, t = self.spatial_ratio, self.temporal_ratio
        out = torch.empty(b, self.latent_channels, (f - 1) // t + 1, h // s, w // s, device=self.device)
        ov_t, ov_s = self.tile_frames_overlap // t, self.tile_overlap // s
        t_axis = _encode_axis(_spans((f - 1) // t, self.tile_frames // t, ov_t), t, 1, ov_t)
        y_axis = _encode_axis(_spans(h // s, self.tile_size // s, ov_s), s, 0, ov_s)
        x_axis = _encode_axis(_spans(w // s, self.tile_size // s, ov_s), s, 0, ov_s)
        total = len(t_axis) * len(y_axis) * len(x_axis)
        for k, ((ti, tk, to), (yi, yk, yo), (xi, xk, xo)) in enumerate(itertools.product(t_axis, y_axis, x_axis)):
            z = self._encode_mean(pixels[:, :, ti, yi, xi])
            out[:, :, to, yo, xo] = z[:, :, tk, yk, xk]
            _report(progress, k + 1, total)
        return self.normalize(out)

    @torch.no_grad()
    def decode(self, latents: Tensor, *, tiling: bool | None = None, generator: torch.Generator | None = None,
               progress: Callable[[int, int], None] | None = None) -> Tensor:
        """Decode normalised latents into video.

        With a timestep-conditioned decoder the latent is first noised, ``z ← (1 − 0.025)·z + 0.025·ε`` with
        ``ε = torch.randn(z.shape, generator=generator)`` (float32, on the VAE's device; the global RNG without a
        generator), and the decoder runs at timestep 0.05 (official ``VideoDecoder.forward``). The noise is drawn once
        for the whole latent, so tiles agree on it.
        Args:
            latents: normalised ``[B, 128, F', H', W']`` (any float dtype/device).
            tiling: override the instance default.
            generator: random generator for the decode noise (timestep-conditioned decoders only).
            progress: ``progress(done, total)`` after each tile (one untiled); may raise to stop.
        Returns:
            ``[B, 3, 8(F'−1)+1, 32·H', 32·W']``, float32, nominally in [-1, 1] (not clamped), on the VAE's device.
        Raises:
            ValueError: not 5-D, wrong channel count, or fewer than 2 latents in height or width (the decoder's
                reflection padding needs 2).
        """
        c = self.latent_channels
        if latents.ndim != 5 or latents.shape[1] != c:
            raise ValueError(f"Expected normalised LTX-2 video latents [B, {c}, F', H', W']; got shape "
                             f"{tuple(latents.shape)}.")
        if self.model.config.decoder_spatial_padding_mode == "reflect" and min(latents.shape[3:]) < 2:
            raise ValueError(f"The LTX-2 decoder pads by reflection and needs at least 2 latents "
                             f"({2 * self.spatial_ratio} px) in height and width; got latents of "
                             f"{tuple(latents.shape[3:])}.")
        z = latents.to(self.device, torch.float32)
        temb = None
        if self.timestep_conditioning:
            noise = torch.randn(z.shape, generator=generator, dtype=torch.float32, device=z.device)
            z = (1 - DECODE_NOISE_SCALE) * z + DECODE_NOISE_SCALE * noise
            temb = torch.full((z.shape[0],), DECODE_TIMESTEP, device=self.device, dtype=self.dtype)
        z = self.denormalize(z).to(self.dtype)
        if not self._use_tiling(tiling):
            video = self.model.decoder(z, temb).float()
            _report(progress, 1, 1)
            return video
        b, _, n, h, w = z.shape
        s, t = self.spatial_ratio, self.temporal_ratio
        out = torch.zeros(b, self.model.config.out_channels, t * (n - 1) + 1, s * h, s * w, device=self.device)
        t_axis = _decode_axis(_spans(n - 1, self.tile_frames // t, self.tile_frames_overlap // t), t, 1)
        y_axis = _decode_axis(_spans(h, self.tile_size // s, self.tile_overlap // s), s, 0)
        x_axis = _decode_axis(_spans(w, self.tile_size // s, self.tile_overlap // s), s, 0)
        norms = []
        for axis, length in ((t_axis, out.shape[2]), (y_axis, out.shape[3]), (x_axis, out.shape[4])):
            total = torch.zeros(length)
            for _, o, wt in axis:
                total[o] += wt
            norms.append(total.to(self.device))
        total = len(t_axis) * len(y_axis) * len(x_axis)
        for k, ((ti, to, wt), (yi, yo, wy), (xi, xo, wx)) in enumerate(itertools.product(t_axis, y_axis, x_axis)):
            x = self.model.decoder(z[:, :, ti, yi, xi], temb).float()
            mask = (wt.view(-1, 1, 1) * wy.view(1, -1, 1) * wx.view(1, 1, -1)).to(self.device)
            out[:, :, to, yo, xo] += x * mask
            _report(progress, k + 1, total)
        return out / (norms[0].view(-1, 1, 1) * norms[1].view(1, -1, 1) * norms[2].view(1, 1, -1))


def _report(progress: Callable[[int, int], None] | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)

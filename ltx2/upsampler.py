"""LTX-2 ×2 spatial latent upsampler, run by diffusers' ``LTX2LatentUpsamplerModel``.

The file ``ltx-2-spatial-upscaler-x2-1.0.safetensors`` holds the model without prefix and its own ``config``
metadata, a flat dict (Lightricks/LTX-2 ``packages/ltx-core/src/ltx_core/model/upsampler/model_configurator.py``:
``in_channels, mid_channels, num_blocks_per_stage, dims, spatial_upsample, temporal_upsample, spatial_scale,
rational_resampler``). Its tensor names are diffusers' names too (huggingface/diffusers
``scripts/convert_ltx2_to_diffusers.py`` loads the file unchanged), so no key conversion is needed; only the config
keys differ (``spatial_scale`` → ``rational_spatial_scale``, ``rational_resampler`` → ``use_rational_resampler``).

Network (``ltx_core/model/upsampler/model.py``; ltx2.md §7.5): Conv3d 128→mid, GroupNorm(32), SiLU, res blocks,
per-frame upsampler (19B: rational resampler, Conv2d mid→4·mid, pixel shuffle ×2, 5×5 binomial blur with stride 1),
res blocks, Conv3d mid→128. It works on raw (un-normalised) VAE latents; :meth:`LTX2LatentUpsampler.__call__`
un-normalises with the video VAE's statistics, upsamples and normalises again (official ``upsample_video``).

Config: the file's metadata with the 19B values (:data:`LTX2_19B_UPSAMPLER_CONFIG`, from diffusers'
``get_ltx2_spatial_latent_upsampler_config("2.0")``) for missing keys; channels, block count, convolution dims and
the upsampler kind are read from the tensor shapes. The temporal ×2 upscaler (same family, ``upsampler.0`` Conv3d
mid→2·mid, frames 2F'−1) is refused: the two-stage pipeline uses only the spatial one.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from torch import Tensor

from ..core.wrapped import WrappedModel
from ..core.checkpoint import (
    CheckpointError,
    assign_state_dict,
    check_materialised,
    describe_checkpoint,
    load_state_dict,
    read_safetensors_header,
)

if TYPE_CHECKING:
    from diffusers.pipelines.ltx2.latent_upsampler import LTX2LatentUpsamplerModel

    from .vae import LTX2VideoVAE

#: 19B spatial ×2 upsampler config in the official metadata form (ltx2.md §7.5; diffusers' 2.0 converter config).
LTX2_19B_UPSAMPLER_CONFIG: dict = {
    "in_channels": 128, "mid_channels": 1024, "num_blocks_per_stage": 4, "dims": 3, "spatial_upsample": True,
    "temporal_upsample": False, "spatial_scale": 2.0, "rational_resampler": True,
}

_EXPECTED = "Expected the LTX-2 spatial latent upsampler, ltx-2-spatial-upscaler-x2-1.0.safetensors."
_RATIONAL_SCALES = {2: 2.0, 4: 4.0}  # rational resampler: conv out = num²·mid; scale num/den, den = 1 for these


def tiny_config() -> dict:
    """A small spatial ×2 upsampler config (official metadata form): 128 latent channels, 32 mid channels (GroupNorm
    needs multiples of 32), one res block per stage, rational resampler."""
    return {**LTX2_19B_UPSAMPLER_CONFIG, "mid_channels": 32, "num_blocks_per_stage": 1}


def _diffusers_config(config: Mapping) -> dict:
    cfg = {**LTX2_19B_UPSAMPLER_CONFIG, **config}
    return {"in_channels": int(cfg["in_channels"]), "mid_channels": int(cfg["mid_channels"]),
            "num_blocks_per_stage": int(cfg["num_blocks_per_stage"]), "dims": int(cfg["dims"]),
            "spatial_upsample": bool(cfg["spatial_upsample"]), "temporal_upsample": bool(cfg["temporal_upsample"]),
            "rational_spatial_scale": float(cfg["spatial_scale"]),
            "use_rational_resampler": bool(cfg["rational_resampler"])}


def config_from_shapes(shapes: Mapping[str, Sequence[int]], metadata: Mapping | None = None) -> dict:
    """Official-form upsampler config for tensors ``shapes``: sizes and upsampler kind from the shapes, the rest
    from ``metadata``, else the 19B values.

    Raises:
        CheckpointError: not a latent upsampler, the temporal upscaler, or an ambiguous rational scale without
            metadata.
    """
    meta = {**LTX2_19B_UPSAMPLER_CONFIG, **(metadata or {})}
    conv = shapes.get("initial_conv.weight")
    if conv is None or "final_conv.weight" not in shapes:
        raise CheckpointError(f"this looks like {describe_checkpoint(shapes)}, not a latent upsampler. {_EXPECTED}")
    mid, dims = conv[0], len(conv) - 2
    blocks = len({m.group(1) for n in shapes if (m := re.match(r"res_blocks\.(\d+)\.", n))})
    cfg = {**meta, "in_channels": conv[1], "mid_channels": mid, "num_blocks_per_stage": blocks, "dims": dims}
    if "upsampler.conv.weight" in shapes:  # rational resampler: Conv2d mid → num²·mid
        num = int(round((shapes["upsampler.conv.weight"][0] / mid) ** 0.5))
        scale = float(meta["spatial_scale"]) if metadata and "spatial_scale" in metadata else _RATIONAL_SCALES.get(num)
        if scale is None:
            raise CheckpointError(f"latent upsampler with a ×{num} rational resampler needs 'spatial_scale' in its "
                                  "metadata (1.5 or 0.75); the file has none.")
        return {**cfg, "spatial_upsample": True, "temporal_upsample": False, "rational_resampler": True,
                "spatial_scale": scale}
    up = shapes.get("upsampler.0.weight")
    if up is None:
        raise CheckpointError(f"latent upsampler without upsampler weights ({describe_checkpoint(shapes)}). "
                              + _EXPECTED)
    if len(up) == 4:  # per-frame Conv2d mid → 4·mid, pixel shuffle ×2
        return {**cfg, "spatial_upsample": True, "temporal_upsample": False, "rational_resampler": False,
                "spatial_scale": 2.0}
    what = ("the LTX-2 temporal ×2 latent upscaler (ltx-2-temporal-upscaler-x2-1.0), which doubles the frame count"
            if up[0] == 2 * mid else "a spatio-temporal latent upscaler (Conv3d then ×2 pixel shuffle in F, H, W)")
    raise CheckpointError(f"this is {what}; only the spatial ×2 upsampler is supported. {_EXPECTED}")


class LTX2LatentUpsampler(WrappedModel):
    """The LTX-2 spatial latent upsampler on normalised latents.

    Args:
        model: a diffusers ``LTX2LatentUpsamplerModel`` (spatial).
    Raises:
        ValueError: a temporal upsampler.
    """

    def __init__(self, model: "LTX2LatentUpsamplerModel"):
        if model.config.temporal_upsample:
            raise ValueError("The LTX-2 temporal latent upscaler is not supported; use the spatial ×2 upsampler.")
        super().__init__(model)

    @classmethod
    def from_config(cls, config: Mapping | None = None) -> "LTX2LatentUpsampler":
        """Random-initialised upsampler (diffusers' default init, the current torch seed) from an official-form
        config (default :func:`tiny_config`), float32 on the CPU."""
        from diffusers.pipelines.ltx2.latent_upsampler import LTX2LatentUpsamplerModel

        return cls(LTX2LatentUpsamplerModel(**_diffusers_config(config if config is not None else tiny_config())))

    @classmethod
    def from_official_state_dict(cls, state_dict: Mapping[str, Tensor], config: Mapping | None = None, *,
                                 dtype: torch.dtype = torch.float32,
                                 source: str = "LTX-2 latent upsampler") -> "LTX2LatentUpsampler":
        """Build from the file's tensors (official names) and its ``config`` metadata dict (or None).

        Raises:
            CheckpointError: not a spatial latent upsampler (the message says what it is), tensors that do not
                match the config.
        """
        from diffusers.pipelines.ltx2.latent_upsampler import LTX2LatentUpsamplerModel

        try:
            cfg = config_from_shapes({k: tuple(v.shape) for k, v in state_dict.items()}, config)
        except CheckpointError as e:
            raise CheckpointError(f"{source}: {e}") from None
        with torch.device("meta"):
            model = LTX2LatentUpsamplerModel(**_diffusers_config(cfg))
        assign_state_dict(model, {k: v.to(dtype) for k, v in state_dict.items()}, source)
        check_materialised(model)
        return cls(model)

    def official_state_dict(self) -> dict[str, Tensor]:
        """The tensors under their official names (the same as diffusers')."""
        return dict(self.model.state_dict())

    @property
    def scale(self) -> float:
        """Spatial scale factor (2.0 for the ×2 file)."""
        return float(self.model.config.rational_spatial_scale if self.model.config.use_rational_resampler else 2.0)

    @torch.no_grad()
    def __call__(self, latents: Tensor, vae: "LTX2VideoVAE") -> Tensor:
        """Upsample normalised video latents (official ``upsample_video``: un-normalise, upsample, normalise).

        Args:
            latents: normalised ``[B, 128, F', H', W']`` (any float dtype/device).
            vae: the :class:`~cinetune.ltx2.vae.LTX2VideoVAE` whose statistics normalise the latents.
        Returns:
            Normalised ``[B, 128, F', 2·H', 2·W']`` (×``scale``), float32, on the upsampler's device.
        Raises:
            ValueError: not 5-D or a channel count other than the upsampler's.
        """
        c = self.model.config.in_channels
        if latents.ndim != 5 or latents.shape[1] != c:
            raise ValueError(f"Expected normalised LTX-2 video latents [B, {c}, F', H', W']; got shape "
                             f"{tuple(latents.shape)}.")
        raw = vae.denormalize(latents.to(self.device, torch.float32))
        return vae.normalize(self.model(raw.to(self.dtype)).float())


def load_ltx2_upsampler(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> LTX2LatentUpsampler:
    """Load ``ltx-2-spatial-upscaler-x2-1.0.safetensors`` (or a diffusers ``latent_upsampler`` folder / file).

    Args:
        path: the ``.safetensors`` file (its ``config`` metadata is used when present), or a folder with
            ``diffusion_pytorch_model.safetensors`` and ``config.json``.
        dtype: parameter and compute dtype. device: where the model is placed.
    Raises:
        CheckpointError: missing/truncated file, or another model (the message says which: the temporal
            upscaler, the LTX-2 checkpoint or VAE, …).
    """
    path = Path(path)
    config = None
    if path.is_dir():
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            config = None
        if config is not None:  # diffusers names → official names
            config = {**config, "spatial_scale": config.get("rational_spatial_scale", 2.0),
                      "rational_resampler": config.get("use_rational_resampler", True)}
        files = sorted(path.glob("diffusion_pytorch_model*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no diffusion_pytorch_model.safetensors in this folder. {_EXPECTED}")
        path = files[0]
    infos, metadata = read_safetensors_header(path)
    for prefix, what in (("model.diffusion_model.", "the LTX-2 model checkpoint"), ("vae.", "the LTX-2 video VAE"),
                         ("audio_vae.", "the LTX-2 audio VAE"), ("encoder.down_blocks.", "a video VAE")):
        if any(n.startswith(prefix) for n in infos):
            raise CheckpointError(f"{path}: this is {what}, not the latent upsampler. {_EXPECTED}")
    if config is None and "config" in metadata:
        try:
            config = json.loads(metadata["config"])
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: its 'config' metadata is not valid JSON ({e}).") from e
    try:
        config_from_shapes({n: i.shape for n, i in infos.items()}, config)  # refuse before reading the tensors
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    upsampler = LTX2LatentUpsampler.from_official_state_dict(load_state_dict(path), config, dtype=dtype,
                                                             source=str(path))
    return upsampler.to(device)

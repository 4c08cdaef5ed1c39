"""A frozen model from a library (diffusers) behind a pack-owned handle: device, dtype, moving it, and the geometry
of a video VAE — shared by every family's VAE and latent-upsampler wrappers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class WrappedModel:
    """Holds ``self.model`` (an ``nn.Module``, put in eval mode with gradients off) and forwards device moves.

    Args:
        model: the wrapped module.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        """Device of the weights (and of the outputs)."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Parameter/compute dtype."""
        return next(self.model.parameters()).dtype

    def to(self, device: str | torch.device):
        """Move the model to ``device``; returns self."""
        self.model.to(device)
        return self


class WrappedVideoVAE(WrappedModel):
    """A diffusers video VAE: adds the latent geometry its config states."""

    @property
    def latent_channels(self) -> int:
        """Latent channels C."""
        return self.model.config.latent_channels

    @property
    def spatial_ratio(self) -> int:
        """Pixels per latent pixel along H and W."""
        return self.model.config.spatial_compression_ratio

    @property
    def temporal_ratio(self) -> int:
        """Frames per latent frame after the first."""
        return self.model.config.temporal_compression_ratio

    def check_video_shape(self, shape: Sequence[int]) -> None:
        """Raise ``ValueError`` unless ``shape`` is ``[B, C, t·k+1, H, W]`` with the VAE's colour channels C, its
        temporal factor t and H, W multiples of its spatial factor; the message names the nearest valid values."""
        if len(shape) != 5:
            raise ValueError(f"Expected a video tensor [B, 3, F, H, W]; got shape {tuple(shape)}. "
                             "A single image is [B, 3, 1, H, W].")
        _, c, f, h, w = shape
        t, s = self.temporal_ratio, self.spatial_ratio
        if c != self.model.config.in_channels:
            raise ValueError(f"Expected {self.model.config.in_channels} colour channels in dim 1; got {c} "
                             f"(shape {tuple(shape)}). Layout is [B, C, F, H, W].")
        if f < 1 or (f - 1) % t:
            raise ValueError(f"The VAE needs {t}k+1 frames (1, {t + 1}, {2 * t + 1}, …); got {f}: use "
                             f"{nearest_valid(f, t, 1)} frames.")
        for name, v in (("height", h), ("width", w)):
            if v < s or v % s:
                raise ValueError(f"Video {name} must be a multiple of {s} px; got {v}: use {nearest_valid(v, s, 0)}.")


def nearest_valid(value: int, multiple: int, offset: int) -> str:
    """The valid values ``multiple·k + offset`` around ``value`` in words (``"9 or 17"``; just the least valid value,
    ``offset`` or ``multiple`` when ``offset`` is 0, below it)."""
    lowest = offset or multiple
    below = value - (value - offset) % multiple
    return f"{max(below + multiple, lowest)}" if below < lowest else f"{below} or {below + multiple}"

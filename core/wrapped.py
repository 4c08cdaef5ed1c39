"""A frozen model from a library (diffusers) behind a pack-owned handle: device, dtype, moving it, and the geometry
of a video VAE — shared by every family's VAE and latent-upsampler wrappers."""

from __future__ import annotations

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

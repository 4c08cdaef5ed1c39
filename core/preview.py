"""Latent previews: how a family's video latent is shown as a small RGB image while it is being sampled.

A sampler reports its current estimate of the clean latent x0 after every step (``on_step(step, total, x0)``);
a host turns the first latent frame into a picture. The cheap way, used by ComfyUI's ``latent2rgb`` preview method,
is a per-pixel linear map from the latent channels to RGB, fitted per VAE: ``rgb = x0·W + b`` with ``W`` of shape
``[C, 3]``, applied to the latent the DiT works on (ComfyUI applies it after its ``process_in``, i.e. to
``latent_format.to_model(latent)`` here). The result is nominally in [-1, 1] and shown as ``(rgb + 1) / 2``.
Each family holds its factors as data in one :class:`LatentPreview`, with the source of the numbers.

Source of the method: ComfyUI ``latent_preview.py`` (``Latent2RGBPreviewer``, ``preview_to_image``) and
``comfy/latent_formats.py`` (``latent_rgb_factors``, ``latent_rgb_factors_bias``, ``taesd_decoder_name``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .family import LatentFormat

__all__ = ["LatentPreview", "StepCallback"]

#: ``on_step(step, total, x0)``: called by a sampler after step ``step`` of ``total`` (1-based, so the last call has
#: ``step == total``) with its current clean-latent estimate x0 in the family's ``LATENT`` convention.
StepCallback = Callable[[int, int, Tensor], None]


@dataclass(frozen=True)
class LatentPreview:
    """A family's latent-to-RGB preview: linear factors on the model-space latent, and the approximate decoder a
    host may use instead.

    Attributes:
        latent_format: the family's latent format (channel count; ``to_model`` gives the space the factors apply to).
        rgb_factors: ``C`` rows of ``(r, g, b)`` weights, one per latent channel.
        rgb_bias: ``(r, g, b)`` added after the weights.
        taesd_decoder_name: file-name prefix of a tiny approximate VAE decoder in ComfyUI's ``models/vae_approx``
            that a host with the ``taesd`` preview method uses instead of the factors; None when there is none.
        source: where the numbers come from (repository and path).

    Raises:
        ValueError: the factor table does not have one row of three numbers per latent channel, or the bias is not
            three numbers.
    """

    latent_format: LatentFormat
    rgb_factors: tuple[tuple[float, float, float], ...]
    rgb_bias: tuple[float, float, float]
    taesd_decoder_name: str | None
    source: str

    def __post_init__(self) -> None:
        channels = self.latent_format.channels
        rows = tuple(tuple(float(v) for v in row) for row in self.rgb_factors)
        if len(rows) != channels or any(len(row) != 3 for row in rows):
            shape = f"{len(rows)} rows of lengths {sorted({len(r) for r in rows})}"
            raise ValueError(f"LatentPreview for {self.latent_format.name!r}: rgb_factors must have one (r, g, b) row "
                             f"per latent channel ({channels}), got {shape}")
        bias = tuple(float(v) for v in self.rgb_bias)
        if len(bias) != 3:
            raise ValueError(f"LatentPreview for {self.latent_format.name!r}: rgb_bias must be three numbers, got "
                             f"{len(bias)}")
        object.__setattr__(self, "rgb_factors", rows)
        object.__setattr__(self, "rgb_bias", bias)

    @property
    def channels(self) -> int:
        """Latent channels C."""
        return self.latent_format.channels

    def first_frame(self, latent: Tensor) -> Tensor:
        """The first latent frame of the first sample, ``[C, H', W']``, from ``[B, C, F', H', W']`` (or an image latent
        ``[B, C, H', W']``).

        Raises:
            ValueError: not 4-D or 5-D, or not C channels in dim 1.
        """
        if not isinstance(latent, Tensor) or latent.ndim not in (4, 5) or latent.shape[1] != self.channels:
            got = tuple(latent.shape) if isinstance(latent, Tensor) else type(latent).__name__
            raise ValueError(f"a {self.latent_format.name} preview needs a latent [B, {self.channels}, F', H', W'], "
                             f"got {got}")
        return latent[0, :, 0] if latent.ndim == 5 else latent[0]

    def to_rgb(self, latent: Tensor) -> Tensor:
        """The first frame of a ``LATENT``-convention latent as RGB: ``to_model(latent)·W + b`` per latent pixel.

        Args:
            latent: ``[B, C, F', H', W']`` (or ``[B, C, H', W']``), any float dtype and device.
        Returns:
            ``[H', W', 3]`` float32 on the latent's device, nominally in [-1, 1] (not clamped).
        Raises:
            ValueError: wrong shape (see :meth:`first_frame`).
        """
        frame = self.latent_format.to_model(self.first_frame(latent).float())
        weight = torch.tensor(self.rgb_factors, dtype=torch.float32, device=frame.device)  # [C, 3]
        bias = torch.tensor(self.rgb_bias, dtype=torch.float32, device=frame.device)
        return frame.movedim(0, -1) @ weight + bias

    def to_image(self, latent: Tensor) -> Tensor:
        """:meth:`to_rgb` mapped to displayable bytes: ``[H', W', 3]`` uint8 on the CPU, ``(rgb + 1)/2`` clamped to
        [0, 1] and scaled to 0..255 (ComfyUI ``preview_to_image``)."""
        rgb = self.to_rgb(latent)
        return ((rgb + 1.0) / 2.0).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).cpu()


"""Text conditioning passed from the K5 text encoders to the DiT."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class K5TextEmbeds:
    """Encoded prompt(s) for the Kandinsky 5 DiT.

    Attributes:
        text: Qwen2.5-VL last hidden state after the final norm, template prefix cropped,
            ``[B, L, in_text_dim]`` (3584 for the real 7B encoder), float.
        text_mask: ``[B, L]`` bool, True for real tokens, False for right padding.
        pooled: CLIP-L un-projected pooled output ``[B, 768]`` (``in_text_dim2`` for tiny models), float.
    """

    text: torch.Tensor
    text_mask: torch.Tensor
    pooled: torch.Tensor

    def to(self, device=None, dtype=None) -> "K5TextEmbeds":
        """Move to ``device``; ``dtype`` applies to the float tensors only."""
        return K5TextEmbeds(
            self.text.to(device=device, dtype=dtype),
            self.text_mask.to(device=device),
            self.pooled.to(device=device, dtype=dtype),
        )

    @property
    def batch_size(self) -> int:
        return self.text.shape[0]

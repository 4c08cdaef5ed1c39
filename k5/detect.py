"""Kandinsky 5's entry in the checkpoint-kind registry that error messages use
(:func:`cinetune.core.checkpoint.describe_checkpoint`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..core.checkpoint import register_checkpoint_kind


@register_checkpoint_kind
def describe_k5(shapes: Mapping[str, Sequence[int]]) -> str | None:
    """``"a Kandinsky 5 DiT (goes in models/diffusion_models)"`` when the names hold the DiT's visual blocks with
    their cross-attention key norm (the marker ComfyUI ``comfy/model_detection.py`` keys on), else None."""
    names = list(shapes)
    if any("visual_transformer_blocks." in n for n in names) and any("cross_attention.key_norm" in n for n in names):
        return "a Kandinsky 5 DiT (goes in models/diffusion_models)"
    return None

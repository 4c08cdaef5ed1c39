"""Key names of the LTX-2 DiT: official ↔ diffusers ``LTX2VideoTransformer3DModel``.

Sources: huggingface/diffusers ``scripts/convert_ltx2_to_diffusers.py`` and ``loaders/single_file_utils.py``
``convert_ltx2_transformer_to_diffusers``.
"""

from __future__ import annotations

from typing import Any, Mapping

from .config_detect import CONNECTOR_PREFIXES

# First name component (top-level module) renames.
_TOP_TO_DIFFUSERS = {
    "patchify_proj": "proj_in", "audio_patchify_proj": "audio_proj_in",
    "adaln_single": "time_embed", "audio_adaln_single": "audio_time_embed",
    "av_ca_video_scale_shift_adaln_single": "av_cross_attn_video_scale_shift",
    "av_ca_audio_scale_shift_adaln_single": "av_cross_attn_audio_scale_shift",
    "av_ca_a2v_gate_adaln_single": "av_cross_attn_video_a2v_gate",
    "av_ca_v2a_gate_adaln_single": "av_cross_attn_audio_v2a_gate",
}
# Renames of any inner name component.
_PART_TO_DIFFUSERS = {
    "q_norm": "norm_q", "k_norm": "norm_k",
    "scale_shift_table_a2v_ca_video": "video_a2v_cross_attn_scale_shift_table",
    "scale_shift_table_a2v_ca_audio": "audio_a2v_cross_attn_scale_shift_table",
}
_TOP_FROM_DIFFUSERS = {v: k for k, v in _TOP_TO_DIFFUSERS.items()}
_PART_FROM_DIFFUSERS = {v: k for k, v in _PART_TO_DIFFUSERS.items()}


def _rename(key: str, top: Mapping[str, str], part: Mapping[str, str]) -> str:
    parts = key.split(".")
    parts[0] = top.get(parts[0], parts[0])
    return ".".join([parts[0], *(part.get(p, p) for p in parts[1:])])


def official_to_diffusers_key(key: str) -> str:
    """Official DiT key (without ``model.diffusion_model.``) → diffusers ``LTX2VideoTransformer3DModel`` key
    (huggingface/diffusers ``scripts/convert_ltx2_to_diffusers.py``: ``patchify_proj → proj_in``,
    ``adaln_single → time_embed``, ``av_ca_* → av_cross_attn_*``, ``scale_shift_table_a2v_ca_{video,audio} →
    {video,audio}_a2v_cross_attn_scale_shift_table``, ``q_norm/k_norm → norm_q/norm_k``)."""
    return _rename(key, _TOP_TO_DIFFUSERS, _PART_TO_DIFFUSERS)


def diffusers_to_official_key(key: str) -> str:
    """Inverse of :func:`official_to_diffusers_key`."""
    return _rename(key, _TOP_FROM_DIFFUSERS, _PART_FROM_DIFFUSERS)


def official_to_diffusers(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename a DiT state dict (official names, prefix stripped) to diffusers names; connector tensors (which the
    diffusers transformer does not hold) are dropped. Values are passed through unchanged."""
    return {official_to_diffusers_key(k): v for k, v in state_dict.items() if not k.startswith(CONNECTOR_PREFIXES)}


def diffusers_to_official(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename a diffusers ``LTX2VideoTransformer3DModel`` state dict to the official DiT names (``transformer.``
    prefix stripped when present). Values are passed through unchanged."""
    return {diffusers_to_official_key(k[len("transformer."):] if k.startswith("transformer.") else k): v
            for k, v in state_dict.items()}

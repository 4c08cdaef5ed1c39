"""The released LTX-2 19B checkpoints (dev and distilled, bf16 and fp8), their official inference settings
(distilled sigmas, multimodal guidance), and which of them a file is.

Sources: Lightricks/LTX-2 README and ``packages/ltx-pipelines/src/ltx_pipelines/utils/constants.py`` (distilled
sigmas, guidance defaults).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from .config_detect import (MARKER_KEY, NotLTX2CheckpointError, _dit_names, _not_ltx2_message, _shapes,
                            check_supported, dit_shapes)

#: Official 8-step distilled schedule and its 3-step stage-2 tail (ltx_pipelines ``utils/constants.py``).
DISTILLED_SIGMAS: tuple[float, ...] = (1.0, 0.99375, 0.9875, 0.98125, 0.975, 0.909375, 0.725, 0.421875, 0.0)
STAGE2_DISTILLED_SIGMAS: tuple[float, ...] = (0.909375, 0.725, 0.421875, 0.0)


@dataclass(frozen=True)
class LTX2Guidance:
    """Multimodal guidance of one modality (ltx_core ``MultiModalGuiderParams``): ``pred = c + (cfg−1)(c − u_text)
    + stg·(c − u_perturbed) + (modality−1)(c − u_isolated)``, then std rescale by ``rescale``.

    Attributes:
        cfg: text CFG scale (1 = off). stg: spatio-temporal guidance scale (0 = off). rescale: std rescale factor
        (0 = off). modality: modality-isolation guidance scale (1 = off). stg_blocks: blocks whose self-attention
        the STG pass skips.
    """

    cfg: float = 1.0
    stg: float = 0.0
    rescale: float = 0.0
    modality: float = 1.0
    stg_blocks: tuple[int, ...] = ()

    @property
    def enabled(self) -> bool:
        """False when every term is off (one forward pass per step)."""
        return self.cfg != 1.0 or self.stg != 0.0 or self.modality != 1.0


GUIDANCE_FREE = LTX2Guidance()
DEV_VIDEO_GUIDANCE = LTX2Guidance(cfg=3.0, stg=1.0, rescale=0.7, modality=3.0, stg_blocks=(29,))
DEV_AUDIO_GUIDANCE = LTX2Guidance(cfg=7.0, stg=1.0, rescale=0.7, modality=3.0, stg_blocks=(29,))


@dataclass(frozen=True)
class LTX2Variant:
    """One released 19B checkpoint and its official inference settings (Lightricks/LTX-2 README and
    ``ltx_pipelines/utils/constants.py``).

    Attributes:
        id: stable id (saved in workflows; never renamed). title: human-readable name.
        file_names: official file names (first = canonical).
        distilled: True for the distilled checkpoints (8 steps, no guidance).
        fp8: the file stores the block Linear weights in float8 (the loader reads their scales, if any).
        steps: default denoising steps. sigmas: the fixed schedule (distilled) or None (the LTX2Scheduler with
            ``steps``).
        video_guidance, audio_guidance: :class:`LTX2Guidance` per modality.
        frames, fps, size: default length (8k+1 frames), frame rate, and (W, H) of a one-stage run.
    """

    id: str
    title: str
    file_names: tuple[str, ...]
    distilled: bool
    fp8: bool
    steps: int
    sigmas: tuple[float, ...] | None
    video_guidance: LTX2Guidance
    audio_guidance: LTX2Guidance
    frames: int = 121
    fps: float = 24.0
    size: tuple[int, int] = (768, 512)


def _variant(distilled: bool, fp8: bool) -> LTX2Variant:
    kind = "distilled" if distilled else "dev"
    suffix = "-fp8" if fp8 else ""
    return LTX2Variant(
        id=f"ltx2_19b_{kind}{'_fp8' if fp8 else ''}", title=f"LTX-2 19B {kind}{' fp8' if fp8 else ''}",
        file_names=(f"ltx-2-19b-{kind}{suffix}.safetensors",), distilled=distilled, fp8=fp8,
        steps=len(DISTILLED_SIGMAS) - 1 if distilled else 40, sigmas=DISTILLED_SIGMAS if distilled else None,
        video_guidance=GUIDANCE_FREE if distilled else DEV_VIDEO_GUIDANCE,
        audio_guidance=GUIDANCE_FREE if distilled else DEV_AUDIO_GUIDANCE)


VARIANTS: dict[str, LTX2Variant] = {v.id: v for v in (
    _variant(False, False), _variant(False, True), _variant(True, False), _variant(True, True))}


def file_has_fp8(infos: Mapping[str, Any]) -> bool:
    """True when any DiT tensor of the file is stored as float8 (safetensors dtype ``F8_*``)."""
    return any(str(getattr(infos[key], "dtype", "")).startswith("F8") for key in _dit_names(infos).values())


def detect_variant(filename: str, infos: Mapping[str, Any], file_metadata: Mapping[str, Any] | None = None,
                   requested: str = "auto") -> LTX2Variant:
    """Which released checkpoint a file is: dev or distilled from the file name, fp8 from the stored dtypes.

    dev and distilled have identical tensors, so only the name tells them apart: a name containing ``distill``
    (case-insensitive) is distilled, any other name dev. fp8 = any DiT tensor stored as ``F8_*``.

    Args:
        filename: the file's name or path (only the last component is used).
        infos: name → :class:`~cinetune.core.checkpoint.TensorInfo` of the file (header only).
        file_metadata: safetensors ``__metadata__`` or None (checked for LTX-2.3+ files).
        requested: ``"auto"`` or a key of :data:`VARIANTS` (dev vs distilled cannot be checked; fp8 must match).

    Returns:
        The :class:`LTX2Variant`.

    Raises:
        UnsupportedLTX2Error: NVFP4 or LTX-2.3+ file (:func:`~cinetune.ltx2.config_detect.check_supported`).
        NotLTX2CheckpointError: not an LTX-2 audio+video DiT (the message says what it looks like).
        ValueError: ``requested`` unknown (lists the ids) or its fp8 flag contradicts the file's dtypes.
    """
    check_supported(infos, file_metadata)
    dit = dit_shapes(infos)
    if MARKER_KEY not in dit:
        raise NotLTX2CheckpointError(_not_ltx2_message(dit or _shapes(infos)))
    fp8 = file_has_fp8(infos)
    if requested != "auto":
        if requested not in VARIANTS:
            raise ValueError(f"unknown LTX-2 variant {requested!r}; valid: auto, {', '.join(VARIANTS)}")
        v = VARIANTS[requested]
        if v.fp8 != fp8:
            right = "an fp8" if fp8 else "a bf16"
            raise ValueError(f"variant {requested!r} is for {'fp8' if v.fp8 else 'bf16'} files, but this is {right} "
                             f"file; choose {VARIANTS[_variant_id(v.distilled, fp8)].id!r} or 'auto'")
        return v
    stem = re.split(r"[\\/]", str(filename))[-1].lower()
    return VARIANTS[_variant_id("distill" in stem, fp8)]


def _variant_id(distilled: bool, fp8: bool) -> str:
    return f"ltx2_19b_{'distilled' if distilled else 'dev'}{'_fp8' if fp8 else ''}"

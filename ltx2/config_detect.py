"""What an LTX-2 file is: the layout names of the official combined checkpoint, the DiT tensors of a file, and the
refusal of the LTX-2 family files this pack cannot run.

Sources: Lightricks/LTX-2 ``packages/ltx-core/src/ltx_core/loader/helpers.py`` (``model_version``) and
``model/transformer/model_configurator.py`` (the settings of newer releases); ComfyUI ``comfy/model_detection.py``
(the marker key).

Decision: **Refused files**: NVFP4 ("-fp4": packed uint8 weights with ``weight_scale_2``; Blackwell-only kernels) and
every LTX-2.3 or newer file (gated attention, per-modality text projections, a different vocoder): the architecture
differs, so loading them as 19B would fail or give noise.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable, Mapping

from ..core.checkpoint import CheckpointError, describe_checkpoint

#: Prefix of the DiT inside the official combined checkpoint.
DIT_PREFIX = "model.diffusion_model."
#: Text connectors stored under the DiT prefix; they belong to the text side (``ltx2/text.py``), not the DiT.
CONNECTOR_PREFIXES = ("video_embeddings_connector.", "audio_embeddings_connector.")
#: Name of the DiT's block list (``nn.ModuleList``), for block swap, checkpointing and LoRA.
BLOCK_LIST = "transformer_blocks"
#: The DiT key every LTX-2 audio+video file has (ComfyUI ``model_detection.py`` uses it to pick ``ltxav``).
MARKER_KEY = "audio_adaln_single.linear.weight"
EXPECTED_FILE = ("an LTX-2 19B checkpoint (e.g. ltx-2-19b-dev.safetensors or ltx-2-19b-distilled-fp8.safetensors) "
                 "in models/checkpoints")
UNSUPPORTED_23 = "this is an LTX-2.3 (22B) file; Cinetune supports LTX-2 19B"

# Settings of newer releases (Lightricks/LTX-2 HEAD model_configurator.py): key → (value meaning "newer", release).
_NEWER_SETTINGS = {
    "apply_gated_attention": (True, "2.3"), "cross_attention_adaln": (True, "2.3"),
    "caption_proj_before_connector": (True, "2.3"), "connector_apply_gated_attention": (True, "2.3"),
    "ff_bias": (False, "2.5"), "audio_ff_bias": (False, "2.5"), "use_prompt_adaln_single": (False, "2.5"),
    "use_keyframes_abs_pos_embedding": (True, "2.5"),
}


class NotLTX2CheckpointError(CheckpointError):
    """The file is not an LTX-2 audio+video DiT (the message says what it looks like)."""


class UnsupportedLTX2Error(CheckpointError):
    """An LTX-2 family file this pack cannot run (NVFP4, LTX-2.3 or newer); the message says which."""


def _refuse_newer_settings(metadata: Mapping[str, Any]) -> None:
    found = {k: release for k, (newer, release) in _NEWER_SETTINGS.items()
             if k in metadata and metadata[k] is newer}
    if found:
        newest = max(found.values())
        what = UNSUPPORTED_23 if newest == "2.3" else f"this is an LTX-{newest} file; Cinetune supports LTX-2 19B"
        settings = ", ".join(f"{k}={json.dumps(metadata[k])}" for k in found)
        raise UnsupportedLTX2Error(f"{what} (its transformer metadata sets {settings}).")


def _shapes(infos: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(int(s) for s in getattr(info, "shape", info)) for name, info in infos.items()}


def _dit_names(names: Iterable[str]) -> dict[str, str]:
    """DiT name (without ``model.diffusion_model.``) → the file's key, for the DiT tensors among ``names``."""
    names = list(names)
    if any(k.startswith(DIT_PREFIX) for k in names):
        pairs = ((k[len(DIT_PREFIX):], k) for k in names if k.startswith(DIT_PREFIX))
    else:
        pairs = ((k, k) for k in names)
    others = ("vae.", "audio_vae.", "vocoder.", "text_embedding_projection.", *CONNECTOR_PREFIXES)
    return {dit: key for dit, key in pairs if not dit.startswith(others)}


def dit_shapes(infos: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The DiT's tensors of a file, names without ``model.diffusion_model.``: name → shape.

    A file with ``model.diffusion_model.`` keys gives exactly those (minus the text connectors); a file without
    gives the names that are not another component's (``vae.``, ``audio_vae.``, ``vocoder.``,
    ``text_embedding_projection.``) nor connectors.
    """
    shapes = _shapes(infos)
    return {dit: shapes[key] for dit, key in _dit_names(shapes).items()}


def count_blocks(names: Mapping[str, Any] | list[str]) -> int:
    """1 + the largest ``transformer_blocks.<i>`` index among ``names`` (0 when there is none)."""
    pattern = re.compile(re.escape(BLOCK_LIST) + r"\.(\d+)\.")
    idx = {int(m.group(1)) for n in names if (m := pattern.match(n))}
    return max(idx) + 1 if idx else 0


def parse_model_version(version: Any) -> tuple[int, ...]:
    """``model_version`` metadata → comparable numbers: ``"2.3.0"`` → (2, 3, 0), ``"2.4-rc2"`` → (2, 4);
    unset or non-numeric → () (an LTX-2 19B file predates the field). Lightricks/LTX-2 ``loader/helpers.py``
    ``parse_model_version`` (hyphens normalised as ``detect_model_version`` does)."""
    if not isinstance(version, str) or not version:
        return ()
    numbers = []
    for part in version.replace("-", ".").split("."):
        if not part.isdigit():
            break
        numbers.append(int(part))
    return tuple(numbers)


def _release_name(version: tuple[int, ...]) -> str:
    if version[:2] == (2, 3):
        return "an LTX-2.3 (22B)"
    return "an LTX-" + ".".join(str(v) for v in version[:2])


def check_supported(infos: Mapping[str, Any], file_metadata: Mapping[str, Any] | None = None) -> None:
    """Refuse the LTX-2 family files this pack cannot run.

    Args:
        infos: the file's tensors: name → :class:`~cinetune.core.checkpoint.TensorInfo` (dtype used for NVFP4) or
            shape.
        file_metadata: the safetensors ``__metadata__`` (str → str), or None.

    Raises:
        UnsupportedLTX2Error: NVFP4 weights (``.weight_scale_2`` tensors or packed ``U8`` weights); LTX-2.3 or
            newer (``model_version`` ≥ 2.3, ``to_gate_logits`` / ``video_aggregate_embed`` / ``prompt_adaln`` /
            ``vocoder.bwe_generator`` tensors, or 2.3 settings in the transformer metadata).
    """
    names = list(infos)
    md = dict(file_metadata or {})
    version = parse_model_version(md.get("model_version"))
    if version >= (2, 3):
        what = _release_name(version)
        msg = (UNSUPPORTED_23 if what.startswith("an LTX-2.3") else f"this is {what} file; Cinetune supports LTX-2 19B")
        raise UnsupportedLTX2Error(f"{msg} (model_version {md['model_version']!r}).")
    newer = [n for n in names if ".to_gate_logits." in n or "video_aggregate_embed" in n
             or n.startswith("vocoder.bwe_generator.") or "prompt_adaln" in n or "prompt_scale_shift_table" in n]
    if newer:
        raise UnsupportedLTX2Error(f"{UNSUPPORTED_23} (it has tensors of the 2.3 architecture, e.g. {newer[0]}).")
    if "config" in md:
        try:
            config = json.loads(md["config"])
        except (TypeError, json.JSONDecodeError):
            config = None
        if isinstance(config, Mapping) and isinstance(config.get("transformer"), Mapping):
            _refuse_newer_settings(config["transformer"])
    nvfp4 = [n for n in names if n.endswith(".weight_scale_2")]
    nvfp4 += [n for n, info in infos.items() if n.endswith(".weight") and getattr(info, "dtype", None) == "U8"]
    if nvfp4:
        raise UnsupportedLTX2Error(
            f"this is an NVFP4 (fp4) LTX-2 file, e.g. ltx-2-19b-dev-fp4.safetensors (packed 4-bit weights, "
            f"{nvfp4[0]}): it needs Blackwell-only kernels and is not supported. Use ltx-2-19b-dev.safetensors or "
            "ltx-2-19b-dev-fp8.safetensors (or the distilled ones).")


def _not_ltx2_message(shapes: Mapping[str, tuple[int, ...]]) -> str:
    names = list(shapes)
    if "patchify_proj.weight" in shapes and "adaln_single.linear.weight" in shapes:
        what = "an LTX-Video (0.9.x, video-only) DiT, which is not LTX-2"
    else:
        what = describe_checkpoint(shapes)
    first = ", ".join(names[:3]) or "no tensors"
    return f"this looks like {what} (no tensor {MARKER_KEY!r}; first keys: {first}). Expected {EXPECTED_FILE}."

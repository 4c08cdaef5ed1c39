"""The facts a model family hands to the shared code, and the registry the shared code finds families in.

A model family (one DiT line with its VAE) fulfils these contracts with plain values, so that datasets, caches,
LoRA files and the trainer never name a family:

- :class:`LatentFormat` — the latent geometry and normalisation of its VAE: channels, spatial and temporal
  down-scaling, the frame rule ``frames = temporal_factor·k + 1``, the pixel size multiple, the default frame rate,
  the scaling factor or per-channel statistics, and the audio latent geometry (:class:`AudioLatentFormat`) where
  the family makes sound. One small object per family, as ComfyUI ``comfy/latent_formats.py`` keeps one class per
  model.
- :class:`LoRAKeyGrammar` — how its LoRA layer names look: a pattern that recognises them (to name the model a
  foreign LoRA was made for), the resolver of kohya names (``lora_unet_`` + the module path with every ``.``
  replaced by ``_``, which is ambiguous where names contain ``_``), the converter of diffusers module names (for
  families whose diffusers port renames modules) and how its block numbers are reported.
- :class:`ModelFamily` — name (also the ``modelspec.architecture`` written into saved LoRAs), display name, the
  two objects above, and the module-name suffixes and prefixes its LoRAs target.

Registry: a family registers itself once when its package is imported (:func:`register_family`); the shared code
looks it up by name (:func:`get_family`) or guesses it from module/LoRA names (:func:`guess_family`,
:func:`guess_model_family`). Registration order decides between families whose patterns both match a name.
"""

from __future__ import annotations

import math
import operator
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal

__all__ = [
    "AudioLatentFormat", "LatentFormat", "LoRAKeyGrammar", "ModelFamily",
    "register_family", "get_family", "registered_families", "guess_family", "guess_model_family",
]


def _positive_int(owner: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be an integer ≥ 1, got {value!r}")
    return value


def _positive_number(owner: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a finite number > 0, got {value!r}")
    return float(value)


def _as_int(value) -> int | None:
    """``value`` as an int (numpy integers included), or None when it is not an integer."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


# ------------------------------------------------------------------------------------------------ latent formats


@dataclass(frozen=True)
class AudioLatentFormat:
    """Audio latent geometry of a family that makes sound.

    An audio latent is ``[B, channels, T, mel_bins]``: T latent steps at ``latents_per_second``, each holding
    ``mel_bins`` mel bins (after the audio VAE's down-scaling of the mel axis) per channel.

    Attributes:
        channels: latent channels (LTX-2: 8).
        mel_bins: mel bins per latent step after the audio VAE (LTX-2: 64 mel bins ÷ 4 = 16).
        latents_per_second: latent steps per second of audio (LTX-2: 16000 Hz / hop 160 / 4 = 25).
        sample_rate: waveform rate the audio VAE's mel spectrogram is computed at, Hz (LTX-2: 16000).

    Raises:
        ValueError: a non-positive value.
    """

    channels: int
    mel_bins: int
    latents_per_second: float
    sample_rate: int

    def __post_init__(self) -> None:
        _positive_int("AudioLatentFormat", "channels", self.channels)
        _positive_int("AudioLatentFormat", "mel_bins", self.mel_bins)
        _positive_number("AudioLatentFormat", "latents_per_second", self.latents_per_second)
        _positive_int("AudioLatentFormat", "sample_rate", self.sample_rate)

    def latent_length(self, seconds: float) -> int:
        """Latent steps T for ``seconds`` of audio: ``round(seconds · latents_per_second)``.

        Python's ``round`` (half to even), as Lightricks/LTX-2 ``ltx_core`` ``AudioLatentShape.from_duration`` and
        diffusers ``pipelines/ltx2/pipeline_ltx2.py`` compute it (121 frames at 24 fps → 126). ComfyUI's
        ``LTXVEmptyLatentAudio`` rounds up instead (127).

        Raises:
            ValueError: ``seconds`` negative or not finite.
        """
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
                or seconds < 0:
            raise ValueError(f"seconds must be a finite number ≥ 0, got {seconds!r}")
        return round(seconds * self.latents_per_second)

    def latent_shape(self, seconds: float) -> tuple[int, int, int]:
        """``(channels, T, mel_bins)`` of the audio latent for ``seconds`` of audio (T from :meth:`latent_length`)."""
        return self.channels, self.latent_length(seconds), self.mel_bins


@dataclass(frozen=True)
class LatentFormat:
    """Latent geometry and normalisation of one family's VAE.

    Video latents are ``[B, channels, F', H', W']`` with ``F' = (F − 1)/temporal_factor + 1`` (a causal VAE: the
    first frame alone, then ``temporal_factor`` frames per latent frame), ``H' = H/spatial_factor``,
    ``W' = W/spatial_factor``. Valid frame counts are therefore ``F = temporal_factor·k + 1`` (k ≥ 0; 1 is an
    image), and pixel sizes are multiples of ``size_multiple`` (the VAE factor times the DiT's patch size).

    Attributes:
        name: short id of the format (lowercase, dashes), used in messages.
        channels: latent channels C.
        spatial_factor: pixels per latent along height and width.
        temporal_factor: frames per latent frame after the first.
        size_multiple: width and height must be multiples of this many pixels (a multiple of ``spatial_factor``).
            A family may demand a coarser grid for some modes (e.g. sparse attention tiles) by passing
            ``size_multiple`` to :meth:`check_size`.
        default_fps: frame rate the family trains and generates at.
        scaling_factor: the latent normalisation. A number: the DiT works on ``raw latent × scaling_factor`` and the
            stored/ComfyUI ``LATENT`` is the raw VAE output. None: the VAE normalises its latents itself with
            per-channel statistics it holds (``(μ − mean) / std`` per channel), so the VAE output is already what
            the DiT works on.
        audio: audio latent geometry, or None for a family without sound.

    Raises:
        ValueError: a non-positive value, or a ``size_multiple`` that is not a multiple of ``spatial_factor``.
        TypeError: ``audio`` is not an :class:`AudioLatentFormat`.
    """

    name: str
    channels: int
    spatial_factor: int
    temporal_factor: int
    size_multiple: int
    default_fps: float
    scaling_factor: float | None = None
    audio: AudioLatentFormat | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"LatentFormat: name must be a non-empty string, got {self.name!r}")
        owner = f"LatentFormat {self.name!r}"
        for attr in ("channels", "spatial_factor", "temporal_factor", "size_multiple"):
            _positive_int(owner, attr, getattr(self, attr))
        if self.size_multiple % self.spatial_factor:
            raise ValueError(f"{owner}: size_multiple {self.size_multiple} must be a multiple of spatial_factor "
                             f"{self.spatial_factor}")
        object.__setattr__(self, "default_fps", _positive_number(owner, "default_fps", self.default_fps))
        if self.scaling_factor is not None:
            object.__setattr__(self, "scaling_factor",
                               _positive_number(owner, "scaling_factor", self.scaling_factor))
        if self.audio is not None and not isinstance(self.audio, AudioLatentFormat):
            raise TypeError(f"{owner}: audio must be an AudioLatentFormat or None, got {type(self.audio).__name__}")

    # -- normalisation

    @property
    def normalization(self) -> Literal["scaling_factor", "per_channel_statistics"]:
        """``"scaling_factor"`` (a scalar, :attr:`scaling_factor`) or ``"per_channel_statistics"`` (held by the VAE)."""
        return "per_channel_statistics" if self.scaling_factor is None else "scaling_factor"

    def to_model(self, latent):
        """VAE latent → the latent the DiT works on: ``latent × scaling_factor``, or ``latent`` itself when the VAE
        normalises with per-channel statistics. Any tensor or number; returns the same kind."""
        return latent if self.scaling_factor is None else latent * self.scaling_factor

    def from_model(self, latent):
        """Inverse of :meth:`to_model`: ``latent / scaling_factor``, or ``latent`` itself."""
        return latent if self.scaling_factor is None else latent / self.scaling_factor

    # -- frames

    @property
    def frame_rule(self) -> str:
        """The valid frame counts as text, e.g. ``"4k+1"``."""
        return f"{self.temporal_factor}k+1"

    def valid_frames(self, n: int) -> bool:
        """Whether ``n`` video frames make whole latent frames: an integer ``n = temporal_factor·k + 1``, k ≥ 0."""
        n = _as_int(n)
        return n is not None and n >= 1 and (n - 1) % self.temporal_factor == 0

    def nearest_frames(self, n: int) -> tuple[int, int]:
        """The valid frame counts around ``n``: ``(lower, upper)`` with ``lower ≤ n ≤ upper`` (both ``n`` when
        ``n`` is valid; otherwise ``upper = lower + temporal_factor``).

        Raises:
            ValueError: ``n`` is not an integer ≥ 1.
        """
        value = _as_int(n)
        if value is None or value < 1:
            raise ValueError(f"frame count must be an integer ≥ 1, got {n!r}")
        t = self.temporal_factor
        lower = (value - 1) // t * t + 1
        return (lower, lower) if lower == value else (lower, lower + t)

    def latent_frames(self, frames: int) -> int:
        """Latent frames ``F' = (frames − 1)/temporal_factor + 1`` of a valid frame count.

        Raises:
            ValueError: ``frames`` is not valid (names the nearest valid counts).
        """
        self._check_frames(frames)
        return (frames - 1) // self.temporal_factor + 1

    def pixel_frames(self, latent_frames: int) -> int:
        """Video frames ``temporal_factor·(F' − 1) + 1`` a latent of ``latent_frames`` frames decodes to.

        Raises:
            ValueError: ``latent_frames`` is not an integer ≥ 1.
        """
        value = _as_int(latent_frames)
        if value is None or value < 1:
            raise ValueError(f"latent frame count must be an integer ≥ 1, got {latent_frames!r}")
        return self.temporal_factor * (value - 1) + 1

    def _check_frames(self, frames: int) -> None:
        problem = self._frame_problem(frames)
        if problem:
            raise ValueError(problem)

    def _frame_problem(self, frames) -> str | None:
        value = _as_int(frames)
        t = self.temporal_factor
        if value is None:
            return f"frames must be an integer, got {frames!r}"
        if value < 1:
            return f"frames {value} is too small: use 1 (an image) or {t}k+1 such as {t + 1}, {2 * t + 1}, {4 * t + 1}"
        if not self.valid_frames(value):
            lower, upper = self.nearest_frames(value)
            return f"frames {value} is not of the form {self.frame_rule}: use {lower} or {upper}"
        return None

    # -- sizes

    def size_problems(self, width: int, height: int, frames: int, *, size_multiple: int | None = None,
                      reason: str = "") -> list[str]:
        """Every reason why ``width × height`` pixels and ``frames`` frames cannot be encoded, as sentences naming
        the nearest valid values (``"width 500 is not a multiple of 16: use 496 or 512"``,
        ``"frames 10 is not of the form 4k+1: use 9 or 13"``); empty when the size is valid.

        Args:
            width, height: pixels; positive multiples of the size multiple.
            frames: video frames, ``temporal_factor·k + 1``.
            size_multiple: a coarser pixel grid a mode of the family needs (a multiple of :attr:`size_multiple`);
                None = :attr:`size_multiple`.
            reason: why the coarser grid is needed, added in parentheses to the size problems.

        Raises:
            ValueError: ``size_multiple`` is not a positive multiple of :attr:`size_multiple`.
        """
        multiple = self._grid(size_multiple)
        why = f" ({reason})" if reason else ""
        problems = []
        for name, value in (("width", width), ("height", height)):
            side = _as_int(value)
            if side is None:
                problems.append(f"{name} must be an integer, got {value!r}")
            elif side < multiple:
                problems.append(f"{name} {side} is too small: use {multiple} or more{why}")
            elif side % multiple:
                lower = side // multiple * multiple
                problems.append(f"{name} {side} is not a multiple of {multiple}{why}: use {lower} or "
                                f"{lower + multiple}")
        frame_problem = self._frame_problem(frames)
        if frame_problem:
            problems.append(frame_problem)
        return problems

    def check_size(self, width: int, height: int, frames: int, *, size_multiple: int | None = None,
                   reason: str = "") -> None:
        """Check a pixel size and frame count (see :meth:`size_problems` for the arguments).

        Raises:
            ValueError: listing every problem, each with the nearest valid values.
        """
        problems = self.size_problems(width, height, frames, size_multiple=size_multiple, reason=reason)
        if problems:
            raise ValueError("; ".join(problems))

    def _grid(self, size_multiple: int | None) -> int:
        if size_multiple is None:
            return self.size_multiple
        value = _as_int(size_multiple)
        if value is None or value < 1 or value % self.size_multiple:
            raise ValueError(f"size_multiple must be a positive multiple of {self.size_multiple} px for latent format "
                             f"{self.name!r}, got {size_multiple!r}")
        return value

    def latent_shape(self, width: int, height: int, frames: int) -> tuple[int, int, int, int]:
        """``(C, F', H', W')`` of the latent of a ``width × height`` video of ``frames`` frames.

        Raises:
            ValueError: the size is not valid (:meth:`check_size`).
        """
        self.check_size(width, height, frames)
        s = self.spatial_factor
        return self.channels, (frames - 1) // self.temporal_factor + 1, height // s, width // s

    # -- audio

    def audio_latent_length(self, seconds: float) -> int:
        """Audio latent steps for ``seconds`` of audio (:meth:`AudioLatentFormat.latent_length`).

        Raises:
            ValueError: the format has no audio, or ``seconds`` is negative or not finite.
        """
        if self.audio is None:
            raise ValueError(f"latent format {self.name!r} has no audio latents")
        return self.audio.latent_length(seconds)


# ----------------------------------------------------------------------------------------------- LoRA key grammar


@dataclass(frozen=True)
class LoRAKeyGrammar:
    """How the module paths of a family's LoRA layers look.

    Attributes:
        pattern: regular expression found (``re.search``) in the module paths or LoRA keys of the family, written
            with ``[._]`` separators so that kohya names (``_`` for ``.``) match too; it names the family in error
            messages about foreign LoRAs.
        kohya: regular expression matched against the whole body of a kohya name (the key without ``lora_unet_``
            and the ``.lora_down.weight``-like suffix); its groups that took part in the match, joined with ``.``,
            are the module path (an optional group such as ``to_out(?:_(0))?`` gives ``to_out.0``). None = kohya
            names of this family resolve only against the model's module names.
        block_index: regular expression with a group ``index`` (a block number) and optionally a group ``kind``
            (which block stack), found in names to report the highest block of each kind; None = not reported.
        block_kinds: the values of the ``kind`` group, in the order they are reported.
        block_counts: how many blocks the family's models have, appended to the report (e.g.
            ``"the small model has 2 text / 32 visual blocks, the large one 4 / 60"``).
        diffusers_to_official: maps a module path in the naming of the family's diffusers port (the names in LoRA
            files with the ``transformer.`` prefix that diffusers writes) to the family's own module path, e.g.
            ``"proj_in"`` → ``"patchify_proj"``; it must return the family's own paths unchanged, because files
            without a prefix may use either naming. None = the diffusers names are the family's own.

    Raises:
        ValueError: a pattern that does not compile, or a ``block_index`` without an ``index`` group.
        TypeError: ``diffusers_to_official`` is neither None nor callable.
    """

    pattern: str
    kohya: str | None = None
    block_index: str | None = None
    block_kinds: tuple[str, ...] = ()
    block_counts: str = ""
    diffusers_to_official: Callable[[str], str] | None = None
    _compiled: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        compiled = []
        for attr in ("pattern", "kohya", "block_index"):
            text = getattr(self, attr)
            try:
                compiled.append(None if text is None else re.compile(text))
            except (re.error, TypeError) as e:
                raise ValueError(f"LoRAKeyGrammar: {attr} {text!r} is not a regular expression ({e})") from e
        if compiled[2] is not None and "index" not in compiled[2].groupindex:
            raise ValueError(f"LoRAKeyGrammar: block_index {self.block_index!r} needs a group named 'index'")
        if self.diffusers_to_official is not None and not callable(self.diffusers_to_official):
            raise TypeError("LoRAKeyGrammar: diffusers_to_official must be a function str → str or None, got "
                            f"{type(self.diffusers_to_official).__name__}")
        object.__setattr__(self, "block_kinds", tuple(self.block_kinds))
        object.__setattr__(self, "_compiled", tuple(compiled))

    def matches(self, name: str) -> bool:
        """Whether a module path or LoRA key looks like one of this family's."""
        return self._compiled[0].search(name) is not None

    def resolve_kohya(self, body: str) -> str | None:
        """The module path of a kohya name body (``"visual_blocks_0_self_attn_to_q"`` →
        ``"visual_blocks.0.self_attn.to_q"``), or None when it is not one of this family's."""
        if self._compiled[1] is None:
            return None
        m = self._compiled[1].fullmatch(body)
        return ".".join(g for g in m.groups() if g is not None) if m else None

    def official_path(self, path: str) -> str:
        """The family's own module path of ``path``, which may be in the naming of its diffusers port
        (:attr:`diffusers_to_official`; unchanged when there is no converter).

        Raises:
            TypeError: the converter did not return a string.
        """
        if self.diffusers_to_official is None:
            return path
        out = self.diffusers_to_official(path)
        if not isinstance(out, str):
            raise TypeError(f"LoRAKeyGrammar.diffusers_to_official returned {type(out).__name__} for {path!r}, "
                            "not a module path")
        return out

    def describe_blocks(self, names: Iterable[str]) -> str:
        """``"highest text block 3, visual block 59; <block_counts>"`` for the given names (−1 for a kind that
        does not occur); ``block_counts`` alone, or "", when there is no ``block_index``."""
        if self._compiled[2] is None:
            return self.block_counts
        kinds = self.block_kinds or ("",)
        highest = dict.fromkeys(kinds, -1)
        for name in names:
            for m in self._compiled[2].finditer(name):
                kind = m.groupdict().get("kind") or ""
                if kind in highest:
                    highest[kind] = max(highest[kind], int(m["index"]))
        parts = ", ".join(f"{kind} block {n}".lstrip() for kind, n in highest.items())
        return f"highest {parts}" + (f"; {self.block_counts}" if self.block_counts else "")


@dataclass(frozen=True)
class ModelFamily:
    """Everything the shared code needs to know about one model family.

    Attributes:
        name: short id (lowercase, dashes), also written as ``modelspec.architecture`` into saved LoRAs.
        display_name: name shown to people.
        latent_format: the :class:`LatentFormat` of its VAE.
        lora_targets: module-name suffixes of the Linear layers its LoRAs train (PEFT-style suffix match).
        lora_within: module-name prefixes the targets must live under (the block stacks); None = anywhere.
        lora_grammar: the :class:`LoRAKeyGrammar` of its module paths.

    Raises:
        ValueError: empty name, display name or targets. TypeError: wrong object types.
    """

    name: str
    display_name: str
    latent_format: LatentFormat
    lora_targets: tuple[str, ...]
    lora_within: tuple[str, ...] | None
    lora_grammar: LoRAKeyGrammar

    def __post_init__(self) -> None:
        for attr in ("name", "display_name"):
            if not isinstance(getattr(self, attr), str) or not getattr(self, attr):
                raise ValueError(f"ModelFamily: {attr} must be a non-empty string, got {getattr(self, attr)!r}")
        if not isinstance(self.latent_format, LatentFormat):
            raise TypeError(f"ModelFamily {self.name!r}: latent_format must be a LatentFormat")
        if not isinstance(self.lora_grammar, LoRAKeyGrammar):
            raise TypeError(f"ModelFamily {self.name!r}: lora_grammar must be a LoRAKeyGrammar")
        targets = (self.lora_targets,) if isinstance(self.lora_targets, str) else tuple(self.lora_targets)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"ModelFamily {self.name!r}: lora_targets must be non-empty module-name suffixes")
        object.__setattr__(self, "lora_targets", targets)
        if self.lora_within is not None:
            within = (self.lora_within,) if isinstance(self.lora_within, str) else tuple(self.lora_within)
            object.__setattr__(self, "lora_within", within)

    def describe(self, names: Iterable[str]) -> str:
        """Display name plus the block report of :meth:`LoRAKeyGrammar.describe_blocks`, e.g. ``"<display name>
        (highest text block 3, visual block 59; <block_counts>)"``."""
        blocks = self.lora_grammar.describe_blocks(names)
        return f"{self.display_name} ({blocks})" if blocks else self.display_name


# ------------------------------------------------------------------------------------------------------ registry

_FAMILIES: dict[str, ModelFamily] = {}

# Models this pack does not run, recognised only to name them in messages about foreign LoRAs; checked after the
# registered families. "." or "_" separators, so kohya names are recognised too.
_OTHER_MODELS = (
    (re.compile(r"(^|[._])blocks[._]\d+[._](self_attn|cross_attn|ffn)"), "Wan 2.x"),
    (re.compile(r"(double_blocks|single_blocks|single_transformer_blocks)[._]\d+"), "Flux / HunyuanVideo"),
    (re.compile(r"(input_blocks|output_blocks|down_blocks|up_blocks|mid_block)"), "a Stable Diffusion UNet"),
    (re.compile(r"(lora_te\d?_|text_model|text_encoder)"), "a text encoder"),
)


def register_family(family: ModelFamily) -> ModelFamily:
    """Make a family known to the shared code (called once by the family's package on import).

    A family registered again under the same name replaces the earlier entry and keeps its place in the order.

    Returns:
        ``family``.

    Raises:
        TypeError: not a :class:`ModelFamily`.
    """
    if not isinstance(family, ModelFamily):
        raise TypeError(f"register_family takes a ModelFamily, got {type(family).__name__}")
    _FAMILIES[family.name] = family
    return family


def registered_families() -> tuple[ModelFamily, ...]:
    """The registered families in registration order."""
    return tuple(_FAMILIES.values())


def get_family(name: str) -> ModelFamily:
    """The registered family called ``name``.

    Raises:
        LookupError: no family of that name is registered; the message lists the registered ones.
    """
    found = _FAMILIES.get(name)
    if found is None:
        known = ", ".join(_FAMILIES) or "none"
        raise LookupError(f"no model family {name!r} is registered (registered: {known}); import the family's "
                          "package first, which registers it")
    return found


def _winner(names: list[str]) -> ModelFamily | str | None:
    """The family (or the name of an other model) most names belong to; the first one on ties; None if none."""
    votes: Counter = Counter()
    for name in names:
        owner = next((f for f in _FAMILIES.values() if f.lora_grammar.matches(name)), None)
        if owner is None:
            owner = next((label for pattern, label in _OTHER_MODELS if pattern.search(name)), None)
        if owner is not None:
            votes[owner] += 1
    return votes.most_common(1)[0][0] if votes else None


def guess_family(names: Iterable[str]) -> ModelFamily | None:
    """The registered family most of ``names`` (module paths or LoRA keys, dotted or kohya) belong to, or None
    when they look like no registered family (or like a model this pack does not run)."""
    winner = _winner(list(names))
    return winner if isinstance(winner, ModelFamily) else None


def guess_model_family(names: Iterable[str]) -> str:
    """Name the model a set of module paths or LoRA keys belongs to, for error messages.

    Returns:
        :meth:`ModelFamily.describe` of the registered family most names belong to (e.g. ``"<display name> (highest
        text block 3, visual block 59; …)"``), else the name of a known model this pack does not run (e.g.
        ``"Wan 2.x"``), else ``"an unknown model"``.
    """
    names = list(names)
    winner = _winner(names)
    if winner is None:
        return "an unknown model"
    return winner.describe(names) if isinstance(winner, ModelFamily) else winner

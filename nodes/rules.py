"""Queue-time rules of the nodes: what can be checked from a prompt's widget values and links alone, checked when
the prompt is queued, so the error is shown on the node before any model loads.

Two kinds, both raising ``ValueError`` with the problem as a sentence that names the nearest valid values:

- **per-input rules** for a node's ``INPUT_RULES`` (``input id → callable(value)``, run by
  :class:`~cinetune.nodes.checks.CinetuneNode`): :class:`FrameCount`, :func:`attention_backend`;
- **node rules** (:class:`NodeRule`) for rules over several inputs: a size and frame count of a family, the sampling
  settings of a mode, an input that needs another one connected. A node lists them in ``NODE_RULES`` and takes
  :class:`NodeRules` first among its bases.

:func:`i2v_single_frames` checks the image-to-video clip rule again on the cached samples when a trainer runs (a
cacher's frames do not say whether its dataset holds only photos).

The checks are the library's own (``validate_video_size``, ``LatentFormat.check_size``, ``SamplingRequest.check``),
so a value is refused at queue time exactly when the node would refuse it later. A rule is skipped while one of its
widget values arrives through a link (unknown until the graph runs); the node checks it again when it runs.

This module imports no ComfyUI module, so the rules are tested without a server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

from ..core.attention import AttentionBackendError, check_backend
from ..core.family import LatentFormat
from ..k5.family import K5_LATENT_FORMAT
from ..k5.pipeline import validate_video_size
from ..ltx2.family import LTX2_LATENT_FORMAT
from ..ltx2.pipeline import SamplingRequest
from ..training.config import TrainConfig, TrainingError

__all__ = ["FrameCount", "NodeRule", "NodeRules", "attention_backend", "node_rules_problem", "rule_problem",
           "K5_VIDEO_SIZE", "K5_START_IMAGE_SIZE", "LTX2_VIDEO_SIZE", "LTX2_SAMPLING", "LTX2_SAMPLER_LINKS",
           "LTX2_I2V_CLIP", "K5_I2V_CLIP", "i2v_single_frames"]


# ---------------------------------------------------------------------------------------------- per-input rules


@dataclass(frozen=True)
class FrameCount:
    """Input rule for a frame count: valid for the family's frame rule (``LatentFormat.latent_frames``: K5 ``4k+1``,
    LTX-2 ``8k+1``).

    Raises (when called):
        ValueError: e.g. ``"frames 50 is not of the form 4k+1: use 49 or 53"``.
    """

    latent_format: LatentFormat

    def __call__(self, value: Any) -> None:
        self.latent_format.latent_frames(value)


def attention_backend(value: Any) -> None:
    """Input rule for an attention kernel name: known and importable here (``core.attention.check_backend``).

    Raises:
        ValueError: unknown, not installed (with the ``pip install`` command) or failing to import.
    """
    try:
        check_backend(value)
    except AttentionBackendError as e:
        raise ValueError(str(e)) from None


# ---------------------------------------------------------------------------------------------- node rules


@dataclass(frozen=True)
class NodeRule:
    """A rule over several inputs of one node.

    Attributes:
        inputs: widget inputs the rule reads, passed to ``check`` by name (the node's default where a prompt leaves
            one out; the rule is skipped while one arrives through a link).
        check: ``check(**settings)`` raising ``ValueError`` with the problem.
        sockets: inputs passed to ``check`` as ``True`` when connected (given in the prompt, through a link), else
            ``False``.
    """

    inputs: tuple[str, ...]
    check: Callable[..., None]
    sockets: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """Every input the rule reads, widgets first."""
        return self.inputs + self.sockets


def rule_problem(rule: NodeRule, values: Mapping[str, Any], defaults: Mapping[str, Any]) -> str | None:
    """What ``rule`` finds wrong with a queued node, or None (also when a widget it reads arrives through a link).

    Args:
        rule: the rule.
        values: the node's inputs as ComfyUI hands them to ``validate_inputs``: a widget's value, None for an input
            fed by a link; inputs the prompt leaves out are absent.
        defaults: input id → the node's default, for widgets the prompt leaves out (older saved prompts).
    """
    settings = {}
    for name in rule.inputs:
        value = values[name] if name in values else defaults.get(name)
        if value is None:
            return None
        settings[name] = value
    settings.update({name: name in values for name in rule.sockets})
    try:
        rule.check(**settings)
    except (ValueError, TypeError) as e:
        return str(e)
    return None


def node_rules_problem(node: type, values: Mapping[str, Any], rules: tuple[NodeRule, ...]) -> str | None:
    """The first problem ``rules`` find with a queued node, naming the node and the inputs as the per-input checks
    do (``"LTX-2 Sampler, inputs 'width', …: …"``), or None.

    Args:
        node: the node class (its ``define_schema()`` gives the display name and the defaults).
        values: as :func:`rule_problem`.
        rules: the node's rules, in order.
    """
    schema = node.define_schema()
    defaults = {spec.id: getattr(spec, "default", None) for spec in schema.inputs}
    for rule in rules:
        problem = rule_problem(rule, values, defaults)
        if problem is not None:
            names = ", ".join(f"'{name}'" for name in rule.names)
            return f"{schema.display_name}, input{'s' if len(rule.names) > 1 else ''} {names}: {problem}"
    return None


class NodeRules:
    """Mixin for a Cinetune node with :class:`NodeRule`\\ s: after the per-input checks of
    :class:`~cinetune.nodes.checks.CinetuneNode`, ``validate_inputs`` runs the node's ``NODE_RULES``.
    Put it first among the bases: ``class K5Sampler(NodeRules, CinetuneNode)``."""

    NODE_RULES: ClassVar[tuple[NodeRule, ...]] = ()

    @classmethod
    def validate_inputs(cls, **values) -> bool:
        """Raises InputError: a per-input check or a node rule fails (:func:`node_rules_problem`)."""
        super().validate_inputs(**values)
        problem = node_rules_problem(cls, values, cls.NODE_RULES)
        if problem is not None:
            from .checks import InputError  # imports the host's API, which this module must not need

            raise InputError(problem)
        return True


# ---------------------------------------------------------------------------------------------- the families' rules


def _k5_video_size(width: int, height: int, frames: int) -> None:
    validate_video_size(width, height, frames, nabla=False)


def _k5_start_image_size(width: int, height: int) -> None:
    validate_video_size(width, height, 1, nabla=False)


def _ltx2_video_size(width: int, height: int, frames: int) -> None:
    LTX2_LATENT_FORMAT.check_size(width, height, frames)


def _ltx2_sampling(width: int, height: int, frames: int, fps: float, steps: int, mode: str) -> None:
    SamplingRequest(width=width, height=height, frames=frames, fps=fps, steps=steps, mode=mode).check()


def _ltx2_sampler_links(mode: str, audio: bool, vae: bool, start_image: bool, video_latent: bool,
                        audio_latent: bool) -> None:
    if start_image and not vae:
        raise ValueError("a start image is encoded by the LTX-2 VAE: connect LTX-2 VAE Loader to 'vae', or "
                         "disconnect 'start_image'")
    if mode == "stage 2":
        if not video_latent:
            raise ValueError("mode 'stage 2' refines a first stage: connect the upsampled video latent (LTX-2 Latent "
                             "Upsample) to 'video_latent'")
        if audio and not audio_latent:
            raise ValueError("mode 'stage 2' re-noises and refines the first stage's audio as well: connect its "
                             "audio_latent, or turn 'audio' off")
    elif video_latent or audio_latent:
        raise ValueError("video_latent and audio_latent are inputs of mode 'stage 2': disconnect them or switch the "
                         "mode to 'stage 2'")


def _one_latent_frame(latent_format: LatentFormat, frames: int) -> bool:
    """Whether a clip of ``frames`` video frames makes one latent frame (the causal VAE encodes the first alone)."""
    return frames <= latent_format.temporal_factor


@dataclass(frozen=True)
class _I2VClip:
    """Image-to-video training conditions a clip on its first latent frame: a cacher's clips need two latent frames
    or more (``latent_format.pixel_frames(2)`` video frames: K5 5, LTX-2 9)."""

    latent_format: LatentFormat

    def __call__(self, frames: int, image_to_video: bool) -> None:
        if image_to_video and _one_latent_frame(self.latent_format, frames):
            raise ValueError("image_to_video conditions a clip on its first frame, so clips need more than one: set "
                             f"frames to {self.latent_format.pixel_frames(2)} or more")


def i2v_single_frames(config: TrainConfig, samples: list, latent_format: LatentFormat, *, cacher: str,
                      turn_off: str) -> str | None:
    """Check that image-to-video training has clips to condition. A sample of one latent frame (a photo, or a clip
    cached with frames 1) has no frame after its first, so the family adapters (``k5/train.py``, ``ltx2/train.py``)
    train it text-to-video.

    Args:
        config: the run's config; nothing is checked unless ``i2v`` is on with ``i2v_prob`` > 0.
        samples: the training samples (anything with ``frames``: video frames per clip, 1 for images).
        latent_format: the family's latent format; its frame rule (``temporal_factor·k + 1``) gives the smallest clip
            of two latent frames named in the error.
        cacher: the cache node's display name, e.g. ``"K5 Cache Latents"``.
        turn_off: how to turn image-to-video training off on the trainer, e.g. ``"set image_to_video to 'off'"``.
    Returns:
        None when image-to-video is off or no sample is a single latent frame; else the line
        ``"N of M samples are single frames and train text-to-video only"``.
    Raises:
        TrainingError: every sample is a single latent frame.
    """
    if config.i2v == "off" or config.i2v_prob <= 0:
        return None
    single = sum(1 for s in samples if _one_latent_frame(latent_format, int(s.frames)))
    if single and single == len(samples):
        shortest = latent_format.pixel_frames(2)
        raise TrainingError("image-to-video training conditions a clip on its first frame, but every training clip "
                            "is a single frame (images, or clips cached with frames 1): add videos and cache clips of "
                            f"{shortest} frames or more ({latent_format.frame_rule}) in {cacher}, or {turn_off}.")
    if single:
        return f"{single} of {len(samples)} samples are single frames and train text-to-video only"
    return None


#: Kandinsky 5 sampling size: sides multiples of 16 px, frames 4k+1 (NABLA's 128 px grid depends on the model and
#: is checked when the sampler runs).
K5_VIDEO_SIZE = NodeRule(("width", "height", "frames"), _k5_video_size)
#: Kandinsky 5 start image size: sides multiples of 16 px.
K5_START_IMAGE_SIZE = NodeRule(("width", "height"), _k5_start_image_size)
#: LTX-2 size: sides multiples of 32 px, frames 8k+1.
LTX2_VIDEO_SIZE = NodeRule(("width", "height", "frames"), _ltx2_video_size)
#: LTX-2 sampling settings of a mode (``SamplingRequest.check``: size, stage 2's 64 px grid, fps, dev steps ≥ 2).
LTX2_SAMPLING = NodeRule(("width", "height", "frames", "fps", "steps", "mode"), _ltx2_sampling)
#: LTX-2 sampler inputs a setting needs connected (or disconnected).
LTX2_SAMPLER_LINKS = NodeRule(("mode", "audio"), _ltx2_sampler_links,
                              sockets=("vae", "start_image", "video_latent", "audio_latent"))
#: LTX-2 image-to-video training needs clips of more than one frame (9 or more).
LTX2_I2V_CLIP = NodeRule(("frames", "image_to_video"), _I2VClip(LTX2_LATENT_FORMAT))
#: Kandinsky 5 image-to-video training needs clips of more than one frame (5 or more).
K5_I2V_CLIP = NodeRule(("frames", "image_to_video"), _I2VClip(K5_LATENT_FORMAT))

"""What every trainer node shares, for any model family: where a run lives, the checks before a run starts,
reusing a finished run, installing its LoRA where the host's LoRA loaders look, validation clips (when they are due,
where they are written, how they are muxed).

::

    run_dir = run_directory(output_dir, "my_lora")                 # <output>/cinetune/runs/my_lora
    plan = ValidationPlan.parse(every=250, steps="100, 1000")
    result = finished_run(run_dir, config, metadata) or train_lora(
        ..., validate=plan.validator(render, run_dir), validate_every=plan.cadence)
    install_lora(result.lora_path, loras_dir, "my_lora")           # <loras>/my_lora.safetensors

Decisions:

- **Finished runs are reused**, not retrained or refused, when the run folder's ``lora.safetensors`` is complete and
  was trained with exactly the same :meth:`~cinetune.training.config.TrainConfig.to_dict` on the same dataset
  (``dataset_hash`` metadata): a host that dropped the trainer's cached output can run an unchanged workflow again.
  Any difference goes through the loop's new-run / resume rules.
- **Installing never overwrites a file another run (or a person) wrote**: the destination is replaced only when its
  ``cinetune.run`` metadata names this run (:func:`written_by_another_run`). The trainer node applies the same rule
  before the first step (:func:`check_install_targets`), so a name collision is refused before hours of training.
- **Validation steps**: a clip is due at every multiple of ``every`` and at each listed step. The loop is asked to
  call back every ``gcd`` of those numbers (:attr:`ValidationPlan.cadence`) and the callback skips the steps that
  are not due, so the loop keeps one ``validate_every``. ``at_start`` adds step 0: the model before the first
  update (the base model, or the LoRA the run starts from), rendered by the caller before the loop when a run
  starts fresh (:meth:`ValidationPlan.start`), never again on resume.
- Validation clips are ``<run>/validation/step_NNNNNN.mp4`` (H.264, with an AAC track when the clip has sound); with
  several prompts ``step_NNNNNN_pK.mp4`` for prompt K (1-based, in chain order).
- The values of the settings nodes and the validation prompts live in :mod:`cinetune.training.settings` (their
  names are importable from here too).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..core.checkpoint import atomic_path, read_safetensors_header
from ..core.media import write_video
from .checkpointing import LORA_FILE
from .config import TrainConfig, TrainingError, TrainResult
from .ema import EMA_LORA_FILE
from .settings import (SAVE_DTYPES, CheckpointSettings, LoRASettings, OptimizerSettings, SamplingSettings,
                       ValidationPrompt, ValidationPrompts, checked_settings, config_overrides)

__all__ = ["RUNS_FOLDER", "VALIDATION_FOLDER", "run_directory", "finished_run", "lora_destination",
           "written_by_another_run", "check_install_targets", "install_lora", "install_partial_lora",
           "check_base_model", "check_blocks_to_swap", "check_bucket_step", "check_i2v_cache", "check_audio_cache",
           "ValidationClip", "ValidationPlan", "validation_path", "write_validation", "write_validations",
           "latest_validation", "latest_validations",
           # settings values, re-exported from .settings
           "ValidationPrompt", "ValidationPrompts", "SAVE_DTYPES", "checked_settings", "OptimizerSettings",
           "LoRASettings", "SamplingSettings", "CheckpointSettings", "config_overrides"]

#: Run folders live in ``<output>/cinetune/runs/<name>``.
RUNS_FOLDER = ("cinetune", "runs")
#: Validation clips of a run live in ``<run>/validation``.
VALIDATION_FOLDER = "validation"


def run_directory(output_dir: str | Path, name: str) -> Path:
    """``<output_dir>/cinetune/runs/<name>`` (``name`` must already be checked as one file name).

    Raises:
        TrainingError: that path, or a folder on the way to it below ``output_dir``, is a file (nothing is written;
            the message names ``output_name`` and the fix).
    """
    path = Path(output_dir).joinpath(*RUNS_FOLDER, name)
    for folder in (*reversed(path.parents[:len(RUNS_FOLDER)]), path):
        if folder.exists() and not folder.is_dir():
            raise TrainingError(f"output_name '{name}': the run folder {path} cannot be made because {folder} is a "
                                "file, not a folder; pick another output_name, or move/delete the file.")
    return path


def finished_run(run_dir: str | Path, config: TrainConfig, metadata: Mapping[str, Any]) -> TrainResult | None:
    """The result of a complete run in ``run_dir`` trained with exactly ``config`` on the same dataset, else None.

    Args:
        run_dir: the run folder. config: the settings of the run about to start.
        metadata: the LoRA metadata the run is about to write; its ``dataset_hash`` must equal the finished run's.

    Returns:
        The result, with the run's EMA LoRA when ``config`` keeps one and the file is there.
    """
    lora = Path(run_dir) / LORA_FILE
    if not lora.is_file():
        return None
    meta = read_safetensors_header(lora)[1]
    same = (meta.get("cinetune.complete") == "true" and meta.get("dataset_hash") == metadata.get("dataset_hash")
            and meta.get("cinetune.training") == json.dumps(config.to_dict(), sort_keys=True))
    if not same:
        return None
    ema = Path(run_dir) / EMA_LORA_FILE
    return TrainResult(lora, int(meta.get("cinetune.steps", 0)),
                       ema_lora_path=ema if config.ema_decay and ema.is_file() else None)


def lora_destination(loras_dir: str | Path, name: str) -> Path:
    """Where a LoRA named ``name`` is installed: ``<loras_dir>/<name>.safetensors``."""
    return Path(loras_dir) / f"{name}.safetensors"


def written_by_another_run(dest: str | Path, run: str) -> bool:
    """The install rule: whether ``dest`` exists and was not written by the run ``run``, so it must not be replaced.

    A file counts as written by ``run`` when its ``cinetune.run`` metadata names it; a file whose safetensors header
    cannot be read (not a safetensors file, a damaged one, a folder) counts as written by someone else.
    """
    dest = Path(dest)
    if not dest.exists():
        return False
    try:
        return read_safetensors_header(dest)[1].get("cinetune.run") != run
    except (ValueError, OSError):  # CheckpointError is a ValueError
        return True


def check_install_targets(loras_dir: str | Path, names: Iterable[str], run: str) -> None:
    """Before a run starts: refuse it when :func:`install_lora` would refuse to install one of its LoRAs at the end
    (:func:`written_by_another_run`), so no training time is spent first.

    Args:
        loras_dir: the host's LoRA folder. names: the names the run installs (``"my_lora"``, and ``"my_lora_ema"``
            when it keeps an EMA LoRA). run: the run's name (its ``output_name`` and ``cinetune.run``).

    Raises:
        TrainingError: a destination exists and was not written by ``run`` (names ``output_name``, the file and the
            fix).
    """
    for name in names:
        dest = lora_destination(loras_dir, name)
        if written_by_another_run(dest, run):
            raise TrainingError(f"output_name '{run}': {dest} exists and was not written by this run, so the trained "
                                "LoRA could not be installed there; pick another output_name, or move/delete the file.")


def install_lora(lora_path: str | Path, loras_dir: str | Path, name: str, *, run: str | None = None) -> Path:
    """Copy a finished LoRA atomically to ``<loras_dir>/<name>.safetensors`` and return that path.

    Args:
        run: the run that wrote the file (its ``cinetune.run`` metadata); None = ``name`` (e.g. the EMA LoRA of run
            ``x`` is installed as ``x_ema`` with ``run="x"``).

    Raises:
        FileExistsError: the destination exists and was not written by the run (:func:`written_by_another_run`; it
            is left untouched; the message says where this run's LoRA is).
    """
    dest = lora_destination(loras_dir, name)
    if written_by_another_run(dest, run or name):
        raise FileExistsError(f"{dest} exists and was not written by the run '{run or name}'; it is left untouched. "
                              f"Pick another output_name; this run's LoRA is in {lora_path}.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        shutil.copyfile(lora_path, tmp)
    return dest


def install_partial_lora(run_dir: str | Path, loras_dir: str | Path, name: str, *,
                         since_ns: int | None = None) -> Path | None:
    """Install the LoRA an interrupted run left (``run_dir/lora.safetensors``, written by the trainer at the
    interruption with metadata ``cinetune.complete = "false"``) as ``<loras_dir>/<name>_step<k>.safetensors``, k
    being its optimizer steps, so the host's LoRA loaders list it (:func:`install_lora`'s rules).

    Args:
        run_dir: the run folder. loras_dir: the host's LoRA folder. name: the run's name (its ``cinetune.run``).
        since_ns: only a file modified at or after this time (``time.time_ns()`` taken before the run started) is
            installed, so a file an earlier execution left is not installed again; None takes any.

    Returns:
        The installed path, or None when the run left no partial LoRA (no file, a complete one, one of another
        run, one older than ``since_ns``, or one of 0 steps).

    Raises:
        FileExistsError: the destination exists and was not written by this run (it is left untouched).
    """
    lora = Path(run_dir) / LORA_FILE
    try:
        if since_ns is not None and lora.stat().st_mtime_ns < since_ns:
            return None
        meta = read_safetensors_header(lora)[1]
    except (OSError, ValueError):
        return None
    steps = meta.get("cinetune.steps", "")
    if meta.get("cinetune.complete") != "false" or meta.get("cinetune.run") != name or not steps.isdigit() \
            or int(steps) < 1:
        return None
    return install_lora(lora, loras_dir, f"{name}_step{int(steps)}", run=name)


# ---------------------------------------------------------------------------------------------------------------
# Checks before a run


def check_base_model(loras: Iterable[Any], *, lora_loader: str, model_loader: str, trainer: str) -> None:
    """Refuse a model that has LoRAs applied: training starts from the base weights.

    Raises:
        TrainingError: ``loras`` is not empty (names the nodes to connect directly).
    """
    if tuple(loras):
        raise TrainingError(f"the model has LoRAs applied ({lora_loader}); training starts from the base model, so "
                            f"connect the {model_loader} directly to {trainer}.")


def check_blocks_to_swap(blocks_to_swap: int, total: int, model_name: str) -> None:
    """Raise :class:`TrainingError` when more blocks are to be swapped than the model has."""
    if blocks_to_swap > total:
        raise TrainingError(f"blocks_to_swap={blocks_to_swap} is more than the {total} transformer blocks of "
                            f"{model_name}: use at most {total}.")


def check_bucket_step(bucket_step: int, multiple: int, *, attention: str, widget: str, cacher: str) -> None:
    """Refuse cached buckets whose sides are not multiples of what the model's sparse attention needs.

    Args:
        bucket_step: the side step of the cached buckets (px). multiple: what the attention needs (px).
        attention: its name for the message (``"NABLA"``). widget: the switch that sets it on the cacher and the
            loader (``"nabla"``). cacher: the cache node's name.

    Raises:
        TrainingError: ``bucket_step`` is not a multiple of ``multiple``.
    """
    if bucket_step % multiple:
        raise TrainingError(f"this model runs {attention} attention, which needs {multiple} px buckets: turn on "
                            f"'{widget}' in {cacher}, or load the model with {widget} 'off'.")


def check_i2v_cache(mode: str, cached: bool, *, cacher: str) -> None:
    """Refuse image-to-video training (``mode`` ≠ ``"off"``) on a cache without first/last-frame latents.

    Raises:
        TrainingError: naming the cacher switch to turn on.
    """
    if mode != "off" and not cached:
        raise TrainingError(f"image_to_video training needs first/last frame latents: turn on 'image_to_video' in "
                            f"{cacher} and run it again.")


def check_audio_cache(with_audio: bool, cached: bool, *, cacher: str) -> None:
    """Refuse audio+video training on a cache without sound latents.

    Raises:
        TrainingError: naming the cacher switch to turn on.
    """
    if with_audio and not cached:
        raise TrainingError(f"training the sound needs audio latents: turn on 'audio' in {cacher} and run it again, "
                            "or turn audio off to train the video only.")


# ---------------------------------------------------------------------------------------------------------------
# Validation


@dataclass
class ValidationClip:
    """A validation sample ready to be written.

    Attributes:
        frames: ``[F, H, W, 3]`` float in 0..1 (ComfyUI IMAGE layout). fps: frames per second.
        audio: optional waveform ``[C, S]`` float in -1..1; sample_rate: its rate in Hz (required with audio).
    """

    frames: Tensor
    fps: float = 24.0
    audio: Tensor | None = None
    sample_rate: int | None = None


_CLIP_NAME = re.compile(r"step_(\d+)(?:_p(\d+))?\.mp4")


def validation_path(run_dir: str | Path, step: int, prompt: int | None = None) -> Path:
    """``<run_dir>/validation/step_NNNNNN.mp4``, or ``step_NNNNNN_pK.mp4`` for prompt index ``prompt`` (0-based;
    K = prompt + 1) of a run with several validation prompts."""
    suffix = "" if prompt is None else f"_p{prompt + 1}"
    return Path(run_dir) / VALIDATION_FOLDER / f"step_{step:06d}{suffix}.mp4"


def write_validation(clip: ValidationClip, path: str | Path) -> Path:
    """Write ``clip`` as an mp4 (H.264; AAC when it has sound) atomically (:func:`cinetune.core.media.write_video`).

    Raises:
        MediaError: bad frames, audio or rates.
    """
    sound = {} if clip.audio is None else dict(audio=clip.audio, audio_sample_rate=clip.sample_rate)
    return write_video(clip.frames, path, fps=clip.fps, **sound)


def write_validations(clips: ValidationClip | Sequence[ValidationClip], run_dir: str | Path,
                      step: int) -> list[Path]:
    """Write the clips of one validation step (:func:`validation_path`: one clip keeps the plain name) and return
    their paths in prompt order.

    Raises:
        MediaError: bad frames, audio or rates.
    """
    clips = [clips] if isinstance(clips, ValidationClip) else list(clips)
    if len(clips) == 1:
        return [write_validation(clips[0], validation_path(run_dir, step))]
    return [write_validation(c, validation_path(run_dir, step, i)) for i, c in enumerate(clips)]


def _clips(run_dir: str | Path) -> list[tuple[int, int, Path]]:
    """``(step, prompt number (0 for a plain name), path)`` of every validation clip, sorted."""
    found = []
    for path in (Path(run_dir) / VALIDATION_FOLDER).glob("step_*.mp4"):
        match = _CLIP_NAME.fullmatch(path.name)
        if match:
            found.append((int(match[1]), int(match[2] or 0), path))
    return sorted(found)


def latest_validation(run_dir: str | Path) -> Path | None:
    """The run's newest validation clip (highest step; of several prompts the last), or None."""
    clips = _clips(run_dir)
    return clips[-1][2] if clips else None


def latest_validations(run_dir: str | Path) -> list[Path]:
    """Every clip of the run's newest validation step, in prompt order (empty when there is none)."""
    clips = _clips(run_dir)
    return [path for step, _, path in clips if step == clips[-1][0]] if clips else []


_STEP_LIST = re.compile(r"[\s,;]+")

#: ``render(step, model)`` → one clip, or one clip per validation prompt.
Render = Callable[[int, nn.Module], "ValidationClip | Sequence[ValidationClip]"]


@dataclass(frozen=True)
class ValidationPlan:
    """When validation clips are made: every ``every`` steps (0 = never), at the listed ``steps``, and at step 0
    when ``at_start`` (module notes).

    Raises:
        TrainingError: ``every`` < 0 or a listed step < 1.
    """

    every: int = 0
    steps: tuple[int, ...] = ()
    at_start: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 0:
            raise TrainingError(f"validate_every must be an integer ≥ 0 (0 = off); got {self.every!r}.")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.steps):
            raise TrainingError(f"validation steps must be step numbers ≥ 1; got {list(self.steps)}.")
        object.__setattr__(self, "steps", tuple(sorted(set(self.steps))))
        object.__setattr__(self, "at_start", bool(self.at_start))

    @classmethod
    def parse(cls, every: int = 0, steps: str = "", at_start: bool = False) -> "ValidationPlan":
        """A plan from a widget's text of step numbers separated by commas or spaces (``"250, 1000"``; empty =
        none).

        Raises:
            TrainingError: a part that is not a whole number ≥ 1 (the message shows the expected form).
        """
        parts = [p for p in _STEP_LIST.split(str(steps).strip()) if p]
        bad = [p for p in parts if not p.isdigit() or int(p) < 1]
        if bad:
            raise TrainingError(f"validation steps must be step numbers ≥ 1 separated by commas, e.g. '250, 1000'; "
                                f"{bad[0]!r} is not one.")
        return cls(every, tuple(int(p) for p in parts), at_start)

    @property
    def active(self) -> bool:
        return bool(self.every or self.steps or self.at_start)

    @property
    def cadence(self) -> int:
        """The loop's ``validate_every``: the gcd of ``every`` and the listed steps (0 when no step after the
        start is due)."""
        return math.gcd(self.every, *self.steps)

    def due(self, step: int) -> bool:
        """Whether a clip is made after optimizer step ``step`` (0 = before the first)."""
        if step == 0:
            return self.at_start
        return bool(self.every and step % self.every == 0) or step in self.steps

    def check_within(self, max_steps: int) -> None:
        """Raise :class:`TrainingError` when a listed step comes after the run's last step ``max_steps``."""
        late = [s for s in self.steps if s > max_steps]
        if late:
            raise TrainingError(f"validation step {late[0]} comes after the last step ({max_steps}): list steps up "
                                f"to max_steps, or raise max_steps.")

    def validator(self, render: Render, run_dir: str | Path,
                  on_written: Callable[[int, Path], Any] | None = None) -> Callable[[int, nn.Module], None] | None:
        """The loop's ``validate`` callback: at due steps ``render(step, model)`` and write its clips
        (:func:`write_validations`), then ``on_written(step, path)`` per clip. None when no step after the start
        is due."""
        if not self.cadence:
            return None

        def validate(step: int, model: nn.Module) -> None:
            if self.due(step):
                for path in write_validations(render(step, model), run_dir, step):
                    if on_written is not None:
                        on_written(step, path)

        return validate

    def start(self, render: Render, run_dir: str | Path, model: nn.Module,
              on_written: Callable[[int, Path], Any] | None = None) -> list[Path]:
        """The step-0 clips when ``at_start`` (rendered under ``torch.no_grad`` with ``model`` in eval mode, its
        mode restored); call it only when a run starts fresh. Returns the written paths (empty when not due)."""
        if not self.at_start:
            return []
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                clips = render(0, model)
        finally:
            model.train(was_training)
        paths = write_validations(clips, run_dir, 0)
        for path in paths:
            if on_written is not None:
                on_written(0, path)
        return paths

"""What every trainer node shares, for any model family: where a run lives, the checks before a run starts,
reusing a finished run, installing its LoRA where the host's LoRA loaders look, validation clips (when they are due,
where they are written, how they are muxed) and the values of the training settings nodes (optimizer, LoRA, σ
sampling, checkpoints, validation prompts) with the :class:`~cinetune.training.config.TrainConfig` fields they set.

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
  ``cinetune.run`` metadata names this run.
- **Validation steps**: a clip is due at every multiple of ``every`` and at each listed step. The loop is asked to
  call back every ``gcd`` of those numbers (:attr:`ValidationPlan.cadence`) and the callback skips the steps that
  are not due, so the loop keeps one ``validate_every``. ``at_start`` adds step 0: the model before the first
  update (the base model, or the LoRA the run starts from), rendered by the caller before the loop when a run
  starts fresh (:meth:`ValidationPlan.start`), never again on resume.
- Validation clips are ``<run>/validation/step_NNNNNN.mp4`` (H.264, with an AAC track when the clip has sound); with
  several prompts ``step_NNNNNN_pK.mp4`` for prompt K (1-based, in chain order).
- **Settings nodes** carry frozen values (:class:`OptimizerSettings`, :class:`LoRASettings`,
  :class:`SamplingSettings`, :class:`CheckpointSettings`); each says which ``TrainConfig`` fields it sets
  (``config_overrides()``). The trainer node's own widgets are the base and :func:`config_overrides` of the
  connected settings is laid over them, so an unconnected settings node leaves the run as before.
"""

from __future__ import annotations

import dataclasses
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

__all__ = ["RUNS_FOLDER", "VALIDATION_FOLDER", "run_directory", "finished_run", "install_lora", "check_base_model",
           "check_blocks_to_swap", "check_bucket_step", "check_i2v_cache", "check_audio_cache", "ValidationClip",
           "ValidationPlan", "ValidationPrompt", "ValidationPrompts", "validation_path", "write_validation",
           "write_validations", "latest_validation", "latest_validations", "SAVE_DTYPES", "checked_settings",
           "OptimizerSettings", "LoRASettings", "SamplingSettings", "CheckpointSettings", "config_overrides"]

#: Run folders live in ``<output>/cinetune/runs/<name>``.
RUNS_FOLDER = ("cinetune", "runs")
#: Validation clips of a run live in ``<run>/validation``.
VALIDATION_FOLDER = "validation"


def run_directory(output_dir: str | Path, name: str) -> Path:
    """``<output_dir>/cinetune/runs/<name>`` (``name`` must already be checked as one file name)."""
    return Path(output_dir).joinpath(*RUNS_FOLDER, name)


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


def install_lora(lora_path: str | Path, loras_dir: str | Path, name: str, *, run: str | None = None) -> Path:
    """Copy a finished LoRA atomically to ``<loras_dir>/<name>.safetensors`` and return that path.

    Args:
        run: the run that wrote the file (its ``cinetune.run`` metadata); None = ``name`` (e.g. the EMA LoRA of run
            ``x`` is installed as ``x_ema`` with ``run="x"``).

    Raises:
        FileExistsError: the destination exists and its ``cinetune.run`` metadata does not name the run (it is
            left untouched; the message says where this run's LoRA is).
    """
    dest = Path(loras_dir) / f"{name}.safetensors"
    if dest.exists() and read_safetensors_header(dest)[1].get("cinetune.run") != (run or name):
        raise FileExistsError(f"{dest} exists and was not written by the run '{name}'; it is left untouched. Pick "
                              f"another output_name; this run's LoRA is in {lora_path}.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        shutil.copyfile(lora_path, tmp)
    return dest


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


@dataclass(frozen=True)
class ValidationPrompt:
    """One prompt of a validation chain (a Validation Prompt node).

    Attributes:
        conditioning: the family's encoded prompt and negative prompt (its Text Encode output).
        width, height: pixels; frames: video frames. 0 = as the first training clip (the family's validation size
            rule). steps: sampling steps. guidance: text guidance scale. seed: noise seed.
        start_image: optional ComfyUI IMAGE ``[B, H, W, 3]`` float 0..1 (the first image conditions the first
            frame: image-to-video). extra: family sampling settings as ``(name, number)`` pairs (Kandinsky 5:
            ``scheduler_scale``; LTX-2: ``fps``, ``audio_cfg``).
    """

    conditioning: Any
    width: int = 0
    height: int = 0
    frames: int = 0
    steps: int = 20
    guidance: float = 5.0
    seed: int = 0
    start_image: Tensor | None = None
    extra: tuple[tuple[str, float], ...] = ()

    def option(self, name: str, default: float) -> float:
        """The family setting ``name`` from :attr:`extra`, else ``default``."""
        return dict(self.extra).get(name, default)

    def sized(self, width: int, height: int, frames: int) -> "ValidationPrompt":
        """A copy whose 0 sizes are replaced by the given ones (the training data's)."""
        return dataclasses.replace(self, width=self.width or width, height=self.height or height,
                                   frames=self.frames or frames)

    def settings(self) -> dict[str, Any]:
        """The prompt's settings as plain values (for the run's metadata; the conditioning is not included)."""
        return {"width": self.width, "height": self.height, "frames": self.frames, "steps": self.steps,
                "guidance": self.guidance, "seed": self.seed, "start_image": self.start_image is not None,
                **dict(self.extra)}


@dataclass(frozen=True)
class ValidationPrompts:
    """A chain of validation prompts of one model family (``family``: its name, e.g. ``"kandinsky-5"``), and whether
    clips are also made at step 0 (on when any node of the chain asks for it)."""

    family: str
    prompts: tuple[ValidationPrompt, ...] = ()
    sample_at_start: bool = False

    def then(self, prompt: ValidationPrompt, *, sample_at_start: bool = False) -> "ValidationPrompts":
        """This chain with ``prompt`` appended."""
        return ValidationPrompts(self.family, (*self.prompts, prompt), self.sample_at_start or sample_at_start)

    def settings(self) -> dict[str, Any]:
        """Plain values for the run's metadata."""
        return {"sample_at_start": self.sample_at_start, "prompts": [p.settings() for p in self.prompts]}


# ---------------------------------------------------------------------------------------------------------------
# Settings nodes


#: Dtypes a run's final LoRA can be saved in (:attr:`TrainConfig.save_dtype`).
SAVE_DTYPES: tuple[str, ...] = ("bf16", "fp16", "fp32")


def checked_settings(**fields: Any) -> dict[str, Any]:
    """The given :class:`TrainConfig` fields as the config checks and normalises them, the others at their defaults
    (texts of patterns or σ values become tuples), so the settings nodes and the config share one rule.

    Raises:
        TrainingError: a bad value (the message names the field and the fix).
    """
    config = TrainConfig(**fields)
    return {name: getattr(config, name) for name in fields}


@dataclass(frozen=True)
class OptimizerSettings:
    """Optimizer details beyond the trainer node's widgets (defaults: :class:`TrainConfig`'s, the official
    Kandinsky 5 LoRA example's). ``beta1``/``beta2`` form ``TrainConfig.betas``; ``min_lr_ratio`` is the floor the
    cosine and linear schedules decay to, as a fraction of the learning rate; ``d_coef`` and ``safeguard_warmup``
    apply to Prodigy only."""

    weight_decay: float = TrainConfig.weight_decay
    beta1: float = TrainConfig.betas[0]
    beta2: float = TrainConfig.betas[1]
    eps: float = TrainConfig.eps
    max_grad_norm: float = TrainConfig.max_grad_norm
    min_lr_ratio: float = TrainConfig.min_lr_ratio
    d_coef: float = TrainConfig.d_coef
    safeguard_warmup: bool = TrainConfig.safeguard_warmup

    def config_overrides(self) -> dict[str, Any]:
        """TrainConfig field → value."""
        return {"weight_decay": self.weight_decay, "betas": (self.beta1, self.beta2), "eps": self.eps,
                "max_grad_norm": self.max_grad_norm, "min_lr_ratio": self.min_lr_ratio, "d_coef": self.d_coef,
                "safeguard_warmup": self.safeguard_warmup}


@dataclass(frozen=True)
class LoRASettings:
    """Which layers get LoRA and how it is regularised and initialised.

    Attributes:
        include, exclude: regular expressions over module paths (see :func:`cinetune.core.lora.lora_candidates`);
            empty = the family's official targets. dropout, rank_dropout, module_dropout: probabilities in [0, 1).
        init_lora: path of a LoRA file the run starts from, or None.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    init_lora: str | None = None

    def config_overrides(self) -> dict[str, Any]:
        """TrainConfig field → value."""
        return {"lora_include": self.include, "lora_exclude": self.exclude, "lora_dropout": self.dropout,
                "rank_dropout": self.rank_dropout, "module_dropout": self.module_dropout, "init_lora": self.init_lora}


@dataclass(frozen=True)
class SamplingSettings:
    """The σ range and loss weighting of training, and the image-to-video probability.

    Attributes:
        sigma_min, sigma_max: the range sampled σ are mapped into (0 ≤ min < max ≤ 1).
        loss_weighting: one of :data:`~cinetune.training.config.LOSS_WEIGHTINGS` (formulas in
            :mod:`cinetune.training.sigmas`).
        i2v_probability: probability that a sample trains image-to-video; None = as the trainer node (its family's
            default). Applied by the trainer node, which knows its family's image-to-video switch.

    Raises:
        TrainingError: ``sigma_min ≥ sigma_max``, or a value the config refuses.
    """

    sigma_min: float = TrainConfig.sigma_min
    sigma_max: float = TrainConfig.sigma_max
    loss_weighting: str = TrainConfig.loss_weighting
    i2v_probability: float | None = None

    def __post_init__(self) -> None:
        checked_settings(**self.config_overrides())

    def config_overrides(self) -> dict[str, Any]:
        """TrainConfig field → value (``i2v_probability`` is the trainer node's to apply)."""
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "loss_weighting": self.loss_weighting}


@dataclass(frozen=True)
class CheckpointSettings:
    """Checkpoint cadence and retention, the saved LoRA's dtype, logging, EMA and the held-out loss.

    Attributes:
        save_every_epochs: also checkpoint at the end of every N-th epoch (0 = off). keep_checkpoints: newest kept
            (0 = all). save_dtype: one of :data:`SAVE_DTYPES`. tensorboard: write event files. ema_decay: EMA of the
            LoRA weights (0 = off). validation_loss_every: held-out loss every N steps (0 = off), at the σ values
            ``validation_loss_sigmas``.
    """

    save_every_epochs: int = TrainConfig.save_every_epochs
    keep_checkpoints: int = TrainConfig.keep_checkpoints
    save_dtype: str = "bf16"
    tensorboard: bool = TrainConfig.tensorboard
    ema_decay: float = TrainConfig.ema_decay
    validation_loss_every: int = TrainConfig.validation_loss_every
    validation_loss_sigmas: tuple[float, ...] = TrainConfig.validation_loss_sigmas

    def config_overrides(self) -> dict[str, Any]:
        """TrainConfig field → value."""
        return {"save_every_epochs": self.save_every_epochs, "keep_checkpoints": self.keep_checkpoints,
                "save_dtype": self.save_dtype, "tensorboard": self.tensorboard, "ema_decay": self.ema_decay,
                "validation_loss_every": self.validation_loss_every,
                "validation_loss_sigmas": self.validation_loss_sigmas}


def config_overrides(*settings: Any) -> dict[str, Any]:
    """The TrainConfig fields the given settings set (None entries are skipped; later settings win)."""
    merged: dict[str, Any] = {}
    for item in settings:
        if item is not None:
            merged.update(item.config_overrides())
    return merged

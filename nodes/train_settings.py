"""Training settings nodes: small nodes whose outputs plug into the optional inputs at the end of both trainer nodes
(K5 Train LoRA, LTX-2 Train LoRA), as kijai's trainer "args" nodes do, so the trainers stay readable.

- Training Optimizer / LoRA / Sampling / Checkpoint Settings output frozen values
  (:class:`~cinetune.training.settings.OptimizerSettings`, …) that say which ``TrainConfig`` fields they set; the
  trainer's widgets are the base and the connected settings are laid over them. Unconnected, the run is as before.
- K5 / LTX-2 Validation Prompt: one prompt each (its own size, steps, guidance, seed, optional start image), chained
  through ``previous`` into a list of prompts (:class:`~cinetune.training.settings.ValidationPrompts`). One node per
  family because the conditioning socket differs; they share :class:`_ValidationPrompt`.

Every tooltip names the musubi-tuner (``musubi:``) and ltx-trainer (``ltx-trainer:``) setting it corresponds to.
Queue-time checks: unparsable patterns and σ lists, σ_min ≥ σ_max, validation sizes and frame counts the family
cannot sample. What depends on the trainer's widgets (a learning-rate floor with a constant schedule) or on the model
(a pattern matching no layer, the NABLA 128 px grid) is checked when the trainer builds its config, before its first
step. Widget order is frozen once released: add new inputs at the end, with defaults.
"""

from __future__ import annotations

from typing import Any, ClassVar

from comfy_api.latest import io

from ..core.family import LatentFormat
from ..k5.family import K5_FAMILY
from ..ltx2.family import LTX2_FAMILY
from ..training.config import LOSS_WEIGHTINGS, TrainingError
from ..training.settings import (SAVE_DTYPES, CheckpointSettings, LoRASettings, OptimizerSettings, SamplingSettings,
                                 ValidationPrompt, ValidationPrompts, checked_settings)
from . import host
from .checks import CinetuneNode, InputError
from .types import (K5Conditioning, K5Validation, LoRASettingsType, LTX2Conditioning, LTX2Validation,
                    CheckpointSettingsType, OptimizerSettingsType, SamplingSettingsType)

CATEGORY = "Cinetune/training/settings"
NO_LORA = "none"


def _rule(field: str):
    """An input rule checking a value as ``TrainConfig.<field>`` checks it."""
    return lambda value: checked_settings(**{field: value})


def _known(values: dict[str, Any], *names: str) -> list[Any] | None:
    """The values of ``names`` when every one is a widget value (not None: a link or left out), else None."""
    found = [values.get(n) for n in names]
    return None if any(v is None for v in found) else found


class _Settings(CinetuneNode):
    """A settings node: checks its widget values together after the per-input checks (:meth:`check_together`)."""

    @classmethod
    def validate_inputs(cls, **values) -> bool:
        super().validate_inputs(**values)
        try:
            cls.check_together(values)
        except (TrainingError, ValueError) as e:
            if isinstance(e, InputError):
                raise
            raise InputError(f"{cls.define_schema().display_name}: {e}") from None
        return True

    @classmethod
    def check_together(cls, values: dict[str, Any]) -> None:
        """Raise ValueError for widget values that do not fit together (values of links are None)."""


class OptimizerSettingsNode(_Settings):
    @classmethod
    def define_schema(cls) -> io.Schema:
        d = OptimizerSettings()
        return io.Schema(
            node_id="CinetuneTrainingOptimizerSettings",
            display_name="Training Optimizer Settings",
            category=CATEGORY,
            description="Weight decay, betas, eps, gradient clipping and the learning-rate floor for K5 / LTX-2 Train "
                        "LoRA (connect to optimizer_settings). The optimizer, learning rate, schedule, warm-up and "
                        "gradient accumulation stay on the trainer.",
            inputs=[
                io.Float.Input("weight_decay", default=d.weight_decay, min=0.0, max=10.0, step=1e-4, round=1e-6,
                               tooltip="Decoupled weight decay (AdamW, Prodigy, schedule-free; Adafactor's own). "
                                       "musubi: --optimizer_args weight_decay=…; ltx-trainer: prodigy_weight_decay "
                                       "(AdamW: torch's 0.01). Official K5: 0.001."),
                io.Float.Input("beta1", default=d.beta1, min=0.0, max=0.9999, step=0.001, round=1e-4,
                               tooltip="First-moment decay. musubi: --optimizer_args \"betas=(β1,β2)\"; ltx-trainer: "
                                       "torch default 0.9."),
                io.Float.Input("beta2", default=d.beta2, min=0.0, max=0.9999, step=0.001, round=1e-4,
                               tooltip="Second-moment decay (official K5: 0.95; torch default 0.999). musubi: "
                                       "--optimizer_args \"betas=(β1,β2)\"."),
                io.Float.Input("eps", default=d.eps, min=1e-12, max=1e-2, step=1e-9, round=1e-12,
                               tooltip="Adam epsilon. musubi: --optimizer_args eps=…"),
                io.Float.Input("max_grad_norm", default=d.max_grad_norm, min=0.0, max=1000.0, step=0.1,
                               tooltip="Clip the global gradient norm to this (0 = no clipping; the norm is charted "
                                       "either way). musubi: --max_grad_norm; ltx-trainer: "
                                       "optimization.max_grad_norm."),
                io.Float.Input("min_lr_ratio", default=d.min_lr_ratio, min=0.0, max=1.0, step=0.01,
                               tooltip="cosine / linear schedules decay to learning_rate × this instead of 0. musubi: "
                                       "--lr_scheduler_min_lr_ratio."),
                io.Float.Input("d_coef", default=d.d_coef, min=0.01, max=100.0, step=0.1,
                               tooltip="Prodigy only: multiplies its estimated step size (its tuning knob; keep "
                                       "learning_rate 1.0). musubi: --optimizer_args d_coef=…; ltx-trainer: "
                                       "prodigy_d_coef."),
                io.Boolean.Input("safeguard_warmup", default=d.safeguard_warmup,
                                 tooltip="Prodigy only: its recommended safeguard when warmup_steps > 0. musubi: "
                                         "--optimizer_args safeguard_warmup=True."),
            ],
            outputs=[OptimizerSettingsType.Output(display_name="optimizer_settings")],
        )

    @classmethod
    def execute(cls, weight_decay, beta1, beta2, eps, max_grad_norm, min_lr_ratio, d_coef,
                safeguard_warmup) -> io.NodeOutput:
        return io.NodeOutput(OptimizerSettings(weight_decay, beta1, beta2, eps, max_grad_norm, min_lr_ratio, d_coef,
                                               safeguard_warmup))


class LoRASettingsNode(_Settings):
    INPUT_RULES = {"include_patterns": _rule("lora_include"), "exclude_patterns": _rule("lora_exclude")}

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CinetuneTrainingLoRASettings",
            display_name="Training LoRA Settings",
            category=CATEGORY,
            description="Which layers get LoRA, LoRA / rank / module dropout, and a LoRA file to continue training "
                        "(connect to lora_settings). Rank and alpha stay on the trainer.",
            inputs=[
                io.String.Input("include_patterns", multiline=True, default="",
                                tooltip="Instead of the family's official LoRA layers: every Linear layer of its "
                                        "blocks whose module path matches one of these Python regexes (one per line, "
                                        "matched from the start of the path; empty = the official layers). K5 e.g. "
                                        r"visual_transformer_blocks\.\d+\..*_attention\..* ; LTX-2 e.g. "
                                        r"transformer_blocks\.\d+\.attn1\..* . musubi: --network_args "
                                        "include_patterns=[…]; ltx-trainer: lora.target_modules."),
                io.String.Input("exclude_patterns", multiline=True, default="",
                                tooltip="Then drop the layers whose module path matches one of these regexes (one per "
                                        "line). A pattern matching no layer is an error. musubi: --network_args "
                                        "exclude_patterns=[…] (there include can re-add what exclude removed; here "
                                        "exclude comes last)."),
                io.Float.Input("lora_dropout", default=0.0, min=0.0, max=0.99, step=0.01,
                               tooltip="Dropout on the LoRA's input features. musubi: --network_dropout; "
                                       "ltx-trainer: lora.dropout."),
                io.Float.Input("rank_dropout", default=0.0, min=0.0, max=0.99, step=0.01,
                               tooltip="Dropout of whole rank channels. musubi: --network_args rank_dropout=…"),
                io.Float.Input("module_dropout", default=0.0, min=0.0, max=0.99, step=0.01,
                               tooltip="Probability of skipping a layer's LoRA for a step. musubi: --network_args "
                                       "module_dropout=…"),
                io.Combo.Input("init_lora", options=[NO_LORA, *host.model_names("loras")], default=NO_LORA,
                               tooltip="Start from this LoRA in models/loras (continue someone's LoRA): it needs the "
                                       "run's rank and layers; its alpha is converted. musubi: --network_weights; "
                                       "ltx-trainer: model.load_checkpoint."),
            ],
            outputs=[LoRASettingsType.Output(display_name="lora_settings")],
        )

    @classmethod
    def execute(cls, include_patterns, exclude_patterns, lora_dropout, rank_dropout, module_dropout,
                init_lora) -> io.NodeOutput:
        checked = checked_settings(lora_include=include_patterns, lora_exclude=exclude_patterns)
        path = None if init_lora == NO_LORA else str(host.model_path("loras", init_lora))
        settings = LoRASettings(checked["lora_include"], checked["lora_exclude"], lora_dropout, rank_dropout,
                                module_dropout, path)
        return io.NodeOutput(settings)


def _i2v_probability(value: float) -> None:
    """-1 (as the trainer node) or a probability; the widget's steps between them mean nothing."""
    if -1.0 < value < 0.0:
        raise ValueError(f"{value:g} is neither -1 (as the trainer node) nor a probability: use -1, or a value from "
                         "0 to 1")


class SamplingSettingsNode(_Settings):
    INPUT_RULES = {"i2v_probability": _i2v_probability}

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CinetuneTrainingSamplingSettings",
            display_name="Training Sampling Settings",
            category=CATEGORY,
            description="The σ range trained, the loss weighting over σ and the image-to-video probability (connect "
                        "to sampling_settings). How σ is drawn and its shift stay on the trainer.",
            inputs=[
                io.Float.Input("sigma_min", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Lowest σ trained (0 = clean). The drawn σ are mapped into [sigma_min, "
                                       "sigma_max]. musubi: --min_timestep ÷ 1000."),
                io.Float.Input("sigma_max", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Highest σ trained (1 = pure noise). musubi: --max_timestep ÷ 1000."),
                io.Combo.Input("loss_weighting", options=list(LOSS_WEIGHTINGS), default="none",
                               tooltip="Weight of each sample's loss by its σ: none, sigma_sqrt (σ^-2), cosmap "
                                       "(2/(π(1−2σ+2σ²))). musubi: --weighting_scheme."),
                io.Float.Input("i2v_probability", default=-1.0, min=-1.0, max=1.0, step=0.05,
                               tooltip="Probability that a clip trains image-to-video (its clean first frame "
                                       "conditions it). -1 = as the trainer node: K5 1.0 with image_to_video on, "
                                       "LTX-2 first_frame_conditioning. Official K5 mixed T2V/I2V: 0.2. ltx-trainer: "
                                       "first_frame_conditioning_p."),
            ],
            outputs=[SamplingSettingsType.Output(display_name="sampling_settings")],
        )

    @classmethod
    def check_together(cls, values: dict[str, Any]) -> None:
        known = _known(values, "sigma_min", "sigma_max")
        if known:
            checked_settings(sigma_min=known[0], sigma_max=known[1])

    @classmethod
    def execute(cls, sigma_min, sigma_max, loss_weighting, i2v_probability) -> io.NodeOutput:
        return io.NodeOutput(SamplingSettings(sigma_min, sigma_max, loss_weighting,
                                              None if i2v_probability < 0 else i2v_probability))


class CheckpointSettingsNode(_Settings):
    INPUT_RULES = {"validation_loss_sigmas": _rule("validation_loss_sigmas")}

    @classmethod
    def define_schema(cls) -> io.Schema:
        d = CheckpointSettings()
        return io.Schema(
            node_id="CinetuneTrainingCheckpointSettings",
            display_name="Training Checkpoint Settings",
            category=CATEGORY,
            description="Checkpoints per epoch, how many are kept, the saved LoRA's dtype, TensorBoard logs, an EMA "
                        "LoRA and the held-out validation loss (connect to checkpoint_settings; the held-out samples "
                        "come from the trainer's validation_data). save_every (steps) stays on the trainer.",
            inputs=[
                io.Int.Input("save_every_epochs", default=d.save_every_epochs, min=0, max=100000,
                             tooltip="Also save a resumable checkpoint at the end of every N-th epoch (0 = off). "
                                     "musubi: --save_every_n_epochs."),
                io.Int.Input("keep_checkpoints", default=d.keep_checkpoints, min=0, max=100000,
                             tooltip="How many of the newest checkpoints are kept (0 = all). ltx-trainer: "
                                     "checkpoints.keep_last_n; musubi: --save_last_n_steps / --save_last_n_epochs "
                                     "(counted in steps/epochs there)."),
                io.Combo.Input("save_dtype", options=list(SAVE_DTYPES), default=d.save_dtype,
                               tooltip="dtype of the final LoRA file (checkpoints keep full precision). ltx-trainer: "
                                       "checkpoints.precision."),
                io.Boolean.Input("tensorboard", default=d.tensorboard,
                                 tooltip="Write TensorBoard event files (loss, learning rate, gradient norm, loss "
                                         "parts, held-out loss) into the run folder's tensorboard/ (needs the "
                                         "tensorboard package). musubi: --log_with tensorboard --logging_dir."),
                io.Float.Input("ema_decay", default=d.ema_decay, min=0.0, max=0.99999, step=0.0001, round=1e-6,
                               tooltip="Keep an exponential moving average of the LoRA weights (e.g. 0.999), saved as "
                                       "the run folder's lora_ema.safetensors beside the LoRA (0 = off). musubi: "
                                       "post-hoc EMA merging of saved LoRAs instead."),
                io.Int.Input("validation_loss_every", default=d.validation_loss_every, min=0, max=1000000,
                             tooltip="Every N steps compute the loss on the trainer's validation_data (held-out "
                                     "cached samples) at the fixed σ below, same noise every time, charted beside the "
                                     "training loss (0 = off)."),
                io.String.Input("validation_loss_sigmas",
                                default=", ".join(f"{s:g}" for s in d.validation_loss_sigmas),
                                tooltip="The fixed σ values of the held-out loss, separated by commas (averaged)."),
            ],
            outputs=[CheckpointSettingsType.Output(display_name="checkpoint_settings")],
        )

    @classmethod
    def execute(cls, save_every_epochs, keep_checkpoints, save_dtype, tensorboard, ema_decay, validation_loss_every,
                validation_loss_sigmas) -> io.NodeOutput:
        sigmas = checked_settings(validation_loss_sigmas=validation_loss_sigmas)["validation_loss_sigmas"]
        settings = CheckpointSettings(save_every_epochs, keep_checkpoints, save_dtype, tensorboard, ema_decay,
                                      validation_loss_every, sigmas)
        return io.NodeOutput(settings)


# ---------------------------------------------------------------------------------------------------------------
# Validation prompts


class _ValidationPrompt(_Settings):
    """What both families' Validation Prompt nodes share: the schema frame (conditioning, size, the family's own
    widgets from :meth:`family_inputs`, seed, sample_at_start, start image, previous) and the chaining. A subclass
    gives its family, node id, description, sockets and default frame count."""

    FAMILY: ClassVar[str]
    LABEL: ClassVar[str]
    """The family's name in node names (``"K5"``, ``"LTX-2"``)."""
    LATENT_FORMAT: ClassVar[LatentFormat]
    NODE_ID: ClassVar[str]
    DESCRIPTION: ClassVar[str]
    CONDITIONING: ClassVar[Any]
    VALIDATION: ClassVar[Any]
    FRAMES: ClassVar[int]
    """Default clip length."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name=f"{cls.LABEL} Validation Prompt",
            category=CATEGORY,
            description=cls.DESCRIPTION,
            inputs=[
                cls.CONDITIONING.Input("conditioning", tooltip=f"The prompt, from {cls.LABEL} Text Encode."),
                *cls.size_inputs(frames=cls.FRAMES),
                *cls.family_inputs(),
                *cls.chain_inputs(),
                cls.VALIDATION.Input("previous", optional=True,
                                     tooltip=f"More prompts: another {cls.LABEL} Validation Prompt."),
            ],
            outputs=[cls.VALIDATION.Output(display_name="validation")],
        )

    @classmethod
    def family_inputs(cls) -> list:
        """The family's widgets between the size and the seed."""
        raise NotImplementedError

    @classmethod
    def size_inputs(cls, *, frames: int) -> list:
        multiple, rule = cls.LATENT_FORMAT.size_multiple, cls.LATENT_FORMAT.temporal_factor
        return [
            io.Int.Input("width", default=0, min=0, max=4096, step=multiple,
                         tooltip=f"Clip width in pixels, a multiple of {multiple} (0 = the first training clip's)."),
            io.Int.Input("height", default=0, min=0, max=4096, step=multiple,
                         tooltip=f"Clip height in pixels, a multiple of {multiple} (0 = the first training clip's)."),
            io.Int.Input("frames", default=frames, min=1, max=1025, step=rule,
                         tooltip=f"Clip length in frames, {cls.LATENT_FORMAT.frame_rule}."),
        ]

    @staticmethod
    def chain_inputs() -> list:
        return [
            io.Int.Input("seed", default=42, min=0, max=0xFFFFFFFFFFFFFFFF,
                         tooltip="Noise seed of this prompt's clips (the same at every validation, so clips differ "
                                 "only by the LoRA). musubi: --d in --sample_prompts; ltx-trainer: validation.seed."),
            io.Boolean.Input("sample_at_start", default=False,
                             tooltip="Also make the clips before the first step (the model the run starts from). On "
                                     "if any prompt of the chain turns it on. musubi: --sample_at_first; ltx-trainer: "
                                     "not validation.skip_initial_validation."),
            io.Image.Input("start_image", optional=True,
                           tooltip="Image-to-video: this image is the clip's first frame (resized to cover and "
                                   "centre-cropped, encoded with the trainer's vae). musubi: --i; ltx-trainer: a "
                                   "first_frame condition."),
        ]

    @classmethod
    def check_together(cls, values: dict[str, Any]) -> None:
        known = _known(values, "width", "height", "frames")
        if known:
            width, height, frames = known
            multiple = cls.LATENT_FORMAT.size_multiple
            problems = cls.LATENT_FORMAT.size_problems(width or multiple, height or multiple, frames)
            if problems:
                raise ValueError("; ".join(problems))

    @classmethod
    def chain(cls, previous: ValidationPrompts | None, prompt: ValidationPrompt,
              sample_at_start: bool) -> io.NodeOutput:
        if previous is None:
            previous = ValidationPrompts(cls.FAMILY)
        elif not isinstance(previous, ValidationPrompts) or previous.family != cls.FAMILY:
            made = getattr(previous, "family", type(previous).__name__)
            raise InputError(f"{cls.define_schema().display_name}: 'previous' holds {made} validation prompts; chain "
                             f"only {cls.LABEL} Validation Prompt nodes.")
        return io.NodeOutput(previous.then(prompt, sample_at_start=sample_at_start))


class K5ValidationPromptNode(_ValidationPrompt):
    FAMILY = K5_FAMILY.name
    LABEL = "K5"
    LATENT_FORMAT = K5_FAMILY.latent_format
    NODE_ID = "CinetuneK5ValidationPrompt"
    DESCRIPTION = ("One validation prompt for K5 Train LoRA (connect to validation; chain several through previous). "
                   "Clips are made every validate_every steps of the trainer and saved as mp4 in the run folder; the "
                   "newest are shown on the trainer. musubi: a line of --sample_prompts.")
    CONDITIONING = K5Conditioning
    VALIDATION = K5Validation
    FRAMES = 17

    @classmethod
    def family_inputs(cls) -> list:
        return [
            io.Int.Input("steps", default=20, min=1, max=200,
                         tooltip="Sampling steps (official 50; fewer keep validation cheap). musubi: --s."),
            io.Float.Input("guidance", default=5.0, min=0.0, max=30.0, step=0.1,
                           tooltip="Classifier-free guidance scale (official 5; 1 = off). musubi: --l (a sample "
                                   "prompt's CFG scale)."),
            io.Float.Input("scheduler_scale", default=5.0, min=0.1, max=50.0, step=0.1,
                           tooltip="Flow shift of the sampling schedule (official 5 for 5 s, 10 for 10 s and "
                                   "image-to-video). musubi: --fs."),
        ]

    @classmethod
    def execute(cls, conditioning, width, height, frames, steps, guidance, scheduler_scale, seed, sample_at_start,
                start_image=None, previous=None) -> io.NodeOutput:
        prompt = ValidationPrompt(conditioning, width, height, frames, steps, guidance, seed, start_image,
                                  (("scheduler_scale", scheduler_scale),))
        return cls.chain(previous, prompt, sample_at_start)


class LTX2ValidationPromptNode(_ValidationPrompt):
    FAMILY = LTX2_FAMILY.name
    LABEL = "LTX-2"
    LATENT_FORMAT = LTX2_FAMILY.latent_format
    NODE_ID = "CinetuneLTX2ValidationPrompt"
    DESCRIPTION = ("One validation prompt for LTX-2 Train LoRA (connect to validation; chain several through "
                   "previous). Clips with sound are made every validate_every steps (and at validation_steps) and "
                   "saved as mp4 in the run folder; the newest are shown on the trainer. ltx-trainer: an entry of "
                   "validation.samples.")
    CONDITIONING = LTX2Conditioning
    VALIDATION = LTX2Validation
    FRAMES = 49

    @classmethod
    def family_inputs(cls) -> list:
        return [
            io.Float.Input("fps", default=0.0, min=0.0, max=120.0, step=0.001,
                           tooltip="Frame rate the clip is generated for (0 = the first training clip's). "
                                   "ltx-trainer: validation.frame_rate."),
            io.Int.Input("steps", default=30, min=2, max=200,
                         tooltip="Sampling steps (a distilled model uses its 8 fixed steps). ltx-trainer: "
                                 "validation.inference_steps."),
            io.Float.Input("video_cfg", default=3.0, min=0.0, max=30.0, step=0.1,
                           tooltip="Text guidance of the video (official 3; 1 = off). ltx-trainer: "
                                   "validation.video_cfg_scale."),
            io.Float.Input("audio_cfg", default=7.0, min=0.0, max=30.0, step=0.1,
                           tooltip="Text guidance of the sound (official 7). ltx-trainer: validation.audio_cfg_scale."),
        ]

    @classmethod
    def execute(cls, conditioning, width, height, frames, fps, steps, video_cfg, audio_cfg, seed, sample_at_start,
                start_image=None, previous=None) -> io.NodeOutput:
        prompt = ValidationPrompt(conditioning, width, height, frames, steps, video_cfg, seed, start_image,
                                  (("fps", fps), ("audio_cfg", audio_cfg)))
        return cls.chain(previous, prompt, sample_at_start)


NODES = [OptimizerSettingsNode, LoRASettingsNode, SamplingSettingsNode, CheckpointSettingsNode, K5ValidationPromptNode,
         LTX2ValidationPromptNode]

"""The inputs both LoRA trainer nodes declare (:mod:`.trainer_k5`, :mod:`.trainer_ltx2`) and their schema frame
(:func:`trainer_schema`): each trainer lists only its family's widgets between the shared head and tail.

Widget order is frozen once released: add new inputs at the end, with defaults.
"""

from __future__ import annotations

from typing import Any

from comfy_api.latest import io

from ..training.schedules import LR_SCHEDULES, OPTIMIZERS
from .trainer import CATEGORY
from .types import CheckpointSettingsType, LoRASettingsType, OptimizerSettingsType, SamplingSettingsType


def trainer_schema(*, node_id: str, display_name: str, description: str, family: str, model: Any, model_tooltip: str,
                   data: Any, validation: Any, output_name: str, rank: int, lr_schedule: str, max_steps: int,
                   inputs: list) -> io.Schema:
    """A trainer node's schema.

    Inputs: ``model`` (socket type, with ``model_tooltip``), ``training_data`` (socket type ``data``, from
    ``<family> Cache Latents``), ``output_name`` (default ``output_name``), the optimizer widgets with the family's
    defaults (:func:`optimizer_inputs`), the family's own ``inputs``, then the optional inputs both trainers end with
    (:func:`settings_inputs` with the ``validation`` socket type, :func:`gpus_input`). Outputs: the model with the
    trained LoRA and the LoRA's name. ``family`` is the family's name in node names (``"K5"``, ``"LTX-2"``).
    """
    cacher = f"{family} Cache Latents"
    return io.Schema(
        node_id=node_id,
        display_name=display_name,
        category=CATEGORY,
        description=description,
        inputs=[
            model.Input("model", tooltip=model_tooltip),
            data.Input("training_data", tooltip=f"From {cacher}."),
            io.String.Input("output_name", default=output_name,
                            tooltip="Name of the run folder (output/cinetune/runs/<name>) and of the LoRA file "
                                    "models/loras/<name>.safetensors."),
            *optimizer_inputs(rank=rank, lr_schedule=lr_schedule, max_steps=max_steps),
            *inputs,
            *settings_inputs(validation, data, family=family, cacher=cacher),
            gpus_input(),
        ],
        outputs=[model.Output(display_name="model"), io.String.Output(display_name="lora_name")],
        hidden=[io.Hidden.unique_id],
        not_idempotent=True,
    )


def optimizer_inputs(*, rank: int, lr_schedule: str, max_steps: int) -> list:
    """The widgets both trainers share from rank to gradient_accumulation, with the family's defaults."""
    return [
        io.Int.Input("rank", default=rank, min=1, max=512, tooltip="LoRA rank (dimension)."),
        io.Float.Input("alpha", default=float(rank), min=0.01, max=1024.0, step=1.0,
                       tooltip="LoRA alpha; the update is scaled by alpha/rank."),
        io.Float.Input("learning_rate", default=1e-4, min=1e-8, max=1.0, step=1e-5, round=1e-7,
                       tooltip="Peak learning rate (Prodigy: a multiplier of its own step size, usually 1.0)."),
        io.Combo.Input("optimizer", options=list(OPTIMIZERS), default="adamw",
                       tooltip="adamw (torch), adamw8bit (bitsandbytes, less memory), adafactor, prodigy (prodigyopt, "
                               "finds its own step size), adamw_schedulefree (schedulefree, no decaying schedule). "
                               "Details in Training Optimizer Settings."),
        io.Combo.Input("lr_schedule", options=list(LR_SCHEDULES), default=lr_schedule,
                       tooltip="Learning-rate schedule over max_steps."),
        io.Int.Input("warmup_steps", default=0, min=0, max=100000,
                     tooltip="Linear warm-up steps (for constant_with_warmup, cosine, linear)."),
        io.Int.Input("max_steps", default=max_steps, min=1, max=1000000, tooltip="Optimizer steps of the run."),
        io.Int.Input("epochs", default=0, min=0, max=100000,
                     tooltip="If > 0, train this many epochs over the dataset instead of max_steps."),
        io.Int.Input("batch_size", default=1, min=1, max=64,
                     tooltip="Clips per micro-batch (a batch only mixes clips of the same bucket)."),
        io.Int.Input("gradient_accumulation", default=1, min=1, max=1024, tooltip="Micro-batches per optimizer step."),
    ]


def flow_shift_input(default: float, note: str) -> io.Float.Input:
    return io.Float.Input("flow_shift", default=default, min=0.1, max=100.0, step=0.1,
                          tooltip=f"Shift k of the sampled sigmas, σ' = kσ/(1+(k−1)σ){note}.")


GRADIENT_CHECKPOINTING = io.Boolean.Input(
    "gradient_checkpointing", default=True,
    tooltip="Recompute each block in the backward pass: much less memory, ~30% slower. Required with block swap.")

CAPTION_DROPOUT = io.Float.Input("caption_dropout", default=0.0, min=0.0, max=1.0, step=0.01,
                                 tooltip="Probability of training a clip with the empty caption.")


def swap_inputs(loader: str) -> list:
    return [
        io.Int.Input("blocks_to_swap", default=-1, min=-1, max=200,
                     tooltip=f"Transformer blocks streamed from CPU memory during training (-1: as set on the "
                             f"{loader}). Training often needs more than sampling; requires gradient checkpointing "
                             "(turned on automatically)."),
        io.Boolean.Input("use_pinned_memory", default=True,
                         tooltip="Pin the CPU copies of swapped blocks (faster transfers, uses page-locked RAM)."),
    ]


def run_inputs() -> list:
    return [
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, tooltip="Seeds sigma, noise and data order."),
        io.Int.Input("save_every", default=250, min=0, max=1000000,
                     tooltip="Save a resumable checkpoint every N steps (0: only at the end or on Cancel)."),
        io.Boolean.Input("resume", default=False,
                         tooltip="Continue the newest checkpoint of output_name's run folder. Off with an existing "
                                 "run folder is an error, so nothing is overwritten."),
        io.Int.Input("validate_every", default=0, min=0, max=1000000,
                     tooltip="Every N steps sample a short video per validation prompt with the current LoRA "
                             "(needs validation or validation_conditioning, and vae)."),
    ]


def gpus_input() -> io.Int.Input:
    """The ``gpus`` widget, the last input of both trainers (optional, so prompts saved without it still run)."""
    return io.Int.Input("gpus", default=1, min=1, max=64, optional=True,
                        tooltip="Local GPUs: 1 trains inside ComfyUI; N > 1 runs the run with torchrun in N worker "
                                "processes (FSDP2 shards the model over them; needs blocks_to_swap 0 and no "
                                "validation clips) and follows it here (progress, chart, Cancel). The global batch "
                                "(batch_size) is split over them, so it must be a multiple of N. On a CPU-only "
                                "server: N gloo processes.")


def settings_inputs(validation: Any, data: Any, *, family: str, cacher: str) -> list:
    """The optional inputs appended to both trainers: the settings nodes, the validation prompts and the held-out
    dataset."""
    return [
        OptimizerSettingsType.Input("optimizer_settings", optional=True,
                                    tooltip="Training Optimizer Settings: weight decay, betas, eps, gradient "
                                            "clipping, minimum learning rate."),
        LoRASettingsType.Input("lora_settings", optional=True,
                               tooltip="Training LoRA Settings: which layers get LoRA, dropouts, a LoRA to start "
                                       "from."),
        SamplingSettingsType.Input("sampling_settings", optional=True,
                                   tooltip="Training Sampling Settings: σ range, loss weighting, image-to-video "
                                           "probability."),
        CheckpointSettingsType.Input("checkpoint_settings", optional=True,
                                     tooltip="Training Checkpoint Settings: epochs, kept checkpoints, saved dtype, "
                                             "TensorBoard, EMA, held-out loss."),
        validation.Input("validation", optional=True,
                         tooltip=f"{family} Validation Prompt(s): one clip per prompt every validate_every steps "
                                 "(instead of validation_conditioning)."),
        data.Input("validation_data", optional=True,
                   tooltip=f"Held-out samples for the validation loss: a second dataset cached by {cacher} with the "
                           "same loaders (see validation_loss_every in Training Checkpoint Settings)."),
    ]

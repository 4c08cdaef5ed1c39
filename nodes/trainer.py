"""The LoRA trainer nodes, one per model family over one training loop: one execution runs (or resumes) a whole run.

Every optimizer step sends a ``cinetune.train.progress`` websocket event (drawn by web/js/loss_chart.js; LTX-2 events
carry the video and audio losses in ``loss_terms``) and checks for interruption; an interrupted run leaves a
resumable checkpoint and a usable LoRA. The final LoRA is copied into ComfyUI's ``loras`` folder, in the key layout
native ``LoraLoaderModelOnly`` reads. The checks, run folders, reuse of a finished run and validation scheduling
live in :mod:`cinetune.training.runs`; the validation samplers in the families' libraries.

Widget order is frozen once released: add new inputs at the end, with defaults.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
from comfy_api.latest import io, ui

from ..core.checkpoint import CheckpointError
from ..core.offload import model_on_device
from ..k5.family import NABLA_SIZE_MULTIPLE
from ..k5.pipeline import sample as k5_sample
from ..k5.train import K5_TRAINING
from ..ltx2.text import load_text_projection
from ..ltx2.train import LTX2TrainingAdapter, ltx2_train_config
from ..ltx2.validation import render_validation, validation_request, validation_size
from ..training.adapter import TrainingAdapter
from ..training.config import TIMESTEP_SAMPLING, TrainConfig, TrainEvent, TrainingError
from ..training.data import dataset_fingerprint
from ..training.runs import (ValidationClip, ValidationPlan, check_audio_cache, check_base_model, check_blocks_to_swap,
                             check_bucket_step, check_i2v_cache, finished_run, install_lora, latest_validation,
                             run_directory)
from ..training.samples import empty_texts_from_cache, samples_from_cache
from ..training.schedules import LR_SCHEDULES, OPTIMIZERS
from ..training.trainer import train_lora
from . import host
from .checks import CinetuneNode, FileName, check_file_name
from .k5 import K5ModelHandle, training_dtype
from .ltx2 import LTX2ModelHandle
from .ltx2_training import LTX2TrainingDataType, ltx2_empty_caption, ltx2_training_data, ltx2_training_samples
from .training import TrainingDataType
from .types import K5VAE, LTX2VAE, K5Conditioning, K5Model, LTX2Conditioning, LTX2Model, LTX2TextEncoder

PROGRESS_EVENT = "cinetune.train.progress"
STATUS_EVENT = "cinetune.train.status"
CATEGORY = "Cinetune/training"

#: ``output_name`` names the run folder and ``models/loras/<name>.safetensors``, written through a temporary file.
OUTPUT_NAME = FileName(suffix=".safetensors", atomic=True)


def _validation_steps(value: Any) -> None:
    ValidationPlan.parse(0, value)


def run_folder(name: str) -> Path:
    """``<ComfyUI output>/cinetune/runs/<name>``.

    Raises:
        InputError: ``name`` is not a usable file name (:data:`OUTPUT_NAME`).
    """
    return run_directory(host.output_directory(), check_file_name(name, OUTPUT_NAME, "output_name"))


def _with_block_swap(handle, blocks_to_swap: int, use_pinned_memory: bool):
    """The model handle with the trainer's block-swap setting (-1 keeps the loader's)."""
    if blocks_to_swap < 0:
        return handle
    check_blocks_to_swap(blocks_to_swap, len(handle.blocks), handle.path.name)
    return replace(handle, blocks_to_swap=blocks_to_swap,
                   use_pinned_memory=use_pinned_memory and host.pinned_memory_allowed())


class _Events:
    """The websocket events of one run on one trainer node."""

    def __init__(self, node_id: str, run: str, max_steps: int) -> None:
        self.node_id, self.run = node_id, run
        self.bar = host.Progress(max_steps)

    def progress(self, e: TrainEvent) -> None:
        self.bar.update(e.step, e.max_steps)
        host.send_event(PROGRESS_EVENT, {"node": self.node_id, "prompt_id": host.current_prompt_id(),
                                         "run": self.run, **vars(e)})

    def status(self, kind: str, step: int, message: str) -> None:
        host.send_event(STATUS_EVENT, {"node": self.node_id, "prompt_id": host.current_prompt_id(), "run": self.run,
                                       "status": kind, "step": step, "message": message})


def _train(handle, base_handle, *, node_id: str, output_name: str, config: TrainConfig, samples: list, empty: Any,
           adapter: TrainingAdapter, resume: bool, metadata: dict, plan: ValidationPlan,
           render: Callable[[int, torch.nn.Module], ValidationClip] | None) -> io.NodeOutput:
    """Run (or reuse) the training run, install its LoRA and return the node's outputs: the base model with the LoRA
    applied, the LoRA's name, and the newest validation clip as the node's preview."""
    run_dir = run_folder(output_name)
    events = _Events(node_id, output_name, config.max_steps)
    device = host.compute_device()
    host.free_host_models()
    events.status("started", 0, f"{len(samples)} samples, {config.max_steps} steps")
    finished = finished_run(run_dir, config, metadata)
    try:
        if finished is not None:  # the same finished run (ComfyUI dropped its cached output): reuse it
            result = finished
        else:
            validate = plan.validator(render, run_dir, lambda step, path: events.status("validation", step, str(path)))
            with (torch.inference_mode(False),
                  model_on_device(handle.model, handle.blocks, device, **handle.placement())):
                result = train_lora(handle.model, samples, empty, config, run_dir, adapter=adapter, device=device,
                                    resume=resume, on_event=events.progress, check_interrupt=host.check_interrupt,
                                    validate=validate, validate_every=plan.cadence, metadata=metadata)
    except BaseException as e:
        events.status("interrupted", 0, f"{type(e).__name__}: {e}; the last checkpoint is in {run_dir}")
        raise
    installed = install_lora(result.lora_path, host.model_folder("loras"), output_name)
    events.status("finished", result.steps, str(installed))
    trained = base_handle.with_lora(installed.name, 1.0)
    clip = latest_validation(run_dir)
    preview = None
    if clip is not None:
        subfolder = clip.parent.relative_to(host.output_directory()).as_posix()
        preview = ui.PreviewVideo([ui.SavedResult(clip.name, subfolder, io.FolderType.output)])
    return io.NodeOutput(trained, installed.name, ui=preview)


def _optimizer_inputs(*, rank: int, lr_schedule: str, max_steps: int) -> list:
    """The widgets both trainers share from rank to gradient_accumulation, with the family's defaults."""
    return [
        io.Int.Input("rank", default=rank, min=1, max=512, tooltip="LoRA rank (dimension)."),
        io.Float.Input("alpha", default=float(rank), min=0.01, max=1024.0, step=1.0,
                       tooltip="LoRA alpha; the update is scaled by alpha/rank."),
        io.Float.Input("learning_rate", default=1e-4, min=1e-8, max=1.0, step=1e-5, round=1e-7,
                       tooltip="Peak learning rate."),
        io.Combo.Input("optimizer", options=list(OPTIMIZERS), default="adamw",
                       tooltip="adamw (torch), adamw8bit (needs bitsandbytes, less memory), adafactor."),
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


def _flow_shift_input(default: float, note: str) -> io.Float.Input:
    return io.Float.Input("flow_shift", default=default, min=0.1, max=100.0, step=0.1,
                          tooltip=f"Shift k of the sampled sigmas, σ' = kσ/(1+(k−1)σ){note}.")


GRADIENT_CHECKPOINTING = io.Boolean.Input(
    "gradient_checkpointing", default=True,
    tooltip="Recompute each block in the backward pass: much less memory, ~30% slower. Required with block swap.")


def _swap_inputs(loader: str) -> list:
    return [
        io.Int.Input("blocks_to_swap", default=-1, min=-1, max=200,
                     tooltip=f"Transformer blocks streamed from CPU memory during training (-1: as set on the "
                             f"{loader}). Training often needs more than sampling; requires gradient checkpointing "
                             "(turned on automatically)."),
        io.Boolean.Input("use_pinned_memory", default=True,
                         tooltip="Pin the CPU copies of swapped blocks (faster transfers, uses page-locked RAM)."),
    ]


def _run_inputs() -> list:
    return [
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, tooltip="Seeds sigma, noise and data order."),
        io.Int.Input("save_every", default=250, min=0, max=1000000,
                     tooltip="Save a resumable checkpoint every N steps (0: only at the end or on Cancel)."),
        io.Boolean.Input("resume", default=False,
                         tooltip="Continue the newest checkpoint of output_name's run folder. Off with an existing "
                                 "run folder is an error, so nothing is overwritten."),
        io.Int.Input("validate_every", default=0, min=0, max=1000000,
                     tooltip="Every N steps sample a short video with the current LoRA (needs "
                             "validation_conditioning and vae)."),
    ]


class K5TrainLoRA(CinetuneNode):
    INPUT_RULES = {"output_name": OUTPUT_NAME}

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CinetuneK5TrainLoRA",
            display_name="K5 Train LoRA (Cinetune)",
            category=CATEGORY,
            description="Trains a LoRA on the cached dataset. Watch the loss on the node; Cancel saves a resumable "
                        "checkpoint; 'resume' continues the run. The LoRA lands in models/loras.",
            inputs=[
                K5Model.Input("model", tooltip="From K5 Model Loader (its weight dtype, attention, NABLA and block "
                                               "swap settings are used for training)."),
                TrainingDataType.Input("training_data", tooltip="From K5 Cache Latents."),
                io.String.Input("output_name", default="k5_lora",
                                tooltip="Name of the run folder (output/cinetune/runs/<name>) and of the LoRA file "
                                        "models/loras/<name>.safetensors."),
                *_optimizer_inputs(rank=16, lr_schedule="constant", max_steps=1000),
                io.Combo.Input("timestep_sampling", options=["shift", "logit_normal", "uniform"], default="shift",
                               tooltip="How sigma is drawn: shift (musubi-tuner), logit_normal (official), uniform; "
                                       "all then shifted by flow_shift."),
                _flow_shift_input(5.0, ""),
                GRADIENT_CHECKPOINTING,
                io.Combo.Input("image_to_video", options=["off", "first", "first_last"], default="off",
                               tooltip="Image-to-video training: the clean first (and last) frame latent conditions "
                                       "the model (needs image_to_video on in K5 Cache Latents)."),
                io.Float.Input("caption_dropout", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Probability of training a clip with the empty caption."),
                *_run_inputs(),
                K5Conditioning.Input("validation_conditioning", optional=True,
                                     tooltip="Prompt for validation videos, from K5 Text Encode."),
                K5VAE.Input("vae", optional=True, tooltip="Decodes validation videos."),
                *_swap_inputs("K5 Model Loader"),
            ],
            outputs=[K5Model.Output(display_name="model"), io.String.Output(display_name="lora_name")],
            hidden=[io.Hidden.unique_id],
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, model, training_data, output_name, rank, alpha, learning_rate, optimizer, lr_schedule,
                warmup_steps, max_steps, epochs, batch_size, gradient_accumulation, timestep_sampling, flow_shift,
                gradient_checkpointing, image_to_video, caption_dropout, seed, save_every, resume, validate_every,
                validation_conditioning=None, vae=None, blocks_to_swap=-1, use_pinned_memory=True) -> io.NodeOutput:
        base: K5ModelHandle = model
        check_base_model(base.loras, lora_loader="K5 LoRA Loader", model_loader="K5 Model Loader",
                         trainer="K5 Train LoRA")
        handle = _with_block_swap(base, blocks_to_swap, use_pinned_memory)
        data = training_data
        if handle.nabla is not None:
            check_bucket_step(data.bucket_step, NABLA_SIZE_MULTIPLE, attention="NABLA", widget="nabla",
                              cacher="K5 Cache Latents")
        check_i2v_cache(image_to_video, data.i2v, cacher="K5 Cache Latents")
        plan = ValidationPlan(validate_every)
        if plan.active and (validation_conditioning is None or vae is None):
            raise TrainingError("validate_every > 0 needs validation_conditioning and vae connected.")
        cached = data.cached_samples()
        device = host.compute_device()
        config = TrainConfig(
            rank=rank, alpha=alpha, learning_rate=learning_rate, optimizer=optimizer, lr_schedule=lr_schedule,
            warmup_steps=warmup_steps, max_steps=max_steps, epochs=epochs, batch_size=batch_size,
            grad_accum=gradient_accumulation, timestep_sampling=timestep_sampling, flow_shift=flow_shift,
            gradient_checkpointing=gradient_checkpointing or handle.blocks_to_swap > 0, nabla=handle.nabla,
            rope_scale=handle.variant.rope_scale, attention_backend=handle.attention_backend, i2v=image_to_video,
            caption_dropout=caption_dropout, seed=seed, save_every=save_every, compute_dtype=training_dtype(device))

        def render(step: int, net: torch.nn.Module) -> ValidationClip:
            return _k5_validation(net, handle, validation_conditioning, vae, cached[0], seed=seed, device=device,
                                  dtype=config.compute_dtype)

        metadata = {"cinetune.run": output_name, "base_model": handle.path.name, "variant": handle.variant.id,
                    "dataset_hash": dataset_fingerprint(data.dataset), "trigger_word": data.dataset.trigger_word}
        empty = empty_texts_from_cache(cached, data.cache_dir, data.encoder_id) if caption_dropout else None
        return _train(handle, base, node_id=str(cls.hidden.unique_id), output_name=output_name, config=config,
                      samples=samples_from_cache(cached), empty=empty, adapter=K5_TRAINING, resume=resume, metadata=metadata, plan=plan, render=render)


def _k5_validation(net, handle: K5ModelHandle, conditioning, vae, first, *, seed: int, device,
                   dtype: torch.dtype) -> ValidationClip:
    """A 20-step Kandinsky 5 clip (at most 17 frames) at the first cached sample's size, with the current LoRA."""
    latent = k5_sample(net, conditioning["positive"], conditioning["negative"], width=first.bucket[0],
                       height=first.bucket[1], frames=min(first.frames, 17), seed=seed, steps=20, guidance=5.0,
                       scheduler_scale=5.0, rope_scale=handle.variant.rope_scale,
                       attention_backend=handle.attention_backend, nabla=handle.nabla, device=device, dtype=dtype,
                       check_interrupt=host.check_interrupt)
    with host.on_compute_device(vae) as vae_device:
        video = vae.decode(latent.to(vae_device))
    return ValidationClip(((video.float().clamp(-1, 1) + 1) / 2)[0].permute(1, 2, 3, 0).cpu())


class LTX2TrainLoRA(CinetuneNode):
    INPUT_RULES = {"output_name": OUTPUT_NAME, "validation_steps": _validation_steps}

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CinetuneLTX2TrainLoRA",
            display_name="LTX-2 Train LoRA (Cinetune)",
            category=CATEGORY,
            description="Trains an LTX-2 LoRA on the cached dataset, video and sound together (ltx-trainer's "
                        "audio-video objective). Watch both losses on the node; Cancel saves a resumable checkpoint; "
                        "'resume' continues the run. The LoRA lands in models/loras.",
            inputs=[
                LTX2Model.Input("model", tooltip="From LTX-2 Model Loader (its weight dtype, attention and block swap "
                                                 "settings are used for training)."),
                LTX2TrainingDataType.Input("training_data", tooltip="From LTX-2 Cache Latents."),
                io.String.Input("output_name", default="ltx2_lora",
                                tooltip="Name of the run folder (output/cinetune/runs/<name>) and of the LoRA file "
                                        "models/loras/<name>.safetensors."),
                *_optimizer_inputs(rank=32, lr_schedule="linear", max_steps=2000),
                io.Combo.Input("timestep_sampling", options=list(TIMESTEP_SAMPLING), default="shifted_logit_normal",
                               tooltip="How sigma is drawn: shifted_logit_normal (ltx-trainer: centred by the "
                                       "clip's token count), logit_normal, shift (musubi-tuner), uniform; all then "
                                       "shifted by flow_shift."),
                _flow_shift_input(1.0, " (1 = none, ltx-trainer's)"),
                GRADIENT_CHECKPOINTING,
                io.Boolean.Input("audio", default=True,
                                 tooltip="Train the sound too (audio stream, audio↔video attentions): every clip "
                                         "needs an audio latent (LTX-2 Cache Latents with audio on). Off trains video only."),
                io.Float.Input("first_frame_conditioning", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="Probability that a clip trains image-to-video: its clean first frame "
                                       "conditions the rest (ltx-trainer's first_frame_conditioning_p; 0 = "
                                       "text-to-video only, 1 = image-to-video only)."),
                io.Float.Input("caption_dropout", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Probability of training a clip with the empty caption."),
                *_run_inputs(),
                io.String.Input("validation_steps", default="",
                                tooltip="Steps that also get a validation video, e.g. '100, 500, 2000' (besides "
                                        "every validate_every steps; empty = none)."),
                io.Int.Input("validation_sampling_steps", default=30, min=2, max=200,
                             tooltip="Sampling steps of each validation video (ltx-trainer: 30; the official "
                                     "guidance is used; a distilled model uses its 8 fixed steps)."),
                *_swap_inputs("LTX-2 Model Loader"),
                LTX2Conditioning.Input("validation_conditioning", optional=True,
                                       tooltip="Prompt for validation videos, from LTX-2 Text Encode."),
                LTX2VAE.Input("vae", optional=True,
                              tooltip="Decodes validation videos and their sound (LTX-2 VAE Loader with the audio "
                                      "VAE)."),
                LTX2TextEncoder.Input("text_encoder", optional=True,
                                      tooltip="LTX-2 Text Encoder Loader: its text connectors are used (they must be "
                                              "those the captions were cached with). Leave empty to read them from "
                                              "the model's checkpoint file."),
            ],
            outputs=[LTX2Model.Output(display_name="model"), io.String.Output(display_name="lora_name")],
            hidden=[io.Hidden.unique_id],
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, model, training_data, output_name, rank, alpha, learning_rate, optimizer, lr_schedule,
                warmup_steps, max_steps, epochs, batch_size, gradient_accumulation, timestep_sampling, flow_shift,
                gradient_checkpointing, audio, first_frame_conditioning, caption_dropout, seed, save_every, resume,
                validate_every, validation_steps, validation_sampling_steps, blocks_to_swap=-1,
                use_pinned_memory=True, validation_conditioning=None, vae=None, text_encoder=None) -> io.NodeOutput:
        base: LTX2ModelHandle = model
        check_base_model(base.loras, lora_loader="LTX-2 LoRA Loader", model_loader="LTX-2 Model Loader",
                         trainer="LTX-2 Train LoRA")
        handle = _with_block_swap(base, blocks_to_swap, use_pinned_memory)
        plan = ValidationPlan.parse(validate_every, validation_steps)
        if not epochs:
            plan.check_within(max_steps)
        if plan.active and (validation_conditioning is None or vae is None):
            raise TrainingError("validation (validate_every > 0 or validation_steps) needs validation_conditioning "
                                "and vae connected.")
        device = host.compute_device()
        config = ltx2_train_config(
            rank=rank, alpha=alpha, learning_rate=learning_rate, optimizer=optimizer, lr_schedule=lr_schedule,
            warmup_steps=warmup_steps, max_steps=max_steps, epochs=epochs, batch_size=batch_size,
            grad_accum=gradient_accumulation, timestep_sampling=timestep_sampling, flow_shift=flow_shift,
            gradient_checkpointing=gradient_checkpointing or handle.blocks_to_swap > 0,
            attention_backend=handle.attention_backend, i2v="first" if first_frame_conditioning > 0 else "off",
            i2v_prob=first_frame_conditioning, caption_dropout=caption_dropout, with_audio=audio, seed=seed,
            save_every=save_every, compute_dtype=training_dtype(device))
        data = ltx2_training_data(training_data)
        check_audio_cache(audio, data.audio, cacher="LTX-2 Cache Latents")
        samples = ltx2_training_samples(data)
        empty = ltx2_empty_caption(data) if caption_dropout else None
        projection = _text_projection(text_encoder, handle, config.compute_dtype)
        if plan.active:
            request = validation_request(*validation_size(samples), seed=seed, steps=validation_sampling_steps,
                                         num_blocks=len(handle.blocks), distilled=handle.variant.distilled,
                                         audio=vae.audio is not None)

        def render(step: int, net: torch.nn.Module) -> ValidationClip:
            with host.on_compute_device(vae) as vae_device:
                return render_validation(net, validation_conditioning, vae, request,
                                         attention_backend=handle.attention_backend, device=vae_device,
                                         dtype=config.compute_dtype, check_interrupt=host.check_interrupt)

        metadata = {"cinetune.run": output_name, "base_model": handle.path.name, "variant": handle.variant.id,
                    "dataset_hash": dataset_fingerprint(data.dataset), "trigger_word": data.dataset.trigger_word}
        return _train(handle, base, node_id=str(cls.hidden.unique_id), output_name=output_name, config=config,
                      samples=samples, empty=empty, adapter=LTX2TrainingAdapter(projection), resume=resume,
                      metadata=metadata, plan=plan, render=render)


def _text_projection(text_encoder, handle: LTX2ModelHandle, dtype: torch.dtype):
    """The text connectors the LTX-2 adapter runs: the text encoder's when connected, else read from the DiT's file.

    Raises:
        TrainingError: no encoder connected and the DiT's file holds no connectors.
    """
    if text_encoder is not None:
        return text_encoder.projection
    try:
        return load_text_projection(handle.path, dtype=dtype)
    except CheckpointError as e:
        raise TrainingError(f"{handle.path.name} holds no LTX-2 text connectors (a DiT-only file): connect the LTX-2 "
                            f"Text Encoder Loader to LTX-2 Train LoRA's text_encoder. ({e})") from e


NODES = [K5TrainLoRA, LTX2TrainLoRA]

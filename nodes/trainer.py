"""The K5 LoRA trainer node: one execution runs (or resumes) a whole training run.

Every optimizer step sends a ``cinetune.train.progress`` websocket event (drawn by web/js/loss_chart.js) and checks
for interruption; an interrupted run leaves a resumable checkpoint and a usable LoRA. The final LoRA is copied into
ComfyUI's ``loras`` folder, in the key layout native ``LoraLoaderModelOnly`` reads.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from comfy_api.latest import io, ui

from ..core.checkpoint import atomic_path, read_safetensors_header
from ..core.lora import load_lora
from ..core.media import write_video
from ..core.offload import model_on_device
from ..k5.pipeline import sample
from ..k5.train import K5_TRAINING
from ..training.cache import load_cached_dataset
from ..training.data import dataset_fingerprint
from ..training.schedules import LR_SCHEDULES, OPTIMIZERS
from ..training.trainer import LORA_FILE, TrainConfig, TrainEvent, TrainResult, empty_texts_from_cache, samples_from_cache, train_lora
from . import host
from .checks import CinetuneNode, FileName, check_file_name
from .k5 import K5ModelHandle, training_dtype
from .training import TrainingDataType
from .types import K5VAE, K5Conditioning, K5Model

PROGRESS_EVENT = "cinetune.train.progress"
STATUS_EVENT = "cinetune.train.status"

#: ``output_name`` names the run folder and ``models/loras/<name>.safetensors``, written through a temporary file.
OUTPUT_NAME = FileName(suffix=".safetensors", atomic=True)


def run_directory(name: str) -> Path:
    """``<ComfyUI output>/cinetune/runs/<name>``.

    Raises:
        InputError: ``name`` is not a usable file name (:data:`OUTPUT_NAME`).
    """
    return host.output_directory() / "cinetune" / "runs" / check_file_name(name, OUTPUT_NAME, "output_name")


def install_lora(lora_path: Path, name: str) -> Path:
    """Copy a finished LoRA atomically into the first ``loras`` folder as ``<name>.safetensors``."""
    dest = host.model_folder("loras") / f"{name}.safetensors"
    if dest.exists() and read_safetensors_header(dest)[1].get("cinetune.run") != name:
        raise FileExistsError(f"{dest} exists and was not written by the run '{name}'; it is left untouched. Pick "
                              f"another output_name; this run's LoRA is in {lora_path}.")
    with atomic_path(dest) as tmp:
        shutil.copyfile(lora_path, tmp)
    return dest


def finished_run(run_dir: Path, config: TrainConfig, metadata: dict) -> TrainResult | None:
    """The result of a complete run in ``run_dir`` trained with exactly ``config`` on the same dataset, else None.

    Lets an unchanged workflow be queued again (after ComfyUI evicted the trainer's cached output) without
    retraining or refusing; any difference still goes through the normal new-run / resume rules.
    """
    lora = run_dir / LORA_FILE
    if not lora.is_file():
        return None
    meta = read_safetensors_header(lora)[1]
    same = (meta.get("cinetune.complete") == "true" and meta.get("dataset_hash") == metadata["dataset_hash"]
            and meta.get("cinetune.training") == json.dumps(config.to_dict(), sort_keys=True))
    return TrainResult(lora, int(meta.get("cinetune.steps", 0))) if same else None


class K5TrainLoRA(CinetuneNode):
    INPUT_RULES = {"output_name": OUTPUT_NAME}

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CinetuneK5TrainLoRA",
            display_name="K5 Train LoRA (Cinetune)",
            category="Cinetune/training",
            description="Trains a LoRA on the cached dataset. Watch the loss on the node; Cancel saves a resumable "
                        "checkpoint; 'resume' continues the run. The LoRA lands in models/loras.",
            inputs=[
                K5Model.Input("model", tooltip="From K5 Model Loader (its weight dtype, attention, NABLA and block "
                                               "swap settings are used for training)."),
                TrainingDataType.Input("training_data", tooltip="From K5 Cache Latents."),
                io.String.Input("output_name", default="k5_lora",
                                tooltip="Name of the run folder (output/cinetune/runs/<name>) and of the LoRA file "
                                        "models/loras/<name>.safetensors."),
                io.Int.Input("rank", default=16, min=1, max=512, tooltip="LoRA rank (dimension)."),
                io.Float.Input("alpha", default=16.0, min=0.01, max=1024.0, step=1.0,
                               tooltip="LoRA alpha; the update is scaled by alpha/rank."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-8, max=1.0, step=1e-5, round=1e-7,
                               tooltip="Peak learning rate."),
                io.Combo.Input("optimizer", options=list(OPTIMIZERS), default="adamw",
                               tooltip="adamw (torch), adamw8bit (needs bitsandbytes, less memory), adafactor."),
                io.Combo.Input("lr_schedule", options=list(LR_SCHEDULES), default="constant",
                               tooltip="Learning-rate schedule over max_steps."),
                io.Int.Input("warmup_steps", default=0, min=0, max=100000,
                             tooltip="Linear warm-up steps (for constant_with_warmup, cosine, linear)."),
                io.Int.Input("max_steps", default=1000, min=1, max=1000000, tooltip="Optimizer steps of the run."),
                io.Int.Input("epochs", default=0, min=0, max=100000,
                             tooltip="If > 0, train this many epochs over the dataset instead of max_steps."),
                io.Int.Input("batch_size", default=1, min=1, max=64,
                             tooltip="Clips per micro-batch (a batch only mixes clips of the same bucket)."),
                io.Int.Input("gradient_accumulation", default=1, min=1, max=1024,
                             tooltip="Micro-batches per optimizer step."),
                io.Combo.Input("timestep_sampling", options=["shift", "logit_normal", "uniform"], default="shift",
                               tooltip="How sigma is drawn: shift (musubi-tuner), logit_normal (official), uniform; "
                                       "all then shifted by flow_shift."),
                io.Float.Input("flow_shift", default=5.0, min=0.1, max=100.0, step=0.1,
                               tooltip="Shift k of the sampled sigmas, σ' = kσ/(1+(k−1)σ)."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Recompute each block in the backward pass: much less memory, ~30% slower. "
                                         "Required with block swap."),
                io.Combo.Input("image_to_video", options=["off", "first", "first_last"], default="off",
                               tooltip="Image-to-video training: the clean first (and last) frame latent conditions "
                                       "the model (needs image_to_video on in K5 Cache Latents)."),
                io.Float.Input("caption_dropout", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Probability of training a clip with the empty caption."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, tooltip="Seeds sigma, noise and data order."),
                io.Int.Input("save_every", default=250, min=0, max=1000000,
                             tooltip="Save a resumable checkpoint every N steps (0: only at the end or on Cancel)."),
                io.Boolean.Input("resume", default=False,
                                 tooltip="Continue the newest checkpoint of output_name's run folder. Off with an "
                                         "existing run folder is an error, so nothing is overwritten."),
                io.Int.Input("validate_every", default=0, min=0, max=1000000,
                             tooltip="Every N steps sample a short video with the current LoRA (needs "
                                     "validation_conditioning and vae)."),
                K5Conditioning.Input("validation_conditioning", optional=True,
                                     tooltip="Prompt for validation videos, from K5 Text Encode."),
                K5VAE.Input("vae", optional=True, tooltip="Decodes validation videos."),
                io.Int.Input("blocks_to_swap", default=-1, min=-1, max=200,
                             tooltip="Transformer blocks streamed from CPU memory during training (-1: as set on the "
                                     "K5 Model Loader). Training often needs more than sampling; requires gradient "
                                     "checkpointing (turned on automatically)."),
                io.Boolean.Input("use_pinned_memory", default=True,
                                 tooltip="Pin the CPU copies of swapped blocks (faster transfers, uses page-locked RAM)."),
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
        handle: K5ModelHandle = model
        base_handle = handle
        if handle.loras:
            raise ValueError("the model has LoRAs applied (K5 LoRA Loader); training starts from the base model, so "
                             "connect the K5 Model Loader directly to K5 Train LoRA.")
        if blocks_to_swap >= 0:
            total = len(handle.blocks)
            if blocks_to_swap > total:
                raise ValueError(f"blocks_to_swap={blocks_to_swap} is more than the {total} transformer blocks of "
                                 f"{handle.path.name}: use at most {total}.")
            handle = replace(handle, blocks_to_swap=blocks_to_swap,
                             use_pinned_memory=use_pinned_memory and host.pinned_memory_allowed())
        data = training_data
        if handle.nabla is not None and data.bucket_step % 128:
            raise ValueError("this model runs NABLA attention, which needs 128 px buckets: turn on 'nabla' in K5 Cache "
                             "Latents, or load the model with nabla 'off'.")
        if image_to_video != "off" and not data.i2v:
            raise ValueError("image_to_video training needs first/last frame latents: turn on 'image_to_video' in "
                             "K5 Cache Latents and run it again.")
        if validate_every and (validation_conditioning is None or vae is None):
            raise ValueError("validate_every > 0 needs validation_conditioning and vae connected.")
        cached = load_cached_dataset(data.dataset, data.cache_dir, encoder_id=data.encoder_id, vae_id=data.vae_id,
                                     frame_spec=data.frame_spec, base_resolution=data.base_resolution,
                                     bucket_step=data.bucket_step, allow_upscale=data.allow_upscale, i2v=data.i2v)
        samples = samples_from_cache(cached)
        empty = empty_texts_from_cache(cached, data.cache_dir, data.encoder_id) if caption_dropout else None
        device = host.compute_device()
        config = TrainConfig(
            rank=rank, alpha=alpha, learning_rate=learning_rate, optimizer=optimizer, lr_schedule=lr_schedule,
            warmup_steps=warmup_steps, max_steps=max_steps, epochs=epochs, batch_size=batch_size,
            grad_accum=gradient_accumulation, timestep_sampling=timestep_sampling, flow_shift=flow_shift,
            gradient_checkpointing=gradient_checkpointing or handle.blocks_to_swap > 0, nabla=handle.nabla,
            rope_scale=handle.variant.rope_scale, attention_backend=handle.attention_backend, i2v=image_to_video,
            caption_dropout=caption_dropout, seed=seed, save_every=save_every,
            compute_dtype=training_dtype(device))
        run_dir = run_directory(output_name)
        node_id = str(cls.hidden.unique_id)
        progress = host.Progress(max_steps)
        validation_dir = run_dir / "validation"

        def on_event(e: TrainEvent) -> None:
            progress.update(e.step, e.max_steps)
            host.send_event(PROGRESS_EVENT, {"node": node_id, "prompt_id": host.current_prompt_id(),
                                             "run": output_name, **vars(e)})

        def status(kind: str, step: int, message: str) -> None:
            host.send_event(STATUS_EVENT, {"node": node_id, "prompt_id": host.current_prompt_id(), "run": output_name,
                                           "status": kind, "step": step, "message": message})

        def validate(step: int, net) -> None:
            latent = sample(net, validation_conditioning["positive"], validation_conditioning["negative"],
                            width=cached[0].bucket[0], height=cached[0].bucket[1], frames=min(cached[0].frames, 17),
                            seed=seed, steps=20, guidance=5.0, scheduler_scale=5.0, rope_scale=handle.variant.rope_scale,
                            attention_backend=handle.attention_backend, nabla=handle.nabla, device=device,
                            dtype=config.compute_dtype, check_interrupt=host.check_interrupt)
            with host.on_compute_device(vae) as vae_device:
                video = vae.decode(latent.to(vae_device))
            frames = ((video.float().clamp(-1, 1) + 1) / 2)[0].permute(1, 2, 3, 0).cpu()
            path = write_video(frames, validation_dir / f"step_{step:06d}.mp4")
            status("validation", step, str(path))

        metadata = {"cinetune.run": output_name, "base_model": handle.path.name, "variant": handle.variant.id,
                    "dataset_hash": dataset_fingerprint(data.dataset), "trigger_word": data.dataset.trigger_word}
        host.free_host_models()
        status("started", 0, f"{len(samples)} samples, {max_steps} steps")
        finished = finished_run(run_dir, config, metadata)
        try:
            if finished is not None:  # the same finished run (ComfyUI dropped its cached output): reuse it
                result = finished
            else:
                with (torch.inference_mode(False),
                      model_on_device(handle.model, handle.blocks, device, **handle.placement())):
                    result = train_lora(handle.model, samples, empty, config, run_dir, adapter=K5_TRAINING,
                                        device=device, resume=resume,
                                        on_event=on_event, check_interrupt=host.check_interrupt,
                                        validate=validate if validate_every else None,
                                        validate_every=validate_every, metadata=metadata)
        except BaseException as e:
            status("interrupted", 0, f"{type(e).__name__}: {e}; the last checkpoint is in {run_dir}")
            raise
        installed = install_lora(result.lora_path, output_name)
        status("finished", result.steps, str(installed))
        names = [name for name, _ in handle.model.named_modules()]
        trained = replace(base_handle, loras=((installed.name, load_lora(installed, module_names=names), 1.0),))
        videos = sorted(validation_dir.glob("*.mp4"))
        preview = None
        if videos:
            subfolder = videos[-1].parent.relative_to(host.output_directory()).as_posix()
            preview = ui.PreviewVideo([ui.SavedResult(videos[-1].name, subfolder, io.FolderType.output)])
        return io.NodeOutput(trained, installed.name, ui=preview)


NODES = [K5TrainLoRA]

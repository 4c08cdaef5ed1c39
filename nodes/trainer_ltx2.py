"""LTX-2 Train LoRA: the LTX-2 LoRA trainer node, video and sound together (shared run machinery in
:mod:`.trainer`).

Widget order is frozen once released: add new inputs at the end, with defaults.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..core.checkpoint import CheckpointError
from ..ltx2.family import LTX2_FAMILY
from ..ltx2.text import load_text_projection
from ..ltx2.train import LTX2TrainingAdapter, ltx2_train_config
from ..ltx2.validation import encode_start_image, render_validation, validation_request, validation_size
from ..training.config import TIMESTEP_SAMPLING, TrainConfig, TrainingError
from ..training.recipe import RunRecipe
from ..training.runs import ValidationClip, ValidationPlan, check_audio_cache
from ..training.samples import ltx2_samples_from_cache
from ..training.settings import ValidationPrompt
from . import host
from .ltx2 import LTX2ModelHandle
from .ltx2_training import LTX2TrainingDataType, ltx2_empty_caption, ltx2_training_data, ltx2_training_samples
from .rules import i2v_single_frames
from .trainer import (Settings, TrainerNode, check_validation, config_fields, holdout_samples, recipe_data, run_metadata,
                      train, training_handle, validation_prompts, validation_requests)
from .trainer_inputs import (CAPTION_DROPOUT, GRADIENT_CHECKPOINTING, flow_shift_input, run_inputs, swap_inputs,
                             trainer_schema)
from .types import LTX2VAE, LTX2Conditioning, LTX2Model, LTX2TextEncoder, LTX2Validation


def _validation_steps(value) -> None:
    ValidationPlan.parse(0, value)


def _legacy_prompt(seed: int, steps: int):
    """The one prompt of ``validation_conditioning``: the first clip's size, frames and rate, the official guidance,
    ``validation_sampling_steps`` steps."""
    return lambda conditioning: ValidationPrompt(conditioning, frames=0, steps=steps, guidance=3.0, seed=seed)


class LTX2TrainLoRA(TrainerNode):
    INPUT_RULES = {**TrainerNode.INPUT_RULES, "validation_steps": _validation_steps}

    @classmethod
    def define_schema(cls) -> io.Schema:
        return trainer_schema(
            node_id="CinetuneLTX2TrainLoRA",
            display_name="LTX-2 Train LoRA",
            description="Trains an LTX-2 LoRA on the cached dataset, video and sound together (ltx-trainer's "
                        "audio-video objective). Watch both losses on the node; Cancel saves a resumable checkpoint; "
                        "'resume' continues the run. The LoRA lands in models/loras. More settings: the Training … "
                        "Settings and LTX-2 Validation Prompt nodes.",
            family="LTX-2", model=LTX2Model, data=LTX2TrainingDataType, validation=LTX2Validation,
            model_tooltip="From LTX-2 Model Loader (its weight dtype, attention and block swap settings are used for "
                          "training).",
            output_name="ltx2_lora", rank=32, lr_schedule="linear", max_steps=2000,
            inputs=[
                io.Combo.Input("timestep_sampling", options=list(TIMESTEP_SAMPLING), default="shifted_logit_normal",
                               tooltip="How sigma is drawn: shifted_logit_normal (ltx-trainer: centred by the "
                                       "clip's token count), logit_normal, shift (musubi-tuner), uniform; all then "
                                       "shifted by flow_shift."),
                flow_shift_input(1.0, " (1 = none, ltx-trainer's)"),
                GRADIENT_CHECKPOINTING,
                io.Boolean.Input("audio", default=True,
                                 tooltip="Train the sound too (audio stream, audio↔video attentions): every clip "
                                         "needs an audio latent (LTX-2 Cache Latents with audio on). Off trains video only."),
                io.Float.Input("first_frame_conditioning", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="Probability that a clip trains image-to-video: its clean first frame "
                                       "conditions the rest (ltx-trainer's first_frame_conditioning_p; 0 = "
                                       "text-to-video only, 1 = image-to-video only)."),
                CAPTION_DROPOUT,
                *run_inputs(),
                io.String.Input("validation_steps", default="",
                                tooltip="Steps that also get validation videos, e.g. '100, 500, 2000' (besides "
                                        "every validate_every steps; empty = none)."),
                io.Int.Input("validation_sampling_steps", default=30, min=2, max=200,
                             tooltip="Sampling steps of validation_conditioning's videos (ltx-trainer: 30; the "
                                     "official guidance is used; a distilled model uses its 8 fixed steps). "
                                     "Validation Prompt nodes set their own."),
                *swap_inputs("LTX-2 Model Loader"),
                LTX2Conditioning.Input("validation_conditioning", optional=True,
                                       tooltip="One prompt for validation videos, from LTX-2 Text Encode (or "
                                               "connect validation instead)."),
                LTX2VAE.Input("vae", optional=True,
                              tooltip="Decodes validation videos and their sound (LTX-2 VAE Loader with the audio "
                                      "VAE) and encodes their start images."),
                LTX2TextEncoder.Input("text_encoder", optional=True,
                                      tooltip="LTX-2 Text Encoder Loader: its text connectors are used (they must be "
                                              "those the captions were cached with). Leave empty to read them from "
                                              "the model's checkpoint file."),
            ],
        )

    @classmethod
    def execute(cls, model, training_data, output_name, rank, alpha, learning_rate, optimizer, lr_schedule,
                warmup_steps, max_steps, epochs, batch_size, gradient_accumulation, timestep_sampling, flow_shift,
                gradient_checkpointing, audio, first_frame_conditioning, caption_dropout, seed, save_every, resume,
                validate_every, validation_steps, validation_sampling_steps, blocks_to_swap=-1,
                use_pinned_memory=True, validation_conditioning=None, vae=None, text_encoder=None,
                optimizer_settings=None, lora_settings=None, sampling_settings=None, checkpoint_settings=None,
                validation=None, validation_data=None, gpus=1) -> io.NodeOutput:
        base: LTX2ModelHandle = model
        handle = training_handle(base, "LTX-2", blocks_to_swap, use_pinned_memory)
        prompts = validation_prompts(LTX2_FAMILY.name, validation_conditioning, validation,
                                     _legacy_prompt(seed, validation_sampling_steps))
        plan = ValidationPlan.parse(validate_every, validation_steps, prompts.sample_at_start)
        if not epochs:
            plan.check_within(max_steps)
        check_validation(plan, prompts, vae)
        settings = Settings(optimizer_settings, lora_settings, sampling_settings, checkpoint_settings)
        probability = getattr(sampling_settings, "i2v_probability", None)
        if probability is None:
            probability = first_frame_conditioning
        config = settings.config(config_fields(
            handle, rank=rank, alpha=alpha, learning_rate=learning_rate, optimizer=optimizer, lr_schedule=lr_schedule,
            warmup_steps=warmup_steps, max_steps=max_steps, epochs=epochs, batch_size=batch_size,
            gradient_accumulation=gradient_accumulation, timestep_sampling=timestep_sampling, flow_shift=flow_shift,
            gradient_checkpointing=gradient_checkpointing, caption_dropout=caption_dropout, seed=seed,
            save_every=save_every, i2v="first" if probability > 0 else "off", i2v_prob=probability,
            with_audio=audio), ltx2_train_config)
        data = ltx2_training_data(training_data)
        check_audio_cache(audio, data.audio, cacher="LTX-2 Cache Latents")
        cached = data.cached_samples()
        note = i2v_single_frames(config, cached, LTX2_FAMILY.latent_format, cacher="LTX-2 Cache Latents",
                                 turn_off="set first_frame_conditioning (and any i2v_probability of Training Sampling "
                                          "Settings) to 0")
        samples = ltx2_samples_from_cache(cached)
        holdout = holdout_samples(None if validation_data is None else ltx2_training_data(validation_data), data,
                                  ltx2_training_samples, config)
        empty = ltx2_empty_caption(data) if caption_dropout else None
        projection = _text_projection(text_encoder, handle, config.compute_dtype)
        render = _renderer(prompts, samples, handle, vae, config) if plan.active else None
        metadata = run_metadata(output_name, handle, data, plan, prompts, validation_data)
        connectors_dtype = str(next(projection.parameters()).dtype).removeprefix("torch.")
        recipe = RunRecipe.create(
            LTX2_FAMILY.name,
            models={"dit": handle.path, "connectors": getattr(text_encoder, "projection_path", None) or handle.path},
            loader={**handle.loader_settings(), "connectors_dtype": connectors_dtype},
            data=recipe_data(data, cached, validation_data), config=config,
            validation=metadata.get("validation", {}), metadata=metadata)
        return train(handle, base, node_id=str(cls.hidden.unique_id), output_name=output_name, config=config,
                     samples=samples, empty=empty, adapter=LTX2TrainingAdapter(projection), resume=resume,
                     metadata=metadata, plan=plan, render=render, settings=settings, holdout=holdout, recipe=recipe,
                     gpus=gpus, note=note)


def _renderer(prompts, samples, handle: LTX2ModelHandle, vae, config: TrainConfig):
    """``render(step, model)``: one clip with sound per prompt (requests checked now, start images encoded when
    first needed).

    Raises:
        TrainingError: a prompt's size, frame count or rate LTX-2 cannot sample.
    """
    width, height, frames, fps = validation_size(samples)

    def request_for(sized: ValidationPrompt):
        return validation_request(
            sized.width, sized.height, sized.frames, sized.option("fps", 0.0) or fps, seed=sized.seed,
            steps=sized.steps, num_blocks=len(handle.blocks), distilled=handle.variant.distilled,
            audio=vae.audio is not None, video_cfg=sized.guidance, audio_cfg=sized.option("audio_cfg", None))

    prepared = validation_requests(prompts, (width, height, frames), request_for, encode_start_image, vae)

    def render(step: int, net: torch.nn.Module) -> list[ValidationClip]:
        clips = []
        for prompt, request, start in prepared:
            keyframes = () if start is None else (start(),)
            with host.on_compute_device(vae) as device:
                clips.append(render_validation(net, prompt.conditioning, vae, request, keyframes=keyframes,
                                               attention_backend=handle.attention_backend, device=device,
                                               dtype=config.compute_dtype, check_interrupt=host.check_interrupt))
        return clips

    return render


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


NODES = [LTX2TrainLoRA]

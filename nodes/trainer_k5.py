"""K5 Train LoRA: the Kandinsky 5 LoRA trainer node (shared run machinery in :mod:`.trainer`).

Widget order is frozen once released: add new inputs at the end, with defaults.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..k5.family import K5_FAMILY, NABLA_SIZE_MULTIPLE
from ..k5.train import K5_TRAINING
from ..k5.validation import (K5ValidationRequest, decode_validation, encode_start_image, sample_validation,
                             validation_size)
from ..training.config import TrainConfig, TrainingError
from ..training.recipe import RunRecipe
from ..training.runs import ValidationClip, ValidationPlan, check_bucket_step, check_i2v_cache
from ..training.settings import ValidationPrompt
from ..training.samples import empty_texts_from_cache, samples_from_cache
from . import host
from .k5 import K5ModelHandle
from .rules import i2v_single_frames
from .trainer import (Settings, TrainerNode, check_validation, config_fields, holdout_samples, recipe_data, run_metadata,
                      train, training_handle, validation_prompts, validation_requests)
from .trainer_inputs import (CAPTION_DROPOUT, GRADIENT_CHECKPOINTING, flow_shift_input, run_inputs, swap_inputs,
                             trainer_schema)
from .training import TrainingDataType
from .types import K5VAE, K5Conditioning, K5Model, K5Validation


def _legacy_prompt(seed: int):
    """The one prompt of ``validation_conditioning``: the first clip's size (≤ 17 frames), 20 steps, guidance 5."""
    return lambda conditioning: ValidationPrompt(conditioning, frames=0, steps=20, guidance=5.0, seed=seed,
                                                 extra=(("scheduler_scale", 5.0),))


class K5TrainLoRA(TrainerNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return trainer_schema(
            node_id="CinetuneK5TrainLoRA",
            display_name="K5 Train LoRA",
            description="Trains a LoRA on the cached dataset. Watch the loss on the node; Cancel saves a resumable "
                        "checkpoint; 'resume' continues the run. The LoRA lands in models/loras. More settings: "
                        "the Training … Settings and K5 Validation Prompt nodes.",
            family="K5", model=K5Model, data=TrainingDataType, validation=K5Validation,
            model_tooltip="From K5 Model Loader (its weight dtype, attention, NABLA and block swap settings are used "
                          "for training).",
            output_name="k5_lora", rank=16, lr_schedule="constant", max_steps=1000,
            inputs=[
                io.Combo.Input("timestep_sampling", options=["shift", "logit_normal", "uniform"], default="shift",
                               tooltip="How sigma is drawn: shift (musubi-tuner), logit_normal (official), uniform; "
                                       "all then shifted by flow_shift."),
                flow_shift_input(5.0, ""),
                GRADIENT_CHECKPOINTING,
                io.Combo.Input("image_to_video", options=["off", "first", "first_last"], default="off",
                               tooltip="Image-to-video training: the clean first (and last) frame latent conditions "
                                       "the model (needs image_to_video on in K5 Cache Latents)."),
                CAPTION_DROPOUT,
                *run_inputs(),
                K5Conditioning.Input("validation_conditioning", optional=True,
                                     tooltip="One prompt for validation videos, from K5 Text Encode (or connect "
                                             "validation instead)."),
                K5VAE.Input("vae", optional=True, tooltip="Decodes validation videos (and encodes their start "
                                                          "images)."),
                *swap_inputs("K5 Model Loader"),
            ],
        )

    @classmethod
    def execute(cls, model, training_data, output_name, rank, alpha, learning_rate, optimizer, lr_schedule,
                warmup_steps, max_steps, epochs, batch_size, gradient_accumulation, timestep_sampling, flow_shift,
                gradient_checkpointing, image_to_video, caption_dropout, seed, save_every, resume, validate_every,
                validation_conditioning=None, vae=None, blocks_to_swap=-1, use_pinned_memory=True,
                optimizer_settings=None, lora_settings=None, sampling_settings=None, checkpoint_settings=None,
                validation=None, validation_data=None, gpus=1) -> io.NodeOutput:
        base: K5ModelHandle = model
        handle = training_handle(base, "K5", blocks_to_swap, use_pinned_memory)
        data = training_data
        if handle.nabla is not None:
            check_bucket_step(data.bucket_step, NABLA_SIZE_MULTIPLE, attention="NABLA", widget="nabla",
                              cacher="K5 Cache Latents")
        check_i2v_cache(image_to_video, data.i2v, cacher="K5 Cache Latents")
        prompts = validation_prompts(K5_FAMILY.name, validation_conditioning, validation, _legacy_prompt(seed))
        plan = ValidationPlan(validate_every, at_start=prompts.sample_at_start)
        check_validation(plan, prompts, vae)
        settings = Settings(optimizer_settings, lora_settings, sampling_settings, checkpoint_settings)
        widgets = config_fields(
            handle, rank=rank, alpha=alpha, learning_rate=learning_rate, optimizer=optimizer, lr_schedule=lr_schedule,
            warmup_steps=warmup_steps, max_steps=max_steps, epochs=epochs, batch_size=batch_size,
            gradient_accumulation=gradient_accumulation, timestep_sampling=timestep_sampling, flow_shift=flow_shift,
            gradient_checkpointing=gradient_checkpointing, caption_dropout=caption_dropout, seed=seed,
            save_every=save_every, nabla=handle.nabla, rope_scale=handle.variant.rope_scale, i2v=image_to_video)
        probability = getattr(sampling_settings, "i2v_probability", None)
        if probability is not None:
            if image_to_video == "off" and probability > 0:
                raise TrainingError(f"i2v_probability {probability:g} (Training Sampling Settings) needs "
                                    "image-to-video training: set image_to_video to 'first' or 'first_last', or "
                                    "i2v_probability to -1.")
            widgets["i2v_prob"] = probability
        config = settings.config(widgets, TrainConfig)
        cached_data = data.cached_samples()
        note = i2v_single_frames(config, cached_data, K5_FAMILY.latent_format, cacher="K5 Cache Latents",
                                 turn_off="set image_to_video to 'off'")
        samples = samples_from_cache(cached_data)
        holdout = holdout_samples(validation_data, data, lambda d: samples_from_cache(d.cached_samples()), config)
        render = _renderer(prompts, samples, handle, vae, config) if plan.active else None
        metadata = run_metadata(output_name, handle, data, plan, prompts, validation_data)
        empty = empty_texts_from_cache(cached_data, data.cache_dir, data.encoder_id) if caption_dropout else None
        recipe = RunRecipe.create(K5_FAMILY.name, models={"dit": handle.path}, loader=handle.loader_settings(),
                                  data=recipe_data(data, cached_data, validation_data), config=config,
                                  validation=metadata.get("validation", {}), metadata=metadata)
        return train(handle, base, node_id=str(cls.hidden.unique_id), output_name=output_name, config=config,
                     samples=samples, empty=empty, adapter=K5_TRAINING, resume=resume, metadata=metadata, plan=plan,
                     render=render, settings=settings, holdout=holdout, recipe=recipe, gpus=gpus, note=note)


def _renderer(prompts, samples, handle: K5ModelHandle, vae, config: TrainConfig):
    """``render(step, model)``: one clip per prompt (sizes checked now, start images encoded when first needed).

    Raises:
        TrainingError: a prompt's size or frame count the model cannot sample (NABLA needs 128 px sides).
    """
    def request_for(sized: ValidationPrompt) -> K5ValidationRequest:
        request = K5ValidationRequest(sized.width, sized.height, sized.frames, sized.steps, sized.guidance,
                                      sized.option("scheduler_scale", 5.0), sized.seed)
        request.check(nabla=handle.nabla is not None)
        return request

    prepared = validation_requests(prompts, validation_size(samples), request_for, encode_start_image, vae)

    def render(step: int, net: torch.nn.Module) -> list[ValidationClip]:
        clips = []
        for prompt, request, start in prepared:
            latent = sample_validation(
                net, prompt.conditioning, request, start_latent=None if start is None else start(),
                rope_scale=handle.variant.rope_scale, attention_backend=handle.attention_backend, nabla=handle.nabla,
                device=host.compute_device(), dtype=config.compute_dtype, check_interrupt=host.check_interrupt)
            with host.on_compute_device(vae) as device:
                clips.append(decode_validation(vae, latent, device=device))
        return clips

    return render


NODES = [K5TrainLoRA]

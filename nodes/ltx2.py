"""LTX-2 nodes: loaders, text encode, sampler (text/image-to-video with audio, distilled, stage 2), latent
upsample, decode, LoRA loader, memory estimate.

Nodes only translate widgets into library calls (``cinetune.ltx2``) and results into ComfyUI types. Video and
audio latents leave the sampler as two native ``LATENT``s in ComfyUI's own LTX-2 layouts (video
``[B,128,F',H',W']``, audio ``[B,8,T,16]`` with ``"type": "audio"``), normalised as ComfyUI's LTX-2 VAEs produce
them. Widget order is frozen once released: add new inputs at the end, with defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from comfy_api.latest import io, ui

from ..core.attention import check_backend
from ..core.checkpoint import CheckpointError, read_tensor_infos
from ..core.weights import compute_dtype
from ..ltx2 import pipeline
from ..ltx2.connectors import TextProjectionConfig, text_projection_config
from ..ltx2.family import LTX2_LATENT_FORMAT
from ..ltx2.loader import load_ltx2_dit, load_ltx2_text_encoder, load_ltx2_vae
from ..ltx2.memory import estimate_ltx2_memory, format_ltx2_estimate
from ..ltx2.text import DEFAULT_NEGATIVE_PROMPT
from ..ltx2.upsampler import load_ltx2_upsampler
from . import host
from .checks import CinetuneNode
from .common_inputs import (DTYPES, attention_input, block_swap_inputs, estimate_optimizer_input, lora_loader_inputs,
                            prompt_inputs, seed_input, text_encoder_dtype_input, vae_dtype_input, video_size_inputs,
                            weight_dtype_input)
from .model_nodes import (LoRALoaderNode, ModelHandle, block_swap, encode_prompt_pair, load_dit, sampling,
                          training_dtype)
from .rules import LTX2_SAMPLER_LINKS, LTX2_SAMPLING, LTX2_VIDEO_SIZE, NodeRules, attention_backend
from .types import LTX2VAE, LTX2Conditioning, LTX2Model, LTX2TextEncoder, LTX2Upsampler

CATEGORY = "Cinetune/LTX-2"
MODES = ["dev", "distilled", "stage 2"]
SCHEDULERS = ["official", "token count"]
CHECKPOINT_FOLDERS = ("checkpoints", "diffusion_models")


@dataclass
class LTX2ModelHandle(ModelHandle):
    """A loaded LTX-2 DiT (``model``: :class:`~cinetune.ltx2.dit.LTX2DiT`, ``config``:
    :class:`~cinetune.ltx2.config.LTX2TransformerConfig`, ``variant``: :class:`~cinetune.ltx2.loader.LTX2Variant`)
    and what the sampler needs: its variant, attention kernel, block swap, LoRAs."""

    @property
    def blocks(self) -> list[torch.nn.Module]:
        """Transformer blocks in execution order."""
        return list(self.model.blocks)


def _file(folders: tuple[str, ...], name: str) -> Path:
    return host.model_path_any(folders, name)


class LTX2ModelLoader(CinetuneNode):
    INPUT_RULES = {"attention": attention_backend}

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CinetuneLTX2ModelLoader",
            display_name="LTX-2 Model Loader",
            category=f"{CATEGORY}/loaders",
            description="Loads the LTX-2 19B audio+video DiT from the official combined .safetensors (dev, distilled, "
                        "fp8), ComfyUI's split DiT file or a diffusers snapshot's transformer file.",
            inputs=[
                io.Combo.Input("ckpt_name", options=host.model_names_any(CHECKPOINT_FOLDERS),
                               tooltip="ltx-2-19b-dev.safetensors (or -distilled, -fp8) in models/checkpoints, or a split "
                                       "LTX-2 DiT file in models/diffusion_models."),
                weight_dtype_input("'default' keeps each tensor's stored dtype (fp8 files stay fp8). fp8_e4m3fn stores "
                                   "Linear weights in 8 bits, keeping block 0, blocks 43-47 and the non-block layers in "
                                   "high precision (the official fp8 policy)."),
                attention_input("Attention kernel: sdpa (PyTorch), sageattention or flash-attn (must be installed)."),
                *block_swap_inputs("Block swap: keep this many transformer blocks (the last ones; 48 in all) in CPU "
                                   "memory and stream each to the GPU just before it runs. 0 keeps all on the GPU.",
                                   "Pin the CPU copies of swapped blocks for fast asynchronous transfers."),
            ],
            outputs=[LTX2Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, ckpt_name, weight_dtype, attention, blocks_to_swap=0, use_pinned_memory=True) -> io.NodeOutput:
        check_backend(attention)
        path = _file(CHECKPOINT_FOLDERS, ckpt_name)
        loaded = load_dit(load_ltx2_dit, path, weight_dtype)
        swap = block_swap(blocks_to_swap, use_pinned_memory, len(loaded.model.blocks), path.name)
        handle = LTX2ModelHandle(loaded.model.eval(), loaded.config, loaded.variant, attention, path, **swap,
                                 weight_dtype=weight_dtype)
        return io.NodeOutput(handle)


class LTX2TextEncoderLoader(CinetuneNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CinetuneLTX2TextEncoderLoader",
            display_name="LTX-2 Text Encoder Loader",
            category=f"{CATEGORY}/loaders",
            description="Loads Gemma 3 12B and the LTX-2 text projection and embeddings connectors (taken from the "
                        "LTX-2 checkpoint, which must be the same file as the DiT's).",
            inputs=[
                io.Combo.Input("gemma_name", options=host.model_names("text_encoders"),
                               tooltip="gemma_3_12B_it.safetensors or gemma_3_12B_it_fp8_scaled.safetensors (ComfyUI), or "
                                       "a file inside a google/gemma-3-12b-it-qat-q4_0-unquantized snapshot folder."),
                io.Combo.Input("ckpt_name", options=host.model_names_any(("checkpoints", "text_encoders")),
                               tooltip="The LTX-2 checkpoint the DiT comes from (its connectors are read from it), or "
                                       "ComfyUI's split embeddings-connector file."),
                text_encoder_dtype_input("Compute dtype of Gemma and the connectors (fp8 Gemma files stay fp8)."),
            ],
            outputs=[LTX2TextEncoder.Output(display_name="text_encoder")],
        )

    @classmethod
    def execute(cls, gemma_name, ckpt_name, dtype) -> io.NodeOutput:
        gemma_path = host.model_path("text_encoders", gemma_name)
        ckpt_path = _file(("checkpoints", "text_encoders"), ckpt_name)
        encoder = load_ltx2_text_encoder(gemma_path, ckpt_path, dtype=DTYPES[dtype])
        encoder.projection_path = ckpt_path  # where its connectors come from, for a training run's recipe
        return io.NodeOutput(encoder)


class LTX2VAELoader(CinetuneNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CinetuneLTX2VAELoader",
            display_name="LTX-2 VAE Loader",
            category=f"{CATEGORY}/loaders",
            description="Loads the LTX-2 video VAE, and the audio VAE with its vocoder, from the combined checkpoint or "
                        "from split files.",
            inputs=[
                io.Combo.Input("vae_name", options=host.model_names_any(("checkpoints", "vae")),
                               tooltip="The LTX-2 checkpoint (its vae.* part) or a split video VAE file in models/vae."),
                io.Combo.Input("audio_vae_name", options=["(same file)", *host.model_names_any(("checkpoints", "vae"))],
                               default="(same file)",
                               tooltip="Where the audio VAE and vocoder are: '(same file)' reads them from vae_name "
                                       "(the combined checkpoint), or a split audio VAE + vocoder file."),
                vae_dtype_input(),
            ],
            outputs=[LTX2VAE.Output(display_name="vae")],
        )

    @classmethod
    def execute(cls, vae_name, audio_vae_name, dtype) -> io.NodeOutput:
        folders = ("checkpoints", "vae")
        video_path = _file(folders, vae_name)
        audio_path = video_path if audio_vae_name == "(same file)" else _file(folders, audio_vae_name)
        return io.NodeOutput(load_ltx2_vae(video_path, audio_path, dtype=DTYPES[dtype]))


class LTX2UpsamplerLoader(CinetuneNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CinetuneLTX2UpsamplerLoader",
            display_name="LTX-2 Latent Upsampler Loader",
            category=f"{CATEGORY}/loaders",
            description="Loads the LTX-2 ×2 spatial latent upsampler used between the two stages.",
            inputs=[
                io.Combo.Input("upsampler_name", options=host.model_names("latent_upscale_models"),
                               tooltip="ltx-2-spatial-upscaler-x2-1.0.safetensors in models/latent_upscale_models."),
            ],
            outputs=[LTX2Upsampler.Output(display_name="upsampler")],
        )

    @classmethod
    def execute(cls, upsampler_name) -> io.NodeOutput:
        return io.NodeOutput(load_ltx2_upsampler(host.model_path("latent_upscale_models", upsampler_name)))


class LTX2TextEncode(CinetuneNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CinetuneLTX2TextEncode",
            display_name="LTX-2 Text Encode",
            category=CATEGORY,
            description="Encodes a prompt and a negative prompt with Gemma 3 and the LTX-2 connectors (1024 tokens, "
                        "left padded, no chat template, as official inference).",
            inputs=[
                LTX2TextEncoder.Input("text_encoder", tooltip="From LTX-2 Text Encoder Loader."),
                *prompt_inputs("What the video shows and sounds like: one detailed, chronological paragraph (the "
                               "official guide suggests up to 200 words), speech and sounds included.",
                               DEFAULT_NEGATIVE_PROMPT, "Used by guidance (dev mode). Default: the official one."),
            ],
            outputs=[LTX2Conditioning.Output(display_name="conditioning")],
        )

    @classmethod
    def execute(cls, text_encoder, prompt, negative_prompt) -> io.NodeOutput:
        positive, negative = encode_prompt_pair(text_encoder, lambda text: pipeline.LTX2Prompt(*text_encoder.encode(text)),
                                                prompt, negative_prompt)
        return io.NodeOutput(pipeline.LTX2Conditioning(positive, negative))


class LTX2Sampler(NodeRules, CinetuneNode):
    NODE_RULES = (LTX2_SAMPLING, LTX2_SAMPLER_LINKS)

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CinetuneLTX2Sampler",
            display_name="LTX-2 Sampler",
            category=CATEGORY,
            description="Generates an LTX-2 video latent and its audio latent together (Euler, multimodal guidance). "
                        "mode 'dev': official LTX-2 schedule and guidance; 'distilled': the 8-step guidance-free "
                        "schedule; 'stage 2': refines an upsampled latent (3 steps from sigma 0.909375).",
            inputs=[
                LTX2Model.Input("model", tooltip="From LTX-2 Model Loader (or an LTX-2 LoRA Loader)."),
                LTX2Conditioning.Input("conditioning", tooltip="From LTX-2 Text Encode."),
                *video_size_inputs(
                    LTX2_LATENT_FORMAT,
                    width="Video width in pixels, a multiple of 32 (of 64 for the two-stage pipeline).",
                    height="Video height in pixels, a multiple of 32 (of 64 for the two-stage pipeline).",
                    frames="Number of video frames, 8k+1 (121 = 5 s at 24 fps)."),
                io.Float.Input("fps", default=24.0, min=1.0, max=120.0, step=0.001,
                               tooltip="Frame rate the video is generated for (RoPE positions are in seconds; the "
                                       "audio length follows frames / fps). Official: 24."),
                seed_input("Noise seed. Noise is drawn on the CPU, so a seed gives the same result on any device."),
                io.Int.Input("steps", default=40, min=1, max=1000,
                             tooltip="Sampling steps in 'dev' mode (official: 40). 'distilled' and 'stage 2' use their "
                                     "fixed official sigma lists."),
                io.Combo.Input("mode", options=MODES, default="dev",
                               tooltip="'dev' for the dev checkpoint, 'distilled' for the distilled checkpoint (or dev + "
                                       "distilled LoRA), 'stage 2' to refine the upsampled latent of a first stage."),
                io.Float.Input("video_cfg", default=3.0, min=0.0, max=30.0, step=0.1,
                               tooltip="Text guidance for video (official 3.0; 1.0 switches it off)."),
                io.Float.Input("audio_cfg", default=7.0, min=0.0, max=30.0, step=0.1,
                               tooltip="Text guidance for audio (official 7.0)."),
                io.Float.Input("stg", default=1.0, min=0.0, max=10.0, step=0.1,
                               tooltip="Spatio-temporal guidance scale (self-attention of block 29 skipped in the "
                                       "perturbed pass; official 1.0, 0 switches it off)."),
                io.Int.Input("stg_block", default=29, min=0, max=200,
                             tooltip="Block whose self-attention the STG pass skips (0-based; official 19B: 29)."),
                io.Float.Input("modality_guidance", default=3.0, min=0.0, max=30.0, step=0.1,
                               tooltip="Audio-video sync guidance: contrast with a pass whose A↔V attention is skipped "
                                       "(official 3.0; 1.0 switches it off)."),
                io.Float.Input("rescale", default=0.7, min=0.0, max=1.0, step=0.05,
                               tooltip="Guidance rescale towards the conditional prediction's std (official 0.7)."),
                io.Combo.Input("scheduler", options=SCHEDULERS, default="official",
                               tooltip="'official': LTX2Scheduler as the official pipelines call it (shift 2.05); "
                                       "'token count': ComfyUI LTXVScheduler's shift from the latent's token count."),
                io.Boolean.Input("audio", default=True, tooltip="Generate the audio track with the video."),
                LTX2VAE.Input("vae", optional=True, tooltip="Needed for a start image (encodes it)."),
                io.Image.Input("start_image", optional=True,
                               tooltip="Image-to-video: the first frame (resized to cover and centre-cropped)."),
                io.Float.Input("image_strength", default=1.0, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip="1.0 keeps the start image exactly; lower values let the model change it."),
                io.Latent.Input("video_latent", optional=True,
                                tooltip="'stage 2': the upsampled video latent from LTX-2 Latent Upsample."),
                io.Latent.Input("audio_latent", optional=True,
                                tooltip="'stage 2': the first stage's audio latent (re-noised and refined as well)."),
            ],
            outputs=[io.Latent.Output(display_name="video_latent"), io.Latent.Output(display_name="audio_latent")],
        )

    @classmethod
    def execute(cls, model, conditioning, width, height, frames, fps, seed, steps, mode, video_cfg, audio_cfg, stg,
                stg_block, modality_guidance, rescale, scheduler, audio, vae=None, start_image=None, image_strength=1.0,
                video_latent=None, audio_latent=None) -> io.NodeOutput:
        handle: LTX2ModelHandle = model
        request = pipeline.SamplingRequest(
            width=width, height=height, frames=frames, fps=fps, seed=seed, steps=steps, mode=mode,
            video_cfg=video_cfg, audio_cfg=audio_cfg, stg=stg, stg_block=stg_block, modality=modality_guidance, rescale=rescale,
            token_count_shift=scheduler == "token count", audio=audio)
        request.check()
        LTX2_SAMPLER_LINKS.check(mode=mode, audio=audio, vae=vae is not None, start_image=start_image is not None,
                                 video_latent=video_latent is not None, audio_latent=audio_latent is not None)
        keyframes = []
        if start_image is not None:
            with host.on_compute_device(vae) as device, torch.inference_mode():
                keyframes.append(pipeline.encode_keyframe(vae, start_image[:1], width, height, frame_index=0,
                                                          strength=image_strength, device=device,
                                                          progress=host.Progress(1).update))
        progress = host.SamplingProgress(pipeline.LTX2_PREVIEW, request.num_steps)
        with sampling(handle) as device:
            video, audio_out = pipeline.generate(
                handle.model, conditioning, request, keyframes=keyframes,
                video_latent=None if video_latent is None else video_latent["samples"],
                audio_latent=None if audio_latent is None else audio_latent["samples"],
                attention_backend=handle.attention_backend, device=device,
                dtype=compute_dtype(handle.model), check_interrupt=host.check_interrupt, on_step=progress.on_step)
        audio_dict = {"samples": audio_out if audio_out is not None else torch.zeros(video.shape[0], 8, 0, 16),
                      "type": "audio"}
        return io.NodeOutput({"samples": video}, audio_dict)


class LTX2LatentUpsample(CinetuneNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CinetuneLTX2LatentUpsample",
            display_name="LTX-2 Latent Upsample",
            category=CATEGORY,
            description="Doubles the width and height of an LTX-2 video latent with the spatial latent upsampler "
                        "(between stage 1 and stage 2 of the two-stage pipeline).",
            inputs=[
                LTX2Upsampler.Input("upsampler", tooltip="From LTX-2 Latent Upsampler Loader."),
                LTX2VAE.Input("vae", tooltip="The LTX-2 VAE (its latent statistics are used around the upsampler)."),
                io.Latent.Input("video_latent", tooltip="Stage-1 video latent."),
            ],
            outputs=[io.Latent.Output(display_name="video_latent")],
        )

    @classmethod
    def execute(cls, upsampler, vae, video_latent) -> io.NodeOutput:
        with host.on_compute_device(upsampler) as device, torch.inference_mode():
            out = upsampler(video_latent["samples"].to(device), vae.video)
        return io.NodeOutput({"samples": out.float().cpu()})


class LTX2Decode(CinetuneNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CinetuneLTX2Decode",
            display_name="LTX-2 Decode",
            category=CATEGORY,
            description="Decodes the video latent into frames (IMAGE) and the audio latent into a 24 kHz stereo "
                        "waveform (AUDIO) with the audio VAE and vocoder.",
            inputs=[
                LTX2VAE.Input("vae", tooltip="From LTX-2 VAE Loader."),
                io.Latent.Input("video_latent", tooltip="From LTX-2 Sampler (or stage 2)."),
                io.Latent.Input("audio_latent", optional=True, tooltip="From LTX-2 Sampler; leave empty for silence."),
                io.Boolean.Input("tiling", default=True,
                                 tooltip="Decode the video in overlapping tiles so memory stays bounded."),
            ],
            outputs=[io.Image.Output(display_name="images"), io.Audio.Output(display_name="audio")],
        )

    @classmethod
    def execute(cls, vae, video_latent, tiling, audio_latent=None) -> io.NodeOutput:
        progress = host.Progress(1)
        with host.on_compute_device(vae) as device, torch.inference_mode():
            frames = pipeline.decode_video(vae, video_latent["samples"].to(device), tiling=tiling,
                                           progress=progress.update)
            audio = pipeline.decode_audio(vae, None if audio_latent is None else audio_latent["samples"].to(device))
        return io.NodeOutput(frames.cpu().contiguous(), audio)


class LTX2LoRALoader(LoRALoaderNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CinetuneLTX2LoRALoader",
            display_name="LTX-2 LoRA Loader",
            category=f"{CATEGORY}/loaders",
            description="Applies an LTX-2 LoRA for sampling (official ltx-trainer, ComfyUI, kohya or Cinetune files; "
                        "e.g. the distilled LoRA for stage 2). Chain several for several LoRAs.",
            inputs=lora_loader_inputs(
                LTX2Model, "LTX-2", lora_tooltip="LoRA file in models/loras.",
                strength_tooltip="LoRA strength: 1.0 as trained (official stage-2 distilled LoRA: 0.6-1.0)."),
            outputs=[LTX2Model.Output(display_name="model")],
        )


class LTX2MemoryEstimate(NodeRules, CinetuneNode):
    NODE_RULES = (LTX2_VIDEO_SIZE,)

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CinetuneLTX2MemoryEstimate",
            display_name="LTX-2 Memory Estimate",
            category=CATEGORY,
            description="Predicts peak GPU memory of one LTX-2 sampling step or one LoRA training step (weights, "
                        "block swap, activations of the video and audio tokens; in training also the text "
                        "connectors, LoRA, gradients and optimizer state) before you run it. Queue it alone; it is "
                        "instant.",
            inputs=[
                LTX2Model.Input("model", tooltip="From LTX-2 Model Loader (its dtypes and block swap are used)."),
                *video_size_inputs(LTX2_LATENT_FORMAT, width="Video width in pixels.", height="Video height in pixels.",
                                   frames="Video frames, 8k+1."),
                io.Float.Input("fps", default=24.0, min=1.0, max=120.0, step=0.001, tooltip="Frame rate (audio length)."),
                io.Combo.Input("mode", options=["sampling", "training"], default="sampling", optional=True,
                               tooltip="One sampling step (official dev guidance: four forward passes) or one LoRA "
                                       "training step of LTX-2 Train LoRA with the settings below."),
                io.Int.Input("lora_rank", default=32, optional=True, min=1, max=512, tooltip="Training: LoRA rank."),
                estimate_optimizer_input(optional=True),
                io.Boolean.Input("gradient_checkpointing", default=True, optional=True,
                                 tooltip="Training: recompute each block in the backward (always on with block "
                                         "swap, as the trainer does)."),
                io.Boolean.Input("audio", default=True, optional=True,
                                 tooltip="Training: audio and video together (LTX-2 Train LoRA's default); off trains "
                                         "the video stream alone."),
                io.Boolean.Input("first_frame_conditioning", default=True, optional=True,
                                 tooltip="Training: some steps condition on the first frame "
                                         "(first_frame_conditioning > 0 on the trainer); those steps need more."),
            ],
            outputs=[io.String.Output(display_name="estimate")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, width, height, frames, fps, mode="sampling", lora_rank=32, optimizer="adamw",
                gradient_checkpointing=True, audio=True, first_frame_conditioning=True) -> io.NodeOutput:
        handle: LTX2ModelHandle = model
        device = host.compute_device()
        settings = dict(width=width, height=height, frames=frames, fps=fps, blocks_to_swap=handle.blocks_to_swap,
                        device_type=device.type)
        if mode == "training":
            estimate = estimate_ltx2_memory(
                handle.model, **settings, compute_dtype=training_dtype(device), training=True, lora_rank=lora_rank,
                optimizer=optimizer, gradient_checkpointing=gradient_checkpointing, with_audio=audio,
                first_frame_conditioning=first_frame_conditioning, text_projection=cls.text_projection(handle))
        else:
            estimate = estimate_ltx2_memory(handle.model, **settings, compute_dtype=compute_dtype(handle.model))
        text = format_ltx2_estimate(estimate, available_bytes=host.free_device_memory(), model=handle.path.name)
        return io.NodeOutput(text, ui=ui.PreviewText(text))

    @staticmethod
    def text_projection(handle: LTX2ModelHandle) -> TextProjectionConfig | None:
        """The text connectors the trainer loads from the model's file, sized from its header; None when the file
        holds none (the estimate then sizes them from the DiT config)."""
        try:
            infos = read_tensor_infos(handle.path)
            return text_projection_config(handle.config, {name: info.shape for name, info in infos.items()})
        except CheckpointError:
            return None


NODES = [LTX2ModelLoader, LTX2TextEncoderLoader, LTX2VAELoader, LTX2UpsamplerLoader, LTX2TextEncode, LTX2Sampler,
         LTX2LatentUpsample, LTX2Decode, LTX2LoRALoader, LTX2MemoryEstimate]

"""Kandinsky 5 nodes: loaders, text encode, sampler, VAE encode/decode.

Nodes only translate widgets into library calls (``cinetune.k5``) and results into ComfyUI types.
Widget order is frozen once released (saved workflows store widget values by position): add new
inputs at the end, with defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from comfy_api.latest import io, ui

from ..core.attention import block_sparse_path, check_backend
from ..core.weights import compute_dtype
from ..k5.config import DEFAULT_NEGATIVE_PROMPT, VARIANTS, K5Variant, resolve_variant
from ..k5.dit import load_k5_dit
from ..k5.family import K5_LATENT_FORMAT
from ..k5.memory import estimate_k5_memory, format_k5_estimate, smallest_fitting_swap
from ..k5.nabla import NablaConfig
from ..k5.pipeline import K5_PREVIEW, prepare_start_image, sample
from ..k5.text import TEMPLATES, load_k5_text_encoder
from ..k5.vae import load_k5_vae
from ..training.cache import encoder_identity
from . import host
from .checks import CinetuneNode
from .common_inputs import (DTYPES, attention_input, block_swap_inputs, estimate_optimizer_input, lora_loader_inputs,
                            prompt_inputs, seed_input, text_encoder_dtype_input, vae_dtype_input, video_size_inputs,
                            weight_dtype_input)
from .model_nodes import (LoRALoaderNode, ModelHandle, block_swap, encode_prompt_pair, load_dit, sampling,
                          training_dtype)
from .rules import K5_START_IMAGE_SIZE, K5_VIDEO_SIZE, NodeRules, attention_backend
from .types import K5VAE, K5Conditioning, K5Model, K5TextEncoder

CATEGORY = "Cinetune/Kandinsky 5"
NABLA_MODES = ["auto", "on", "off"]


@dataclass
class K5ModelHandle(ModelHandle):
    """A loaded K5 DiT (``model``: :class:`~cinetune.k5.dit.Kandinsky5DiT`, ``config``:
    :class:`~cinetune.k5.config.K5Config`, ``variant``: :class:`~cinetune.k5.config.K5Variant`) and the settings the
    sampler needs (variant defaults, attention, NABLA: ``nabla``, None for full attention)."""

    nabla: NablaConfig | None = None

    @property
    def blocks(self) -> list[torch.nn.Module]:
        """Transformer blocks in execution order (text blocks, then visual blocks)."""
        return [*self.model.text_transformer_blocks, *self.model.visual_transformer_blocks]


def _nabla_for(variant: K5Variant, mode: str) -> NablaConfig | None:
    if mode == "off":
        return None
    if mode == "on":
        return variant.nabla or NablaConfig()
    return variant.nabla if variant.attention == "nabla" else None


class K5ModelLoader(CinetuneNode):
    INPUT_RULES = {"attention": attention_backend}

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CinetuneK5ModelLoader",
            display_name="K5 Model Loader",
            category=f"{CATEGORY}/loaders",
            description="Loads a Kandinsky 5 video DiT (official .safetensors, ComfyUI-repacked or diffusers layout).",
            inputs=[
                io.Combo.Input("dit_name", options=host.model_names("diffusion_models"),
                               tooltip="Kandinsky 5 DiT file in models/diffusion_models, e.g. kandinsky5lite_t2v_sft_5s.safetensors."),
                io.Combo.Input("variant", options=["auto", *VARIANTS], default="auto",
                               tooltip="Checkpoint variant: sets NABLA, RoPE scale and recommended sampling defaults. "
                                       "'auto' detects it from the file name and tensor shapes."),
                weight_dtype_input("'default' keeps each tensor's stored dtype. fp8_e4m3fn stores Linear weights in "
                                   "8 bits (about half the memory of bf16) and dequantises them per layer."),
                attention_input("Attention kernel: sdpa (PyTorch, always available), sageattention or flash-attn "
                                "(must be installed)."),
                io.Combo.Input("nabla", options=NABLA_MODES, default="auto",
                               tooltip="NABLA sparse attention: 'auto' uses it for the variants trained with it (10 s and HD), "
                                       "'on' forces it (sizes must be multiples of 128 px), 'off' uses full attention."),
                *block_swap_inputs(
                    "Block swap: keep this many transformer blocks (the last ones) in CPU memory and stream each to the "
                    "GPU just before it runs, overlapped with compute. Lite has 34 blocks, Pro 64. Raise it until the "
                    "model fits; 0 keeps everything on the GPU.",
                    "Pin the CPU copies of swapped blocks for fast asynchronous transfers. Turn off if system RAM is "
                    "short (ComfyUI --disable-pinned-memory also turns it off)."),
            ],
            outputs=[K5Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, dit_name, variant, weight_dtype, attention, nabla, blocks_to_swap=0,
                use_pinned_memory=True) -> io.NodeOutput:
        check_backend(attention)
        path = host.model_path("diffusion_models", dit_name)
        loaded = load_dit(load_k5_dit, path, weight_dtype)
        swap = block_swap(blocks_to_swap, use_pinned_memory,
                          loaded.config.num_text_blocks + loaded.config.num_visual_blocks, path.name)
        resolved = resolve_variant(loaded.config, path.name, variant)
        handle = K5ModelHandle(loaded.model.eval(), loaded.config, resolved, attention, path, **swap,
                               weight_dtype=weight_dtype, nabla=_nabla_for(resolved, nabla))
        return io.NodeOutput(handle)


class K5TextEncoderLoader(CinetuneNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        files = host.model_names("text_encoders")
        return io.Schema(
            node_id="CinetuneK5TextEncoderLoader",
            display_name="K5 Text Encoder Loader",
            category=f"{CATEGORY}/loaders",
            description="Loads Qwen2.5-VL-7B and CLIP-L for Kandinsky 5 from models/text_encoders.",
            inputs=[
                io.Combo.Input("qwen_name", options=files,
                               tooltip="Qwen2.5-VL-7B-Instruct: a file inside a Hugging Face snapshot folder, or a single-file "
                                       "text encoder such as qwen_2.5_vl_7b.safetensors (tokenizer taken from ComfyUI)."),
                io.Combo.Input("clip_name", options=files,
                               tooltip="CLIP-L text encoder: a file inside an openai/clip-vit-large-patch14 snapshot folder, "
                                       "or clip_l.safetensors."),
                text_encoder_dtype_input("Compute dtype of the text encoders."),
            ],
            outputs=[K5TextEncoder.Output(display_name="text_encoder")],
        )

    @classmethod
    def execute(cls, qwen_name, clip_name, dtype) -> io.NodeOutput:
        qwen_path, clip_path = host.model_path("text_encoders", qwen_name), host.model_path("text_encoders", clip_name)
        encoder = load_k5_text_encoder(
            qwen_path, clip_path,
            qwen_tokenizer=host.host_tokenizer_dir("qwen25_tokenizer"),
            clip_tokenizer=host.host_tokenizer_dir("sd1_tokenizer"),
            dtype=DTYPES[dtype], device="cpu")
        encoder.identity = encoder_identity(qwen_path, clip_path, dtype=dtype)  # text-cache key
        return io.NodeOutput(encoder)


class K5VAELoader(CinetuneNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CinetuneK5VAELoader",
            display_name="K5 VAE Loader",
            category=f"{CATEGORY}/loaders",
            description="Loads the HunyuanVideo VAE used by Kandinsky 5 (diffusers, original .pt or ComfyUI file).",
            inputs=[
                io.Combo.Input("vae_name", options=host.model_names("vae"),
                               tooltip="HunyuanVideo VAE in models/vae, e.g. hunyuan_video_vae_bf16.safetensors."),
                vae_dtype_input(),
            ],
            outputs=[K5VAE.Output(display_name="vae")],
        )

    @classmethod
    def execute(cls, vae_name, dtype) -> io.NodeOutput:
        path = host.model_path("vae", vae_name)
        vae = load_k5_vae(path, dtype=DTYPES[dtype])
        vae.identity = encoder_identity(path, f"tiling={vae.tiling}", dtype=dtype)  # latent-cache key
        return io.NodeOutput(vae)


class K5TextEncode(CinetuneNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CinetuneK5TextEncode",
            display_name="K5 Text Encode",
            category=CATEGORY,
            description="Encodes a prompt and a negative prompt with Qwen2.5-VL (official template) and CLIP-L.",
            inputs=[
                K5TextEncoder.Input("text_encoder", tooltip="From K5 Text Encoder Loader."),
                *prompt_inputs("What the video shows. At most 256 Qwen tokens are used.", DEFAULT_NEGATIVE_PROMPT,
                               "Used by classifier-free guidance (ignored at guidance 1). Default: the official one."),
                io.Combo.Input("template", options=list(TEMPLATES), default="video",
                               tooltip="Qwen system template. Official inference uses 'video' for text- and image-to-video."),
            ],
            outputs=[K5Conditioning.Output(display_name="conditioning")],
        )

    @classmethod
    def execute(cls, text_encoder, prompt, negative_prompt, template) -> io.NodeOutput:
        positive, negative = encode_prompt_pair(text_encoder, lambda text: text_encoder.encode([text], template=template),
                                                prompt, negative_prompt)
        return io.NodeOutput({"positive": positive, "negative": negative})


class K5Sampler(NodeRules, CinetuneNode):
    NODE_RULES = (K5_VIDEO_SIZE,)

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CinetuneK5Sampler",
            display_name="K5 Sampler",
            category=CATEGORY,
            description="Generates a Kandinsky 5 video latent with the official flow-matching Euler sampler.",
            inputs=[
                K5Model.Input("model", tooltip="From K5 Model Loader."),
                K5Conditioning.Input("conditioning", tooltip="From K5 Text Encode."),
                *video_size_inputs(
                    K5_LATENT_FORMAT,
                    width="Video width in pixels: a multiple of 16 (of 128 with NABLA). Official: 768 or 512.",
                    height="Video height in pixels: a multiple of 16 (of 128 with NABLA).",
                    frames="Number of video frames, 4k+1 (121 = 5 s, 241 = 10 s at 24 fps)."),
                seed_input("Noise seed. Noise is drawn on the CPU, so a seed gives the same video on any device."),
                io.Int.Input("steps", default=50, min=1, max=1000,
                             tooltip="Sampling steps. Official: 50, distilled16steps: 16."),
                io.Float.Input("guidance", default=5.0, min=0.0, max=30.0, step=0.1,
                               tooltip="Classifier-free guidance scale. 1.0 disables CFG (one model call per step); "
                                       "official: 5.0, nocfg and distilled: 1.0."),
                io.Float.Input("scheduler_scale", default=5.0, min=0.1, max=50.0, step=0.1,
                               tooltip="Flow shift k of the sigma schedule σ' = kσ/(1+(k−1)σ). Official: 5 for 5 s, "
                                       "10 for 10 s and image-to-video."),
                io.Latent.Input("start_latent", optional=True,
                                tooltip="Optional start image latent from K5 VAE Encode: turns this into image-to-video."),
            ],
            outputs=[io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, model, conditioning, width, height, frames, seed, steps, guidance, scheduler_scale,
                start_latent=None) -> io.NodeOutput:
        handle: K5ModelHandle = model
        dtype = compute_dtype(handle.model)
        progress = host.SamplingProgress(K5_PREVIEW, steps)
        with sampling(handle) as device:
            latent = sample(
                handle.model, conditioning["positive"], conditioning["negative"],
                width=width, height=height, frames=frames, seed=seed, steps=steps, guidance=guidance,
                scheduler_scale=scheduler_scale, rope_scale=handle.variant.rope_scale,
                attention_backend=handle.attention_backend, nabla=handle.nabla,
                start_latent=None if start_latent is None else start_latent["samples"],
                device=device, dtype=dtype, check_interrupt=host.check_interrupt, on_step=progress.on_step)
        return io.NodeOutput({"samples": latent})


class K5VAEDecode(CinetuneNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CinetuneK5VAEDecode",
            display_name="K5 VAE Decode",
            category=CATEGORY,
            description="Decodes a Kandinsky 5 video latent [B,16,T,H/8,W/8] into frames (IMAGE batch).",
            inputs=[
                K5VAE.Input("vae", tooltip="From K5 VAE Loader."),
                io.Latent.Input("latent", tooltip="Video latent from K5 Sampler (raw VAE latent)."),
                io.Boolean.Input("tiling", default=True,
                                 tooltip="Decode in overlapping tiles so memory stays bounded at 720p; off is faster for small videos."),
            ],
            outputs=[io.Image.Output(display_name="images")],
        )

    @classmethod
    def execute(cls, vae, latent, tiling) -> io.NodeOutput:
        progress = host.Progress(1)
        with host.on_compute_device(vae) as device, torch.inference_mode():
            video = vae.decode(latent["samples"].to(device), tiling=tiling, progress=progress.update)  # [B,3,F,H,W]
        frames = ((video.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1).flatten(0, 1)
        return io.NodeOutput(frames.cpu().contiguous())


class K5VAEEncode(NodeRules, CinetuneNode):
    NODE_RULES = (K5_START_IMAGE_SIZE,)

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CinetuneK5VAEEncode",
            display_name="K5 VAE Encode Start Image",
            category=CATEGORY,
            description="Resizes a start image to the video size (cover + centre crop) and encodes it for image-to-video.",
            inputs=[
                K5VAE.Input("vae", tooltip="From K5 VAE Loader."),
                io.Image.Input("image", tooltip="Start image; the first image of a batch is used."),
                *video_size_inputs(K5_LATENT_FORMAT, width="Must equal the sampler's width.",
                                   height="Must equal the sampler's height."),
            ],
            outputs=[io.Latent.Output(display_name="start_latent")],
        )

    @classmethod
    def execute(cls, vae, image, width, height) -> io.NodeOutput:
        pixels = prepare_start_image(image, width, height)  # [1,3,1,H,W] in [-1,1]
        progress = host.Progress(1)
        with host.on_compute_device(vae) as device, torch.inference_mode():
            latent = vae.encode(pixels.to(device), progress=progress.update)
        return io.NodeOutput({"samples": latent.float().cpu()})


class K5LoRALoader(LoRALoaderNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CinetuneK5LoRALoader",
            display_name="K5 LoRA Loader",
            category=f"{CATEGORY}/loaders",
            description="Applies a LoRA to a Kandinsky 5 model for sampling. Chain several for several LoRAs. Reads "
                        "Cinetune/ComfyUI, kohya/musubi-tuner and the official PEFT LoRA files.",
            inputs=lora_loader_inputs(
                K5Model, "K5",
                lora_tooltip="LoRA file in models/loras (trained by Cinetune, musubi-tuner, ComfyUI, or an official "
                             "Kandinsky 5 LoRA).",
                strength_tooltip="LoRA strength: 1.0 as trained, 0 disables it, negative values invert it."),
            outputs=[K5Model.Output(display_name="model")],
        )


class K5MemoryEstimate(CinetuneNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CinetuneK5MemoryEstimate",
            display_name="K5 Memory Estimate",
            category=CATEGORY,
            description="Predicts peak GPU memory of sampling or LoRA training with this model and settings, before "
                        "you run them. Queue it alone (it is instant) and adjust blocks_to_swap / weight_dtype.",
            inputs=[
                K5Model.Input("model", tooltip="From K5 Model Loader (its dtypes, block swap and NABLA are used)."),
                io.Combo.Input("mode", options=["sampling", "training"], default="sampling",
                               tooltip="One sampler step (with CFG) or one LoRA training step."),
                *video_size_inputs(K5_LATENT_FORMAT, width="Video width in pixels.", height="Video height in pixels.",
                                   frames="Video frames, 4k+1."),
                io.Boolean.Input("cfg", default=True, tooltip="Sampling with guidance ≠ 1 (two model calls per step)."),
                io.Int.Input("lora_rank", default=16, min=0, max=512, tooltip="Training: LoRA rank."),
                estimate_optimizer_input(),
            ],
            outputs=[io.String.Output(display_name="estimate")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, mode, width, height, frames, cfg, lora_rank, optimizer) -> io.NodeOutput:
        handle: K5ModelHandle = model
        device = host.compute_device()
        training = mode == "training"
        settings = dict(width=width, height=height, frames=frames, training=training, device_type=device.type,
                        cfg=cfg and not training, lora_rank=lora_rank if training else 0)
        nabla_path = block_sparse_path(device) if handle.nabla is not None else None
        model_settings = dict(settings, weight_dtype="default", model=handle.model, optimizer=optimizer,
                              compute_dtype=training_dtype(device) if training else compute_dtype(handle.model),
                              nabla=handle.nabla, nabla_path=nabla_path)
        estimate = estimate_k5_memory(handle.config, blocks_to_swap=handle.blocks_to_swap, **model_settings)
        available = host.free_device_memory()
        hint = {}
        if available is not None and estimate.total > available:
            hint["fitting_swap"] = smallest_fitting_swap(handle.config, available,
                                                         blocks_to_swap=handle.blocks_to_swap, **model_settings)
        text = format_k5_estimate(estimate, available_bytes=available, model=handle.path.name,
                                  blocks_to_swap=handle.blocks_to_swap, nabla_path=nabla_path, **settings, **hint)
        return io.NodeOutput(text, ui=ui.PreviewText(text))


NODES = [K5ModelLoader, K5TextEncoderLoader, K5VAELoader, K5TextEncode, K5Sampler, K5VAEDecode, K5VAEEncode,
         K5LoRALoader, K5MemoryEstimate]

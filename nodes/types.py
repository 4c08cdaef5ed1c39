"""Pack-owned socket types. Standard ComfyUI types (LATENT, IMAGE) are used at the edges."""

from comfy_api.latest import io

K5Model = io.Custom("CINETUNE_K5_MODEL")
"""A loaded Kandinsky 5 DiT with its variant settings (:class:`nodes.k5.K5ModelHandle`)."""

K5TextEncoder = io.Custom("CINETUNE_K5_TEXT_ENCODER")
"""Qwen2.5-VL + CLIP-L text encoders (:class:`cinetune.k5.text.K5TextEncoder`)."""

K5VAE = io.Custom("CINETUNE_K5_VAE")
"""HunyuanVideo VAE used by Kandinsky 5 (:class:`cinetune.k5.vae.K5VAE`)."""

K5Conditioning = io.Custom("CINETUNE_K5_CONDITIONING")
"""Encoded prompt and negative prompt: ``{"positive": K5TextEmbeds, "negative": K5TextEmbeds}``."""

LTX2Model = io.Custom("CINETUNE_LTX2_MODEL")
"""A loaded LTX-2 DiT with its variant, attention, block swap and LoRAs (:class:`nodes.ltx2.LTX2ModelHandle`)."""

LTX2TextEncoder = io.Custom("CINETUNE_LTX2_TEXT_ENCODER")
"""Gemma 3 + the LTX-2 text projection and embeddings connectors (:class:`cinetune.ltx2.text.LTX2TextEncoder`)."""

LTX2VAE = io.Custom("CINETUNE_LTX2_VAE")
"""The LTX-2 video VAE, audio VAE and vocoder (:class:`cinetune.ltx2.loader.LTX2VAEs`)."""

LTX2Upsampler = io.Custom("CINETUNE_LTX2_UPSAMPLER")
"""The LTX-2 ×2 spatial latent upsampler (:class:`cinetune.ltx2.upsampler.LTX2LatentUpsampler`)."""

LTX2Conditioning = io.Custom("CINETUNE_LTX2_CONDITIONING")
"""Encoded prompt and negative prompt (:class:`cinetune.ltx2.pipeline.LTX2Conditioning`)."""

OptimizerSettingsType = io.Custom("CINETUNE_OPTIMIZER_SETTINGS")
"""Optimizer details for a trainer (:class:`cinetune.training.settings.OptimizerSettings`)."""

LoRASettingsType = io.Custom("CINETUNE_LORA_SETTINGS")
"""LoRA layer selection, dropouts and start file for a trainer (:class:`cinetune.training.settings.LoRASettings`)."""

SamplingSettingsType = io.Custom("CINETUNE_SAMPLING_SETTINGS")
"""σ range, loss weighting and image-to-video probability (:class:`cinetune.training.settings.SamplingSettings`)."""

CheckpointSettingsType = io.Custom("CINETUNE_CHECKPOINT_SETTINGS")
"""Checkpoints, saved dtype, logging, EMA and held-out loss (:class:`cinetune.training.settings.CheckpointSettings`)."""

K5Validation = io.Custom("CINETUNE_K5_VALIDATION")
"""A chain of Kandinsky 5 validation prompts (:class:`cinetune.training.settings.ValidationPrompts`)."""

LTX2Validation = io.Custom("CINETUNE_LTX2_VALIDATION")
"""A chain of LTX-2 validation prompts (:class:`cinetune.training.settings.ValidationPrompts`)."""

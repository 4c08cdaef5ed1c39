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

"""Tiny random-weight Kandinsky 5 companion models in the real published formats, for the demo and the tests.

Nothing here is committed as weights: every tensor is drawn from a generator seeded by ``(seed, tensor name)``, so
the same seed always writes identical tensors, whatever order the tensors are created in.

- :func:`write_tiny_qwen`: a Hugging Face snapshot folder laid out like ``Qwen/Qwen2.5-VL-*-Instruct`` (flat
  ``config.json`` with ``model_type`` ``qwen2_5_vl`` and a nested ``vision_config``; tensors ``model.*``,
  ``visual.*`` in two safetensors shards with ``model.safetensors.index.json``; bf16 like the published weights;
  tied embeddings as in Qwen2.5-VL-3B, so there is no ``lm_head``), plus the real tokenizer files.
- :func:`write_tiny_clip`: a ``CLIPTextModel`` folder (``text_model.*``, fp32) with ``config.json`` and the
  tokenizer files.
- :func:`write_tiny_vae`: one diffusers-format ``AutoencoderKLHunyuanVideo`` safetensors file (16 latent channels,
  4 blocks: ×8 spatial, ×4 temporal, like the real VAE) with narrow blocks.

Initialisation (ours, chosen so activations stay O(1)): weights with ≥ 2 dims ~ N(0, 1/fan_in); 1-d ``*.weight``
(norm scales) 1 + N(0, 0.1²); biases N(0, 0.02²).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..core.checkpoint import save_file_atomic
from ..core.tiny import copy_tokenizer, seeded_tensor, tokenizer_vocab_size, write_folder_atomic, write_hf_folder

#: Hidden size of the tiny Qwen (the tiny DiT's ``in_text_dim``).
TINY_QWEN_HIDDEN = 64
#: Hidden size of the tiny CLIP (the tiny DiT's ``in_text_dim2``).
TINY_CLIP_HIDDEN = 64
#: Block widths of the tiny VAE (multiples of 32 so the real GroupNorm(32) layout holds).
TINY_VAE_BLOCK_OUT_CHANNELS = (32, 32, 64, 64)


def _meta_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def tiny_qwen_config(vocab_size: int) -> dict:
    """``config.json`` of the tiny Qwen2.5-VL, in the flat layout of the published Qwen2.5-VL configs."""
    hidden = TINY_QWEN_HIDDEN
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": 2 * hidden,
        "max_position_embeddings": 128000,
        "max_window_layers": 2,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "sliding_window": 32768,
        "use_sliding_window": False,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": vocab_size,
        "vision_config": {
            "depth": 2,
            "hidden_act": "silu",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "in_chans": 3,
            "out_hidden_size": hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1],
            "tokens_per_second": 2,
        },
    }


def _published_qwen_name(name: str) -> str:
    """transformers' in-memory Qwen2.5-VL names → the names in published checkpoints."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return name[len("model."):]
    return name


def write_tiny_qwen(folder: str | os.PathLike, tokenizer_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny Qwen2.5-VL snapshot folder (see the module docstring) and return its path.

    Args:
        folder: destination folder; replaced atomically if it exists.
        tokenizer_dir: a Qwen2.5 tokenizer folder; its files are copied and its size sets ``vocab_size``.
        seed: weight seed.
    Raises:
        FileNotFoundError: ``tokenizer_dir`` has no tokenizer files.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer_dir = Path(tokenizer_dir)
    config = tiny_qwen_config(tokenizer_vocab_size(tokenizer_dir))
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config))
    shapes = {_published_qwen_name(k): s for k, s in _meta_shapes(model).items() if not k.startswith("lm_head.")}
    tensors = {k: seeded_tensor(seed, k, s, torch.bfloat16) for k, s in sorted(shapes.items())}
    return write_hf_folder(folder, config, tensors, "model.embed_tokens.weight", tokenizer_dir)


def tiny_clip_config() -> dict:
    """``config.json`` of the tiny CLIP text model (field values as in openai/clip-vit-large-patch14's text config,
    sizes shrunk; one head of 64 dims like every OpenAI CLIP text tower)."""
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": "quick_gelu",
        "hidden_size": TINY_CLIP_HIDDEN,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 4 * TINY_CLIP_HIDDEN,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "num_attention_heads": TINY_CLIP_HIDDEN // 64,
        "num_hidden_layers": 2,
        "pad_token_id": 1,
        "projection_dim": TINY_CLIP_HIDDEN,
        "torch_dtype": "float32",
        "vocab_size": 49408,
    }


def write_tiny_clip(folder: str | os.PathLike, tokenizer_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny ``CLIPTextModel`` folder (``config.json``, ``model.safetensors``, tokenizer files).

    Raises:
        FileNotFoundError: ``tokenizer_dir`` has no tokenizer files.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer_dir = Path(tokenizer_dir)
    config = tiny_clip_config()
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(**config))
    # Published CLIP checkpoints name the tower ``text_model.*`` (transformers 5 drops that level in memory).
    shapes = {k if k.startswith("text_model.") else "text_model." + k: s for k, s in _meta_shapes(model).items()}
    tensors = {k: seeded_tensor(seed, k, s) for k, s in sorted(shapes.items())}

    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_file_atomic(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        copy_tokenizer(tokenizer_dir, tmp)

    return write_folder_atomic(Path(folder), fill)


def tiny_vae_config() -> dict:
    """``AutoencoderKLHunyuanVideo`` constructor arguments of the tiny VAE (real structure, narrow blocks)."""
    return {"in_channels": 3, "out_channels": 3, "latent_channels": 16,
            "block_out_channels": list(TINY_VAE_BLOCK_OUT_CHANNELS), "layers_per_block": 1, "norm_num_groups": 32,
            "spatial_compression_ratio": 8, "temporal_compression_ratio": 4, "mid_block_add_attention": True}


def write_tiny_vae(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny HunyuanVideo VAE as one diffusers-format safetensors file (atomic) and return its path."""
    from diffusers import AutoencoderKLHunyuanVideo

    with torch.device("meta"):
        model = AutoencoderKLHunyuanVideo(**tiny_vae_config())
    tensors = {k: seeded_tensor(seed, k, s) for k, s in sorted(_meta_shapes(model).items())}
    return save_file_atomic(tensors, Path(path))


#: Dimensions of the tiny Kandinsky 5 DiT: 1 text block, 2 visual blocks, head dim 32 (RoPE axes 8|12|12), 2 heads.
TINY_DIT_DIMS = dict(model_dim=64, ff_dim=128, time_dim=32, num_text_blocks=1, num_visual_blocks=2, axes_dims=(8, 12, 12),
                     in_text_dim=TINY_QWEN_HIDDEN, in_text_dim2=TINY_CLIP_HIDDEN)

#: ComfyUI names (relative to their model folder) of the embedded tiny default models.
TINY_NAMES = {
    "dit": "cinetune_tiny_k5_lite.safetensors",
    "vae": "cinetune_tiny_hunyuan_video_vae.safetensors",
    "qwen": "cinetune_tiny_qwen2.5_vl/model-00001-of-00002.safetensors",
    "clip": "cinetune_tiny_clip_l/model.safetensors",
}


def write_tiny_dit(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny Kandinsky 5 video DiT in the official file layout (no prefix, official key names) and return
    its path.

    Like the published Lite file, modulation tensors are stored in float32 and everything else in bfloat16, so
    loaders meet mixed stored dtypes. The visual input takes 33 channels (noisy | conditioning | mask).
    """
    from .config import K5Config
    from .dit import Kandinsky5DiT

    with torch.device("meta"):
        model = Kandinsky5DiT(K5Config(**TINY_DIT_DIMS))
    tensors = {}
    for name, shape in sorted(_meta_shapes(model).items()):
        dtype = torch.float32 if "modulation" in name else torch.bfloat16
        tensors[name] = seeded_tensor(seed, name, shape, dtype)
    return save_file_atomic(tensors, Path(path))


def write_tiny_defaults(models_dir: str | os.PathLike, *, qwen_tokenizer_dir: str | os.PathLike,
                        clip_tokenizer_dir: str | os.PathLike, seed: int = 0) -> dict[str, str]:
    """Write the four tiny default models into a ComfyUI ``models`` folder (``diffusion_models``, ``vae``,
    ``text_encoders``) and return their ComfyUI names (:data:`TINY_NAMES`)."""
    models = Path(models_dir)
    write_tiny_dit(models / "diffusion_models" / TINY_NAMES["dit"], seed)
    write_tiny_vae(models / "vae" / TINY_NAMES["vae"], seed)
    write_tiny_qwen(models / "text_encoders" / Path(TINY_NAMES["qwen"]).parent, Path(qwen_tokenizer_dir), seed)
    write_tiny_clip(models / "text_encoders" / Path(TINY_NAMES["clip"]).parent, Path(clip_tokenizer_dir), seed)
    return dict(TINY_NAMES)

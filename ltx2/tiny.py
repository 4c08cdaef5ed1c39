"""Tiny random-weight LTX-2 models in the real published formats, for the demo and the tests.

Nothing here is committed as weights: every tensor is drawn from a generator seeded by ``(seed, tensor name)``
(:func:`cinetune.core.tiny.seeded_tensor`), so the same seed always writes identical files.

- :func:`write_tiny_checkpoint`: one combined ``.safetensors`` laid out like ``ltx-2-19b-dev.safetensors`` — DiT and
  connectors under ``model.diffusion_model.``, ``text_embedding_projection.``, ``vae.``, ``audio_vae.``,
  ``vocoder.`` — with the ``config`` metadata (``transformer``, ``vae``, ``audio_vae``, ``vocoder``) the loaders
  read, as the official file carries it. DiT and connectors in bf16 like the published file; VAEs and vocoder fp32.
- :func:`write_tiny_upsampler`: the ×2 spatial latent upsampler file with its own flat ``config`` metadata.
- :func:`write_tiny_distilled_lora`: a LoRA in the official ltx-trainer layout (``diffusion_model.<path>.lora_A/B
  .weight``, no alpha) on the attention projections, standing in for ``ltx-2-19b-distilled-lora-384``.
- The tiny Gemma 3 (a Hugging Face folder with the real Gemma 3 tokenizer): :func:`cinetune.ltx2.text.write_tiny_gemma`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..core.checkpoint import save_file_atomic
from ..core.tiny import seeded_tensor
from .audio import AUDIO_VAE_PREFIX, VOCODER_PREFIX, LTX2AudioVAE, LTX2Vocoder
from .config import DIT_PREFIX, LTX2_LORA_TARGETS, LTX2TransformerConfig, tiny_transformer_metadata
from .connectors import LTX2TextProjection, text_projection_config
from .dit import LTX2DiT
from .text import TINY_FEATURE_DIM, write_tiny_gemma
from .upsampler import LTX2LatentUpsampler
from .upsampler import tiny_config as tiny_upsampler_config
from .vae import LTX2VideoVAE
from .vae import tiny_config as tiny_vae_config

#: ComfyUI names of the tiny models, relative to their model folders.
TINY_LTX2_NAMES = {
    "ltx2": "cinetune_tiny_ltx-2-19b-dev.safetensors",  # models/checkpoints
    "gemma": "cinetune_tiny_gemma_3/model-00001-of-00002.safetensors",  # models/text_encoders
    "ltx2_upsampler": "cinetune_tiny_ltx-2-spatial-upscaler-x2.safetensors",  # models/latent_upscale_models
    "ltx2_distilled_lora": "cinetune_tiny_ltx-2-distilled-lora.safetensors",  # models/loras
}
TINY_LORA_RANK = 4


def _seeded(seed: int, module: torch.nn.Module, dtype: torch.dtype, prefix: str = "") -> dict[str, torch.Tensor]:
    """Seeded random values for every tensor of ``module`` (built on the meta device), keys prefixed."""
    return {prefix + k: seeded_tensor(seed, prefix + k, tuple(v.shape), dtype) for k, v in module.state_dict().items()}


def tiny_metadata() -> dict:
    """The combined file's ``config`` metadata: the tiny transformer (with connectors), VAE, audio VAE, vocoder."""
    return {"transformer": tiny_transformer_metadata(), "vae": tiny_vae_config(),
            "audio_vae": LTX2AudioVAE.tiny_config(), "vocoder": LTX2Vocoder.tiny_config()}


def write_tiny_checkpoint(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny combined LTX-2 checkpoint (see the module docstring) and return its path.

    The video VAE and audio VAE start from their modules' own initialisation (a VAE of seeded N(0, 1/fan_in) weights
    is numerically poor), made deterministic by seeding torch's generator with ``seed``; the vocoder gets seeded
    He-scaled weights (N(0, 2/fan_in)), so its waveform follows the audio latent.
    """
    meta = tiny_metadata()
    config = LTX2TransformerConfig.from_metadata(meta["transformer"])
    with torch.device("meta"):
        dit = LTX2DiT(config)
        projection = LTX2TextProjection(text_projection_config(meta["transformer"], feature_dim=TINY_FEATURE_DIM))
    tensors = _seeded(seed, dit, torch.bfloat16, DIT_PREFIX)
    for key, value in projection.official_state_dict().items():
        tensors[key] = seeded_tensor(seed, key, tuple(value.shape), torch.bfloat16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = LTX2VideoVAE.from_config(meta["vae"])
        audio_vae = LTX2AudioVAE.from_config(meta["audio_vae"])
        vocoder = LTX2Vocoder.from_config(meta["vocoder"])
    tensors.update({"vae." + k: v.float().contiguous() for k, v in vae.official_state_dict().items()})
    tensors.update({AUDIO_VAE_PREFIX + k: v.float().contiguous() for k, v in audio_vae.official_state_dict().items()})
    # He-scaled seeded weights: with its own initialisation a narrow vocoder's output hardly depends on the mel input.
    tensors.update({VOCODER_PREFIX + k: seeded_tensor(seed, VOCODER_PREFIX + k, tuple(v.shape)) * (2 ** 0.5 if v.ndim > 1
                                                                                                    else 1.0)
                    for k, v in vocoder.official_state_dict().items()})
    return save_file_atomic(tensors, Path(path), metadata={"config": json.dumps(meta)})


def write_tiny_upsampler(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny ×2 spatial latent upsampler (its ``config`` metadata included) and return its path."""
    config = tiny_upsampler_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        upsampler = LTX2LatentUpsampler.from_config(config)
    tensors = {k: v.float().contiguous() for k, v in upsampler.official_state_dict().items()}
    return save_file_atomic(tensors, Path(path), metadata={"config": json.dumps(config)})


def write_tiny_distilled_lora(path: str | os.PathLike, seed: int = 0, rank: int = TINY_LORA_RANK) -> Path:
    """Write a tiny LoRA for the tiny DiT in the official ltx-trainer layout (``diffusion_model.`` keys,
    ``lora_A`` [r, in] / ``lora_B`` [out, r], no ``.alpha``: applied at scale 1 as official fusion does)."""
    config = LTX2TransformerConfig.from_metadata(tiny_transformer_metadata())
    with torch.device("meta"):
        dit = LTX2DiT(config)
    tensors = {}
    for name, module in dit.named_modules():
        if not isinstance(module, torch.nn.Linear) or not name.startswith("transformer_blocks."):
            continue
        if not any(name == t or name.endswith("." + t) for t in LTX2_LORA_TARGETS):
            continue
        key = f"diffusion_model.{name}"
        tensors[f"{key}.lora_A.weight"] = seeded_tensor(seed, key + ".A", (rank, module.in_features), torch.bfloat16)
        tensors[f"{key}.lora_B.weight"] = 0.1 * seeded_tensor(seed, key + ".B", (module.out_features, rank),
                                                              torch.bfloat16)
    return save_file_atomic(tensors, Path(path))


def write_tiny_ltx2_defaults(models_dir: str | os.PathLike, *, gemma_tokenizer_dir: str | os.PathLike,
                             seed: int = 0) -> dict[str, str]:
    """Write the tiny LTX-2 models into a ComfyUI ``models`` folder (``checkpoints``, ``text_encoders``,
    ``latent_upscale_models``, ``loras``) and return their ComfyUI names (:data:`TINY_LTX2_NAMES`)."""
    models = Path(models_dir)
    write_tiny_checkpoint(models / "checkpoints" / TINY_LTX2_NAMES["ltx2"], seed)
    write_tiny_gemma(models / "text_encoders" / Path(TINY_LTX2_NAMES["gemma"]).parent, gemma_tokenizer_dir, seed)
    write_tiny_upsampler(models / "latent_upscale_models" / TINY_LTX2_NAMES["ltx2_upsampler"], seed)
    write_tiny_distilled_lora(models / "loras" / TINY_LTX2_NAMES["ltx2_distilled_lora"], seed)
    return dict(TINY_LTX2_NAMES)

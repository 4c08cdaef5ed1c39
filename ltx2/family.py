"""LTX-2 as a model family of the shared code: its latent format, LoRA targets and LoRA key grammar.

Importing this module registers :data:`LTX2_FAMILY` with :func:`cinetune.core.family.register_family`.

Facts (reference ltx2.md §4–6, §9.3, §11.1):

- **Video latents**: the LTX-2 video VAE — 128 channels, ×32 spatial, ×8 temporal after the first frame, so frames
  are 8k+1 and sizes multiples of 32 px (patch size 1 in the DiT); the VAE normalises its latents with per-channel
  statistics (``per_channel_statistics.mean-of-means`` / ``std-of-means``), so there is no scaling factor. The
  official pipelines generate at 24 fps (Lightricks/LTX-2 ``ltx_pipelines/utils/constants.py``).
- **Audio latents**: ``[B, 8, T, 16]`` — 8 channels × 16 mel bins (64 mel bins ÷ 4), 25 latents per second
  (16 kHz / hop 160 / 4), computed from 16 kHz mel spectrograms.
- **LoRA targets**: ltx-trainer's default ``to_k, to_q, to_v, to_out.0`` inside ``transformer_blocks`` (the six
  attention modules of each of the 48 blocks), Lightricks/LTX-2 ``packages/ltx-trainer`` ``configs/ltx2_av_lora.yaml``.
- **kohya names** (``lora_unet_transformer_blocks_<i>_<module>_<layer>``) resolve with the block grammar below.
- **diffusers names**: diffusers' port renames some modules (``patchify_proj`` → ``proj_in``, ``adaln_single`` →
  ``time_embed``, ``av_ca_*`` → ``av_cross_attn_*``, ``q_norm`` → ``norm_q``, …; huggingface/diffusers
  ``scripts/convert_ltx2_to_diffusers.py``); LoRAs saved by diffusers are read back onto the official names with
  :func:`cinetune.ltx2.config.diffusers_to_official_key`. The block attention and feed-forward names are the same in
  both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..core.checkpoint import register_checkpoint_kind
from ..core.family import AudioLatentFormat, LatentFormat, LoRAKeyGrammar, ModelFamily, register_family
from .config import LTX2_BLOCK_PREFIXES, LTX2_LORA_TARGETS, diffusers_to_official_key

__all__ = ["LTX2_LATENT_FORMAT", "LTX2_AUDIO_LATENT_FORMAT", "LTX2_LORA_GRAMMAR", "LTX2_FAMILY"]

LTX2_AUDIO_LATENT_FORMAT = AudioLatentFormat(channels=8, mel_bins=16, latents_per_second=25.0, sample_rate=16000)

#: The LTX-2 video latent (and its audio latent): 128 channels, ×32 / ×8, 8k+1 frames, 32 px, 24 fps.
LTX2_LATENT_FORMAT = LatentFormat(
    name="ltx-2", channels=128, spatial_factor=32, temporal_factor=8, size_multiple=32, default_fps=24.0,
    scaling_factor=None, audio=LTX2_AUDIO_LATENT_FORMAT)

_ATTENTION = "attn1|attn2|audio_attn1|audio_attn2|audio_to_video_attn|video_to_audio_attn"

#: Module paths of the LTX-2 DiT blocks (distinct from Kandinsky 5's ``*_transformer_blocks`` by their layer names).
LTX2_LORA_GRAMMAR = LoRAKeyGrammar(
    pattern=rf"transformer_blocks[._]\d+[._]({_ATTENTION}|ff|audio_ff)[._]",
    kohya=(rf"(transformer_blocks)_(\d+)_(?:({_ATTENTION})_(to_q|to_k|to_v|to_out)(?:_(0))?"
           r"|(ff|audio_ff)_(net)_(?:(0)_(proj)|(2)))"),
    block_index=rf"transformer_blocks[._](?P<index>\d+)[._](?:{_ATTENTION}|ff|audio_ff)",
    block_counts="LTX-2 19B has 48 blocks",
    diffusers_to_official=diffusers_to_official_key,
)

#: LTX-2, registered on import.
LTX2_FAMILY = register_family(ModelFamily(
    name="ltx-2", display_name="LTX-2", latent_format=LTX2_LATENT_FORMAT, lora_targets=LTX2_LORA_TARGETS,
    lora_within=LTX2_BLOCK_PREFIXES, lora_grammar=LTX2_LORA_GRAMMAR))


@register_checkpoint_kind
def describe_ltx2(shapes: Mapping[str, Sequence[int]]) -> str | None:
    """What an LTX-2 file is, for error messages of any loader (:func:`cinetune.core.checkpoint.describe_checkpoint`):
    the audio+video DiT (its ``audio_adaln_single``, the key ComfyUI ``comfy/model_detection.py`` keys on), or the
    combined file's VAE parts alone; None for other files."""
    names = list(shapes)
    if any("audio_adaln_single." in n for n in names):
        return ("an LTX-2 audio+video checkpoint (goes in models/checkpoints; load it with the LTX-2 Model, VAE and "
                "Text Encoder Loaders)")
    if any(n.startswith("audio_vae.") for n in names) and any(n.startswith("vocoder.") for n in names):
        return "the LTX-2 audio VAE and vocoder (load them with LTX-2 VAE Loader)"
    if any(n.startswith(("vae.per_channel_statistics.", "per_channel_statistics.")) for n in names):
        return "the LTX-2 video VAE (load it with LTX-2 VAE Loader)"
    return None

"""Kandinsky 5 as a model family of the shared code: its latent format, LoRA targets and LoRA key grammar.

Importing this module (``import cinetune.k5`` does) registers :data:`K5_FAMILY` with
:func:`cinetune.core.family.register_family`.

Facts (reference k5.md; sources per value below):

- **Latents**: the HunyuanVideo causal VAE (diffusers ``AutoencoderKLHunyuanVideo`` config): 16 channels, ×8
  spatial, ×4 temporal after the first frame, so frames are 4k+1; the DiT latent is the raw latent × 0.476986
  (the VAE config's ``scaling_factor``, no shift). Sizes are multiples of 16 px (×8 VAE, then 2×2 DiT patches);
  NABLA attention needs 8×8-token tiles, i.e. 128 px (:data:`NABLA_SIZE_MULTIPLE`, checked by ``k5.pipeline``).
  Videos are 24 fps (kandinskylab/kandinsky-5 ``kandinsky/t2v_pipeline.py``: ``seconds·24//4 + 1`` latent frames).
- **LoRA targets**: the Linear layers the official Kandinsky 5 LoRA training targets (PEFT suffix match, so text
  and visual blocks; kandinskylab/kandinsky-5-lora-train ``lora_train.py``, whose attribution is unconfirmed);
  musubi-tuner ``networks/lora_kandinsky.py`` selects exactly the same layers (k5.md §8): 6 per text block and 10
  per visual block (Lite 332, Pro 624).
- **kohya names** (``lora_unet_`` + the path with ``_`` for ``.``, musubi-tuner) are resolved with the block
  grammar ``{text,visual}_transformer_blocks_<i>_<self_attention|cross_attention|feed_forward>_<layer>``.
"""

from __future__ import annotations

from ..core.family import LatentFormat, LoRAKeyGrammar, ModelFamily, register_family

__all__ = ["K5_LATENT_FORMAT", "NABLA_SIZE_MULTIPLE", "K5_LORA_TARGETS", "K5_BLOCK_PREFIXES", "K5_LORA_GRAMMAR",
           "K5_FAMILY"]

#: The Kandinsky 5 video latent: HunyuanVideo VAE geometry and scale, 24 fps, 16 px sizes.
K5_LATENT_FORMAT = LatentFormat(
    name="kandinsky-5", channels=16, spatial_factor=8, temporal_factor=4, size_multiple=16, default_fps=24.0,
    scaling_factor=0.476986)

#: Pixel multiple with NABLA sparse attention: 8×8-token tiles of 2×2 patches of the ×8 VAE latent.
NABLA_SIZE_MULTIPLE = 128

#: The Linear layers the official Kandinsky 5 LoRA training targets (module-name suffixes).
K5_LORA_TARGETS: tuple[str, ...] = (
    "self_attention.to_query", "self_attention.to_key", "self_attention.to_value", "self_attention.out_layer",
    "cross_attention.to_query", "cross_attention.to_key", "cross_attention.to_value", "cross_attention.out_layer",
    "feed_forward.in_layer", "feed_forward.out_layer",
)
#: Where the targets live: the text and visual transformer blocks.
K5_BLOCK_PREFIXES: tuple[str, ...] = ("text_transformer_blocks.", "visual_transformer_blocks.")

#: Module paths of the K5 DiT blocks, the kohya resolver and the block report (Lite 2/32, Pro 4/60 blocks).
K5_LORA_GRAMMAR = LoRAKeyGrammar(
    pattern=r"(text|visual)_transformer_blocks[._]\d+",
    kohya=(r"(text_transformer_blocks|visual_transformer_blocks)_(\d+)_(self_attention|cross_attention|feed_forward)_"
           r"(to_query|to_key|to_value|out_layer|in_layer)"),
    block_index=r"(?P<kind>text|visual)_transformer_blocks[._](?P<index>\d+)",
    block_kinds=("text", "visual"),
    block_counts="Video Lite has 2 text / 32 visual blocks, Video Pro 4 / 60",
)

#: Kandinsky 5, registered on import.
K5_FAMILY = register_family(ModelFamily(
    name="kandinsky-5", display_name="Kandinsky 5", latent_format=K5_LATENT_FORMAT, lora_targets=K5_LORA_TARGETS,
    lora_within=K5_BLOCK_PREFIXES, lora_grammar=K5_LORA_GRAMMAR))

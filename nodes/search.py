"""Search aliases: the words users type to find a node (family names, roles), added to every node's definition.

ComfyUI's node search matches a query against a node definition's ``name`` and ``display_name`` and, in current
frontends, its ``search_aliases`` (a list of strings; Comfy-Org ComfyUI_frontend ``nodeSearchService`` searches the
keys name, display_name and search_aliases). Current ComfyUI fills that field from ``io.Schema(search_aliases=...)``;
ComfyUI 0.3.75's ``Schema`` has no such parameter and its node definitions no such key, so a schema cannot carry
them on both. Instead the node base class serves its definition through :func:`node_info_v1`, which adds this
module's aliases to the ``/object_info`` entry the host built (``GET_NODE_INFO_V1``, the method both versions call
for V3 nodes). Frontends that know the key search it; older ones ignore it.

The aliases of a node are its family's names (from the node id: ``K5`` → Kandinsky 5, ``LTX2`` → LTX-2), the words
for its role (from the node id: sampler, VAE, LoRA, train, dataset, …) and any extra words in :data:`EXTRA_ALIASES`.
Nodes added later get aliases from their id without an entry here.
"""

from __future__ import annotations

import re
from typing import Any

from comfy_api.latest import io

__all__ = ["FAMILY_ALIASES", "ROLE_ALIASES", "EXTRA_ALIASES", "search_aliases", "with_search_aliases",
           "node_info_v1"]

#: Node-id marker → the names users type for the family.
FAMILY_ALIASES: dict[str, tuple[str, ...]] = {
    "K5": ("kandinsky", "kandinsky 5", "kandinsky5", "k5", "kandinsky video"),
    "LTX2": ("ltx", "ltx-2", "ltx2", "ltx 2", "ltxv", "ltx video", "lightricks"),
}

#: Node-id part (a regular expression on the id after the family marker) → words for the node's role. Every matching
#: entry contributes, in this order.
ROLE_ALIASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"ModelLoader", ("load model", "model loader", "checkpoint", "diffusion model", "unet", "dit")),
    (r"TextEncoderLoader", ("text encoder", "load clip", "clip loader")),
    (r"VAELoader", ("vae", "load vae", "vae loader")),
    (r"UpsamplerLoader", ("upscale model", "latent upscaler", "spatial upscaler")),
    (r"TextEncode$", ("prompt", "text encode", "clip text encode", "conditioning", "positive", "negative")),
    (r"Sampler", ("sampler", "ksampler", "sample", "generate", "text to video", "t2v", "image to video", "i2v")),
    (r"VAEDecode|Decode$", ("vae decode", "decode", "vae")),
    (r"VAEEncode", ("vae encode", "encode", "start image", "image to video", "i2v", "vae")),
    (r"LatentUpsample$", ("upscale", "latent upscale", "upsample", "two stage", "stage 2")),
    (r"LoRALoader", ("lora", "load lora", "lora loader")),
    (r"MemoryEstimate", ("memory", "vram", "estimate", "out of memory", "block swap")),
    (r"TrainLoRA", ("train", "training", "lora", "lora training", "trainer", "finetune", "fine-tune")),
    (r"Cache", ("cache", "dataset", "train", "training", "preprocess")),
    (r"Dataset", ("dataset", "training data", "captions", "train", "lora")),
    (r"ValidationPrompt", ("validation", "train", "training", "lora", "prompt")),
    (r"Training\w*Settings", ("train", "training", "lora", "settings")),
    (r"SaveVideo", ("save video", "video", "mp4", "video combine", "export")),
)

#: Node id → words that neither its family nor its role give.
EXTRA_ALIASES: dict[str, tuple[str, ...]] = {
    "CinetuneK5TextEncoderLoader": ("qwen", "qwen2.5-vl", "clip-l"),
    "CinetuneLTX2TextEncoderLoader": ("gemma", "gemma 3"),
    "CinetuneK5VAELoader": ("hunyuan vae", "hunyuanvideo vae"),
    "CinetuneK5Sampler": ("nabla",),
    "CinetuneLTX2Sampler": ("audio", "sound", "text to audio"),
    "CinetuneLTX2Decode": ("audio", "vocoder"),
    "CinetuneTrainingOptimizerSettings": ("optimizer", "adamw", "prodigy", "learning rate"),
    "CinetuneTrainingLoRASettings": ("rank", "alpha"),
    "CinetuneTrainingSamplingSettings": ("timestep", "sigma"),
    "CinetuneTrainingCheckpointSettings": ("checkpoint", "save", "resume"),
    "CinetuneCombineDatasets": ("merge datasets",),
}

_PREFIX = "Cinetune"


def search_aliases(node_id: str) -> list[str]:
    """The aliases of node ``node_id`` (lower case, each once, family names first).

    Args:
        node_id: a Cinetune node id such as ``"CinetuneK5Sampler"``; other ids get no aliases.
    Returns:
        Family names, role words and :data:`EXTRA_ALIASES`, in that order.
    """
    if not node_id.startswith(_PREFIX):
        return []
    rest = node_id[len(_PREFIX):]
    words: list[str] = []
    for marker, names in FAMILY_ALIASES.items():
        if rest.startswith(marker):
            words += names
            rest = rest[len(marker):]
            break
    for pattern, role in ROLE_ALIASES:
        if re.search(pattern, rest):
            words += role
    words += EXTRA_ALIASES.get(node_id, ())
    return list(dict.fromkeys(w.lower() for w in words))


def with_search_aliases(info: dict[str, Any]) -> dict[str, Any]:
    """``info`` (a node definition as ``/object_info`` serves it) with this module's aliases merged into its
    ``search_aliases`` after any the schema already gave (current ComfyUI); returns the same dict."""
    given = info.get("search_aliases") or []
    merged = list(dict.fromkeys([*given, *search_aliases(str(info.get("name") or ""))]))
    if merged:
        info["search_aliases"] = merged
    return info


def node_info_v1(cls: type[io.ComfyNode]) -> dict[str, Any]:
    """The node definition the host serves for ``cls`` (``io.ComfyNode.GET_NODE_INFO_V1``), with search aliases.

    Meant as the node base class's ``GET_NODE_INFO_V1 = classmethod(search.node_info_v1)``.
    """
    return with_search_aliases(io.ComfyNode.GET_NODE_INFO_V1.__func__(cls))

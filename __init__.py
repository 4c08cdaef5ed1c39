"""Cinetune: Kandinsky 5 and LTX-2 video generation and LoRA training inside ComfyUI.

This file is the ComfyUI entry point only. It must stay import-light: ``import cinetune.k5``
outside ComfyUI imports this module first and must never pull in ``comfy``.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    """Return the pack's ComfyUI extension (V3 API). Nodes are imported lazily, inside the host."""
    from .nodes.extension import CinetuneExtension

    return CinetuneExtension()

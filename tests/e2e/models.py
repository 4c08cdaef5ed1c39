"""The embedded tiny default models placed in the host's model folders, and the workflow overrides that
point an example workflow at them (small size, few steps). Used by the end-to-end tests and the demo."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import provision_test_data  # noqa: E402
from cinetune.k5.tiny import write_tiny_defaults  # noqa: E402

TINY_SIZE = {"width": 128, "height": 64, "frames": 9, "steps": 4}


def populate_models(layout) -> dict[str, str]:
    """Write the tiny DiT, VAE, Qwen2.5-VL and CLIP into ``layout.models``; returns their ComfyUI names."""
    data = provision_test_data.provision()
    return write_tiny_defaults(layout.models, qwen_tokenizer_dir=data["qwen_tokenizer"],
                               clip_tokenizer_dir=data["clip_tokenizer"])


def tiny_workflow(api: dict, names: dict[str, str], **sizes) -> dict:
    """A copy of an API-format K5 workflow with model files replaced by the tiny ones and a small video size."""
    api = copy.deepcopy(api)
    size = {**TINY_SIZE, **sizes}
    for node in api.values():
        inputs, ctype = node["inputs"], node["class_type"]
        if ctype == "CinetuneK5ModelLoader":
            inputs["dit_name"] = names["dit"]
        elif ctype == "CinetuneK5TextEncoderLoader":
            inputs.update(qwen_name=names["qwen"], clip_name=names["clip"], dtype="fp32")
        elif ctype == "CinetuneK5VAELoader":
            inputs["vae_name"] = names["vae"]
        elif ctype == "CinetuneK5Sampler":
            inputs.update(size)
        elif ctype == "CinetuneK5VAEEncode":
            inputs.update(width=size["width"], height=size["height"])
    return api

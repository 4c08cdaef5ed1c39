"""The embedded tiny default models placed in the host's model folders, and the workflow overrides that
point an example workflow at them (small size, few steps). Used by the end-to-end tests and the demo."""

from __future__ import annotations

import copy
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import provision_test_data  # noqa: E402
from cinetune.k5.tiny import write_tiny_defaults  # noqa: E402
from cinetune.ltx2.tiny import write_tiny_ltx2_defaults  # noqa: E402

TINY_SIZE = {"width": 128, "height": 64, "frames": 9, "steps": 4}
TINY_LTX2 = {"width": 128, "height": 64, "frames": 9, "steps": 3, "fps": 24.0, "stg_block": 1}
TINY_TRAINING = {"frames": 17, "resolution": 128, "max_steps": 30, "save_every": 10}
# LTX-2 training: 9-frame clips in 32 px buckets around 96² (the Big Buck Bunny clip lands in 128×64), 10 steps of a
# rank-4 LoRA, one 2-step validation clip with sound at the last step.
TINY_LTX2_TRAINING = {"frames": 9, "resolution": 96, "max_steps": 10, "save_every": 5, "rank": 4,
                      "validation_sampling_steps": 2}
DATASET_FOLDER = "k5_lora_dataset"  # inside the host's input folder, as the example workflow expects
EXAMPLE_INPUTS = ROOT / "example_workflows" / "input"  # files the example workflows read from the input folder


def populate_dataset(layout) -> Path:
    """A small real dataset in the host's input folder: the Big Buck Bunny clip and two photos, with captions."""
    media = provision_test_data.locate_media()
    folder = Path(layout.input) / DATASET_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    captions = {"bbb": "a big white rabbit walks out of his burrow in a green meadow, cartoon style",
                "astronaut": "portrait of an astronaut in a white suit in front of a flag",
                "coffee": "a cup of coffee on a saucer, seen from above"}
    for name, caption in captions.items():
        src = media[name]
        shutil.copy(src, folder / f"{name}{src.suffix}")
        (folder / f"{name}.txt").write_text(caption + "\n")
    return folder


def install_example_inputs(layout) -> list[Path]:
    """Copy the files the example workflows read (``example_workflows/input``, e.g. the image-to-video start image)
    into the host's input folder, keeping files already there; returns the copies' paths."""
    copies = []
    for src in sorted(EXAMPLE_INPUTS.glob("*")):
        dst = Path(layout.input) / src.name
        if src.is_file() and not dst.exists():
            shutil.copy(src, dst)
            copies.append(dst)
    return copies


def populate_models(layout) -> dict[str, str]:
    """Write the tiny Kandinsky 5 models (DiT, VAE, Qwen2.5-VL, CLIP) and LTX-2 models (combined checkpoint, Gemma 3,
    latent upsampler, distilled LoRA) into ``layout.models``, the small training dataset and the example workflows'
    input files into the input folder; returns the models' ComfyUI names."""
    data = provision_test_data.provision()
    populate_dataset(layout)
    install_example_inputs(layout)
    names = write_tiny_defaults(layout.models, qwen_tokenizer_dir=data["qwen_tokenizer"],
                                clip_tokenizer_dir=data["clip_tokenizer"])
    names.update(write_tiny_ltx2_defaults(layout.models, gemma_tokenizer_dir=data["gemma3_tokenizer"]))
    return names


def tiny_workflow(api: dict, names: dict[str, str], *, output_name: str = "tiny_lora", max_steps: int | None = None,
                  **sizes) -> dict:
    """A copy of an API-format workflow with model files replaced by the tiny ones, a small video size and, for
    training workflows, the small dataset, a small clip size, few steps (K5 30, LTX-2 10; or ``max_steps``) and the
    given run/LoRA name. ``sizes`` override the K5 sampler's widgets."""
    api = copy.deepcopy(api)
    size = {**TINY_SIZE, **sizes}
    _tiny_ltx2(api, names, output_name=output_name, max_steps=max_steps or TINY_LTX2_TRAINING["max_steps"])
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
        elif ctype == "CinetuneK5CacheLatents":
            inputs.update(frames=TINY_TRAINING["frames"], resolution=TINY_TRAINING["resolution"])
        elif ctype == "CinetuneDatasetFolder":
            inputs["folder"] = DATASET_FOLDER
        elif ctype == "CinetuneK5TrainLoRA":
            inputs.update(max_steps=max_steps or TINY_TRAINING["max_steps"], save_every=TINY_TRAINING["save_every"],
                          output_name=output_name, rank=8, alpha=8.0, learning_rate=1e-3)
        elif ctype == "CinetuneK5ValidationPrompt":
            inputs.update(frames=5, steps=2)
    return api


def _tiny_ltx2(api: dict, names: dict[str, str], *, output_name: str, max_steps: int) -> None:
    """Point the LTX-2 nodes of an API workflow at the tiny LTX-2 models, a small size and few steps (a two-stage
    workflow's first stage at half the size); training: small clips (photos with a silent track), ``max_steps``
    steps and one validation clip at the last step."""
    two_stage = any(n["class_type"] == "CinetuneLTX2Sampler" and n["inputs"].get("mode") == "stage 2"
                    for n in api.values())
    for node in api.values():
        inputs, ctype = node["inputs"], node["class_type"]
        if ctype == "CinetuneLTX2ModelLoader":
            inputs["ckpt_name"] = names["ltx2"]
        elif ctype == "CinetuneLTX2TextEncoderLoader":
            inputs.update(gemma_name=names["gemma"], ckpt_name=names["ltx2"], dtype="fp32")
        elif ctype == "CinetuneLTX2VAELoader":
            inputs["vae_name"] = names["ltx2"]
        elif ctype == "CinetuneLTX2UpsamplerLoader":
            inputs["upsampler_name"] = names["ltx2_upsampler"]
        elif ctype == "CinetuneLTX2LoRALoader":
            inputs["lora_name"] = names["ltx2_distilled_lora"]
        elif ctype == "CinetuneLTX2Sampler":
            inputs.update(TINY_LTX2)
            if two_stage and inputs["mode"] != "stage 2":
                inputs.update(width=TINY_LTX2["width"] // 2, height=TINY_LTX2["height"] // 2)
        elif ctype == "CinetuneLTX2CacheLatents":
            inputs.update(frames=TINY_LTX2_TRAINING["frames"], resolution=TINY_LTX2_TRAINING["resolution"],
                          missing_audio="silence")
        elif ctype == "CinetuneLTX2TrainLoRA":
            rank = TINY_LTX2_TRAINING["rank"]
            inputs.update(output_name=output_name, max_steps=max_steps, save_every=TINY_LTX2_TRAINING["save_every"],
                          rank=rank, alpha=float(rank), learning_rate=1e-3, validate_every=0,
                          validation_steps=str(max_steps),
                          validation_sampling_steps=TINY_LTX2_TRAINING["validation_sampling_steps"])
        elif ctype == "CinetuneLTX2ValidationPrompt":
            inputs.update(frames=TINY_LTX2_TRAINING["frames"], steps=TINY_LTX2_TRAINING["validation_sampling_steps"])


def tiny_ui_workflow(name: str, names: dict[str, str], **overrides) -> dict:
    """The UI-format example workflow ``name`` with the same tiny settings as :func:`tiny_workflow`, built from the
    workflow description in scripts/make_workflows.py with the example's layout (for tests that drive the real
    frontend)."""
    import make_workflows

    spec = make_workflows.WORKFLOWS[name]
    nodes = make_workflows.resolve_nodes(spec["nodes"], spec.get("dit"))
    tiny = tiny_workflow(make_workflows.to_api(nodes), names, **overrides)
    nodes = [(nid, ctype, [(n, tiny[str(nid)]["inputs"].get(n, v)) for n, v in widgets], links, outputs)
             for nid, ctype, widgets, links, outputs in nodes]
    return make_workflows.build(name, nodes)[0]

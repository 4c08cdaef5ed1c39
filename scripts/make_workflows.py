"""Writes the example workflows: UI format (``example_workflows/*.json``, shown in ComfyUI's template
browser) and API format (``example_workflows/api/*.json``, queued by the demo and the end-to-end tests).

Both come from one graph description below, so they cannot drift apart; the end-to-end tests also check
that converting the UI file with the live server's ``/object_info`` gives the API file.
Run: ``python scripts/make_workflows.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NEGATIVE = ("Static, 2D cartoon, cartoon, 2d animation, paintings, images, worst quality, low quality, ugly, deformed, "
            "walking backwards")

# Node: (id, class_type, widgets as ordered (name, value) pairs, linked inputs {name: (src_id, src_slot, type)},
#        outputs [(name, type)]). Widget order must match the node schema; a seed widget is followed by its
#        control_after_generate value in the UI format.
LOADERS = [
    (1, "CinetuneK5ModelLoader", [("dit_name", None), ("variant", "auto"), ("weight_dtype", "default"),
                                  ("attention", "sdpa"), ("nabla", "auto"), ("blocks_to_swap", 0),
                                  ("use_pinned_memory", True)], {}, [("model", "CINETUNE_K5_MODEL")]),
    (2, "CinetuneK5TextEncoderLoader", [("qwen_name", "qwen_2.5_vl_7b.safetensors"), ("clip_name", "clip_l.safetensors"),
                                        ("dtype", "bf16")], {}, [("text_encoder", "CINETUNE_K5_TEXT_ENCODER")]),
    (3, "CinetuneK5VAELoader", [("vae_name", "hunyuan_video_vae_bf16.safetensors"), ("dtype", "fp32")], {},
     [("vae", "CINETUNE_K5_VAE")]),
]


def text_encode(prompt: str):
    return (4, "CinetuneK5TextEncode", [("prompt", prompt), ("negative_prompt", NEGATIVE), ("template", "video")],
            {"text_encoder": (2, 0, "CINETUNE_K5_TEXT_ENCODER")}, [("conditioning", "CINETUNE_K5_CONDITIONING")])


def sampler(scheduler_scale: float, start: bool):
    links = {"model": (1, 0, "CINETUNE_K5_MODEL"), "conditioning": (4, 0, "CINETUNE_K5_CONDITIONING")}
    if start:
        links["start_latent"] = (9, 0, "LATENT")
    return (5, "CinetuneK5Sampler", [("width", 768), ("height", 512), ("frames", 121), ("seed", 42), ("steps", 50),
                                     ("guidance", 5.0), ("scheduler_scale", scheduler_scale)], links,
            [("latent", "LATENT")])


DECODE_AND_SAVE = [
    (6, "CinetuneK5VAEDecode", [("tiling", True)], {"vae": (3, 0, "CINETUNE_K5_VAE"), "latent": (5, 0, "LATENT")},
     [("images", "IMAGE")]),
]


def save(prefix: str):
    return (7, "CinetuneSaveVideo", [("fps", 24.0), ("filename_prefix", prefix)], {"images": (6, 0, "IMAGE")}, [])


def settings_nodes(validation_prompt):
    """The training settings nodes (ids 14-17, their defaults: the run as without them) and a validation prompt (id
    18) reading the prompt of node 4, and the trainer links to them."""
    nodes = [
        (14, "CinetuneTrainingOptimizerSettings",
         [("weight_decay", 0.001), ("beta1", 0.9), ("beta2", 0.95), ("eps", 1e-8), ("max_grad_norm", 1.0),
          ("min_lr_ratio", 0.0), ("d_coef", 1.0), ("safeguard_warmup", False)], {},
         [("optimizer_settings", "CINETUNE_OPTIMIZER_SETTINGS")]),
        (15, "CinetuneTrainingLoRASettings",
         [("include_patterns", ""), ("exclude_patterns", ""), ("lora_dropout", 0.0), ("rank_dropout", 0.0),
          ("module_dropout", 0.0), ("init_lora", "none")], {}, [("lora_settings", "CINETUNE_LORA_SETTINGS")]),
        (16, "CinetuneTrainingSamplingSettings",
         [("sigma_min", 0.0), ("sigma_max", 1.0), ("loss_weighting", "none"), ("i2v_probability", -1.0)], {},
         [("sampling_settings", "CINETUNE_SAMPLING_SETTINGS")]),
        (17, "CinetuneTrainingCheckpointSettings",
         [("save_every_epochs", 0), ("keep_checkpoints", 3), ("save_dtype", "bf16"), ("tensorboard", False),
          ("ema_decay", 0.0), ("validation_loss_every", 0), ("validation_loss_sigmas", "0.1, 0.3, 0.5, 0.7, 0.9")],
         {}, [("checkpoint_settings", "CINETUNE_CHECKPOINT_SETTINGS")]),
        validation_prompt,
    ]
    links = {"optimizer_settings": (14, 0, "CINETUNE_OPTIMIZER_SETTINGS"),
             "lora_settings": (15, 0, "CINETUNE_LORA_SETTINGS"),
             "sampling_settings": (16, 0, "CINETUNE_SAMPLING_SETTINGS"),
             "checkpoint_settings": (17, 0, "CINETUNE_CHECKPOINT_SETTINGS"),
             "validation": (18, 0, validation_prompt[4][0][1])}
    return nodes, links


def training_nodes():
    """Cache a dataset, train a K5 LoRA with every settings node and a validation prompt, then sample with it."""
    text = text_encode("ohwx, a big white rabbit stands in a sunny meadow, cartoon style")
    train_sampler = (5, "CinetuneK5Sampler", sampler(5.0, start=False)[2],
                     {"model": (13, 0, "CINETUNE_K5_MODEL"), "conditioning": (4, 0, "CINETUNE_K5_CONDITIONING")},
                     [("latent", "LATENT")])
    validation = (18, "CinetuneK5ValidationPrompt",
                  [("width", 0), ("height", 0), ("frames", 17), ("steps", 20), ("guidance", 5.0),
                   ("scheduler_scale", 5.0), ("seed", 42), ("sample_at_start", False)],
                  {"conditioning": (4, 0, "CINETUNE_K5_CONDITIONING")}, [("validation", "CINETUNE_K5_VALIDATION")])
    settings, settings_links = settings_nodes(validation)
    return [*LOADERS,
            (10, "CinetuneDatasetFolder", [("folder", "k5_lora_dataset"), ("repeats", 1), ("trigger_word", "ohwx"),
                                            ("default_caption", "")], {}, [("dataset", "CINETUNE_DATASET")]),
            (11, "CinetuneK5CacheText", [("cache_name", "k5_lora_dataset")],
             {"dataset": (10, 0, "CINETUNE_DATASET"), "text_encoder": (2, 0, "CINETUNE_K5_TEXT_ENCODER")},
             [("text_cache", "CINETUNE_K5_TEXT_CACHE")]),
            (12, "CinetuneK5CacheLatents", [("frames", 49), ("frame_selection", "head"), ("resolution", 512),
                                            ("nabla", False), ("image_to_video", False), ("allow_upscale", False)],
             {"text_cache": (11, 0, "CINETUNE_K5_TEXT_CACHE"), "vae": (3, 0, "CINETUNE_K5_VAE")},
             [("training_data", "CINETUNE_K5_TRAINING_DATA")]),
            text, *settings,
            (13, "CinetuneK5TrainLoRA",
             [("output_name", "k5_lora"), ("rank", 16), ("alpha", 16.0), ("learning_rate", 1e-4),
              ("optimizer", "adamw"), ("lr_schedule", "constant"), ("warmup_steps", 0), ("max_steps", 1000),
              ("epochs", 0), ("batch_size", 1), ("gradient_accumulation", 1), ("timestep_sampling", "shift"),
              ("flow_shift", 5.0), ("gradient_checkpointing", True), ("image_to_video", "off"),
              ("caption_dropout", 0.0), ("seed", 0), ("save_every", 250), ("resume", False), ("validate_every", 250),
              ("blocks_to_swap", -1), ("use_pinned_memory", True)],
             {"model": (1, 0, "CINETUNE_K5_MODEL"), "training_data": (12, 0, "CINETUNE_K5_TRAINING_DATA"),
              "vae": (3, 0, "CINETUNE_K5_VAE"), **settings_links},
             [("model", "CINETUNE_K5_MODEL"), ("lora_name", "STRING")]),
            train_sampler, *DECODE_AND_SAVE, save("Cinetune/k5_lora_sample")]


LTX2_CKPT = "ltx-2-19b-dev.safetensors"
LTX2_NEGATIVE = None  # filled from the library's official default negative prompt in main()
LTX2_LOADERS = [
    (1, "CinetuneLTX2ModelLoader", [("ckpt_name", LTX2_CKPT), ("weight_dtype", "default"), ("attention", "sdpa"),
                                    ("blocks_to_swap", 0), ("use_pinned_memory", True)], {},
     [("model", "CINETUNE_LTX2_MODEL")]),
    (2, "CinetuneLTX2TextEncoderLoader", [("gemma_name", "gemma_3_12B_it.safetensors"), ("ckpt_name", LTX2_CKPT),
                                          ("dtype", "bf16")], {}, [("text_encoder", "CINETUNE_LTX2_TEXT_ENCODER")]),
    (3, "CinetuneLTX2VAELoader", [("vae_name", LTX2_CKPT), ("audio_vae_name", "(same file)"), ("dtype", "fp32")], {},
     [("vae", "CINETUNE_LTX2_VAE")]),
]


def ltx2_text_encode(prompt: str):
    return (4, "CinetuneLTX2TextEncode", [("prompt", prompt), ("negative_prompt", "<official>")],
            {"text_encoder": (2, 0, "CINETUNE_LTX2_TEXT_ENCODER")}, [("conditioning", "CINETUNE_LTX2_CONDITIONING")])


def ltx2_sampler(nid: int, *, width: int, height: int, mode: str, links: dict):
    widgets = [("width", width), ("height", height), ("frames", 121), ("fps", 24.0), ("seed", 42), ("steps", 40),
               ("mode", mode), ("video_cfg", 3.0), ("audio_cfg", 7.0), ("stg", 1.0), ("stg_block", 29), ("modality_guidance", 3.0),
               ("rescale", 0.7), ("scheduler", "official"), ("audio", True), ("image_strength", 1.0)]
    links = {"model": (1, 0, "CINETUNE_LTX2_MODEL"), "conditioning": (4, 0, "CINETUNE_LTX2_CONDITIONING"), **links}
    return (nid, "CinetuneLTX2Sampler", widgets, links, [("video_latent", "LATENT"), ("audio_latent", "LATENT")])


def ltx2_decode_and_save(src: int, prefix: str):
    return [(6, "CinetuneLTX2Decode", [("tiling", True)],
             {"vae": (3, 0, "CINETUNE_LTX2_VAE"), "video_latent": (src, 0, "LATENT"), "audio_latent": (src, 1, "LATENT")},
             [("images", "IMAGE"), ("audio", "AUDIO")]),
            (7, "CinetuneSaveVideo", [("fps", 24.0), ("filename_prefix", prefix)],
             {"images": (6, 0, "IMAGE"), "audio": (6, 1, "AUDIO")}, [])]


def ltx2_training_nodes():
    """Cache a dataset (captions, video and sound latents), train an LTX-2 LoRA with every settings node and a
    validation prompt (clips with sound), then sample with the trained LoRA."""
    text = ltx2_text_encode("ohwx, a big white rabbit walks out of his burrow in a green meadow and stretches, "
                            "cartoon style. Birds chirp and leaves rustle in a light breeze.")
    validation = (18, "CinetuneLTX2ValidationPrompt",
                  [("width", 0), ("height", 0), ("frames", 49), ("fps", 0.0), ("steps", 30), ("video_cfg", 3.0),
                   ("audio_cfg", 7.0), ("seed", 42), ("sample_at_start", False)],
                  {"conditioning": (4, 0, "CINETUNE_LTX2_CONDITIONING")},
                  [("validation", "CINETUNE_LTX2_VALIDATION")])
    settings, settings_links = settings_nodes(validation)
    return [*LTX2_LOADERS,
            (10, "CinetuneDatasetFolder", [("folder", "ltx2_lora_dataset"), ("repeats", 1), ("trigger_word", "ohwx"),
                                            ("default_caption", "")], {}, [("dataset", "CINETUNE_DATASET")]),
            (11, "CinetuneLTX2CacheText", [("cache_name", "ltx2_lora_dataset")],
             {"dataset": (10, 0, "CINETUNE_DATASET"), "text_encoder": (2, 0, "CINETUNE_LTX2_TEXT_ENCODER")},
             [("text_cache", "CINETUNE_LTX2_TEXT_CACHE")]),
            (12, "CinetuneLTX2CacheLatents", [("frames", 121), ("frame_selection", "head"), ("resolution", 512),
                                              ("audio", True), ("image_to_video", False), ("allow_upscale", False),
                                              ("missing_audio", "silence"), ("fps", 0.0)],
             {"text_cache": (11, 0, "CINETUNE_LTX2_TEXT_CACHE"), "vae": (3, 0, "CINETUNE_LTX2_VAE")},
             [("training_data", "CINETUNE_LTX2_TRAINING_DATA")]),
            text, *settings,
            (13, "CinetuneLTX2TrainLoRA",
             [("output_name", "ltx2_lora"), ("rank", 32), ("alpha", 32.0), ("learning_rate", 1e-4),
              ("optimizer", "adamw"), ("lr_schedule", "linear"), ("warmup_steps", 0), ("max_steps", 2000),
              ("epochs", 0), ("batch_size", 1), ("gradient_accumulation", 1),
              ("timestep_sampling", "shifted_logit_normal"), ("flow_shift", 1.0), ("gradient_checkpointing", True),
              ("audio", True), ("first_frame_conditioning", 0.5), ("caption_dropout", 0.0), ("seed", 0),
              ("save_every", 250), ("resume", False), ("validate_every", 250), ("validation_steps", ""),
              ("validation_sampling_steps", 30), ("blocks_to_swap", -1), ("use_pinned_memory", True)],
             {"model": (1, 0, "CINETUNE_LTX2_MODEL"), "training_data": (12, 0, "CINETUNE_LTX2_TRAINING_DATA"),
              "vae": (3, 0, "CINETUNE_LTX2_VAE"), **settings_links},
             [("model", "CINETUNE_LTX2_MODEL"), ("lora_name", "STRING")]),
            ltx2_sampler(5, width=768, height=512, mode="dev", links={"model": (13, 0, "CINETUNE_LTX2_MODEL")}),
            *ltx2_decode_and_save(5, "Cinetune/ltx2_lora_sample")]


LTX2_PROMPT = ("A red fox trots through fresh snow in a birch forest at sunrise, the camera tracks it from the side. "
               "Snow crunches under its paws, a light wind rustles the branches and a crow calls in the distance.")

WORKFLOWS = {
    "k5_text_to_video": {
        "dit": "kandinsky5lite_t2v_sft_5s.safetensors",
        "nodes": [*LOADERS,
                  text_encode("A red fox trots through fresh snow in a birch forest at sunrise, the camera tracks it "
                              "from the side, soft golden light, shallow depth of field."),
                  sampler(5.0, start=False), *DECODE_AND_SAVE, save("Cinetune/k5_t2v")],
    },
    "k5_image_to_video": {
        "dit": "kandinsky5lite_i2v_5s.safetensors",
        "nodes": [*LOADERS,
                  text_encode("The astronaut smiles and slowly turns her head towards the camera, the flag behind her "
                              "moves gently, studio lighting."),
                  (8, "LoadImage", [("image", "astronaut.png"), ("upload", "image")], {}, [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
                  (9, "CinetuneK5VAEEncode", [("width", 768), ("height", 512)],
                   {"vae": (3, 0, "CINETUNE_K5_VAE"), "image": (8, 0, "IMAGE")}, [("start_latent", "LATENT")]),
                  sampler(10.0, start=True), *DECODE_AND_SAVE, save("Cinetune/k5_i2v")],
    },
    "k5_lora_training": {"dit": "kandinsky5lite_t2v_sft_5s.safetensors", "nodes": training_nodes()},
    "ltx2_text_to_video": {
        "nodes": [*LTX2_LOADERS, ltx2_text_encode(LTX2_PROMPT),
                  ltx2_sampler(5, width=768, height=512, mode="dev", links={}),
                  *ltx2_decode_and_save(5, "Cinetune/ltx2_t2v")],
    },
    "ltx2_image_to_video": {
        "nodes": [*LTX2_LOADERS,
                  ltx2_text_encode("The astronaut smiles and slowly turns her head towards the camera while the flag "
                                   "behind her moves gently. She says: \"Hello from the station.\" A soft hum of "
                                   "air conditioning fills the room."),
                  (8, "LoadImage", [("image", "astronaut.png"), ("upload", "image")], {},
                   [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
                  ltx2_sampler(5, width=768, height=512, mode="dev",
                               links={"vae": (3, 0, "CINETUNE_LTX2_VAE"), "start_image": (8, 0, "IMAGE")}),
                  *ltx2_decode_and_save(5, "Cinetune/ltx2_i2v")],
    },
    "ltx2_lora_training": {"nodes": ltx2_training_nodes()},
    "ltx2_two_stage": {
        "nodes": [*LTX2_LOADERS, ltx2_text_encode(LTX2_PROMPT),
                  ltx2_sampler(5, width=384, height=256, mode="dev", links={}),
                  (10, "CinetuneLTX2UpsamplerLoader", [("upsampler_name", "ltx-2-spatial-upscaler-x2-1.0.safetensors")],
                   {}, [("upsampler", "CINETUNE_LTX2_UPSAMPLER")]),
                  (11, "CinetuneLTX2LoRALoader", [("lora_name", "ltx-2-19b-distilled-lora-384.safetensors"),
                                                  ("strength", 0.6)],
                   {"model": (1, 0, "CINETUNE_LTX2_MODEL")}, [("model", "CINETUNE_LTX2_MODEL")]),
                  (12, "CinetuneLTX2LatentUpsample", [],
                   {"upsampler": (10, 0, "CINETUNE_LTX2_UPSAMPLER"), "vae": (3, 0, "CINETUNE_LTX2_VAE"),
                    "video_latent": (5, 0, "LATENT")}, [("video_latent", "LATENT")]),
                  ltx2_sampler(13, width=768, height=512, mode="stage 2",
                               links={"model": (11, 0, "CINETUNE_LTX2_MODEL"), "video_latent": (12, 0, "LATENT"),
                                      "audio_latent": (5, 1, "LATENT")}),
                  *ltx2_decode_and_save(13, "Cinetune/ltx2_two_stage")],
    },
}


def _ltx2_negative() -> str:
    from cinetune.ltx2.text import DEFAULT_NEGATIVE_PROMPT

    return DEFAULT_NEGATIVE_PROMPT


def resolve_nodes(nodes, dit=None):
    """The node descriptions with the workflow's DiT file name and the LTX-2 default negative prompt filled in."""
    out = []
    for nid, ctype, widgets, links, outputs in nodes:
        widgets = [(n, dit if (ctype == "CinetuneK5ModelLoader" and n == "dit_name") else v) for n, v in widgets]
        widgets = [(n, _ltx2_negative() if v == "<official>" else v) for n, v in widgets]
        out.append((nid, ctype, widgets, links, outputs))
    return out


def to_api(nodes) -> dict:
    api = {}
    for nid, ctype, widgets, links, _ in nodes:
        inputs = {n: v for n, v in widgets if not (ctype == "LoadImage" and n == "upload")}
        inputs.update({n: [str(src), slot] for n, (src, slot, _) in links.items()})
        api[str(nid)] = {"class_type": ctype, "inputs": inputs, "_meta": {"title": ctype}}
    return api


def _height(widgets, links) -> int:
    """Rough node height in the canvas: title, sockets, widgets (multiline prompts are taller), the loss chart."""
    tall = sum(1 for n, _ in widgets if "prompt" in n)
    chart = 180 if any(n == "max_steps" for n, _ in widgets) else 0
    return 40 + 22 * (len(links) + 1) + 24 * len(widgets) + 60 * tall + chart


def to_ui(nodes) -> dict:
    link_rows, ui_nodes = [], []
    consumers: dict[tuple[int, int], list[int]] = {}
    for nid, _, _, links, _ in nodes:
        for name, (src, slot, typ) in links.items():
            link_id = len(link_rows) + 1
            link_rows.append([link_id, src, slot, nid, None, typ, name])
            consumers.setdefault((src, slot), []).append(link_id)
    positions, x, y = {}, 60, 80
    for nid, _, widgets, links, _ in nodes:  # columns of nodes, a new column when one gets too tall
        if y > 80 and y + _height(widgets, links) > 1200:
            x, y = x + 380, 80
        positions[nid] = [x, y]
        y += _height(widgets, links) + 60
    for order, (nid, ctype, widgets, links, outputs) in enumerate(nodes):
        inputs = []
        for name, (src, slot, typ) in links.items():
            row = next(r for r in link_rows if r[3] == nid and r[6] == name)
            row[4] = len(inputs)
            inputs.append({"name": name, "type": typ, "link": row[0]})
        values = []
        for n, v in widgets:
            values.append(v)
            if n == "seed":
                values.append("fixed")
        ui_nodes.append({
            "id": nid, "type": ctype, "pos": positions[nid], "size": [340, _height(widgets, links)],
            "flags": {}, "order": order, "mode": 0, "inputs": inputs,
            "outputs": [{"name": n, "type": t, "links": consumers.get((nid, i), []), "slot_index": i}
                        for i, (n, t) in enumerate(outputs)],
            "properties": {"Node name for S&R": ctype, "cnr_id": "comfy-core" if ctype == "LoadImage" else "cinetune"},
            "widgets_values": values,
        })
    return {"id": "00000000-0000-4000-8000-000000000000", "revision": 0, "last_node_id": max(n[0] for n in nodes),
            "last_link_id": len(link_rows), "nodes": ui_nodes, "links": [r[:6] for r in link_rows], "groups": [],
            "config": {}, "extra": {}, "version": 0.4}


def main() -> None:
    for name, wf in WORKFLOWS.items():
        nodes = resolve_nodes(wf["nodes"], wf.get("dit"))
        (ROOT / "example_workflows" / f"{name}.json").write_text(json.dumps(to_ui(nodes), indent=2) + "\n")
        (ROOT / "example_workflows" / "api" / f"{name}.json").write_text(json.dumps(to_api(nodes), indent=2) + "\n")


if __name__ == "__main__":
    main()

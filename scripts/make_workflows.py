"""Writes the example workflows: UI format (``example_workflows/*.json``, shown in ComfyUI's template browser) and
API format (``example_workflows/api/*.json``, queued by the demo and the end-to-end tests).

Both come from one graph description below, so they cannot drift apart; the end-to-end tests also check that
converting the UI file with the live server's ``/object_info`` gives the API file. The UI files are laid out to be
read (``scripts/workflow_layout.py``): nodes in columns left to right in dependency order, every link running
forward through the gaps between nodes, a link that would pass behind a node carried over the graph by native
reroutes; groups name the stages (Load / Encode / Sample / Decode / Save; Data / Cache / Validate / Train); a
Markdown note on the left says what the workflow does and lists each model file, its ``models/`` folder and its
download link; loaders carry ``properties.models`` entries (name, url, directory), which the frontend's
missing-models dialog reads to offer the downloads, as in ComfyUI's own templates; the prompt nodes are titled.

ComfyUI's template browser lists every ``*.json`` directly in ``example_workflows`` under the pack's folder name,
shows ``<name>.jpg`` beside it as the thumbnail (``scripts/make_thumbnails.py`` makes them from real outputs) and
the file name, with ``_`` and ``-`` as spaces, as its description: custom-node templates have no index file in
ComfyUI 0.3.75 or in current frontends (``app/custom_node_manager.py`` lists names only), so nothing else may be
stored there as ``.json``, and the names say what each workflow does.
Run: ``python scripts/make_workflows.py``.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workflow_layout import BODY_PAD, COLUMN_GAP, SLOT_H, TITLE_H, WIDGET_H, Box, lay_out  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "example_workflows"
#: Files the example workflows read from ComfyUI's ``input/`` folder, shipped here (a real photo: scikit-image's
#: ``astronaut.png``, NASA, public domain, downscaled).
EXAMPLE_INPUTS = EXAMPLES / "input"

# --------------------------------------------------------------------------------------------- model files

#: Model file name → (ComfyUI models folder, download URL). Sources: the README's "Where the model files go" table;
#: kandinskylab/Kandinsky-5.0-* (``model/`` folder), Lightricks/LTX-2 (repository root), ComfyUI's repackaged text
#: encoders and VAE (Comfy-Org/Qwen-Image_ComfyUI, comfyanonymous/flux_text_encoders, Comfy-Org/HunyuanVideo_repackaged,
#: Comfy-Org/ltx-2 ``split_files/``), the same files ComfyUI's own Kandinsky 5, HunyuanVideo and LTX-2 templates use.
def _hf(repo: str, path: str) -> str:
    return f"https://huggingface.co/{repo}/resolve/main/{path}"


MODEL_FILES: dict[str, tuple[str, str]] = {
    "kandinsky5lite_t2v_sft_5s.safetensors": (
        "diffusion_models",
        _hf("kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s", "model/kandinsky5lite_t2v_sft_5s.safetensors")),
    "kandinsky5lite_i2v_5s.safetensors": (
        "diffusion_models", _hf("kandinskylab/Kandinsky-5.0-I2V-Lite-5s", "model/kandinsky5lite_i2v_5s.safetensors")),
    "qwen_2.5_vl_7b.safetensors": (
        "text_encoders", _hf("Comfy-Org/Qwen-Image_ComfyUI", "split_files/text_encoders/qwen_2.5_vl_7b.safetensors")),
    "clip_l.safetensors": ("text_encoders", _hf("comfyanonymous/flux_text_encoders", "clip_l.safetensors")),
    "hunyuan_video_vae_bf16.safetensors": (
        "vae", _hf("Comfy-Org/HunyuanVideo_repackaged", "split_files/vae/hunyuan_video_vae_bf16.safetensors")),
    "ltx-2-19b-dev.safetensors": ("checkpoints", _hf("Lightricks/LTX-2", "ltx-2-19b-dev.safetensors")),
    "gemma_3_12B_it.safetensors": (
        "text_encoders", _hf("Comfy-Org/ltx-2", "split_files/text_encoders/gemma_3_12B_it.safetensors")),
    "ltx-2-spatial-upscaler-x2-1.0.safetensors": (
        "latent_upscale_models", _hf("Lightricks/LTX-2", "ltx-2-spatial-upscaler-x2-1.0.safetensors")),
    "ltx-2-19b-distilled-lora-384.safetensors": (
        "loras", _hf("Lightricks/LTX-2", "ltx-2-19b-distilled-lora-384.safetensors")),
}

# --------------------------------------------------------------------------------------------- node facts

#: Socket inputs (linkable, not widgets) of each node type in slot order, as ``/object_info`` lists them; the
#: frontend gives each a slot row whether it is linked or not. The end-to-end layout test checks this table
#: against the live server.
SOCKETS: dict[str, list[tuple[str, str]]] = {
    "CinetuneK5TextEncode": [("text_encoder", "CINETUNE_K5_TEXT_ENCODER")],
    "CinetuneK5Sampler": [("model", "CINETUNE_K5_MODEL"), ("conditioning", "CINETUNE_K5_CONDITIONING"),
                          ("start_latent", "LATENT")],
    "CinetuneK5VAEDecode": [("vae", "CINETUNE_K5_VAE"), ("latent", "LATENT")],
    "CinetuneK5VAEEncode": [("vae", "CINETUNE_K5_VAE"), ("image", "IMAGE")],
    "CinetuneK5CacheText": [("dataset", "CINETUNE_DATASET"), ("text_encoder", "CINETUNE_K5_TEXT_ENCODER")],
    "CinetuneK5CacheLatents": [("text_cache", "CINETUNE_K5_TEXT_CACHE"), ("vae", "CINETUNE_K5_VAE")],
    "CinetuneK5ValidationPrompt": [("conditioning", "CINETUNE_K5_CONDITIONING"), ("start_image", "IMAGE"),
                                   ("previous", "CINETUNE_K5_VALIDATION")],
    "CinetuneK5TrainLoRA": [("model", "CINETUNE_K5_MODEL"), ("training_data", "CINETUNE_K5_TRAINING_DATA"),
                            ("validation_conditioning", "CINETUNE_K5_CONDITIONING"), ("vae", "CINETUNE_K5_VAE"),
                            ("optimizer_settings", "CINETUNE_OPTIMIZER_SETTINGS"),
                            ("lora_settings", "CINETUNE_LORA_SETTINGS"),
                            ("sampling_settings", "CINETUNE_SAMPLING_SETTINGS"),
                            ("checkpoint_settings", "CINETUNE_CHECKPOINT_SETTINGS"),
                            ("validation", "CINETUNE_K5_VALIDATION"), ("validation_data", "CINETUNE_K5_TRAINING_DATA")],
    "CinetuneLTX2TextEncode": [("text_encoder", "CINETUNE_LTX2_TEXT_ENCODER")],
    "CinetuneLTX2Sampler": [("model", "CINETUNE_LTX2_MODEL"), ("conditioning", "CINETUNE_LTX2_CONDITIONING"),
                            ("vae", "CINETUNE_LTX2_VAE"), ("start_image", "IMAGE"), ("video_latent", "LATENT"),
                            ("audio_latent", "LATENT")],
    "CinetuneLTX2LatentUpsample": [("upsampler", "CINETUNE_LTX2_UPSAMPLER"), ("vae", "CINETUNE_LTX2_VAE"),
                                   ("video_latent", "LATENT")],
    "CinetuneLTX2Decode": [("vae", "CINETUNE_LTX2_VAE"), ("video_latent", "LATENT"), ("audio_latent", "LATENT")],
    "CinetuneLTX2LoRALoader": [("model", "CINETUNE_LTX2_MODEL")],
    "CinetuneLTX2CacheText": [("dataset", "CINETUNE_DATASET"), ("text_encoder", "CINETUNE_LTX2_TEXT_ENCODER")],
    "CinetuneLTX2CacheLatents": [("text_cache", "CINETUNE_LTX2_TEXT_CACHE"), ("vae", "CINETUNE_LTX2_VAE")],
    "CinetuneLTX2ValidationPrompt": [("conditioning", "CINETUNE_LTX2_CONDITIONING"), ("start_image", "IMAGE"),
                                     ("previous", "CINETUNE_LTX2_VALIDATION")],
    "CinetuneLTX2TrainLoRA": [("model", "CINETUNE_LTX2_MODEL"), ("training_data", "CINETUNE_LTX2_TRAINING_DATA"),
                              ("validation_conditioning", "CINETUNE_LTX2_CONDITIONING"), ("vae", "CINETUNE_LTX2_VAE"),
                              ("text_encoder", "CINETUNE_LTX2_TEXT_ENCODER"),
                              ("optimizer_settings", "CINETUNE_OPTIMIZER_SETTINGS"),
                              ("lora_settings", "CINETUNE_LORA_SETTINGS"),
                              ("sampling_settings", "CINETUNE_SAMPLING_SETTINGS"),
                              ("checkpoint_settings", "CINETUNE_CHECKPOINT_SETTINGS"),
                              ("validation", "CINETUNE_LTX2_VALIDATION"),
                              ("validation_data", "CINETUNE_LTX2_TRAINING_DATA")],
    "CinetuneSaveVideo": [("images", "IMAGE"), ("audio", "AUDIO")],
}
#: Heights of multiline text widgets (the frontend's minimum is 54) and extra body height below the widgets: the
#: trainers' loss chart (at least 244) and Load Image's preview of the picked image.
MULTILINE_H = {"prompt": 150, "negative_prompt": 110, "include_patterns": 60, "exclude_patterns": 60}
EXTRA_H = {"CinetuneK5TrainLoRA": 330, "CinetuneLTX2TrainLoRA": 330, "LoadImage": 300}
WIDTH = {"CinetuneK5TextEncode": 440, "CinetuneLTX2TextEncode": 440, "CinetuneK5TrainLoRA": 400,
         "CinetuneLTX2TrainLoRA": 400}
DEFAULT_WIDTH = 360
SLACK_H = 16  # beyond the frontend's own minimum height, so a slightly larger computeSize keeps our size
NOTE_ID = 99
NOTE_WIDTH = 520
GROUP_COLORS = {"Load": "#3f789e", "Encode": "#8A8", "Sample": "#a1309b", "Decode": "#b58b2a", "Save": "#b06634",
                "Data": "#8AA", "Cache": "#88A", "Validate": "#8A8", "Train": "#a1309b"}


def sockets(ctype: str, links: dict) -> list[tuple[str, str]]:
    """Socket inputs of a node type in slot order (a type outside :data:`SOCKETS`: its linked inputs)."""
    return SOCKETS.get(ctype) or [(name, typ) for name, (_, _, typ) in links.items()]


def node_size(ctype: str, widgets, outputs) -> tuple[int, int]:
    """(width, body height) of a node: slot rows, widget rows (a seed adds its control_after_generate row),
    multiline widgets, the chart or preview, as the frontend's ``computeSize`` adds them, plus ``SLACK_H``."""
    rows = max(len(SOCKETS.get(ctype, ())), len(outputs))
    widget_h = sum(MULTILINE_H.get(n, WIDGET_H) + (WIDGET_H if n == "seed" else 0) for n, _ in widgets)
    return WIDTH.get(ctype, DEFAULT_WIDTH), BODY_PAD + SLOT_H * rows + widget_h + EXTRA_H.get(ctype, 0) + SLACK_H


# --------------------------------------------------------------------------------------------- graphs

NEGATIVE = ("Static, 2D cartoon, cartoon, 2d animation, paintings, images, worst quality, low quality, ugly, deformed, "
            "walking backwards")
PROMPT_TITLE = "Prompt (top) and negative prompt (bottom)"

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


def load_image(name: str):
    return (8, "LoadImage", [("image", name), ("upload", "image")], {}, [("IMAGE", "IMAGE"), ("MASK", "MASK")])


def dataset_folder(folder: str):
    """A Dataset Folder with its own frame extraction off (the cacher's frame settings apply)."""
    widgets = [("folder", folder), ("repeats", 1), ("trigger_word", "ohwx"), ("default_caption", ""),
               ("frame_extraction", "cacher"), ("target_frames", ""), ("frame_stride", 1), ("frame_sample", 1),
               ("max_frames", 129)]
    return (10, "CinetuneDatasetFolder", widgets, {}, [("dataset", "CINETUNE_DATASET")])


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
            dataset_folder("k5_lora_dataset"),
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
              ("blocks_to_swap", -1), ("use_pinned_memory", True), ("gpus", 1)],
             {"model": (1, 0, "CINETUNE_K5_MODEL"), "training_data": (12, 0, "CINETUNE_K5_TRAINING_DATA"),
              "vae": (3, 0, "CINETUNE_K5_VAE"), **settings_links},
             [("model", "CINETUNE_K5_MODEL"), ("lora_name", "STRING")]),
            train_sampler, *DECODE_AND_SAVE, save("cinetune/k5/lora_sample")]


LTX2_CKPT = "ltx-2-19b-dev.safetensors"
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
               ("mode", mode), ("video_cfg", 3.0), ("audio_cfg", 7.0), ("stg", 1.0), ("stg_block", 29),
               ("modality_guidance", 3.0), ("rescale", 0.7), ("scheduler", "official"), ("audio", True),
               ("image_strength", 1.0)]
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
            dataset_folder("ltx2_lora_dataset"),
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
              ("validation_sampling_steps", 30), ("blocks_to_swap", -1), ("use_pinned_memory", True), ("gpus", 1)],
             {"model": (1, 0, "CINETUNE_LTX2_MODEL"), "training_data": (12, 0, "CINETUNE_LTX2_TRAINING_DATA"),
              "vae": (3, 0, "CINETUNE_LTX2_VAE"), **settings_links},
             [("model", "CINETUNE_LTX2_MODEL"), ("lora_name", "STRING")]),
            ltx2_sampler(5, width=768, height=512, mode="dev", links={"model": (13, 0, "CINETUNE_LTX2_MODEL")}),
            *ltx2_decode_and_save(5, "cinetune/ltx2/lora_sample")]


LTX2_PROMPT = ("A red fox trots through fresh snow in a birch forest at sunrise, the camera tracks it from the side. "
               "Snow crunches under its paws, a light wind rustles the branches and a crow calls in the distance.")

# Layouts: columns left to right (node ids top to bottom) and groups (title, node ids), earlier groups above later
# ones where they share columns.
GENERATE_GROUPS = [("Load", [1, 2, 3]), ("Encode", [4, 8, 9]), ("Sample", [5, 13]), ("Decode", [6]), ("Save", [7])]
TRAIN_COLUMNS = [[1, 2, 3], [10, 4], [11, 18], [12, 14, 15, 16, 17], [13], [5], [6], [7]]
TRAIN_GROUPS = [("Load", [1, 2, 3]), ("Data", [10]), ("Cache", [11, 12]), ("Validate", [4, 18]),
                ("Train", [14, 15, 16, 17, 13]), ("Sample", [5]), ("Decode", [6]), ("Save", [7])]

DATASET_HINT = ("Put clips and images with same-name `.txt` captions in `ComfyUI/input/{folder}` (or set another "
                "folder on Dataset Folder). The trainer draws the loss while it runs; the LoRA goes to `models/loras`.")

WORKFLOWS = {
    "k5_text_to_video": {
        "title": "Kandinsky 5 text to video",
        "description": "Kandinsky 5 Video Lite: a 5 s clip (121 frames, 24 fps) at 768×512 from a prompt, 50 steps, "
                       "guidance 5.",
        "dit": "kandinsky5lite_t2v_sft_5s.safetensors",
        "nodes": [*LOADERS,
                  text_encode("A red fox trots through fresh snow in a birch forest at sunrise, the camera tracks it "
                              "from the side, soft golden light, shallow depth of field."),
                  sampler(5.0, start=False), *DECODE_AND_SAVE, save("cinetune/k5/t2v")],
        "columns": [[1, 2, 3], [4], [5], [6], [7]],
        "groups": GENERATE_GROUPS,
    },
    "k5_image_to_video": {
        "title": "Kandinsky 5 image to video",
        "description": "Kandinsky 5 Video Lite image to video: animates the start image for 5 s (121 frames) at "
                       "768×512, 50 steps, scheduler scale 10.",
        "dit": "kandinsky5lite_i2v_5s.safetensors",
        "inputs": ["astronaut.png"],
        "nodes": [*LOADERS,
                  text_encode("The astronaut smiles and slowly turns her head towards the camera, the flag behind her "
                              "moves gently, studio lighting."),
                  load_image("astronaut.png"),
                  (9, "CinetuneK5VAEEncode", [("width", 768), ("height", 512)],
                   {"vae": (3, 0, "CINETUNE_K5_VAE"), "image": (8, 0, "IMAGE")}, [("start_latent", "LATENT")]),
                  sampler(10.0, start=True), *DECODE_AND_SAVE, save("cinetune/k5/i2v")],
        "columns": [[1, 2, 3, 8], [9, 4], [5], [6], [7]],
        "groups": GENERATE_GROUPS,
    },
    "k5_lora_training": {
        "title": "Kandinsky 5 LoRA training",
        "description": "Caches a dataset (captions, then video latents), trains a Kandinsky 5 LoRA with every "
                       "settings node at its default and a validation prompt, then samples with the LoRA. "
                       + DATASET_HINT.format(folder="k5_lora_dataset"),
        "dit": "kandinsky5lite_t2v_sft_5s.safetensors",
        "nodes": training_nodes(),
        "columns": TRAIN_COLUMNS,
        "groups": TRAIN_GROUPS,
    },
    "ltx2_text_to_video": {
        "title": "LTX-2 text to video with sound",
        "description": "LTX-2 19B: a 5 s clip (121 frames, 24 fps) at 768×512 with its sound generated together, "
                       "40 steps with the official multimodal guidance.",
        "nodes": [*LTX2_LOADERS, ltx2_text_encode(LTX2_PROMPT),
                  ltx2_sampler(5, width=768, height=512, mode="dev", links={}),
                  *ltx2_decode_and_save(5, "cinetune/ltx2/t2v")],
        "columns": [[1, 2, 3], [4], [5], [6], [7]],
        "groups": GENERATE_GROUPS,
    },
    "ltx2_image_to_video": {
        "title": "LTX-2 image to video with sound",
        "description": "LTX-2 19B image to video: animates the start image for 5 s at 768×512, with sound (the "
                       "prompt describes the speech and the room tone).",
        "inputs": ["astronaut.png"],
        "nodes": [*LTX2_LOADERS,
                  ltx2_text_encode("The astronaut smiles and slowly turns her head towards the camera while the flag "
                                   "behind her moves gently. She says: \"Hello from the station.\" A soft hum of "
                                   "air conditioning fills the room."),
                  load_image("astronaut.png"),
                  ltx2_sampler(5, width=768, height=512, mode="dev",
                               links={"vae": (3, 0, "CINETUNE_LTX2_VAE"), "start_image": (8, 0, "IMAGE")}),
                  *ltx2_decode_and_save(5, "cinetune/ltx2/i2v")],
        "columns": [[1, 2, 3], [8, 4], [5], [6], [7]],
        "groups": GENERATE_GROUPS,
    },
    "ltx2_lora_training": {
        "title": "LTX-2 LoRA training (video and sound)",
        "description": "Caches a dataset (Gemma features, video and sound latents), trains an LTX-2 LoRA on video "
                       "and audio with every settings node at its default and a validation prompt (clips with "
                       "sound), then samples with the LoRA. " + DATASET_HINT.format(folder="ltx2_lora_dataset"),
        "nodes": ltx2_training_nodes(),
        "columns": TRAIN_COLUMNS,
        "groups": TRAIN_GROUPS,
    },
    "ltx2_two_stage": {
        "title": "LTX-2 two-stage text to video with sound",
        "description": "LTX-2 19B in two stages: samples at half size (384×256), upsamples the latent ×2 and refines "
                       "it at 768×512 with the distilled LoRA, as the official two-stage pipeline.",
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
                  *ltx2_decode_and_save(13, "cinetune/ltx2/two_stage")],
        "columns": [[1, 2, 3, 10], [11, 4], [5], [12], [13], [6], [7]],
        "groups": [("Load", [1, 2, 3, 10, 11]), ("Encode", [4]), ("Sample", [5, 12, 13]), ("Decode", [6]),
                   ("Save", [7])],
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
    """API format: ``{id: {class_type, inputs, _meta}}`` with widget values by name and links as ``[src, slot]``."""
    api = {}
    for nid, ctype, widgets, links, _ in nodes:
        inputs = {n: v for n, v in widgets if not (ctype == "LoadImage" and n == "upload")}
        inputs.update({n: [str(src), slot] for n, (src, slot, _) in links.items()})
        api[str(nid)] = {"class_type": ctype, "inputs": inputs, "_meta": {"title": ctype}}
    return api


def to_ui(nodes, spec: dict) -> dict:
    """UI format (as the frontend saves it) of ``nodes``: laid out in ``spec["columns"]``, grouped by
    ``spec["groups"]``, with the note ``spec["note"]`` left of the graph, node titles ``spec["titles"]`` and
    ``properties.models`` on every node whose widgets name a file of :data:`MODEL_FILES`.

    Raises ``RuntimeError`` when a link would still be drawn through a node body (see ``workflow_layout.lay_out``).
    """
    by_id = {n[0]: n for n in nodes}
    boxes = {nid: Box(nid, *node_size(ctype, widgets, outputs), [s for s, _ in sockets(ctype, links)])
             for nid, ctype, widgets, links, outputs in nodes}
    link_rows, edges = [], []
    for nid, ctype, _, links, _ in nodes:
        for name, (src, slot, typ) in links.items():
            link_id = len(link_rows) + 1
            link_rows.append([link_id, src, slot, nid, boxes[nid].inputs.index(name), typ])
            edges.append((link_id, src, slot, nid, name))
    columns = spec["columns"]
    groups = [(title, [n for n in ids if n in by_id]) for title, ids in spec.get("groups", [])]
    groups = [(title, ids) for title, ids in groups if ids]
    layout = lay_out(boxes, columns, [ids for _, ids in groups], edges)
    group_rects = layout.groups
    order = {nid: i for i, nid in enumerate(n for col in columns for n in col)}
    ui_nodes = [_ui_node(by_id[nid], boxes[nid], order[nid], link_rows, spec.get("titles", {}).get(nid))
                for nid in sorted(by_id, key=order.get)]
    if spec.get("note"):
        lines = spec["note"].count("\n") + 1
        top = min(r[1] for r in group_rects) if group_rects else 0.0
        ui_nodes.append({"id": NOTE_ID, "type": "MarkdownNote", "pos": [-NOTE_WIDTH - COLUMN_GAP, top + TITLE_H],
                         "size": [NOTE_WIDTH, 40 + 16 * lines], "flags": {}, "order": len(ui_nodes), "mode": 0,
                         "inputs": [], "outputs": [], "title": "Read me: models and files", "properties": {},
                         "widgets_values": [spec["note"]], "color": "#432", "bgcolor": "#653"})
    ui_groups = [{"id": i + 1, "title": title, "bounding": [round(v) for v in rect],
                  "color": GROUP_COLORS.get(title, "#3f789e"), "font_size": 24, "flags": {}}
                 for i, ((title, _), rect) in enumerate(zip(groups, group_rects))]
    extra = {}
    if layout.reroutes:
        extra = {"reroutes": layout.reroutes,
                 "linkExtensions": [{"id": lid, "parentId": rid} for lid, rid in sorted(layout.link_parent.items())]}
    return {"id": spec.get("id", str(uuid.UUID(int=0))), "revision": 0,
            "last_node_id": max(n["id"] for n in ui_nodes), "last_link_id": len(link_rows), "nodes": ui_nodes,
            "links": link_rows, "groups": ui_groups, "config": {}, "extra": extra, "version": 0.4}


def _ui_node(node, box: Box, order: int, link_rows: list, title: str | None) -> dict:
    nid, ctype, widgets, links, outputs = node
    incoming = {row[4]: row[0] for row in link_rows if row[3] == nid}
    values = []
    for n, v in widgets:
        values.append(v)
        if n == "seed":
            values.append("fixed")
    properties = {"Node name for S&R": ctype, "cnr_id": "comfy-core" if ctype == "LoadImage" else "cinetune"}
    files = [v for _, v in widgets if isinstance(v, str) and v in MODEL_FILES]
    if files:
        properties["models"] = [{"name": f, "url": MODEL_FILES[f][1], "directory": MODEL_FILES[f][0]}
                                for f in dict.fromkeys(files)]
    out = {"id": nid, "type": ctype, "pos": [round(box.x), round(box.y)], "size": [round(box.width), round(box.height)],
           "flags": {}, "order": order, "mode": 0,
           "inputs": [{"name": n, "type": t, "link": incoming.get(i)}
                      for i, (n, t) in enumerate(sockets(ctype, links))],
           "outputs": [{"name": n, "type": t, "links": [r[0] for r in link_rows if r[1] == nid and r[2] == i],
                        "slot_index": i} for i, (n, t) in enumerate(outputs)],
           "properties": properties, "widgets_values": values}
    if title:
        out.update(title=title, color="#232", bgcolor="#353")
    return out


def note_text(name: str, spec: dict, nodes) -> str:
    """The Markdown of a workflow's note: what it does, each model file with its folder and download link, the
    folder tree, and the shipped input files."""
    used = []
    for _, _, widgets, _, _ in nodes:
        used += [v for _, v in widgets if isinstance(v, str) and v in MODEL_FILES and v not in used]
    by_folder: dict[str, list[str]] = {}
    for file in used:
        by_folder.setdefault(MODEL_FILES[file][0], []).append(file)
    lines = [f"## {spec.get('title', name)}", "", spec.get("description", ""), "", "### Model files", "",
             "Missing files are offered for download when the workflow opens; or download them yourself:", ""]
    for folder, files in by_folder.items():
        lines += [f"**models/{folder}**", ""] + [f"- [{f}]({MODEL_FILES[f][1]})" for f in files] + [""]
    lines += ["```", "ComfyUI/", "└── models/"]
    folders = list(by_folder.items())
    for i, (folder, files) in enumerate(folders):
        last = i == len(folders) - 1
        lines.append(f"    {'└' if last else '├'}── {folder}/")
        lines += [f"    {' ' if last else '│'}   {'└' if j == len(files) - 1 else '├'}── {f}"
                  for j, f in enumerate(files)]
    lines += ["```", ""]
    for file in spec.get("inputs", []):
        lines += [f"**Start image**: `{file}` ships in the pack's `example_workflows/input/` folder and is copied into "
                  "ComfyUI's `input/` folder; upload your own image on **Load Image**.", ""]
    lines += ["Smaller GPUs: raise `blocks_to_swap` on the model loader or choose an fp8 `weight_dtype`; the Memory "
              "Estimate node predicts the peak before a long run."]
    return "\n".join(lines).rstrip() + "\n"


def workflow_id(name: str) -> str:
    """A stable id per example workflow (the frontend tells open workflows apart by it)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"cinetune/example_workflows/{name}"))


def build(name: str, nodes=None) -> tuple[dict, dict]:
    """(UI workflow, API workflow) of example ``name``; ``nodes`` replaces its resolved node descriptions (same ids,
    e.g. with other widget values) and keeps its layout."""
    spec = WORKFLOWS[name]
    nodes = nodes if nodes is not None else resolve_nodes(spec["nodes"], spec.get("dit"))
    spec = {**spec, "note": note_text(name, spec, nodes), "id": workflow_id(name), "titles": {
        nid: PROMPT_TITLE for nid, ctype, _, _, _ in nodes if ctype.endswith("TextEncode")}}
    return to_ui(nodes, spec), to_api(nodes)


def main() -> None:
    from cinetune.core.checkpoint import atomic_path

    for name in WORKFLOWS:
        ui, api = build(name)
        for path, data in ((EXAMPLES / f"{name}.json", ui), (EXAMPLES / "api" / f"{name}.json", api)):
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
                tmp.chmod(0o644)


if __name__ == "__main__":
    main()

"""Kandinsky 5 end to end in a real ComfyUI server over HTTP, on the embedded tiny models."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest

import torch

from cinetune.core.media import probe_video, read_video
from cinetune.k5.tiny import TINY_NAMES

from .comfy_host import ui_to_api
from .models import TINY_SIZE, tiny_workflow

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]

# Saved workflows store widget values by position: this order must never change (append new inputs only).
FROZEN_INPUT_ORDER = {
    "CinetuneK5ModelLoader": ["dit_name", "variant", "weight_dtype", "attention", "nabla", "blocks_to_swap",
                              "use_pinned_memory"],
    "CinetuneK5TextEncoderLoader": ["qwen_name", "clip_name", "dtype"],
    "CinetuneK5VAELoader": ["vae_name", "dtype"],
    "CinetuneK5TextEncode": ["text_encoder", "prompt", "negative_prompt", "template"],
    "CinetuneK5Sampler": ["model", "conditioning", "width", "height", "frames", "seed", "steps", "guidance",
                          "scheduler_scale", "start_latent"],
    "CinetuneK5VAEDecode": ["vae", "latent", "tiling"],
    "CinetuneK5VAEEncode": ["vae", "image", "width", "height"],
    "CinetuneSaveVideo": ["images", "fps", "filename_prefix", "audio"],
    "CinetuneK5LoRALoader": ["model", "lora_name", "strength"],
    "CinetuneK5MemoryEstimate": ["model", "mode", "width", "height", "frames", "cfg", "lora_rank", "optimizer"],
    "CinetuneDatasetFolder": ["folder", "repeats", "trigger_word", "default_caption", "frame_extraction",
                              "target_frames", "frame_stride", "frame_sample", "max_frames"],
    "CinetuneCombineDatasets": ["dataset_1", "dataset_2", "dataset_3", "dataset_4"],
    "CinetuneK5CacheText": ["dataset", "text_encoder", "cache_name"],
    "CinetuneK5CacheLatents": ["text_cache", "vae", "frames", "frame_selection", "resolution", "nabla",
                               "image_to_video", "allow_upscale"],
    "CinetuneK5TrainLoRA": ["model", "training_data", "output_name", "rank", "alpha", "learning_rate", "optimizer",
                            "lr_schedule", "warmup_steps", "max_steps", "epochs", "batch_size", "gradient_accumulation",
                            "timestep_sampling", "flow_shift", "gradient_checkpointing", "image_to_video",
                            "caption_dropout", "seed", "save_every", "resume", "validate_every",
                            "blocks_to_swap", "use_pinned_memory", "validation_conditioning", "vae",
                            "optimizer_settings", "lora_settings", "sampling_settings", "checkpoint_settings",
                            "validation", "validation_data", "gpus"],
    "CinetuneLTX2ModelLoader": ["ckpt_name", "weight_dtype", "attention", "blocks_to_swap", "use_pinned_memory"],
    "CinetuneLTX2TextEncoderLoader": ["gemma_name", "ckpt_name", "dtype"],
    "CinetuneLTX2VAELoader": ["vae_name", "audio_vae_name", "dtype"],
    "CinetuneLTX2UpsamplerLoader": ["upsampler_name"],
    "CinetuneLTX2TextEncode": ["text_encoder", "prompt", "negative_prompt"],
    "CinetuneLTX2Sampler": ["model", "conditioning", "width", "height", "frames", "fps", "seed", "steps", "mode",
                            "video_cfg", "audio_cfg", "stg", "stg_block", "modality_guidance", "rescale", "scheduler", "audio",
                            "vae", "start_image", "image_strength", "video_latent", "audio_latent"],
    "CinetuneLTX2LatentUpsample": ["upsampler", "vae", "video_latent"],
    "CinetuneLTX2Decode": ["vae", "video_latent", "tiling", "audio_latent"],
    "CinetuneLTX2LoRALoader": ["model", "lora_name", "strength"],
    "CinetuneLTX2MemoryEstimate": ["model", "width", "height", "frames", "fps", "mode", "lora_rank", "optimizer",
                                   "gradient_checkpointing", "audio", "first_frame_conditioning"],
    "CinetuneLTX2CacheText": ["dataset", "text_encoder", "cache_name"],
    "CinetuneLTX2CacheLatents": ["text_cache", "vae", "frames", "frame_selection", "resolution", "audio",
                                 "image_to_video", "allow_upscale", "missing_audio", "fps"],
    "CinetuneLTX2TrainLoRA": ["model", "training_data", "output_name", "rank", "alpha", "learning_rate", "optimizer",
                              "lr_schedule", "warmup_steps", "max_steps", "epochs", "batch_size",
                              "gradient_accumulation", "timestep_sampling", "flow_shift", "gradient_checkpointing",
                              "audio", "first_frame_conditioning", "caption_dropout", "seed", "save_every", "resume",
                              "validate_every", "validation_steps", "validation_sampling_steps", "blocks_to_swap",
                              "use_pinned_memory", "validation_conditioning", "vae", "text_encoder",
                              "optimizer_settings", "lora_settings", "sampling_settings", "checkpoint_settings",
                              "validation", "validation_data", "gpus"],
    "CinetuneTrainingOptimizerSettings": ["weight_decay", "beta1", "beta2", "eps", "max_grad_norm", "min_lr_ratio",
                                          "d_coef", "safeguard_warmup"],
    "CinetuneTrainingLoRASettings": ["include_patterns", "exclude_patterns", "lora_dropout", "rank_dropout",
                                     "module_dropout", "init_lora"],
    "CinetuneTrainingSamplingSettings": ["sigma_min", "sigma_max", "loss_weighting", "i2v_probability"],
    "CinetuneTrainingCheckpointSettings": ["save_every_epochs", "keep_checkpoints", "save_dtype", "tensorboard",
                                           "ema_decay", "validation_loss_every", "validation_loss_sigmas"],
    "CinetuneK5ValidationPrompt": ["conditioning", "width", "height", "frames", "steps", "guidance",
                                   "scheduler_scale", "seed", "sample_at_start", "start_image", "previous"],
    "CinetuneLTX2ValidationPrompt": ["conditioning", "width", "height", "frames", "fps", "steps", "video_cfg",
                                     "audio_cfg", "seed", "sample_at_start", "start_image", "previous"],
}


def _load(name: str, api: bool = False) -> dict:
    folder = ROOT / "example_workflows" / ("api" if api else "")
    return json.loads((folder / f"{name}.json").read_text())


def _input_order(info: dict) -> list[str]:
    order = info.get("input_order", {})
    return [*order.get("required", []), *order.get("optional", [])]


def test_object_info_lists_every_node_with_frozen_widget_order_and_tooltips(comfy_client):
    info = comfy_client.object_info()
    for node_id, expected in FROZEN_INPUT_ORDER.items():
        assert node_id in info, f"{node_id} is not registered"
        assert _input_order(info[node_id]) == expected
        assert info[node_id]["category"].startswith("Cinetune/")
        for section in ("required", "optional"):
            for name, spec in info[node_id]["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    ours = {k for k, v in info.items() if v.get("python_module", "").endswith("cinetune") or k.startswith("Cinetune")}
    assert ours == set(FROZEN_INPUT_ORDER), "every registered node needs a frozen widget order here"


@pytest.mark.parametrize("name", ["k5_text_to_video", "k5_image_to_video", "k5_lora_training", "ltx2_text_to_video",
                                  "ltx2_image_to_video", "ltx2_two_stage"])
def test_ui_workflow_converts_to_the_committed_api_workflow(comfy_client, name):
    converted = ui_to_api(_load(name), comfy_client.object_info())
    committed = _load(name, api=True)
    strip = lambda wf: {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in wf.items()}  # noqa: E731
    assert strip(converted) == strip(committed)


def test_text_to_video_writes_decodable_mp4(comfy_client, comfy_layout):
    entry = comfy_client.run(tiny_workflow(_load("k5_text_to_video", api=True), TINY_NAMES), timeout=900)
    videos = [p for p in comfy_client.output_files(entry, comfy_layout.output) if p.suffix == ".mp4"]
    assert len(videos) == 1
    meta = probe_video(videos[0])
    assert (meta["frames"], meta["width"], meta["height"]) == (TINY_SIZE["frames"], TINY_SIZE["width"], TINY_SIZE["height"])
    assert meta["codec"] == "h264"


def test_block_swap_and_fp8_weights_generate_the_same_size_video(comfy_client, comfy_layout):
    prompt = tiny_workflow(_load("k5_text_to_video", api=True), TINY_NAMES)
    prompt["1"]["inputs"].update(blocks_to_swap=3, weight_dtype="fp8_e4m3fn")
    entry = comfy_client.run(prompt, timeout=900)
    videos = [p for p in comfy_client.output_files(entry, comfy_layout.output) if p.suffix == ".mp4"]
    meta = probe_video(videos[0])
    assert (meta["frames"], meta["width"], meta["height"]) == (TINY_SIZE["frames"], TINY_SIZE["width"], TINY_SIZE["height"])
    prompt["1"]["inputs"]["blocks_to_swap"] = 4
    msg = _error_message(comfy_client, prompt)
    assert "blocks_to_swap=4" in msg and "at most 3" in msg


def test_image_to_video_from_real_photo_writes_mp4(comfy_client, comfy_layout, test_data):
    shutil.copy(test_data["astronaut"], Path(comfy_layout.input) / "astronaut.png")
    prompt = tiny_workflow(_load("k5_image_to_video", api=True), TINY_NAMES, frames=13)
    entry = comfy_client.run(prompt, timeout=900)
    videos = [p for p in comfy_client.output_files(entry, comfy_layout.output) if p.suffix == ".mp4"]
    meta = probe_video(videos[0])
    assert (meta["frames"], meta["width"], meta["height"]) == (13, TINY_SIZE["width"], TINY_SIZE["height"])


def _error_message(comfy_client, prompt) -> str:
    with pytest.raises(Exception) as err:
        comfy_client.run(prompt, timeout=300)
    return str(err.value)


def test_bad_sizes_give_clear_errors_and_server_keeps_running(comfy_client):
    api = _load("k5_text_to_video", api=True)
    msg = _error_message(comfy_client, tiny_workflow(api, TINY_NAMES, width=120))
    assert "multiple of 16" in msg and "112" in msg and "128" in msg
    msg = _error_message(comfy_client, tiny_workflow(api, TINY_NAMES, frames=10))
    assert "4k+1" in msg or "4k + 1" in msg
    assert "9" in msg and "13" in msg
    assert comfy_client.object_info()  # the server still answers


def test_loading_a_vae_as_dit_says_what_the_file_is(comfy_client, comfy_layout):
    misplaced = "misplaced_vae.safetensors"
    shutil.copy(Path(comfy_layout.models) / "vae" / TINY_NAMES["vae"], Path(comfy_layout.models) / "diffusion_models" / misplaced)
    prompt = tiny_workflow(_load("k5_text_to_video", api=True), TINY_NAMES)
    prompt["1"]["inputs"]["dit_name"] = misplaced
    msg = _error_message(comfy_client, prompt)
    assert "VAE" in msg and "Kandinsky 5" in msg


def test_interrupt_stops_sampling_within_a_step(comfy_client):
    steps = 400
    prompt = tiny_workflow(_load("k5_text_to_video", api=True), TINY_NAMES, steps=steps, seed=7,
                           width=256, height=128, frames=17)
    prompt_id = comfy_client.queue(prompt)
    outcome: dict = {}

    def wait():
        try:
            outcome["entry"] = comfy_client.wait(prompt_id, timeout=600)
        except Exception as e:  # the interrupted run is reported as an exception
            outcome["error"] = e

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()

    def sampler_steps() -> list[int]:
        return [e["data"]["value"] for e in list(comfy_client.events)
                if e.get("type") == "progress" and e["data"].get("prompt_id") == prompt_id and e["data"].get("max") == steps]

    deadline = time.time() + 300
    while len(sampler_steps()) < 2:
        assert time.time() < deadline and waiter.is_alive(), f"sampling never reported progress: {outcome}"
        time.sleep(0.05)
    at_interrupt = max(sampler_steps())
    comfy_client.interrupt()
    waiter.join(180)
    assert not waiter.is_alive()
    assert "error" in outcome and "interrupt" in str(outcome["error"]).lower()
    final = max(sampler_steps())
    assert final < steps
    assert final - at_interrupt <= 2, f"ran {final - at_interrupt} steps after the interrupt"


def _first_frames(comfy_client, comfy_layout, prompt) -> torch.Tensor:
    entry = comfy_client.run(prompt, timeout=900)
    video = [p for p in comfy_client.output_files(entry, comfy_layout.output) if p.suffix == ".mp4"][0]
    return read_video(video)[0].float()


def test_lora_loader_changes_the_video_and_strength_zero_does_not(comfy_client, comfy_layout):
    from cinetune.core.lora import inject_lora, save_lora
    from cinetune.k5.dit import load_k5_dit
    from cinetune.k5.family import K5_FAMILY

    model = load_k5_dit(Path(comfy_layout.models) / "diffusion_models" / TINY_NAMES["dit"], weight_dtype="fp32").model
    modules = inject_lora(model, rank=4, alpha=4.0, targets=K5_FAMILY.lora_targets, within=K5_FAMILY.lora_within)
    generator = torch.Generator().manual_seed(0)
    for m in modules.values():
        m.lora_up.data = torch.randn(m.lora_up.shape, generator=generator) * 0.5
    save_lora(Path(comfy_layout.models) / "loras" / "tiny_test_lora.safetensors", modules,
              metadata={"base_model": TINY_NAMES["dit"]})

    base = tiny_workflow(_load("k5_text_to_video", api=True), TINY_NAMES, seed=3)
    with_lora = json.loads(json.dumps(base))
    with_lora["20"] = {"class_type": "CinetuneK5LoRALoader",
                       "inputs": {"model": ["1", 0], "lora_name": "tiny_test_lora.safetensors", "strength": 1.0}}
    with_lora["5"]["inputs"]["model"] = ["20", 0]
    plain = _first_frames(comfy_client, comfy_layout, base)
    changed = _first_frames(comfy_client, comfy_layout, with_lora)
    assert (plain - changed).abs().mean() > 1.0
    with_lora["20"]["inputs"]["strength"] = 0.0
    assert torch.equal(_first_frames(comfy_client, comfy_layout, with_lora), plain)


@pytest.mark.parametrize("mode", ["sampling", "training"])
def test_memory_estimate_node_reports_before_a_run(comfy_client, mode):
    prompt = tiny_workflow(_load("k5_text_to_video", api=True), TINY_NAMES)
    prompt = {"1": prompt["1"], "30": {"class_type": "CinetuneK5MemoryEstimate", "inputs": {
        "model": ["1", 0], "mode": mode, "width": 256, "height": 256, "frames": 17, "cfg": True, "lora_rank": 8,
        "optimizer": "adamw"}}}
    entry = comfy_client.run(prompt, timeout=300)
    text = entry["outputs"]["30"]["text"][0]
    assert text.startswith("Estimated peak") and "GB" in text
    assert ("LoRA" in text) == (mode == "training")

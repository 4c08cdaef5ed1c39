"""LTX-2 end to end in a real ComfyUI server over HTTP, on the embedded tiny LTX-2 models: text-to-video with
sound, image-to-video from a real photo, the two-stage pipeline, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import av
import pytest

from cinetune.core.media import probe_video

from .models import TINY_LTX2, tiny_workflow

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def _api(name: str) -> dict:
    return json.loads((ROOT / "example_workflows" / "api" / f"{name}.json").read_text())


def _names(comfy_layout) -> dict[str, str]:
    from cinetune.ltx2.tiny import TINY_LTX2_NAMES
    from cinetune.k5.tiny import TINY_NAMES

    return {**TINY_NAMES, **TINY_LTX2_NAMES}


def _streams(path: Path) -> dict:
    """Video frame count/size and the audio stream's channels, rate and duration (s) of an mp4."""
    with av.open(str(path)) as container:
        audio = [s for s in container.streams if s.type == "audio"]
        out = {"audio_streams": len(audio)}
        if audio:
            stream = audio[0]
            samples = sum(frame.samples for frame in container.decode(stream))
            out.update(channels=stream.codec_context.channels, rate=stream.codec_context.sample_rate,
                       seconds=samples / stream.codec_context.sample_rate, codec=stream.codec_context.name)
    return {**probe_video(path), **out}


def _run_single_mp4(comfy_client, comfy_layout, prompt) -> Path:
    entry = comfy_client.run(prompt, timeout=900)
    videos = [p for p in comfy_client.output_files(entry, comfy_layout.output) if p.suffix == ".mp4"]
    assert len(videos) == 1
    return videos[0]


def _assert_video_with_sound(path: Path, width: int, height: int, frames: int, fps: float) -> None:
    meta = _streams(path)
    assert (meta["frames"], meta["width"], meta["height"]) == (frames, width, height)
    assert meta["audio_streams"] == 1 and meta["codec"] == "aac" and meta["channels"] == 2
    # AAC works in 1024-sample frames with priming: the track lasts the video's duration within two frames.
    assert abs(meta["seconds"] - frames / fps) <= 2 * 1024 / meta["rate"], meta


def test_text_to_video_with_audio_writes_mp4_with_sound(comfy_client, comfy_layout):
    prompt = tiny_workflow(_api("ltx2_text_to_video"), _names(comfy_layout))
    path = _run_single_mp4(comfy_client, comfy_layout, prompt)
    _assert_video_with_sound(path, TINY_LTX2["width"], TINY_LTX2["height"], TINY_LTX2["frames"], TINY_LTX2["fps"])


def test_image_to_video_from_real_photo(comfy_client, comfy_layout, test_data):
    shutil.copy(test_data["astronaut"], Path(comfy_layout.input) / "astronaut.png")
    prompt = tiny_workflow(_api("ltx2_image_to_video"), _names(comfy_layout))
    path = _run_single_mp4(comfy_client, comfy_layout, prompt)
    _assert_video_with_sound(path, TINY_LTX2["width"], TINY_LTX2["height"], TINY_LTX2["frames"], TINY_LTX2["fps"])


def test_two_stage_pipeline_writes_full_size_mp4(comfy_client, comfy_layout):
    prompt = tiny_workflow(_api("ltx2_two_stage"), _names(comfy_layout))
    path = _run_single_mp4(comfy_client, comfy_layout, prompt)
    _assert_video_with_sound(path, TINY_LTX2["width"], TINY_LTX2["height"], TINY_LTX2["frames"], TINY_LTX2["fps"])


def _error_message(comfy_client, prompt) -> str:
    with pytest.raises(Exception) as err:
        comfy_client.run(prompt, timeout=300)
    return str(err.value)


def test_bad_frames_and_sizes_name_the_nearest_valid_values(comfy_client, comfy_layout):
    api = tiny_workflow(_api("ltx2_text_to_video"), _names(comfy_layout))
    api["5"]["inputs"]["frames"] = 12
    msg = _error_message(comfy_client, api)
    assert "8k+1" in msg and "9" in msg and "17" in msg
    api["5"]["inputs"].update(frames=9, width=100)
    msg = _error_message(comfy_client, api)
    assert "multiple of 32" in msg and "96" in msg and "128" in msg
    assert comfy_client.object_info()


def test_two_stage_needs_sizes_multiple_of_64(comfy_client, comfy_layout):
    api = tiny_workflow(_api("ltx2_two_stage"), _names(comfy_layout))
    api["13"]["inputs"].update(width=160)  # stage 2 at 160 px wide: stage 1 would be 80, not a multiple of 32
    msg = _error_message(comfy_client, api)
    assert "64" in msg


def test_k5_file_in_ltx2_loader_and_reverse_say_what_the_file_is(comfy_client, comfy_layout):
    names = _names(comfy_layout)
    models = Path(comfy_layout.models)
    shutil.copy(models / "diffusion_models" / names["dit"], models / "checkpoints" / "k5_in_ltx2.safetensors")
    api = tiny_workflow(_api("ltx2_text_to_video"), names)
    api["1"]["inputs"]["ckpt_name"] = "k5_in_ltx2.safetensors"
    msg = _error_message(comfy_client, api)
    assert "Kandinsky 5" in msg
    shutil.copy(models / "checkpoints" / names["ltx2"], models / "diffusion_models" / "ltx2_in_k5.safetensors")
    k5 = tiny_workflow(_api("k5_text_to_video"), names)
    k5["1"]["inputs"]["dit_name"] = "ltx2_in_k5.safetensors"
    msg = _error_message(comfy_client, k5)
    assert "LTX-2" in msg
    assert comfy_client.object_info()


def test_memory_estimate_node_reports_before_a_run(comfy_client, comfy_layout):
    api = tiny_workflow(_api("ltx2_text_to_video"), _names(comfy_layout))
    prompt = {"1": api["1"], "30": {"class_type": "CinetuneLTX2MemoryEstimate", "inputs": {
        "model": ["1", 0], "width": 768, "height": 512, "frames": 121, "fps": 24.0}}}
    entry = comfy_client.run(prompt, timeout=300)
    text = entry["outputs"]["30"]["text"][0]
    assert text.startswith("Estimated peak") and "GB" in text
    assert "4 forward passes per step" in text


def test_memory_estimate_node_covers_lora_training(comfy_client, comfy_layout):
    api = tiny_workflow(_api("ltx2_text_to_video"), _names(comfy_layout))
    inputs = {"model": ["1", 0], "width": 768, "height": 512, "frames": 121, "fps": 24.0, "mode": "training",
              "lora_rank": 16, "optimizer": "adamw8bit", "gradient_checkpointing": True, "audio": True,
              "first_frame_conditioning": True}
    entry = comfy_client.run({"1": api["1"], "30": {"class_type": "CinetuneLTX2MemoryEstimate", "inputs": inputs}},
                             timeout=300)
    text = entry["outputs"]["30"]["text"][0]
    assert text.startswith("Estimated peak") and "LoRA + gradients + optimizer" in text
    assert ("LoRA training (rank 16, 8-bit AdamW), audio and video, first-frame conditioning, gradient checkpointing "
            "on") in text
    assert "text connectors" in text
    video = {**inputs, "audio": False, "gradient_checkpointing": False}
    entry = comfy_client.run({"1": api["1"], "31": {"class_type": "CinetuneLTX2MemoryEstimate", "inputs": video}},
                             timeout=300)
    text = entry["outputs"]["31"]["text"][0]
    assert "(6,144 video tokens)" in text and "video only" in text and "gradient checkpointing off" in text

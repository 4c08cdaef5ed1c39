"""Image-to-video training on single-frame samples in a real ComfyUI: K5 Cache Latents refuses frames 1 with
image_to_video at queue time, K5 Train LoRA refuses a dataset of photos only before the first step, and a dataset of
photos and a video trains with the photos' count in the "started" status."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from .comfy_host import ExecutionFailed, PromptRejected
from .models import DATASET_FOLDER
from .test_hardening_e2e import _training_prompt

pytestmark = pytest.mark.e2e


def _i2v_prompt(name: str, folder: str, frames: int) -> dict:
    """The tiny K5 training prompt on ``folder`` with image-to-video on in the cacher and the trainer."""
    prompt = _training_prompt(name)
    prompt["10"]["inputs"]["folder"] = folder
    prompt["12"]["inputs"].update(frames=frames, image_to_video=True)
    prompt["13"]["inputs"]["image_to_video"] = "first"
    return prompt


def test_image_to_video_training_on_single_frames(comfy_client, comfy_layout):
    with pytest.raises(PromptRejected) as rejected:
        comfy_client.queue(_i2v_prompt("e2e_i2v_one_frame", DATASET_FOLDER, frames=1))
    errors = json.dumps(rejected.value.node_errors.get("12", {}).get("errors", []))
    assert "K5 Cache Latents" in errors and "set frames to 5 or more" in errors, errors

    dataset = Path(comfy_layout.input) / DATASET_FOLDER
    photos = Path(comfy_layout.input) / "e2e_i2v_photos"
    photos.mkdir(exist_ok=True)
    for path in dataset.iterdir():
        if path.stem != "bbb":  # the video and its caption stay behind
            shutil.copy(path, photos / path.name)
    with pytest.raises(ExecutionFailed) as failed:
        comfy_client.run(_i2v_prompt("e2e_i2v_photos", photos.name, frames=17), timeout=300)
    assert failed.value.details["node_type"] == "CinetuneK5TrainLoRA"
    assert failed.value.details["exception_type"] == "ValueError"
    message = failed.value.details["exception_message"]
    assert "every training clip is a single frame" in message, message
    assert "cache clips of 5 frames or more (4k+1) in K5 Cache Latents" in message, message
    assert all(e.get("run") != "e2e_i2v_photos" for e in comfy_client.events_of("cinetune.train.status"))

    prompt_id = comfy_client.queue(_i2v_prompt("e2e_i2v_mixed", DATASET_FOLDER, frames=17))
    comfy_client.wait(prompt_id, 300)
    started = [e for e in comfy_client.events_of("cinetune.train.status", prompt_id) if e["status"] == "started"]
    photo_count = sum(1 for p in dataset.iterdir() if p.suffix in (".png", ".jpg"))
    clips = len(list(dataset.glob("*.txt")))
    assert [e["message"].split("; ", 1)[1] for e in started] == [
        f"{photo_count} of {clips} samples are single frames and train text-to-video only"]

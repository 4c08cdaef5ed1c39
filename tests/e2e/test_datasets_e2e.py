"""Datasets end to end in a real ComfyUI over the API queue: two Dataset Folders holding files of the same names, one
cutting its videos by its own frame extraction (musubi-tuner's ``slide``), combined and cached by K5 Cache Latents on
the tiny models; bad extraction settings are refused when the prompt is queued."""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path

import pytest

import provision_test_data
from cinetune.core.media import probe_video
from cinetune.k5.tiny import TINY_NAMES

from .comfy_host import PromptRejected

pytestmark = pytest.mark.e2e

FOLDERS = ("e2e_datasets_a", "e2e_datasets_b")
CACHE_NAME = "e2e_combined_datasets"
FRAMES, TARGET_FPS, SLIDE, STRIDE = 17, 24.0, 9, 40  # the cacher's clips; folder a: 9-frame clips every 40 frames


@pytest.fixture(scope="module")
def folders(comfy_layout) -> list[Path]:
    """Two folders in the host's input folder, each with the Big Buck Bunny clip and a photo under the same names."""
    media = provision_test_data.locate_media()
    made = []
    for folder in FOLDERS:
        root = Path(comfy_layout.input) / folder
        root.mkdir(parents=True, exist_ok=True)
        for name in ("bbb", "astronaut"):
            shutil.copy(media[name], root / f"{name}{media[name].suffix}")
            (root / f"{name}.txt").write_text(f"{name} from {folder}\n")
        made.append(root)
    return made


def _sink(object_info: dict) -> str:
    """A host output node that takes any value (ComfyUI's PreviewAny), so the cacher's output is wanted."""
    for name, info in object_info.items():
        required = (info.get("input") or {}).get("required") or {}
        if info.get("output_node") and len(required) == 1 and next(iter(required.values()))[0] == "*":
            return name
    pytest.skip("this ComfyUI has no output node that accepts any type")


def _prompt(comfy_client, **extraction) -> dict:
    """Folder a with ``extraction`` (the Dataset Folder's appended widgets), folder b as saved before they existed
    (its four widgets only), combined, text- and latent-cached for Kandinsky 5."""
    folder = {"repeats": 1, "trigger_word": "ohwx", "default_caption": ""}
    return {
        "2": {"class_type": "CinetuneK5TextEncoderLoader",
              "inputs": {"qwen_name": TINY_NAMES["qwen"], "clip_name": TINY_NAMES["clip"], "dtype": "fp32"}},
        "3": {"class_type": "CinetuneK5VAELoader", "inputs": {"vae_name": TINY_NAMES["vae"], "dtype": "fp32"}},
        "10": {"class_type": "CinetuneDatasetFolder", "inputs": {"folder": FOLDERS[0], **folder, **extraction}},
        "11": {"class_type": "CinetuneDatasetFolder", "inputs": {"folder": FOLDERS[1], **folder}},
        "12": {"class_type": "CinetuneCombineDatasets", "inputs": {"dataset_1": ["10", 0], "dataset_2": ["11", 0]}},
        "13": {"class_type": "CinetuneK5CacheText",
               "inputs": {"dataset": ["12", 0], "text_encoder": ["2", 0], "cache_name": CACHE_NAME}},
        "14": {"class_type": "CinetuneK5CacheLatents",
               "inputs": {"text_cache": ["13", 0], "vae": ["3", 0], "frames": FRAMES, "frame_selection": "head",
                          "resolution": 128, "nabla": False, "image_to_video": False, "allow_upscale": False}},
        "15": {"class_type": _sink(comfy_client.object_info()), "inputs": {"source": ["14", 0]}},
    }


def _resampled(path: Path, target_fps: float) -> int:
    """Frames of a video at ``target_fps``: target frames i whose nearest source frame floor(i·src/tgt + 1/2)
    exists."""
    info = probe_video(path)
    ratio = Fraction(info["fps"]).limit_denominator(1001) / Fraction(target_fps)
    return sum(1 for i in range(4 * info["frames"]) if int(i * ratio + Fraction(1, 2)) < info["frames"])


def test_combined_folders_are_cached_one_entry_per_clip(folders, comfy_client, comfy_layout):
    prompt = _prompt(comfy_client, frame_extraction="slide", target_frames=str(SLIDE), frame_stride=STRIDE)
    comfy_client.run(prompt, timeout=900)
    latents = Path(comfy_layout.output) / "cinetune" / "cache" / CACHE_NAME / "latents"
    manifest = json.loads((latents / "manifest.json").read_text())["entries"]
    clips = sorted((e["item"], len(e["indices"])) for e in manifest.values())
    n = _resampled(folders[0] / "bbb.mp4", TARGET_FPS)
    slides = len(range(0, n - SLIDE + 1, STRIDE))
    a, b = FOLDERS
    assert clips == sorted([(f"{a}/astronaut.png", 1), *[(f"{a}/bbb.mp4", SLIDE)] * slides,
                            (f"{b}/astronaut.png", 1), (f"{b}/bbb.mp4", FRAMES)])
    assert len(list(latents.glob("*.safetensors"))) == len(clips) == slides + 3
    starts = sorted(e["indices"][0] for e in manifest.values() if e["item"] == f"{a}/bbb.mp4")
    assert len(set(starts)) == slides and starts[0] == 0


@pytest.mark.parametrize("bad, inputs, message", [
    ("target_frames", {"frame_extraction": "slide", "target_frames": "9, x"}, "'x' is not a whole number"),
    ("target_frames", {"frame_extraction": "head", "target_frames": "10"}, "10 frames fits no model family"),
    ("frame_stride", {"frame_extraction": "slide", "frame_stride": 0}, "below its minimum 1"),
    ("frame_extraction", {"frame_extraction": "chunks"}, "not one of its options"),
])
def test_bad_frame_extraction_is_refused_at_queue_time(folders, comfy_client, bad, inputs, message):
    with pytest.raises(PromptRejected) as err:
        comfy_client.queue(_prompt(comfy_client, **inputs))
    errors = json.dumps(err.value.node_errors.get("10", {}).get("errors", []), ensure_ascii=False)
    assert f"input '{bad}'" in errors and message in errors, errors

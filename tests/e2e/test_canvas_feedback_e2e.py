"""What the canvas tells a user, in a real ComfyUI over the API queue: sizes and folders a node cannot use are refused
by ``POST /prompt`` with the error on the node before anything runs; the Dataset Folder and the cacher show their
summaries (history outputs) and the cacher reports progress per item; a node's execution error reads as a sentence,
without the pack's module path."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cinetune.k5.tiny import TINY_NAMES
from cinetune.ltx2.tiny import TINY_LTX2_NAMES

from .comfy_host import ExecutionFailed, PromptRejected
from .models import DATASET_FOLDER, tiny_workflow
from .test_hardening_e2e import _sink

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def _example(name: str, **sizes) -> dict:
    """An example workflow on the tiny models of both families (``sizes``: the K5 sampler's widgets)."""
    api = json.loads((ROOT / "example_workflows" / "api" / f"{name}.json").read_text())
    return tiny_workflow(api, {**TINY_NAMES, **TINY_LTX2_NAMES}, **sizes)


def _node(prompt: dict, class_type: str) -> str:
    return next(node_id for node_id, node in prompt.items() if node["class_type"] == class_type)


def _refused(comfy_client, prompt: dict, node_id: str) -> str:
    """Queue ``prompt``, which must be refused; the errors on ``node_id`` as text. Nothing may have started."""
    started = len(comfy_client.events_of("execution_start"))
    with pytest.raises(PromptRejected) as err:
        comfy_client.queue(prompt)
    assert list(err.value.node_errors) == [node_id], err.value.node_errors
    assert len(comfy_client.events_of("execution_start")) == started
    return json.dumps(err.value.node_errors[node_id]["errors"], ensure_ascii=False)


def test_a_k5_sampler_size_that_does_not_fit_is_refused_on_the_sampler(comfy_client):
    prompt = _example("k5_text_to_video", width=500, frames=10)
    errors = _refused(comfy_client, prompt, _node(prompt, "CinetuneK5Sampler"))
    assert "K5 Sampler" in errors and "inputs 'width', 'height', 'frames'" in errors
    assert "width 500 is not a multiple of 16: use 496 or 512" in errors and "frames 10" in errors
    assert "use 9 or 13" in errors


def test_ltx2_sampler_settings_and_missing_links_are_refused_on_the_sampler(comfy_client):
    prompt = _example("ltx2_text_to_video")
    sampler = _node(prompt, "CinetuneLTX2Sampler")
    prompt[sampler]["inputs"]["height"] = 80
    errors = _refused(comfy_client, prompt, sampler)
    assert "height 80 is not a multiple of 32: use 64 or 96" in errors
    prompt[sampler]["inputs"].update(height=64, mode="stage 2")
    errors = _refused(comfy_client, prompt, sampler)
    assert "'video_latent'" in errors and "LTX-2 Latent Upsample" in errors


def test_a_missing_dataset_folder_is_refused_on_its_input(comfy_client):
    prompt = {"1": {"class_type": "CinetuneDatasetFolder", "inputs": {
                  "folder": "no_such_dataset", "repeats": 1, "trigger_word": "", "default_caption": ""}},
              "2": {"class_type": _sink(comfy_client.object_info()), "inputs": {"source": ["1", 0]}}}
    errors = _refused(comfy_client, prompt, "1")
    assert "input 'folder'" in errors and "dataset folder not found" in errors and "no_such_dataset" in errors


def test_dataset_folder_and_text_cacher_show_their_summaries_and_item_progress(comfy_client):
    prompt = {"2": {"class_type": "CinetuneK5TextEncoderLoader",
                    "inputs": {"qwen_name": TINY_NAMES["qwen"], "clip_name": TINY_NAMES["clip"], "dtype": "fp32"}},
              "10": {"class_type": "CinetuneDatasetFolder", "inputs": {
                  "folder": DATASET_FOLDER, "repeats": 1, "trigger_word": "ohwx", "default_caption": ""}},
              "11": {"class_type": "CinetuneK5CacheText", "inputs": {
                  "dataset": ["10", 0], "text_encoder": ["2", 0], "cache_name": "e2e_canvas_summaries"}},
              "12": {"class_type": _sink(comfy_client.object_info()), "inputs": {"source": ["11", 0]}}}
    prompt_id = comfy_client.queue(prompt)
    outputs = comfy_client.wait(prompt_id, timeout=600)["outputs"]
    # the dataset: a video with sound and two photos; captions for videos and images use two templates, so the
    # cache holds the three captions and the empty caption of each template
    dataset = outputs["10"]["text"][0].splitlines()
    assert dataset == ["3 items (1 video, 1 with sound, 2 images), 0 problems"]
    cache = outputs["11"]["text"][0].splitlines()
    assert cache[0] == ("5 captions (with the empty caption for caption dropout): 5 encoded, 0 reused from the cache; "
                        "0 files skipped")
    assert re.fullmatch(r"cache: .*cinetune[/\\]cache[/\\]e2e_canvas_summaries", cache[1])
    progress = [(e["value"], e["max"]) for e in comfy_client.events_of("progress", prompt_id) if e.get("node") == "11"]
    # one update per item; newer hosts throttle progress messages, so only the order and the ends are certain
    assert progress[0] == (0, 5) and progress[-1] == (5, 5) and 2 <= len(progress) <= 6
    assert [v for v, _ in progress] == sorted({v for v, _ in progress}), progress


def test_an_execution_error_reads_without_the_module_path(comfy_client, comfy_layout):
    empty = Path(comfy_layout.input) / "e2e_empty_dataset"
    empty.mkdir(exist_ok=True)
    prompt = {"1": {"class_type": "CinetuneDatasetFolder", "inputs": {
                  "folder": empty.name, "repeats": 1, "trigger_word": "", "default_caption": ""}},
              "2": {"class_type": _sink(comfy_client.object_info()), "inputs": {"source": ["1", 0]}}}
    with pytest.raises(ExecutionFailed) as err:
        comfy_client.run(prompt, timeout=300)  # the folder exists, so the prompt is queued; scanning finds nothing
    details = err.value.details
    assert details["node_type"] == "CinetuneDatasetFolder"
    assert details["exception_type"] == "ValueError"
    assert details["exception_message"].startswith("no videos or images found in ")
    assert "cinetune." not in details["exception_type"] + details["exception_message"]


def test_videos_caches_and_runs_share_one_lower_case_output_folder(comfy_client):
    info = comfy_client.object_info()["CinetuneSaveVideo"]["input"]["required"]["filename_prefix"]
    assert info[1]["default"].startswith("cinetune/")
    for path in sorted((ROOT / "example_workflows" / "api").glob("*.json")):
        for node in json.loads(path.read_text()).values():
            if node["class_type"] == "CinetuneSaveVideo":
                family = "ltx2" if path.stem.startswith("ltx2") else "k5"
                assert node["inputs"]["filename_prefix"].startswith(f"cinetune/{family}/"), path.name

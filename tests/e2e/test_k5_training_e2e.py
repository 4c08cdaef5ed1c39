"""Kandinsky 5 LoRA training end to end in a real ComfyUI over the API queue, on the tiny models and a real
dataset (the Big Buck Bunny clip and two photos): cache, train (the example workflow connects every training
settings node and a validation prompt), sample with the LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cinetune.core.checkpoint import read_safetensors_header
from cinetune.core.media import read_video
from cinetune.k5.dit import load_k5_dit
from cinetune.k5.tiny import TINY_NAMES
from comfy_lora_keys import native_lora_report

from .models import TINY_TRAINING, tiny_workflow

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def _training_prompt(name: str) -> dict:
    api = json.loads((ROOT / "example_workflows" / "api" / "k5_lora_training.json").read_text())
    return tiny_workflow(api, TINY_NAMES, output_name=name, seed=5)


def _video_frames(comfy_client, comfy_layout, entry) -> torch.Tensor:
    """The frames of the Save Video node's mp4 (node 7; the trainer may show validation clips too)."""
    video = [p for p in comfy_client.output_files({"outputs": {"7": entry["outputs"]["7"]}}, comfy_layout.output)
             if p.suffix == ".mp4"][0]
    return read_video(video)[0].float()


@pytest.fixture(scope="module")
def trained(comfy_client, comfy_layout):
    """Runs the example training workflow once (30 steps) and returns (prompt, history entry)."""
    prompt = _training_prompt("e2e_lora")
    entry = comfy_client.run(prompt, timeout=1200)
    return prompt, entry


def test_training_writes_a_lora_that_native_comfyui_maps_completely(trained, comfy_layout, comfy_host_dir, tmp_path):
    lora = Path(comfy_layout.models) / "loras" / "e2e_lora.safetensors"
    assert lora.is_file()
    infos, metadata = read_safetensors_header(lora)
    assert metadata["base_model"] == TINY_NAMES["dit"] and metadata["trigger_word"] == "ohwx"
    assert metadata["ss_network_dim"] == "8"
    model = load_k5_dit(Path(comfy_layout.models) / "diffusion_models" / TINY_NAMES["dit"], weight_dtype="fp32").model
    base = {f"diffusion_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    save_file(base, tmp_path / "base.safetensors")
    report = native_lora_report(comfy_host_dir, tmp_path / "base.safetensors", tmp_path / "merged.safetensors", 1.0,
                                [lora])[str(lora)]
    assert report["not_loaded"] == []
    assert len(report["patched"]) == len([k for k in infos if k.endswith(".lora_down.weight")]) == 26


def test_training_reports_every_step_over_the_websocket(trained, comfy_client):
    steps = [e["data"]["step"] for e in comfy_client.events if e.get("type") == "cinetune.train.progress"
             and e["data"]["run"] == "e2e_lora"]
    assert steps[:TINY_TRAINING["max_steps"]] == list(range(1, TINY_TRAINING["max_steps"] + 1))
    event = next(e["data"] for e in comfy_client.events if e.get("type") == "cinetune.train.progress"
                 and e["data"]["run"] == "e2e_lora")
    assert event["node"] == "13" and event["max_steps"] == TINY_TRAINING["max_steps"]
    assert all(k in event for k in ("loss", "loss_ema", "lr", "steps_per_s", "eta_s"))
    statuses = [e["data"]["status"] for e in comfy_client.events if e.get("type") == "cinetune.train.status"
                and e["data"]["run"] == "e2e_lora"]
    assert statuses[0] == "started" and statuses[-1] == "finished"


def test_sampling_with_the_trained_lora_changes_the_video(trained, comfy_client, comfy_layout):
    prompt, entry = trained
    with_lora = _video_frames(comfy_client, comfy_layout, entry)
    base = {k: v for k, v in json.loads(json.dumps(prompt)).items() if k not in ("10", "11", "12", "13")}
    base["5"]["inputs"]["model"] = ["1", 0]
    without = _video_frames(comfy_client, comfy_layout, comfy_client.run(base, timeout=600))
    assert with_lora.shape == without.shape
    assert (with_lora - without).abs().mean() > 0.5


def test_requeueing_the_unchanged_workflow_does_not_train_again(trained, comfy_client, comfy_layout):
    lora = Path(comfy_layout.models) / "loras" / "e2e_lora.safetensors"
    before = lora.read_bytes()
    progress = lambda: sum(1 for e in comfy_client.events  # noqa: E731
                           if e.get("type") == "cinetune.train.progress" and e["data"]["run"] == "e2e_lora")
    steps_before = progress()
    entry = comfy_client.run(json.loads(json.dumps(trained[0])), timeout=600)
    assert progress() == steps_before, "the unchanged run was trained again"
    assert lora.read_bytes() == before
    assert [p for p in comfy_client.output_files(entry, comfy_layout.output) if p.suffix == ".mp4"]


def test_rerunning_without_resume_refuses_to_overwrite_the_run(trained, comfy_client):
    prompt = json.loads(json.dumps(trained[0]))
    prompt["13"]["inputs"]["max_steps"] = TINY_TRAINING["max_steps"] + 1  # a changed input forces re-execution
    with pytest.raises(Exception, match="(?i)resume"):
        comfy_client.run(prompt, timeout=600)


def test_empty_dataset_folder_is_a_clear_error(comfy_client, comfy_layout):
    (Path(comfy_layout.input) / "empty_dataset").mkdir(exist_ok=True)
    prompt = _training_prompt("never_trained")
    prompt["10"]["inputs"]["folder"] = "empty_dataset"
    with pytest.raises(Exception, match="empty_dataset") as err:
        comfy_client.run(prompt, timeout=600)
    assert ".mp4" in str(err.value)


def test_training_with_block_swap_fp8_and_validation_videos(comfy_client, comfy_layout):
    prompt = _training_prompt("e2e_swap_fp8")
    prompt["1"]["inputs"].update(weight_dtype="fp8_e4m3fn")
    prompt["13"]["inputs"].update(max_steps=6, validate_every=3, save_every=0, blocks_to_swap=3)
    del prompt["13"]["inputs"]["validation"]  # the one-prompt input of earlier workflows still works
    prompt["13"]["inputs"]["validation_conditioning"] = ["4", 0]
    prompt["13"]["inputs"]["vae"] = ["3", 0]
    entry = comfy_client.run(prompt, timeout=1200)
    run = Path(comfy_layout.output) / "cinetune" / "runs" / "e2e_swap_fp8"
    assert sorted(p.name for p in (run / "validation").glob("*.mp4")) == ["step_000003.mp4", "step_000006.mp4"]
    assert (Path(comfy_layout.models) / "loras" / "e2e_swap_fp8.safetensors").is_file()
    shown = entry["outputs"]["13"]["images"]
    assert shown[0]["filename"] == "step_000006.mp4"


def test_live_loss_chart_draws_the_real_training_run(comfy_server, comfy_client, tmp_path):
    from .browser import missing_browser_reason, watch_loss_chart
    from .models import tiny_ui_workflow

    reason = missing_browser_reason()
    if reason:
        pytest.skip(reason)
    workflow = tiny_ui_workflow("k5_lora_training", TINY_NAMES, output_name="chart_lora", max_steps=40)
    watch = watch_loss_chart(comfy_server.base_url, workflow, node_id=13, min_points=20, timeout=300,
                             screenshot_path=tmp_path / "chart.png")
    assert watch.points >= 20 and watch.colored_pixels > 0
    assert "loss_chart" in watch.widget_names
    # 23 widget values + the seed's control_after_generate value; the chart itself is never saved
    assert len(watch.widgets_values) == 24 and watch.widgets_values[0] == "chart_lora"
    comfy_client.wait(watch.prompt_id, timeout=600)


def test_training_refuses_a_model_with_loras_and_never_overwrites_a_foreign_lora(trained, comfy_client, comfy_layout):
    prompt = _training_prompt("e2e_with_lora")
    prompt["21"] = {"class_type": "CinetuneK5LoRALoader",
                    "inputs": {"model": ["1", 0], "lora_name": "e2e_lora.safetensors", "strength": 1.0}}
    prompt["13"]["inputs"]["model"] = ["21", 0]
    with pytest.raises(Exception, match="K5 Model Loader directly"):
        comfy_client.run(prompt, timeout=600)

    foreign = Path(comfy_layout.models) / "loras" / "someone_elses.safetensors"
    save_file({"x": torch.zeros(1)}, foreign)
    before = foreign.read_bytes()
    with pytest.raises(Exception, match="exists and was not written by this run"):  # before the first step
        comfy_client.run(_training_prompt("someone_elses"), timeout=600)
    assert foreign.read_bytes() == before

"""Training on several processes from the graph, end to end in a real ComfyUI on the CPU (``--cpu``: the trainer's
``gpus = 2`` starts two gloo worker processes under torchrun): the Kandinsky 5 example training workflow completes and
samples with its LoRA, the chart's events arrive from the workers, the headless command continues the run folder
the node wrote as the graph continues it, and Cancel stops the workers after a checkpoint and installs the partial
LoRA under its step."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cinetune.core.checkpoint import read_safetensors_header
from cinetune.core.lora import load_lora
from cinetune.k5.tiny import TINY_NAMES
from cinetune.training.checkpointing import list_checkpoints, read_state
from cinetune.training.launch import read_events

from .comfy_host import ExecutionInterrupted
from .models import tiny_workflow

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
GPUS = 2
STEPS = 4


def _node(prompt: dict, class_type: str) -> str:
    return next(k for k, v in prompt.items() if v["class_type"] == class_type)


def _prompt(name: str, *, max_steps: int, gpus: int = GPUS, resume: bool = False, save_every: int = 2) -> dict:
    """The example training workflow on the tiny models: every clip twice (each (bucket, frames) group then holds
    an even number of clips, so every batch of 2 splits over 2 ranks), batches of 2, no validation clips."""
    api = json.loads((ROOT / "example_workflows" / "api" / "k5_lora_training.json").read_text())
    prompt = tiny_workflow(api, TINY_NAMES, output_name=name, max_steps=max_steps, seed=5)
    prompt[_node(prompt, "CinetuneDatasetFolder")]["inputs"]["repeats"] = 2
    prompt[_node(prompt, "CinetuneK5TrainLoRA")]["inputs"].update(
        gpus=gpus, batch_size=2, validate_every=0, resume=resume, save_every=save_every)
    return prompt


def _run_dir(layout, name: str) -> Path:
    return Path(layout.output) / "cinetune" / "runs" / name


def _lora_vector(path: Path) -> torch.Tensor:
    return torch.cat([torch.cat([d.flatten(), u.flatten()]) for _, (d, u, _) in sorted(load_lora(path).layers.items())])


@pytest.fixture(scope="module")
def trained(comfy_client):
    """The workflow with gpus = 2, run once: (prompt, prompt id, history entry)."""
    prompt = _prompt("e2e_multi", max_steps=STEPS)
    prompt_id = comfy_client.queue(prompt)
    return prompt, prompt_id, comfy_client.wait(prompt_id, timeout=1200)


def test_two_worker_processes_train_the_lora_and_the_chart_follows_them(trained, comfy_client, comfy_layout):
    prompt, prompt_id, entry = trained
    lora = Path(comfy_layout.models) / "loras" / "e2e_multi.safetensors"
    meta = read_safetensors_header(lora)[1]
    assert (meta["cinetune.steps"], meta["cinetune.complete"], meta["cinetune.run"]) == (str(STEPS), "true",
                                                                                      "e2e_multi")
    assert load_lora(lora).layers  # and the sampler after the trainer ran with it:
    assert any(p.suffix == ".mp4" for p in comfy_client.output_files(entry, comfy_layout.output))

    trainer = _node(prompt, "CinetuneK5TrainLoRA")
    progress = comfy_client.events_of("cinetune.train.progress", prompt_id)
    assert [e["step"] for e in progress] == list(range(1, STEPS + 1))
    assert all(e["node"] == trainer and e["run"] == "e2e_multi" and e["max_steps"] == STEPS for e in progress)
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in progress)
    status = comfy_client.events_of("cinetune.train.status", prompt_id)
    assert status[0]["status"] == "started" and f"on {GPUS} processes" in status[0]["message"]
    assert (status[-1]["status"], status[-1]["message"]) == ("finished", str(lora))

    run = _run_dir(comfy_layout, "e2e_multi")
    events, _ = read_events(run)
    assert events[0]["event"] == "started" and events[0]["world_size"] == GPUS and events[-1]["event"] == "finished"
    recipe = json.loads((run / "recipe.json").read_text())
    assert recipe["family"] == "kandinsky-5" and recipe["loader"]["weight_dtype"] == "default"
    assert Path(recipe["models"]["dit"]["path"]).name == TINY_NAMES["dit"]
    assert recipe["config"]["max_steps"] == STEPS and recipe["config"]["batch_size"] == 2


def test_the_headless_command_continues_the_run_as_the_graph_does(trained, comfy_client, comfy_layout):
    run, graph = _run_dir(comfy_layout, "e2e_multi"), _run_dir(comfy_layout, "e2e_multi_graph")
    shutil.rmtree(graph, ignore_errors=True)
    shutil.copytree(run, graph)

    done = subprocess.run([sys.executable, "-m", "cinetune.training.launch", str(run), "--max-steps", str(STEPS + 2),
                           "--device", "cpu", "--quiet"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    events, _ = read_events(run)
    assert [e["step"] for e in events if e["event"] == "progress"][-2:] == [STEPS + 1, STEPS + 2]
    assert events[-1]["event"] == "finished"

    # the same continuation in the graph: the copied run folder resumed by the trainer node in ComfyUI's process
    comfy_client.run(_prompt("e2e_multi_graph", max_steps=STEPS + 2, gpus=1, resume=True), timeout=1200)
    headless, in_graph = list_checkpoints(run)[-1], list_checkpoints(graph)[-1]
    assert headless[0] == in_graph[0] == STEPS + 2
    a, b = _lora_vector(headless[1] / "lora.safetensors"), _lora_vector(in_graph[1] / "lora.safetensors")
    assert float((a - b).norm() / b.norm()) < 1e-5
    losses_a, losses_b = (torch.tensor(read_state(c[1])["losses"]) for c in (headless, in_graph))
    assert len(losses_a) == STEPS + 2 and torch.allclose(losses_a, losses_b, rtol=1e-5, atol=1e-7)


def test_cancel_stops_the_workers_after_a_checkpoint_and_installs_the_partial_lora(comfy_client, comfy_layout):
    name = "e2e_multi_cancel"
    prompt_id = comfy_client.queue(_prompt(name, max_steps=500, save_every=0))
    deadline = time.monotonic() + 900
    while len(comfy_client.events_of("cinetune.train.progress", prompt_id)) < 2:
        assert time.monotonic() < deadline, "the workers never reported two steps"
        time.sleep(0.2)
    comfy_client.interrupt(prompt_id)
    with pytest.raises(ExecutionInterrupted):
        comfy_client.wait(prompt_id, timeout=600)

    run = _run_dir(comfy_layout, name)
    step = list_checkpoints(run)[-1][0]
    assert 2 <= step < 500
    last = comfy_client.events_of("cinetune.train.status", prompt_id)[-1]
    partial = Path(comfy_layout.models) / "loras" / f"{name}_step{step}.safetensors"
    assert (last["status"], last["step"], last["message"]) == ("interrupted", step, str(partial))
    meta = read_safetensors_header(partial)[1]
    assert (meta["cinetune.steps"], meta["cinetune.complete"]) == (str(step), "false")
    assert "stopped" in [e["event"] for e in read_events(run)[0]]

"""The training settings nodes end to end in a real ComfyUI over the API queue, on the tiny models of both families:
a run with every settings node set away from its defaults records each setting in its run config and does what it
says (LoRA layers, saved dtype, EMA LoRA, TensorBoard files, held-out loss, validation clips for two chained prompts
with a start image, at step 0 and later), a second run starts from the first run's LoRA, and bad settings are
refused when the prompt is queued, before anything runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cinetune.core.checkpoint import read_safetensors_header
from cinetune.core.media import probe_audio, probe_video, read_video
from cinetune.k5.tiny import TINY_NAMES
from cinetune.ltx2.tiny import TINY_LTX2_NAMES

from .comfy_host import PromptRejected
from .models import tiny_workflow

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
TRAINER, OPTIMIZER, LORA, SAMPLING, CHECKPOINT, PROMPT = "13", "14", "15", "16", "17", "18"
SECOND_PROMPT, IMAGE = "19", "20"


def _example(name: str) -> dict:
    return json.loads((ROOT / "example_workflows" / "api" / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def start_image(comfy_layout, test_data) -> str:
    shutil.copy(test_data["astronaut"], Path(comfy_layout.input) / "astronaut.png")
    return "astronaut.png"


def _with_settings(prompt: dict, prompt_class: str, second_prompt: dict, image: str, **settings) -> dict:
    """The example's settings nodes set to ``settings`` (node id → inputs), a second validation prompt with a start
    image chained after the first, the trainer reading the chain and the cached dataset as held-out data."""
    for node, inputs in settings.items():
        prompt[node]["inputs"].update(inputs)
    prompt[IMAGE] = {"class_type": "LoadImage", "inputs": {"image": image}}
    second = json.loads(json.dumps(prompt[PROMPT]))
    second["inputs"].update(second_prompt, previous=[PROMPT, 0], start_image=[IMAGE, 0])
    assert second["class_type"] == prompt_class
    prompt[SECOND_PROMPT] = second
    prompt[TRAINER]["inputs"].update(validation=[SECOND_PROMPT, 0], validation_data=["12", 0])
    return prompt


def _run_files(comfy_layout, name: str) -> tuple[Path, dict]:
    run = Path(comfy_layout.output) / "cinetune" / "runs" / name
    return run, json.loads((run / "run.json").read_text())


def _progress(comfy_client, name: str) -> list[dict]:
    return [d for d in comfy_client.events_of("cinetune.train.progress") if d.get("run") == name]


def _lora_layers(path: Path, suffix: str) -> list[str]:
    return sorted(k[: -len(suffix)] for k in read_safetensors_header(path)[0] if k.endswith(suffix))


K5_SETTINGS = {
    OPTIMIZER: dict(weight_decay=0.01, beta1=0.85, beta2=0.99, eps=1e-6, max_grad_norm=0.5, min_lr_ratio=0.1),
    LORA: dict(include_patterns="visual_transformer_blocks\\.\\d+\\..*_attention\\..*",
               exclude_patterns="visual_transformer_blocks\\.1\\..*",
               lora_dropout=0.1, rank_dropout=0.1, module_dropout=0.1),
    SAMPLING: dict(sigma_min=0.1, sigma_max=0.9, loss_weighting="cosmap"),
    CHECKPOINT: dict(save_every_epochs=1, keep_checkpoints=2, save_dtype="fp16", tensorboard=True, ema_decay=0.9,
                     validation_loss_every=2, validation_loss_sigmas="0.2, 0.8"),
    PROMPT: dict(frames=5, steps=2, sample_at_start=True),
    TRAINER: dict(lr_schedule="cosine", validate_every=2, save_every=0),
}


@pytest.fixture(scope="module")
def k5_run(comfy_client, start_image):
    """A 4-step K5 run with every settings node set and two validation prompts → (prompt, history entry)."""
    prompt = tiny_workflow(_example("k5_lora_training"), TINY_NAMES, output_name="e2e_k5_settings", max_steps=4)
    prompt = _with_settings(prompt, "CinetuneK5ValidationPrompt",
                            dict(width=64, height=64, frames=5, steps=2, guidance=1.0, seed=7, sample_at_start=False),
                            start_image, **K5_SETTINGS)
    return prompt, comfy_client.run(prompt, timeout=1200)


def test_k5_run_records_every_setting_in_its_config(k5_run, comfy_layout):
    _, run = _run_files(comfy_layout, "e2e_k5_settings")
    config = run["config"]
    assert (config["weight_decay"], config["betas"], config["eps"], config["max_grad_norm"],
            config["min_lr_ratio"]) == (0.01, [0.85, 0.99], 1e-6, 0.5, 0.1)
    assert config["lora_include"] == ["visual_transformer_blocks\\.\\d+\\..*_attention\\..*"]
    assert config["lora_exclude"] == ["visual_transformer_blocks\\.1\\..*"]
    assert (config["lora_dropout"], config["rank_dropout"], config["module_dropout"]) == (0.1, 0.1, 0.1)
    assert (config["sigma_min"], config["sigma_max"], config["loss_weighting"]) == (0.1, 0.9, "cosmap")
    assert (config["save_every_epochs"], config["keep_checkpoints"], config["save_dtype"], config["tensorboard"],
            config["ema_decay"], config["validation_loss_every"], config["validation_loss_sigmas"]) == (
        1, 2, "float16", True, 0.9, 2, [0.2, 0.8])
    assert config["lr_schedule"] == "cosine" and "init_lora" not in config  # left at its default: not written
    validation = json.loads(run["metadata"]["validation"])
    assert validation["every"] == 2 and validation["sample_at_start"] is True
    assert [(p["width"], p["frames"], p["steps"], p["seed"], p["start_image"]) for p in validation["prompts"]] == [
        (0, 5, 2, 42, False), (64, 5, 2, 7, True)]


def test_k5_run_does_what_its_settings_say(k5_run, comfy_client, comfy_layout):
    _, entry = k5_run
    run, _ = _run_files(comfy_layout, "e2e_k5_settings")
    loras = Path(comfy_layout.models) / "loras"
    layers = _lora_layers(loras / "e2e_k5_settings.safetensors", ".lora_down.weight")
    # the self- and cross-attention projections (4 + 4) of visual block 0; block 1 is excluded
    assert len(layers) == 8 and all("visual_transformer_blocks.0." in k and "_attention." in k for k in layers)
    infos = read_safetensors_header(loras / "e2e_k5_settings.safetensors")[0]
    assert {infos[f"{k}.lora_down.weight"].dtype for k in layers} == {"F16"}
    assert (loras / "e2e_k5_settings_ema.safetensors").is_file()
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(list((run / "checkpoints").glob("step_*"))) <= 2
    progress = _progress(comfy_client, "e2e_k5_settings")
    assert [d["step"] for d in progress] == [1, 2, 3, 4]
    assert all(isinstance(d["grad_norm"], float) for d in progress)
    assert [d["step"] for d in progress if d["validation_loss"] is not None] == [2, 4]
    clips = sorted(p.name for p in (run / "validation").glob("*.mp4"))
    assert clips == [f"step_{s:06d}_p{k}.mp4" for s in (0, 2, 4) for k in (1, 2)]
    assert probe_video(run / "validation" / "step_000004_p2.mp4")["width"] == 64
    assert [i["filename"] for i in entry["outputs"][TRAINER]["images"]] == ["step_000004_p1.mp4", "step_000004_p2.mp4"]


def test_a_k5_run_starts_from_the_lora_of_another_run(k5_run, comfy_client, comfy_layout):
    prompt = json.loads(json.dumps(k5_run[0]))
    prompt[TRAINER]["inputs"].update(output_name="e2e_k5_from_lora", max_steps=2, validate_every=0,
                                     validation=[PROMPT, 0])  # the first prompt alone, at step 0
    del prompt[TRAINER]["inputs"]["validation_data"]
    prompt[LORA]["inputs"]["init_lora"] = "e2e_k5_settings.safetensors"
    prompt[CHECKPOINT]["inputs"].update(validation_loss_every=0, ema_decay=0.0, tensorboard=False)
    comfy_client.run(prompt, timeout=900)
    run_dir, run = _run_files(comfy_layout, "e2e_k5_from_lora")
    assert Path(run["config"]["init_lora"]).name == "e2e_k5_settings.safetensors"
    loras = Path(comfy_layout.models) / "loras"
    assert _lora_layers(loras / "e2e_k5_from_lora.safetensors", ".lora_down.weight") == _lora_layers(
        loras / "e2e_k5_settings.safetensors", ".lora_down.weight")
    # the step-0 clip of the same prompt shows the LoRA the run starts from, not the base model
    first, _ = _run_files(comfy_layout, "e2e_k5_settings")
    base = read_video(first / "validation" / "step_000000_p1.mp4")[0].float()
    start = read_video(run_dir / "validation" / "step_000000.mp4")[0].float()
    assert base.shape == start.shape and (start - base).abs().mean() > 0.5


def test_an_ltx2_run_with_every_settings_node(comfy_client, comfy_layout, start_image):
    prompt = tiny_workflow(_example("ltx2_lora_training"), TINY_LTX2_NAMES, output_name="e2e_ltx2_settings",
                           max_steps=3)
    prompt = _with_settings(
        prompt, "CinetuneLTX2ValidationPrompt",
        dict(width=96, height=64, frames=9, steps=2, video_cfg=1.0, audio_cfg=1.0, seed=5, sample_at_start=False),
        start_image,
        **{OPTIMIZER: dict(max_grad_norm=0.25),
           LORA: dict(include_patterns="transformer_blocks\\.0\\..*"),
           SAMPLING: dict(sigma_min=0.05, sigma_max=0.95, loss_weighting="sigma_sqrt", i2v_probability=0.0),
           CHECKPOINT: dict(keep_checkpoints=1, save_dtype="fp32", validation_loss_every=1, ema_decay=0.5),
           PROMPT: dict(frames=9, steps=2, sample_at_start=True)})
    entry = comfy_client.run(prompt, timeout=1200)
    run_dir, run = _run_files(comfy_layout, "e2e_ltx2_settings")
    config = run["config"]
    assert (config["max_grad_norm"], config["sigma_min"], config["sigma_max"], config["loss_weighting"]) == (
        0.25, 0.05, 0.95, "sigma_sqrt")
    assert (config["i2v"], config["i2v_prob"]) == ("off", 0.0)  # i2v_probability 0 overrides first_frame_conditioning
    assert (config["keep_checkpoints"], config["save_dtype"], config["validation_loss_every"]) == (1, "float32", 1)
    layers = _lora_layers(Path(comfy_layout.models) / "loras" / "e2e_ltx2_settings.safetensors", ".lora_A.weight")
    assert layers and all(".transformer_blocks.0." in f".{k}" for k in layers)
    assert (Path(comfy_layout.models) / "loras" / "e2e_ltx2_settings_ema.safetensors").is_file()
    progress = _progress(comfy_client, "e2e_ltx2_settings")
    assert [d["step"] for d in progress] == [1, 2, 3]
    assert all(isinstance(d["validation_loss"], float) for d in progress)
    clips = sorted(p.name for p in (run_dir / "validation").glob("*.mp4"))
    assert clips == [f"step_{s:06d}_p{k}.mp4" for s in (0, 3) for k in (1, 2)]
    second = run_dir / "validation" / "step_000003_p2.mp4"
    assert (probe_video(second)["width"], probe_video(second)["frames"]) == (96, 9)
    assert probe_audio(second)["channels"] == 2
    validation = json.loads(run["metadata"]["validation"])
    assert validation["steps"] == [3] and [p["start_image"] for p in validation["prompts"]] == [False, True]
    assert [i["filename"] for i in entry["outputs"][TRAINER]["images"]] == ["step_000003_p1.mp4", "step_000003_p2.mp4"]


@pytest.mark.parametrize("family, node, inputs, problem", [
    ("k5", LORA, dict(include_patterns="visual_.*\n(unclosed"), "is not a regular expression"),
    ("k5", PROMPT, dict(width=100), "width 100 is not a multiple of 16: use 96 or 112"),
    ("k5", PROMPT, dict(frames=10), "frames 10 is not of the form 4k+1: use 9 or 13"),
    ("k5", SAMPLING, dict(sigma_min=0.9, sigma_max=0.1), "sigma_min (0.9) must be below sigma_max (0.1)"),
    ("k5", CHECKPOINT, dict(validation_loss_sigmas="0.1, half"), "validation_loss_sigmas"),
    ("k5", TRAINER, dict(lr_schedule="cosine", warmup_steps=50), "warmup_steps=50 is longer than the run"),
    ("ltx2", PROMPT, dict(width=100), "width 100 is not a multiple of 32: use 96 or 128"),
    ("ltx2", PROMPT, dict(frames=10), "frames 10 is not of the form 8k+1: use 9 or 17"),
    ("ltx2", LORA, dict(exclude_patterns="[audio"), "is not a regular expression"),
])
def test_bad_settings_are_refused_when_queued_before_anything_runs(comfy_client, comfy_layout, family, node, inputs,
                                                                   problem):
    name = f"never_{family}_{node}"
    example, names = ("k5_lora_training", TINY_NAMES) if family == "k5" else ("ltx2_lora_training", TINY_LTX2_NAMES)
    prompt = tiny_workflow(_example(example), names, output_name=name, max_steps=3)
    prompt[node]["inputs"].update(inputs)
    executed_before = len(comfy_client.events_of("executing"))
    with pytest.raises(PromptRejected) as err:
        comfy_client.queue(prompt)
    errors = json.dumps(err.value.node_errors.get(node, {}).get("errors", []), ensure_ascii=False)
    assert problem in errors, errors
    assert len(comfy_client.events_of("executing")) == executed_before  # nothing ran
    assert not (Path(comfy_layout.output) / "cinetune" / "runs" / name).exists()

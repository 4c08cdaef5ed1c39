"""What a hostile-but-realistic API user sends, refused or repaired at the right place, in a real ComfyUI: combo values
outside their options, names that cannot become files, dataset folders outside the allowed places, a damaged cache
entry, a LoRA of another model size."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cinetune.core.checkpoint import read_safetensors_header
from cinetune.k5.dit import load_k5_dit
from cinetune.k5.tiny import TINY_NAMES

from .comfy_host import ExecutionFailed, PromptRejected
from .models import DATASET_FOLDER, tiny_workflow

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
NOT_AN_OPTION = "definitely not an option"


def _training_prompt(name: str, *, max_steps: int = 2) -> dict:
    """The example training workflow on the tiny models, ending in the trainer and a memory estimate (no sampling)."""
    api = json.loads((ROOT / "example_workflows" / "api" / "k5_lora_training.json").read_text())
    prompt = tiny_workflow(api, TINY_NAMES, output_name=name, max_steps=max_steps)
    prompt = {k: v for k, v in prompt.items()
              if k in ("1", "2", "3", "10", "11", "12", "13", "14", "15", "16", "17")}
    del prompt["13"]["inputs"]["validation"]  # its prompt chain needs the text encode node
    prompt["13"]["inputs"]["validate_every"] = 0
    prompt["11"]["inputs"]["cache_name"] = name
    prompt["13"]["inputs"]["save_every"] = 0
    prompt["20"] = {"class_type": "CinetuneK5MemoryEstimate", "inputs": {
        "model": ["13", 0], "mode": "sampling", "width": 128, "height": 64, "frames": 9, "cfg": False,
        "lora_rank": 8, "optimizer": "adamw"}}
    return prompt


def _node_errors(err: PromptRejected, node_id: str) -> str:
    return json.dumps(err.node_errors.get(node_id, {}).get("errors", []), ensure_ascii=False)


def _sink(object_info: dict) -> str:
    """A host output node that takes any value (ComfyUI's PreviewAny), so a lone node of the pack gets validated."""
    for name, info in object_info.items():
        required = (info.get("input") or {}).get("required") or {}
        if info.get("output_node") and len(required) == 1 and next(iter(required.values()))[0] == "*":
            return name
    pytest.skip("this ComfyUI has no output node that accepts any type")


def _combo_options(spec: list) -> list | None:
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO":
        return (spec[1] if len(spec) > 1 else {}).get("options", [])
    return None


def test_every_combo_of_every_node_refuses_a_value_outside_its_options(comfy_client):
    info = comfy_client.object_info()
    sink = _sink(info)
    checked = []
    for node_type, node in sorted(info.items()):
        if not node_type.startswith("Cinetune"):
            continue
        inputs = node.get("input") or {}
        for section in ("required", "optional"):
            for name, spec in (inputs.get(section) or {}).items():
                options = _combo_options(spec)
                if options is None:
                    continue
                prompt = {"1": {"class_type": node_type, "inputs": {name: NOT_AN_OPTION}}}
                if not node.get("output_node"):
                    prompt["2"] = {"class_type": sink, "inputs": {"source": ["1", 0]}}
                with pytest.raises(PromptRejected) as err:
                    comfy_client.queue(prompt)
                errors = _node_errors(err.value, "1")
                assert node["display_name"] in errors and f"input '{name}'" in errors, (node_type, name, errors)
                assert repr(NOT_AN_OPTION) in errors, (node_type, name, errors)
                assert all(json.dumps(repr(o), ensure_ascii=False)[1:-1] in errors for o in options[:20]), errors
                checked.append((node_type, name))
    nodes = {node_type for node_type, _ in checked}
    assert {"CinetuneK5ModelLoader", "CinetuneK5MemoryEstimate", "CinetuneLTX2Sampler", "CinetuneLTX2VAELoader",
            "CinetuneK5TrainLoRA", "CinetuneK5CacheLatents"} <= nodes
    assert ("CinetuneLTX2Sampler", "mode") in checked and ("CinetuneLTX2Sampler", "scheduler") in checked
    assert comfy_client.object_info()  # the server still answers


def test_the_combo_values_of_the_issue_are_refused_with_their_options(comfy_client):
    cases = [("CinetuneK5ModelLoader", "nabla", "true", "'auto', 'on', 'off'"),
             ("CinetuneK5MemoryEstimate", "mode", "train", "'sampling', 'training'"),
             ("CinetuneK5TextEncoderLoader", "dtype", "bfloat16", "'bf16', 'fp16', 'fp32'"),
             ("CinetuneLTX2Sampler", "mode", "stage2", "'dev', 'distilled', 'stage 2'")]
    sink = _sink(comfy_client.object_info())
    for node_type, name, value, options in cases:
        prompt = {"1": {"class_type": node_type, "inputs": {name: value}},
                  "2": {"class_type": sink, "inputs": {"source": ["1", 0]}}}
        with pytest.raises(PromptRejected) as err:
            comfy_client.queue(prompt)
        errors = _node_errors(err.value, "1")
        assert f"input '{name}': '{value}' is not one of its options; valid options: {options}" in errors, errors


@pytest.mark.parametrize("name, problem", [
    ("a" * 250, "use at most 229 bytes"),
    ("bad\x00name", "control character"),
    ("runs/../../escape", "path separator"),
    ("NUL", "device name"),
])
def test_bad_output_names_are_refused_before_training(comfy_client, comfy_layout, name, problem):
    progress_before = len(comfy_client.events_of("cinetune.train.progress"))
    with pytest.raises(PromptRejected) as err:
        comfy_client.queue(_training_prompt(name))
    assert "input 'output_name'" in _node_errors(err.value, "13") and problem in _node_errors(err.value, "13")
    assert len(comfy_client.events_of("cinetune.train.progress")) == progress_before
    runs = Path(comfy_layout.output) / "cinetune" / "runs"
    assert not runs.is_dir() or not [p for p in runs.iterdir() if p.name.startswith(name[:8])]


def test_bad_cache_and_file_name_prefixes_are_refused(comfy_client):
    prompt = _training_prompt("never_cached")
    prompt["11"]["inputs"]["cache_name"] = "../outside"
    with pytest.raises(PromptRejected) as err:
        comfy_client.queue(prompt)
    assert "input 'cache_name'" in _node_errors(err.value, "11")
    api = json.loads((ROOT / "example_workflows" / "api" / "k5_text_to_video.json").read_text())
    prompt = tiny_workflow(api, TINY_NAMES)
    save = next(k for k, v in prompt.items() if v["class_type"] == "CinetuneSaveVideo")
    for prefix in ("/etc/cinetune", "videos/../../x", "videos\x07/x"):
        prompt[save]["inputs"]["filename_prefix"] = prefix
        with pytest.raises(PromptRejected) as err:
            comfy_client.queue(prompt)
        assert "input 'filename_prefix'" in _node_errors(err.value, save)


def _dataset_prompt(comfy_client, folder: str) -> dict:
    return {"1": {"class_type": "CinetuneDatasetFolder",
                  "inputs": {"folder": folder, "repeats": 1, "trigger_word": "", "default_caption": ""}},
            "2": {"class_type": _sink(comfy_client.object_info()), "inputs": {"source": ["1", 0]}}}


def test_dataset_folders_outside_the_input_folder_and_roots_are_refused(comfy_client, comfy_layout, test_data):
    outside = Path(comfy_layout.root) / "outside_dataset"
    outside.mkdir(exist_ok=True)
    shutil.copy(test_data["coffee"], outside / "coffee.png")
    (outside / "coffee.txt").write_text("a cup of coffee")
    for folder in ("/", str(outside), "../outside_dataset", f"{DATASET_FOLDER}/../../outside_dataset"):
        try:
            prompt_id = comfy_client.queue(_dataset_prompt(comfy_client, folder))
        except PromptRejected as err:
            errors = _node_errors(err, "1")
            assert "input 'folder'" in errors and "input folder" in errors, errors
            if Path(folder).is_absolute():
                assert "CINETUNE_DATASET_ROOTS" in errors
            continue
        comfy_client.interrupt(prompt_id)
        pytest.fail(f"the dataset folder {folder!r} was accepted")
    inside = str(Path(comfy_layout.input) / DATASET_FOLDER)  # an absolute path into the input folder is fine
    entry = comfy_client.run(_dataset_prompt(comfy_client, inside), timeout=300)
    assert entry["status"]["status_str"] == "success"


def test_a_truncated_cache_entry_is_reencoded_when_the_workflow_is_queued_again(comfy_client, comfy_layout):
    prompt = _training_prompt("e2e_damaged_cache")
    comfy_client.run(prompt, timeout=900)
    cache = Path(comfy_layout.output) / "cinetune" / "cache" / "e2e_damaged_cache"
    latents, texts = sorted((cache / "latents").glob("*.safetensors")), sorted((cache / "text").glob("*.safetensors"))
    assert len(latents) == 3 and len(texts) >= 3
    damaged = latents[1]
    size = damaged.stat().st_size
    damaged.write_bytes(damaged.read_bytes()[: size // 2])
    untouched = {p: p.stat().st_mtime_ns for p in latents + texts if p != damaged}

    prompt_id = comfy_client.queue(json.loads(json.dumps(prompt)))
    comfy_client.wait(prompt_id, timeout=900)
    assert damaged.stat().st_size == size and read_safetensors_header(damaged)[0]["latent"]
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched  # exactly the damaged entry was encoded
    cached = {n for e in comfy_client.events_of("execution_cached", prompt_id) for n in e.get("nodes", [])}
    assert "12" not in cached and {"10", "11"} <= cached  # only the latent cacher (and what follows) ran again

    repaired = {p: p.stat().st_mtime_ns for p in latents + texts}
    comfy_client.run(json.loads(json.dumps(prompt)), timeout=900)  # intact again: nothing is encoded
    assert {p: p.stat().st_mtime_ns for p in repaired} == repaired


def test_a_lora_of_another_size_fails_in_the_lora_loader(comfy_client, comfy_layout):
    model = load_k5_dit(Path(comfy_layout.models) / "diffusion_models" / TINY_NAMES["dit"], weight_dtype="fp32").model
    layer, linear = next((n, m) for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) and n.startswith("visual_transformer_blocks."))
    out_features, in_features = linear.weight.shape
    save_file({f"diffusion_model.{layer}.lora_down.weight": torch.zeros(4, in_features + 8),
               f"diffusion_model.{layer}.lora_up.weight": torch.zeros(out_features, 4),
               f"diffusion_model.{layer}.alpha": torch.tensor(4.0)},
              Path(comfy_layout.models) / "loras" / "e2e_other_size.safetensors")
    prompt = {"1": {"class_type": "CinetuneK5ModelLoader", "inputs": {
                  "dit_name": TINY_NAMES["dit"], "variant": "auto", "weight_dtype": "default", "attention": "sdpa",
                  "nabla": "auto", "blocks_to_swap": 0, "use_pinned_memory": True}},
              "2": {"class_type": "CinetuneK5LoRALoader", "inputs": {
                  "model": ["1", 0], "lora_name": "e2e_other_size.safetensors", "strength": 1.0}},
              "3": {"class_type": "CinetuneK5MemoryEstimate", "inputs": {
                  "model": ["2", 0], "mode": "sampling", "width": 128, "height": 64, "frames": 9, "cfg": True,
                  "lora_rank": 8, "optimizer": "adamw"}}}
    with pytest.raises(ExecutionFailed) as err:
        comfy_client.run(prompt, timeout=300)
    assert err.value.details["node_type"] == "CinetuneK5LoRALoader"
    message = err.value.details["exception_message"]
    assert "e2e_other_size.safetensors" in message and layer in message
    assert f"[{out_features}, {in_features + 8}]" in message and f"[{out_features}, {in_features}]" in message


def test_nan_numbers_invalid_text_and_home_folder_names_are_refused_at_queue_time(comfy_client):
    """NaN passes every range comparison, a lone surrogate is valid JSON but not text, '~' reads as a home folder:
    each is refused by POST /prompt, naming the node and the input, as a plain ValueError, before any model loads."""
    api = json.loads((ROOT / "example_workflows" / "api" / "k5_text_to_video.json").read_text())
    base = tiny_workflow(api, TINY_NAMES)
    node = {v["class_type"]: k for k, v in base.items()}
    cases = [(node["CinetuneK5Sampler"], "guidance", float("nan"), "nan is not a number"),
             (node["CinetuneK5Sampler"], "scheduler_scale", "nan", "nan is not a number"),  # the host converts it
             (node["CinetuneK5TextEncode"], "prompt", "a fox \ud800 in snow", "half of a character pair"),
             (node["CinetuneSaveVideo"], "filename_prefix", "~/videos/fox", "home folder")]
    for node_id, name, value, problem in cases:
        prompt = json.loads(json.dumps(base))
        prompt[node_id]["inputs"][name] = value
        with pytest.raises(PromptRejected) as err:
            comfy_client.queue(prompt)
        errors = _node_errors(err.value, node_id)
        assert f"input '{name}'" in errors and problem in errors, (name, errors)
        # reported as a built-in error, not under the pack's module path
        extra = err.value.node_errors[node_id]["errors"][0].get("extra_info", {})
        assert extra.get("exception_type") == "ValueError", extra


def test_a_taken_lora_name_and_a_run_folder_that_is_a_file_fail_before_any_training(comfy_client, comfy_layout):
    """A LoRA in models/loras that this run did not write (here not even a safetensors file), or a file where the run
    folder goes, stops the trainer before a step runs, naming output_name and the file; nothing is overwritten."""
    loras = Path(comfy_layout.models) / "loras"
    taken = loras / "e2e_taken.safetensors"
    taken.write_bytes(b"someone else's file")
    blocker = Path(comfy_layout.output) / "cinetune" / "runs" / "e2e_blocked"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("")
    for name, expected in (("e2e_taken", f"{taken} exists and was not written by this run"),
                           ("e2e_blocked", f"{blocker} is a file, not a folder")):
        progress_before = len(comfy_client.events_of("cinetune.train.progress"))
        with pytest.raises(ExecutionFailed) as err:
            comfy_client.run(_training_prompt(name), timeout=300)
        assert err.value.details["node_type"] == "CinetuneK5TrainLoRA"
        message = err.value.details["exception_message"]
        assert f"output_name '{name}'" in message and expected in message, message
        assert err.value.details["exception_type"] == "ValueError"
        assert len(comfy_client.events_of("cinetune.train.progress")) == progress_before
    assert taken.read_bytes() == b"someone else's file" and blocker.is_file()


def test_an_i2v_probability_between_minus_one_and_zero_is_refused(comfy_client):
    """The widget allows -1 (as the trainer) and 0…1; its steps in between meant "as the trainer" silently."""
    settings = {"sigma_min": 0.0, "sigma_max": 1.0, "loss_weighting": "none"}
    sink = _sink(comfy_client.object_info())
    for value, refused in ((-0.5, True), (-1.0, False), (0.0, False), (0.25, False)):
        prompt = {"1": {"class_type": "CinetuneTrainingSamplingSettings",
                        "inputs": {**settings, "i2v_probability": value}},
                  "2": {"class_type": sink, "inputs": {"source": ["1", 0]}}}
        if not refused:
            comfy_client.run(prompt, timeout=120)
            continue
        with pytest.raises(PromptRejected) as err:
            comfy_client.queue(prompt)
        errors = _node_errors(err.value, "1")
        assert "input 'i2v_probability'" in errors and "use -1, or a value from 0 to 1" in errors, errors

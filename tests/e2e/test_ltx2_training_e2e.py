"""LTX-2 LoRA training end to end in a real ComfyUI over the API queue, on the tiny LTX-2 models and a real dataset
(the Big Buck Bunny clip with its AAC 5.1 sound and two photos, trained with a silent track): the example workflow
caches captions, video and sound latents, trains a LoRA on both losses (every training settings node connected) with
a validation clip with sound from its validation prompt, and samples with the new LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cinetune.core.checkpoint import read_safetensors_header
from cinetune.core.media import probe_audio, probe_video, read_audio, read_video
from cinetune.training.data import assign_bucket, make_buckets
from cinetune.ltx2.family import LTX2_LATENT_FORMAT
from cinetune.ltx2.loader import load_ltx2_dit
from cinetune.ltx2.tiny import TINY_LTX2_NAMES
from comfy_lora_keys import native_lora_report

from .comfy_host import ui_to_api
from .models import DATASET_FOLDER, TINY_LTX2_TRAINING, tiny_ui_workflow, tiny_workflow

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
NAME = "e2e_ltx2_lora"
STEPS = TINY_LTX2_TRAINING["max_steps"]
TRAINER, SAMPLER, SAVE, VALIDATION = "13", "5", "7", "18"


def _example(api: bool = True) -> dict:
    folder = ROOT / "example_workflows" / ("api" if api else "")
    return json.loads((folder / "ltx2_lora_training.json").read_text())


def _prompt(name: str, **kw) -> dict:
    return tiny_workflow(_example(), TINY_LTX2_NAMES, output_name=name, **kw)


def _saved_mp4(comfy_client, comfy_layout, entry: dict, node: str) -> Path:
    (item,) = entry["outputs"][node]["images"]
    return Path(comfy_layout.output) / (item.get("subfolder") or "") / item["filename"]


def _clip(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames (float, 0..255) and the stereo waveform at 24 kHz of an mp4."""
    frames = read_video(path)[0].float()
    return frames, read_audio(path, sample_rate=24000, channels=2)


@pytest.fixture(scope="module")
def trained(comfy_client, comfy_layout):
    """Runs the example training workflow once (10 steps, a validation clip at step 10) → (prompt, history entry)."""
    prompt = _prompt(NAME)
    return prompt, comfy_client.run(prompt, timeout=900)


def test_the_ui_workflow_converts_to_the_committed_api_workflow(comfy_client):
    converted = ui_to_api(_example(api=False), comfy_client.object_info())
    strip = lambda wf: {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in wf.items()}  # noqa: E731
    assert strip(converted) == strip(_example())


def test_the_lora_maps_completely_through_the_hosts_lora_key_map(trained, comfy_layout, comfy_host_dir, tmp_path):
    lora = Path(comfy_layout.models) / "loras" / f"{NAME}.safetensors"
    infos, metadata = read_safetensors_header(lora)
    assert metadata["base_model"] == TINY_LTX2_NAMES["ltx2"] and metadata["trigger_word"] == "ohwx"
    assert metadata["ss_network_dim"] == str(TINY_LTX2_TRAINING["rank"])
    assert metadata["modelspec.architecture"] == "ltx-2" and metadata["cinetune.complete"] == "true"
    layers = sorted(k[: -len(".lora_A.weight")] for k in infos if k.endswith(".lora_A.weight"))
    # audio+video training: the audio stream's attentions and the cross-modal ones were trained too
    assert any(".audio_attn1." in k for k in layers) and any(".video_to_audio_attn." in k for k in layers)

    ckpt = Path(comfy_layout.models) / "checkpoints" / TINY_LTX2_NAMES["ltx2"]
    model = load_ltx2_dit(ckpt, weight_dtype="fp32").model
    base = {f"diffusion_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    save_file(base, tmp_path / "base.safetensors")
    report = native_lora_report(comfy_host_dir, tmp_path / "base.safetensors", tmp_path / "merged.safetensors", 1.0,
                                [lora])[str(lora)]
    assert report["not_loaded"] == []
    assert len(report["patched"]) == len(layers) > 0
    # the host adds exactly the trained update B·A (alpha/rank is baked into B; .alpha = rank)
    merged, tensors = load_file(tmp_path / "merged.safetensors"), load_file(lora)
    key = layers[0]
    expected = base[f"{key}.weight"] + tensors[f"{key}.lora_B.weight"].float() @ tensors[f"{key}.lora_A.weight"].float()
    torch.testing.assert_close(merged[f"0/{key}.weight"], expected, rtol=1e-5, atol=1e-6)
    assert float((merged[f"0/{key}.weight"] - base[f"{key}.weight"]).abs().max()) > 0


def test_training_reports_both_losses_every_step(trained, comfy_client):
    progress = [d for d in comfy_client.events_of("cinetune.train.progress") if d.get("run") == NAME]
    assert [d["step"] for d in progress][:STEPS] == list(range(1, STEPS + 1))
    for event in progress:
        assert event["node"] == TRAINER and set(event["loss_terms"]) == {"video", "audio"}
        assert event["loss_terms"]["video"] + event["loss_terms"]["audio"] == pytest.approx(event["loss"], rel=1e-5)
    statuses = [d["status"] for d in comfy_client.events_of("cinetune.train.status") if d.get("run") == NAME]
    assert statuses[:3] == ["started", "validation", "finished"]


def test_the_validation_clip_has_sound_and_is_the_nodes_preview(trained, comfy_layout):
    prompt, entry = trained
    clip = Path(comfy_layout.output) / "cinetune" / "runs" / NAME / "validation" / f"step_{STEPS:06d}.mp4"
    meta, sound = probe_video(clip), probe_audio(clip)
    # the validation prompt's frames, at the size of the dataset's only clip (Big Buck Bunny) in its bucket (width and
    # height 0 on the prompt)
    source = probe_video(Path(comfy_layout.input) / DATASET_FOLDER / "bbb.mp4")
    bucket = assign_bucket(source["width"], source["height"],
                           make_buckets(TINY_LTX2_TRAINING["resolution"], LTX2_LATENT_FORMAT))
    assert prompt[VALIDATION]["inputs"]["width"] == prompt[VALIDATION]["inputs"]["height"] == 0
    assert meta["frames"] == prompt[VALIDATION]["inputs"]["frames"]
    assert (meta["width"], meta["height"]) == (bucket.width, bucket.height)
    assert sound is not None and sound["codec"] == "aac" and sound["channels"] == 2
    assert entry["outputs"][TRAINER]["images"][0]["filename"] == clip.name


def test_sampling_with_the_lora_changes_video_and_audio_and_strength_0_does_not(trained, comfy_client, comfy_layout):
    prompt, entry = trained
    with_trainer_output = _clip(_saved_mp4(comfy_client, comfy_layout, entry, SAVE))
    graph = {k: v for k, v in json.loads(json.dumps(prompt)).items() if k not in ("10", "11", "12", TRAINER)}
    graph[SAMPLER]["inputs"]["model"] = ["1", 0]
    for offset, strength in ((20, 0.0), (30, 1.0)):  # a copy of sampler → decode → save behind a LoRA loader
        ids = {k: str(int(k) + offset) for k in ("5", "6", "7")}
        graph[str(offset)] = {"class_type": "CinetuneLTX2LoRALoader",
                              "inputs": {"model": ["1", 0], "lora_name": f"{NAME}.safetensors", "strength": strength}}
        for k, new in ids.items():
            node = json.loads(json.dumps(graph[k]))
            for name, value in node["inputs"].items():
                if isinstance(value, list) and value[0] in ids:
                    node["inputs"][name] = [ids[value[0]], value[1]]
            graph[new] = node
        graph[ids["5"]]["inputs"]["model"] = [str(offset), 0]
        graph[ids["7"]]["inputs"]["filename_prefix"] = f"Cinetune/ltx2_lora_strength_{strength:g}"
    out = comfy_client.run(graph, timeout=600)
    base, zero, full = (_clip(_saved_mp4(comfy_client, comfy_layout, out, n)) for n in (SAVE, "27", "37"))
    assert base[0].shape == full[0].shape and base[1].shape == full[1].shape
    assert base[1].abs().max() > 1e-3, "silent audio: the comparison would prove nothing"
    assert torch.equal(zero[0], base[0]) and torch.equal(zero[1], base[1])  # strength 0 changes nothing
    assert (full[0] - base[0]).abs().mean() > 0.5  # the LoRA changes the video …
    assert (full[1] - base[1]).abs().max() > 1e-3  # … and the sound
    # the trainer's own output model is the base model with the LoRA at strength 1
    assert torch.equal(with_trainer_output[0], full[0]) and torch.equal(with_trainer_output[1], full[1])


def test_requeueing_the_unchanged_workflow_reuses_the_finished_run(trained, comfy_client, comfy_layout):
    lora = Path(comfy_layout.models) / "loras" / f"{NAME}.safetensors"
    before, steps = lora.read_bytes(), len(comfy_client.events_of("cinetune.train.progress"))
    comfy_client.run(json.loads(json.dumps(trained[0])), timeout=600)
    assert len(comfy_client.events_of("cinetune.train.progress")) == steps, "the finished run was trained again"
    assert lora.read_bytes() == before


def test_training_with_block_swap_fp8_weights_and_gradient_checkpointing(trained, comfy_client, comfy_layout):
    prompt = _prompt("e2e_ltx2_swap_fp8", max_steps=3)
    prompt["1"]["inputs"]["weight_dtype"] = "fp8_e4m3fn"
    prompt[TRAINER]["inputs"].update(blocks_to_swap=2, gradient_checkpointing=False, save_every=0,
                                     validation_steps="")
    comfy_client.run(prompt, timeout=600)
    run = Path(comfy_layout.output) / "cinetune" / "runs" / "e2e_ltx2_swap_fp8"
    config = json.loads((run / "run.json").read_text())["config"]
    assert config["gradient_checkpointing"] is True  # turned on by block swap
    tensors = load_file(Path(comfy_layout.models) / "loras" / "e2e_ltx2_swap_fp8.safetensors")
    assert any(float(v.float().abs().max()) > 0 for k, v in tensors.items() if k.endswith(".lora_B.weight"))
    assert not (run / "validation").exists()
    progress = [d for d in comfy_client.events_of("cinetune.train.progress") if d.get("run") == "e2e_ltx2_swap_fp8"]
    assert [d["step"] for d in progress] == [1, 2, 3]


def test_bad_setups_are_refused_with_the_fix(trained, comfy_client):
    prompt = _prompt("never_trained")
    prompt["21"] = {"class_type": "CinetuneLTX2LoRALoader",
                    "inputs": {"model": ["1", 0], "lora_name": f"{NAME}.safetensors", "strength": 1.0}}
    prompt[TRAINER]["inputs"]["model"] = ["21", 0]
    with pytest.raises(Exception, match="LTX-2 Model Loader directly"):
        comfy_client.run(prompt, timeout=300)
    prompt = _prompt("never_trained")
    prompt[TRAINER]["inputs"]["validation_steps"] = "5, later"
    with pytest.raises(Exception, match="'later' is not one"):
        comfy_client.run(prompt, timeout=300)
    prompt[TRAINER]["inputs"]["validation_steps"] = "50"
    with pytest.raises(Exception, match="after the last step"):
        comfy_client.run(prompt, timeout=300)


def test_the_live_chart_draws_the_video_and_audio_losses(trained, comfy_server, comfy_client, tmp_path):
    from .browser import missing_browser_reason, watch_loss_chart

    reason = missing_browser_reason()
    if reason:
        pytest.skip(reason)
    workflow = tiny_ui_workflow("ltx2_lora_training", TINY_LTX2_NAMES, output_name="e2e_ltx2_chart", max_steps=12)
    watch = watch_loss_chart(comfy_server.base_url, workflow, node_id=int(TRAINER), min_points=6, timeout=300,
                             screenshot_path=tmp_path / "chart.png")
    assert watch.points >= 6 and watch.colored_pixels > 0
    assert " · video " in watch.readout and " · audio " in watch.readout, watch.readout
    assert "loss_chart" in watch.widget_names
    # 26 widget values + the seed's control_after_generate value; the chart itself is never saved
    assert len(watch.widgets_values) == 27 and watch.widgets_values[0] == "e2e_ltx2_chart"
    comfy_client.wait(watch.prompt_id, timeout=600)

"""The headless launcher on a tiny Kandinsky 5 and a tiny LTX-2 model: continuing a run started in the graph gives
exactly the LoRA and losses of continuing it in the graph; the command line starts a run, stops it on request
after a checkpoint and continues it; events as JSON lines; bad input gives exit code 2 and a message.

"In the graph" is what the trainer nodes do, written out here with the families' own loaders and cache readers
(independently of the launcher's builders): load the DiT, read the cached samples and empty caption, call
``train_lora`` with the run's metadata."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from families import K5, LTX2, each_family
from test_recipe import make_recipe, write_k5_cache, write_ltx2_cache

from cinetune.core.checkpoint import read_safetensors_header, save_file_atomic
from cinetune.core.lora import load_lora
from cinetune.k5.train import K5_TRAINING
from cinetune.ltx2.text import load_text_projection
from cinetune.ltx2.train import LTX2TrainingAdapter, ltx2_train_config
from cinetune.training import launch as launcher
from cinetune.training.config import TrainConfig, TrainingError
from cinetune.training.launch import (
    EVENTS_FILE,
    STOP_FILE,
    append_event,
    build_run,
    launch,
    launch_workers,
    main,
    read_events,
    torchrun_command,
)
from cinetune.training.recipe import RECIPE_FILE, RecipeError, RunRecipe, read_recipe, write_recipe
from cinetune.training.runs import install_partial_lora
from cinetune.training.samples import (
    empty_texts_from_cache,
    ltx2_empty_text_from_cache,
    ltx2_samples_from_cache,
    samples_from_cache,
)
from cinetune.training.trainer import list_checkpoints, train_lora

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


class Stop(Exception):
    """Stands in for the host's interrupt."""


def stop_before_step(step: int):
    calls = {"n": 0}

    def check():
        calls["n"] += 1
        if calls["n"] == step:
            raise Stop

    return check


def setup_run(fam, tiny_file, tmp_path: Path, **settings) -> RunRecipe:
    """A cached dataset of 3 clips and the recipe the family's trainer node would write for it."""
    path = tiny_file(fam)
    base = dict(rank=4, alpha=4.0, learning_rate=1e-3, max_steps=4, grad_accum=2, caption_dropout=0.4,
                compute_dtype="fp32", lora_dtype="fp32", save_dtype="fp32", seed=3)
    if fam.id == "k5":
        data = write_k5_cache(tmp_path / "cache")
        return make_recipe(path, data, TrainConfig(**{**base, **settings}))
    data = write_ltx2_cache(tmp_path / "cache")
    config = ltx2_train_config(**{**base, "with_audio": True, "i2v": "first", "i2v_prob": 0.5, **settings})
    return RunRecipe.create("ltx-2", models={"dit": path, "connectors": path},
                            loader={"weight_dtype": "fp32", "connectors_dtype": "float32"}, data={"train": data},
                            config=config, metadata={"cinetune.run": "test"})


def in_graph(fam, recipe: RunRecipe, config, run_dir: Path, check_interrupt=None):
    """The trainer node's run, with the family's loaders and readers."""
    model = fam.load(recipe.model_path("dit"), "fp32")
    data = recipe.data["train"]
    cached = list(data.samples)
    if fam.id == "k5":
        adapter, samples = K5_TRAINING, samples_from_cache(cached)
        empty = empty_texts_from_cache(cached, data.cache_dir, data.encoder_id)
    else:
        adapter = LTX2TrainingAdapter(load_text_projection(recipe.model_path("connectors"), dtype=torch.float32))
        samples, empty = ltx2_samples_from_cache(cached), ltx2_empty_text_from_cache(data.cache_dir, data.encoder_id)
    return train_lora(model, samples, empty, config, run_dir, adapter=adapter, resume=True,
                      check_interrupt=check_interrupt, metadata=recipe.metadata)


def lora_tensors(path: Path) -> dict:
    return {p: (d, u) for p, (d, u, _) in load_lora(path).layers.items()}


def assert_same_lora(a: Path, b: Path) -> None:
    ta, tb = lora_tensors(a), lora_tensors(b)
    assert ta.keys() == tb.keys() and ta
    assert all(torch.equal(ta[k][0], tb[k][0]) and torch.equal(ta[k][1], tb[k][1]) for k in ta)


# ---------------------------------------------------------------------------------------------------------------


@each_family
def test_headless_continuation_equals_the_in_graph_continuation(fam, tiny_file, tmp_path):
    recipe = setup_run(fam, tiny_file, tmp_path)
    config = recipe.train_config(nabla_type=None)
    graph = tmp_path / "graph"
    write_recipe(graph, recipe)
    with pytest.raises(Stop):
        in_graph(fam, recipe, config, graph, stop_before_step(3))  # Cancel before step 3: checkpoint of step 2
    assert [s for s, _ in list_checkpoints(graph)] == [2]
    headless = tmp_path / "headless"
    shutil.copytree(graph, headless)

    expected = in_graph(fam, recipe, config, graph)
    result = launch(headless, device="cpu")

    assert result.steps == expected.steps == 4 and result.losses == expected.losses
    assert_same_lora(result.lora_path, expected.lora_path)
    assert_same_lora(list_checkpoints(headless)[-1][1] / "lora.safetensors",
                     list_checkpoints(graph)[-1][1] / "lora.safetensors")
    events, _ = read_events(headless)
    assert [e["event"] for e in events] == ["started", "progress", "progress", "finished"]
    assert events[0]["resume_step"] == 2 and events[0]["world_size"] == 1
    assert [e["step"] for e in events[1:3]] == [3, 4] and [e["loss"] for e in events[1:3]] == expected.losses[2:]
    assert events[-1]["lora"] == str(result.lora_path)


def test_the_command_starts_stops_and_continues_a_run(tiny_file, tmp_path, monkeypatch, capsys):
    recipe = setup_run(K5, tiny_file, tmp_path, max_steps=4, grad_accum=1)
    run = tmp_path / "run"
    write_recipe(run, recipe)
    (run / STOP_FILE).write_text("left from an earlier launch")  # cleared at the start

    class StopAtStep2(launcher._Progress):
        def __call__(self, e):
            super().__call__(e)
            if e.step == 2:
                launcher.request_stop(self.run_dir)

    monkeypatch.setattr(launcher, "_Progress", StopAtStep2)
    assert main([str(run), "--device", "cpu", "--max-steps", "8"]) == 3
    assert "step 2/8" in capsys.readouterr().out
    assert [s for s, _ in list_checkpoints(run)] == [2] and (run / STOP_FILE).exists()
    assert json.loads((run / RECIPE_FILE).read_text())["config"]["max_steps"] == 8  # the run is now 8 steps long
    monkeypatch.undo()

    # as the trainer node runs it: torchrun (one process here) as a child, followed through its events; Cancel
    # (check_interrupt raising) once step 4 was seen stops the workers after a checkpoint
    seen = []

    def cancel_after_step_4():
        if seen and seen[-1].step >= 4:
            raise Stop

    with pytest.raises(Stop):
        launch_workers(run, 1, device="cpu", on_event=seen.append, check_interrupt=cancel_after_step_4, poll_s=0.05)
    stopped_at = list_checkpoints(run)[-1][0]
    assert [e.step for e in seen] == list(range(3, seen[-1].step + 1)) and seen[-1].step <= stopped_at < 8
    assert "stopped" in [e["event"] for e in read_events(run)[0]]
    assert main([str(run), "--quiet"]) == 0 and not (run / STOP_FILE).exists()

    events, _ = read_events(run)
    assert [e["step"] for e in events if e["event"] == "progress"] == list(range(1, 9))
    expected = in_graph(K5, recipe, dataclasses.replace(recipe.train_config(), max_steps=8), tmp_path / "straight")
    assert [e["loss"] for e in events if e["event"] == "progress"] == expected.losses
    assert_same_lora(run / "lora.safetensors", expected.lora_path)


def test_workers_that_fail_are_reported_by_rank(tmp_path, monkeypatch):
    def fake_workers(script: str):
        # stands in for torchrun: a child that writes what a failing rank writes, then exits like it
        return lambda run_dir, n, **kw: ([sys.executable, "-c", script, str(run_dir)], dict(os.environ))

    report = ("import json, sys; open(sys.argv[1] + '/events.jsonl', 'a').write(json.dumps({'event': 'error', "
              "'rank': 1, 'error': 'OutOfMemoryError', 'message': 'CUDA out of memory'}) + '\\n'); "
              "print('worker log line'); sys.exit(1)")
    monkeypatch.setattr(launcher, "torchrun_command", fake_workers(report))
    with pytest.raises(TrainingError, match="training worker rank 1 failed: OutOfMemoryError: CUDA out of memory"):
        launch_workers(tmp_path, 2, poll_s=0.01)
    assert "worker log line" in (tmp_path / "launch.log").read_text()
    monkeypatch.setattr(launcher, "torchrun_command", fake_workers("print('killed here'); raise SystemExit(9)"))
    with pytest.raises(TrainingError, match="(?s)exited with code 9 without reporting an error.*killed here"):
        launch_workers(tmp_path, 2, poll_s=0.01)
    monkeypatch.undo()
    argv, env = torchrun_command(tmp_path, 2, device="cuda")
    assert argv[1:7] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    assert argv[7:9] == ["cinetune.training.launch", str(tmp_path)] and argv[-2:] == ["--device", "cuda"]


def test_bad_input_exits_with_code_2_and_says_why(tiny_file, tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    recipe = setup_run(K5, tiny_file, tmp_path, epochs=1)
    write_recipe(tmp_path / "run", recipe)
    assert main([str(tmp_path / "run"), "--max-steps", "3"]) == 2
    assert "--max-steps does not apply to this run: it trains 1 epochs" in capsys.readouterr().err
    assert main([str(tmp_path / "run"), "--model", "dit"]) == 2
    assert "--model takes NAME=PATH" in capsys.readouterr().err
    events, _ = read_events(tmp_path / "run")
    assert [(e["event"], e["rank"]) for e in events if e["event"] == "error"] == [("error", 0), ("error", 0)]
    unknown = RunRecipe(**{**vars(recipe), "family": "kandinsky-9"})
    with pytest.raises(RecipeError, match="no headless builder for the model family 'kandinsky-9'"):
        build_run(unknown)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.move(recipe.model_path("dit"), moved / recipe.model_path("dit").name)
    try:
        assert main([str(tmp_path / "run"), "--quiet"]) == 2
        assert "--models <folder>" in capsys.readouterr().err
        assert read_recipe(tmp_path / "run", models=[moved]).model_path("dit").parent == moved
    finally:
        shutil.move(moved / recipe.model_path("dit").name, recipe.model_path("dit"))


def test_events_are_whole_lines(tmp_path):
    append_event(tmp_path, {"event": "progress", "step": 1, "loss": float("nan")})
    with open(tmp_path / EVENTS_FILE, "ab") as f:
        f.write(b'{"event": "progress", "st')  # a line being written
    events, offset = read_events(tmp_path)
    assert [e["step"] for e in events] == [1] and "time" in events[0]
    with open(tmp_path / EVENTS_FILE, "ab") as f:
        f.write(b'ep": 2}\nnot json\n')
    more, _ = read_events(tmp_path, offset)
    assert [e["step"] for e in more] == [2]


def test_the_launcher_names_no_family_and_finds_their_builders(tiny_file, tmp_path):
    # a fresh interpreter, as under torchrun: importing the launcher imports no family; a run of a family whose
    # package nobody imported is built by the builder its launch module registers
    write_recipe(tmp_path / "run", setup_run(LTX2, tiny_file, tmp_path))
    script = ("import sys\n"
              "from cinetune.training import launch\n"
              "from cinetune.training.recipe import read_recipe\n"
              "loaded = lambda: sorted(m for m in sys.modules if m.split('.')[:2] in (['cinetune', 'k5'], "
              "['cinetune', 'ltx2']))\n"
              "before = loaded()\n"
              "built = launch.build_run(read_recipe(sys.argv[1]))\n"
              "print(before, type(built.adapter).__name__, len(built.samples), sorted(launch._BUILDERS))\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[0] == "[] LTX2TrainingAdapter 3 ['kandinsky-5', 'ltx-2']"


def test_an_interrupted_runs_partial_lora_is_installed_by_step(tiny_file, tmp_path):
    recipe = setup_run(K5, tiny_file, tmp_path)
    run, loras = tmp_path / "run", tmp_path / "loras"
    started = time.time_ns()
    with pytest.raises(Stop):
        in_graph(K5, recipe, recipe.train_config(), run, stop_before_step(2))  # Cancel after step 1
    assert install_partial_lora(run, loras, "test", since_ns=time.time_ns() + 10**9) is None  # an older file
    installed = install_partial_lora(run, loras, "test", since_ns=started)
    assert installed == loras / "test_step1.safetensors"
    assert_same_lora(installed, run / "lora.safetensors")
    assert read_safetensors_header(installed)[1]["cinetune.complete"] == "false"
    assert install_partial_lora(run, loras, "other") is None  # another run's file
    save_file_atomic({"x": torch.zeros(1)}, loras / "mine_step1.safetensors", metadata={"cinetune.run": "mine"})
    shutil.copy(loras / "mine_step1.safetensors", loras / "test_step1.safetensors")
    with pytest.raises(FileExistsError, match="test_step1.safetensors exists and was not written by the run 'test'"):
        install_partial_lora(run, loras, "test")  # a file of someone else under the name is left alone
    in_graph(K5, recipe, recipe.train_config(), run)  # finished: nothing partial to install
    assert install_partial_lora(run, loras, "test") is None


def test_workers_of_a_pack_loaded_as_comfyui_loads_custom_nodes_import_that_pack(tmp_path):
    # ComfyUI imports a custom-node folder under its path as the module name; the command must name the package
    # by the folder's name and put the folder holding it on PYTHONPATH
    link = tmp_path / "custom_nodes" / "cinetune"
    link.parent.mkdir()
    link.symlink_to(ROOT, target_is_directory=True)
    script = ("import importlib, importlib.util, json, os, sys\n"
              "path = sys.argv[1]\n"
              "spec = importlib.util.spec_from_file_location(path, path + '/__init__.py')\n"
              "module = importlib.util.module_from_spec(spec); sys.modules[path] = module; spec.loader.exec_module(module)\n"
              "launch = importlib.import_module(path + '.training.launch')\n"
              "argv, env = launch.torchrun_command('run', 2)\n"
              "print(json.dumps([argv[7], env['PYTHONPATH'].split(os.pathsep)[0]]))\n")
    done = subprocess.run([sys.executable, "-c", script, str(link)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    module, first = json.loads(done.stdout.strip().splitlines()[-1])
    assert (module, first) == ("cinetune.training.launch", str(link.parent))
    found = subprocess.run([sys.executable, "-c", "import cinetune; print(cinetune.__file__)"], capture_output=True,
                           text=True, timeout=60, cwd=tmp_path, env={**os.environ, "PYTHONPATH": first})
    assert found.stdout.strip() == str(link / "__init__.py")


def test_the_family_builders_load_what_the_recipe_records(tiny_file, tmp_path):
    k5 = setup_run(K5, tiny_file, tmp_path / "k5")
    built = build_run(dataclasses.replace(k5, loader={"weight_dtype": "bf16", "blocks_to_swap": 2,
                                                      "use_pinned_memory": False}))
    assert {p.dtype for n, p in built.model.named_parameters() if n.endswith("to_query.weight")} == {torch.bfloat16}
    assert (built.blocks_to_swap, built.pin_memory, len(built.samples)) == (2, False, 3)
    assert built.config.to_dict() == k5.config and built.empty is not None  # caption dropout 0.4: empty captions
    ltx2 = setup_run(LTX2, tiny_file, tmp_path / "ltx2")
    built = build_run(dataclasses.replace(ltx2, loader={**ltx2.loader, "connectors_dtype": "bfloat16"}))
    assert {p.dtype for p in built.adapter.text_projection.parameters()} == {torch.bfloat16}
    assert (built.blocks_to_swap, built.pin_memory) == (0, True)
    with pytest.raises(RecipeError, match="gives the text connectors the dtype 'int8'; expected one of float32"):
        build_run(dataclasses.replace(ltx2, loader={**ltx2.loader, "connectors_dtype": "int8"}))

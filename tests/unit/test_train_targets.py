"""Where a training run writes, checked before it starts: the LoRA names it installs into the host's ``loras`` folder
(the install rule of training.runs, applied before the first step and again at the install), a run folder path that
is a file, and a damaged ``state.pt`` on resume (training.checkpointing). The trainer node's order of checks is
tested in a real ComfyUI (tests/e2e/test_hardening_e2e.py).
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch

from cinetune.core.checkpoint import read_safetensors_header, save_file_atomic
from cinetune.training.checkpointing import STATE_FILE, list_checkpoints, read_state
from cinetune.training.config import ResumeError, TrainingError
from cinetune.training.runs import (check_install_targets, install_lora, lora_destination, run_directory,
                                    written_by_another_run)
from cinetune.training.trainer import train_lora
from test_trainer import config, load_dit, sample


pytestmark = pytest.mark.usefixtures("one_thread")


def lora_of(path: Path, run: str | None) -> Path:
    """A one-layer LoRA file whose ``cinetune.run`` metadata names ``run`` (None: no such metadata)."""
    metadata = {} if run is None else {"cinetune.run": run}
    return save_file_atomic({"a.lora_down.weight": torch.ones(1, 2)}, path, metadata)


FIX = "pick another output_name, or move/delete the file"


def esc(path: Path) -> str:
    return re.escape(str(path))


# ---------------------------------------------------------------------------------------------------------------
# The install rule (training.runs)


def test_the_install_rule_refuses_foreign_and_unreadable_files_before_and_at_the_install(tmp_path):
    loras = tmp_path / "loras"
    mine = lora_of(tmp_path / "run" / "lora.safetensors", "mine")
    assert lora_destination(loras, "mine") == loras / "mine.safetensors"
    assert not written_by_another_run(loras / "mine.safetensors", "mine")  # nothing there yet
    check_install_targets(loras, ["mine", "mine_ema"], "mine")

    theirs = lora_of(loras / "mine.safetensors", "other")
    assert written_by_another_run(theirs, "mine")
    with pytest.raises(TrainingError, match=rf"output_name 'mine': {esc(theirs)} exists and was not written by this "
                                            rf"run.*{FIX}"):
        check_install_targets(loras, ["mine"], "mine")
    with pytest.raises(FileExistsError, match="left untouched"):  # the same rule at the end of a run
        install_lora(mine, loras, "mine")

    # A file that is no safetensors file at all: the message names the collision, not the header
    junk = loras / "mine.safetensors"
    junk.write_bytes(b"a picture, not a LoRA")
    assert written_by_another_run(junk, "mine")
    with pytest.raises(TrainingError, match=rf"output_name 'mine': {esc(junk)} exists and was not written by this"):
        check_install_targets(loras, ["mine"], "mine")
    with pytest.raises(FileExistsError, match=f"{esc(junk)} exists and was not written by the run 'mine'"):
        install_lora(mine, loras, "mine")
    assert junk.read_bytes() == b"a picture, not a LoRA"  # left untouched

    # A LoRA without run metadata (a downloaded one) is foreign too
    lora_of(junk, None)
    with pytest.raises(TrainingError, match="not written by this run"):
        check_install_targets(loras, ["mine"], "mine")


def test_the_ema_destination_is_checked_and_a_runs_own_files_pass(tmp_path):
    loras = tmp_path / "loras"
    run = tmp_path / "run"
    install_lora(lora_of(run / "lora.safetensors", "mine"), loras, "mine")
    install_lora(lora_of(run / "lora_ema.safetensors", "mine"), loras, "mine_ema", run="mine")
    check_install_targets(loras, ["mine", "mine_ema"], "mine")  # its own earlier install: a re-run may replace it

    foreign_ema = lora_of(loras / "other_ema.safetensors", "someone")
    install_lora(lora_of(tmp_path / "o" / "lora.safetensors", "other"), loras, "other")
    check_install_targets(loras, ["other"], "other")  # without EMA the EMA name is not looked at
    with pytest.raises(TrainingError, match=rf"output_name 'other': {esc(foreign_ema)} exists"):
        check_install_targets(loras, ["other", "other_ema"], "other")


def test_a_resumed_run_installs_over_its_own_earlier_install(dit_file, tmp_path):
    loras, run_dir = tmp_path / "loras", tmp_path / "runs" / "mine"
    meta = {"cinetune.run": "mine"}
    cfg = config(max_steps=1, ema_decay=0.9)
    first = train_lora(load_dit(dit_file), [sample(1)], None, cfg, run_dir, metadata=meta)
    installed = install_lora(first.lora_path, loras, "mine")
    install_lora(first.ema_lora_path, loras, "mine_ema", run="mine")

    check_install_targets(loras, ["mine", "mine_ema"], "mine")  # what the node checks before resuming
    more = train_lora(load_dit(dit_file), [sample(1)], None, config(max_steps=2, ema_decay=0.9), run_dir,
                      resume=True, metadata=meta)
    assert more.steps == 2
    assert install_lora(more.lora_path, loras, "mine") == installed
    install_lora(more.ema_lora_path, loras, "mine_ema", run="mine")
    assert read_safetensors_header(installed)[1]["cinetune.steps"] == "2"
    assert read_safetensors_header(loras / "mine_ema.safetensors")[1]["cinetune.run"] == "mine"


# ---------------------------------------------------------------------------------------------------------------
# A run folder path that is a file


def test_a_run_folder_path_that_is_a_file_is_refused_with_the_fix(tmp_path):
    output = tmp_path / "output"
    assert run_directory(output, "mine") == output / "cinetune" / "runs" / "mine"
    assert not output.exists()  # only a path

    (output / "cinetune" / "runs").mkdir(parents=True)
    blocker = output / "cinetune" / "runs" / "mine"
    blocker.write_text("notes")
    with pytest.raises(TrainingError, match=rf"output_name 'mine': .*{esc(blocker)} is a file, not a folder; "
                                            rf"{FIX}"):
        run_directory(output, "mine")
    assert blocker.read_text() == "notes"

    other = tmp_path / "other"
    other.mkdir()
    (other / "cinetune").write_text("")  # a file on the way to the run folder
    with pytest.raises(TrainingError, match=rf"{esc(other / 'cinetune')} is a file"):
        run_directory(other, "mine")


# ---------------------------------------------------------------------------------------------------------------
# A damaged state.pt


def test_a_damaged_state_names_the_file_and_the_way_on_without_torchs_weights_only_advice(dit_file, tmp_path):
    run_dir = tmp_path / "run"
    train_lora(load_dit(dit_file), [sample(1)], None, config(max_steps=2, save_every=1), run_dir)
    (_, older), (_, newest) = list_checkpoints(run_dir)
    good = (newest / STATE_FILE).read_bytes()

    rng = random.Random(0)
    damaged = [bytes(rng.randrange(256) for _ in range(64)),  # PyTorch answers these with its weights_only advice
               good[: len(good) // 2]]  # a cut-off file
    for content in damaged:
        (newest / STATE_FILE).write_bytes(content)
        with pytest.raises(ResumeError) as info:
            read_state(newest)
        message = str(info.value)
        assert f"{newest / STATE_FILE}: the file is damaged or not a Cinetune training state" in message
        assert f"Delete the folder {newest} to resume from the checkpoint before it" in message
        assert "weights_only" not in message

    with pytest.raises(ResumeError, match="damaged"):  # what a resume meets
        train_lora(load_dit(dit_file), [sample(1)], None, config(max_steps=3, save_every=1), run_dir, resume=True)
    for path in newest.iterdir():  # the way on the message gives
        path.unlink()
    newest.rmdir()
    result = train_lora(load_dit(dit_file), [sample(1)], None, config(max_steps=3, save_every=1), run_dir,
                        resume=True)
    assert result.steps == 3 and read_state(older)["step"] == 1

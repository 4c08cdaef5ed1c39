import os

import pytest
import torch
from safetensors.torch import save_file

from cinetune.core.checkpoint import (
    CheckpointError,
    load_state_dict,
    read_safetensors_header,
    read_tensor_infos,
    save_file_atomic,
    strip_prefix,
)


def _tensors():
    return {"a.weight": torch.randn(3, 4, dtype=torch.bfloat16), "b.scale": torch.ones(2, dtype=torch.float32)}


def test_header_reports_shapes_dtypes_and_metadata(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(_tensors(), path, metadata={"k": "v"})
    infos, meta = read_safetensors_header(path)
    assert infos["a.weight"].shape == (3, 4) and infos["a.weight"].dtype == "BF16"
    assert infos["b.scale"].dtype == "F32"
    assert meta == {"k": "v"}


def test_load_keeps_stored_dtypes(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(_tensors(), path)
    sd = load_state_dict(path)
    assert sd["a.weight"].dtype == torch.bfloat16 and sd["b.scale"].dtype == torch.float32


def test_truncated_file_is_reported_as_truncated(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(_tensors(), path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        load_state_dict(path)


def test_non_safetensors_file_is_rejected(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("this is a text file, not a model" * 10)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_safetensors_header(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict(tmp_path / "missing.safetensors")


def test_pickle_with_state_dict_wrapper(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"state_dict": _tensors(), "epoch": 3}, path)
    sd = load_state_dict(path)
    assert set(sd) == {"a.weight", "b.scale"}
    assert read_tensor_infos(path)["a.weight"].shape == (3, 4)
    (tmp_path / "bad.pt").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_state_dict(tmp_path / "bad.pt")


def test_strip_prefix_only_when_most_keys_carry_it():
    sd = {"model.diffusion_model.x": 1, "model.diffusion_model.y": 2, "vae.z": 3}
    out, used = strip_prefix(sd, ["model.diffusion_model."])
    assert used == "model.diffusion_model." and out == {"x": 1, "y": 2}
    out, used = strip_prefix({"x": 1, "p.y": 2, "z": 3}, ["p."])
    assert used == "" and set(out) == {"x", "p.y", "z"}


def test_atomic_write_leaves_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "out.safetensors"
    save_file_atomic(_tensors(), path, {"step": "1"})
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("cinetune.core.checkpoint.os.replace", boom)
    with pytest.raises(KeyboardInterrupt):
        save_file_atomic({"c": torch.zeros(1)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"], "temporary file left behind"
    assert read_safetensors_header(path)[1] == {"step": "1"}
    assert os.path.getsize(path) > 0

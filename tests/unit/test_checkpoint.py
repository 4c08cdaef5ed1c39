"""Model-file I/O: headers, the tensor-by-tensor reader (every dtype, errors, subsets, shards, conversion policy),
every fp8 checkpoint layout on tiny files with the tools' key names, atomic writes, the checkpoint-kind registry;
the shared weight loader (core.weights) on the tiny Kandinsky 5 and LTX-2 files."""

import json
import os
import stat
import struct
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from cinetune.core import checkpoint as cp
from cinetune.core.checkpoint import (
    CheckpointError,
    describe_checkpoint,
    dtype_code,
    load_state_dict,
    open_checkpoint,
    read_safetensors_header,
    read_tensor_infos,
    register_checkpoint_kind,
    save_file_atomic,
    strip_prefix,
)
from cinetune.core.offload import host_tensors
from cinetune.core.quant import FP8Linear, dequantize_fp8, quantize_fp8
from cinetune.core.tiny import write_folder_atomic
from cinetune.core.weights import load_weights
from families import each_family


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


def test_atomic_write_gives_the_default_file_mode_and_keeps_a_replaced_files_mode(tmp_path):
    """Not the owner-only mode of a private temporary file: a new file gets 0o666 less the umask (as open() gives),
    an overwritten file keeps its mode; an atomically written folder gets 0o777 less the umask."""
    umask = os.umask(0o022)
    try:
        path = save_file_atomic(_tensors(), tmp_path / "new.safetensors")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        os.chmod(path, 0o640)
        save_file_atomic(_tensors(), path, {"step": "2"})
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
        assert read_safetensors_header(path)[1] == {"step": "2"}
        folder = write_folder_atomic(tmp_path / "model", lambda d: (d / "config.json").write_text("{}"))
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755
        write_folder_atomic(folder, lambda d: (d / "config.json").write_text("[]"))  # replaces the old folder
        assert (folder / "config.json").read_text() == "[]" and stat.S_IMODE(folder.stat().st_mode) == 0o755
    finally:
        os.umask(umask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "new.safetensors"]


# ---------------------------------------------------------------------------------------------------------------
# The tensor-by-tensor reader


ALL_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32, torch.uint32, torch.int64,
              torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
              torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e8m0fnu]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.numel() else t


def _every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dt in enumerate(ALL_DTYPES):
        raw = torch.randint(0, 256, (3, 2 + i, torch.empty((), dtype=dt).element_size()), dtype=torch.uint8,
                            generator=g)
        out[f"t{i}.{str(dt).split('.')[-1]}"] = raw.view(dt).reshape(3, 2 + i)
    out["zero_d"] = torch.tensor(3.5)
    out["empty"] = torch.zeros(0, 4, dtype=torch.bfloat16)
    out["bools"] = torch.tensor([True, False, True])
    return out


def test_every_safetensors_dtype_reads_and_writes_bit_exactly(tmp_path):
    tensors = _every_dtype()
    theirs = tmp_path / "theirs.safetensors"
    save_file(tensors, str(theirs), metadata={"k": "v"})
    ours = save_file_atomic(tensors, tmp_path / "ours.safetensors", {"k": "v"})
    for path in (theirs, ours):
        ckpt = open_checkpoint(path)
        assert ckpt.metadata == {"k": "v"}
        got = ckpt.read()
        assert got.keys() == tensors.keys()
        for k, t in tensors.items():
            assert got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(_bits(got[k]), _bits(t)), k
        assert {k: i.dtype for k, i in ckpt.infos.items()} == {k: dtype_code(t.dtype) for k, t in tensors.items()}
    reference = load_file(str(ours))  # the safetensors library reads what the streaming writer wrote
    assert all(torch.equal(_bits(reference[k]), _bits(t)) for k, t in tensors.items())


def test_reader_needs_no_safetensors_module_and_no_preadv(tmp_path, monkeypatch):
    tensors = {"a": torch.randn(5, 7), "b": torch.randn(3).bfloat16()}
    path = save_file_atomic(tensors, tmp_path / "m.safetensors")
    monkeypatch.setitem(sys.modules, "safetensors", None)  # any safetensors version, or none at all
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    assert all(torch.equal(open_checkpoint(path).read()[k], v) for k, v in tensors.items())
    monkeypatch.delattr(os, "preadv")  # Windows has no positional read: seek + readinto
    assert all(torch.equal(open_checkpoint(path).load()[k], v) for k, v in tensors.items())


def test_stride_zero_tensors_are_written_one_at_a_time(tmp_path):
    big = {f"w{i}": torch.ones(()).expand(256, 1024) for i in range(4)}  # 4 MiB on disk, nothing in memory
    path = save_file_atomic(big, tmp_path / "expanded.safetensors")
    assert os.path.getsize(path) > 4 * 256 * 1024 * 4
    got = open_checkpoint(path).read()
    assert all(torch.equal(got[k], torch.ones(256, 1024)) for k in big)


def test_truncation_io_errors_and_memory_errors_say_what_to_do(tmp_path, monkeypatch):
    path = save_file_atomic({"a": torch.randn(64, 64), "b": torch.randn(8)}, tmp_path / "m.safetensors")
    ckpt = open_checkpoint(path)
    data = path.read_bytes()
    path.write_bytes(data[:-100])  # cut after the header was read: the reads find the end
    with pytest.raises(CheckpointError, match=r"truncated: tensor '.*' ends at byte .* fetch it again"):
        ckpt.load()
    with pytest.raises(CheckpointError, match="truncated.*fetch the file again"):
        open_checkpoint(path)
    path.write_bytes(data)

    def eio(*args):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "preadv", eio)
    with pytest.raises(CheckpointError, match=r"read error in tensor 'a' .*Input/output error.*check the disk"):
        open_checkpoint(path).load(["a"])
    monkeypatch.undo()

    real_empty = torch.empty

    def no_memory(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.numel() * t.element_size() >= 64 * 64 * 4:
            raise RuntimeError("DefaultCPUAllocator: not enough memory")
        return t

    monkeypatch.setattr(torch, "empty", no_memory)
    with pytest.raises(CheckpointError, match=r"not enough host memory for tensor a .*smaller dtype \(fp8\)"):
        open_checkpoint(path).load()


def test_prefix_subsets_read_only_their_part(tmp_path, monkeypatch):
    """An LTX-2-style combined file: each loader selects its prefix and reads nothing else."""
    g = torch.Generator().manual_seed(1)
    parts = {"model.diffusion_model.transformer_blocks.0.attn1.to_q.weight": (8, 8),
             "model.diffusion_model.video_embeddings_connector.proj.weight": (4, 4),
             "model.diffusion_model.audio_embeddings_connector.proj.weight": (4, 4),
             "vae.decoder.conv_in.weight": (4, 4, 3, 3, 3), "audio_vae.decoder.conv_in.weight": (4, 4, 3, 3),
             "vocoder.conv_pre.weight": (8, 4, 7), "text_embedding_projection.aggregate_embed.weight": (8, 16)}
    tensors = {k: torch.randn(s, generator=g) for k, s in parts.items()}
    path = save_file_atomic(tensors, tmp_path / "combined.safetensors", {"config": "{}"})
    ckpt = open_checkpoint(path)
    read: list[str] = []
    original = cp._Reader.read_into
    monkeypatch.setattr(cp._Reader, "read_into", lambda self, entry, dest: read.append(entry.stored) or
                        original(self, entry, dest))
    connectors = ("model.diffusion_model.video_embeddings_connector.",
                  "model.diffusion_model.audio_embeddings_connector.")
    dit = ckpt.select("model.diffusion_model.", exclude=connectors)
    assert list(dit.infos) == ["transformer_blocks.0.attn1.to_q.weight"] and dit.metadata == {"config": "{}"}
    got = dit.load()
    assert read == ["model.diffusion_model.transformer_blocks.0.attn1.to_q.weight"]
    assert torch.equal(got["transformer_blocks.0.attn1.to_q.weight"],
                       tensors["model.diffusion_model.transformer_blocks.0.attn1.to_q.weight"])
    vae = ckpt.select("vae.")
    assert list(vae.infos) == ["decoder.conv_in.weight"] and vae.stored_name("decoder.conv_in.weight") == \
        "vae.decoder.conv_in.weight"
    assert torch.equal(vae.load()["decoder.conv_in.weight"], tensors["vae.decoder.conv_in.weight"])
    both = ckpt.select("model.diffusion_model.video_embeddings_connector.", strip=False)
    assert list(both.infos) == ["model.diffusion_model.video_embeddings_connector.proj.weight"]
    renamed = ckpt.rename(lambda k: k.replace("vocoder.", "voc.") if k.startswith("vocoder.") else None)
    assert list(renamed.infos) == ["voc.conv_pre.weight"]
    with pytest.raises(CheckpointError, match="both stand for 'x'"):
        ckpt.rename(lambda k: "x")
    with pytest.raises(CheckpointError, match="no tensor"):
        vae.load(["encoder.missing"])


def test_shards_and_index(tmp_path):
    a = save_file_atomic({"x.weight": torch.randn(2, 3)}, tmp_path / "model-00001.safetensors")
    b = save_file_atomic({"y.weight": torch.randn(4), "z": torch.arange(3)}, tmp_path / "model-00002.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    weight_map = {"x.weight": a.name, "y.weight": b.name, "z": b.name}
    index.write_text(json.dumps({"weight_map": weight_map}))
    for ckpt in (open_checkpoint(index), open_checkpoint([a, b])):
        assert set(ckpt.infos) == {"x.weight", "y.weight", "z"} and len(ckpt.files) == 2
        assert torch.equal(ckpt.load()["z"], torch.arange(3))
    index.write_text(json.dumps({"weight_map": {**weight_map, "w.weight": a.name}}))
    with pytest.raises(CheckpointError, match="lists 1 tensors no shard holds: w.weight"):
        open_checkpoint(index)
    with pytest.raises(CheckpointError, match=r"tensors x\.weight are also in"):
        open_checkpoint([a, a])


def test_policy_casts_quantises_and_keeps(tmp_path):
    g = torch.Generator().manual_seed(2)
    tensors = {"lin.weight": torch.randn(16, 32, generator=g).bfloat16(), "lin.bias": torch.randn(16, generator=g),
               "norm.weight": torch.randn(32, generator=g), "step": torch.tensor(7)}
    ckpt = open_checkpoint(save_file_atomic(tensors, tmp_path / "m.safetensors"))

    def policy(name, info):
        return torch.float8_e4m3fn if name == "lin.weight" else torch.float16

    plan = ckpt.plan(dtype=policy)
    got = ckpt.load(dtype=policy)
    assert {k: (tuple(v.shape), v.dtype) for k, v in got.items()} == plan
    q, s = quantize_fp8(tensors["lin.weight"])
    assert torch.equal(_bits(got["lin.weight"]), _bits(q)) and torch.equal(got["lin.scale_weight"], s)
    assert got["lin.bias"].dtype == torch.float16 and torch.equal(got["lin.bias"], tensors["lin.bias"].half())
    assert torch.equal(got["step"], tensors["step"])  # integers are never cast
    kept = ckpt.load(dtype=None)
    assert all(kept[k].dtype == v.dtype and torch.equal(kept[k], v) for k, v in tensors.items())
    with pytest.raises(ValueError, match="fp8 quantisation is for '<layer>.weight' tensors"):
        ckpt.load(["lin.bias"], dtype=torch.float8_e4m3fn)


@pytest.mark.parametrize("weight_dtype", ["default", "fp32", "fp8_e4m3fn"])
@each_family
def test_load_weights_from_each_family_tiny_file(tiny_file, fam, weight_dtype):
    """core.weights on a family's tiny file (K5: official layout, fp32 modulations and bf16 elsewhere; LTX-2: the
    combined file's DiT, bf16): stored dtypes kept, cast, or the layers the family's keep rule does not keep
    quantised; one host buffer per block; a frozen eval model that runs."""
    ckpt = fam.select(open_checkpoint(tiny_file(fam)))
    with torch.device("meta"):
        model = fam.new()
    names = list(model.state_dict())
    load_weights(model, ckpt, names, weight_dtype=weight_dtype, keep=fam.keep,
                 block_prefixes=fam.block_prefixes(model))
    stored = ckpt.load(names)
    assert {v.dtype for v in stored.values()} == ({torch.float32, torch.bfloat16} if fam.id == "k5"
                                                  else {torch.bfloat16})
    fp8 = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    assert sorted(fp8) == (sorted(fam.fp8_paths(model)) if weight_dtype == "fp8_e4m3fn" else [])
    got = model.state_dict()
    for name in names:
        layer = name[: -len(".weight")]
        if layer in fp8 and name.endswith(".weight"):
            q, scale = quantize_fp8(stored[name])
            assert torch.equal(_bits(got[name]), _bits(q)) and torch.equal(got[f"{layer}.scale_weight"], scale), name
        elif weight_dtype == "fp32":
            assert got[name].dtype == torch.float32 and torch.equal(got[name], stored[name].float()), name
        else:
            assert got[name].dtype == stored[name].dtype and torch.equal(got[name], stored[name]), name
    for block in fam.blocks(model):
        assert len({t.untyped_storage().data_ptr() for t in block.state_dict().values()}) == 1
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert torch.isfinite(fam.run(model, fam.inputs())).all()


def test_allocate_puts_tensors_where_the_caller_wants(tmp_path):
    tensors = {"a.weight": torch.randn(4, 8), "b.weight": torch.randn(8).bfloat16()}
    ckpt = open_checkpoint(save_file_atomic(tensors, tmp_path / "m.safetensors"))
    buffers = host_tensors({"a.weight": ((4, 8), torch.float32), "b.weight": ((8,), torch.float32)})
    got = ckpt.load(dtype=torch.float32, allocate=lambda name, shape, dtype: buffers.get(name))
    assert all(got[k].data_ptr() == buffers[k].data_ptr() for k in tensors)
    assert torch.equal(buffers["b.weight"], tensors["b.weight"].float())
    with pytest.raises(ValueError, match=r"allocate\('a.weight'\) returned"):
        ckpt.load(dtype=torch.float32, allocate=lambda name, shape, dtype: torch.empty(3))


# ---------------------------------------------------------------------------------------------------------------
# fp8 layouts (tiny files with the key names of each tool)

W = torch.tensor([[0.5, -1.0, 2.0, 0.25], [3.0, -0.125, 1.5, -2.5], [0.75, 1.25, -0.5, 4.0]])  # [out 3, in 4]


def _codes(w: torch.Tensor, scale: torch.Tensor, dtype=torch.float8_e4m3fn) -> torch.Tensor:
    return (w / scale).to(dtype)


def _check_layer(path, layout, name, expected_scale, dtype=torch.float8_e4m3fn):
    ckpt = open_checkpoint(path)
    scheme = ckpt.fp8
    assert scheme.layout == layout
    assert list(scheme.layers) == [name]
    kept = ckpt.load()
    scale_name = name[: -len("weight")] + "scale_weight"
    assert kept[name].dtype == dtype and kept[scale_name].dtype == torch.float32
    torch.testing.assert_close(kept[scale_name], expected_scale, rtol=0, atol=0)
    assert set(kept) == set(ckpt.model_infos()) | {scale_name}  # no scale, config or marker leaks through
    deq = ckpt.load(dtype=torch.float32)[name]
    assert torch.equal(deq, dequantize_fp8(kept[name], kept[scale_name]))
    return kept


def test_musubi_per_tensor_per_row_and_two_level_block_scales(tmp_path):
    s_tensor = torch.tensor([0.01])
    s_rows = torch.tensor([[0.01], [0.02], [0.03]])
    path = save_file_atomic({"a.weight": _codes(W, s_tensor), "a.scale_weight": s_tensor.bfloat16(),
                             "b.bias": torch.zeros(3)}, tmp_path / "musubi.safetensors")
    _check_layer(path, "musubi", "a.weight", s_tensor.bfloat16().float())
    path = save_file_atomic({"a.weight": _codes(W, s_rows), "a.scale_weight": s_rows}, tmp_path / "rows.safetensors")
    _check_layer(path, "musubi", "a.weight", s_rows)
    block = torch.tensor([[[0.5], [1.0]], [[0.25], [1.0]], [[1.0], [0.5]]])  # [out, in / 2, 1], divided by the max
    top = torch.tensor(0.04)
    codes = _codes(W.reshape(3, 2, 2), block * top).reshape(3, 4)
    path = save_file_atomic({"a.weight": codes, "a.scale_weight": block, "a.scale_weight_tensor": top},
                            tmp_path / "block.safetensors")
    kept = _check_layer(path, "musubi", "a.weight", block * top)
    assert torch.equal(dequantize_fp8(kept["a.weight"], kept["a.scale_weight"]),
                       (codes.float().reshape(3, 2, 2) * (block * top)).reshape(3, 4))


def test_comfyui_scaled_fp8_marker_with_ignored_input_scale(tmp_path):
    s = torch.tensor(0.02)
    path = save_file_atomic({"model.diffusion_model.scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn),
                             "model.diffusion_model.x.weight": _codes(W, s),
                             "model.diffusion_model.x.scale_weight": s,
                             "model.diffusion_model.x.scale_input": torch.tensor(0.5),
                             "vae.decoder.weight": torch.randn(2, 2)}, tmp_path / "comfy.safetensors")
    dit = open_checkpoint(path).select("model.diffusion_model.")
    assert dit.fp8.layout == "comfyui" and list(dit.fp8.layers) == ["x.weight"]
    assert set(dit.load()) == {"x.weight", "x.scale_weight"}


@pytest.mark.parametrize("where", ["tensor", "metadata"])
def test_comfyui_mixed_precision_configs(tmp_path, where):
    """comfy_quant (uint8 JSON tensor per layer) or _quantization_metadata (layer names as stored); weight_scale and
    input_scale as ComfyUI's MixedPrecisionOps reads them; layers without a config are plain tensors."""
    s = torch.tensor(0.03)
    tensors = {"text_encoders.q.layers.0.mlp.weight": _codes(W, s, torch.float8_e5m2),
               "text_encoders.q.layers.0.mlp.weight_scale": s, "text_encoders.q.layers.0.mlp.input_scale": s,
               "text_encoders.q.layers.0.norm.weight": torch.ones(4)}
    conf = {"format": "float8_e5m2", "full_precision_matrix_mult": True}
    metadata = {}
    if where == "tensor":
        tensors["text_encoders.q.layers.0.mlp.comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()),
                                                                           dtype=torch.uint8)
    else:
        metadata[cp.QUANT_METADATA_KEY] = json.dumps({"format_version": "1.0",
                                                      "layers": {"text_encoders.q.layers.0.mlp": conf}})
    path = save_file_atomic(tensors, tmp_path / "mixed.safetensors", metadata)
    ckpt = open_checkpoint(path).select("text_encoders.q.")
    assert ckpt.fp8.layout == "comfyui_mixed"
    kept = ckpt.load()
    assert set(kept) == {"layers.0.mlp.weight", "layers.0.mlp.scale_weight", "layers.0.norm.weight"}
    assert kept["layers.0.mlp.weight"].dtype == torch.float8_e5m2 and torch.equal(kept["layers.0.mlp.scale_weight"], s)


def test_official_ltx2_weight_scale_and_plain_fp8(tmp_path):
    s = torch.tensor(0.015)
    path = save_file_atomic({"blocks.1.to_q.weight": _codes(W, s), "blocks.1.to_q.weight_scale": s,
                             "blocks.1.to_q.input_scale": torch.tensor(1.0), "blocks.1.to_q.bias": torch.zeros(3),
                             "patchify_proj.weight": W.bfloat16()}, tmp_path / "ltx2_fp8.safetensors")
    _check_layer(path, "weight_scale", "blocks.1.to_q.weight", s)
    plain = save_file_atomic({"blocks.1.to_q.weight": W.to(torch.float8_e4m3fn), "norm": torch.ones(3)},
                             tmp_path / "plain.safetensors")
    kept = _check_layer(plain, "unscaled", "blocks.1.to_q.weight", torch.tensor(1.0))
    assert torch.equal(open_checkpoint(plain).load(dtype=torch.bfloat16)["blocks.1.to_q.weight"],
                       kept["blocks.1.to_q.weight"].bfloat16())


@pytest.mark.parametrize("tensors, message", [
    (lambda: {"a.weight": _codes(W, torch.tensor(1.0)), "a.weight_scale": torch.tensor(1.0),
              "b.weight": W.to(torch.float8_e4m3fn)},
     r"weight_scale layout\): 1 float8 tensors have no scale: b\.weight"),
    (lambda: {"a.weight": W, "a.scale_weight": torch.tensor(1.0)},
     r"a\.scale_weight scales a\.weight, which is stored as F32, not float8"),
    (lambda: {"a.scale_weight": torch.tensor(1.0), "b.weight": W},
     r"a\.scale_weight is a scale without a weight"),
    (lambda: {"a.weight": _codes(W, torch.tensor(1.0)), "a.weight_scale": torch.ones(2, 2)},
     r"a\.weight_scale: scale of shape \[2, 2\] does not fit a weight \[3, 4\]"),
    (lambda: {"a.weight": _codes(W, torch.tensor(1.0)), "a.comfy_quant": torch.tensor(list(b"{not json"),
                                                                                     dtype=torch.uint8)},
     r"a\.comfy_quant is not a JSON quantisation config"),
], ids=["missing-scale", "scale-beside-f32", "scale-without-weight", "scale-shape", "bad-config"])
def test_damaged_fp8_files_name_the_key(tmp_path, tensors, message):
    path = save_file_atomic(tensors(), tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=message) as info:
        open_checkpoint(path).load()
    assert str(path) in str(info.value) and "Re-download or re-convert the file, or use the bf16 file" in str(info.value)


def test_nan_scale_is_refused(tmp_path):
    path = save_file_atomic({"a.weight": _codes(W, torch.tensor(1.0)), "a.scale_weight": torch.tensor(float("nan"))},
                            tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match=r"a\.scale_weight holds NaN or infinity; the checkpoint is damaged"):
        open_checkpoint(path).load()


@pytest.mark.parametrize("tensors", [
    lambda: {"a.weight": torch.zeros(3, 2, dtype=torch.uint8), "a.weight_scale": torch.ones(3, 1).to(
        torch.float8_e4m3fn), "a.weight_scale_2": torch.tensor(1.0), "a.input_scale": torch.tensor(1.0)},
    lambda: {"a.weight": torch.zeros(3, 2, dtype=torch.uint8), "a.weight_scale": torch.ones(3, 1),
             "a.comfy_quant": torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)},
], ids=["nvfp4-keys", "nvfp4-config"])
def test_nvfp4_layers_are_recognised_and_refused(tmp_path, tensors):
    path = save_file_atomic(tensors(), tmp_path / "fp4.safetensors")
    with pytest.raises(CheckpointError, match=r"1 layers use a quantisation format this pack cannot run: a \(nvfp4\)"
                                              r".*use the fp8 or bf16 version of the model file"):
        open_checkpoint(path).fp8


def test_four_bit_tensors_are_refused_on_read(tmp_path):
    path = tmp_path / "f4.safetensors"
    header = json.dumps({"a": {"dtype": "F4", "shape": [2, 4], "data_offsets": [0, 4]}}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    ckpt = open_checkpoint(path)
    assert ckpt.infos["a"].nbytes == 4
    with pytest.raises(CheckpointError, match="4-bit float tensors .* use the fp8 or bf16 version"):
        ckpt.read()


# ---------------------------------------------------------------------------------------------------------------
# What a file is


def test_describe_checkpoint_asks_registered_families_first():
    import cinetune.k5.detect  # noqa: F401 - the K5 entry

    k5_names = {"visual_transformer_blocks.0.cross_attention.key_norm.weight": (64,)}
    assert describe_checkpoint(k5_names) == "a Kandinsky 5 DiT (goes in models/diffusion_models)"
    shapes = {"model.diffusion_model.gizmo_blocks.0.weight": (4, 4)}
    assert "ComfyUI diffusion model" in describe_checkpoint(shapes)

    def gizmo(s):
        return "a Gizmo DiT" if any("gizmo_blocks" in n for n in s) else None

    try:
        assert register_checkpoint_kind(gizmo) is gizmo and register_checkpoint_kind(gizmo) is gizmo
        assert cp._KINDS.count(gizmo) == 1
        assert describe_checkpoint(shapes) == "a Gizmo DiT"
        assert describe_checkpoint({**shapes, "x.lora_up.weight": (4, 1)}) == "a LoRA (goes in models/loras)"
        assert describe_checkpoint({"text_model.encoder.layers.0.q.weight": (4, 4)}) == "a CLIP text encoder"
    finally:
        cp._KINDS.remove(gizmo)

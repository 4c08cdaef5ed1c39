"""LTX-2 loaders on tiny files in every published layout: the combined checkpoint (each part reading only its own
tensors), ComfyUI's split files, an official DiT-only file, a diffusers snapshot, the official fp8 layout and
plain-cast fp8, the text side (combined file, split connector file, Gemma fit check, tokenizer sources), and every
kind of wrong file refused with a message that says what the file is."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import pytest
import torch

from cinetune.core.checkpoint import Checkpoint, CheckpointError, open_checkpoint, save_file_atomic
from cinetune.core.quant import FP8Linear, quantize_fp8
from cinetune.k5.dit import load_k5_dit
from cinetune.k5.tiny import write_tiny_dit
from cinetune.ltx2 import loader
from cinetune.ltx2.config import (DIT_PREFIX, LTX2TransformerConfig, NotLTX2CheckpointError, UnsupportedLTX2Error,
                                  ltx2_fp8_keep_high_precision, official_to_diffusers)
from cinetune.ltx2.dit import LTX2DiT
from cinetune.ltx2.loader import (GEMMA3_12B_FEATURES, file_parts, load_ltx2_dit, load_ltx2_text_encoder,
                                  load_ltx2_vae)
from cinetune.ltx2.text import LTX2TextEncoder, load_gemma_text_model, load_gemma_tokenizer, write_tiny_gemma
from cinetune.ltx2.tiny import tiny_metadata, write_tiny_checkpoint
from test_ltx2_dit import make_inputs, rel, run

TINY = LTX2TransformerConfig.from_metadata(tiny_metadata()["transformer"])
CONNECTORS = tuple(DIT_PREFIX + p for p in ("video_embeddings_connector.", "audio_embeddings_connector."))
PROMPTS = ["A red fox jumps over a frozen stream; the ice cracks.", "Rain."]


# ------------------------------------------------------------------------------------------------------- helpers


def save(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    return save_file_atomic(tensors, path, metadata=metadata)


def select(tensors: dict, *prefixes: str, exclude: tuple[str, ...] = (), strip: str = "") -> dict:
    return {k.removeprefix(strip): v for k, v in tensors.items()
            if k.startswith(prefixes) and not (exclude and k.startswith(exclude))}


def sparse_safetensors(path: Path, entries: dict[str, tuple[str, tuple[int, ...]]],
                       metadata: dict | None = None) -> Path:
    """A valid safetensors file of zeros, written sparse: a full-size header with no data on disk (for big shapes
    whose values the code under test must never read)."""
    sizes = {"BF16": 2, "F32": 4}
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (code, shape) in entries.items():
        n = math.prod(shape) * sizes[code]
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        f.truncate(8 + len(text) + offset)
    return path


@pytest.fixture
def reads(monkeypatch):
    """Records (source, stored tensor name) of every tensor read through Checkpoint.iter_load / read."""
    record: list[tuple[str, str]] = []
    iter_load, read = Checkpoint.iter_load, Checkpoint.read

    def log(ckpt: Checkpoint, names) -> list[str]:
        names = list(ckpt.model_infos() if names is None else names)
        record.extend((ckpt.source, ckpt.stored_name(n)) for n in names)
        return names

    monkeypatch.setattr(Checkpoint, "iter_load", lambda self, names=None, **kw: iter_load(self, log(self, names), **kw))
    monkeypatch.setattr(Checkpoint, "read", lambda self, names=None, **kw: read(self, log(self, names), **kw))
    return record


def dit_linears() -> list[str]:
    with torch.device("meta"):
        model = LTX2DiT(TINY)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def assert_state_equal(state: dict, expected: dict) -> None:
    assert set(state) == set(expected)
    for k, v in expected.items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k


# ------------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ltx2")


@pytest.fixture(scope="module")
def combined(files) -> Path:
    return write_tiny_checkpoint(files / "ltx-2-19b-dev.safetensors", seed=0)


@pytest.fixture(scope="module")
def tensors(combined) -> dict[str, torch.Tensor]:
    return open_checkpoint(combined).read()


@pytest.fixture(scope="module")
def metadata(combined) -> dict[str, str]:
    return open_checkpoint(combined).metadata


@pytest.fixture(scope="module")
def dit_state(tensors) -> dict[str, torch.Tensor]:
    return select(tensors, DIT_PREFIX, exclude=CONNECTORS, strip=DIT_PREFIX)


@pytest.fixture(scope="module")
def fp8_files(files, tensors, metadata) -> dict[str, Path]:
    """The official fp8 layout (block Linear weights float8_e4m3fn + 0-d float32 weight_scale and input_scale, the
    official keep rule) and a plain cast (float8 weights, no scales), named like the released files."""
    scaled, plain = dict(tensors), dict(tensors)
    for name in dit_linears():
        if ltx2_fp8_keep_high_precision(name):
            continue
        key = DIT_PREFIX + name
        q, scale = quantize_fp8(tensors[key + ".weight"])
        scaled.update({key + ".weight": q, key + ".weight_scale": scale, key + ".input_scale": torch.tensor(1.0)})
        plain[key + ".weight"] = tensors[key + ".weight"].to(torch.float8_e4m3fn)
    return {"scaled": save(files / "ltx-2-19b-distilled-fp8.safetensors", scaled, metadata),
            "plain": save(files / "ltx-2-19b-dev-fp8.safetensors", plain, metadata)}


@pytest.fixture(scope="module")
def gemma_tokenizer_dir(test_data) -> Path:
    return test_data["gemma3_tokenizer"]


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory, gemma_tokenizer_dir) -> dict[str, Path]:
    """The tiny Gemma 3 as a Hugging Face folder (with its tokenizer) and as ComfyUI's single file (model.*, no
    tokenizer)."""
    root = tmp_path_factory.mktemp("gemma")
    folder = write_tiny_gemma(root / "gemma-3-tiny-it", gemma_tokenizer_dir, seed=3)
    shards = open_checkpoint(folder / "model.safetensors.index.json").read()
    text = {"model." + k.removeprefix("language_model.model."): v for k, v in shards.items()
            if k.startswith("language_model.model.")}
    return {"folder": folder, "file": save(root / "single" / "gemma_3_tiny_it.safetensors", text)}


@pytest.fixture(scope="module")
def gemma_tokenizer(gemma_tokenizer_dir):
    return load_gemma_tokenizer(gemma_tokenizer_dir)


@pytest.fixture
def tokenizer_folders(monkeypatch, gemma_tokenizer) -> list[Path]:
    """Records the folders the loader takes the tokenizer from, and answers with the already loaded Gemma 3
    tokenizer (opening its 33 MB tokenizer.json takes seconds; load_gemma_tokenizer itself is tested in
    test_ltx2_text.py)."""
    used: list[Path] = []

    def load(folder):
        used.append(Path(folder))
        if not (Path(folder) / "tokenizer.json").is_file():
            raise CheckpointError(f"{folder}: no Gemma 3 tokenizer here")
        return gemma_tokenizer

    monkeypatch.setattr(loader, "load_gemma_tokenizer", load)
    return used


# -------------------------------------------------------------------------------------------------- combined file


def test_combined_file_each_part_reads_only_its_own_tensors(combined, tensors, dit_state, reads):
    dit = load_ltx2_dit(combined)
    assert {name for _, name in reads} == {DIT_PREFIX + k for k in dit_state}  # no connector, VAE, projection
    assert_state_equal(dit.model.state_dict(), dit_state)
    assert dit.config == TINY and dit.layout == "combined" and dit.variant.id == "ltx2_19b_dev"
    assert dit.dtypes == {"BF16": len(dit_state)}
    assert dit.other_parts == {"connectors": 58, "text_projection": 1, "vae": 63, "audio_vae": 70, "vocoder": 194}

    reads.clear()
    vaes = load_ltx2_vae(combined, combined)
    read = {name for _, name in reads}
    assert read == set(select(tensors, "vae.", "audio_vae.", "vocoder."))
    assert_state_equal({"vae." + k: v for k, v in vaes.video.official_state_dict().items()}, select(tensors, "vae."))
    assert_state_equal({"audio_vae." + k: v for k, v in vaes.audio.official_state_dict().items()},
                       select(tensors, "audio_vae."))
    assert_state_equal({"vocoder." + k: v for k, v in vaes.vocoder.official_state_dict().items()},
                       select(tensors, "vocoder."))
    assert load_ltx2_vae(combined).audio is None


def test_file_parts_counts_each_component(tensors):
    assert file_parts(tensors) == {"dit": 198, "connectors": 58, "text_projection": 1, "vae": 63, "audio_vae": 70,
                                   "vocoder": 194}
    assert file_parts(["patchify_proj.weight", "vae.x"]) == {"other": 1, "vae": 1}


def test_variant_from_the_file_name(files, combined):
    link = files / "ltx-2-19b-distilled.safetensors"
    link.symlink_to(combined)
    assert load_ltx2_dit(link).variant.id == "ltx2_19b_distilled"
    assert load_ltx2_dit(combined, variant="ltx2_19b_distilled").variant.distilled
    with pytest.raises(ValueError, match="fp8"):
        load_ltx2_dit(combined, variant="ltx2_19b_dev_fp8")


# ------------------------------------------------------------------------------------------- ComfyUI split files


def test_split_dit_with_metadata_takes_its_config_from_the_metadata(tmp_path, tensors, dit_state):
    # The code defaults of the official configurator, stated in the metadata, must win over the 19B values.
    transformer = {**tiny_metadata()["transformer"], "rope_type": "interleaved", "av_ca_timestep_scale_multiplier": 1}
    path = save(tmp_path / "ltx2_dit.safetensors", select(tensors, DIT_PREFIX),
                {"config": json.dumps({"transformer": transformer})})
    loaded = load_ltx2_dit(path)
    assert loaded.layout == "comfyui_split" and loaded.other_parts == {"connectors": 58}
    assert loaded.config.rope_type == "interleaved" and loaded.config.av_ca_timestep_scale_multiplier == 1
    assert_state_equal(loaded.model.state_dict(), dit_state)


# Head counts are not in the weights; without metadata they are width / head dim with the 19B head dims (128, 64).
SHAPES_ONLY = LTX2TransformerConfig(num_layers=2, num_attention_heads=1, attention_head_dim=128,
                                    cross_attention_dim=128, caption_channels=24, audio_num_attention_heads=1,
                                    audio_attention_head_dim=64, audio_cross_attention_dim=64)


@pytest.mark.parametrize("with_connectors", [True, False])
def test_split_dit_without_metadata_takes_its_config_from_the_shapes(tmp_path, tensors, with_connectors, reads):
    torch.manual_seed(0)
    state = {k: v.to(torch.bfloat16) for k, v in LTX2DiT(SHAPES_ONLY).state_dict().items()}
    file_tensors = {DIT_PREFIX + k: v for k, v in state.items()}
    if with_connectors:
        file_tensors.update(select(tensors, *CONNECTORS))
    loaded = load_ltx2_dit(save(tmp_path / "ltx-2-19b-dev_transformer.safetensors", file_tensors))
    assert loaded.config == SHAPES_ONLY and loaded.layout == "comfyui_split"
    assert_state_equal(loaded.model.state_dict(), state)
    assert not any(name.startswith(CONNECTORS) for _, name in reads)
    assert loaded.other_parts == ({"connectors": 58} if with_connectors else {})


def test_official_dit_only_file_without_prefix(tmp_path, metadata, dit_state):
    loaded = load_ltx2_dit(save(tmp_path / "ltx-2-19b-distilled_dit.safetensors", dit_state, metadata))
    assert loaded.layout == "official_dit" and loaded.config == TINY and loaded.variant.distilled
    assert_state_equal(loaded.model.state_dict(), dit_state)


def test_split_vae_files(tmp_path, tensors, metadata):
    video = select(tensors, "vae.")
    audio = select(tensors, "audio_vae.", "vocoder.")
    with_prefix = save(tmp_path / "ltx-2-19b-dev_video_vae.safetensors", video, metadata)
    bare = save(tmp_path / "LTX2_video_vae.safetensors", {k.removeprefix("vae."): v for k, v in video.items()},
                metadata)
    audio_file = save(tmp_path / "ltx-2-19b-dev_audio_vae.safetensors", audio, metadata)
    for video_file in (with_prefix, bare):
        vaes = load_ltx2_vae(video_file, audio_file)
        assert_state_equal({"vae." + k: v for k, v in vaes.video.official_state_dict().items()}, video)
        assert_state_equal({"vocoder." + k: v for k, v in vaes.vocoder.official_state_dict().items()},
                           select(tensors, "vocoder."))


# --------------------------------------------------------------------------------------------- diffusers snapshot


@pytest.fixture(scope="module")
def snapshot(files, combined, dit_state) -> Path:
    """A diffusers snapshot laid out like Lightricks/LTX-2 (model_index.json, transformer/, vae/, connectors/,
    audio_vae/, vocoder/, and the combined file at the top), written by diffusers itself."""
    from diffusers import LTX2VideoTransformer3DModel

    root = files / "LTX-2"
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps({"_class_name": "LTX2Pipeline"}))
    transformer = LTX2VideoTransformer3DModel(**TINY.diffusers_kwargs()).to(torch.bfloat16)
    transformer.load_state_dict(official_to_diffusers(dit_state), strict=True)
    transformer.save_pretrained(root / "transformer")
    load_ltx2_vae(combined).video.model.save_pretrained(root / "vae")
    for folder, cls in (("connectors", "LTX2TextConnectors"), ("audio_vae", "AutoencoderKLLTX2Audio"),
                        ("vocoder", "LTX2Vocoder")):
        (root / folder).mkdir()
        (root / folder / "config.json").write_text(json.dumps({"_class_name": cls}))
    (root / "ltx-2-19b-dev.safetensors").symlink_to(combined)
    return root


def test_diffusers_snapshot_dit(snapshot, dit_state):
    for path in (snapshot, snapshot / "transformer", snapshot / "transformer" / "diffusion_pytorch_model.safetensors"):
        loaded = load_ltx2_dit(path)
        assert loaded.layout == "diffusers" and loaded.variant.id == "ltx2_19b_dev"
        assert loaded.config.diffusers_kwargs() == TINY.diffusers_kwargs()
        assert_state_equal(loaded.model.state_dict(), dit_state)
    # The combined file at the top of the snapshot is the combined file, not the snapshot.
    assert load_ltx2_dit(snapshot / "ltx-2-19b-dev.safetensors").layout == "combined"
    with pytest.raises(NotLTX2CheckpointError, match="AutoencoderKLLTX2Video"):
        load_ltx2_dit(snapshot / "vae")


def test_diffusers_snapshot_vae_and_refused_parts(snapshot, combined, gemma_tokenizer_dir, tiny_gemma):
    reference = load_ltx2_vae(combined).video.model.state_dict()
    for path in (snapshot, snapshot / "vae"):
        assert_state_equal(load_ltx2_vae(path).video.model.state_dict(), reference)
    for audio in (snapshot, snapshot / "audio_vae", snapshot / "vocoder"):
        with pytest.raises(CheckpointError, match="audio_vae/ and vocoder/ folders are not supported"):
            load_ltx2_vae(snapshot, audio)
    assert load_ltx2_vae(snapshot, snapshot / "ltx-2-19b-dev.safetensors").vocoder is not None
    for ckpt in (snapshot, snapshot / "connectors"):
        with pytest.raises(CheckpointError, match="connectors/ folders are not supported"):
            load_ltx2_text_encoder(tiny_gemma["folder"], ckpt)


# ------------------------------------------------------------------------------------------------------------ fp8


def test_official_fp8_file_loads_as_stored(fp8_files, tensors):
    path = fp8_files["scaled"]
    stored = open_checkpoint(path).read()
    loaded = load_ltx2_dit(path)
    assert loaded.variant.id == "ltx2_19b_distilled_fp8"
    quantised = [n for n in dit_linears() if not ltx2_fp8_keep_high_precision(n)]
    assert quantised and all(n.startswith("transformer_blocks.1.") for n in quantised)
    modules = dict(loaded.model.named_modules())
    for name in dit_linears():
        layer, key = modules[name], DIT_PREFIX + name
        if name in quantised:
            assert isinstance(layer, FP8Linear)
            assert torch.equal(layer.weight.view(torch.uint8), stored[key + ".weight"].view(torch.uint8))
            assert torch.equal(layer.scale_weight, stored[key + ".weight_scale"])
        else:
            assert not isinstance(layer, FP8Linear) and layer.weight.dtype == torch.bfloat16
    assert loaded.dtypes["F8_E4M3"] == len(quantised)

    dequantised = dict(load_ltx2_dit(path, weight_dtype="bf16").model.named_modules())
    reference = load_ltx2_dit(path, weight_dtype="fp32")
    for name in quantised:
        key = DIT_PREFIX + name
        exact = stored[key + ".weight"].float() * stored[key + ".weight_scale"]
        assert not isinstance(dequantised[name], FP8Linear)
        assert torch.equal(dequantised[name].weight, exact.to(torch.bfloat16))
        assert torch.equal(dict(reference.model.named_modules())[name].weight, exact)

    inputs = make_inputs(TINY, batch=1, sigma=(0.6,))
    video, audio = run(loaded.model, inputs)
    ref_video, ref_audio = run(reference.model, inputs)
    assert rel(video, ref_video) < 1e-6 and rel(audio, ref_audio) < 1e-6
    bf16_inputs = {k: v.bfloat16() if k.endswith(("video", "audio", "context")) else v for k, v in inputs.items()}
    video16, audio16 = run(load_ltx2_dit(path, weight_dtype="bf16").model, bf16_inputs)
    assert rel(video16, ref_video) < 3e-2 and rel(audio16, ref_audio) < 3e-2


def test_plain_cast_fp8_file_has_scale_one(fp8_files, tensors):
    path = fp8_files["plain"]
    loaded = load_ltx2_dit(path)
    assert loaded.variant.id == "ltx2_19b_dev_fp8"
    layer = loaded.model.transformer_blocks[1].attn1.to_q
    stored = tensors[DIT_PREFIX + "transformer_blocks.1.attn1.to_q.weight"].to(torch.float8_e4m3fn)
    assert isinstance(layer, FP8Linear) and float(layer.scale_weight) == 1.0
    assert torch.equal(layer.weight.view(torch.uint8), stored.view(torch.uint8))
    bf16 = load_ltx2_dit(path, weight_dtype="bf16").model.transformer_blocks[1].attn1.to_q
    assert torch.equal(bf16.weight, stored.to(torch.bfloat16))
    with pytest.raises(ValueError, match="bf16 files"):
        load_ltx2_dit(path, variant="ltx2_19b_dev")


def test_fp8_weight_dtype_quantises_by_the_official_rule(combined):
    modules = dict(load_ltx2_dit(combined, weight_dtype="fp8_e4m3fn").model.named_modules())
    for name in dit_linears():
        assert isinstance(modules[name], FP8Linear) == (not ltx2_fp8_keep_high_precision(name)), name


# ------------------------------------------------------------------------------------------------- text encoder


def test_text_encoder_of_the_tiny_default_model_from_the_combined_file(combined, tensors, tiny_gemma, reads,
                                                                       tokenizer_folders):
    """The node's call: a Gemma that fits the projection loads whatever its size, and encodes."""
    encoder = load_ltx2_text_encoder(tiny_gemma["folder"], combined, dtype=torch.float32)
    assert tokenizer_folders == [tiny_gemma["folder"]]
    assert isinstance(encoder, LTX2TextEncoder)
    text_side = select(tensors, "text_embedding_projection.", *CONNECTORS)
    assert {name for source, name in reads if source == str(combined)} == set(text_side)
    assert_state_equal(encoder.projection.official_state_dict(), {k: v.float() for k, v in text_side.items()})
    video, audio = encoder.encode(PROMPTS)
    assert video.shape == (2, 1024, TINY.caption_channels) and audio.shape == video.shape
    assert not torch.equal(video, audio)  # two connectors with their own weights


def test_text_encoder_from_the_split_connector_file(tmp_path, tensors, metadata, tiny_gemma, tokenizer_folders):
    text_side = select(tensors, "text_embedding_projection.", *CONNECTORS)
    assert len(text_side) == 59
    split = save(tmp_path / "ltx-2-19b-embeddings_connector_dev_bf16.safetensors", text_side, metadata)
    encoder = load_ltx2_text_encoder(tiny_gemma["folder"], split, dtype=torch.float32)
    assert_state_equal(encoder.projection.official_state_dict(), {k: v.float() for k, v in text_side.items()})
    assert tokenizer_folders == [tiny_gemma["folder"]]


def test_text_encoder_tokenizer_sources(tmp_path, combined, tiny_gemma, gemma_tokenizer_dir, tokenizer_folders):
    single = tiny_gemma["file"]
    with pytest.raises(CheckpointError, match="tokenizer="):
        load_ltx2_text_encoder(single, combined)
    from_file = load_ltx2_text_encoder(single, combined, tokenizer=gemma_tokenizer_dir, dtype=torch.float32)
    reference = load_gemma_text_model(tiny_gemma["folder"], dtype=torch.float32, expect_12b=False)
    assert_state_equal(from_file.gemma.state_dict(), reference.state_dict())
    beside = tmp_path / "beside"
    beside.mkdir()
    shutil.copy(single, beside / single.name)
    for f in gemma_tokenizer_dir.iterdir():
        shutil.copy(f, beside / f.name)
    load_ltx2_text_encoder(beside / single.name, combined, tokenizer=tmp_path / "unused")
    # A diffusers snapshot: the Gemma in text_encoder/, its tokenizer in tokenizer/.
    snapshot = tmp_path / "snapshot"
    shutil.copytree(tiny_gemma["folder"], snapshot / "text_encoder",
                    ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    shutil.copytree(gemma_tokenizer_dir, snapshot / "tokenizer")
    (snapshot / "model_index.json").write_text(json.dumps({"_class_name": "LTX2Pipeline"}))
    load_ltx2_text_encoder(snapshot, combined)
    assert tokenizer_folders == [gemma_tokenizer_dir, beside, snapshot / "tokenizer"]


def _sentencepiece_model() -> bytes:
    """A tiny SentencePiece BPE model with Gemma's special ids (pad 0, eos 1, bos 2, unk 3), ``<start_of_turn>`` and
    Gemma's settings (no dummy prefix, identity normalisation, byte fallback, split digits)."""
    spm = pytest.importorskip("sentencepiece")
    import io

    out = io.BytesIO()
    text = ["a red fox jumps over a frozen stream", "rain falls on the old roof", "the ice cracks at dawn"] * 20
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=out, vocab_size=320, hard_vocab_limit=False, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], add_dummy_prefix=False,
        normalization_rule_name="identity", byte_fallback=True, split_digits=True, remove_extra_whitespaces=False,
        minloglevel=2)
    return out.getvalue()


def _gemma_with_spiece(folder: Path, single: Path) -> Path:
    """ComfyUI's single-file layout with the SentencePiece model stored as a uint8 tensor (spiece_model)."""
    data = _sentencepiece_model()
    tensors = open_checkpoint(single).read()
    tensors["spiece_model"] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    folder.mkdir()
    return save(folder / "gemma_3_12B_it.safetensors", tensors)


def test_embedded_sentencepiece_tokenizer(tmp_path, combined, tiny_gemma):
    pytest.importorskip("google.protobuf")
    path = _gemma_with_spiece(tmp_path / "te", tiny_gemma["file"])
    import sentencepiece

    spm = sentencepiece.SentencePieceProcessor(model_proto=_sentencepiece_model())
    encoder = load_ltx2_text_encoder(path, combined, dtype=torch.float32)
    for text in ("the red fox", "a  red fox jumps 1234 €", " rain."):
        assert encoder.tokenizer(text)["input_ids"] == [2, *spm.encode(text)]


def test_embedded_sentencepiece_without_protobuf_says_what_to_do(tmp_path, combined, tiny_gemma, monkeypatch):
    path = _gemma_with_spiece(tmp_path / "te", tiny_gemma["file"])
    monkeypatch.setattr(loader, "_installed", lambda module: module != "google.protobuf")
    with pytest.raises(CheckpointError, match=r"spiece_model.*pip install protobuf.*Hugging Face folder"):
        load_ltx2_text_encoder(path, combined)


def test_gemma_that_does_not_fit_the_projection_is_refused_before_loading(tmp_path, combined, tiny_gemma, reads):
    # A 19B-sized projection (header only: the check must not read it) and the tiny Gemma 3 (hidden 24, 6 layers).
    ltx = sparse_safetensors(tmp_path / "ltx-2-19b-dev.safetensors", {
        "text_embedding_projection.aggregate_embed.weight": ("BF16", (3840, GEMMA3_12B_FEATURES)),
        "model.diffusion_model.video_embeddings_connector.learnable_registers": ("BF16", (128, 3840))})
    with pytest.raises(CheckpointError) as e:
        load_ltx2_text_encoder(tiny_gemma["folder"], ltx)
    message = str(e.value)
    for part in ("Gemma 3 12B (hidden size 3840, 48 layers → 188160 features", "hidden size 24, 6 layers"):
        assert part in message
    # A Gemma 3 4B single file (header only) against the tiny projection: named, with the width it needs.
    four_b = {"model.embed_tokens.weight": ("BF16", (262208, 2560))}
    four_b.update({f"model.layers.{i}.input_layernorm.weight": ("BF16", (2560,)) for i in range(34)})
    gemma = sparse_safetensors(tmp_path / "gemma_3_4b_it.safetensors", four_b)
    with pytest.raises(CheckpointError, match=r"Gemma 3 4B \(hidden size 2560, 34 layers → 89600 .* is 168"):
        load_ltx2_text_encoder(gemma, combined)
    assert reads == []


def test_text_encoder_wants_the_projection_file(tmp_path, combined, tensors, tiny_gemma, metadata):
    dit_only = save(tmp_path / "ltx2_dit.safetensors", select(tensors, DIT_PREFIX), metadata)
    with pytest.raises(CheckpointError, match=r"text projection \(text_embedding_projection\.\*\) is missing: it "
                                              r"holds the text connectors .* the DiT"):
        load_ltx2_text_encoder(tiny_gemma["folder"], dit_only)
    with pytest.raises(CheckpointError, match="Gemma"):
        load_ltx2_text_encoder(tiny_gemma["folder"], tiny_gemma["file"])  # Gemma given as the LTX-2 file
    with pytest.raises(CheckpointError, match="Gemma 3 text model"):
        load_ltx2_text_encoder(combined, combined)  # LTX-2 file given as the Gemma


# -------------------------------------------------------------------------------------------------- bad files


@pytest.fixture(scope="module")
def k5_dit(files) -> Path:
    return write_tiny_dit(files / "kandinsky5lite_t2v.safetensors")


def test_kandinsky5_file_in_the_ltx2_loaders_and_the_reverse(k5_dit, combined, tiny_gemma):
    with pytest.raises(NotLTX2CheckpointError, match="Kandinsky 5"):
        load_ltx2_dit(k5_dit)
    with pytest.raises(CheckpointError, match="Kandinsky 5"):
        load_ltx2_vae(k5_dit)
    with pytest.raises(CheckpointError, match="Kandinsky 5"):
        load_ltx2_text_encoder(tiny_gemma["folder"], k5_dit)
    with pytest.raises(CheckpointError, match="LTX-2"):
        load_k5_dit(combined)


def test_part_files_in_the_wrong_loader_say_what_they_hold(tmp_path, tensors, metadata):
    vae_only = save(tmp_path / "ltx2_vae.safetensors", select(tensors, "vae."), metadata)
    with pytest.raises(NotLTX2CheckpointError, match=r"no LTX-2 DiT: it holds the video VAE \(vae\.\*: 63 tensors\)"):
        load_ltx2_dit(vae_only)
    dit_only = save(tmp_path / "ltx2_dit.safetensors", select(tensors, DIT_PREFIX, exclude=CONNECTORS), metadata)
    with pytest.raises(CheckpointError, match=r"no LTX-2 video VAE in this file: it holds the DiT"):
        load_ltx2_vae(dit_only)
    with pytest.raises(CheckpointError, match=r"the audio VAE \(audio_vae\.\*\) and the vocoder \(vocoder\.\*\) "
                                              r"are missing: it holds the video VAE"):
        load_ltx2_vae(vae_only, vae_only)


def _nvfp4(tensors: dict) -> dict:
    """Block 1's to_q in the NVFP4 layout: packed uint8 codes, fp8 block scales, weight_scale_2, input_scale."""
    key = DIT_PREFIX + "transformer_blocks.1.attn1.to_q"
    out_features, in_features = tensors[key + ".weight"].shape
    return {**tensors, key + ".weight": torch.zeros(out_features, in_features // 2, dtype=torch.uint8),
            key + ".weight_scale": torch.ones(out_features, in_features // 16).to(torch.float8_e4m3fn),
            key + ".weight_scale_2": torch.tensor(1.0), key + ".input_scale": torch.tensor(1.0)}


BAD_RELEASES = {
    "nvfp4": (lambda t, m: (_nvfp4(t), m), "NVFP4"),
    "model_version_2.3": (lambda t, m: (t, {**m, "model_version": "2.3.0"}), "LTX-2.3"),
    "gated_attention": (lambda t, m: ({**t, DIT_PREFIX + "transformer_blocks.0.attn1.to_gate_logits.weight":
                                       torch.zeros(2, 32)}, m), "LTX-2.3"),
}


@pytest.mark.parametrize("kind", list(BAD_RELEASES))
def test_nvfp4_and_newer_releases_are_refused_by_every_loader(tmp_path, tensors, metadata, tiny_gemma, kind):
    change, what = BAD_RELEASES[kind]
    path = save(tmp_path / "ltx-2-19b-dev-fp4.safetensors", *change(tensors, metadata))
    for load in (load_ltx2_dit, load_ltx2_vae, lambda p: load_ltx2_text_encoder(tiny_gemma["folder"], p)):
        with pytest.raises(UnsupportedLTX2Error, match=what):
            load(path)


def test_truncated_file(tmp_path, combined, tiny_gemma):
    cut = tmp_path / "ltx-2-19b-dev.safetensors"
    data = combined.read_bytes()
    cut.write_bytes(data[: len(data) - 1000])
    for load in (load_ltx2_dit, load_ltx2_vae, lambda p: load_ltx2_text_encoder(tiny_gemma["folder"], p)):
        with pytest.raises(CheckpointError, match="truncated"):
            load(cut)
    with pytest.raises(CheckpointError, match="not found"):
        load_ltx2_dit(tmp_path / "missing.safetensors")


def test_tiny_default_sound_follows_the_audio_latent(combined):
    """The embedded tiny model must make audio bugs visible: its waveform has to depend on the latent it decodes."""
    from cinetune.ltx2.audio import decode_audio

    vaes = load_ltx2_vae(combined, combined)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 8, 9, 16, generator=g), torch.randn(1, 8, 9, 16, generator=g)
    with torch.no_grad():
        wave_a, rate = decode_audio(a, vaes.audio, vaes.vocoder)
        wave_b, _ = decode_audio(b, vaes.audio, vaes.vocoder)
    assert rate == 24000 and wave_a.shape == (1, 2, (4 * 9 - 3) * 240)
    assert (wave_a - wave_b).abs().mean() > 0.1 * wave_a.std()

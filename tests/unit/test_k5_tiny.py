"""Tiny model writers: deterministic, small, in the published layouts, loadable by the loaders and by the
reference libraries."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cinetune.k5.text import load_clip_text_model, load_qwen_text_model
from cinetune.k5.tiny import (
    TINY_CLIP_HIDDEN,
    TINY_QWEN_HIDDEN,
    tiny_vae_config,
    write_tiny_clip,
    write_tiny_qwen,
    write_tiny_vae,
)
from cinetune.k5.vae import load_k5_vae

MB = 1024 * 1024


def _tensors(path):
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory, qwen_tokenizer_dir, clip_tokenizer_dir):
    """Each model written with seed 0 twice and with seed 1 once."""
    root = tmp_path_factory.mktemp("tiny")
    writers = {
        "qwen": lambda p, s: write_tiny_qwen(p, qwen_tokenizer_dir, seed=s),
        "clip": lambda p, s: write_tiny_clip(p, clip_tokenizer_dir, seed=s),
        "vae": lambda p, s: write_tiny_vae(p.with_suffix(".safetensors"), seed=s),
    }
    return {name: [w(root / f"{name}_{i}", seed) for i, seed in enumerate((0, 0, 1))] for name, w in writers.items()}


@pytest.mark.parametrize("name", ["qwen", "clip", "vae"])
def test_same_seed_same_tensors_other_seed_different(written, name):
    a, b, c = (_tensors(p) for p in written[name])
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("name", ["qwen", "clip", "vae"])
def test_files_are_small(written, name):
    path = written[name][0]
    files = [f for f in path.iterdir() if f.is_file()] if path.is_dir() else [path]
    assert all(f.stat().st_size < 20 * MB for f in files), {f.name: f.stat().st_size for f in files}


def test_tiny_qwen_has_the_published_layout(written, qwen_tokenizer_dir):
    from transformers import AutoConfig, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    folder = written["qwen"][0]
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    names = set(_tensors(folder))
    assert set(index) == names
    assert "model.embed_tokens.weight" in names and "model.norm.weight" in names
    assert any(n.startswith("visual.blocks.0.") for n in names) and any(n.startswith("visual.merger.") for n in names)
    assert not any(n.startswith(("lm_head.", "model.language_model.", "model.visual.")) for n in names)
    assert all(t.dtype == torch.bfloat16 for t in _tensors(folder).values())

    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "qwen2_5_vl" and config.text_config.hidden_size == TINY_QWEN_HIDDEN
    tok = AutoTokenizer.from_pretrained(folder)
    assert len(tok) == len(AutoTokenizer.from_pretrained(qwen_tokenizer_dir)) == config.text_config.vocab_size
    _, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]

    model = load_qwen_text_model(folder, dtype=torch.float32)
    ref = _tensors(folder)["model.layers.1.self_attn.k_proj.bias"].float()
    assert torch.equal(model.layers[1].self_attn.k_proj.bias, ref)


def test_tiny_clip_has_the_published_layout(written):
    from transformers import CLIPTextModel

    folder = written["clip"][0]
    names = set(_tensors(folder))
    assert "text_model.embeddings.token_embedding.weight" in names
    assert all(n.startswith("text_model.") for n in names)
    assert {"vocab.json", "merges.txt"} <= {f.name for f in folder.iterdir()}
    _, info = CLIPTextModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    model = load_clip_text_model(folder, dtype=torch.float32)
    assert model.config.hidden_size == TINY_CLIP_HIDDEN


def test_tiny_vae_loads_in_diffusers_and_ours(written):
    from diffusers import AutoencoderKLHunyuanVideo

    path = written["vae"][0]
    reference = AutoencoderKLHunyuanVideo(**tiny_vae_config())
    reference.load_state_dict(load_file(path), strict=True)
    vae = load_k5_vae(path)
    assert vae.encode(torch.zeros(1, 3, 9, 16, 16)).shape == (1, 16, 3, 2, 2)


def test_rewriting_a_folder_replaces_it_without_leftovers(tmp_path, clip_tokenizer_dir):
    folder = write_tiny_clip(tmp_path / "clip", clip_tokenizer_dir, seed=0)
    (folder / "stale.txt").write_text("from an older write")
    write_tiny_clip(folder, clip_tokenizer_dir, seed=1)
    assert not (folder / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip"]
    assert not torch.equal(_tensors(folder)["text_model.final_layer_norm.weight"],
                           _tensors(write_tiny_clip(tmp_path / "other", clip_tokenizer_dir, seed=0))
                           ["text_model.final_layer_norm.weight"])

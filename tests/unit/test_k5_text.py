"""Kandinsky 5 text encoding: official templates and crops with the real Qwen tokenizer, real CLIP tokenization,
and the encoder on tiny models in the published layouts, checked against direct transformers calls."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from cinetune.core.checkpoint import CheckpointError, save_file_atomic
from cinetune.k5.text import (
    CLIP_L_TEXT_CONFIG,
    CROP_START,
    MAX_PROMPT_TOKENS,
    QWEN25_VL_7B_TEXT_CONFIG,
    TEMPLATES,
    clip_text_config_from_shapes,
    load_clip_text_model,
    load_clip_tokenizer,
    load_k5_text_encoder,
    load_qwen_text_model,
    load_qwen_tokenizer,
    qwen_prompt_ids,
    qwen_text_config_from_shapes,
)
from cinetune.k5.tiny import TINY_QWEN_HIDDEN, write_tiny_clip, write_tiny_qwen, write_tiny_vae

PROMPTS = [
    "A red fox jumps over a frozen stream at dawn while the camera slowly pans to the left.",
    "Rain.",
]
IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def qwen_tok(qwen_tokenizer_dir):
    return load_qwen_tokenizer(qwen_tokenizer_dir)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, qwen_tokenizer_dir, clip_tokenizer_dir):
    root = tmp_path_factory.mktemp("text_encoders")
    return write_tiny_qwen(root / "qwen", qwen_tokenizer_dir), write_tiny_clip(root / "clip", clip_tokenizer_dir)


@pytest.fixture(scope="module")
def encoder(tiny_dirs):
    return load_k5_text_encoder(*tiny_dirs, dtype=torch.float32)


def _prompt_tokens(tok, prompt):
    return tok(prompt, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------------------------
# Templates and crops with the real Qwen2.5 tokenizer


def test_templates_keep_the_official_typos():
    for name in TEMPLATES:
        assert "You are a promt engineer." in TEMPLATES[name]
        assert TEMPLATES[name].count("{}") == 1
    assert "scren content" in TEMPLATES["video"] and "scren content" in TEMPLATES["image2video"]


@pytest.mark.parametrize("name, official", [("video", 129), ("image2video", 132), ("image", 41)])
def test_crop_equals_official_crop_start(qwen_tok, name, official):
    # 129 / 132 / 41 are the official crop_start values (kandinsky-5 text_embedders.py).
    _, crop = qwen_prompt_ids(qwen_tok, "a cat sleeps on a sofa", TEMPLATES[name])
    assert crop == official == CROP_START[name]


@pytest.mark.parametrize("prompt", [
    PROMPTS[0], "Rain.", "", " leading space", "trailing spaces  ", 'quotes "x" {braces} 日本語 😀 — ok',
])
def test_kept_tokens_are_the_prompt_tokens_and_im_end(qwen_tok, prompt):
    ids, crop = qwen_prompt_ids(qwen_tok, prompt, TEMPLATES["video"])
    assert ids[crop:] == _prompt_tokens(qwen_tok, prompt) + [qwen_tok.convert_tokens_to_ids(IM_END)]


def test_prompt_longer_than_256_tokens_keeps_256(qwen_tok):
    prompt = " ".join(f"scene{i} with a lighthouse" for i in range(150))
    assert len(_prompt_tokens(qwen_tok, prompt)) > MAX_PROMPT_TOKENS + 50
    ids, crop = qwen_prompt_ids(qwen_tok, prompt, TEMPLATES["video"])
    assert len(ids) - crop == MAX_PROMPT_TOKENS == 256
    assert ids[crop:] == _prompt_tokens(qwen_tok, prompt)[:256]


def _official_kept_ids(tok, prompt, name):
    """The official crop (kandinsky-5 text_embedders.py): the whole text tokenized with truncation at
    ``crop_start + 256`` tokens, then ``[crop_start:]`` at the fixed ``crop_start`` of the template."""
    crop_start = CROP_START[name]
    full = tok(TEMPLATES[name].format(prompt), add_special_tokens=False, truncation=True,
               max_length=crop_start + MAX_PROMPT_TOKENS)["input_ids"]
    return list(full[crop_start:])


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("prompt", [
    "a cat", "", "\n", "\n\n", "\na cat", "\n\na cat", " \na cat", "\t\na cat", "\r\na cat", "\r\n\r\na cat",
    "\ra cat", " a cat", "  a cat", "\ta cat", "\u3000a cat", "a cat\n", "\n" + " ".join(["lighthouse"] * 300),
])
def test_kept_tokens_equal_the_official_crop_for_every_prompt(qwen_tok, name, prompt):
    ids, crop = qwen_prompt_ids(qwen_tok, prompt, TEMPLATES[name])
    assert crop == CROP_START[name]
    assert ids[crop:] == _official_kept_ids(qwen_tok, prompt, name)


def test_a_leading_newline_merges_with_the_template_and_is_cut_as_officially(qwen_tok):
    im_end = qwen_tok.convert_tokens_to_ids(IM_END)
    for prompt in ("\na dog runs", " \na dog runs", "\n\na dog runs"):
        ids, crop = qwen_prompt_ids(qwen_tok, prompt, TEMPLATES["video"])
        leading = prompt[: len(prompt) - len(prompt.lstrip())]
        assert qwen_tok.decode(ids[crop - 1: crop]) == "\n" + leading  # one token: template newline + prompt's
        assert ids[crop:] == _prompt_tokens(qwen_tok, "a dog runs") + [im_end]
    ids, crop = qwen_prompt_ids(qwen_tok, "\r\na dog runs", TEMPLATES["video"])  # no merge: "\r\n" is kept
    assert ids[crop:] == _prompt_tokens(qwen_tok, "\r\na dog runs") + [im_end]


def test_crop_follows_an_edited_template(qwen_tok):
    fixed = TEMPLATES["video"].replace("promt", "prompt").replace("scren", "screen")
    ids, crop = qwen_prompt_ids(qwen_tok, "a dog runs", fixed)
    # k5.md §5: fixing both typos removes one token each.
    assert crop == CROP_START["video"] - 2
    assert ids[crop:] == _prompt_tokens(qwen_tok, "a dog runs") + [qwen_tok.convert_tokens_to_ids(IM_END)]


def test_template_without_placeholder_raises(qwen_tok):
    with pytest.raises(ValueError, match=r"\{\}"):
        qwen_prompt_ids(qwen_tok, "x", "<|im_start|>user\nno placeholder")
    with pytest.raises(ValueError, match=r"\{\}"):
        qwen_prompt_ids(qwen_tok, "x", "<|im_start|>user\n{}{}")


# ---------------------------------------------------------------------------------------------------------------
# CLIP tokenization


def _open_clip_tokenizer():
    """open_clip's SimpleTokenizer; ftfy (a text-repair library it imports) is stubbed with the identity when it
    is not installed: for the plain ASCII sentences used here ftfy.fix_text returns its input unchanged."""
    try:
        from open_clip.tokenizer import SimpleTokenizer
        return SimpleTokenizer()
    except ImportError as e:
        if "ftfy" not in str(e):
            pytest.skip(f"open_clip tokenizer cannot be imported: {e}")
    saved = sys.modules.get("ftfy")
    sys.modules["ftfy"] = types.SimpleNamespace(fix_text=lambda s: s)
    try:
        sys.modules.pop("open_clip.tokenizer", None)
        from open_clip.tokenizer import SimpleTokenizer
        return SimpleTokenizer()
    except ImportError as e:
        pytest.skip(f"open_clip tokenizer cannot be imported: {e}")
    finally:
        if saved is None:
            sys.modules.pop("ftfy", None)
        else:
            sys.modules["ftfy"] = saved


@pytest.mark.parametrize("sentence", [
    "A photo of a cat sitting on a windowsill.",
    "Two astronauts play chess on the Moon, cinematic lighting, 35mm film!",
])
def test_clip_ids_match_transformers_and_open_clip(clip_tokenizer_dir, sentence):
    from transformers import CLIPTokenizer

    ours = load_clip_tokenizer(clip_tokenizer_dir)(sentence)["input_ids"]
    hf_tok = CLIPTokenizer(str(clip_tokenizer_dir / "vocab.json"), str(clip_tokenizer_dir / "merges.txt"))
    hf = hf_tok(sentence)["input_ids"]
    assert ours == hf
    oc = _open_clip_tokenizer()
    assert ours == [49406] + oc.encode(sentence) + [49407]


# ---------------------------------------------------------------------------------------------------------------
# The encoder on tiny models


def test_encode_shapes_and_mask(encoder, qwen_tok):
    e = encoder.encode(PROMPTS)
    lengths = [len(_prompt_tokens(qwen_tok, p)) + 1 for p in PROMPTS]
    assert e.text.shape == (2, max(lengths), TINY_QWEN_HIDDEN)
    assert e.text.dtype == e.pooled.dtype == torch.float32 and e.text_mask.dtype == torch.bool
    assert e.text_mask.sum(1).tolist() == lengths
    assert e.pooled.shape == (2, encoder.clip.config.hidden_size)
    assert torch.all(e.text[1, lengths[1]:] == 0)
    assert not hasattr(encoder.qwen, "visual")  # the vision tower is never built


def test_encode_matches_direct_transformers_calls(encoder, tiny_dirs, qwen_tok):
    from transformers import CLIPTextModel, CLIPTokenizer, Qwen2_5_VLForConditionalGeneration

    qwen_dir, clip_dir = tiny_dirs
    full, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen_dir, dtype=torch.float32,
                                                                    output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    e = encoder.encode(PROMPTS)
    layers = full.model.language_model.layers
    for b, prompt in enumerate(PROMPTS):
        ids, crop = qwen_prompt_ids(qwen_tok, prompt, TEMPLATES["video"])
        pre_norm = {}

        def keep_output(module, args, output):
            pre_norm["x"] = output[0] if isinstance(output, tuple) else output

        hook = layers[-1].register_forward_hook(keep_output)
        with torch.no_grad():
            out = full(input_ids=torch.tensor([ids]), output_hidden_states=True)
            last = full.model(input_ids=torch.tensor([ids])).last_hidden_state
        hook.remove()
        # In this transformers version hidden_states[-1] is the output after the final RMSNorm.
        torch.testing.assert_close(out.hidden_states[-1], last, rtol=0, atol=0)
        torch.testing.assert_close(full.model.language_model.norm(pre_norm["x"]), last)
        assert (pre_norm["x"] - last).abs().max() > 1e-2
        n = len(ids) - crop
        torch.testing.assert_close(e.text[b, :n], out.hidden_states[-1][0, crop:], rtol=1e-5, atol=1e-5)

    clip = CLIPTextModel.from_pretrained(clip_dir, dtype=torch.float32)
    tok = CLIPTokenizer.from_pretrained(clip_dir)
    with torch.no_grad():
        ids = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        pooled = clip(**ids).pooler_output
    torch.testing.assert_close(e.pooled, pooled, rtol=1e-5, atol=1e-5)


def test_padding_does_not_change_valid_tokens(encoder):
    batch = encoder.encode(PROMPTS)
    for b, prompt in enumerate(PROMPTS):
        one = encoder.encode([prompt])
        n = int(one.text_mask.sum())
        torch.testing.assert_close(batch.text[b, :n], one.text[0, :n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batch.pooled[b], one.pooled[0], rtol=1e-5, atol=1e-5)


def test_long_prompt_is_cut_to_256_tokens(encoder):
    e = encoder.encode([" ".join(["a very long prompt"] * 200)])
    assert e.text.shape[1] == 256 and bool(e.text_mask.all())


def test_encode_rejects_bad_arguments(encoder):
    with pytest.raises(ValueError, match="template"):
        encoder.encode(["x"], template="movie")
    with pytest.raises(ValueError, match="list of strings"):
        encoder.encode("a single string")


# ---------------------------------------------------------------------------------------------------------------
# Single-file layouts (ComfyUI) and bad files


def _qwen_tensors(qwen_dir):
    out = {}
    for f in sorted(qwen_dir.glob("model-*.safetensors")):
        out.update(load_file(f))
    return out


def _comfy_style_qwen_tokenizer(qwen_tokenizer_dir, dest):
    """vocab.json + merges.txt + tokenizer_config.json (the layout of ComfyUI's qwen25_tokenizer folder)."""
    tj = json.loads((qwen_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    dest.mkdir()
    (dest / "vocab.json").write_text(json.dumps(tj["model"]["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    (dest / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    cfg = json.loads((qwen_tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["added_tokens_decoder"] = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in tj["added_tokens"]}
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return dest


@pytest.fixture(scope="module")
def single_files(tmp_path_factory, tiny_dirs, qwen_tokenizer_dir):
    qwen_dir, clip_dir = tiny_dirs
    root = tmp_path_factory.mktemp("single")
    qwen_file = save_file_atomic(_qwen_tensors(qwen_dir), root / "qwen_2.5_vl_tiny.safetensors",
                                 metadata={"config": json.dumps(_tiny_text_config(qwen_dir))})
    clip = load_file(clip_dir / "model.safetensors")
    clip["text_projection.weight"] = torch.randn(64, 64)  # present in ComfyUI's clip_l.safetensors, unused
    clip_file = save_file_atomic(clip, root / "clip_l_tiny.safetensors")
    tok = _comfy_style_qwen_tokenizer(qwen_tokenizer_dir, root / "qwen25_tokenizer")
    return qwen_file, clip_file, tok


def _tiny_text_config(qwen_dir):
    """The text part of the snapshot's config.json, as Cinetune stores it in a single file's metadata."""
    c = json.loads((qwen_dir / "config.json").read_text())
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings",
            "hidden_act")
    return {k: c[k] for k in keys}


def test_comfy_style_tokenizer_folder_gives_the_same_ids(single_files, qwen_tok):
    comfy_tok = load_qwen_tokenizer(single_files[2])
    for prompt in PROMPTS + ['unicode 日本語 😀 "quoted"']:
        text = TEMPLATES["video"].format(prompt)
        assert comfy_tok(text)["input_ids"] == qwen_tok(text)["input_ids"]


def test_single_file_layouts_give_identical_embeddings(encoder, tiny_dirs, single_files, clip_tokenizer_dir):
    qwen_file, clip_file, comfy_tok = single_files
    single = load_k5_text_encoder(qwen_file, clip_file, qwen_tokenizer=comfy_tok, clip_tokenizer=clip_tokenizer_dir,
                                  dtype=torch.float32)
    a, b = encoder.encode(PROMPTS), single.encode(PROMPTS)
    torch.testing.assert_close(a.text, b.text, rtol=0, atol=0)
    torch.testing.assert_close(a.pooled, b.pooled, rtol=0, atol=0)
    assert torch.equal(a.text_mask, b.text_mask)
    # A file inside the snapshot folder means the folder.
    shard = sorted(tiny_dirs[0].glob("model-*.safetensors"))[0]
    via_file = load_k5_text_encoder(shard, tiny_dirs[1] / "model.safetensors", dtype=torch.float32)
    torch.testing.assert_close(via_file.encode(PROMPTS).text, a.text, rtol=0, atol=0)


def test_folder_saved_by_current_transformers_loads(tmp_path, tiny_dirs):
    from transformers import Qwen2_5_VLForConditionalGeneration

    full = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dirs[0], dtype=torch.float32)
    full.save_pretrained(tmp_path / "resaved")  # tensor names as this transformers version writes them
    ref = load_qwen_text_model(tiny_dirs[0], dtype=torch.float32)
    got = load_qwen_text_model(tmp_path / "resaved", dtype=torch.float32)
    for (name, a), (_, b) in zip(ref.state_dict().items(), got.state_dict().items()):
        assert torch.equal(a, b), name


def test_folder_without_config_raises(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_qwen_text_model(tmp_path)


def test_prefixed_clip_single_file_loads(tmp_path, tiny_dirs):
    sd = load_file(tiny_dirs[1] / "model.safetensors")
    prefixed = {"text_encoders.clip_l.transformer." + k: v for k, v in sd.items()}
    f = save_file_atomic(prefixed, tmp_path / "c.safetensors")
    ref = load_clip_text_model(tiny_dirs[1], dtype=torch.float32)
    got = load_clip_text_model(f, dtype=torch.float32)
    ids = torch.tensor([[49406, 320, 2368, 49407] + [49407] * 73])
    with torch.no_grad():
        torch.testing.assert_close(got(input_ids=ids).pooler_output, ref(input_ids=ids).pooler_output, rtol=0, atol=0)


def _fp8_scaled(tensors, scale_suffix):
    """ComfyUI-style fp8 copy: every 2-D layer weight in float8_e4m3fn with a per-tensor float32 scale."""
    out, scales = {}, {}
    for k, w in tensors.items():
        if k.startswith("model.layers.") and w.ndim == 2:
            scale = w.float().abs().amax() / torch.finfo(torch.float8_e4m3fn).max
            out[k] = (w.float() / scale).to(torch.float8_e4m3fn)
            out[k[: -len(".weight")] + scale_suffix] = scales[k] = scale.reshape(())
        else:
            out[k] = w
    return out, scales


def _param_bytes(model):
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@pytest.mark.parametrize("layout", ["comfyui", "comfyui_mixed"])
def test_fp8_scaled_qwen_keeps_fp8_linear_layers(tmp_path, tiny_dirs, layout):
    """ComfyUI's qwen_2.5_vl_7b_fp8_scaled layouts: old (scaled_fp8 marker + .scale_weight) and new (.weight_scale
    + per-layer comfy_quant). The layers stay fp8 (FP8Linear, the DiT's class), so the model is about half the size;
    the result equals dequantising on load."""
    from cinetune.core.quant import FP8Linear

    suffix = ".scale_weight" if layout == "comfyui" else ".weight_scale"
    tensors, scales = _fp8_scaled(_qwen_tensors(tiny_dirs[0]), suffix)
    if layout == "comfyui":
        tensors["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    else:
        conf = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
        tensors.update({k[: -len(".weight")] + ".comfy_quant": conf for k in scales})
        tensors.update({k[: -len(".weight")] + ".input_scale": torch.tensor(1.0) for k in scales})
    f = save_file_atomic(tensors, tmp_path / "qwen_fp8_scaled.safetensors",
                         metadata={"config": json.dumps(_tiny_text_config(tiny_dirs[0]))})
    model = load_qwen_text_model(f, dtype=torch.float32)
    fp8 = {n: m for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    assert len(fp8) == len(scales) == 7 * len(model.layers)  # q, k, v, o, gate, up, down per layer
    layer = model.layers[1].mlp.down_proj
    name = "model.layers.1.mlp.down_proj.weight"
    assert layer.weight.dtype == torch.float8_e4m3fn and torch.equal(layer.weight.view(torch.uint8),
                                                                      tensors[name].view(torch.uint8))
    assert torch.equal(layer.scale_weight, scales[name])
    assert torch.equal(layer.dequantized_weight(torch.float32), tensors[name].float() * scales[name])
    assert not any(k.endswith(("input_scale", "comfy_quant", "weight_scale")) for k in model.state_dict())
    bf16_file = load_qwen_text_model(tiny_dirs[0], dtype=torch.bfloat16)
    fp8_bf16 = load_qwen_text_model(f, dtype=torch.bfloat16)
    linear_bytes = sum(m.weight.numel() for m in fp8.values())
    assert _param_bytes(bf16_file) - _param_bytes(fp8_bf16) == linear_bytes - 4 * len(fp8)  # 2 → 1 byte + a scale

    ids = torch.tensor([[151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645]])

    def hidden(m):
        with torch.no_grad():
            return m(input_ids=ids, use_cache=False).last_hidden_state

    got = hidden(model)
    ref = hidden(load_qwen_text_model(tiny_dirs[0], dtype=torch.float32))
    assert 0 < ((got - ref).norm() / ref.norm()).item() < 0.25  # e4m3 keeps 3 mantissa bits: a few % per weight
    dequantised = {k: (v.float() * scales[k] if k in scales else v) for k, v in tensors.items()
                   if not k.endswith(("scaled_fp8", suffix, "comfy_quant", "input_scale"))}
    g = save_file_atomic(dequantised, tmp_path / "dequantised.safetensors",
                         metadata={"config": json.dumps(_tiny_text_config(tiny_dirs[0]))})
    torch.testing.assert_close(got, hidden(load_qwen_text_model(g, dtype=torch.float32)), rtol=1e-6, atol=1e-6)


def test_fp8_clip_keeps_fp8_linear_layers(tmp_path, tiny_dirs):
    from cinetune.core.quant import FP8Linear

    sd = load_file(tiny_dirs[1] / "model.safetensors")
    plain = {k: v.to(torch.float8_e4m3fn) if ".layers." in k and v.ndim == 2 else v for k, v in sd.items()}
    f = save_file_atomic(plain, tmp_path / "clip_fp8.safetensors")  # a plain cast: scale 1
    got = load_clip_text_model(f, dtype=torch.float32)
    fp8 = [m for m in got.modules() if isinstance(m, FP8Linear)]
    assert fp8 and len(fp8) == sum(1 for k, v in plain.items() if v.dtype == torch.float8_e4m3fn)
    ref = load_clip_text_model(save_file_atomic({k: v.float() for k, v in plain.items()}, tmp_path / "c32.safetensors"),
                               dtype=torch.float32)
    ids = torch.tensor([[49406, 320, 2368, 49407] + [49407] * 73])
    with torch.no_grad():
        torch.testing.assert_close(got(input_ids=ids).pooler_output, ref(input_ids=ids).pooler_output, rtol=0, atol=0)


def test_nvfp4_text_encoder_is_refused(tmp_path, tiny_dirs):
    tensors = _qwen_tensors(tiny_dirs[0])
    name = "model.layers.0.mlp.down_proj"
    out, inp = tensors[name + ".weight"].shape
    tensors[name + ".weight"] = torch.zeros(out, inp // 2, dtype=torch.uint8)  # two fp4 codes per byte
    tensors[name + ".weight_scale"] = torch.ones(out, inp // 16).to(torch.float8_e4m3fn)
    tensors[name + ".weight_scale_2"] = torch.tensor(1.0)
    tensors[name + ".comfy_quant"] = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
    f = save_file_atomic(tensors, tmp_path / "qwen_nvfp4.safetensors",
                         metadata={"config": json.dumps(_tiny_text_config(tiny_dirs[0]))})
    with pytest.raises(CheckpointError, match=r"layers\.0\.mlp\.down_proj \(nvfp4\).*use the fp8 or bf16 version"):
        load_qwen_text_model(f)


def test_single_file_without_tokenizer_names_the_argument(single_files, tiny_dirs):
    with pytest.raises(CheckpointError, match="qwen_tokenizer"):
        load_k5_text_encoder(single_files[0], tiny_dirs[1])
    with pytest.raises(CheckpointError, match="clip_tokenizer"):
        load_k5_text_encoder(tiny_dirs[0], single_files[1])


def test_wrong_files_say_what_they_look_like(tmp_path, single_files, tiny_dirs):
    with pytest.raises(CheckpointError, match="CLIP text encoder.*not Qwen"):
        load_qwen_text_model(single_files[1])
    with pytest.raises(CheckpointError, match="Qwen2/Qwen2.5 language model.*not a CLIP"):
        load_clip_text_model(single_files[0])
    vae = write_tiny_vae(tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match="3D video VAE"):
        load_clip_text_model(vae)
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(single_files[1].read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_clip_text_model(truncated)
    with pytest.raises(CheckpointError, match="not found"):
        load_qwen_text_model(tmp_path / "missing.safetensors")


def test_real_model_configs_from_published_shapes():
    from transformers import CLIPTextConfig, CLIPTextModel, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    # Qwen2.5-VL-7B language model shapes (vocab 152064, hidden 3584, 28 layers, GQA 4×128 kv, MLP 18944).
    shapes = {"embed_tokens.weight": (152064, 3584), "norm.weight": (3584,)}
    for i in range(28):
        shapes |= {f"layers.{i}.self_attn.q_proj.weight": (3584, 3584),
                   f"layers.{i}.self_attn.k_proj.weight": (512, 3584), f"layers.{i}.self_attn.k_proj.bias": (512,),
                   f"layers.{i}.mlp.gate_proj.weight": (18944, 3584)}
    cfg = qwen_text_config_from_shapes(shapes)
    assert cfg == QWEN25_VL_7B_TEXT_CONFIG
    with torch.device("meta"):
        q = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(**cfg))
    non_embedding = sum(p.numel() for p in q.parameters()) - q.embed_tokens.weight.numel()
    assert round(non_embedding / 1e9, 2) == 6.53  # Qwen2.5-7B model card: 6.53B non-embedding parameters

    clip_shapes = {"embeddings.token_embedding.weight": (49408, 768), "embeddings.position_embedding.weight": (77, 768)}
    clip_shapes |= {f"encoder.layers.{i}.mlp.fc1.weight": (3072, 768) for i in range(12)}
    ccfg = clip_text_config_from_shapes(clip_shapes)
    assert ccfg == CLIP_L_TEXT_CONFIG
    with torch.device("meta"):
        c = CLIPTextModel(CLIPTextConfig(**ccfg))
    assert round(sum(p.numel() for p in c.parameters()) / 1e6) == 123  # CLIP-L text tower ≈ 123M (k5.md §10)


def test_qwen_config_for_unknown_head_count_raises():
    shapes = {"embed_tokens.weight": (1000, 96), "layers.0.mlp.gate_proj.weight": (192, 96),
              "layers.0.self_attn.k_proj.weight": (48, 96)}
    with pytest.raises(CheckpointError, match="Hugging Face folder"):
        qwen_text_config_from_shapes(shapes)

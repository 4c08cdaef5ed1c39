"""LTX-2 text side: real Gemma 3 tokenization, the V1 feature extractor against a per-sample reference, the text
projection and connectors against diffusers' ``LTX2TextConnectors`` with identical weights, and a tiny Gemma 3 in the
published layouts (Hugging Face folder, ComfyUI single file, fp8 scaled) loaded and encoded end to end."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from cinetune.core.checkpoint import CheckpointError, save_file_atomic
from cinetune.core.quant import FP8Linear, quantize_fp8
from cinetune.ltx2.connectors import (
    LTX2TextProjection,
    official_key,
    replace_padding_with_registers,
    text_projection_config,
    tiny_config,
)
from cinetune.ltx2.text import (
    DEFAULT_NEGATIVE_PROMPT,
    GEMMA3_12B_TEXT_CONFIG,
    MAX_LENGTH,
    TINY_FEATURE_DIM,
    TINY_GEMMA_HIDDEN,
    LTX2TextEncoder,
    encode_prompts,
    gemma_hidden_states,
    gemma_text_config_from_shapes,
    load_gemma_text_model,
    load_gemma_tokenizer,
    load_text_projection,
    normalize_hidden_states,
    tokenize_prompts,
    write_tiny_gemma,
)

PROMPTS = ["  A red fox jumps over a frozen stream at dawn; the ice cracks with a sharp snap.\n", "Rain."]
BOS, EOS, END_OF_TURN, PAD = 2, 1, 106, 0


@pytest.fixture(scope="module")
def gemma_tokenizer_dir(test_data):
    return test_data["gemma3_tokenizer"]


@pytest.fixture(scope="module")
def tok(gemma_tokenizer_dir):
    return load_gemma_tokenizer(gemma_tokenizer_dir)


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory, gemma_tokenizer_dir):
    root = tmp_path_factory.mktemp("gemma")
    return (write_tiny_gemma(root / "gemma-3-tiny-it", gemma_tokenizer_dir, seed=3),
            write_tiny_gemma(root / "gemma_3_tiny_it.safetensors", gemma_tokenizer_dir, seed=3))


def _random_projection(seed: int = 0, feature_dim: int = TINY_FEATURE_DIM, **fields) -> LTX2TextProjection:
    torch.manual_seed(seed)
    proj = LTX2TextProjection.from_metadata({**tiny_config(), **fields}, feature_dim=feature_dim).eval()
    with torch.no_grad():
        for name, p in proj.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)  # non-trivial q/k norm weights
            elif name.endswith("bias"):
                p.normal_(0, 0.05)
    return proj


@pytest.fixture(scope="module")
def ltx2_file(tmp_path_factory):
    """A file holding the text projection under the official combined-checkpoint keys, with metadata config."""
    path = tmp_path_factory.mktemp("ltx2") / "ltx-2-tiny.safetensors"
    sd = _random_projection().official_state_dict()
    sd["model.diffusion_model.patchify_proj.weight"] = torch.zeros(8, 8)  # a DiT tensor the text side ignores
    return save_file_atomic(sd, path, metadata={"config": json.dumps({"transformer": tiny_config()})})


@pytest.fixture(scope="module")
def hf_gemma(tiny_gemma):
    """The tiny folder loaded by transformers itself, as the full Gemma3ForConditionalGeneration."""
    from transformers import Gemma3ForConditionalGeneration

    full, info = Gemma3ForConditionalGeneration.from_pretrained(tiny_gemma[0], dtype=torch.float32,
                                                                output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    return full.eval()


@pytest.fixture(scope="module")
def encoder(tiny_gemma, ltx2_file, tok):
    gemma = load_gemma_text_model(tiny_gemma[0], dtype=torch.float32, expect_12b=False)
    return LTX2TextEncoder(gemma, tok, load_text_projection(ltx2_file, dtype=torch.float32))


def _diffusers_connectors(proj: LTX2TextProjection, num_states: int):
    """diffusers' LTX-2 text connectors (feature extractor + text_proj_in + both connectors) with our weights,
    keys converted as diffusers' scripts/convert_ltx2_to_diffusers.py does (ltx2.md §10)."""
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors

    c = proj.config
    per = dict(num_attention_heads=c.heads, attention_head_dim=c.head_dim, num_layers=c.num_layers,
               num_learnable_registers=c.num_registers)
    ref = LTX2TextConnectors(caption_channels=c.dim, text_proj_in_factor=num_states,
                             **{f"{m}_connector_{k}": v for m in ("video", "audio") for k, v in per.items()},
                             connector_rope_base_seq_len=c.max_pos, rope_theta=c.theta, rope_double_precision=True,
                             rope_type="split" if c.split_rope else "interleaved").eval()

    def convert(k: str) -> str:
        k = k.replace("text_embedding_projection.aggregate_embed", "text_proj_in")
        k = k.replace("_embeddings_connector.", "_connector.").replace("transformer_1d_blocks", "transformer_blocks")
        return k.replace("attn1.q_norm", "attn1.norm_q").replace("attn1.k_norm", "attn1.norm_k")

    ref.load_state_dict({convert(k): v for k, v in proj.state_dict().items()}, strict=True)
    return ref


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------------------------------------------
# Tokenization with the real Gemma 3 tokenizer


def test_tokens_are_bos_prompt_left_padded_without_eos(tok):
    ids, mask = tokenize_prompts(tok, PROMPTS)
    assert ids.shape == mask.shape == (2, MAX_LENGTH) == (2, 1024) and mask.dtype == torch.bool
    for b, prompt in enumerate(PROMPTS):
        body = tok(prompt.strip(), add_special_tokens=False)["input_ids"]
        n = len(body) + 1
        assert mask[b].sum() == n and not mask[b, : MAX_LENGTH - n].any()  # padding on the left
        assert ids[b, : MAX_LENGTH - n].eq(PAD).all()
        assert ids[b, MAX_LENGTH - n:].tolist() == [BOS] + body
        assert EOS not in ids[b, MAX_LENGTH - n:].tolist() and END_OF_TURN not in ids[b].tolist()
    # strip(): surrounding whitespace does not change the tokens, inner whitespace does
    assert torch.equal(tokenize_prompts(tok, ["\t a cat \n"])[0], tokenize_prompts(tok, ["a cat"])[0])
    assert not torch.equal(tokenize_prompts(tok, ["a  cat"])[0], tokenize_prompts(tok, ["a cat"])[0])


def test_long_prompt_is_truncated_to_1024_tokens(tok):
    prompt = " ".join(f"lighthouse{i} keeper" for i in range(600))
    body = tok(prompt, add_special_tokens=False)["input_ids"]
    assert len(body) > 1100
    ids, mask = tokenize_prompts(tok, [prompt])
    assert mask.all() and ids[0].tolist() == [BOS] + body[:1023]


def test_default_negative_prompt_fits_without_truncation(tok):
    _, mask = tokenize_prompts(tok, [DEFAULT_NEGATIVE_PROMPT])
    assert 100 < int(mask.sum()) < MAX_LENGTH


def test_tokenizer_checks(tmp_path, test_data):
    with pytest.raises(CheckpointError, match="not a Gemma 3 tokenizer"):
        load_gemma_tokenizer(test_data["qwen_tokenizer"])
    with pytest.raises(CheckpointError, match="no Gemma 3 tokenizer"):
        load_gemma_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="list of strings"):
        tokenize_prompts(None, "one string")


# ---------------------------------------------------------------------------------------------------------------
# Feature extractor V1


def _reference_features(states: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Straight from the definition, one sample and one hidden state at a time, in float64."""
    B, T, D = states[0].shape
    out = torch.zeros(B, T, D, len(states), dtype=torch.float64)
    for b in range(B):
        for layer, h in enumerate(states):
            valid = h[b][mask[b]].double()  # [n, D]
            mean = valid.sum() / (valid.numel() + 1e-6)
            normed = 8 * (valid - mean) / (valid.max() - valid.min() + 1e-6)
            out[b, mask[b], :, layer] = normed
    return out.reshape(B, T, D * len(states))  # index d·L + l


def test_feature_extractor_matches_reference():
    torch.manual_seed(0)
    B, T, D, L = 3, 24, 8, 5
    states = [torch.randn(B, T, D) * (1 + 3 * i) + i for i in range(L)]
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, -7:] = True
    mask[1, :] = True
    mask[2, -1:] = True
    for s in states:
        s[~mask] = 1e4  # padding must not leak into the statistics
    got = normalize_hidden_states(states, mask)
    assert got.dtype == torch.float32 and got.shape == (B, T, D * L)
    torch.testing.assert_close(got.double(), _reference_features(states, mask), rtol=1e-5, atol=1e-5)
    assert got[~mask].eq(0).all()
    # element (b, t, d·L + l) is hidden state l, channel d
    b, t, d, layer = 0, T - 3, 6, 2
    x = states[layer][0][mask[0]]
    expected = 8 * (states[layer][b, t, d] - x.mean()) / (x.max() - x.min() + 1e-6)
    torch.testing.assert_close(got[b, t, d * L + layer], expected, rtol=1e-5, atol=1e-6)
    assert normalize_hidden_states(states, mask, dtype=torch.bfloat16).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------------------
# Projection and connectors


@pytest.mark.parametrize("rope_type", ["split", "interleaved"])
def test_projection_matches_diffusers_connectors(rope_type):
    width = tiny_config()["caption_channels"]  # diffusers ties the Gemma width to the connector width
    proj = _random_projection(seed=1, feature_dim=width * 5, rope_type=rope_type)
    ref = _diffusers_connectors(proj, num_states=5)
    torch.manual_seed(1)
    states = torch.randn(3, MAX_LENGTH, width, 5) * torch.tensor([1.0, 4.0, 0.5, 9.0, 2.0])
    mask = torch.zeros(3, MAX_LENGTH, dtype=torch.bool)
    mask[0, -37:] = True
    mask[1, :] = True  # no padding at all
    mask[2, -1:] = True  # only <bos>
    with torch.no_grad():
        ref_video, ref_audio, ref_mask = ref(states, mask.long())
        features = proj.aggregate(normalize_hidden_states(list(states.unbind(-1)), mask))
        video, audio = proj.connect(features, mask)
    assert video.shape == audio.shape == (3, MAX_LENGTH, width) and video.dtype == torch.float32
    assert ref_mask.eq(1).all()
    assert _rel(video, ref_video) < 1e-5 and _rel(audio, ref_audio) < 1e-5
    assert _rel(video, audio) > 0.1  # the two connectors have their own weights


def test_register_replacement_moves_valid_tokens_first_and_tiles_registers():
    x = torch.arange(1, 7, dtype=torch.float32)[None, :, None].repeat(1, 1, 2)  # token i has value i+1
    mask = torch.tensor([[False, True, False, True, True, False]])
    registers = -torch.arange(1, 5, dtype=torch.float32)[:, None].repeat(1, 2)  # register r has value -(r+1)
    out = replace_padding_with_registers(x, mask, registers)
    # valid tokens 2, 4, 5 in order; positions 3, 4, 5 get registers 3 % 4, 4 % 4, 5 % 4
    assert out[0, :, 0].tolist() == [2, 4, 5, -4, -1, -2]


def test_19b_config_from_metadata_and_shapes():
    transformer = {"caption_channels": 3840, "connector_attention_head_dim": 128, "connector_num_attention_heads": 30,
                   "connector_num_layers": 2, "connector_num_learnable_registers": 128,
                   "connector_positional_embedding_max_pos": [4096], "rope_type": "split",
                   "frequencies_precision": "float64", "connector_norm_output": True}
    with torch.device("meta"):
        proj = LTX2TextProjection.from_metadata(transformer)
    shapes = {k: tuple(v.shape) for k, v in proj.official_state_dict().items()}
    # ltx2_state_dict_shapes.txt: 29 tensors per connector, 354,470,400 parameters each, aggregate_embed
    # [3840, 188160] without bias.
    for m in ("video", "audio"):
        prefix = f"model.diffusion_model.{m}_embeddings_connector."
        keys = {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}
        assert len(keys) == 29 and sum(torch.Size(s).numel() for s in keys.values()) == 354_470_400
        assert keys["learnable_registers"] == (128, 3840)
        assert keys["transformer_1d_blocks.1.attn1.to_out.0.weight"] == (3840, 3840)
        assert keys["transformer_1d_blocks.0.attn1.k_norm.weight"] == (3840,)
        assert keys["transformer_1d_blocks.1.ff.net.0.proj.weight"] == (15360, 3840)
        assert keys["transformer_1d_blocks.1.ff.net.2.bias"] == (3840,)
    assert shapes["text_embedding_projection.aggregate_embed.weight"] == (3840, 188160)
    assert len(shapes) == 59
    assert text_projection_config(transformer, shapes) == proj.config
    assert (proj.config.heads, proj.config.head_dim, proj.config.max_pos) == (30, 128, 4096)


def test_config_errors():
    shapes = {k: tuple(v.shape) for k, v in _random_projection().state_dict().items()}
    with pytest.raises(CheckpointError, match="does not belong"):
        text_projection_config({**tiny_config(), "connector_num_attention_heads": 8}, shapes)
    with pytest.raises(CheckpointError, match="LTX-2.3.*connector_apply_gated_attention"):
        text_projection_config({**tiny_config(), "connector_apply_gated_attention": True}, shapes)
    with pytest.raises(CheckpointError, match="rope_type"):
        text_projection_config({**tiny_config(), "rope_type": "spiral"}, shapes)
    missing = {k: v for k, v in shapes.items() if not k.startswith("audio_")}
    with pytest.raises(CheckpointError, match="audio_embeddings_connector"):
        text_projection_config(tiny_config(), missing)
    assert official_key("video_embeddings_connector.learnable_registers") == \
        "model.diffusion_model.video_embeddings_connector.learnable_registers"


def test_load_text_projection_from_checkpoint(ltx2_file):
    proj = load_text_projection(ltx2_file, dtype=torch.float32)
    ref = _random_projection()
    for (k, a), (k2, b) in zip(proj.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert not any(p.requires_grad for p in proj.parameters())
    bf16 = load_text_projection(ltx2_file)
    assert bf16.dtype == torch.bfloat16


def test_load_text_projection_refuses_other_files(tmp_path, tiny_gemma):
    with pytest.raises(CheckpointError, match="no LTX-2 text projection"):
        load_text_projection(tiny_gemma[1])
    partial = save_file_atomic({"text_embedding_projection.aggregate_embed.weight": torch.zeros(24, 168)},
                               tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match="video_embeddings_connector"):
        load_text_projection(partial)


# ---------------------------------------------------------------------------------------------------------------
# Gemma 3 loading


def test_folder_and_single_file_match_transformers(tiny_gemma, hf_gemma, tok):
    folder, single = tiny_gemma
    full = hf_gemma
    ours = load_gemma_text_model(folder, dtype=torch.float32, expect_12b=False)
    from_file = load_gemma_text_model(single, dtype=torch.float32, expect_12b=False)
    assert not hasattr(ours, "vision_tower")
    ids, mask = tokenize_prompts(tok, PROMPTS)
    pre_norm = {}
    hook = full.model.language_model.layers[-1].register_forward_hook(
        lambda m, a, out: pre_norm.update(x=out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        ref = full.model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)  # no lm_head
        a = gemma_hidden_states(ours, ids, mask)
        b = gemma_hidden_states(from_file, ids, mask)
    hook.remove()
    assert len(a) == len(b) == len(ref.hidden_states) == 7  # embedding output + 6 layers
    for x, y, z in zip(a, b, ref.hidden_states):
        assert torch.equal(x, y) and torch.equal(x, z)
    # the last hidden state is after the final RMSNorm
    norm = full.model.language_model.norm
    torch.testing.assert_close(a[-1][mask], norm(pre_norm["x"])[mask])
    assert (pre_norm["x"] - a[-1])[mask].abs().max() > 1e-2
    assert all(h[mask].isfinite().all() for h in a)


def _fp8_comfy_file(single, dest, legacy: bool):
    """The tiny single file as ComfyUI stores fp8 text encoders: per-tensor scaled float8_e4m3fn Linear weights."""
    sd = load_file(single)
    out, scales = {}, {}
    for k, w in sd.items():
        if k.startswith("model.layers.") and w.ndim == 2:
            layer = k[: -len(".weight")]
            q, scale = quantize_fp8(w)
            out[k], scales[k] = q, scale
            if legacy:
                out[layer + ".scale_weight"] = scale
            else:
                out[layer + ".weight_scale"] = scale
                out[layer + ".input_scale"] = torch.ones(())
                out[layer + ".comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
        else:
            out[k] = w
    if legacy:
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(out, str(dest))
    return dest, out, scales


@pytest.mark.parametrize("legacy", [False, True], ids=["weight_scale", "scale_weight"])
def test_fp8_scaled_single_file_keeps_fp8_layers(tmp_path, tiny_gemma, tok, legacy):
    f, stored, scales = _fp8_comfy_file(tiny_gemma[1], tmp_path / "gemma_3_tiny_fp8_scaled.safetensors", legacy)
    kept = load_gemma_text_model(f, dtype=torch.float32, expect_12b=False)
    layer = kept.layers[2].mlp.down_proj
    assert isinstance(layer, FP8Linear) and layer.weight.dtype == torch.float8_e4m3fn
    name = "model.layers.2.mlp.down_proj.weight"
    assert torch.equal(layer.weight.view(torch.uint8), stored[name].view(torch.uint8))
    assert torch.equal(layer.dequantized_weight(torch.float32), stored[name].float() * scales[name])
    plain = load_gemma_text_model(f, dtype=torch.float32, expect_12b=False, keep_fp8=False)
    assert type(plain.layers[2].mlp.down_proj) is torch.nn.Linear
    assert torch.equal(plain.layers[2].mlp.down_proj.weight, stored[name].float() * scales[name])

    ref = load_gemma_text_model(tiny_gemma[1], dtype=torch.float32, expect_12b=False)
    ids, mask = tokenize_prompts(tok, PROMPTS[:1])
    with torch.no_grad():
        h_kept = torch.stack(gemma_hidden_states(kept, ids, mask))[:, mask]
        h_plain = torch.stack(gemma_hidden_states(plain, ids, mask))[:, mask]
        h_ref = torch.stack(gemma_hidden_states(ref, ids, mask))[:, mask]
    torch.testing.assert_close(h_kept, h_plain, rtol=1e-5, atol=1e-5)
    # after the first layer: e4m3 keeps 3 mantissa bits (random tiny layers amplify the error further on)
    assert 0 < _rel(h_kept[1], h_ref[1]) < 0.1


def test_not_gemma_or_wrong_size_is_refused(tmp_path, tiny_gemma, ltx2_file, test_data):
    with pytest.raises(CheckpointError, match="not a Gemma 3 text model"):
        load_gemma_text_model(ltx2_file)
    gemma2 = {k: v for k, v in load_file(tiny_gemma[1]).items() if "q_norm" not in k and "k_norm" not in k}
    f = save_file_atomic(gemma2, tmp_path / "gemma_2_like.safetensors")
    with pytest.raises(CheckpointError, match="not a Gemma 3 text model"):
        load_gemma_text_model(f, expect_12b=False)
    with pytest.raises(CheckpointError, match=rf"hidden size {TINY_GEMMA_HIDDEN}, 6 layers.*needs Gemma 3 12B"):
        load_gemma_text_model(tiny_gemma[1])
    with pytest.raises(CheckpointError, match=rf"hidden size {TINY_GEMMA_HIDDEN}, 6 layers.*needs Gemma 3 12B"):
        load_gemma_text_model(tiny_gemma[0])
    packed = load_file(tiny_gemma[1])
    packed["model.layers.0.mlp.up_proj.weight"] = torch.zeros(2 * TINY_GEMMA_HIDDEN, TINY_GEMMA_HIDDEN // 2,
                                                              dtype=torch.uint8)
    f = save_file_atomic(packed, tmp_path / "gemma_3_tiny_fp4_mixed.safetensors")
    with pytest.raises(CheckpointError, match="fp4"):
        load_gemma_text_model(f, expect_12b=False)
    with pytest.raises(CheckpointError, match="model_type 'qwen2_5_vl'"):
        (tmp_path / "qwen").mkdir()
        (tmp_path / "qwen" / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
        load_gemma_text_model(tmp_path / "qwen")
    with pytest.raises(CheckpointError, match="not found"):
        load_gemma_text_model(tmp_path / "missing.safetensors")


def test_12b_config_from_published_shapes():
    from transformers import Gemma3TextConfig, Gemma3TextModel

    with torch.device("meta"):
        model = Gemma3TextModel(Gemma3TextConfig(**GEMMA3_12B_TEXT_CONFIG))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert gemma_text_config_from_shapes(shapes) == GEMMA3_12B_TEXT_CONFIG
    non_embedding = sum(p.numel() for p in model.parameters()) - model.embed_tokens.weight.numel()
    assert round(non_embedding / 1e6) == 10_759  # Gemma 3 technical report, Table 1: 12B non-embedding params
    assert model.config.hidden_size * (model.config.num_hidden_layers + 1) == 188_160  # aggregate_embed input


# ---------------------------------------------------------------------------------------------------------------
# End to end


def test_encode_matches_transformers_and_diffusers(encoder, hf_gemma, tok):
    features, mask = encode_prompts(encoder, PROMPTS)
    width = encoder.projection.config.dim
    assert features.shape == (2, MAX_LENGTH, width) and features.dtype == torch.float32 and mask.dtype == torch.bool
    assert features[~mask].eq(0).all() and features[mask].abs().amax(-1).gt(0).all()
    with torch.no_grad():
        video, audio = encoder.projection.connect(features, mask)
    assert video.shape == audio.shape == (2, MAX_LENGTH, width) and video.isfinite().all()

    ids, ref_mask = tokenize_prompts(tok, PROMPTS)
    ref = _diffusers_connectors(encoder.projection, num_states=7)
    with torch.no_grad():
        states = torch.stack(hf_gemma.model(input_ids=ids, attention_mask=ref_mask.long(),
                                            output_hidden_states=True).hidden_states, dim=-1)
        ref_video, ref_audio, _ = ref(states, ref_mask.long())
        ref_features = ref.text_proj_in(_reference_features(list(states.unbind(-1)), ref_mask).float())
    assert torch.equal(mask, ref_mask)
    assert _rel(features, ref_features) < 1e-5
    assert _rel(video, ref_video) < 1e-5 and _rel(audio, ref_audio) < 1e-5


def test_batch_equals_single_prompts(encoder):
    video, audio = encoder.encode(PROMPTS)
    for b, prompt in enumerate(PROMPTS):
        v, a = encoder.encode(prompt)
        torch.testing.assert_close(v[0], video[b], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a[0], audio[b], rtol=1e-5, atol=1e-5)

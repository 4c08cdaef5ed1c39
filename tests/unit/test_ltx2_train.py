"""LTX-2 LoRA training on a tiny LTX-2 DiT (fp32, CPU): the loss against a hand-computed reference, the DiT inputs
the adapter builds (noise, σ per token, first-frame conditioning, connectors, positions, caption dropout), learning
on a fixed batch, video-only and audio+video modes, the saved LoRA layout (native ComfyUI and ltx-pipelines), and
the settings LTX-2 refuses."""

from __future__ import annotations

import pytest
import torch

from cinetune.core.checkpoint import read_safetensors_header
from cinetune.core.lora import LoRALinear, apply_lora_unmerged, load_lora, remove_lora
from cinetune.k5.nabla import NablaConfig
from cinetune.ltx2.config import LTX2TransformerConfig, tiny_transformer_metadata
from cinetune.ltx2.connectors import LTX2TextProjection, text_projection_config
from cinetune.ltx2.dit import LTX2DiT, patchify_audio, patchify_video
from cinetune.ltx2.rope import audio_positions, video_positions
from cinetune.ltx2.train import (
    LTX2_FF_LORA_TARGETS,
    LTX2Sample,
    LTX2TrainingAdapter,
    ltx2_flow_matching_loss,
    ltx2_lora_targets,
    ltx2_train_config,
)
from cinetune.training.trainer import ResumeError, TrainingError, list_checkpoints, train_lora

META = tiny_transformer_metadata()
DIT_CONFIG = LTX2TransformerConfig.from_metadata(META)
F_, H_, W_, T_AUDIO, L_TEXT = 2, 2, 3, 5, 6


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def projection() -> LTX2TextProjection:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LTX2TextProjection(text_projection_config(META, feature_dim=48)).requires_grad_(False)


@pytest.fixture
def adapter(projection) -> LTX2TrainingAdapter:
    return LTX2TrainingAdapter(projection)


def dit(seed: int = 1) -> LTX2DiT:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LTX2DiT(DIT_CONFIG).requires_grad_(False)


def sample(seed: int, F: int = F_, *, audio: bool = True, valid: int = 4, fps: float = 24.0) -> LTX2Sample:
    g = torch.Generator().manual_seed(seed)
    D = META["caption_channels"]
    return LTX2Sample(latent=torch.randn(128, F, H_, W_, generator=g), text=torch.randn(L_TEXT, D, generator=g),
                      text_mask=torch.arange(L_TEXT) >= L_TEXT - valid, fps=fps, bucket=(32 * W_, 32 * H_),
                      frames=8 * (F - 1) + 1, item_id=f"s{seed}",
                      audio=torch.randn(8, T_AUDIO, 16, generator=g) if audio else None)


def config(**kw):
    base = dict(rank=4, alpha=8.0, learning_rate=1e-3, max_steps=2, compute_dtype="fp32", lora_dtype="fp32",
                save_dtype="fp32", with_audio=True, i2v="off")
    return ltx2_train_config(**{**base, **kw})


def capture(model):
    seen = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    return seen, handle


def contexts(projection, s: list[LTX2Sample]):
    features = torch.stack([x.text for x in s])
    mask = torch.stack([x.text_mask for x in s])
    with torch.no_grad():
        return projection.connect(features, mask)


# ---------------------------------------------------------------------------------------------------------------


def test_loss_matches_a_hand_computed_reference(projection):
    model = dit()
    g = torch.Generator().manual_seed(3)
    video = torch.randn(2, F_ * H_ * W_, 128, generator=g)
    audio = torch.randn(2, T_AUDIO, 128, generator=g)
    video_noise, audio_noise = torch.randn(video.shape, generator=g), torch.randn(audio.shape, generator=g)
    sigma = torch.tensor([0.35, 0.8])
    conditioned = torch.zeros(2, F_ * H_ * W_, dtype=torch.bool)
    conditioned[0, :H_ * W_] = True  # sample 0: first latent frame is the clean condition
    vctx, actx = contexts(projection, [sample(1), sample(2)])
    vpos, apos = video_positions(F_, H_, W_, fps=24.0), audio_positions(T_AUDIO)

    got = ltx2_flow_matching_loss(model, video, video_noise, sigma, video_context=vctx, video_positions=vpos,
                                  audio=audio, audio_noise=audio_noise, audio_context=actx, audio_positions=apos,
                                  conditioned=conditioned)

    # by hand: per-token σ (0 on the condition), x_σ = (1 − σ)x0 + σε, v = ε − x0, same σ for audio
    s_tok = torch.stack([torch.where(conditioned[b], 0.0, sigma[b]) for b in range(2)])
    x_video = (1 - s_tok[..., None]) * video + s_tok[..., None] * video_noise
    x_audio = (1 - sigma[:, None, None]) * audio + sigma[:, None, None] * audio_noise
    assert torch.equal(x_video[0, :H_ * W_], video[0, :H_ * W_])
    with torch.no_grad():
        pv, pa = model(x_video, x_audio, video_sigma=s_tok, audio_sigma=sigma, video_context=vctx,
                       audio_context=actx, video_positions=vpos, audio_positions=apos)
    video_loss = ((pv - (video_noise - video)) ** 2)[~conditioned].mean()  # only the denoised tokens count
    audio_loss = ((pa - (audio_noise - audio)) ** 2).mean()
    torch.testing.assert_close(got.parts["video"], video_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(got.parts["audio"], audio_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(got.total, video_loss + audio_loss, rtol=1e-6, atol=0)

    video_only = ltx2_flow_matching_loss(model, video, video_noise, sigma, video_context=vctx, video_positions=vpos)
    assert list(video_only.parts) == ["video"] and torch.equal(video_only.total, video_only.parts["video"])


def test_the_adapter_builds_the_dit_inputs_as_specified(adapter, projection):
    model = dit()
    s = [sample(1, fps=25.0, valid=3), sample(2, fps=25.0, valid=6)]
    empty = (torch.randn(L_TEXT, META["caption_channels"]), torch.arange(L_TEXT) >= L_TEXT - 1)
    cfg = config(i2v="first", i2v_prob=0.5, caption_dropout=0.5)
    batch = adapter.load_batch(model, s, cfg)
    assert batch.size == 2 and batch.tokens == F_ * H_ * W_
    sigma = torch.tensor([0.4, 0.7])
    seen, handle = capture(model)
    outcomes = set()
    try:
        for seed in range(6):
            seen.clear()
            got = adapter.loss(model, batch, sigma, generator=torch.Generator().manual_seed(seed),
                               empty=adapter.empty_caption(model, empty, cfg), config=cfg, device=torch.device("cpu"))
            # the documented draws: video ε, audio ε, B first-frame uniforms, B caption-dropout uniforms
            g = torch.Generator().manual_seed(seed)
            video = patchify_video(torch.stack([x.latent for x in s]))
            audio = patchify_audio(torch.stack([x.audio for x in s]))
            video_noise, audio_noise = torch.randn(video.shape, generator=g), torch.randn(audio.shape, generator=g)
            conditioned_samples = torch.rand(2, generator=g) < 0.5
            dropped = torch.rand(2, generator=g) < 0.5
            outcomes.update((("conditioned", c) for c in conditioned_samples.tolist()))
            outcomes.update((("dropped", d) for d in dropped.tolist()))
            conditioned = torch.zeros(2, video.shape[1], dtype=torch.bool)
            conditioned[conditioned_samples, :H_ * W_] = True
            texts = [empty if dropped[j] else (s[j].text, s[j].text_mask) for j in range(2)]
            with torch.no_grad():
                vctx, actx = projection.connect(torch.stack([t for t, _ in texts]), torch.stack([m for _, m in texts]))
            want = ltx2_flow_matching_loss(
                model, video, video_noise, sigma, video_context=vctx, audio_context=actx, audio=audio,
                audio_noise=audio_noise, video_positions=video_positions(F_, H_, W_, fps=25.0),
                audio_positions=audio_positions(T_AUDIO),
                conditioned=conditioned if bool(conditioned_samples.any()) else None)
            assert torch.equal(got.total, want.total), seed
            (args, kwargs), _ = seen  # one forward by the adapter, one by the reference
            assert kwargs["audio_sigma"].tolist() == sigma.tolist()
            for j in range(2):
                first = kwargs["video_sigma"][j, :H_ * W_]
                assert (first == (0.0 if conditioned_samples[j] else sigma[j])).all()
                assert (kwargs["video_sigma"][j, H_ * W_:] == sigma[j]).all()
            assert torch.equal(kwargs["video_positions"], video_positions(F_, H_, W_, fps=25.0))
    finally:
        handle.remove()
    assert len(outcomes) == 4  # each sample was seen conditioned and not, dropped and not
    # a one-latent-frame sample (an image) is never conditioned
    image = adapter.load_batch(model, [sample(3, F=1)], cfg)
    seen, handle = capture(model)
    try:
        adapter.loss(model, image, torch.tensor([0.5]), generator=torch.Generator().manual_seed(0), empty=None,
                     config=config(i2v="first", i2v_prob=1.0), device=torch.device("cpu"))
        assert (seen[0][1]["video_sigma"] == 0.5).all()
    finally:
        handle.remove()


def test_training_lowers_the_loss_on_a_fixed_batch_and_the_saved_lora_reproduces_it(adapter, projection, tmp_path):
    model = dit()
    s = sample(1)
    g = torch.Generator().manual_seed(5)
    sigma = torch.tensor([0.2, 0.5, 0.8])
    video = patchify_video(s.latent[None]).expand(3, -1, -1)
    audio = patchify_audio(s.audio[None]).expand(3, -1, -1)
    noise_v, noise_a = torch.randn(video.shape, generator=g), torch.randn(audio.shape, generator=g)
    vctx, actx = (c.expand(3, -1, -1) for c in contexts(projection, [s]))

    def fixed_loss() -> dict[str, float]:
        with torch.no_grad():
            terms = ltx2_flow_matching_loss(
                model, video, noise_v, sigma, video_context=vctx, audio_context=actx, audio=audio,
                audio_noise=noise_a, video_positions=video_positions(F_, H_, W_, fps=24.0),
                audio_positions=audio_positions(T_AUDIO))
        return {"total": float(terms.total), **{k: float(v) for k, v in terms.parts.items()}}

    before = fixed_loss()
    cfg = config(max_steps=40, learning_rate=1e-2, targets=ltx2_lora_targets(with_audio=True, feed_forward=True))
    result = train_lora(model, [s], None, cfg, tmp_path / "run", adapter=adapter)
    assert not any(isinstance(m, LoRALinear) for m in model.modules()) and fixed_loss() == before
    assert model.attention_backend == "sdpa" and model.gradient_checkpointing is False  # restored
    apply_lora_unmerged(model, load_lora(result.lora_path))
    after = fixed_loss()
    # the raw checkpoint adapter (lora_down/lora_up + alpha) gives the same model as the baked final file
    remove_lora(model)
    apply_lora_unmerged(model, load_lora(result.checkpoint_dir / "lora.safetensors"))
    assert fixed_loss() == pytest.approx(after, rel=1e-5)
    remove_lora(model)
    # σ and ε are drawn afresh every step, so the loss at one fixed draw falls, not to zero
    assert all(after[k] < 0.9 * before[k] for k in ("total", "video", "audio")), (before, after)


def test_video_only_mode_leaves_the_audio_stream_untouched(adapter, tmp_path):
    model = dit()
    seen, handle = capture(model)
    events = []
    try:
        result = train_lora(model, [sample(1), sample(2, audio=False)], None, config(with_audio=None), tmp_path / "v",
                            adapter=adapter, on_event=events.append)
    finally:
        handle.remove()
    assert all(args[1] is None and kwargs["audio_sigma"] is None for args, kwargs in seen)
    assert all(list(e.loss_terms) == ["video"] and e.loss_terms["video"] == e.loss for e in events)
    modules = {".".join(p.split(".")[2:]) for p in load_lora(result.lora_path).layers}
    assert modules == {f"{a}.{t}" for a in ("attn1", "attn2") for t in ("to_q", "to_k", "to_v", "to_out.0")}
    # audio+video: every attention, the audio ones and both cross-modal directions included
    events.clear()
    result = train_lora(dit(), [sample(1)], None, config(), tmp_path / "av", adapter=adapter, on_event=events.append)
    assert all(set(e.loss_terms) == {"video", "audio"} for e in events)
    attentions = {p.split(".")[2] for p in load_lora(result.lora_path).layers}
    assert attentions == {"attn1", "attn2", "audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn"}
    with pytest.raises(ResumeError, match="another model or with other LoRA targets"):
        train_lora(dit(), [sample(1)], None, config(with_audio=False, max_steps=3), tmp_path / "av", adapter=adapter,
                   resume=True)


def test_the_saved_lora_loads_in_comfyui_and_fuses_like_ltx_pipelines(adapter, tmp_path):
    model = dit()
    cfg = config(targets=ltx2_lora_targets(with_audio=True, feed_forward=True))  # rank 4, alpha 8: scale 2
    result = train_lora(model, [sample(1)], None, cfg, tmp_path / "run", adapter=adapter)
    tensors, meta = read_safetensors_header(result.lora_path)
    final = load_lora(result.lora_path)
    raw = load_lora(result.checkpoint_dir / "lora.safetensors")
    assert meta["modelspec.architecture"] == "ltx-2" and meta["ss_network_dim"] == meta["ss_network_alpha"] == "4"

    # native ComfyUI maps "diffusion_model.<p>" for every weight "<p>.weight" of the model (comfy/lora.py
    # model_lora_keys_unet) and reads <key>.lora_A.weight / .lora_B.weight: nothing may be left unloaded
    weights = model.state_dict()
    comfy_keys = {"diffusion_model." + k[:-len(".weight")] for k in weights if k.endswith(".weight")}
    loaded = {f"{x}.{s}" for x in comfy_keys for s in ("lora_A.weight", "lora_B.weight")}
    assert set(tensors) <= loaded and len(tensors) == 2 * len(raw.layers)
    assert any(".ff.net.0.proj." in k for k in tensors) and any(".audio_ff.net.2." in k for k in tensors)

    # official ltx-pipelines: W += strength · lora_B @ lora_A on "diffusion_model."-stripped keys, alpha ignored;
    # ComfyUI and diffusers without .alpha: scale 1. All equal the trained update (α/r)·up·down.
    from safetensors.torch import load_file
    sd = load_file(result.lora_path)
    for path, (down, up, alpha) in raw.layers.items():
        assert alpha == 8.0 and final.layers[path][2] == 4.0
        key = "diffusion_model." + path
        assert torch.equal(sd[key + ".lora_A.weight"], down)
        assert torch.equal(sd[key + ".lora_B.weight"], up * 2.0)  # scale 2 is exact in float32
        torch.testing.assert_close(sd[key + ".lora_B.weight"] @ sd[key + ".lora_A.weight"], 2.0 * up @ down)
    assert any(float(u.abs().sum()) > 0 for _, u, _ in raw.layers.values())


def test_settings_ltx2_refuses(adapter, projection, tmp_path):
    model = dit()
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match="first-frame conditioning only.*'first'"):
        train_lora(model, [sample(1)], None, config(i2v="first_last"), run, adapter=adapter)
    with pytest.raises(TrainingError, match="NABLA.*None"):
        train_lora(model, [sample(1)], None, config(nabla=NablaConfig()), run, adapter=adapter)
    with pytest.raises(TrainingError, match="sample 's2' has no audio latent.*with_audio"):
        train_lora(model, [sample(2, audio=False), sample(1)], None, config(), run, adapter=adapter)
    bad = sample(1)
    bad.text_mask = torch.zeros(L_TEXT, dtype=torch.bool)
    with pytest.raises(TrainingError, match="sample 's1': text_mask must be bool \\[6\\] with at least one True"):
        train_lora(model, [bad], None, config(), run, adapter=adapter)
    bad = sample(1, fps=0.0)
    with pytest.raises(TrainingError, match="sample 's1': fps must be a positive number"):
        train_lora(model, [bad], None, config(), run, adapter=adapter)
    with pytest.raises(TrainingError, match="empty-caption embedding"):
        train_lora(model, [sample(1)], None, config(caption_dropout=0.1), run, adapter=adapter)
    wide_meta = {**META, "caption_channels": 48, "connector_attention_head_dim": 24}
    wide = LTX2TextProjection(text_projection_config(wide_meta, feature_dim=48))
    with pytest.raises(TrainingError, match="48 wide but this DiT's caption projection takes 24"):
        train_lora(model, [sample(1)], None, config(), run, adapter=LTX2TrainingAdapter(wide))
    assert not run.exists() and not list_checkpoints(run)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(LTX2_FF_LORA_TARGETS) & set(ltx2_lora_targets(with_audio=False, feed_forward=True)) == \
        {"ff.net.0.proj", "ff.net.2"}

"""LoRA training loop on a tiny Kandinsky 5 DiT (fp32, CPU): learning, exact resume, resume errors, optimizers and LR
schedules, image-to-video and caption-dropout inputs, gradient checkpointing, saved files, cache adapter; and the
training adapter contract, run on a tiny Kandinsky 5 and a tiny LTX-2 model alike: exact resume after an interrupt,
gradient checkpointing and block swap give the same gradients, training under block swap and on fp8 weights; and
what the trainer nodes share (checks, finished-run reuse, LoRA install, validation steps and clips) with the LTX-2
validation sampler (video with sound, showing the LoRA being trained)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from cinetune.core.checkpoint import read_safetensors_header, save_file_atomic
from cinetune.core.lora import LoRALinear, apply_lora_unmerged, inject_lora, load_lora, remove_lora
from cinetune.core.offload import model_on_device
from cinetune.core.quant import FP8Linear, quantize_linear_weights_fp8
from cinetune.k5.config import K5Config
from cinetune.k5.dit import Kandinsky5DiT, VisualBlock, load_k5_dit
from cinetune.k5.family import K5_BLOCK_PREFIXES, K5_LORA_TARGETS
from cinetune.k5.tiny import TINY_DIT_DIMS
from cinetune.k5.train import K5_TRAINING, K5Sample, flow_matching_loss
from cinetune.k5.vae import SCALING_FACTOR
from cinetune.ltx2.config import LTX2TransformerConfig, tiny_transformer_metadata
from cinetune.ltx2.connectors import LTX2TextProjection, text_projection_config
from cinetune.ltx2.dit import LTX2DiT
from cinetune.ltx2.train import LTX2Sample, LTX2TrainingAdapter, ltx2_train_config
from cinetune.training.adapter import training_adapter_for
from cinetune.training.schedules import lr_multiplier
from cinetune.training.trainer import (
    ResumeError,
    TrainConfig,
    TrainingError,
    empty_texts_from_cache,
    gradient_checkpointing,
    list_checkpoints,
    plan_epoch,
    sample_sigmas,
    samples_from_cache,
    train_lora,
)

D, D2 = TINY_DIT_DIMS["in_text_dim"], TINY_DIT_DIMS["in_text_dim2"]


pytestmark = pytest.mark.usefixtures("one_thread")


def load_dit(path: Path) -> Kandinsky5DiT:
    return load_k5_dit(path, weight_dtype="fp32").model


def sample(seed: int, T: int = 2, h: int = 4, w: int = 4, L: int = 3, *, item: str | None = None, repeats: int = 1,
           first: bool = False, last: bool = False) -> K5Sample:
    g = torch.Generator().manual_seed(seed)
    return K5Sample(
        latent=torch.randn(16, T, h, w, generator=g), text=torch.randn(L, D, generator=g),
        pooled=torch.randn(D2, generator=g), bucket=(w * 8, h * 8), frames=4 * (T - 1) + 1,
        item_id=item or f"s{seed}", repeats=repeats,
        first=torch.randn(16, 1, h, w, generator=g) if first else None,
        last=torch.randn(16, 1, h, w, generator=g) if last else None)


def config(**kw) -> TrainConfig:
    base = dict(rank=4, alpha=4.0, learning_rate=1e-3, max_steps=2, compute_dtype="fp32", lora_dtype="fp32",
                save_dtype="fp32")
    return TrainConfig(**{**base, **kw})


def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    return {p: (d, u) for p, (d, u, _) in load_lora(path).layers.items()}


class Stop(Exception):
    """Stands in for the host's interrupt exception."""


def interrupt_at(call: int):
    calls = {"n": 0}

    def check():
        calls["n"] += 1
        if calls["n"] == call:
            raise Stop("cancelled")

    return check


def capture_inputs(model):
    seen = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    return seen, handle


# ---------------------------------------------------------------------------------------------------------------


def test_training_lowers_the_loss_at_fixed_sigmas_and_noise(dit_file, tmp_path):
    model = load_dit(dit_file)
    s = sample(0)
    g = torch.Generator().manual_seed(123)
    sigmas = torch.tensor([0.2, 0.5, 0.8])
    noise = torch.randn(3, 16, 2, 4, 4, generator=g)

    def fixed_loss() -> float:
        x0 = (s.latent * SCALING_FACTOR).expand(3, -1, -1, -1, -1)
        zeros = torch.zeros_like(x0)
        with torch.no_grad():
            return float(flow_matching_loss(model, x0, noise, sigmas, s.text.expand(3, -1, -1),
                                            s.pooled.expand(3, -1), cond=zeros, mask=zeros[:, :1]))

    before = fixed_loss()
    result = train_lora(model, [s], None, config(max_steps=40, learning_rate=3e-3), tmp_path / "run",
                        metadata={"trigger": "ohwx", "base_model": "tiny", "dataset_hash": "abc"})
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # the caller's model is restored
    assert fixed_loss() == before
    weights = load_lora(result.lora_path)
    apply_lora_unmerged(model, weights)
    after = fixed_loss()
    remove_lora(model)
    assert after < 0.5 * before, (before, after)

    # the saved LoRA: every target layer, the metadata, the run files
    assert len(weights.layers) == 1 * 6 + 2 * 10 and weights.ranks() == {4}
    md = weights.metadata
    assert md["trigger"] == "ohwx" and md["base_model"] == "tiny" and md["dataset_hash"] == "abc"
    assert md["cinetune.steps"] == "40" and md["cinetune.complete"] == "true" and md["ss_network_dim"] == "4"
    assert json.loads(md["cinetune.training"])["learning_rate"] == 3e-3
    assert result.steps == 40 and len(result.losses) == 40
    assert result.checkpoint_dir == tmp_path / "run" / "checkpoints" / "step_000040"
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config"]["rank"] == 4


def exact_resume_setup():
    # bucket A (2 latent frames): 4 samples, 5 with repeats -> 3 batches of <= 2; bucket B (1 frame): 3 -> 2 batches.
    # 5 batches with grad_accum 2 -> steps of 2, 2, 1 batches: 3 steps per epoch, step 11 is mid-epoch 4.
    samples = [sample(1, first=True), sample(2, repeats=2), sample(3, first=True), sample(4),
               sample(5, T=1, w=6, L=5), sample(6, T=1, w=6, L=2), sample(7, T=1, w=6)]
    empty = (torch.randn(2, D, generator=torch.Generator().manual_seed(9)), torch.zeros(D2))
    cfg = config(max_steps=20, batch_size=2, grad_accum=2, lr_schedule="cosine", warmup_steps=3, i2v="first",
                 i2v_prob=0.5, caption_dropout=0.3, save_every=4, keep_checkpoints=2, seed=7)
    return samples, empty, cfg


def test_resume_is_exact(dit_file, tmp_path):
    samples, empty, cfg = exact_resume_setup()
    torch.manual_seed(1)  # global RNG states differ between the runs: the trainer must not depend on them
    straight = train_lora(load_dit(dit_file), samples, empty, cfg, tmp_path / "a")

    torch.manual_seed(2)
    with pytest.raises(Stop, match="cancelled") as info:
        train_lora(load_dit(dit_file), samples, empty, cfg, tmp_path / "b", check_interrupt=interrupt_at(11))
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert "step_000010" in notes or not hasattr(info.value, "add_note")
    # the interrupted run left a resumable checkpoint and a usable LoRA of step 10
    steps = [s for s, _ in list_checkpoints(tmp_path / "b")]
    assert steps == [8, 10]  # save_every 4 kept 2: step 4 pruned
    part = load_lora(tmp_path / "b" / "lora.safetensors")
    assert part.metadata["cinetune.steps"] == "10" and part.metadata["cinetune.complete"] == "false"
    assert len(part.layers) == 26

    torch.manual_seed(3)
    resumed = train_lora(load_dit(dit_file), samples, empty, cfg, tmp_path / "b", resume=True)
    assert resumed.steps == 20 and resumed.losses == straight.losses
    a, b = lora_tensors(straight.lora_path), lora_tensors(resumed.lora_path)
    assert a.keys() == b.keys()
    for path in a:
        assert torch.equal(a[path][0], b[path][0]) and torch.equal(a[path][1], b[path][1]), path
    assert any(u.abs().sum() > 0 for _, u in a.values())
    ca = lora_tensors(straight.checkpoint_dir / "lora.safetensors")
    cb = lora_tensors(resumed.checkpoint_dir / "lora.safetensors")
    assert all(torch.equal(ca[p][1], cb[p][1]) for p in ca)


def test_resume_refuses_another_rank_model_or_optimizer(dit_file, tmp_path):
    run = tmp_path / "run"
    train_lora(load_dit(dit_file), [sample(0)], None, config(max_steps=1), run)
    ckpt = "step_000001"
    with pytest.raises(TrainingError, match="already holds a training run.*resume"):
        train_lora(load_dit(dit_file), [sample(0)], None, config(max_steps=2), run)
    with pytest.raises(ResumeError, match=rf"{ckpt}.*rank 4, this run asks for rank 8.*Set rank to 4"):
        train_lora(load_dit(dit_file), [sample(0)], None, config(max_steps=2, rank=8), run, resume=True)
    other = Kandinsky5DiT(K5Config(**{**TINY_DIT_DIMS, "ff_dim": 96, "num_visual_blocks": 3}))
    with pytest.raises(ResumeError, match=rf"{ckpt}.*another model.*feed_forward.in_layer \(64→128 in the "
                                          r"checkpoint, 64→96 here\).*visual_transformer_blocks\.2.*new run folder"):
        train_lora(other, [sample(0)], None, config(max_steps=2), run, resume=True)
    assert not any(isinstance(m, LoRALinear) for m in other.modules())
    with pytest.raises(ResumeError, match="'adamw' optimizer.*'adafactor'"):
        train_lora(load_dit(dit_file), [sample(0)], None, config(max_steps=2, optimizer="adafactor"), run,
                   resume=True)
    # resuming with a longer run continues from step 1
    result = train_lora(load_dit(dit_file), [sample(0)], None, config(max_steps=2), run, resume=True)
    assert result.steps == 2 and len(result.losses) == 2


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_every_optimizer_takes_a_step(dit_file, tmp_path, optimizer):
    result = train_lora(load_dit(dit_file), [sample(0)], None, config(max_steps=1, optimizer=optimizer),
                        tmp_path / "run")
    ups = [u for _, u in lora_tensors(result.lora_path).values()]
    assert sum(float(u.abs().sum()) for u in ups) > 0  # lora_up starts at zero


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_adamw8bit_without_bitsandbytes_says_how_to_install(dit_file, tmp_path):
    model = load_dit(dit_file)
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        train_lora(model, [sample(0)], None, config(optimizer="adamw8bit"), tmp_path / "run")
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_lr_schedules_follow_their_formulas(dit_file, tmp_path):
    N, W = 10, 3
    expected = {
        "constant": [1.0] * N,
        "constant_with_warmup": [1 / 3, 2 / 3, 1.0] + [1.0] * 7,
        "linear": [1 / 3, 2 / 3, 1.0] + [(N - s) / (N - W) for s in range(3, N)],
        "cosine": [1 / 3, 2 / 3, 1.0] + [0.5 * (1 + math.cos(math.pi * (s - W) / (N - W))) for s in range(3, N)],
    }
    for name, values in expected.items():
        w = 0 if name == "constant" else W
        got = [lr_multiplier(name, s, warmup_steps=w, max_steps=N) for s in range(N)]
        assert got == pytest.approx(values, abs=1e-12), name
    with pytest.raises(TrainingError, match="constant_with_warmup"):
        config(lr_schedule="constant", warmup_steps=5)

    # every schedule through the loop: the lr each step used (N = 4, W = 1 except for "constant")
    formulas = {"constant": [1, 1, 1, 1], "constant_with_warmup": [1, 1, 1, 1],
                "linear": [1, 3 / 3, 2 / 3, 1 / 3], "cosine": [1, 1, 0.75, 0.25]}
    for name, factors in formulas.items():
        events = []
        train_lora(load_dit(dit_file), [sample(0)], None,
                   config(max_steps=4, lr_schedule=name, warmup_steps=0 if name == "constant" else 1),
                   tmp_path / name, on_event=events.append)
        assert [e.lr for e in events] == pytest.approx([1e-3 * f for f in factors], rel=1e-12), name

    # through the loop: the lr each step used, validation and checkpoint retention
    events, validated = [], []

    def validate(step, model):
        validated.append((step, model.training, torch.is_grad_enabled(),
                          sum(isinstance(m, LoRALinear) for m in model.modules())))

    cfg = config(max_steps=6, lr_schedule="cosine", warmup_steps=2, save_every=2, keep_checkpoints=2)
    train_lora(load_dit(dit_file), [sample(0)], None, cfg, tmp_path / "run", on_event=events.append,
               validate=validate, validate_every=2)
    want = [1e-3 * lr_multiplier("cosine", s, warmup_steps=2, max_steps=6) for s in range(6)]
    assert [e.lr for e in events] == pytest.approx(want, rel=1e-12)
    assert [e.step for e in events] == list(range(1, 7)) and all(e.max_steps == 6 for e in events)
    assert events[0].loss_ema == events[0].loss
    ema = 0.0
    for n, e in enumerate(events, 1):
        ema = 0.9 * ema + 0.1 * e.loss
        assert e.loss_ema == pytest.approx(ema / (1 - 0.9 ** n), rel=1e-12)
    assert validated == [(2, False, False, 26), (4, False, False, 26), (6, False, False, 26)]
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [4, 6]


def test_i2v_conditioning_reaches_the_model_as_specified(dit_file, tmp_path):
    # one sample per latent shape, so each captured input tells which sample it is
    a = sample(1, T=3, h=4, w=4, first=True, last=True)      # explicit first / last
    b = sample(2, T=2, h=4, w=6)                              # no first: its latent frame 0 is used
    c = sample(3, T=1, h=4, w=8, first=True, last=True)       # an image: never conditioned
    model = load_dit(dit_file)
    seen, handle = capture_inputs(model)
    try:
        for mode in ("first", "first_last", "off"):
            seen.clear()
            samples = [a, c] if mode == "first_last" else [a, b, c]
            train_lora(model, samples, None, config(max_steps=len(samples), i2v=mode), tmp_path / mode)
            by_shape = {tuple(args[0].shape[2:]): args[0] for args, _ in seen}
            for s in samples:
                x = by_shape[tuple(s.latent.shape[1:])][0]
                assert x.shape[0] == 33
                cond, mask = x[16:32], x[32]
                want_cond, want_mask = torch.zeros_like(cond), torch.zeros_like(mask)
                if mode != "off" and s is not c:
                    first = s.first if s.first is not None else s.latent[:, :1]
                    want_cond[:, :1] = first * SCALING_FACTOR
                    want_mask[0] = 1
                    if mode == "first_last":
                        want_cond[:, -1:] = s.last * SCALING_FACTOR
                        want_mask[-1] = 1
                    assert not torch.allclose(x[:16, :1], first * SCALING_FACTOR)  # the noisy frame stays noisy
                assert torch.equal(cond, want_cond) and torch.equal(mask, want_mask), (mode, s.item_id)
        seen.clear()
        train_lora(model, [a], None, config(max_steps=1, i2v="first", i2v_prob=0.0), tmp_path / "p0")
        assert not seen[0][0][0][:, 16:].any()
    finally:
        handle.remove()
    with pytest.raises(TrainingError, match="no 'last' frame latent.*i2v='first_last'"):
        train_lora(model, [b], None, config(i2v="first_last"), tmp_path / "nolast")


def test_caption_dropout_sends_the_empty_caption_and_texts_are_padded(dit_file, tmp_path):
    model = load_dit(dit_file)
    empty = (torch.randn(2, D), torch.randn(D2))
    s1, s2 = sample(1, L=3), sample(2, L=5)
    seen, handle = capture_inputs(model)
    try:
        train_lora(model, [s1, s2], empty, config(max_steps=2, caption_dropout=1.0), tmp_path / "drop")
        for args, kwargs in seen:
            assert torch.equal(args[1][0], empty[0]) and torch.equal(args[2][0], empty[1])
            assert kwargs["text_mask"] is None
        seen.clear()
        train_lora(model, [s1, s2], None, config(max_steps=1, batch_size=2), tmp_path / "pad")
        (args, kwargs), = seen
        texts = {args[1][j, :n].shape[0]: args[1][j] for j, n in enumerate(kwargs["text_mask"].sum(1).tolist())}
        assert torch.equal(texts[3][:3], s1.text) and not texts[3][3:].any() and torch.equal(texts[5], s2.text)
    finally:
        handle.remove()
    with pytest.raises(TrainingError, match="empty-caption embedding"):
        train_lora(model, [s1], None, config(caption_dropout=0.1), tmp_path / "none")


def test_gradient_checkpointing_gives_the_same_gradients(dit_file):
    model = load_dit(dit_file)
    modules = inject_lora(model, rank=4, alpha=4.0, targets=K5_LORA_TARGETS, within=K5_BLOCK_PREFIXES,
                          generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in modules.values():
            m.lora_up.copy_(0.1 * torch.randn(m.lora_up.shape, generator=g))
    x0, noise = torch.randn(2, 16, 2, 4, 4, generator=g), torch.randn(2, 16, 2, 4, 4, generator=g)
    text, pooled = torch.randn(2, 3, D, generator=g), torch.randn(2, D2, generator=g)
    zeros = torch.zeros_like(x0)
    calls = []
    model.visual_transformer_blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))

    def grads(checkpointed: bool) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        calls.clear()
        with gradient_checkpointing(K5_TRAINING.blocks(model), checkpointed):
            flow_matching_loss(model, x0, noise, torch.tensor([0.3, 0.9]), text, pooled, cond=zeros,
                               mask=zeros[:, :1]).backward()
        return [p.grad.clone() for m in modules.values() for p in (m.lora_down, m.lora_up)]

    plain = grads(False)
    assert len(calls) == 1
    ckpt = grads(True)
    assert len(calls) == 2  # the block (with its hooks) ran again in backward
    assert type(model.visual_transformer_blocks[0]) is VisualBlock  # restored
    for p, c in zip(plain, ckpt):
        torch.testing.assert_close(c, p, rtol=0, atol=1e-6)
    assert any(float(p.abs().sum()) > 0 for p in plain)


def test_plan_epoch_groups_by_bucket_and_counts_repeats():
    keys = [("a", 5), ("a", 5), ("b", 1), ("a", 5), ("b", 1)]
    repeats = [1, 3, 1, 2, 1]
    g = torch.Generator().manual_seed(0)
    batches = plan_epoch(keys, repeats, 2, g)
    assert all(len({keys[i] for i in b}) == 1 and 1 <= len(b) <= 2 for b in batches)
    assert sorted(i for b in batches for i in b) == sorted(i for i, r in enumerate(repeats) for _ in range(r))
    assert len(batches) == 3 + 1  # "a": 6 -> 3 batches, "b": 2 -> 1
    assert plan_epoch(keys, repeats, 2, torch.Generator().manual_seed(0)) == batches


def test_epochs_set_the_number_of_steps_and_nan_stops_before_the_update(dit_file, tmp_path):
    samples = [sample(1), sample(2), sample(3, w=6)]
    result = train_lora(load_dit(dit_file), samples, None, config(epochs=2, batch_size=2, max_steps=99),
                        tmp_path / "ep")
    assert result.steps == 4  # 2 batches per epoch ("4×4": 2 samples, "4×6": 1)

    bad = sample(4)
    bad.latent[0, 0, 0, 0] = float("nan")
    with pytest.raises(TrainingError, match="loss is nan at step 1"):
        train_lora(load_dit(dit_file), [bad], None, config(), tmp_path / "nan")
    (step, ckpt), = list_checkpoints(tmp_path / "nan")
    assert step == 0 and all(not u.any() for _, u in lora_tensors(ckpt / "lora.safetensors").values())


def test_interrupt_during_validation_saves_the_finished_step(dit_file, tmp_path):
    def validate(step, model):
        raise Stop("cancelled while sampling")

    with pytest.raises(Stop):
        train_lora(load_dit(dit_file), [sample(0)], None, config(max_steps=5), tmp_path / "run", validate=validate,
                   validate_every=2)
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2]
    assert load_lora(tmp_path / "run" / "lora.safetensors").metadata["cinetune.steps"] == "2"


def test_cache_adapter_reads_cached_samples(dit_file, tmp_path):
    cache = pytest.importorskip("cinetune.training.cache")
    cache_dir, enc = tmp_path / "cache", "encoder-id"
    s = sample(0, first=True, last=True)
    lat_path = cache_dir / cache.LATENT_DIR / "k.safetensors"
    txt_path = cache_dir / cache.TEXT_DIR / "t.safetensors"
    save_file_atomic({"latent": s.latent, "first": s.first, "last": s.last}, lat_path)
    save_file_atomic({"text": s.text, "pooled": s.pooled}, txt_path)
    empty = (torch.randn(2, D), torch.randn(D2))
    save_file_atomic({"text": empty[0], "pooled": empty[1]}, cache.empty_text_path(cache_dir, enc, "video"))
    cached = cache.CachedSample(key="k", latent_path=lat_path, text_key="t", text_path=txt_path, caption="a cat",
                                item_id="cat.mp4", bucket=(32, 32), frames=5, kind="video", repeats=2)
    (adapted,) = samples_from_cache([cached])
    assert adapted.bucket == (32, 32) and adapted.repeats == 2 and adapted.item_id == "cat.mp4"
    assert torch.equal(adapted.latent, s.latent) and torch.equal(adapted.last, s.last)
    assert torch.equal(adapted.pooled, s.pooled) and torch.equal(adapted.text, s.text)
    empties = empty_texts_from_cache([adapted], cache_dir, enc)
    assert torch.equal(empties["video"][0], empty[0])
    result = train_lora(load_dit(dit_file), [adapted], empties, config(i2v="first_last", caption_dropout=0.5),
                        tmp_path / "run")
    assert result.steps == 2 and read_safetensors_header(result.lora_path)[1]["cinetune.complete"] == "true"


def test_saved_run_keeps_the_checkpoint_format(dit_file, tmp_path):
    # A run started by an earlier version resumes: the run folder, state.pt and LoRA keys are unchanged.
    result = train_lora(load_dit(dit_file), [sample(0)], None, config(max_steps=1), tmp_path / "run")
    ckpt = result.checkpoint_dir
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints", "lora.safetensors", "run.json"]
    assert sorted(p.name for p in ckpt.iterdir()) == ["lora.safetensors", "state.pt"]
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert sorted(state) == ["config", "dataset", "epoch", "fingerprint", "format", "generator", "losses",
                             "optimizer", "order", "position", "rng", "scheduler", "step"]
    assert state["format"] == 1 and sorted(state["fingerprint"]) == ["alpha", "layers", "model", "optimizer", "rank"]
    assert sorted(state["rng"]) == ["numpy", "python", "torch"]
    # the first release also wrote "targets" (then always the K5 list); it is left out while targets is None
    assert sorted(state["config"]) == [
        "alpha", "attention_backend", "batch_size", "betas", "caption_dropout", "compute_dtype", "epochs", "eps",
        "flow_shift", "grad_accum", "gradient_checkpointing", "i2v", "i2v_prob", "keep_checkpoints", "learning_rate",
        "lora_dtype", "lr_schedule", "max_grad_norm", "max_steps", "nabla", "optimizer", "rank", "rope_scale",
        "save_dtype", "save_every", "seed", "sigmoid_scale", "timestep_sampling", "warmup_steps", "weight_decay"]
    assert sorted(json.loads((tmp_path / "run" / "run.json").read_text())) == [
        "batches_per_epoch", "config", "dataset_hash", "format", "max_steps", "metadata", "resumed_at_step",
        "resumed_from", "samples", "steps_per_epoch"]
    tensors, meta = read_safetensors_header(ckpt / "lora.safetensors")
    path = "visual_transformer_blocks.0.self_attention.to_query"
    assert {f"diffusion_model.{path}.{s}" for s in ("alpha", "lora_down.weight", "lora_up.weight")} <= set(tensors)
    assert sorted(meta) == ["cinetune.complete", "cinetune.max_steps", "cinetune.steps", "cinetune.training",
                            "modelspec.architecture", "ss_epoch", "ss_learning_rate", "ss_lr_scheduler",
                            "ss_network_alpha", "ss_network_dim", "ss_optimizer", "ss_seed", "ss_steps", "trainer"]
    assert config(targets=K5_LORA_TARGETS).to_dict()["targets"] == list(K5_LORA_TARGETS)


def test_shifted_logit_normal_sigmas_follow_the_token_count():
    for tokens in (256, 1024, 6144):
        got = sample_sigmas("shifted_logit_normal", 5, flow_shift=1.0, tokens=tokens,
                            generator=torch.Generator().manual_seed(3))
        n = torch.randn(5, generator=torch.Generator().manual_seed(3))
        mu = 0.95 + (2.05 - 0.95) * (tokens - 1024) / 3072  # ltx-trainer's line, not clamped
        torch.testing.assert_close(got, torch.sigmoid(mu + n), rtol=0, atol=1e-6)
    with pytest.raises(TrainingError, match="token count"):
        sample_sigmas("shifted_logit_normal", 1, flow_shift=1.0, generator=torch.Generator())


# ---------------------------------------------------------------------------------------------------------------
# The adapter contract: the same loop tests on a tiny Kandinsky 5 and a tiny LTX-2 model


class K5Harness:
    adapter = K5_TRAINING

    def __init__(self, dit_file: Path) -> None:
        self.dit_file = dit_file

    def model(self):
        return load_dit(self.dit_file)

    def samples(self):
        return [sample(1, first=True), sample(2, repeats=2), sample(3), sample(4, w=6), sample(5, w=6)]

    def empty(self):
        return torch.randn(2, D, generator=torch.Generator().manual_seed(9)), torch.zeros(D2)

    def config(self, **kw) -> TrainConfig:
        return config(**kw)


class LTX2Harness:
    def __init__(self) -> None:
        meta = tiny_transformer_metadata()
        self.dit_config = LTX2TransformerConfig.from_metadata(meta)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.projection = LTX2TextProjection(text_projection_config(meta, feature_dim=48)).requires_grad_(False)
        self.adapter = LTX2TrainingAdapter(self.projection)
        self.dim = self.projection.config.dim

    def model(self):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            return LTX2DiT(self.dit_config)

    def sample(self, seed: int, F: int = 2, H: int = 2, W: int = 3, **kw) -> LTX2Sample:
        g = torch.Generator().manual_seed(seed)
        mask = torch.arange(6) >= 6 - (2 + seed % 4)
        return LTX2Sample(latent=torch.randn(128, F, H, W, generator=g), text=torch.randn(6, self.dim, generator=g),
                          text_mask=mask, fps=24.0, bucket=(32 * W, 32 * H), frames=8 * (F - 1) + 1,
                          item_id=f"s{seed}", audio=torch.randn(8, 3 * F, 16, generator=g), **kw)

    def samples(self):
        return [self.sample(1), self.sample(2, repeats=2), self.sample(3), self.sample(4, W=2), self.sample(5, W=2)]

    def empty(self):
        return torch.randn(6, self.dim, generator=torch.Generator().manual_seed(9)), torch.arange(6) >= 5

    def config(self, **kw) -> TrainConfig:
        return ltx2_train_config(**{"with_audio": True, "rank": 4, "alpha": 8.0, "learning_rate": 1e-3,
                                    "max_steps": 2, "compute_dtype": "fp32", "lora_dtype": "fp32",
                                    "save_dtype": "fp32", **kw})


@pytest.fixture(params=["k5", "ltx2"])
def harness(request, dit_file):
    return K5Harness(dit_file) if request.param == "k5" else LTX2Harness()


def test_contract_resume_is_exact_after_an_interrupt(harness, tmp_path):
    samples, empty = harness.samples(), harness.empty()
    # 2 groups: 4 + 2 samples -> 2 + 1 batches of <= 2; grad_accum 2 -> 2 steps per epoch; step 5 is mid-epoch 3
    cfg = harness.config(max_steps=8, batch_size=2, grad_accum=2, lr_schedule="cosine", warmup_steps=1, i2v="first",
                         i2v_prob=0.5, caption_dropout=0.3, save_every=3, keep_checkpoints=1, seed=5)
    events = []
    straight = train_lora(harness.model(), samples, empty, cfg, tmp_path / "a", adapter=harness.adapter,
                          on_event=events.append)
    with pytest.raises(Stop):
        train_lora(harness.model(), samples, empty, cfg, tmp_path / "b", adapter=harness.adapter,
                   check_interrupt=interrupt_at(6))
    assert [s for s, _ in list_checkpoints(tmp_path / "b")] == [5]  # interrupt checkpoint; step 3 pruned
    part = load_lora(tmp_path / "b" / "lora.safetensors")
    assert part.metadata["cinetune.steps"] == "5" and part.metadata["cinetune.complete"] == "false"
    resumed = train_lora(harness.model(), samples, empty, cfg, tmp_path / "b", adapter=harness.adapter, resume=True)
    assert resumed.steps == 8 and resumed.losses == straight.losses
    for name in ("lora.safetensors", "checkpoints/step_000008/lora.safetensors"):
        a, b = lora_tensors(tmp_path / "a" / name), lora_tensors(tmp_path / "b" / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[p][0], b[p][0]) and torch.equal(a[p][1], b[p][1]) for p in a), name
    assert any(u.abs().sum() > 0 for _, u in lora_tensors(straight.lora_path).values())
    # per-part losses sum to the step loss (LTX-2: video + audio)
    for e in events:
        assert not e.loss_terms or sum(e.loss_terms.values()) == pytest.approx(e.loss, rel=1e-6)


def _lora_with_random_up(harness, model, cfg):
    modules = inject_lora(model, rank=cfg.rank, alpha=cfg.alpha, targets=harness.adapter.lora_targets(cfg),
                          within=harness.adapter.lora_within, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in modules.values():
            m.lora_up.copy_(0.1 * torch.randn(m.lora_up.shape, generator=g))
    return modules


def _grads(harness, model, modules, cfg, checkpointed: bool) -> list[torch.Tensor]:
    adapter = harness.adapter
    samples = harness.samples()[:2]
    batch = adapter.load_batch(model, samples, cfg)
    model.zero_grad(set_to_none=True)
    with adapter.running(model, cfg, torch.device("cpu")), gradient_checkpointing(adapter.blocks(model), checkpointed):
        terms = adapter.loss(model, batch, torch.tensor([0.3, 0.9]), generator=torch.Generator().manual_seed(2),
                             empty=None, config=cfg, device=torch.device("cpu"))
        terms.total.backward()
    return [p.grad.clone() for m in modules.values() for p in (m.lora_down, m.lora_up)]


def test_contract_gradient_checkpointing_and_block_swap_give_the_same_gradients(harness):
    model = harness.model().requires_grad_(False)  # as loaded: frozen weights, which block swap streams
    cfg = harness.config(i2v="first", i2v_prob=1.0)
    modules = _lora_with_random_up(harness, model, cfg)
    blocks = harness.adapter.blocks(model)
    calls = []
    blocks[-1].register_forward_pre_hook(lambda *_: calls.append(1))
    plain = _grads(harness, model, modules, cfg, False)
    assert len(calls) == 1
    checkpointed = _grads(harness, model, modules, cfg, True)
    assert len(calls) == 3  # the block (with its hooks) ran again in backward
    assert not any(type(b).__name__.startswith("Checkpointed") for b in blocks)  # restored
    for p, c in zip(plain, checkpointed):
        torch.testing.assert_close(c, p, rtol=0, atol=1e-6)
    assert any(float(p.abs().sum()) > 0 for p in plain)
    with model_on_device(model, blocks, "cpu", blocks_to_swap=len(blocks), ring_size=1) as swap:
        swapped = _grads(harness, model, modules, cfg, True)
        # every block loaded in forward and again in backward (the last one is still in the slot at the turn)
        assert swap.stats["copies"] == 2 * len(blocks) - 1
    assert all(torch.equal(s, c) for s, c in zip(swapped, checkpointed))


def test_contract_training_under_block_swap_and_fp8_weights(harness, tmp_path):
    samples, cfg = harness.samples()[:2], harness.config(max_steps=2)
    plain = train_lora(harness.model().requires_grad_(False), samples, None, cfg, tmp_path / "plain",
                       adapter=harness.adapter)
    model = harness.model().requires_grad_(False)
    blocks = harness.adapter.blocks(model)
    with model_on_device(model, blocks, "cpu", blocks_to_swap=len(blocks), ring_size=1) as swap:
        swapped = train_lora(model, samples, None, cfg, tmp_path / "swap", adapter=harness.adapter)
        assert swap.stats["copies"] > 0
    assert swapped.losses == plain.losses
    a, b = lora_tensors(plain.lora_path), lora_tensors(swapped.lora_path)
    assert all(torch.equal(a[p][0], b[p][0]) and torch.equal(a[p][1], b[p][1]) for p in a)

    model = harness.model().requires_grad_(False)
    assert quantize_linear_weights_fp8(model, keep=harness.adapter.fp8_keep) > 0
    fp8 = train_lora(model, samples, None, cfg, tmp_path / "fp8", adapter=harness.adapter)
    assert all(math.isfinite(x) for x in fp8.losses)
    trained = lora_tensors(fp8.lora_path)
    assert trained.keys() == a.keys() and any(float(u.abs().sum()) > 0 for _, u in trained.values())
    assert any(isinstance(m, FP8Linear) for m in model.modules())
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_an_adapter_is_found_for_registered_families_only(dit_file, tmp_path):
    ltx2 = LTX2Harness()
    assert training_adapter_for(load_dit(dit_file)) is K5_TRAINING
    with pytest.raises(TrainingError, match="No training adapter accepts a LTX2DiT.*adapter="):
        train_lora(ltx2.model(), ltx2.samples(), None, ltx2.config(), tmp_path / "run")
    with pytest.raises(TrainingError, match="lacks text_mask, fps"):
        train_lora(ltx2.model(), [sample(0)], None, ltx2.config(), tmp_path / "run", adapter=ltx2.adapter)


# ---------------------------------------------------------------------------------------------------------------
# What the trainer nodes share (training.runs) and the LTX-2 validation sampler (ltx2.validation)


def test_a_finished_run_is_reused_only_with_the_same_settings_and_dataset(dit_file, tmp_path):
    from cinetune.training.runs import finished_run

    cfg, meta = config(max_steps=2), {"dataset_hash": "abc"}
    run = tmp_path / "run"
    assert finished_run(run, cfg, meta) is None  # nothing there yet
    result = train_lora(load_dit(dit_file), [sample(1)], None, cfg, run, metadata=meta)
    reused = finished_run(run, cfg, meta)
    assert reused is not None and reused.lora_path == result.lora_path and reused.steps == 2
    assert finished_run(run, config(max_steps=3), meta) is None
    assert finished_run(run, cfg, {"dataset_hash": "other"}) is None
    with pytest.raises(Stop):  # an interrupted run is not finished
        train_lora(load_dit(dit_file), [sample(1)], None, cfg, tmp_path / "cut", metadata=meta,
                   check_interrupt=interrupt_at(2))
    assert finished_run(tmp_path / "cut", cfg, meta) is None


def test_the_checks_before_a_run_name_the_fix():
    from cinetune.training import runs

    runs.check_base_model((), lora_loader="L", model_loader="M", trainer="T")
    with pytest.raises(TrainingError, match="LoRAs applied \\(L\\).*connect the M directly to T"):
        runs.check_base_model([("x", None, 1.0)], lora_loader="L", model_loader="M", trainer="T")
    runs.check_blocks_to_swap(4, 4, "m.safetensors")
    with pytest.raises(TrainingError, match="blocks_to_swap=5 is more than the 4 .*m.safetensors: use at most 4"):
        runs.check_blocks_to_swap(5, 4, "m.safetensors")
    runs.check_bucket_step(256, 128, attention="NABLA", widget="nabla", cacher="C")
    with pytest.raises(TrainingError, match="NABLA attention, which needs 128 px buckets: turn on 'nabla' in C"):
        runs.check_bucket_step(16, 128, attention="NABLA", widget="nabla", cacher="C")
    runs.check_i2v_cache("off", False, cacher="C")
    runs.check_i2v_cache("first", True, cacher="C")
    with pytest.raises(TrainingError, match="turn on 'image_to_video' in C"):
        runs.check_i2v_cache("first", False, cacher="C")
    runs.check_audio_cache(False, False, cacher="C")
    runs.check_audio_cache(True, True, cacher="C")
    with pytest.raises(TrainingError, match="turn on 'audio' in C .*or turn audio off"):
        runs.check_audio_cache(True, False, cacher="C")


def test_install_lora_replaces_its_own_file_and_never_a_foreign_one(tmp_path):
    from cinetune.training.runs import install_lora

    lora = save_file_atomic({"a.lora_down.weight": torch.ones(1, 2)}, tmp_path / "run" / "lora.safetensors",
                            {"cinetune.run": "mine"})
    loras = tmp_path / "loras"
    first = install_lora(lora, loras, "mine")
    assert first == loras / "mine.safetensors" and first.read_bytes() == lora.read_bytes()
    assert install_lora(lora, loras, "mine") == first  # the same run may replace its own LoRA
    foreign = save_file_atomic({"x": torch.zeros(1)}, loras / "theirs.safetensors", {})
    before = foreign.read_bytes()
    with pytest.raises(FileExistsError, match="left untouched.*another output_name"):
        install_lora(lora, loras, "theirs")
    assert foreign.read_bytes() == before


def test_validation_plan_runs_at_every_n_and_at_the_listed_steps(dit_file, tmp_path):
    from cinetune.training.runs import ValidationClip, ValidationPlan, latest_validation, validation_path

    plan = ValidationPlan.parse(4, "3, 9;  3")
    assert plan.steps == (3, 9) and plan.cadence == 1 and plan.active
    assert [s for s in range(1, 10) if plan.due(s)] == [3, 4, 8, 9]
    assert ValidationPlan.parse(0, "").validator(lambda s, m: None, tmp_path) is None
    assert ValidationPlan.parse(250, "500, 1000").cadence == 250
    for bad in ("3, x", "0", "-2", "2.5"):
        with pytest.raises(TrainingError, match="step numbers"):
            ValidationPlan.parse(0, bad)
    with pytest.raises(TrainingError, match="after the last step"):
        ValidationPlan.parse(0, "12").check_within(10)

    plan = ValidationPlan.parse(0, "2, 3")
    rendered, written = [], []
    frames = torch.rand(5, 16, 16, 3, generator=torch.Generator().manual_seed(0))
    sound = 0.2 * torch.randn(2, 4800, generator=torch.Generator().manual_seed(1))

    def render(step, model):
        rendered.append((step, model.training))
        return ValidationClip(frames, 24.0, sound, 24000)

    validate = plan.validator(render, tmp_path / "run", lambda step, path: written.append((step, path)))
    train_lora(load_dit(dit_file), [sample(1)], None, config(max_steps=4), tmp_path / "run", validate=validate,
               validate_every=plan.cadence)
    assert rendered == [(2, False), (3, False)]  # due steps only, model in eval mode
    assert written == [(s, validation_path(tmp_path / "run", s)) for s in (2, 3)]
    assert latest_validation(tmp_path / "run") == validation_path(tmp_path / "run", 3)
    from cinetune.core.media import probe_audio, probe_video

    assert probe_video(written[0][1])["frames"] == 5
    assert probe_audio(written[0][1])["codec"] == "aac"


def test_ltx2_validation_clips_have_sound_and_show_the_lora_being_trained(tmp_path):
    from cinetune.core.media import probe_audio, probe_video
    from cinetune.ltx2.audio import LTX2AudioVAE, LTX2Vocoder
    from cinetune.ltx2.loader import LTX2VAEs
    from cinetune.ltx2.pipeline import LTX2Conditioning, LTX2Prompt
    from cinetune.ltx2.validation import render_validation, validation_request, validation_size
    from cinetune.ltx2.vae import LTX2VideoVAE
    from cinetune.ltx2.vae import tiny_config as tiny_vae_config
    from cinetune.training.runs import ValidationPlan

    h = LTX2Harness()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vaes = LTX2VAEs(LTX2VideoVAE.from_config(tiny_vae_config()), LTX2AudioVAE.from_config(
            LTX2AudioVAE.tiny_config()), LTX2Vocoder.from_config(LTX2Vocoder.tiny_config()))
    g = torch.Generator().manual_seed(4)
    width = h.dit_config.caption_channels
    prompt = LTX2Prompt(torch.randn(1, 6, width, generator=g), torch.randn(1, 6, width, generator=g))
    conditioning = LTX2Conditioning(prompt, LTX2Prompt(torch.zeros(1, 6, width), torch.zeros(1, 6, width)))
    samples = [h.sample(1, F=1, H=2, W=2), h.sample(2, F=2, H=2, W=3)]  # an image, then a clip: the clip sets the size
    assert validation_size(samples) == (96, 64, 9, 24.0)
    request = validation_request(96, 64, 9, 24.0, seed=3, steps=2, num_blocks=len(h.model().blocks))
    assert request.stg == 0.0 and request.mode == "dev"  # the tiny DiT has no block 29
    assert validation_request(96, 64, 9, 24.0, seed=3, steps=2, num_blocks=48).stg == 1.0

    model = h.model().requires_grad_(False)
    base = render_validation(model, conditioning, vaes, request)
    assert base.frames.shape == (9, 64, 96, 3) and base.audio.shape[0] == 2 and base.sample_rate == 24000
    clips = {}

    def render(step, net):
        clips[step] = render_validation(net, conditioning, vaes, request)
        return clips[step]

    plan = ValidationPlan.parse(0, "2")
    cfg = h.config(max_steps=2, learning_rate=5e-2, i2v="off")
    train_lora(model, samples[1:], None, cfg, tmp_path / "run", adapter=h.adapter,
               validate=plan.validator(render, tmp_path / "run"), validate_every=plan.cadence)
    clip = tmp_path / "run" / "validation" / "step_000002.mp4"
    assert probe_video(clip)["frames"] == 9 and probe_audio(clip)["channels"] == 2
    assert (clips[2].frames - base.frames).abs().max() > 1e-3  # the LoRA of the run changed the clip
    assert (clips[2].audio - base.audio).abs().max() > 0
    after = render_validation(model, conditioning, vaes, request)  # LoRA removed after the run
    torch.testing.assert_close(after.frames, base.frames, rtol=0, atol=1e-6)

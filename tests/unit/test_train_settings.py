"""The trainer's recipe settings on tiny Kandinsky 5 and LTX-2 DiTs (fp32, CPU): each changes what it claims and
nothing else — optimizers (Prodigy, schedule-free AdamW and their missing packages), minimum LR ratio, warm-up
check, gradient norm and clipping, σ range, loss weighting, LoRA dropout, checkpoint cadence per epoch, weight
EMA, held-out loss, TensorBoard files — and a run with every setting on still resumes exactly."""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

from cinetune.core.lora import LoRAError, LoRALinear, apply_lora_unmerged, inject_lora, load_lora, remove_lora
from cinetune.k5.train import flow_matching_loss
from cinetune.ltx2.train import ltx2_flow_matching_loss
from cinetune.training.config import TrainConfig, TrainingError
from cinetune.training.holdout import heldout_loss
from cinetune.training.schedules import lr_multiplier
from cinetune.training.sigmas import loss_weights, sample_sigmas, weighted_mse
from cinetune.ltx2.rope import audio_positions, video_positions
from cinetune.training.trainer import list_checkpoints, train_lora
from test_trainer import K5Harness, LTX2Harness, Stop, config, interrupt_at, load_dit, lora_tensors, sample


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=["k5", "ltx2"])
def harness(request, dit_file):
    return K5Harness(dit_file) if request.param == "k5" else LTX2Harness()


def lora_modules(model) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def weights_of(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (m.lora_down.detach().clone(), m.lora_up.detach().clone()) for n, m in lora_modules(model).items()}


def assert_same_lora(a: Path, b: Path) -> None:
    ta, tb = lora_tensors(a), lora_tensors(b)
    assert ta.keys() == tb.keys()
    for p in ta:
        assert torch.equal(ta[p][0], tb[p][0]) and torch.equal(ta[p][1], tb[p][1]), p


# ---------------------------------------------------------------------------------------------------------------
# Config


def test_new_settings_default_off_are_saved_when_set_and_refuse_bad_values():
    base = TrainConfig().to_dict()
    for name in ("min_lr_ratio", "lora_include", "lora_dropout", "init_lora", "sigma_min", "loss_weighting",
                 "tensorboard", "ema_decay", "validation_loss_every", "validation_loss_sigmas", "d_coef"):
        assert name not in base  # an unchanged run of an older version compares equal
    cfg = TrainConfig(lr_schedule="cosine", min_lr_ratio=0.1, lora_include="blocks\\.0\\..*\n\n  .*to_query ",
                      validation_loss_sigmas="0.2, 0.6", init_lora=Path("x.safetensors"), ema_decay=0.99)
    d = cfg.to_dict()
    assert d["min_lr_ratio"] == 0.1 and d["lora_include"] == ["blocks\\.0\\..*", ".*to_query"]
    assert d["validation_loss_sigmas"] == [0.2, 0.6] and d["init_lora"] == "x.safetensors" and d["ema_decay"] == 0.99
    bad = [
        (dict(max_steps=10, warmup_steps=11, lr_schedule="linear"), "warmup_steps=11 is longer than the run"),
        (dict(min_lr_ratio=0.1), "min_lr_ratio=0.1 .*'constant' does not decay"),
        (dict(optimizer="adamw_schedulefree", lr_schedule="cosine"), "replaces the schedule"),
        (dict(optimizer="adamw_schedulefree", ema_decay=0.9), "already averages"),
        (dict(lora_exclude=["attn(("]), "'attn\\(\\(' is not a regular expression"),
        (dict(lora_dropout=1.0), "lora_dropout must be below 1"),
        (dict(sigma_min=0.5, sigma_max=0.5), "sigma_min \\(0.5\\) must be below sigma_max"),
        (dict(loss_weighting="snr"), "loss_weighting must be one of none, sigma_sqrt, cosmap"),
        (dict(validation_loss_sigmas="0.1, x"), "validation_loss_sigmas must be one or more"),
        (dict(validation_loss_sigmas=[1.5]), "validation_loss_sigmas must be one or more"),
        (dict(ema_decay=1.0), "ema_decay must be below 1"),
        (dict(optimizer="lion"), "optimizer must be one of .*prodigy, adamw_schedulefree"),
    ]
    for kwargs, message in bad:
        with pytest.raises(TrainingError, match=message):
            TrainConfig(**kwargs)


def test_warmup_longer_than_an_epoch_run_is_refused_before_anything_is_written(dit_file, tmp_path):
    cfg = config(epochs=2, lr_schedule="cosine", warmup_steps=3)  # 1 sample: 2 steps in all
    with pytest.raises(TrainingError, match="warmup_steps=3 is longer than the run \\(2 steps = 2 epochs"):
        train_lora(load_dit(dit_file), [sample(0)], None, cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_validation_loss_every_needs_held_out_samples(dit_file, tmp_path):
    with pytest.raises(TrainingError, match="validation_loss_every=2 needs held-out samples"):
        train_lora(load_dit(dit_file), [sample(0)], None, config(validation_loss_every=2), tmp_path / "run")
    with pytest.raises(TrainingError, match="held-out sample 0 .* lacks"):
        train_lora(load_dit(dit_file), [sample(0)], None, config(validation_loss_every=2), tmp_path / "run",
                   holdout=[object()])


# ---------------------------------------------------------------------------------------------------------------
# Optimizers and schedules


def test_min_lr_ratio_sets_the_floor_of_cosine_and_linear(dit_file, tmp_path):
    N, W, r = 10, 2, 0.25
    for name in ("cosine", "linear"):
        plain = [lr_multiplier(name, s, warmup_steps=W, max_steps=N) for s in range(N + 1)]
        floored = [lr_multiplier(name, s, warmup_steps=W, max_steps=N, min_lr_ratio=r) for s in range(N + 1)]
        assert floored[:W] == plain[:W] == [0.5, 1.0]  # the warm-up is untouched
        assert floored[W] == pytest.approx(1.0) and floored[N] == pytest.approx(r) and plain[N] == pytest.approx(0)
        assert floored[W:] == pytest.approx([r + (1 - r) * f for f in plain[W:]], abs=1e-12)
        assert lr_multiplier(name, 3, warmup_steps=W, max_steps=N, min_lr_ratio=0.0) == plain[3]
    events = []
    train_lora(load_dit(dit_file), [sample(0)], None, config(max_steps=4, lr_schedule="cosine", min_lr_ratio=r),
               tmp_path / "run", on_event=events.append)
    want = [1e-3 * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * s / 4))) for s in range(4)]
    assert [e.lr for e in events] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("optimizer", ["prodigy", "adamw_schedulefree"])
def test_optional_optimizers_train(dit_file, tmp_path, optimizer):
    pytest.importorskip({"prodigy": "prodigyopt", "adamw_schedulefree": "schedulefree"}[optimizer])
    lr = 1.0 if optimizer == "prodigy" else 1e-2
    result = train_lora(load_dit(dit_file), [sample(0)], None,
                        config(max_steps=3, optimizer=optimizer, learning_rate=lr), tmp_path / "run")
    assert sum(float(u.abs().sum()) for _, u in lora_tensors(result.lora_path).values()) > 0


@pytest.mark.parametrize("optimizer, package", [("prodigy", "prodigyopt"), ("adamw_schedulefree", "schedulefree")])
def test_missing_optimizer_package_says_how_to_install(dit_file, tmp_path, monkeypatch, optimizer, package):
    monkeypatch.setitem(sys.modules, package, None)  # makes the import fail
    model = load_dit(dit_file)
    with pytest.raises(ImportError, match=f"pip install {package}"):
        train_lora(model, [sample(0)], None, config(optimizer=optimizer), tmp_path / "run")
    assert not lora_modules(model) and not (tmp_path / "run" / "checkpoints").exists()


def test_missing_tensorboard_says_how_to_install(dit_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        train_lora(load_dit(dit_file), [sample(0)], None, config(tensorboard=True), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_schedule_free_files_hold_the_evaluation_weights_and_resume_exactly(dit_file, tmp_path):
    pytest.importorskip("schedulefree")
    samples = [sample(1), sample(2), sample(3, w=6)]
    cfg = config(max_steps=6, optimizer="adamw_schedulefree", learning_rate=1e-2, lr_schedule="constant_with_warmup",
                 warmup_steps=2, save_every=2, betas=(0.9, 0.999))
    straight = train_lora(load_dit(dit_file), samples, None, cfg, tmp_path / "a")
    with pytest.raises(Stop):
        train_lora(load_dit(dit_file), samples, None, cfg, tmp_path / "b", check_interrupt=interrupt_at(4))
    resumed = train_lora(load_dit(dit_file), samples, None, cfg, tmp_path / "b", resume=True)
    assert resumed.losses == straight.losses
    assert_same_lora(straight.lora_path, resumed.lora_path)

    # the saved weights are x = y + (1 − 1/β1)(z − y) (schedulefree's eval()), not the train-mode y
    ckpt = straight.checkpoint_dir
    state = torch.load(ckpt / "state.pt", weights_only=True)
    y = state["train_weights"]  # "<path>.lora_down" / ".lora_up", in the optimizer's parameter order
    z = dict(zip(y, (s["z"] for s in state["optimizer"]["state"].values())))
    saved = {f"{p}.{half}": t for p, pair in lora_tensors(ckpt / "lora.safetensors").items()
             for half, t in zip(("lora_down", "lora_up"), pair)}
    assert saved.keys() == y.keys() == z.keys()
    for name, x in saved.items():
        torch.testing.assert_close(x, y[name] + (1 - 1 / 0.9) * (z[name] - y[name]), rtol=0, atol=1e-6)
    assert any(not torch.equal(x, y[name]) for name, x in saved.items())
    assert_same_lora(ckpt / "lora.safetensors", straight.lora_path)


def test_grad_norm_is_reported_before_clipping_and_clipping_bounds_it(dit_file, tmp_path):
    seen = []

    def hook(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    handle = register_optimizer_step_pre_hook(hook)
    try:
        free, clipped = [], []
        train_lora(load_dit(dit_file), [sample(0)], None, config(max_steps=1, max_grad_norm=0.0), tmp_path / "a",
                   on_event=free.append)
        train_lora(load_dit(dit_file), [sample(0)], None, config(max_steps=1, max_grad_norm=1e-3), tmp_path / "b",
                   on_event=clipped.append)
    finally:
        handle.remove()
    norm = free[0].grad_norm
    assert norm > 1e-3 and seen[0] == pytest.approx(norm, rel=1e-5)  # not clipped, and the norm is the measured one
    assert clipped[0].grad_norm == pytest.approx(norm, rel=1e-6)  # reported before clipping
    assert seen[1] == pytest.approx(1e-3, rel=1e-4)  # the optimizer got the clipped gradients


# ---------------------------------------------------------------------------------------------------------------
# σ range and loss weighting


def test_sigma_range_maps_the_drawn_sigmas_affinely(dit_file, tmp_path):
    for method in ("shift", "logit_normal", "uniform", "shifted_logit_normal"):
        g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        free = sample_sigmas(method, 64, flow_shift=3.0, tokens=2000, generator=g1)
        ranged = sample_sigmas(method, 64, flow_shift=3.0, tokens=2000, generator=g2, sigma_min=0.2, sigma_max=0.6)
        torch.testing.assert_close(ranged, 0.2 + 0.4 * free, rtol=0, atol=1e-7)
        assert torch.equal(g1.get_state(), g2.get_state())  # no extra draws
    model = load_dit(dit_file)
    timesteps = []
    handle = model.register_forward_pre_hook(lambda m, args: timesteps.append(args[3].clone()))
    try:
        train_lora(model, [sample(0), sample(1)], None, config(max_steps=6, sigma_min=0.7, sigma_max=0.8),
                   tmp_path / "run")
    finally:
        handle.remove()
    t = torch.cat(timesteps)
    assert len(t) == 6 and bool(((t >= 700 - 1e-3) & (t <= 800 + 1e-3)).all())


def test_loss_weights_follow_the_sd3_formulas():
    sigma = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    assert loss_weights("none", sigma) is None
    torch.testing.assert_close(loss_weights("sigma_sqrt", sigma),
                               torch.tensor([1e6, 100.0, 4.0, 1 / 0.81, 1.0]), rtol=1e-6, atol=0)
    cosmap = torch.tensor([2 / (math.pi * (1 - 2 * s + 2 * s * s)) for s in sigma.tolist()])
    torch.testing.assert_close(loss_weights("cosmap", sigma), cosmap, rtol=1e-6, atol=0)

    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    s = torch.tensor([0.2, 0.5, 0.8])
    assert torch.equal(weighted_mse(pred, target, s), F.mse_loss(pred, target))
    per_sample = (pred - target).square().mean(dim=(1, 2))
    for scheme in ("sigma_sqrt", "cosmap"):
        want = (loss_weights(scheme, s) * per_sample).mean()
        torch.testing.assert_close(weighted_mse(pred, target, s, scheme), want, rtol=1e-6, atol=0)
    keep = torch.ones(3, 4, 1)
    keep[0, :2] = 0
    se = (pred - target).square()
    masked = (se * loss_weights("cosmap", s)[:, None, None] * keep).sum() / (keep.expand_as(se).sum())
    torch.testing.assert_close(weighted_mse(pred, target, s, "cosmap", keep=keep), masked, rtol=1e-6, atol=0)


def test_both_families_weight_each_sample_by_its_sigma(dit_file):
    g = torch.Generator().manual_seed(0)
    sigma = torch.tensor([0.2, 0.7])
    model = load_dit(dit_file)
    x0, noise = torch.randn(2, 16, 2, 4, 4, generator=g), torch.randn(2, 16, 2, 4, 4, generator=g)
    text = torch.randn(2, 3, model.config.in_text_dim, generator=g)
    pooled = torch.randn(2, model.config.in_text_dim2, generator=g)
    zeros = torch.zeros_like(x0)

    def k5(j=None, weighting="none"):
        sl = slice(None) if j is None else slice(j, j + 1)
        with torch.no_grad():
            return flow_matching_loss(model, x0[sl], noise[sl], sigma[sl], text[sl], pooled[sl], cond=zeros[sl],
                                      mask=zeros[sl, :1], weighting=weighting)

    for scheme in ("sigma_sqrt", "cosmap"):
        w = loss_weights(scheme, sigma)
        torch.testing.assert_close(k5(weighting=scheme), (w[0] * k5(0) + w[1] * k5(1)) / 2, rtol=1e-5, atol=0)

    h = LTX2Harness()
    ltx = h.model()
    video, vnoise = torch.randn(2, 12, 128, generator=g), torch.randn(2, 12, 128, generator=g)
    audio, anoise = torch.randn(2, 6, 128, generator=g), torch.randn(2, 6, 128, generator=g)
    vpos, apos = video_positions(2, 2, 3, fps=24.0), audio_positions(6)
    conditioned = torch.zeros(2, 12, dtype=torch.bool)
    conditioned[1, :6] = True
    with torch.no_grad():
        vctx, actx = h.projection.connect(torch.randn(2, 6, h.dim, generator=g), torch.ones(2, 6, dtype=torch.bool))

    def ltx2(j=None, weighting="none"):
        sl = slice(None) if j is None else slice(j, j + 1)
        with torch.no_grad():
            return ltx2_flow_matching_loss(ltx, video[sl], vnoise[sl], sigma[sl], video_context=vctx[sl],
                                           video_positions=vpos, audio=audio[sl], audio_noise=anoise[sl],
                                           audio_context=actx[sl], audio_positions=apos,
                                           conditioned=conditioned[sl], weighting=weighting)

    w = loss_weights("cosmap", sigma)
    both, first, second = ltx2(weighting="cosmap"), ltx2(0), ltx2(1)
    torch.testing.assert_close(both.parts["audio"], (w[0] * first.parts["audio"] + w[1] * second.parts["audio"]) / 2,
                               rtol=1e-5, atol=0)
    # video: the masked mean over both samples, sample 0 keeps 12 tokens and sample 1 keeps 6
    want = (12 * w[0] * first.parts["video"] + 6 * w[1] * second.parts["video"]) / 18
    torch.testing.assert_close(both.parts["video"], want, rtol=1e-5, atol=0)
    torch.testing.assert_close(both.total, both.parts["video"] + both.parts["audio"], rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# LoRA layers, start and dropout; checkpoints, EMA, held-out loss, TensorBoard


def test_include_and_exclude_patterns_choose_the_trained_layers(dit_file, tmp_path):
    cfg = config(max_steps=1, lora_include=[r"visual_transformer_blocks\.1\.(self|cross)_attention\."],
                 lora_exclude=[r".*cross_attention\.to_(key|value)$"])
    result = train_lora(load_dit(dit_file), [sample(0)], None, cfg, tmp_path / "run")
    block = "visual_transformer_blocks.1."
    want = [block + n for n in ("self_attention.to_query", "self_attention.to_key", "self_attention.to_value",
                                "self_attention.out_layer", "cross_attention.to_query", "cross_attention.out_layer")]
    assert sorted(lora_tensors(result.lora_path)) == sorted(want)
    model = load_dit(dit_file)
    with pytest.raises(LoRAError, match="pattern exclude .*feed_forward.*nothing. matches no Linear layer"):
        train_lora(model, [sample(0)], None, config(lora_exclude=[r".*feed_forward\.nothing"]), tmp_path / "bad")
    assert not lora_modules(model) and not (tmp_path / "bad").exists()


def test_init_lora_starts_at_the_files_update_and_resume_does_not_reread_it(dit_file, tmp_path):
    source = train_lora(load_dit(dit_file), [sample(0)], None, config(max_steps=2, learning_rate=1e-2),
                        tmp_path / "source").lora_path
    start = tmp_path / "start.safetensors"
    shutil.copy(source, start)
    model, first = load_dit(dit_file), []
    cfg = config(max_steps=3, alpha=8.0, init_lora=str(start), save_every=1)

    def capture_then_stop():  # the weights before step 1, then an interrupt before step 2
        if first:
            raise Stop("after step 1")
        first.append(weights_of(model))

    with pytest.raises(Stop):
        train_lora(model, [sample(1)], None, cfg, tmp_path / "run", check_interrupt=capture_then_stop)
    file = lora_tensors(start)
    assert first[0].keys() == file.keys()
    for p, (down, up) in first[0].items():
        assert torch.equal(down, file[p][0])
        torch.testing.assert_close(up, file[p][1] * (4 / 4) / (8 / 4), rtol=0, atol=0)  # same update at alpha 8
    start.unlink()  # the resumed run continues from its checkpoint, without the file
    assert train_lora(load_dit(dit_file), [sample(1)], None, cfg, tmp_path / "run", resume=True).steps == 3
    model = load_dit(dit_file)
    with pytest.raises(LoRAError, match="has rank 4, this run trains rank 8.*set the rank to 4"):
        train_lora(model, [sample(1)], None, config(rank=8, init_lora=str(source)), tmp_path / "other")
    assert not lora_modules(model) and not (tmp_path / "other").exists()


def test_lora_dropout_is_on_in_training_only_and_the_same_under_checkpointing(dit_file, tmp_path):
    s = sample(1)
    g = torch.Generator().manual_seed(3)
    x0, noise = (s.latent * 0.5)[None], torch.randn(1, *s.latent.shape, generator=g)
    zeros = torch.zeros_like(x0)
    outputs = {}

    def validate(step, model):  # called in eval mode; compares two forwards in each mode
        def loss():
            return flow_matching_loss(model, x0, noise, torch.tensor([0.5]), s.text[None], s.pooled[None],
                                      cond=zeros, mask=zeros[:, :1])

        outputs["eval"] = (loss(), loss())
        model.train()
        outputs["train"] = (loss(), loss())
        model.eval()

    samples = [s, sample(2)]
    runs = {flag: train_lora(load_dit(dit_file), samples, None,
                             config(max_steps=3, lora_dropout=0.5, gradient_checkpointing=flag), tmp_path / str(flag),
                             validate=validate, validate_every=3)
            for flag in (False, True)}
    assert torch.equal(*outputs["eval"]) and not torch.equal(*outputs["train"])
    # the recomputation in backward draws the same dropout masks as the forward
    assert runs[True].losses == pytest.approx(runs[False].losses, rel=1e-5)
    a, b = lora_tensors(runs[True].lora_path), lora_tensors(runs[False].lora_path)
    for p in a:
        torch.testing.assert_close(a[p][1], b[p][1], rtol=1e-4, atol=1e-6)


def test_checkpoints_every_n_epochs_and_the_events_name_them(dit_file, tmp_path):
    samples = [sample(1), sample(2), sample(3, w=6)]  # 3 steps per epoch
    events = []
    train_lora(load_dit(dit_file), samples, None, config(max_steps=10, save_every_epochs=2, save_every=4,
                                                         keep_checkpoints=0), tmp_path / "run", on_event=events.append)
    saved = [s for s, _ in list_checkpoints(tmp_path / "run")]
    assert saved == [4, 6, 8, 10]  # every 4 steps, the end of epoch 2 (step 6), the last step
    assert [e.step for e in events if e.checkpoint] == saved
    assert all(Path(e.checkpoint) == tmp_path / "run" / "checkpoints" / f"step_{e.step:06d}"
               for e in events if e.checkpoint)


def test_weight_ema_follows_its_formula(harness, tmp_path):
    model, d = harness.model(), 0.6
    history = []
    cfg = harness.config(max_steps=3, ema_decay=d, learning_rate=1e-2)
    result = train_lora(model, harness.samples()[:2], None, cfg, tmp_path / "run", adapter=harness.adapter,
                        check_interrupt=lambda: history.append(weights_of(model)) if not history else None,
                        on_event=lambda e: history.append(weights_of(model)))
    assert result.ema_lora_path == tmp_path / "run" / "lora_ema.safetensors"
    ema = {p: (dn.double(), up.double()) for p, (dn, up) in history[0].items()}
    for weights in history[1:]:
        ema = {p: (d * ema[p][0] + (1 - d) * weights[p][0], d * ema[p][1] + (1 - d) * weights[p][1]) for p in ema}
    saved = load_lora(result.ema_lora_path)
    assert saved.metadata["cinetune.ema_decay"] == "0.6" and saved.layers.keys() == ema.keys()
    for p, (down, up, alpha) in saved.layers.items():
        scale = (alpha / down.shape[0]) / (cfg.alpha / cfg.rank)  # LTX-2 files bake alpha/rank into up
        torch.testing.assert_close(down.double(), ema[p][0], rtol=0, atol=1e-6)
        torch.testing.assert_close(up.double() * scale, ema[p][1], rtol=0, atol=1e-6)
    last = load_lora(result.lora_path)
    assert any(not torch.equal(last.layers[p][1], saved.layers[p][1]) for p in ema)


def test_heldout_loss_is_fixed_does_not_change_training_and_survives_resume(dit_file, tmp_path):
    samples, holdout = [sample(1), sample(2)], [sample(7), sample(8, T=1, w=6)]
    cfg = config(max_steps=6, validation_loss_every=2, save_every=3)
    plain = train_lora(load_dit(dit_file), samples, None, config(max_steps=6, save_every=3), tmp_path / "plain")
    events = []
    model = load_dit(dit_file)
    straight = train_lora(model, samples, None, cfg, tmp_path / "a", holdout=holdout, on_event=events.append)
    assert straight.losses == plain.losses
    assert_same_lora(straight.lora_path, plain.lora_path)
    assert [e.step for e in events if e.validation_loss is not None] == [2, 4, 6]
    # the reported value is the documented mean over held-out samples × σ at the final LoRA
    apply_lora_unmerged(model, load_lora(straight.lora_path))
    model.eval()
    with torch.no_grad():
        again = heldout_loss(model, K5Harness.adapter, holdout, cfg, device=torch.device("cpu"))
    remove_lora(model)
    assert again == pytest.approx(events[-1].validation_loss, rel=1e-6)

    resumed_events = []
    with pytest.raises(Stop):
        train_lora(load_dit(dit_file), samples, None, cfg, tmp_path / "b", holdout=holdout,
                   check_interrupt=interrupt_at(5), on_event=resumed_events.append)
    train_lora(load_dit(dit_file), samples, None, cfg, tmp_path / "b", holdout=holdout, resume=True,
               on_event=resumed_events.append)
    got = {e.step: e.validation_loss for e in resumed_events if e.validation_loss is not None}
    assert got == {e.step: e.validation_loss for e in events if e.validation_loss is not None}


def test_tensorboard_files_hold_the_reported_scalars_once_per_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    h = LTX2Harness()
    samples = h.samples()[:3]
    cfg = h.config(max_steps=5, tensorboard=True, validation_loss_every=2, save_every=2, keep_checkpoints=0)
    events = []
    with pytest.raises(Stop):
        train_lora(h.model(), samples, None, cfg, tmp_path / "run", adapter=h.adapter, holdout=h.samples()[3:4],
                   check_interrupt=interrupt_at(4), on_event=events.append)
    # as if the process had been killed before its step-3 checkpoint: step 3 was logged and is trained again
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_000003")
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2]
    events = [e for e in events if e.step <= 2]
    train_lora(h.model(), samples, None, cfg, tmp_path / "run", adapter=h.adapter, holdout=h.samples()[3:4],
               resume=True, on_event=events.append)
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    assert {"loss/train", "loss/train_ema", "loss/video", "loss/audio", "loss/validation", "lr",
            "grad_norm"} <= set(acc.Tags()["scalars"])

    def series(tag):
        return [(s.step, s.value) for s in acc.Scalars(tag)]

    assert series("loss/train") == [(e.step, pytest.approx(e.loss, rel=1e-6)) for e in events]
    assert series("loss/audio") == [(e.step, pytest.approx(e.loss_terms["audio"], rel=1e-6)) for e in events]
    assert series("grad_norm") == [(e.step, pytest.approx(e.grad_norm, rel=1e-6)) for e in events]
    assert series("lr") == [(e.step, pytest.approx(e.lr, rel=1e-6)) for e in events]
    assert series("loss/validation") == [(e.step, pytest.approx(e.validation_loss, rel=1e-6))
                                         for e in events if e.validation_loss is not None]
    assert [s for s, _ in series("loss/validation")] == [2, 4, 5]


# ---------------------------------------------------------------------------------------------------------------
# Everything at once


@pytest.mark.parametrize("family, optimizer", [("k5", "prodigy"), ("k5", "adamw_schedulefree"), ("ltx2", "prodigy")])
def test_resume_is_exact_with_every_setting_on(dit_file, tmp_path, family, optimizer):
    harness = K5Harness(dit_file) if family == "k5" else LTX2Harness()
    pytest.importorskip("prodigyopt" if optimizer == "prodigy" else "schedulefree")
    pytest.importorskip("tensorboard")
    samples, empty = harness.samples(), harness.empty()
    holdout = samples[-1:]
    lora = dict(rank=4, lora_exclude=[r"(text_|visual_)?transformer_blocks\.0\."], lora_dropout=0.2,
                rank_dropout=0.25, module_dropout=0.1)
    init = write_start_lora(harness, harness.config(**lora), tmp_path / "start.safetensors")
    schedule = dict(lr_schedule="cosine", min_lr_ratio=0.2, ema_decay=0.9, learning_rate=1.0) \
        if optimizer == "prodigy" else dict(lr_schedule="constant_with_warmup", learning_rate=1e-2)
    cfg = harness.config(max_steps=7, batch_size=2, grad_accum=2, warmup_steps=1, i2v="first", i2v_prob=0.5,
                         caption_dropout=0.3, seed=5, optimizer=optimizer, weight_decay=0.01, betas=(0.8, 0.9),
                         eps=1e-7, max_grad_norm=0.05, sigma_min=0.1, sigma_max=0.9, init_lora=str(init), **lora,
                         loss_weighting="cosmap", save_every=3, save_every_epochs=2, keep_checkpoints=2,
                         tensorboard=True, validation_loss_every=2, validation_loss_sigmas=(0.3, 0.8), **schedule)
    events, resumed_events = [], []
    straight = train_lora(harness.model(), samples, empty, cfg, tmp_path / "a", adapter=harness.adapter,
                          holdout=holdout, on_event=events.append)
    with pytest.raises(Stop):
        train_lora(harness.model(), samples, empty, cfg, tmp_path / "b", adapter=harness.adapter, holdout=holdout,
                   check_interrupt=interrupt_at(6), on_event=resumed_events.append)
    resumed = train_lora(harness.model(), samples, empty, cfg, tmp_path / "b", adapter=harness.adapter,
                         holdout=holdout, resume=True, on_event=resumed_events.append)
    assert resumed.steps == 7 and resumed.losses == straight.losses
    for name in ("lora.safetensors", "checkpoints/step_000007/lora.safetensors"):
        assert_same_lora(tmp_path / "a" / name, tmp_path / "b" / name)
    if optimizer == "prodigy":
        assert_same_lora(straight.ema_lora_path, resumed.ema_lora_path)
    by_step = {e.step: e for e in resumed_events}
    for e in events:
        assert by_step[e.step].validation_loss == e.validation_loss
        assert by_step[e.step].grad_norm == e.grad_norm


def write_start_lora(harness, cfg, path: Path) -> Path:
    """A LoRA file on the layers ``cfg`` trains, with non-zero updates, in the family's saved layout."""
    model = harness.model()
    modules = inject_lora(model, rank=cfg.rank, alpha=2.0, targets=harness.adapter.lora_targets(cfg),
                          within=harness.adapter.lora_within, include=cfg.lora_include, exclude=cfg.lora_exclude,
                          generator=torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for m in modules.values():
            m.lora_up.copy_(0.05 * torch.randn(m.lora_up.shape, generator=g))
    return harness.adapter.save_lora(path, modules, dtype=torch.float32, metadata={})

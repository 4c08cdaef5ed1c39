"""Kandinsky 5 peak-memory estimate (k5/memory.py).

- Block formulas against the CPU allocator on real K5 blocks (two widths, fp32/bf16, with/without LoRA).
- Whole-step estimates against the measured peak (``core.memory.measure_cpu_peak``) of the real sampler
  (``k5.pipeline.sample``, one step in ``inference_mode``) and of a LoRA training step written as
  ``training/trainer.py`` runs it (``inject_lora``, AdamW, ``gradient_checkpointing``, ``k5/train.py``'s ``flow_matching_loss``,
  clipping, optimizer step) for the tiny and a medium DiT, fp32 and bf16, two token counts, with and without block
  swap on CPU (where the swapped blocks' masters live in the same memory: measured = ``total + host_bytes``).
  Tolerance 15 %.
- Weights, tokens, CFG, fp8, NABLA, errors and the user text.
"""

from __future__ import annotations

import pytest
import torch

from cinetune.core import block_sparse
from cinetune.core.lora import inject_lora
from cinetune.core.memory import BlockActivations, measure_block_activations, measure_cpu_peak
from cinetune.core.offload import model_on_device
from cinetune.core.quant import quantize_linear_weights_fp8
from cinetune.k5.conditioning import K5TextEmbeds
from cinetune.k5.config import LITE_CONFIG, PRO_CONFIG, K5Config
from cinetune.k5.dit import (
    FF_CHUNK_TOKENS,
    Kandinsky5DiT,
    TextBlock,
    VisualBlock,
    k5_fp8_keep_high_precision,
    rope_1d,
    rope_3d,
)
from cinetune.k5.family import K5_BLOCK_PREFIXES, K5_LORA_TARGETS
from cinetune.k5.memory import (
    describe_k5,
    estimate_k5_memory,
    format_k5_estimate,
    k5_block_activations,
    k5_tokens,
    nabla_keeps_every_block,
    smallest_fitting_swap,
)
from cinetune.k5.nabla import NablaConfig
from cinetune.k5.pipeline import SizeError, latent_shape, sample
from cinetune.k5.tiny import TINY_DIT_DIMS
from cinetune.k5.vae import SCALING_FACTOR
from cinetune.training.schedules import make_optimizer
from cinetune.k5.train import K5_TRAINING, flow_matching_loss
from cinetune.training.trainer import gradient_checkpointing

TOLERANCE = 0.15
TINY = K5Config(**TINY_DIT_DIMS)
MEDIUM = K5Config(model_dim=256, ff_dim=1024, time_dim=64, num_text_blocks=1, num_visual_blocks=4,
                  axes_dims=(8, 12, 12), in_text_dim=64, in_text_dim2=64)
CONFIGS = {"tiny": TINY, "medium": MEDIUM}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TEXT_TOKENS, VALID_TOKENS = 32, 24  # padded prompt length in the sampler; caption length in training


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def blocks_of(model):
    return [*model.text_transformer_blocks, *model.visual_transformer_blocks]


# ---------------------------------------------------------------------------------------------------------------
# Block formulas


BLOCK_DIMS = {"narrow": (64, 128, (8, 12, 12)), "wide": (128, 512, (16, 24, 24))}  # D, F (2D and 4D), RoPE axes


def make_block(kind: str, dims: str, dtype: torch.dtype, rank: int, tokens: int, text: int = 32):
    """A real K5 block with frozen weights (+ LoRA), its inputs for one sample, and its config."""
    D, F, axes = BLOCK_DIMS[dims]
    config = K5Config(model_dim=D, ff_dim=F, time_dim=64, num_text_blocks=1, num_visual_blocks=1, axes_dims=axes)
    torch.manual_seed(0)
    block = (VisualBlock if kind == "visual" else TextBlock)(D, 64, F, config.head_dim).to(dtype)
    block.requires_grad_(False)
    params = []
    if rank:
        modules = inject_lora(block, rank=rank, alpha=rank, targets=K5_LORA_TARGETS, within=None)
        params = [p for m in modules.values() for p in (m.lora_down, m.lora_up)]

    def inputs(t: int):
        x = torch.randn(1, t, D, dtype=dtype, requires_grad=True)
        c = torch.randn(1, 64)
        if kind == "visual":
            return (x, torch.randn(1, text, D, dtype=dtype), c, rope_3d((1, t // 16, 16), axes, (1, 2, 2))), {}
        return (x, c, rope_1d(t, config.head_dim)), {}

    return block, inputs, config, params


def block_numbers(kind, config, dtype, rank, training, tokens, text=32) -> BlockActivations:
    """The formulas for one block at ``tokens`` tokens (a visual block attends to ``text`` text tokens)."""
    acts = k5_block_activations(config, compute_dtype=dtype, training=training, lora_rank=rank, device_type="cpu",
                                text_tokens=tokens if kind == "text" else text, visual_tokens=tokens)
    return acts[0] if kind == "text" else acts[-1]


@pytest.mark.parametrize("rank", [0, 8], ids=["base", "lora"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("dims", ["narrow", "wide"])
@pytest.mark.parametrize("kind", ["visual", "text"])
def test_block_formulas_match_the_cpu_allocator(kind, dims, dtype, rank):
    """Forward (no grad) and forward + backward of one block, each in one measured window, against the formulas at
    1024 tokens; and the saved bytes per token against measure_block_activations' slope."""
    t = 1024
    block, inputs, config, params = make_block(kind, dims, DTYPES[dtype], rank, t)
    args, kwargs = inputs(t)

    def infer():
        with torch.inference_mode():
            return block(*args, **kwargs)

    grad = torch.randn(1, t, config.model_dim, dtype=DTYPES[dtype])

    def train():
        out = block(*args, **kwargs)
        out.backward(grad)
        args[0].grad = None
        for p in params:
            p.grad = None

    train()  # warm-up
    forward_peak = measure_cpu_peak(infer).peak
    window_peak = measure_cpu_peak(train).peak

    inf = block_numbers(kind, config, dtype, rank, False, t)
    trn = block_numbers(kind, config, dtype, rank, True, t)
    assert abs(inf.forward * t - forward_peak) <= 0.03 * forward_peak, (inf.forward * t, forward_peak)
    # the window holds the block output and the LoRA gradients: the core estimate's 2·hidden + saved + backward
    lora_grads = storage_bytes(params)
    expected = (2 * trn.hidden + trn.saved + trn.backward) * t + lora_grads
    assert abs(expected - window_peak) <= 0.06 * window_peak, (expected, window_peak)

    measured = measure_block_activations(block, inputs, tokens=(256, 512))
    coefficients = k5_block_activations(config, compute_dtype=dtype, training=True, lora_rank=rank,
                                        device_type="cpu")[0 if kind == "text" else -1]
    assert measured.hidden == coefficients.hidden == config.model_dim * DTYPES[dtype].itemsize
    assert abs(measured.saved - coefficients.saved) <= 0.01 * coefficients.saved, (measured, coefficients)
    # with LoRA a plain forward keeps the GELU input in place of the GELU output (core.recompute.mlp)
    assert coefficients.recomputed == (config.ff_dim * DTYPES[dtype].itemsize if rank else 0)
    assert abs(measured.recomputed - coefficients.recomputed) <= 0.01 * coefficients.saved, (measured, coefficients)


def test_block_formulas_scale_with_width():
    """The per-token numbers are linear in D for F = 4D (units of D·s), so a narrow block predicts Pro's."""
    for dtype, s in (("bf16", 2), ("fp32", 4)):
        per_d = []
        for config in (LITE_CONFIG, PRO_CONFIG):
            v = k5_block_activations(config, compute_dtype=dtype, training=True, device_type="cuda")[-1]
            per_d.append((v.forward / config.model_dim, v.backward / config.model_dim))
        assert per_d[0] == pytest.approx(per_d[1], rel=1e-9)
    lite = k5_block_activations(LITE_CONFIG, compute_dtype="bf16", training=False)[-1]
    D, F, H = 1792, 7168, 28
    assert lite.hidden == 2 * D
    assert lite.forward == 20 * D  # RoPE of k (and the unsliced FFN): 5·s·D + u·D + 4D + s·D
    assert lite.saved == 36 * D + 2 * F + 20 * H + 24  # the documented visual formula in bf16
    assert lite.backward == 2 * D + 2 * 2 * F - 2 * D  # GELU backward + residual cast − the released output
    lora = k5_block_activations(LITE_CONFIG, compute_dtype="bf16", training=True, lora_rank=16)[-1]
    # the adapters add only their down-projection output (the up-projection accumulates into the base output in
    # place), so GELU and the RoPE of k stay the forward peak
    assert lora.forward == 20 * D
    assert lora.saved == lite.saved + 3 * 2 * D + 2 * F + 8 * 2 * 16


def test_long_inference_sequences_run_the_ffn_in_slices():
    short = k5_block_activations(LITE_CONFIG, compute_dtype="fp32", training=False, text_tokens=256,
                                 visual_tokens=FF_CHUNK_TOKENS)[-1]
    long = k5_block_activations(LITE_CONFIG, compute_dtype="fp32", training=False, text_tokens=256,
                                visual_tokens=8 * FF_CHUNK_TOKENS)[-1]
    train = k5_block_activations(LITE_CONFIG, compute_dtype="fp32", training=True, text_tokens=256,
                                 visual_tokens=8 * FF_CHUNK_TOKENS)[-1]
    assert short.forward == 40 * 1792  # fp32, FFN not sliced: 2·s·D + 2·s·F
    assert long.forward < 0.7 * short.forward  # sliced: the F-wide tensors are a constant
    assert train.forward == short.forward  # never sliced with autograd


# ---------------------------------------------------------------------------------------------------------------
# Whole steps against the measured peak


def text_embeds(config: K5Config, dtype: torch.dtype, seed: int) -> K5TextEmbeds:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, TEXT_TOKENS, dtype=torch.bool)
    mask[:, :VALID_TOKENS] = True  # right padding, as the text encoder returns it
    return K5TextEmbeds(torch.randn(1, TEXT_TOKENS, config.in_text_dim, generator=g).to(dtype), mask,
                        torch.randn(1, config.in_text_dim2, generator=g).to(dtype))


def make_model(config: K5Config, dtype: torch.dtype, fp8: bool = False) -> Kandinsky5DiT:
    torch.manual_seed(0)
    model = Kandinsky5DiT(config).to(dtype)
    if fp8:
        quantize_linear_weights_fp8(model, keep=k5_fp8_keep_high_precision)
    return model.requires_grad_(False)


def measure_sampler(config, dtype, size, *, swap=0, guidance=1.0, nabla=None, fp8=False) -> tuple[int, object]:
    """Weights (+ swap ring and masters) + the allocator peak of one ``sample`` step in inference_mode."""
    width, height, frames = size
    model = make_model(config, dtype, fp8).eval()
    positive, negative = text_embeds(config, dtype, 1), text_embeds(config, dtype, 2)
    with model_on_device(model, blocks_of(model), "cpu", blocks_to_swap=swap, ring_size=2) as bs:
        buffers = [*bs._slots, *(b.master for b in bs._swapped.values())]
        weights = storage_bytes([*model.parameters(), *model.buffers(), *buffers])

        def step():
            with torch.inference_mode():
                return sample(model, positive, negative if guidance != 1.0 else None, width=width, height=height,
                              frames=frames, seed=0, steps=1, guidance=guidance, scheduler_scale=5.0,
                              device="cpu", dtype=dtype, nabla=nabla)

        return weights + measure_cpu_peak(step).peak, model


def measure_training(config, dtype, size, *, swap=0, rank=8, fp8=False, nabla=None) -> tuple[int, object]:
    """Weights, LoRA, optimizer state (+ swap buffers) + the allocator peak of the second training step, the step
    written as training/trainer.py runs it (the dataset sample itself is host data, not counted)."""
    width, height, frames = size
    model = make_model(config, dtype, fp8)
    C, T, h, w = latent_shape(width, height, frames)
    cached_latent, cached_text, cached_pooled = (torch.randn(C, T, h, w), torch.randn(VALID_TOKENS, config.in_text_dim),
                                                 torch.randn(config.in_text_dim2))
    with (model_on_device(model, blocks_of(model), "cpu", blocks_to_swap=swap, ring_size=2) as bs,
          torch.enable_grad()):
        modules = inject_lora(model, rank=rank, alpha=rank, targets=K5_LORA_TARGETS, within=K5_BLOCK_PREFIXES,
                              dtype=torch.float32)
        params = [p for m in modules.values() for p in (m.lora_down, m.lora_up)]
        optimizer = make_optimizer(params, "adamw", lr=1e-4, weight_decay=1e-3, betas=(0.9, 0.95), eps=1e-8)
        model.train()

        def micro_batch_loss():  # _Run._micro_batch_loss for one text-to-video sample
            latent = torch.stack([cached_latent])
            x0 = latent * SCALING_FACTOR
            noise = torch.randn(latent.shape)
            cond, mask = torch.zeros_like(x0), torch.zeros((1, 1, *x0.shape[2:]))
            text = torch.zeros(1, VALID_TOKENS, config.in_text_dim, dtype=dtype)
            text[0] = cached_text.to(dtype)
            pooled = torch.stack([cached_pooled.float()])
            return flow_matching_loss(model, x0, noise, torch.rand(1), text, pooled, cond=cond, mask=mask,
                                      compute_dtype=dtype, nabla=nabla)

        def step():  # forward_backward + the optimizer step of _loop
            optimizer.zero_grad(set_to_none=True)
            loss = micro_batch_loss()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        with gradient_checkpointing(K5_TRAINING.blocks(model), True):
            step()  # the optimizer state exists from the first step on
            state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
            buffers = [*bs._slots, *(b.master for b in bs._swapped.values())]
            before = storage_bytes([*model.parameters(), *model.buffers(), *state, *buffers])
            return before + measure_cpu_peak(step).peak, model


def estimate(config, dtype, size, training, **kw):
    width, height, frames = size
    return estimate_k5_memory(config, width=width, height=height, frames=frames,
                              text_tokens=VALID_TOKENS if training else TEXT_TOKENS,
                              weight_dtype=kw.pop("weight_dtype", dtype),
                              compute_dtype=dtype, device_type="cpu", training=training,
                              lora_rank=8 if training else 0, cfg=kw.pop("cfg", False), **kw)


def check(measured: int, est, what) -> None:
    device_total = est.total + est.host_bytes  # on CPU the swapped blocks' masters are in the same memory
    assert abs(device_total - measured) <= TOLERANCE * measured, (what, device_total, measured, est.format())
    # the activations are a large share, so the check is about them and not only about the weights
    assert est.activations > 0.3 * device_total, (what, est.format())


SIZES = {  # (inference sizes, training sizes): two token counts each
    "tiny": (((256, 256, 17), (512, 512, 17)), ((256, 256, 17), (512, 256, 17))),  # 1280/5120, 1280/2560 tokens
    "medium": (((256, 256, 17), (512, 256, 17)), ((256, 256, 17), (512, 256, 17))),  # 1280/2560 tokens
}


@pytest.mark.parametrize("which", [0, 1], ids=["fewer_tokens", "more_tokens"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["tiny", "medium"])
def test_inference_estimate_matches_measured_peak(name, dtype, which):
    size = SIZES[name][0][which]
    measured, _ = measure_sampler(CONFIGS[name], DTYPES[dtype], size)
    check(measured, estimate(CONFIGS[name], dtype, size, False), (name, dtype, size))


@pytest.mark.parametrize("which", [0, 1], ids=["fewer_tokens", "more_tokens"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["tiny", "medium"])
def test_training_estimate_matches_measured_peak(name, dtype, which):
    size = SIZES[name][1][which]
    measured, _ = measure_training(CONFIGS[name], DTYPES[dtype], size)
    check(measured, estimate(CONFIGS[name], dtype, size, True), (name, dtype, size))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["tiny", "medium"])
def test_block_swap_estimates_match_measured_peak(name, dtype):
    """Inference with 2 of the blocks swapped, training with all blocks but one swapped (ring of 2)."""
    config = CONFIGS[name]
    size = (256, 256, 17)
    measured, _ = measure_sampler(config, DTYPES[dtype], size, swap=2)
    est = estimate(config, dtype, size, False, blocks_to_swap=2)
    assert est.swap_ring == 2 * describe_k5(config).blocks[-1].float_elements * DTYPES[dtype].itemsize
    check(measured, est, (name, dtype, "inference swap"))
    n = config.num_text_blocks + config.num_visual_blocks
    measured, _ = measure_training(config, DTYPES[dtype], size, swap=n - 1)
    check(measured, estimate(config, dtype, size, True, blocks_to_swap=n - 1), (name, dtype, "training swap"))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cfg_nabla_and_fp8_estimates_match_measured_peak(dtype):
    size = (256, 256, 17)
    measured, _ = measure_sampler(TINY, DTYPES[dtype], size, guidance=5.0)
    check(measured, estimate(TINY, dtype, size, False, cfg=True), "cfg")
    measured, _ = measure_sampler(MEDIUM, DTYPES[dtype], size, nabla=NablaConfig())
    check(measured, estimate(MEDIUM, dtype, size, False, nabla=True), "nabla")
    measured, model = measure_sampler(MEDIUM, DTYPES[dtype], size, fp8=True)
    check(measured, estimate(MEDIUM, dtype, size, False, weight_dtype="default", model=model), "fp8 inference")
    measured, model = measure_training(TINY, DTYPES[dtype], size, fp8=True)
    fp8_model = make_model(TINY, DTYPES[dtype], fp8=True)  # described before LoRA injection
    check(measured, estimate(TINY, dtype, size, True, weight_dtype="default", model=fp8_model), "fp8 training")


@pytest.mark.parametrize("dtype, training", [("fp32", False), ("bf16", False), ("fp32", True)])
def test_nabla_gathered_path_estimates_match_measured_peak(dtype, training, monkeypatch):
    """NABLA on the gathered path (the CPU default) at a size where the STA window does not cover the grid (3×2×4
    blocks): rows are partially kept, so keys and values are gathered, in the sampler and in a training step.

    The estimate sizes the gather workspace for the worst mask; the per-call budget is lowered here to what real
    sizes reach (the gathered keys of one call fill it), so the measured workspace is the one the estimate counts.
    """
    monkeypatch.setattr(block_sparse, "_GATHER_ELEMENTS", {"cpu": 1 << 16})
    size = (512, 256, 9)
    assert not nabla_keeps_every_block(NablaConfig(), *size)
    assert nabla_keeps_every_block(NablaConfig(), 256, 256, 17)
    measure = measure_training if training else measure_sampler
    measured, _ = measure(MEDIUM, DTYPES[dtype], size, nabla=NablaConfig())
    check(measured, estimate(MEDIUM, dtype, size, training, nabla=True), ("nabla", dtype, training))


# ---------------------------------------------------------------------------------------------------------------
# Weights, tokens, settings


def test_tokens_and_size_errors():
    assert k5_tokens(768, 512, 121) == 31 * 32 * 48 == 47_616
    assert k5_tokens(512, 512, 49) == 13 * 32 * 32
    with pytest.raises(SizeError, match="width 500 is not a multiple of 16: use 496 or 512"):
        k5_tokens(500, 512, 121)
    with pytest.raises(SizeError, match="multiples of 128"):
        estimate_k5_memory(LITE_CONFIG, width=784, height=512, frames=121, nabla=True)
    with pytest.raises(SizeError, match="4k\\+1"):
        estimate_k5_memory(LITE_CONFIG, width=768, height=512, frames=120)


def test_weights_of_the_released_models_without_allocating():
    describe_k5.cache_clear()
    result = measure_cpu_peak(lambda: estimate_k5_memory(PRO_CONFIG, width=768, height=512, frames=121))
    assert result.peak < 16e6  # described on the meta device: no weight is allocated
    pro = result.result
    lite = estimate_k5_memory(LITE_CONFIG, width=768, height=512, frames=121)
    assert lite.resident_weights == pytest.approx(2.008e9 * 2, rel=0.01)  # k5.md §10: 2.008B params, ≈ 4.0 GB
    assert pro.resident_weights == pytest.approx(38.6e9, rel=0.01)  # 19.31B params, ≈ 38.6 GB bf16
    stored = estimate_k5_memory(LITE_CONFIG, width=768, height=512, frames=121, weight_dtype="default")
    assert stored.resident_weights == pytest.approx(4.6e9, rel=0.02)  # fp32 modulations: ≈ 4.6 GB
    fp8 = estimate_k5_memory(PRO_CONFIG, width=768, height=512, frames=121, weight_dtype="fp8_e4m3fn",
                             stored_modulation_dtype="bf16")
    assert 0.5 * pro.resident_weights < fp8.resident_weights < 0.65 * pro.resident_weights
    # block swap: N blocks' bytes move to host memory, the ring holds 2 of the largest
    swap = estimate_k5_memory(PRO_CONFIG, width=768, height=512, frames=121, blocks_to_swap=40)
    visual_block = describe_k5(PRO_CONFIG).blocks[-1]
    assert swap.host_bytes == 40 * visual_block.float_elements * 2
    assert swap.swap_ring == 2 * visual_block.float_elements * 2
    assert swap.resident_weights + swap.host_bytes == pro.resident_weights
    assert swap.activations == pro.activations


def test_sanity_of_the_release_sizes():
    """Plausibility against k5.md §10 (no measurement): Lite/Pro bf16 inference at 768×512×121, Pro fp8 LoRA."""
    lite = estimate_k5_memory(LITE_CONFIG, width=768, height=512, frames=121)
    pro = estimate_k5_memory(PRO_CONFIG, width=768, height=512, frames=121)
    assert 1.0e9 < lite.activations < 4e9 and 2e9 < pro.activations < 8e9
    assert pro.total < 80e9  # fits one 80 GB GPU without swap
    lite_lora = estimate_k5_memory(LITE_CONFIG, width=512, height=512, frames=49, training=True, lora_rank=16)
    assert 5e9 < lite_lora.total < 20e9  # SimpleTuner reports ~13 GB for a Lite LoRA
    pro_fp8 = estimate_k5_memory(PRO_CONFIG, width=512, height=512, frames=49, training=True, lora_rank=16,
                                 weight_dtype="fp8_e4m3fn", blocks_to_swap=40)
    assert pro_fp8.total < 32e9 and pro_fp8.host_bytes > 10e9 and pro_fp8.peak_block == 63


def test_cfg_costs_one_velocity_and_one_prompt_not_a_second_batch():
    kw = {"width": 768, "height": 512, "frames": 121, "text_tokens": 256}
    with_cfg = estimate_k5_memory(LITE_CONFIG, cfg=True, **kw)
    without = estimate_k5_memory(LITE_CONFIG, cfg=False, **kw)
    tokens = k5_tokens(768, 512, 121)
    assert with_cfg.activations - without.activations == pytest.approx(tokens * 4 * 16 * 4 + 256 * 3584 * 2, abs=4)
    batched = estimate_k5_memory(LITE_CONFIG, cfg=False, batch=2, **kw)
    assert batched.activations > 1.8 * without.activations


def test_training_settings():
    kw = {"width": 512, "height": 512, "frames": 49, "training": True, "lora_rank": 16}
    base = estimate_k5_memory(LITE_CONFIG, **kw)
    assert base.training and base.lora == base.gradients and base.optimizer_state == 2 * base.lora
    assert estimate_k5_memory(LITE_CONFIG, optimizer="adamw8bit", **kw).optimizer_state == base.lora // 2
    no_ckpt = estimate_k5_memory(LITE_CONFIG, gradient_checkpointing=False, **kw)
    assert no_ckpt.activations > 3 * base.activations
    math = estimate_k5_memory(LITE_CONFIG, math_attention=True, **kw)
    assert math.attention_workspace == 2 * (2 * 28 * 2) * k5_tokens(512, 512, 49) ** 2
    nabla = estimate_k5_memory(LITE_CONFIG, nabla=True, **kw)
    assert base.activations < nabla.activations < 1.5 * base.activations


def test_errors():
    kw = {"width": 512, "height": 512, "frames": 49}
    with pytest.raises(ValueError, match="device_type must be one of cuda, cpu"):
        estimate_k5_memory(LITE_CONFIG, device_type="mps", **kw)
    with pytest.raises(ValueError, match="weight_dtype must be one of default, bf16"):
        estimate_k5_memory(LITE_CONFIG, weight_dtype="int4", **kw)
    with pytest.raises(ValueError, match="training needs lora_rank"):
        estimate_k5_memory(LITE_CONFIG, training=True, **kw)
    with pytest.raises(ValueError, match="maximum 34"):
        estimate_k5_memory(LITE_CONFIG, blocks_to_swap=35, **kw)
    with pytest.raises(ValueError, match="needs gradient checkpointing"):
        estimate_k5_memory(LITE_CONFIG, training=True, lora_rank=4, blocks_to_swap=10, gradient_checkpointing=False,
                           **kw)
    with pytest.raises(ValueError, match="compute_dtype"):
        estimate_k5_memory(LITE_CONFIG, compute_dtype="int8", **kw)
    with pytest.raises(TypeError, match="K5Config"):
        estimate_k5_memory({"model_dim": 1792}, **kw)
    with pytest.raises(ValueError, match="stored_modulation_dtype"):
        describe_k5(LITE_CONFIG, "fp64")
    with torch.device("meta"):
        dit = Kandinsky5DiT(TINY)
    inject_lora(dit, rank=4, alpha=4, targets=K5_LORA_TARGETS, within=K5_BLOCK_PREFIXES)
    with pytest.raises(ValueError, match="before injecting LoRA"):
        estimate_k5_memory(TINY, weight_dtype="default", model=dit, **kw)
    with pytest.raises(TypeError, match="Kandinsky 5 DiT"):
        estimate_k5_memory(TINY, weight_dtype="default", model=torch.nn.Linear(2, 2), **kw)


def test_format_for_users():
    est = estimate_k5_memory(PRO_CONFIG, width=512, height=512, frames=49, training=True, lora_rank=16,
                             weight_dtype="fp8_e4m3fn", blocks_to_swap=40)
    text = format_k5_estimate(est, available_bytes=int(16e9), model="Pro", width=512, height=512, frames=49,
                              tokens=k5_tokens(512, 512, 49), weight_dtype="fp8_e4m3fn", training=True,
                              lora_rank=16, blocks_to_swap=40)
    lines = text.splitlines()
    gb = est.total / 1e9
    assert lines[0].startswith(f"Estimated peak GPU memory: {gb:.1f} GB (weights ")
    assert " resident + 0.8 GB swap ring, activations " in lines[0] and "LoRA + gradients + optimizer" in lines[0]
    assert lines[1] == f"Block swap keeps {est.host_bytes / 1e9:.1f} GB of weights in CPU memory."
    assert lines[2] == ("Settings: Pro, 512×512, 49 frames (13,312 tokens), fp8_e4m3fn weights, training, "
                        "LoRA rank 16, 40 blocks swapped.")
    assert lines[3].startswith("Does not fit in the 16.0 GB available (short by ")
    inference = estimate_k5_memory(LITE_CONFIG, width=768, height=512, frames=121)
    text = format_k5_estimate(inference, cfg=True, training=False)
    assert text.splitlines()[0] == (f"Estimated peak GPU memory: {inference.total / 1e9:.1f} GB (weights "
                                    f"{inference.resident_weights / 1e9:.1f} GB resident, activations "
                                    f"{inference.activations / 1e9:.1f} GB)")
    assert "inference with CFG (two forwards in turn)" in text


def test_nabla_path_in_the_estimate_and_the_text(monkeypatch):
    kw = dict(width=768, height=512, frames=121, nabla=True, compute_dtype="bf16")
    flex = estimate_k5_memory(LITE_CONFIG, **kw)
    assert flex.total == estimate_k5_memory(LITE_CONFIG, nabla_path="flex compiled", **kw).total
    gathered = estimate_k5_memory(LITE_CONFIG, nabla_path="gathered", **kw)
    dense = estimate_k5_memory(LITE_CONFIG, nabla_path="masked dense", **kw)
    assert len({flex.total, gathered.total, dense.total}) == 3
    cpu = dict(kw, device_type="cpu", compute_dtype="fp32")
    assert estimate_k5_memory(LITE_CONFIG, **cpu).total == estimate_k5_memory(
        LITE_CONFIG, nabla_path="gathered", **cpu).total
    with pytest.raises(ValueError, match="nabla_path must be one of gathered, masked dense on cpu"):
        estimate_k5_memory(LITE_CONFIG, nabla_path="flex compiled", **cpu)
    with pytest.raises(ValueError, match="nabla must be a NablaConfig"):
        estimate_k5_memory(LITE_CONFIG, **dict(kw, nabla="on"))
    # masks that keep every block gather nothing: the gathered path then needs less than with sparse masks (with a
    # gather budget large enough for the gather workspace to set the peak at this small size)
    monkeypatch.setattr(block_sparse, "_GATHER_ELEMENTS", {"cpu": 1 << 24})
    small = dict(cpu, width=512, height=256, frames=9)
    every = estimate_k5_memory(LITE_CONFIG, **dict(small, nabla=NablaConfig(P=1.0)))
    assert every.total < estimate_k5_memory(LITE_CONFIG, **small).total
    text = format_k5_estimate(gathered, model="Lite", nabla_path="gathered")
    assert "NABLA attention: gathered block-sparse path, no compiler needed (dropped blocks skipped)." in text
    assert "NABLA" not in format_k5_estimate(gathered, model="Lite", nabla_path=None)


def test_smallest_fitting_swap_names_the_least_blocks_to_swap_that_fits():
    kw = dict(width=512, height=512, frames=49, training=True, lora_rank=16, weight_dtype="fp8_e4m3fn")
    at = {n: estimate_k5_memory(PRO_CONFIG, blocks_to_swap=n, **kw).total for n in range(0, 65)}
    budget = int(at[30]) + 1
    n, est = smallest_fitting_swap(PRO_CONFIG, budget, **kw)
    assert est.total <= budget and est.total == at[n] and n <= 30
    assert all(at[m] > budget for m in range(n))  # nothing smaller fits
    assert smallest_fitting_swap(PRO_CONFIG, budget, blocks_to_swap=40, **kw)[0] == 40  # starts at the setting
    assert smallest_fitting_swap(PRO_CONFIG, int(min(at.values())) - 1, **kw) is None
    with pytest.raises(ValueError, match="available_bytes must be an int"):
        smallest_fitting_swap(PRO_CONFIG, -1, **kw)

    now = estimate_k5_memory(PRO_CONFIG, **kw)
    text = format_k5_estimate(now, available_bytes=budget, fitting_swap=(n, est), training=True)
    assert (f"set blocks_to_swap to {n} or more on the model loader (estimated peak {est.total / 1e9:.1f} GB, "
            f"{est.host_bytes / 1e9:.1f} GB of weights in CPU memory)") in text
    text = format_k5_estimate(now, available_bytes=int(1e9), fitting_swap=None, training=True)
    assert "even with every block swapped: load fp8 weights" in text

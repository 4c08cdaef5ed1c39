"""LTX-2 peak-memory estimate (ltx2/memory.py).

- The block replay against the CPU allocator (``core.memory.measure_cpu_peak``) on a real ``LTX2Block`` forward
  under ``inference_mode``, with the inputs the DiT hands it: tiny and medium widths, fp32 and bf16, with and
  without the cross-modal attention, weights cast per call (fp8 and bf16 weights in fp32 compute), and a sliced
  feed-forward (> 4096 video tokens).
- The whole estimate against the measured peak of ``ltx2.pipeline.generate`` on the CPU — two steps of a three-step
  dev schedule (the second step is the steady state the estimate describes), stopped after them — plus the weights
  (and the block-swap ring and masters) and the prompts that exist before it: tiny and medium DiTs, fp32 and bf16,
  1, 2 and 4 passes per step, with and without block swap. Tolerance 15 %.
- The 19B on the meta device: weights (bf16, fp8 from the official keep rule), block swap, passes, the user text,
  errors.
- Training: the estimate against the measured peak of a LoRA training step written as training/trainer.py runs it
  with the LTX-2 adapter (text connectors, LoRA on every attention projection, AdamW, checkpointing on and off,
  audio+video and video only, first-frame conditioning, fp8 and bf16 weights in float32 compute, block swap), plus
  the weights, connectors, LoRA and AdamW state; the 19B at 768×512×121 (the documented numbers), block swap turning
  checkpointing on, the user text, errors.

Measured on torch 2.14.1 (CPU, 2 threads) when the estimate was written — estimate / measured:

- blocks: tiny fp32 1,914,880 / 1,914,880 B; tiny bf16 isolated 2,029,568 / 2,029,568; tiny fp32 with 300 audio
  tokens 261,216 / 261,216; tiny fp32 sliced feed-forward (4,352 tokens) 4,304,128 / 4,315,648 (−0.3 %); medium
  fp32 9,192,448 / 9,209,856 (−0.2 %); medium bf16 7,864,320 / 7,864,320; medium fp8 weights 3,290,112 / 3,303,424
  (−0.4 %); medium bf16 weights in fp32 compute 2,438,144 / 2,452,480 (−0.6 %);
- steps: tiny fp32 4 passes 4.581 / 4.583 MB (−0.05 %); tiny bf16 2 passes, 1 block swapped 3.537 / 3.554 MB
  (−0.5 %); medium fp32 1 pass, all blocks swapped 49.584 / 49.620 MB (−0.07 %); medium bf16 2 passes 17.592 /
  17.601 MB (−0.05 %).
- training steps (LoRA rank 8, 64 caption tokens): tiny fp32 audio 7.666 / 7.600 MB (+0.9 %); tiny bf16
  checkpointing, video, conditioned 3.180 / 3.456 MB (−8.0 %); medium fp32 checkpointing, audio, conditioned
  (1,280 video tokens) 82.169 / 79.680 MB (+3.1 %); medium bf16 audio 32.120 / 31.819 MB (+0.9 %); medium fp32
  checkpointing, fp8 weights, one block swapped 38.993 / 37.488 MB (+4.0 %); medium fp32 bf16 weights, video,
  conditioned 52.057 / 51.057 MB (+2.0 %). The estimate counts every LoRA gradient at the peak (conservative).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cinetune.core.lora import inject_lora
from cinetune.core.memory import MemoryEstimate, measure_cpu_peak
from cinetune.core.offload import model_on_device
from cinetune.core.quant import quantize_linear_weights_fp8
from cinetune.ltx2.audio import audio_latent_frames
from cinetune.ltx2.config import (
    LTX2_19B,
    LTX2_BLOCK_PREFIXES,
    LTX2TransformerConfig,
    ltx2_fp8_keep_high_precision,
    tiny_transformer_metadata,
)
from cinetune.ltx2.connectors import LTX2TextProjection, TextProjectionConfig
from cinetune.ltx2.dit import FF_CHUNK_TOKENS, LTX2DiT
from cinetune.ltx2.family import LTX2_LATENT_FORMAT
from cinetune.ltx2.memory import (
    LTX2MemoryEstimate,
    describe_ltx2,
    estimate_ltx2_memory,
    estimate_ltx2_memory_from_config,
    format_ltx2_estimate,
    ltx2_block_peak,
    ltx2_tokens,
    meta_ltx2_model,
    smallest_fitting_swap,
)
from cinetune.ltx2.pipeline import LTX2Conditioning, LTX2Prompt, SamplingRequest, generate
from cinetune.ltx2.rope import audio_positions, video_positions
from cinetune.ltx2.train import LTX2Sample, LTX2TrainingAdapter, ltx2_train_config
from cinetune.training.schedules import make_optimizer
from cinetune.training.sigmas import sample_sigmas
from cinetune.training.trainer import gradient_checkpointing

TOLERANCE = 0.15
TINY = LTX2TransformerConfig.from_metadata(tiny_transformer_metadata())
MEDIUM = LTX2TransformerConfig(num_layers=2, num_attention_heads=4, attention_head_dim=64, cross_attention_dim=256,
                               caption_channels=128, audio_num_attention_heads=4, audio_attention_head_dim=32,
                               audio_cross_attention_dim=128)
CONFIGS = {"tiny": TINY, "medium": MEDIUM}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TEXT = 1024  # connector output length


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def make_model(config: LTX2TransformerConfig, dtype: torch.dtype, weights: str | None = None) -> LTX2DiT:
    """A random DiT with every tensor in ``dtype``, or in ``weights`` ("bf16", "fp32"; "fp8": Linear weights in
    float8 with a scale, the rest in ``dtype``)."""
    torch.manual_seed(0)
    model = LTX2DiT(config).eval().requires_grad_(False)
    model.to(dtype if weights in (None, "fp8") else DTYPES[weights])
    if weights == "fp8":
        quantize_linear_weights_fp8(model, keep=lambda name: False)
    return model


# ---------------------------------------------------------------------------------------------------------------
# One block


class _Captured(Exception):
    pass


def block_and_inputs(model: LTX2DiT, dtype: torch.dtype, grid: tuple[int, int, int], audio_tokens: int,
                     text_tokens: int, cross_modal: bool):
    """Block 0 and the arguments the DiT calls it with (captured by a pre-hook that stops the forward)."""
    F, H, W = grid
    N = F * H * W
    c = model.config
    captured = {}

    def hook(module, args):
        captured["args"] = args
        raise _Captured

    handle = model.transformer_blocks[0].register_forward_pre_hook(hook)
    try:
        with torch.inference_mode():
            model(torch.randn(1, N, 128, dtype=dtype), torch.randn(1, audio_tokens, 128, dtype=dtype),
                  video_sigma=torch.full((1,), 0.6), audio_sigma=torch.full((1,), 0.6),
                  video_context=torch.randn(1, text_tokens, c.caption_channels, dtype=dtype),
                  audio_context=torch.randn(1, text_tokens, c.caption_channels, dtype=dtype),
                  video_positions=video_positions(F, H, W, fps=24.0), audio_positions=audio_positions(audio_tokens),
                  skip_cross_modal=not cross_modal)
    except _Captured:
        pass
    finally:
        handle.remove()
    return model.transformer_blocks[0], captured["args"]


# The weight casts are checked in float32 compute: CPU bf16 matmuls add oneDNN per-thread buffers (0.04–1.7 MB per
# thread, growing with the layer) that the estimate leaves out.
BLOCK_CASES = {  # config, compute dtype, weights, latent grid, audio tokens, cross-modal, weight copies per Linear
    "tiny-fp32": ("tiny", "fp32", None, (5, 16, 16), 34, True, 0),
    "tiny-bf16-isolated": ("tiny", "bf16", None, (5, 16, 16), 34, False, 0),
    "tiny-fp32-many-audio-tokens": ("tiny", "fp32", None, (2, 4, 4), 300, True, 0),
    "tiny-fp32-sliced-ff": ("tiny", "fp32", None, (17, 16, 16), 180, True, 0),
    "medium-fp32": ("medium", "fp32", None, (5, 16, 16), 34, True, 0),
    "medium-bf16": ("medium", "bf16", None, (5, 16, 16), 34, True, 0),
    "medium-fp32-fp8-weights": ("medium", "fp32", "fp8", (3, 8, 8), 26, True, 2),
    "medium-fp32-bf16-weights": ("medium", "fp32", "bf16", (3, 8, 8), 26, True, 1),
}


@pytest.mark.parametrize("case", list(BLOCK_CASES))
def test_block_replay_matches_the_cpu_allocator(case):
    name, dtype, weights, grid, audio_tokens, cross_modal, cast = BLOCK_CASES[case]
    config = CONFIGS[name]
    text_tokens = 256
    model = make_model(config, DTYPES[dtype], weights)
    block, args = block_and_inputs(model, DTYPES[dtype], grid, audio_tokens, text_tokens, cross_modal)

    def run():
        with torch.inference_mode():
            return block(*args)

    run()
    measured = measure_cpu_peak(run).peak
    video_tokens = grid[0] * grid[1] * grid[2]
    if case.endswith("sliced-ff"):
        assert video_tokens > FF_CHUNK_TOKENS
    estimated = ltx2_block_peak(config, video_tokens=video_tokens, audio_tokens=audio_tokens,
                                text_tokens=text_tokens, compute_dtype=dtype, device_type="cpu",
                                cross_modal=cross_modal, weight_cast=cast)
    assert abs(estimated - measured) <= 0.02 * measured, (estimated, measured)


def test_a_block_of_the_19b_peaks_at_the_rope_of_its_self_attention():
    """CUDA, bf16: normed input, q, k, v and apply_rope's float32 copies and products (16 bytes per width unit)."""
    D = LTX2_19B.inner_dim
    for tokens in (6144, 24576):
        peak = ltx2_block_peak(LTX2_19B, video_tokens=tokens, audio_tokens=126)
        assert peak == pytest.approx(4 * 2 * D * tokens + 16 * D * tokens, rel=0.01)
    # on the CPU in float32 the unsliced feed-forward is the peak: input, hidden (4·D) and output
    fp32 = ltx2_block_peak(LTX2_19B, video_tokens=4096, audio_tokens=126, compute_dtype="fp32", device_type="cpu")
    assert fp32 == pytest.approx((2 + 4 + 1) * 4 * D * 4096, rel=0.01)


# ---------------------------------------------------------------------------------------------------------------
# Whole steps against the measured peak


class _Stop(Exception):
    pass


def measure_generate(config: LTX2TransformerConfig, dtype: torch.dtype, size: tuple[int, int, int], *, passes: int,
                     swap: int) -> tuple[int, LTX2DiT]:
    """Weights (+ swap ring and masters) + prompts + the allocator peak of ``generate`` over the first two steps of a
    three-step dev schedule, with the guidance terms that make ``passes`` forward passes per step."""
    width, height, frames = size
    model = make_model(config, dtype)

    def prompt() -> LTX2Prompt:
        return LTX2Prompt(torch.randn(1, TEXT, config.caption_channels).to(dtype),
                          torch.randn(1, TEXT, config.caption_channels).to(dtype))

    conditioning = LTX2Conditioning(prompt(), prompt() if passes > 1 else None)
    request = SamplingRequest(width, height, frames, fps=24.0, steps=3, mode="dev",
                              video_cfg=3.0 if passes > 1 else 1.0, audio_cfg=7.0 if passes > 1 else 1.0,
                              stg=1.0 if passes > 2 else 0.0, stg_block=config.num_layers - 1,
                              modality=3.0 if passes > 3 else 1.0, rescale=0.7 if passes > 1 else 0.0)

    def stop_after_two_steps(done: int, total: int) -> None:
        if done == 2:
            raise _Stop

    prompts = [t for p in (conditioning.positive, conditioning.negative) if p is not None
               for t in (p.video_context, p.audio_context)]
    with model_on_device(model, list(model.transformer_blocks), "cpu", blocks_to_swap=swap, ring_size=2) as bs:
        buffers = [*bs._slots, *(b.master for b in bs._swapped.values())]
        before = storage_bytes([*model.parameters(), *model.buffers(), *buffers, *prompts])

        def run() -> None:
            try:
                with torch.inference_mode():
                    generate(model, conditioning, request, device="cpu", dtype=dtype, progress=stop_after_two_steps)
            except _Stop:
                pass

        return before + measure_cpu_peak(run).peak, model


STEP_CASES = {  # config, dtype, passes per step, blocks swapped, size
    "tiny-fp32-4-passes": ("tiny", "fp32", 4, 0, (384, 384, 25)),  # 576 video + 26 audio tokens
    "tiny-bf16-2-passes-swap": ("tiny", "bf16", 2, 1, (384, 384, 25)),
    "medium-fp32-1-pass-all-swapped": ("medium", "fp32", 1, 2, (512, 512, 33)),  # 1,280 + 34 tokens
    "medium-bf16-2-passes": ("medium", "bf16", 2, 0, (384, 384, 25)),
}


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_step_estimate_matches_the_measured_peak(case):
    name, dtype, passes, swap, size = STEP_CASES[case]
    measured, model = measure_generate(CONFIGS[name], DTYPES[dtype], size, passes=passes, swap=swap)
    est = estimate_ltx2_memory(model, width=size[0], height=size[1], frames=size[2], fps=24.0, blocks_to_swap=swap,
                               device_type="cpu", compute_dtype=dtype, cfg_passes=passes)
    if swap:
        assert est.swap_ring == min(2, swap) * describe_ltx2(model).blocks[-1].tensor_bytes
    device_total = est.total + est.host_bytes  # on the CPU the swapped blocks' masters are in the same memory
    assert abs(device_total - measured) <= TOLERANCE * measured, (case, device_total, measured, est.format())
    # the activations are a large share, so the check is about them and not only about the weights
    assert est.activations > 0.3 * device_total, (case, est.format())


# ---------------------------------------------------------------------------------------------------------------
# The 19B, weights and settings


def test_tokens_and_size_errors():
    assert ltx2_tokens(768, 512, 121, 24.0) == (16 * 16 * 24, 126)
    assert ltx2_tokens(960, 544, 49, 24.0) == (7 * 17 * 30, 51)
    assert ltx2_tokens(1536, 1024, 121, 25.0) == (16 * 32 * 48, 121)
    with pytest.raises(ValueError, match="width 500 is not a multiple of 32: use 480 or 512"):
        ltx2_tokens(500, 512, 121, 24.0)
    with pytest.raises(ValueError, match="frames 120 is not of the form 8k\\+1: use 113 or 121"):
        estimate_ltx2_memory_from_config(LTX2_19B, width=768, height=512, frames=120)
    with pytest.raises(ValueError, match="height 500 is not a multiple of 32: use 480 or 512"):
        estimate_ltx2_memory(make_model(TINY, torch.float32), width=512, height=500, frames=9, fps=24.0,
                             blocks_to_swap=0, device_type="cpu", compute_dtype="fp32")
    with pytest.raises(ValueError, match="fps"):
        ltx2_tokens(768, 512, 121, 0.0)


def block_linear_weights(config: LTX2TransformerConfig) -> int:
    """Linear weight elements of one block (ltx2.md §2.3): attn1, attn2 D×D ×4 each; audio_attn1, audio_attn2
    Da×Da ×4 each; ff 2·4D·D; audio_ff 2·4Da·Da; audio_to_video_attn and video_to_audio_attn (inner width Da)
    2·D·Da + 2·Da·Da each — 28 Linear layers."""
    D, Da = config.inner_dim, config.audio_inner_dim
    return 8 * D * D + 8 * Da * Da + 8 * D * D + 8 * Da * Da + 2 * (2 * D * Da + 2 * Da * Da)


def test_19b_weights_on_a_meta_model_without_allocating():
    with torch.device("meta"):
        model = LTX2DiT(LTX2_19B).to(torch.bfloat16)
    kw = dict(width=768, height=512, frames=121, fps=24.0, device_type="cuda", compute_dtype="bf16")
    result = measure_cpu_peak(lambda: estimate_ltx2_memory(model, blocks_to_swap=0, **kw))
    assert result.peak < 1e6  # shapes and dtypes only
    bf16 = result.result
    assert bf16.resident_weights == pytest.approx(18.876e9 * 2, rel=0.005)  # ltx2.md §2.1: 18.876 B parameters
    assert estimate_ltx2_memory_from_config(LTX2_19B, **kw).resident_weights == bf16.resident_weights

    # fp8 (official keep rule): the Linear weights of blocks 1–42 take 1 byte instead of 2, plus a 4-byte scale each
    fp8 = estimate_ltx2_memory_from_config(LTX2_19B, weight_dtype="fp8_e4m3fn", **kw)
    assert bf16.resident_weights - fp8.resident_weights == 42 * (block_linear_weights(LTX2_19B) - 28 * 4)
    quantize_linear_weights_fp8(model, keep=ltx2_fp8_keep_high_precision)  # a loaded fp8 model, described as is
    assert estimate_ltx2_memory(model, blocks_to_swap=0, **kw).resident_weights == fp8.resident_weights
    # fp8 layers dequantise per call: the activations do not shrink with the weights
    assert fp8.activations >= bf16.activations

    # activations: one pass of batch 1, ≈ 16 bytes·D per video token at this size
    row = 2 * LTX2_19B.inner_dim * 6144  # s·D bytes per video token
    assert 10 * row < bf16.activations < 20 * row


def test_block_swap_moves_weights_to_cpu_memory():
    kw = dict(width=768, height=512, frames=121)
    base = estimate_ltx2_memory_from_config(LTX2_19B, **kw)
    swapped = estimate_ltx2_memory_from_config(LTX2_19B, blocks_to_swap=20, **kw)
    block = describe_ltx2(meta_ltx2_model(LTX2_19B, "bf16")).blocks[-1].tensor_bytes
    assert block == pytest.approx(2 * block_linear_weights(LTX2_19B), rel=0.01)  # + biases, norms, tables
    assert swapped.host_bytes == 20 * block
    assert swapped.swap_ring == 2 * block
    assert swapped.resident_weights + swapped.host_bytes == base.resident_weights
    assert swapped.activations == base.activations
    assert swapped.total == base.total - 18 * block
    totals = base.totals_by_swap
    assert len(totals) == 49 and totals[20] == swapped.total and totals[0] == base.total
    assert totals[0] == totals[1] == totals[2]  # the ring of 2 costs what the first two blocks free
    assert all(b < a for a, b in zip(totals[2:], totals[3:]))
    with pytest.raises(ValueError, match="maximum 48"):
        estimate_ltx2_memory_from_config(LTX2_19B, blocks_to_swap=49, **kw)


def test_guidance_passes_run_one_after_the_other():
    """Four passes cost three more x0 sets of [N, 128] float32 and the negative prompt, not four times the
    activations."""
    kw = dict(width=768, height=512, frames=121)
    one = estimate_ltx2_memory_from_config(LTX2_19B, cfg_passes=1, **kw)
    four = estimate_ltx2_memory_from_config(LTX2_19B, cfg_passes=4, **kw)
    tokens = 6144 + 126
    assert 0 < four.activations - one.activations <= 3 * 128 * 4 * tokens + 2 * TEXT * 3840 * 2
    assert four.total < 1.05 * one.total


def test_format_for_users():
    kw = dict(width=768, height=512, frames=121)
    est = estimate_ltx2_memory_from_config(LTX2_19B, **kw)
    assert isinstance(est, LTX2MemoryEstimate) and isinstance(est, MemoryEstimate)
    text = format_ltx2_estimate(est, available_bytes=None, model="LTX-2 19B dev")
    lines = text.splitlines()
    assert lines[0] == (f"Estimated peak GPU memory: {est.total / 1e9:.1f} GB (weights "
                        f"{est.resident_weights / 1e9:.1f} GB resident, activations {est.activations / 1e9:.1f} GB)")
    assert lines[1] == ("Settings: LTX-2 19B dev, 768×512, 121 frames at 24 fps (6,144 video + 126 audio tokens), "
                        "4 forward passes per step, bf16 compute.")
    assert lines[2] == "Add about 0.5 GB for the CUDA context and kernel workspaces."

    assert "Fits in the 80.0 GB available." in format_ltx2_estimate(est, available_bytes=int(80e9), model="19B")

    budget = int(24e9)
    n = smallest_fitting_swap(est, budget)
    assert est.totals_by_swap[n] <= budget and all(total > budget for total in est.totals_by_swap[:n])
    text = format_ltx2_estimate(est, available_bytes=budget, model="19B")
    assert (f"Does not fit in the 24.0 GB available (short by {(est.total - budget) / 1e9:.1f} GB): set "
            f"blocks_to_swap to {n} or more on the model loader (estimated peak {est.totals_by_swap[n] / 1e9:.1f} GB, "
            f"{est.host_by_swap[n] / 1e9:.1f} GB of weights in CPU memory).") in text

    assert smallest_fitting_swap(est, int(1e9)) is None
    text = format_ltx2_estimate(est, available_bytes=int(1e9), model="19B")
    assert "no blocks_to_swap fits, not even every block swapped: load fp8 weights" in text

    swapped = estimate_ltx2_memory_from_config(LTX2_19B, blocks_to_swap=10, **kw)
    lines = format_ltx2_estimate(swapped, available_bytes=None, model="19B").splitlines()
    assert f" + {swapped.swap_ring / 1e9:.1f} GB swap ring, activations " in lines[0]
    assert lines[1] == f"Block swap keeps {swapped.host_bytes / 1e9:.1f} GB of weights in CPU memory."
    assert lines[2].endswith("bf16 compute, 10 blocks swapped.")

    cpu = estimate_ltx2_memory_from_config(LTX2_19B, blocks_to_swap=10, device_type="cpu", compute_dtype="fp32",
                                           **kw)
    text = format_ltx2_estimate(cpu, available_bytes=int(50e9), model="19B")
    assert text.startswith("Estimated peak memory (CPU): ") and "the same memory here" in text
    assert "blocks_to_swap" not in text and "CUDA" not in text

    plain = MemoryEstimate(**{f.name: getattr(est, f.name) for f in dataclasses.fields(MemoryEstimate)})
    text = format_ltx2_estimate(plain, available_bytes=int(24e9), model="19B")
    assert text.startswith("Estimated peak GPU memory: ") and "Model: 19B." in text and "blocks_to_swap" not in text


def test_bad_settings_are_refused():
    kw = dict(width=512, height=512, frames=9, fps=24.0, blocks_to_swap=0, device_type="cpu", compute_dtype="fp32")
    model = make_model(TINY, torch.float32)
    for passes in (0, 5, True, 2.0):
        with pytest.raises(ValueError, match="cfg_passes must be an int from 1 to 4"):
            estimate_ltx2_memory(model, **{**kw, "cfg_passes": passes})
    with pytest.raises(ValueError, match="maximum 2"):
        estimate_ltx2_memory(model, **{**kw, "blocks_to_swap": 3})
    with pytest.raises(ValueError, match="device_type must be one of cuda, cpu"):
        estimate_ltx2_memory(model, **{**kw, "device_type": "mps"})
    with pytest.raises(ValueError, match="compute_dtype"):
        estimate_ltx2_memory(model, **{**kw, "compute_dtype": "int8"})
    with pytest.raises(TypeError, match="LTX2DiT"):
        estimate_ltx2_memory(torch.nn.Linear(2, 2), **kw)
    with pytest.raises(ValueError, match="weight_dtype must be one of bf16, fp16, fp32, fp8_e4m3fn"):
        estimate_ltx2_memory_from_config(TINY, width=512, height=512, frames=9, weight_dtype="int4")
    with pytest.raises(TypeError, match="LTX2TransformerConfig"):
        estimate_ltx2_memory_from_config({"num_layers": 2}, width=512, height=512, frames=9)
    with pytest.raises(ValueError, match="weight_cast"):
        ltx2_block_peak(TINY, video_tokens=64, audio_tokens=8, weight_cast=3)
    est = estimate_ltx2_memory(model, **kw)
    with pytest.raises(ValueError, match="available_bytes must be an int"):
        smallest_fitting_swap(est, -1)


# ---------------------------------------------------------------------------------------------------------------
# Training


CAPTION = 64  # cached caption length (the connectors' output length)


def text_projection(config: LTX2TransformerConfig, dtype: torch.dtype) -> LTX2TextProjection:
    """Random text connectors as wide as ``config``'s captions (2 heads, 2 layers, 128 registers)."""
    torch.manual_seed(1)
    tp = TextProjectionConfig(feature_dim=16, dim=config.caption_channels, heads=2,
                              head_dim=config.caption_channels // 2, num_layers=2, ff_dim=4 * config.caption_channels)
    return LTX2TextProjection(tp).to(dtype).requires_grad_(False)


def measure_training(config: LTX2TransformerConfig, dtype: torch.dtype, size: tuple[int, int, int], *,
                     checkpointing: bool, audio: bool, conditioning: bool, weights: str | None, swap: int,
                     rank: int) -> tuple[int, LTX2TextProjection]:
    """Weights, text connectors, LoRA, AdamW state (+ swap ring and masters) + the allocator peak of a training step
    after the first (the AdamW state made beforehand by an update with zero gradients), written as
    training/trainer.py runs it with the LTX-2 adapter (the cached sample itself is host
    data, not counted). ``conditioning``: every step conditions on the first frame (i2v_prob 1)."""
    width, height, frames = size
    model = make_model(config, dtype, weights)
    projection = text_projection(config, dtype)
    adapter = LTX2TrainingAdapter(projection)
    cfg = ltx2_train_config(rank=rank, alpha=float(rank), with_audio=audio, compute_dtype=dtype,
                            i2v="first" if conditioning else "off", i2v_prob=1.0, gradient_checkpointing=checkpointing)
    _, F, H, W = LTX2_LATENT_FORMAT.latent_shape(width, height, frames)
    g = torch.Generator().manual_seed(0)
    sample = LTX2Sample(latent=torch.randn(128, F, H, W, generator=g),
                        text=torch.randn(CAPTION, config.caption_channels, generator=g),
                        text_mask=torch.arange(CAPTION) >= CAPTION // 4, fps=24.0, bucket=(width, height),
                        frames=frames,
                        audio=torch.randn(8, audio_latent_frames(frames, 24.0), 16, generator=g) if audio else None)
    generator = torch.Generator().manual_seed(1)
    device = torch.device("cpu")
    with (model_on_device(model, list(model.transformer_blocks), "cpu", blocks_to_swap=swap, ring_size=2) as bs,
          torch.enable_grad()):
        layers = inject_lora(model, rank=rank, alpha=float(rank), targets=adapter.lora_targets(cfg),
                             within=LTX2_BLOCK_PREFIXES, dtype=torch.float32)
        params = [p for m in layers.values() for p in (m.lora_down, m.lora_up)]
        optimizer = make_optimizer(params, "adamw", lr=1e-4, weight_decay=cfg.weight_decay, betas=cfg.betas,
                                   eps=cfg.eps)
        model.train()

        def micro_batch_loss():  # _Run.micro_batch_loss: the batch lives as long as this call
            batch = adapter.load_batch(model, [sample], cfg)
            sigma = sample_sigmas(cfg.timestep_sampling, 1, flow_shift=cfg.flow_shift,
                                  sigmoid_scale=cfg.sigmoid_scale, generator=generator, tokens=batch.tokens)
            return adapter.loss(model, batch, sigma, generator=generator, empty=None, config=cfg, device=device)

        def forward_backward():  # _Run.forward_backward for a window of one micro-batch
            optimizer.zero_grad(set_to_none=True)
            terms = micro_batch_loss()
            terms.total.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)

        def step():  # and the optimizer step of _loop
            forward_backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for p in params:  # the AdamW state exists from the first step on
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with adapter.running(model, cfg, device), gradient_checkpointing(adapter.blocks(model), checkpointing):
            state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
            buffers = [*bs._slots, *(b.master for b in bs._swapped.values())]
            # only the connectors go to the device; the aggregate embedding's output is what the cache holds
            before = storage_bytes([*model.parameters(), *model.buffers(), *connector_parameters(projection), *state,
                                    *buffers])
            return before + measure_cpu_peak(step).peak, projection


def connector_parameters(projection) -> list:
    return [*projection.video_embeddings_connector.parameters(), *projection.audio_embeddings_connector.parameters()]


TRAIN_CASES = {  # config, dtype, size, checkpointing, audio, first-frame conditioning, weights, blocks swapped
    "tiny-fp32-audio": ("tiny", "fp32", (384, 384, 25), False, True, False, None, 0),  # 576 video + 26 audio tokens
    "tiny-bf16-checkpointing-video-conditioned": ("tiny", "bf16", (384, 384, 25), True, False, True, None, 0),
    "medium-fp32-checkpointing-audio-conditioned": ("medium", "fp32", (512, 512, 33), True, True, True, None, 0),
    "medium-bf16-audio": ("medium", "bf16", (384, 384, 25), False, True, False, None, 0),
    "medium-fp32-checkpointing-fp8-weights-swap": ("medium", "fp32", (384, 384, 25), True, True, False, "fp8", 1),
    "medium-fp32-bf16-weights-video-conditioned": ("medium", "fp32", (384, 384, 25), False, False, True, "bf16", 0),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_training_estimate_matches_the_measured_peak(case):
    name, dtype, size, checkpointing, audio, conditioning, weights, swap = TRAIN_CASES[case]
    config = CONFIGS[name]
    measured, projection = measure_training(config, DTYPES[dtype], size, checkpointing=checkpointing, audio=audio,
                                            conditioning=conditioning, weights=weights, swap=swap, rank=8)
    est = estimate_ltx2_memory(make_model(config, DTYPES[dtype], weights), width=size[0], height=size[1],
                               frames=size[2], fps=24.0, blocks_to_swap=swap, device_type="cpu", compute_dtype=dtype,
                               text_tokens=CAPTION, training=True, lora_rank=8, gradient_checkpointing=checkpointing,
                               with_audio=audio, first_frame_conditioning=conditioning, text_projection=projection)
    assert est.training and est.gradient_checkpointing == checkpointing
    assert est.text_projection_bytes == storage_bytes(connector_parameters(projection))
    device_total = est.total + est.host_bytes
    assert abs(device_total - measured) <= TOLERANCE * measured, (case, device_total, measured, est.format())
    assert est.activations > 0.3 * device_total, (case, est.format())


def lora_parameters(config: LTX2TransformerConfig, rank: int, *, audio: bool) -> int:
    """LoRA parameters on to_q/to_k/to_v/to_out.0 (ltx2.md §2.3 shapes): r·(in + out) per layer."""
    D, Da = config.inner_dim, config.audio_inner_dim
    Dt, Dat = config.cross_attention_dim, config.audio_cross_attention_dim
    video = 4 * 2 * D + 2 * 2 * D + 2 * (Dt + D)  # attn1; attn2 (to_q, to_out.0; to_k, to_v from the text)
    if not audio:
        return config.num_layers * rank * video
    sound = 4 * 2 * Da + 2 * 2 * Da + 2 * (Dat + Da)  # audio_attn1, audio_attn2
    cross = 2 * (2 * (D + Da) + 2 * 2 * Da)  # audio_to_video_attn, video_to_audio_attn: two D↔Da, two Da↔Da layers
    return config.num_layers * rank * (video + sound + cross)


def test_19b_training_at_768x512x121():
    """Documented numbers (ltx2/memory.py): bf16 weights 47.2 GB, fp8 31.3 GB with checkpointing; the text
    connectors 1.42 GB; LoRA rank 32 with AdamW 3.4 GB."""
    kw = dict(width=768, height=512, frames=121, training=True, lora_rank=32, optimizer="adamw")
    bf16 = estimate_ltx2_memory_from_config(LTX2_19B, weight_dtype="bf16", **kw)
    fp8 = estimate_ltx2_memory_from_config(LTX2_19B, weight_dtype="fp8_e4m3fn", **kw)
    sampling = estimate_ltx2_memory_from_config(LTX2_19B, width=768, height=512, frames=121)
    # weights: the DiT as in sampling plus the two text connectors (two 3840-wide blocks with 128 registers each) in
    # the compute dtype; the aggregate embedding is not on the device
    connectors = 2 * 2 * (128 * 3840 + 2 * (4 * (3840 * 3840 + 3840) + 2 * 3840
                                            + 2 * 4 * 3840 * 3840 + 4 * 3840 + 3840))
    assert bf16.text_projection_bytes == connectors
    assert bf16.resident_weights == sampling.resident_weights + connectors
    params = lora_parameters(LTX2_19B, 32, audio=True)
    assert bf16.lora == bf16.gradients == 4 * params and bf16.optimizer_state == 8 * params
    # activations with checkpointing: every block input (48 × s·(D·Nv + Da·Na)) and one block recomputed with its
    # gradients; in units of s·D·Nv (50 MB here) between 48 + 25 and 48 + 60
    unit = 2 * LTX2_19B.inner_dim * 6144
    assert 73 * unit < bf16.activations < 108 * unit
    assert bf16.total == pytest.approx(47.2e9, rel=0.01) and fp8.total == pytest.approx(31.3e9, rel=0.01)
    # fp8 layers dequantise per call and the autograd graph keeps each copy: the peak moves to block 42, the last
    # fp8 block of the official files (blocks 43-47 keep bf16 weights)
    assert bf16.peak_block == 47 and fp8.peak_block == 42 and fp8.activations > bf16.activations
    # without checkpointing every block keeps its tensors: far beyond any GPU
    full = estimate_ltx2_memory_from_config(LTX2_19B, gradient_checkpointing=False, **kw)
    assert full.activations > 15 * bf16.activations
    video_only = estimate_ltx2_memory_from_config(LTX2_19B, with_audio=False, **kw)
    assert video_only.lora == 4 * lora_parameters(LTX2_19B, 32, audio=False)
    assert video_only.activations < bf16.activations
    eight_bit = estimate_ltx2_memory_from_config(LTX2_19B, **{**kw, "optimizer": "adamw8bit"})
    assert eight_bit.optimizer_state == 2 * params


def test_training_block_swap_checkpoints_and_the_text_for_users():
    kw = dict(width=768, height=512, frames=121, training=True, gradient_checkpointing=False)
    est = estimate_ltx2_memory_from_config(LTX2_19B, **kw)
    swapped = estimate_ltx2_memory_from_config(LTX2_19B, blocks_to_swap=30, **kw)
    assert not est.gradient_checkpointing and swapped.gradient_checkpointing  # as the trainer: swap checkpoints
    assert swapped.totals_by_swap == est.totals_by_swap and est.totals_by_swap[30] == swapped.total
    assert est.totals_by_swap[1] < est.totals_by_swap[0] / 2  # the first swapped block turns checkpointing on
    budget = int(24e9)
    n = smallest_fitting_swap(est, budget)
    text = format_ltx2_estimate(est, available_bytes=budget, model="LTX-2 19B dev")
    lines = text.splitlines()
    assert lines[0] == (f"Estimated peak GPU memory: {est.total / 1e9:.1f} GB (weights {est.resident_weights / 1e9:.1f} "
                        f"GB resident, activations {est.activations / 1e9:.1f} GB, LoRA + gradients + optimizer "
                        f"{(est.lora + est.gradients + est.optimizer_state) / 1e9:.1f} GB)")
    assert lines[1] == ("Settings: LTX-2 19B dev, 768×512, 121 frames at 24 fps (6,144 video + 126 audio tokens), "
                        "LoRA training (rank 32, AdamW), audio and video, first-frame conditioning, gradient "
                        "checkpointing off, bf16 compute.")
    assert lines[2] == "The weights include the text connectors (1.4 GB), which the trainer keeps on the device."
    assert f"set blocks_to_swap to {n} or more on the model loader or the trainer" in lines[3]
    video = estimate_ltx2_memory_from_config(LTX2_19B, width=768, height=512, frames=121, training=True,
                                             with_audio=False, first_frame_conditioning=False, lora_rank=16,
                                             optimizer="adamw8bit")
    line = format_ltx2_estimate(video, available_bytes=None, model="19B").splitlines()[1]
    assert line.endswith("(6,144 video tokens), LoRA training (rank 16, 8-bit AdamW), video only, gradient "
                         "checkpointing on, bf16 compute.")


def test_bad_training_settings_are_refused():
    kw = dict(width=512, height=512, frames=9, training=True)
    with pytest.raises(ValueError, match="lora_rank must be an int ≥ 1"):
        estimate_ltx2_memory_from_config(LTX2_19B, lora_rank=0, **kw)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        estimate_ltx2_memory_from_config(LTX2_19B, optimizer="lion", **kw)
    with pytest.raises(ValueError, match="pass text_projection"):
        estimate_ltx2_memory_from_config(MEDIUM, **kw)  # 128-wide captions, 19B connector heads
    with pytest.raises(TypeError, match="text_projection must be"):
        estimate_ltx2_memory_from_config(TINY, text_projection={"dim": 24}, **kw)

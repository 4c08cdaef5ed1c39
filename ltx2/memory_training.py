"""The tensor-by-tensor replay of one LTX-2 LoRA training step behind :mod:`cinetune.ltx2.memory` (forward,
what autograd keeps, recompute and backward); the method and the measured accuracy are in that module's docstring."""

from __future__ import annotations

from dataclasses import dataclass


from .connectors import TextProjectionConfig
from .memory_replay import (FF_MULT, FP32, _Run, _Tape, _attention, _caption_projection, _feed_forward, _linear,
                            _rope_tables)



# ---------------------------------------------------------------------------------------------------------------
# The training replay


class _T:
    """A tensor of a replayed training step: its bytes, whether autograd keeps it for the backward and whether
    Python still refers to it. It is freed when neither does."""

    __slots__ = ("nbytes", "kept", "alive")

    def __init__(self, nbytes: float) -> None:
        self.nbytes = nbytes
        self.kept = False
        self.alive = True


class _GradTape(_Tape):
    """A :class:`_Tape` for a step with autograd. :meth:`new` allocates a tensor, :meth:`save` records that an op
    keeps it for the backward (into a list that :meth:`release` empties in the backward), :meth:`drop` removes the
    Python reference. With ``recording`` off (a checkpointed forward: its saved tensors are discarded at once)
    :meth:`save` does nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.recording = True

    def new(self, nbytes: float) -> _T:
        self.alloc(nbytes)
        return _T(nbytes)

    def save(self, saved: list, *tensors: _T | None) -> None:
        if not self.recording:
            return
        for x in tensors:
            if x is not None and not x.kept:
                x.kept = True
                saved.append(x)

    def drop(self, *tensors: _T | None) -> None:
        for x in tensors:
            if x is not None and x.alive:
                x.alive = False
                if not x.kept:
                    self.free(x.nbytes)

    def release(self, saved: list) -> None:
        for x in saved:
            x.kept = False
            if not x.alive:
                self.free(x.nbytes)
        saved.clear()

    def new_saved(self, saved: list, nbytes: float) -> None:
        """A new tensor that only autograd refers to (e.g. a norm's statistics)."""
        x = self.new(nbytes)
        self.save(saved, x)
        self.drop(x)


def _stat_bytes(r: _Run) -> int:
    """Bytes per token an RMSNorm keeps for its backward beside its input: on the CPU the inverse RMS in the compute
    dtype (``modulation.CPURMSNorm``), on CUDA the float32 rstd."""
    return FP32 if r.device_type == "cuda" else r.s


def _g_rms(t: _GradTape, r: _Run, saved: list, x: _T, tokens: int, width: int, grad: bool) -> _T:
    """``_rms(x)`` with autograd: a new tensor; keeps x and its statistics when x needs a gradient (``grad``)."""
    out = t.new(r.s * width * tokens)
    if grad:
        t.save(saved, x)
        t.new_saved(saved, _stat_bytes(r) * tokens)
    return out


def _g_takes(t: _GradTape, r: _Run, tokens: int, width: int, per_token: bool) -> list[_T]:
    """``AdaValues.take`` of a shift and a scale: ``[B, T, W]`` tensors when the timestep varies per token
    (first-frame conditioning), else vectors (ignored)."""
    return [t.new(r.s * width * tokens), t.new(r.s * width * tokens)] if per_token else []


def _g_scale_shift(t: _GradTape, r: _Run, saved: list, normed: _T, tokens: int, width: int, grad: bool,
                   per_token: bool, takes: list[_T] | None = None) -> _T:
    """``addcmul(shift, normed, 1 + scale)``; it keeps ``1 + scale`` (a per-token tensor under first-frame
    conditioning)."""
    takes = _g_takes(t, r, tokens, width, per_token) if takes is None else takes
    one = t.new(r.s * width * tokens) if per_token else None
    out = t.new(r.s * width * tokens)
    if grad:
        t.save(saved, one)
    t.drop(*takes, one)
    return out


def _g_modulated(t: _GradTape, r: _Run, saved: list, x: _T, tokens: int, width: int, grad: bool,
                 per_token: bool) -> _T:
    """``modulation.modulated``: RMSNorm then ``·(1 + scale) + shift``. On the CPU one new tensor
    (``modulation.CPURMSNorm`` with the modulation), keeping x, its statistics and ``1 + scale`` (a per-token tensor
    under first-frame conditioning); elsewhere :func:`_g_rms` and :func:`_g_scale_shift`."""
    takes = _g_takes(t, r, tokens, width, per_token)
    if r.device_type != "cpu":
        normed = _g_rms(t, r, saved, x, tokens, width, grad)
        out = _g_scale_shift(t, r, saved, normed, tokens, width, grad, per_token, takes)
        t.drop(normed)
        return out
    one = t.new(r.s * width * tokens) if per_token else None
    out = t.new(r.s * width * tokens)
    if grad:
        t.save(saved, x, one)
        t.new_saved(saved, _stat_bytes(r) * tokens)
    t.drop(*takes, one)
    return out


def _g_residual(t: _GradTape, r: _Run, saved: list, update: _T, tokens: int, width: int, gate: bool,
                per_token: bool) -> _T:
    """``x + update·gate`` (``x + update``): a new stream; keeps the gate (a per-token tensor under first-frame
    conditioning)."""
    g = t.new(r.s * width * tokens) if gate and per_token else None
    out = t.new(r.s * width * tokens)
    t.save(saved, g)
    t.drop(update, g)
    return out


def _g_linear(t: _GradTape, r: _Run, saved: list, x: _T, tokens: int, fan_in: int, fan_out: int, cast: int,
              lora: bool, grad: bool) -> _T:
    """A frozen Linear (its weight cast per call: ``cast`` copies, kept when the input ``x`` needs a gradient:
    ``grad``), with an unmerged LoRA ``y + c·up(down(x))`` (``core.lora.LoRALinear``: keeps x, the rank-r down
    output and, outside float32, the compute-dtype copies of the adapter weights)."""
    s = r.s
    w = None
    if cast:
        weight = s * fan_in * fan_out
        if cast == 2:
            t.touch(2 * weight)
        w = t.new(weight)
    y = t.new(s * fan_out * tokens)
    if grad:
        t.save(saved, w)
    t.drop(w)
    if not lora:
        return y
    if s != FP32:  # the adapters cast to the compute dtype per call: the copies are kept
        for features, needed in ((fan_in, grad), (fan_out, True)):
            copy = t.new(s * r.rank * features)
            if needed:
                t.save(saved, copy)
            t.drop(copy)
    down = t.new(s * r.rank * tokens)
    up = t.new(s * fan_out * tokens)
    t.save(saved, x, down)
    scaled = t.new(s * fan_out * tokens)
    out = t.new(s * fan_out * tokens)
    t.drop(y, up, scaled, down)
    return out


def _g_qk_norm(t: _GradTape, r: _Run, saved: list, x: _T, tokens: int, width: int, grad: bool) -> _T:
    """``Attention._norm``: one new tensor (on the CPU the weight is applied in place); keeps the projection
    output and the statistics."""
    if grad:
        t.save(saved, x)
        t.new_saved(saved, _stat_bytes(r) * tokens)
    return t.new(r.s * width * tokens)


def _g_rope(t: _GradTape, r: _Run, saved: list, tokens: int, width: int, table: _T) -> _T:
    """``apply_rope`` with autograd (``rope._SplitRotation``): four products into one new float32 tensor, which
    keeps only the DiT's tables (``table``); outside float32 first float32 copies of x and of both tables, and the
    result rounded to the compute dtype."""
    t.save(saved, table)
    if r.s == FP32:
        return t.new(FP32 * width * tokens)
    xf = t.new(FP32 * width * tokens)
    tables = t.new(FP32 * width * tokens)  # cos and sin, half the width each
    out = t.new(FP32 * width * tokens)
    t.drop(xf, tables)
    res = t.new(r.s * width * tokens)
    t.drop(out)
    return res


def _g_attention(t: _GradTape, r: _Run, saved: list, x: _T, context: _T, *, q_tokens: int, kv_tokens: int,
                 q_width: int, kv_width: int, heads: int, head_dim: int, out_width: int, rope: _T | None,
                 cast: int, lora: bool, x_grad: bool, context_grad: bool) -> _T:
    """``Attention.forward`` with autograd; returns the ``to_out`` output. ``rope``: the RoPE tables (None: no
    RoPE). SDPA keeps q, k, v, its output and the float32 log-sum-exp."""
    inner = heads * head_dim
    q0 = _g_linear(t, r, saved, x, q_tokens, q_width, inner, cast, lora, x_grad)
    q = _g_qk_norm(t, r, saved, q0, q_tokens, inner, x_grad or lora)
    t.drop(q0)
    k0 = _g_linear(t, r, saved, context, kv_tokens, kv_width, inner, cast, lora, context_grad)
    k = _g_qk_norm(t, r, saved, k0, kv_tokens, inner, context_grad or lora)
    t.drop(k0)
    v = _g_linear(t, r, saved, context, kv_tokens, kv_width, inner, cast, lora, context_grad)
    if rope is not None:
        rotated = _g_rope(t, r, saved, q_tokens, inner, rope)
        t.drop(q)
        q = rotated
        rotated = _g_rope(t, r, saved, kv_tokens, inner, rope)
        t.drop(k)
        k = rotated
    o = t.new(r.s * inner * q_tokens)
    lse = t.new(FP32 * heads * q_tokens)
    t.touch(r.attention_tiles(q_tokens, kv_tokens, head_dim))
    t.save(saved, q, k, v, o, lse)
    out = _g_linear(t, r, saved, o, q_tokens, inner, out_width, cast, lora, True)
    t.drop(q, k, v, o, lse)
    return out


def _g_feed_forward(t: _GradTape, r: _Run, saved: list, x: _T, tokens: int, width: int, cast: int) -> _T:
    """``FeedForward`` with autograd (never sliced): GELU keeps its 4·W-wide input."""
    hidden = _g_linear(t, r, saved, x, tokens, width, FF_MULT * width, cast, False, True)
    gelu = t.new(r.s * FF_MULT * width * tokens)
    t.save(saved, hidden)
    t.drop(hidden)
    out = _g_linear(t, r, saved, gelu, tokens, FF_MULT * width, width, cast, False, True)
    t.drop(gelu)
    return out


@dataclass
class _Inputs:
    """The block inputs of a replayed training forward: projected texts and RoPE tables."""

    video_context: _T
    audio_context: _T | None
    video_rope: _T
    audio_rope: _T | None
    cross_ropes: _T | None

    def all(self) -> list[_T]:
        return [x for x in (self.video_context, self.audio_context, self.video_rope, self.audio_rope,
                            self.cross_ropes) if x is not None]


#: Sublayers of a block in backward order (the reverse of the forward).
_SUBLAYERS = ("audio_ff", "ff", "cross", "audio_attn2", "audio_attn1", "attn2", "attn1")


def _g_block(t: _GradTape, r: _Run, video: _T, audio: _T | None, x: _Inputs, *, first: bool, cast: int
             ) -> tuple[_T, _T | None, dict[str, list]]:
    """``LTX2Block.forward`` with autograd and LoRA on every attention that runs. ``first``: block 0, whose inputs
    need no gradient. Returns the new streams and, per sublayer, what autograd keeps."""
    c = r.config
    D, Da, Nv, Na, L = c.inner_dim, c.audio_inner_dim, r.Nv, r.Na, r.L
    lora = r.rank > 0
    b: dict[str, list] = {name: [] for name in _SUBLAYERS}
    grad = not first

    def self_attention(saved, stream, tokens, width, heads, head_dim, rope, per_token):
        m = _g_modulated(t, r, saved, stream, tokens, width, grad, per_token)
        update = _g_attention(t, r, saved, m, m, q_tokens=tokens, kv_tokens=tokens, q_width=width, kv_width=width,
                              heads=heads, head_dim=head_dim, out_width=width, rope=rope, cast=cast, lora=lora,
                              x_grad=grad, context_grad=grad)
        t.drop(m)
        return _g_residual(t, r, saved, update, tokens, width, True, per_token)

    def text_attention(saved, stream, context, tokens, width, context_width, heads, head_dim):
        normed = _g_rms(t, r, saved, stream, tokens, width, True)
        update = _g_attention(t, r, saved, normed, context, q_tokens=tokens, kv_tokens=L, q_width=width,
                              kv_width=context_width, heads=heads, head_dim=head_dim, out_width=width, rope=None,
                              cast=cast, lora=lora, x_grad=True, context_grad=False)
        t.drop(normed)
        out = _g_residual(t, r, saved, update, tokens, width, False, False)
        t.drop(stream)
        return out

    def feed_forward(saved, stream, tokens, width, per_token):
        m = _g_modulated(t, r, saved, stream, tokens, width, True, per_token)
        update = _g_feed_forward(t, r, saved, m, tokens, width, cast)
        t.drop(m)
        out = _g_residual(t, r, saved, update, tokens, width, True, per_token)
        t.drop(stream)
        return out

    v = self_attention(b["attn1"], video, Nv, D, c.num_attention_heads, c.attention_head_dim, x.video_rope, r.i2v)
    v = text_attention(b["attn2"], v, x.video_context, Nv, D, c.cross_attention_dim, c.num_attention_heads,
                       c.attention_head_dim)
    a = None
    if audio is not None:
        a = self_attention(b["audio_attn1"], audio, Na, Da, c.audio_num_attention_heads, c.audio_attention_head_dim,
                           x.audio_rope, False)
        a = text_attention(b["audio_attn2"], a, x.audio_context, Na, Da, c.audio_cross_attention_dim,
                           c.audio_num_attention_heads, c.audio_attention_head_dim)
        if x.cross_ropes is not None:
            v, a = _g_cross_modal(t, r, b["cross"], v, a, x.cross_ropes, cast)
    v = feed_forward(b["ff"], v, Nv, D, r.i2v)
    if a is not None:
        a = feed_forward(b["audio_ff"], a, Na, Da, False)
    return v, a, b


def _g_cross_modal(t: _GradTape, r: _Run, saved: list, video: _T, audio: _T, ropes: _T, cast: int
                   ) -> tuple[_T, _T]:
    """``LTX2Block._cross_modal`` with autograd: the modulated copies are new tensors (kept as LoRA inputs)."""
    c = r.config
    D, Da, Nv, Na = c.inner_dim, c.audio_inner_dim, r.Nv, r.Na
    kw = dict(heads=c.audio_num_attention_heads, head_dim=c.audio_attention_head_dim, rope=ropes, cast=cast,
              lora=r.rank > 0, x_grad=True, context_grad=True)
    vn = _g_rms(t, r, saved, video, Nv, D, True)
    an = _g_rms(t, r, saved, audio, Na, Da, True)
    vm = _g_scale_shift(t, r, saved, vn, Nv, D, True, r.i2v)
    am = _g_scale_shift(t, r, saved, an, Na, Da, True, False)
    update = _g_attention(t, r, saved, vm, am, q_tokens=Nv, kv_tokens=Na, q_width=D, kv_width=Da, out_width=D, **kw)
    t.drop(vm, am)
    new_video = _g_residual(t, r, saved, update, Nv, D, True, r.i2v)
    t.drop(video)
    am = _g_scale_shift(t, r, saved, an, Na, Da, True, False)
    vm = _g_scale_shift(t, r, saved, vn, Nv, D, True, r.i2v)
    update = _g_attention(t, r, saved, am, vm, q_tokens=Na, kv_tokens=Nv, q_width=Da, kv_width=D, out_width=Da, **kw)
    t.drop(am, vm)
    new_audio = _g_residual(t, r, saved, update, Na, Da, True, False)
    t.drop(audio, vn, an)
    return new_video, new_audio


def _g_block_backward(t: _GradTape, r: _Run, b: dict[str, list]) -> None:
    """The backward of one block, sublayer by sublayer in reverse order: each allocates its gradients while all
    it keeps is alive, then releases what it kept. Transients (s = compute bytes): feed-forward the gradients of
    the GELU output and input (2·4·W); attention the gradients of its output, q, k and v (+ CPU kernel tiles)."""
    c = r.config
    D, Da, Nv, Na, L, s = c.inner_dim, c.audio_inner_dim, r.Nv, r.Na, r.L, r.s
    H, Ha = c.num_attention_heads, c.audio_num_attention_heads
    hd, hda = c.attention_head_dim, c.audio_attention_head_dim
    sizes = {  # (query tokens, key tokens, width, inner width, head dim)
        "attn1": (Nv, Nv, D, H * hd, hd), "attn2": (Nv, L, D, H * hd, hd),
        "audio_attn1": (Na, Na, Da, Ha * hda, hda), "audio_attn2": (Na, L, Da, Ha * hda, hda),
    }
    for name in _SUBLAYERS:
        if not b[name]:
            continue
        if name in ("ff", "audio_ff"):
            tokens, width = (Nv, D) if name == "ff" else (Na, Da)
            t.touch(2 * FF_MULT * s * width * tokens)
        elif name == "cross":
            inner = Ha * hda
            t.touch(s * (2 * D + 3 * inner) * Nv + s * 3 * inner * Na
                    + r.attention_tiles(Nv, Na, hda, backward=True))
        else:
            q, kv, width, inner, head_dim = sizes[name]
            t.touch(s * (width + inner) * q + s * inner * (q + 2 * kv)
                    + r.attention_tiles(q, kv, head_dim, backward=True))
        t.release(b[name])


def _connector_rms(t: _Tape, r: _Run, tokens: int, width: int) -> float:
    """``F.rms_norm`` without autograd: on the CPU below float32 through two float32 buffers first."""
    if r.device_type == "cpu" and r.s != FP32:
        t.touch(2 * FP32 * width * tokens)
    return t.alloc(r.s * width * tokens)


def _connector(t: _Tape, r: _Run, tp: TextProjectionConfig) -> float:
    """One ``Embeddings1DConnector`` without autograd (``r.s`` = the connectors' dtype, ``r.L`` tokens): registers
    fill the padding (gather, register rows, select), float32 RoPE tables, the blocks, the final norm. Returns its
    output's bytes."""
    L, W, s = r.L, tp.dim, r.s
    h = 0.0
    if tp.num_registers:
        front, tail = t.alloc(s * W * L), t.alloc(s * W * L)
        h = t.alloc(s * W * L)
        t.free(front, tail)
    tables = _rope_tables(t, r, L, W, 1, dtype_bytes=FP32)
    for _ in range(tp.num_layers):
        for sublayer in ("attention", "feed-forward"):
            normed = _connector_rms(t, r, L, W)
            if sublayer == "attention":
                update = _attention(t, r, q_tokens=L, kv_tokens=L, q_width=W, kv_width=W, heads=tp.heads,
                                    head_dim=tp.head_dim, out_width=W, rope=True, cast=0)
            else:
                update = _feed_forward(t, r, L, W, 0, mult=tp.ff_dim // W)
            t.free(normed)
            new = t.alloc(s * W * L)
            t.free(update, h)
            h = new
    if tp.norm_output:
        out = _connector_rms(t, r, L, W)
        t.free(h)
        h = out
    t.free(tables)
    return h


def _g_connect(t: _GradTape, r: _Run, tp: TextProjectionConfig) -> tuple[_T, _T]:
    """``LTX2TextProjection.connect`` on the float32 features (alive): both connectors, then the float32 contexts."""
    L, W, s = r.L, tp.dim, r.s
    x = t.alloc(s * W * L) if s != FP32 else 0.0
    video = _connector(t, r, tp)
    audio = _connector(t, r, tp)
    masked = t.alloc(video)
    t.free(video)
    if s != FP32:
        video = t.alloc(FP32 * W * L)
        t.free(masked)
        new = t.alloc(FP32 * W * L)
        t.free(audio)
        audio = new
    else:
        video = masked
    t.free(x)
    return _T(video), _T(audio)


def _g_head(t: _GradTape, r: _Run, saved: list, x: _T, tokens: int, width: int, channels: int, cast: int,
            per_token: bool) -> _T:
    """``LTX2DiT._head`` with autograd: LayerNorm (keeps x, float32 mean and rstd), scale-shift, ``proj_out``."""
    takes = _g_takes(t, r, tokens, width, per_token)
    normed = t.new(r.s * width * tokens)
    t.save(saved, x)
    t.new_saved(saved, 2 * FP32 * tokens)
    m = _g_scale_shift(t, r, saved, normed, tokens, width, True, per_token, takes)
    t.drop(normed)
    out = _g_linear(t, r, saved, m, tokens, width, channels, cast, False, True)
    t.drop(m)
    return out


def _g_loss(t: _GradTape, r: _Run, saved: list, pred: _T, channels: int, tokens: int, masked: bool) -> _T:
    """One modality's loss term (``ltx2_flow_matching_loss``): the float32 target, ``mse_loss`` (keeps the
    prediction in float32 and the target; its 0-d result keeps the storage of the unreduced squares) or, with
    conditioning tokens, the masked mean (keeps the difference and the mask). Returns what the loss value holds."""
    n = FP32 * channels * tokens
    target = t.new(n)
    pf = t.new(n) if r.s != FP32 else pred
    if not masked:
        t.save(saved, pf, target)
        value = t.new(n)
        t.touch(n)
    else:
        keep = t.new(FP32 * tokens)
        diff = t.new(n)
        t.save(saved, diff, keep)
        if pf is not pred:
            t.drop(pf)
        square = t.new(n)
        product = t.new(n)
        t.drop(square, product)
        value = None
        t.drop(keep)
    if pf is not pred and pf.alive:
        t.drop(pf)
    t.drop(target)
    return value


def _g_loss_backward(t: _GradTape, r: _Run, loss_saved: list, head_saved: list, tokens: int, width: int,
                     channels: int, masked: bool) -> _T:
    """The loss term's and the head's backward; returns the gradient of the last block's stream."""
    n = FP32 * channels * tokens
    if masked:
        t.touch(2 * n)
    grad = t.new(n)
    t.release(loss_saved)
    if r.s != FP32:
        cast = t.new(r.s * channels * tokens)
        t.drop(grad)
        grad = cast
    for _ in range(3):  # proj_out, scale-shift and LayerNorm backwards
        new = t.new(r.s * width * tokens)
        t.drop(grad)
        grad = new
    t.release(head_saved)
    return grad


@dataclass(frozen=True)
class _StepPeaks:
    """What a replayed training step needs on the device: ``forward[i]`` / ``backward[i]`` the peak while block i
    runs forward / backward (its recomputation included), ``outside`` the peak of everything else (batch, text
    connectors, embeddings, head and loss), ``saved[i]`` what block i's forward adds to what stays alive besides its
    output (without checkpointing: what it keeps for its backward less an input it frees; with it, what its
    recomputation keeps), bytes."""

    forward: tuple[float, ...]
    backward: tuple[float, ...]
    saved: tuple[float, ...]
    outside: float


def _train_step(r: _Run, rc: _Run, tp: TextProjectionConfig, casts: tuple[int, ...], outside_cast: int, *,
                audio: bool, checkpointing: bool) -> _StepPeaks:
    """One LoRA training step as ``training.trainer`` runs it with :class:`~cinetune.ltx2.train.LTX2TrainingAdapter`
    (micro-batch of one sample): batch and noise, the text connectors (``rc``: their dtype), positions, x_σ, the DiT
    forward with autograd (blocks checkpointed or not), the head, the loss, the backward."""
    c = r.config
    D, Da, Nv, Na, L, s = c.inner_dim, c.audio_inner_dim, r.Nv, r.Na, r.L, r.s
    na = Na if audio else 0
    tokens = FP32 * (c.in_channels * Nv + c.audio_in_channels * na)  # float32 video + audio tokens
    t = _GradTape()
    # load_batch stacks the cached latents, loss() patchifies them and draws the noise: CPU memory (on CUDA only
    # their device copies, at the model call); _left_pad gives the float32 features
    data = [t.new(tokens) for _ in range(3)] if r.device_type == "cpu" else []
    conditioned = t.new(Nv) if r.i2v else None
    features = t.new(FP32 * tp.dim * L)
    contexts = _g_connect(t, rc, tp)
    positions = t.new(FP32 * 2 * (3 * Nv + na))
    if r.device_type != "cpu":
        data = [t.new(tokens), t.new(tokens)]
    # ltx2_flow_matching_loss: per-token σ (conditioning), x_σ per modality, the model inputs in the compute dtype
    sigma = t.new(FP32 * Nv) if r.i2v else None
    noisy = []
    for n in (FP32 * c.in_channels * Nv, FP32 * c.audio_in_channels * na):
        if n:
            a, b = t.new(n), t.new(n)
            noisy.append(t.new(n))
            t.drop(a, b)
    cast_inputs = []
    if s != FP32:
        cast_inputs = [t.new(s * c.in_channels * Nv), t.new(s * tp.dim * L)]
        if audio:
            cast_inputs += [t.new(s * c.audio_in_channels * Na), t.new(s * tp.dim * L)]
    # LTX2DiT.forward up to the blocks (nothing there needs a gradient)
    index = t.new(8 * Nv) if r.i2v else None  # TokenTimesteps.index
    vx = _T(_linear(t, r, Nv, c.in_channels, D, outside_cast))
    ax = actx = arope = cross = None
    if audio:
        ax = _T(_linear(t, r, Na, c.audio_in_channels, Da, outside_cast))
        actx = _T(_caption_projection(t, r, Da, outside_cast))
        arope = _T(_rope_tables(t, r, Na, Da, 1))
        cross = _T(_rope_tables(t, r, Nv, c.audio_cross_attention_dim, 1)
                   + _rope_tables(t, r, Na, c.audio_cross_attention_dim, 1))
    inputs = _Inputs(_T(_caption_projection(t, r, D, outside_cast)), actx, _T(_rope_tables(t, r, Nv, D, 3)), arope,
                     cross)
    outside = t.mark()

    forward, saved, held, buckets = [], [], [], []
    t.recording = not checkpointing
    for i, cast in enumerate(casts):
        before = t.live
        new_v, new_a, b = _g_block(t, r, vx, ax, inputs, first=i == 0, cast=cast)
        buckets.append(b)
        if checkpointing:
            held.append((vx, ax))  # the checkpoint keeps its inputs until the block's backward
        else:
            t.drop(vx, ax)
        saved.append(t.live - before - new_v.nbytes - (new_a.nbytes if new_a is not None else 0))
        vx, ax = new_v, new_a
        forward.append(t.mark())
    t.recording = True
    head_saved, loss_saved = [[], []], [[], []]
    preds = [_g_head(t, r, head_saved[0], vx, Nv, D, c.out_channels, outside_cast, r.i2v)]
    if audio:
        preds.append(_g_head(t, r, head_saved[1], ax, Na, Da, c.audio_out_channels, outside_cast, False))
    t.drop(vx, ax, index, *cast_inputs)
    if not checkpointing:  # the forward returns; what its block inputs are kept for stays
        t.drop(*inputs.all())
    values = [_g_loss(t, r, loss_saved[0], preds[0], c.out_channels, Nv, r.i2v)]
    if audio:
        values.append(_g_loss(t, r, loss_saved[1], preds[1], c.audio_out_channels, Na, False))
    t.drop(*preds)
    # adapter.loss returns: its batch, tokens, noise, features, contexts and positions go
    t.drop(*data, conditioned, features, *contexts, positions, sigma, *noisy)
    outside = max(outside, t.mark())

    grads = [_g_loss_backward(t, r, loss_saved[0], head_saved[0], Nv, D, c.out_channels, r.i2v)]
    if audio:
        grads.append(_g_loss_backward(t, r, loss_saved[1], head_saved[1], Na, Da, c.audio_out_channels, False))
    outside = max(outside, t.mark())
    backward = []
    for i in reversed(range(len(casts))):
        if checkpointing:
            v_in, a_in = held[i]
            before = t.live
            new_v, new_a, b = _g_block(t, r, v_in, a_in, inputs, first=i == 0, cast=casts[i])
            t.drop(new_v, new_a)
            saved[i] = t.live - before
        else:
            b = buckets[i]
        _g_block_backward(t, r, b)
        if i:  # the gradients of the block's inputs replace those of its outputs
            new = [t.new(g.nbytes) for g in grads]
            t.drop(*grads)
            grads = new
        else:
            t.drop(*grads)
        if checkpointing:
            t.drop(*held[i])
        backward.append(t.mark())
    if checkpointing:
        t.drop(*inputs.all())
    t.drop(*values)
    return _StepPeaks(tuple(forward), tuple(reversed(backward)), tuple(saved), outside)

"""Attention dispatch: dense attention against the softmax formula, backend checks and fallbacks, block-sparse
attention; every attention of the tiny Kandinsky 5 and LTX-2 DiTs goes through the dispatch."""

import math
import sys
import types
import warnings

import pytest
import torch
from torch._dynamo.exc import TorchDynamoException

import cinetune.core.attention as att
from cinetune.core.attention import (
    BACKENDS,
    AttentionBackendError,
    attention,
    available_backends,
    block_sparse_attention,
    block_sparse_path,
    check_backend,
    flex_block_mask,
)
from families import each_family


def _manual_attention(q, k, v, allowed=None):
    """softmax(q kᵀ/sqrt(D)) v with disallowed scores at -inf; allowed broadcasts to [B, H, Sq, Sk]."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _qkv(B, H, S, D, seed=0, Sk=None, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, S, D, generator=g)
    k = torch.randn(B, H, Sk or S, D, generator=g)
    v = torch.randn(B, H, Sk or S, D, generator=g)
    return [t.requires_grad_(grad) for t in (q, k, v)]


@pytest.fixture
def no_kernels(monkeypatch):
    """Pretend sageattention and flash_attn are not installed, whatever this environment has."""
    monkeypatch.setitem(sys.modules, "sageattention", None)
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    monkeypatch.setattr(att, "_kernels", {})


# ------------------------------------------------------------------------------------------------ dense attention


def test_attention_matches_manual_softmax_forward_and_backward():
    q, k, v = _qkv(2, 3, 5, 8, Sk=7, grad=True)
    out = attention(q, k, v)
    assert out.shape == (2, 3, 5, 8)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref = _manual_attention(q, k, v)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    assert _rel_err(out, ref) < 1e-5
    for a, b in zip(grads, ref_grads):
        assert _rel_err(a, b) < 1e-5


def test_key_padding_mask_matches_manual_masked_softmax():
    q, k, v = _qkv(3, 2, 4, 8, Sk=6)
    lengths = [6, 3, 1]
    mask = torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]
    out = attention(q, k, v, key_padding_mask=mask)
    ref = _manual_attention(q, k, v, mask[:, None, None, :])
    assert _rel_err(out, ref) < 1e-5
    # padded keys and values must have no influence at all
    k2, v2 = k.clone(), v.clone()
    k2[~mask[:, None, :, None].expand_as(k)] = 1e3
    v2[~mask[:, None, :, None].expand_as(v)] = -1e3
    assert torch.allclose(attention(q, k2, v2, key_padding_mask=mask), out, atol=1e-6)
    # a non-prefix mask (holes in the middle) is honoured too
    holes = torch.tensor([[True, False, True, False, True, True]] * 3)
    assert _rel_err(attention(q, k, v, key_padding_mask=holes), _manual_attention(q, k, v, holes[:, None, None])) < 1e-5


def test_key_padding_mask_validation():
    q, k, v = _qkv(2, 1, 3, 4, Sk=5)
    with pytest.raises(ValueError, match=r"bool \[B, Sk\] = \[2, 5\]"):
        attention(q, k, v, key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        attention(q, k, v, key_padding_mask=torch.ones(2, 5))


def test_attention_rejects_mismatched_inputs():
    q, k, v = _qkv(1, 2, 3, 4)
    with pytest.raises(ValueError, match="one dtype"):
        attention(q, k.double(), v)
    with pytest.raises(ValueError, match="4-D"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match="head size"):
        attention(q, k[..., :2], v)


def test_check_backend_unknown_name_lists_valid_names():
    with pytest.raises(AttentionBackendError) as e:
        check_backend("xformers")
    msg = str(e.value)
    assert "'xformers'" in msg and all(name in msg for name in BACKENDS)
    with pytest.raises(AttentionBackendError):
        attention(*_qkv(1, 1, 2, 4), backend="flash")


@pytest.mark.parametrize(
    "name, hint",
    [("sageattention", "pip install sageattention"), ("flash-attn", "pip install flash-attn --no-build-isolation")],
)
def test_missing_backend_gives_install_hint(no_kernels, name, hint):
    with pytest.raises(AttentionBackendError, match="not installed") as e:
        check_backend(name)
    assert hint in str(e.value)
    with pytest.raises(AttentionBackendError, match="not installed"):
        attention(*_qkv(1, 1, 2, 4), backend=name)


def test_available_backends_lists_only_importable_ones(no_kernels, monkeypatch):
    check_backend("sdpa")
    assert available_backends() == ["sdpa"]
    fake = types.ModuleType("sageattention")
    fake.sageattn = lambda *a, **kw: pytest.fail("the Sage kernel must not run on CPU")
    monkeypatch.setitem(sys.modules, "sageattention", fake)
    monkeypatch.setattr(att, "_kernels", {})
    assert available_backends() == ["sdpa", "sageattention"]


def test_broken_install_reports_the_import_error(monkeypatch):
    fake = types.ModuleType("flash_attn")  # importable, but without the kernel function
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    monkeypatch.setattr(att, "_kernels", {})
    with pytest.raises(AttentionBackendError, match="fails to import"):
        check_backend("flash-attn")


def test_missing_dependency_of_an_installed_backend_is_not_called_not_installed(monkeypatch):
    def import_module(name):
        raise ModuleNotFoundError("No module named 'triton'", name="triton")

    monkeypatch.setattr(att, "importlib", types.SimpleNamespace(import_module=import_module))
    monkeypatch.setattr(att, "_kernels", {})
    with pytest.raises(AttentionBackendError, match="fails to import.*triton"):
        check_backend("sageattention")


def test_cuda_only_backend_falls_back_to_sdpa_on_cpu(monkeypatch):
    fake = types.ModuleType("sageattention")
    fake.sageattn = lambda *a, **kw: pytest.fail("the Sage kernel must not run on CPU")
    monkeypatch.setitem(sys.modules, "sageattention", fake)
    monkeypatch.setattr(att, "_kernels", {})
    monkeypatch.setattr(att, "_warned", set())
    q, k, v = _qkv(1, 2, 4, 8)
    with pytest.warns(RuntimeWarning, match="falls back to 'sdpa'.*CUDA"):
        out = attention(q, k, v, backend="sageattention")
    assert _rel_err(out, _manual_attention(q, k, v)) < 1e-5


#: Attention calls of one forward of the tiny DiTs: K5 self-attention in its text block, self- and cross-attention
#: in each of its 2 visual blocks; LTX-2 six attentions (video/audio self, text, audio↔video) in each of 2 blocks.
DIT_ATTENTIONS = {"k5": 1 + 2 * 2, "ltx2": 6 * 2}


@each_family
def test_every_attention_of_the_family_dits_goes_through_the_dispatch(fam, no_kernels, monkeypatch):
    model, inputs = fam.build(), fam.inputs()
    with torch.no_grad():
        expected = fam.run(model, inputs)
        with pytest.raises(AttentionBackendError, match="Unknown attention backend 'xformers'"):
            fam.run(model, inputs, "xformers")
        with pytest.raises(AttentionBackendError, match="not installed.*pip install sageattention"):
            fam.run(model, inputs, "sageattention")

        # a stand-in kernel, allowed on the CPU: each attention of the model reaches it with the chosen backend
        calls = []

        def sageattn(q, k, v, tensor_layout, is_causal):
            assert tensor_layout == "HND" and not is_causal
            calls.append(q.shape)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

        fake = types.ModuleType("sageattention")
        fake.sageattn = sageattn
        monkeypatch.setitem(sys.modules, "sageattention", fake)
        monkeypatch.setattr(att, "_kernels", {})
        monkeypatch.setattr(att, "_fallback_reason", lambda *args: None)
        assert torch.equal(fam.run(model, inputs, "sageattention"), expected)
    assert len(calls) == DIT_ATTENTIONS[fam.id]


# ------------------------------------------------------------------------------------------ block-sparse attention


def _random_block_mask(shape, density, seed, diagonal=True):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(shape, generator=g) < density
    if diagonal:
        m |= torch.eye(shape[-1], dtype=torch.bool)
    return m


def _token_mask(block_mask, bs):
    return block_mask.repeat_interleave(bs, -2).repeat_interleave(bs, -1)



def _assert_sparse_matches_dense(q, k, v, block_mask, bs, path=None):
    """block_sparse_attention equals dense attention with the expanded -inf mask, forward and q/k/v gradients."""
    out = block_sparse_attention(q, k, v, block_mask, block_size=bs, path=path)
    ref = _manual_attention(q, k, v, _token_mask(block_mask, bs))
    assert _rel_err(out, ref) < 1e-5
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert _rel_err(a, b) < 1e-5

@pytest.mark.parametrize("path", [None, "gathered", "masked dense"])
@pytest.mark.parametrize("mask_batch, mask_heads", [(2, 3), (1, 3), (2, 1), (1, 1)])
def test_block_sparse_matches_dense_with_minus_inf_mask(mask_batch, mask_heads, path):
    bs, nb = 16, 6
    q, k, v = _qkv(2, 3, bs * nb, 16, seed=1, grad=True)
    block_mask = _random_block_mask((mask_batch, mask_heads, nb, nb), 0.4, seed=2)
    assert not block_mask.all()
    _assert_sparse_matches_dense(q, k, v, block_mask, bs, path)


@pytest.mark.parametrize("path", ["gathered", "masked dense"])
def test_block_sparse_with_a_short_last_block(path):
    bs, S = 16, 16 * 4 + 5
    q, k, v = _qkv(2, 2, S, 8, seed=14, grad=True)
    block_mask = _random_block_mask((2, 2, 5, 5), 0.5, seed=15)
    out = block_sparse_attention(q, k, v, block_mask, block_size=bs, path=path)
    ref = _manual_attention(q, k, v, _token_mask(block_mask, bs)[..., :S, :S])
    assert out.shape == q.shape and _rel_err(out, ref) < 1e-5
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert _rel_err(a, b) < 1e-5


def test_block_sparse_in_row_slices_with_recompute_matches_dense(monkeypatch):
    # A tiny slice budget forces several query-row slices, each recomputed in backward.
    monkeypatch.setattr(att, "_DENSE_MASK_ELEMENTS", 1)
    bs, nb = 8, 5
    q, k, v = _qkv(1, 2, bs * nb, 8, seed=3, grad=True)
    block_mask = _random_block_mask((1, 2, nb, nb), 0.5, seed=4)
    _assert_sparse_matches_dense(q, k, v, block_mask, bs, "masked dense")


def test_block_sparse_backward_keeps_no_expanded_token_mask(monkeypatch):
    # With several row slices, autograd must not hold the [S, S] token mask (or its float form) for backward.
    monkeypatch.setattr(att, "_DENSE_MASK_ELEMENTS", 64 * 256)
    bs, nb = 8, 32
    S = bs * nb
    q, k, v = _qkv(1, 1, S, 4, seed=12, grad=True)
    block_mask = _random_block_mask((1, 1, nb, nb), 0.3, seed=13)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block_sparse_attention(q, k, v, block_mask, block_size=bs, path="masked dense")
    assert sum(saved) < S * S  # an expanded bool mask alone would be S*S bytes
    ref = _manual_attention(q, k, v, _token_mask(block_mask, bs))
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert _rel_err(a, b) < 1e-5


def test_all_true_block_mask_equals_plain_attention():
    q, k, v = _qkv(2, 2, 64, 8, seed=5)
    out = block_sparse_attention(q, k, v, torch.ones(1, 1, 4, 4, dtype=torch.bool), block_size=16)
    assert _rel_err(out, attention(q, k, v)) < 1e-5


def test_block_diagonal_mask_equals_per_block_attention():
    bs, nb = 16, 4
    q, k, v = _qkv(1, 2, bs * nb, 8, seed=6)
    out = block_sparse_attention(q, k, v, torch.eye(nb, dtype=torch.bool)[None, None], block_size=bs)
    for i in range(nb):
        s = slice(i * bs, (i + 1) * bs)
        assert _rel_err(out[:, :, s], attention(q[:, :, s], k[:, :, s], v[:, :, s])) < 1e-5


@pytest.mark.parametrize("path", ["gathered", "masked dense"])
def test_query_block_without_keys_outputs_zeros_and_finite_gradients(path):
    bs, nb = 8, 3
    q, k, v = _qkv(1, 1, bs * nb, 4, seed=7, grad=True)
    block_mask = torch.tensor([[True, False, False], [False, False, False], [True, True, True]])[None, None]
    out = block_sparse_attention(q, k, v, block_mask, block_size=bs, path=path)
    assert torch.equal(out[:, :, bs : 2 * bs], torch.zeros_like(out[:, :, bs : 2 * bs]))
    rows = list(range(bs)) + list(range(2 * bs, 3 * bs))
    ref = _manual_attention(q, k, v, _token_mask(block_mask, bs))
    assert _rel_err(out[:, :, rows], ref[:, :, rows]) < 1e-5
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[0][:, :, bs : 2 * bs], torch.zeros_like(grads[0][:, :, bs : 2 * bs]))


def test_block_sparse_input_errors():
    q, k, v = _qkv(1, 2, 48, 8)
    with pytest.raises(ValueError, match=r"expected \[1 or 1, 2 or 1, 2, 2\] \(ceil\(48 / 32\) = 2 blocks"):
        block_sparse_attention(q, k, v, torch.ones(1, 1, 1, 1, dtype=torch.bool), block_size=32)
    with pytest.raises(ValueError, match="bool"):
        block_sparse_attention(q, k, v, torch.ones(1, 1, 3, 3), block_size=16)
    with pytest.raises(ValueError, match=r"expected \[1 or 1, 2 or 1, 3, 3\]"):
        block_sparse_attention(q, k, v, torch.ones(1, 1, 4, 4, dtype=torch.bool), block_size=16)
    with pytest.raises(ValueError, match="self-attention"):
        block_sparse_attention(q, k[:, :, :32], v[:, :, :32], torch.ones(1, 1, 3, 3, dtype=torch.bool), block_size=16)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        block_sparse_attention(q, k, v, torch.ones(1, 1, 3, 3, dtype=torch.bool), block_size=0)
    with pytest.raises(ValueError, match="Unknown block-sparse path 'sparse'.*gathered"):
        block_sparse_attention(q, k, v, torch.ones(1, 1, 3, 3, dtype=torch.bool), block_size=16, path="sparse")
    with pytest.raises(ValueError, match="'flex compiled' path runs on CUDA"):
        block_sparse_attention(q, k, v, torch.ones(1, 1, 3, 3, dtype=torch.bool), block_size=16, path="flex compiled")


def test_cpu_uses_the_gathered_path_and_logs_it_once(monkeypatch, caplog):
    monkeypatch.setattr(att, "_logged", set())
    assert block_sparse_path("cpu") == "gathered"
    assert att.BLOCK_SPARSE_PATHS == ("flex compiled", "gathered", "masked dense")
    q, k, v = _qkv(1, 1, 32, 4)
    with caplog.at_level("INFO", logger="cinetune.core.attention"):
        for _ in range(3):
            block_sparse_attention(q, k, v, torch.ones(1, 1, 2, 2, dtype=torch.bool), block_size=16)
    assert [r.getMessage() for r in caplog.records] == ["Block-sparse (NABLA) attention on cpu uses the gathered path."]


@pytest.mark.parametrize("full_blocks", [True, False])
def test_flex_block_mask_lists_exactly_the_selected_blocks(full_blocks):
    block_mask = _random_block_mask((2, 3, 5, 5), 0.5, seed=8, diagonal=False)
    bm = flex_block_mask(block_mask, 64, full_blocks=full_blocks)
    assert bm.shape == (2, 3, 320, 320)
    assert torch.equal(bm.to_dense().bool(), block_mask)
    # the transposed (key-major) lists used by the backward pass agree with the mask too
    q_counts = bm.full_q_num_blocks if full_blocks else bm.q_num_blocks
    assert torch.equal(q_counts, block_mask.sum(dim=-2, dtype=torch.int32))


@pytest.fixture
def gathered_spy(monkeypatch):
    """Count the calls that reach the gathered path."""
    calls = []
    real = att.gathered_attention

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(att, "gathered_attention", spy)
    return calls


@pytest.mark.parametrize("failure, stays_broken", [
    (TorchDynamoException("inductor could not compile"), True),
    (RuntimeError("kernel launch failed"), False),
])
def test_failing_flex_kernel_falls_back_to_the_gathered_path(monkeypatch, gathered_spy, failure, stays_broken):
    # The compiled kernel only runs on a GPU: here FlexAttention is made to look available and its compile to fail.
    monkeypatch.setattr(att, "_flex_state", {"flex": True})
    monkeypatch.setattr(att, "_warned", set())
    assert block_sparse_path("cuda") == "flex compiled"
    real_path = att.block_sparse_path
    monkeypatch.setattr(att, "block_sparse_path", lambda device: real_path("cuda"))  # CPU tensors take the CUDA choice
    monkeypatch.setattr(att, "_compiled_flex", lambda: (_ for _ in ()).throw(failure))
    bs, nb = 8, 4
    q, k, v = _qkv(1, 2, bs * nb, 8, seed=11, grad=True)
    block_mask = _random_block_mask((1, 2, nb, nb), 0.5, seed=12)
    with pytest.warns(RuntimeWarning, match=f"{type(failure).__name__}.*the gathered path"):
        _assert_sparse_matches_dense(q, k, v, block_mask, bs)
    assert len(gathered_spy) == 1
    assert att._flex_state.get("broken", False) is stays_broken
    assert real_path("cuda") == ("gathered" if stays_broken else "flex compiled")


def test_failing_gathered_path_falls_back_to_masked_dense(monkeypatch):
    monkeypatch.setattr(att, "_gathered_broken", set())
    monkeypatch.setattr(att, "_warned", set())

    def missing(*args):
        raise NotImplementedError("index_add_ is not implemented for this device")

    monkeypatch.setattr(att, "gathered_attention", missing)
    bs, nb = 8, 4
    q, k, v = _qkv(1, 2, bs * nb, 8, seed=13, grad=True)
    block_mask = _random_block_mask((1, 2, nb, nb), 0.5, seed=14)
    with pytest.warns(RuntimeWarning, match="Gathered block-sparse attention failed on cpu.*masked dense"):
        _assert_sparse_matches_dense(q, k, v, block_mask, bs)
    assert block_sparse_path("cpu") == "masked dense"
    with pytest.raises(NotImplementedError):  # a forced path is not replaced
        block_sparse_attention(q, k, v, block_mask, block_size=bs, path="gathered")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's sparse kernel needs CUDA")
def test_flex_path_on_cuda_matches_dense_forward_and_backward():
    bs, nb = 64, 8
    q, k, v = (t.detach().cuda().requires_grad_() for t in _qkv(1, 2, bs * nb, 64, seed=9))
    block_mask = _random_block_mask((1, 2, nb, nb), 0.3, seed=10).cuda()
    assert block_sparse_path("cuda") == "flex compiled"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a silent fallback to the dense path would fail here
        out = block_sparse_attention(q, k, v, block_mask, block_size=bs)
    ref = _manual_attention(q, k, v, _token_mask(block_mask, bs))
    tol = 2e-3  # the GPU kernels may multiply float32 in TF32
    assert _rel_err(out, ref) < tol
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert _rel_err(a, b) < tol


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gathered_path_on_cuda_matches_dense_forward_and_backward():
    bs, nb = 64, 8
    q, k, v = (t.detach().cuda().requires_grad_() for t in _qkv(1, 2, bs * nb, 64, seed=9))
    block_mask = _random_block_mask((1, 2, nb, nb), 0.3, seed=10).cuda()
    out = block_sparse_attention(q, k, v, block_mask, block_size=bs, path="gathered")
    ref = _manual_attention(q, k, v, _token_mask(block_mask, bs))
    tol = 2e-3  # the GPU kernels may multiply float32 in TF32
    assert _rel_err(out, ref) < tol
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert _rel_err(a, b) < tol

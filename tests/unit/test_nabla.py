import math

import pytest
import torch

from cinetune.k5.nabla import (
    NablaConfig,
    check_nabla_grid,
    fractal_permutation,
    nabla_attention,
    nabla_block_mask,
    sta_block_mask,
    topcdf_block_mask,
)

# ----------------------------------------------------------------- brute-force definitions (python loops, float64)


def _brute_topcdf(q, k, P, bs=64):
    """Returns (mask as nested lists [B][H][Nb][Nb], smallest |cumulative mass − (1 − P)| seen at any block)."""
    B, H, S, D = q.shape
    nb = S // bs
    masks, margin = [], math.inf
    for b in range(B):
        per_head = []
        for h in range(H):
            qm = [q[b, h, i * bs : (i + 1) * bs].double().sum(0) / bs for i in range(nb)]
            km = [k[b, h, j * bs : (j + 1) * bs].double().sum(0) / bs for j in range(nb)]
            rows = []
            for i in range(nb):
                logits = [float(torch.dot(qm[i], km[j])) / math.sqrt(D) for j in range(nb)]
                top = max(logits)
                e = [math.exp(x - top) for x in logits]
                p = [x / sum(e) for x in e]
                keep = [False] * nb
                mass = 0.0
                for j in sorted(range(nb), key=lambda j: (p[j], j)):  # ascending; ties: lower index first
                    mass += p[j]
                    keep[j] = mass >= 1.0 - P
                    margin = min(margin, abs(mass - (1.0 - P)))
                rows.append(keep)
            per_head.append(rows)
        masks.append(per_head)
    return masks, margin


def _brute_sta(T, Hb, Wb, window):
    wT, wH, wW = window
    coords = [(t, h, w) for t in range(T) for h in range(Hb) for w in range(Wb)]
    return [
        [abs(t - t2) <= wT // 2 and abs(h - h2) <= wH // 2 and abs(w - w2) <= wW // 2 for (t2, h2, w2) in coords]
        for (t, h, w) in coords
    ]


def _qk_with_block_structure(B, H, S, D, seed):
    """Random q, k whose 64-token block means differ enough for a non-uniform block map."""
    g = torch.Generator().manual_seed(seed)

    def make():
        offset = 1.0 * torch.randn(B, H, S // 64, 1, D, generator=g)
        return (offset + torch.randn(B, H, S // 64, 64, D, generator=g)).reshape(B, H, S, D)

    return make(), make()


# ------------------------------------------------------------------------------------------------------- masks


@pytest.mark.parametrize(
    "grid, window, P",
    [
        ((1, 16, 16), (11, 3, 3), 0.9),
        ((2, 16, 24), (11, 3, 3), 0.5),
        ((3, 8, 24), (3, 1, 3), 0.97),
        ((13, 8, 8), (11, 3, 3), 0.7),
        ((4, 24, 8), (1, 1, 1), 1.0),
    ],
)
def test_nabla_mask_equals_brute_force_definition(grid, window, P):
    T, Ht, Wt = grid
    B, H, D = 2, 2, 16
    q, k = _qk_with_block_structure(B, H, T * Ht * Wt, D, seed=sum(grid))
    brute, margin = _brute_topcdf(q, k, P)
    # exact comparison is meaningful only if no cumulative mass sits within float32 error of the threshold
    assert P == 1.0 or margin > 1e-5
    topcdf = torch.tensor(brute)
    sta = torch.tensor(_brute_sta(T, Ht // 8, Wt // 8, window))

    assert torch.equal(topcdf_block_mask(q, k, P), topcdf)
    cfg = NablaConfig(P=P, window=window)
    assert torch.equal(nabla_block_mask(q, k, grid, cfg), topcdf | sta)
    assert torch.equal(nabla_block_mask(q, k, grid, NablaConfig(P=P, window=window, sta=False)), topcdf)
    if P < 1.0:  # the case is not trivial: top-CDF both keeps and drops blocks, and adds to STA
        assert 0 < topcdf.float().mean() < 1
        assert ((topcdf | sta) != sta).any() or T * (Ht // 8) * (Wt // 8) <= 4
    else:
        assert topcdf.all()


def test_topcdf_on_low_precision_inputs_uses_the_float32_map():
    q, k = _qk_with_block_structure(1, 2, 8 * 64, 16, seed=3)
    q16, k16 = q.bfloat16(), k.bfloat16()
    brute, margin = _brute_topcdf(q16.float(), k16.float(), 0.8)
    assert margin > 1e-5
    assert torch.equal(topcdf_block_mask(q16, k16, 0.8), torch.tensor(brute))


def test_ties_drop_the_lowest_block_indices_first():
    # q = 0 makes every map row exactly uniform: p = 1/32 per block. With P = 0.75 the ascending cumulative mass
    # (i + 1)/32 reaches 1 − P = 0.25 at sorted position i = 7, so seven blocks are dropped per row; with a stable
    # ascending sort they are key blocks 0..6. (torch's default unstable sort reorders ties at this row length.)
    q = torch.zeros(1, 2, 32 * 64, 8)
    k = torch.randn(1, 2, 32 * 64, 8)
    mask = topcdf_block_mask(q, k, 0.75)
    expected = torch.ones(32, dtype=torch.bool)
    expected[:7] = False
    assert torch.equal(mask, expected.expand(1, 2, 32, 32))


def test_sta_block_mask_matches_explicit_distance_checks():
    for T, Hb, Wb, window in [(13, 3, 4, (11, 3, 3)), (5, 2, 6, (3, 1, 5)), (2, 1, 1, (1, 1, 1))]:
        assert torch.equal(sta_block_mask(T, Hb, Wb, window), torch.tensor(_brute_sta(T, Hb, Wb, window)))


def test_nabla_attention_equals_dense_attention_under_the_mask():
    grid = (2, 16, 8)
    q, k = _qk_with_block_structure(1, 2, 2 * 16 * 8, 16, seed=11)
    v = torch.randn_like(q)
    cfg = NablaConfig(P=0.6, window=(1, 1, 1))
    mask = nabla_block_mask(q, k, grid, cfg)
    assert not mask.all()
    allowed = mask.repeat_interleave(64, -2).repeat_interleave(64, -1)
    scores = (q @ k.transpose(-1, -2) / 4.0).masked_fill(~allowed, float("-inf"))
    ref = torch.softmax(scores, -1) @ v
    out = nabla_attention(q, k, v, grid, cfg)
    assert ((out - ref).abs().max() / ref.abs().max()) < 1e-5


# --------------------------------------------------------------------------------------------- token ordering


def test_fractal_permutation_places_tokens_in_8x8_tiles():
    T, Ht, Wt = 2, 16, 24
    perm, inv = fractal_permutation(T, Ht, Wt)
    S = T * Ht * Wt
    assert perm.dtype == torch.int64 and perm.shape == (S,)
    for t in range(T):
        for h in range(Ht):
            for w in range(Wt):
                fractal = ((t * (Ht // 8) + h // 8) * (Wt // 8) + w // 8) * 64 + (h % 8) * 8 + w % 8
                assert perm[fractal] == (t * Ht + h) * Wt + w
    assert torch.equal(perm[inv], torch.arange(S)) and torch.equal(inv[perm], torch.arange(S))
    tokens = torch.randn(3, S, 5)
    assert torch.equal(tokens[:, perm][:, inv], tokens)


def test_check_nabla_grid_names_the_nearest_valid_pixel_sizes():
    check_nabla_grid(31, 32, 48)  # 768x512 px
    with pytest.raises(ValueError) as e:
        check_nabla_grid(16, 30, 45)  # 480x720 px
    msg = str(e.value)
    assert "multiples of 128" in msg
    assert "height 480 px -> use 384 or 512 px" in msg and "width 720 px -> use 640 or 768 px" in msg
    with pytest.raises(ValueError, match="height 64 px -> use 128 px"):
        check_nabla_grid(1, 4, 8)
    with pytest.raises(ValueError, match="width"):
        fractal_permutation(1, 8, 12)
    with pytest.raises(ValueError, match="positive int"):
        check_nabla_grid(0, 8, 8)


def test_grid_must_match_the_sequence():
    q = torch.randn(1, 1, 128, 8)
    with pytest.raises(ValueError, match="S = T\\*Ht\\*Wt = 192"):
        nabla_block_mask(q, q, (3, 8, 8), NablaConfig())


def test_config_validation():
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        NablaConfig(P=0.0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        NablaConfig(P=1.5)
    with pytest.raises(ValueError, match="three positive ints"):
        NablaConfig(window=(3, 3))
    assert NablaConfig(window=[5, 1, 1]).window == (5, 1, 1)

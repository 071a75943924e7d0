"""Variant math against exact attention on fresh random inputs (relative error; NaN never passes)."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from fnabench.variants import ForwardState, parse_variant
from fnabench.variants import landmarks as lm
from fnabench.variants.exact import exact_attention, sdpa_attention
from fnabench.variants.fna import fna_attention, nystrom_attention
from fnabench.variants.mask import detect_tokens
from fnabench.variants.nystrom import segment_mean_attention, segment_means
from fnabench.variants.pinv import exact_pinv, newton_pinv, ridge_values, solve_dominant


def _qkv(b=2, h=3, n=40, d=16, dtype=torch.float64, scale=1.0):
    return tuple(torch.randn(b, h, n, d, dtype=dtype) * scale for _ in range(3))


def _formula_reference(q, k, v, idx, pinv, iters):
    """FNA written out per batch and head in float64, straight from the four-step formula."""
    q, k, v = q.double(), k.double(), v.double()
    s = q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        sel = idx[b]
        for h in range(q.shape[1]):
            qs, ks = q[b, h, sel], k[b, h, sel]
            a = torch.softmax(s * qs @ ks.T, -1)
            bv = torch.softmax(s * qs @ k[b, h].T, -1) @ v[b, h]
            if pinv == "exact":
                z = torch.linalg.pinv(a)
            else:
                z = a.T / a.sum(0).max()
                eye = torch.eye(a.shape[0], dtype=a.dtype)
                for _ in range(iters):
                    az = a @ z
                    z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
            out[b, h] = torch.softmax(s * q[b, h] @ ks.T, -1) @ (z @ bv)
    return out


@pytest.mark.parametrize("pinv", ["newton", "exact"])
def test_fna_attention_matches_formula_reference(pinv):
    q, k, v = _qkv()
    idx = torch.stack([torch.randperm(40)[:12] for _ in range(2)])
    out = fna_attention(q, k, v, idx, pinv=pinv, pinv_iters=6)
    assert out.shape == q.shape
    assert rel_err(out, _formula_reference(q, k, v, idx, pinv, 6)) <= 1e-10


def test_nystrom_attention_is_a_deprecated_alias_of_fna_attention():
    q, k, v = _qkv(n=20)
    idx = torch.stack([torch.randperm(20)[:6] for _ in range(2)])
    with pytest.warns(DeprecationWarning, match="fna_attention"):
        out = nystrom_attention(q, k, v, idx, pinv="exact", pinv_iters=3)
    assert torch.equal(out, fna_attention(q, k, v, idx, pinv="exact", pinv_iters=3))


def test_all_tokens_as_landmarks_is_exact():
    q, k, v = _qkv(n=50)
    idx = torch.arange(50).expand(2, 50)
    assert rel_err(fna_attention(q, k, v, idx, pinv="exact"), exact_attention(q, k, v)) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_supported_and_close(dtype):
    q, k, v = _qkv(n=64, dtype=torch.float32)
    idx = torch.arange(64).expand(2, 64)
    ref = exact_attention(q, k, v)
    out = fna_attention(q.to(dtype), k.to(dtype), v.to(dtype), idx, pinv_iters=20)
    assert out.dtype == dtype
    tol = {torch.float64: 1e-5, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
    assert rel_err(out.float(), ref) <= tol


def _planted(n=577, width=64, sinks=(0, 100, 200, 300), factor=12.0, dtype=torch.float32):
    """Tokens with a few ×12 high-norm 'sink' rows, projected to one head (reference fna.md §5)."""
    x = torch.randn(1, n, width)
    x[:, list(sinks)] *= factor
    w = [torch.randn(width, width) / width**0.5 for _ in range(3)]
    q, k, v = ((x @ wi).reshape(1, n, 1, width).transpose(1, 2).to(dtype) for wi in w)
    return x, q, k, v


def test_fps_and_norm_beat_random_with_planted_sinks():
    sinks = (0, 100, 200, 300)
    x, q, k, v = _planted(sinks=sinks)
    ref = exact_attention(q, k, v)
    cls = torch.zeros(577, dtype=torch.bool)
    cls[0] = True
    selections = {
        "fps": lm.farthest_point_sampling(q.mean(1), 64, guarantee=cls),
        "norm": lm.norm_first_selection(q.mean(1), x.norm(dim=-1), 64, ratio=3.0, num_prefix=1, guarantee=cls),
        "random": lm.random_selection(1, 577, 64, seed=0, device="cpu", guarantee=cls),
    }
    errors = {name: rel_err(fna_attention(q, k, v, idx), ref) for name, idx in selections.items()}
    assert set(sinks) <= set(selections["fps"][0].tolist())
    assert set(sinks) <= set(selections["norm"][0].tolist())
    assert errors["fps"] < 0.5 * errors["random"], errors
    assert errors["norm"] < 0.5 * errors["random"], errors


def test_error_falls_as_m_grows_with_fps():
    _, q, k, v = _planted()
    ref = exact_attention(q, k, v)
    errors = [rel_err(fna_attention(q, k, v, lm.farthest_point_sampling(q.mean(1), m)), ref)
              for m in (16, 64, 256)]
    assert errors[0] > errors[1] > errors[2], errors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_no_nan_or_inf_in_half_precision_with_sinks(dtype):
    _, q, k, v = _planted(factor=30.0, dtype=dtype)
    idx = lm.farthest_point_sampling(q.mean(1).float(), 64)
    out = fna_attention(q, k, v, idx)
    assert torch.isfinite(out).all()
    assert rel_err(out.float(), exact_attention(q.float(), k.float(), v.float())) < 1.0
    nys = segment_mean_attention(q, k, v, 32)
    assert torch.isfinite(nys).all()


def test_pinv_methods():
    a = torch.softmax(torch.randn(3, 10, 10, dtype=torch.float64), -1)
    ref = torch.linalg.pinv(a)
    assert rel_err(newton_pinv(a, 40), ref) < 1e-8
    assert rel_err(exact_pinv(a), ref) < 1e-12
    assert newton_pinv(a.half(), 6).dtype == torch.float32  # computed in at least fp32


def test_ridge_solve_agrees_with_pinv_on_well_conditioned_a_and_is_exact_at_m_equal_n():
    a = torch.softmax(torch.randn(3, 10, 10, dtype=torch.float64), -1)
    bv, v_land = torch.randn(3, 10, 4, dtype=torch.float64), torch.randn(3, 10, 4, dtype=torch.float64)
    assert rel_err(ridge_values(a, bv, v_land, 1e-10), torch.linalg.pinv(a) @ bv) < 1e-6
    q, k, v = _qkv(n=30)
    every = torch.arange(30)[None].expand(q.shape[0], -1)
    for lam in (1e-3, 1.0, 10.0):  # every token a landmark: exact whatever λ
        assert rel_err(fna_attention(q, k, v, every, pinv="ridge", ridge=lam), exact_attention(q, k, v)) < 1e-6
        assert rel_err(segment_mean_attention(q, k, v, 30, pinv="ridge", ridge=lam), exact_attention(q, k, v)) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dominant_solve_takes_the_fast_path_and_matches_lapack(dtype, monkeypatch):
    """A + λI (λ ≥ 1, softmax rows) needs no pivoting: two triangular solves give LAPACK's answer, row-major.
    torch.linalg.solve is made to fail, so a silent fall-back to it cannot pass."""
    a = torch.softmax(torch.randn(4, 12, 64, 64, dtype=dtype) * 4, -1)
    rhs = torch.randn(4, 12, 64, 32, dtype=dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for lam in (1.0, 3.0):
        shifted = a + lam * torch.eye(64, dtype=dtype)
        ref = torch.linalg.solve(shifted, rhs)
        with monkeypatch.context() as patch:
            patch.setattr(torch.linalg, "solve", None)
            out = solve_dominant(shifted, rhs)
        assert out.is_contiguous() and rel_err(out, ref) < tol


def test_dominant_solve_falls_back_to_lapack_where_pivoting_is_needed():
    # a permutation-like matrix: LU of its transpose must swap rows, so the fast path may not be used
    mat = torch.tensor([[1e-9, 1.0, 0.0], [1.0, 1e-9, 0.0], [0.0, 0.0, 2.0]], dtype=torch.float64)
    rhs = torch.randn(3, 5, dtype=torch.float64)
    out = solve_dominant(mat, rhs)
    assert torch.allclose(mat @ out, rhs, atol=1e-12)
    assert torch.isfinite(ridge_values(torch.softmax(torch.randn(2, 16, 16) * 30, -1), torch.randn(2, 16, 8),
                                       torch.randn(2, 16, 8), 1e-3)).all()


def _reference_fps(x, m, guarantee, exclude):
    """FPS by its definition, one row at a time: guaranteed tokens, else the candidate farthest from the
    candidates' centroid; then the candidate farthest from the chosen set; repeat the last pick when none is
    left. Ties go to the lowest index."""
    out = []
    for row, g_row, e_row in zip(x.double(), guarantee, exclude, strict=True):
        e_row = e_row & ~g_row
        picks = g_row.nonzero().flatten().tolist()[:m]
        cand = [i for i in range(len(row)) if not g_row[i] and not e_row[i]]
        if not picks and cand:
            centre = row[cand].mean(0)
            dists = [float(((row[i] - centre) ** 2).sum()) for i in cand]
            picks.append(cand[dists.index(max(dists))])
        while len(picks) < m:
            left = [i for i in cand if i not in picks]
            if not left:
                picks.append(picks[-1])
                continue
            dists = [min(float(((row[i] - row[j]) ** 2).sum()) for j in picks) for i in left]
            picks.append(left[dists.index(max(dists))])
        out.append(picks)
    return torch.tensor(out)


def test_fps_picks_what_the_definition_picks_with_shared_and_per_row_masks():
    """Integer features keep every distance exact in float32, so ties are real and must break alike."""
    gen = torch.Generator().manual_seed(0)
    for case in range(60):
        b, n, d = 3, int(torch.randint(4, 40, (1,), generator=gen)), int(torch.randint(1, 5, (1,), generator=gen))
        m = int(torch.randint(1, n + 6, (1,), generator=gen))
        x = torch.randint(-3, 4, (b, n, d), generator=gen).float()
        guarantee = torch.rand(n, generator=gen) < (0.1 if case % 3 else 0.0)
        exclude = torch.rand(n, generator=gen) < (0.3 if case % 2 else 0.0)
        if not guarantee.any():  # the centroid is fractional: plant a far outlier so that first pick is unambiguous
            x[:, int((~exclude).nonzero()[0]) if (~exclude).any() else 0] = 50.0
        rows_g, rows_e = guarantee.expand(b, n).clone(), exclude.expand(b, n).clone()
        rows_e[1] |= torch.rand(n, generator=gen) < 0.3  # one row with its own exclusions
        want_shared = _reference_fps(x, m, rows_g, exclude.expand(b, n))
        assert torch.equal(lm.farthest_point_sampling(x, m, guarantee=guarantee, exclude=exclude), want_shared), case
        want_rows = _reference_fps(x, m, rows_g, rows_e)
        assert torch.equal(lm.farthest_point_sampling(x, m, guarantee=rows_g, exclude=rows_e), want_rows), case


def test_small_op_stretches_restore_the_thread_count():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        q, k, v = _qkv(n=50, dtype=torch.float32)
        idx = lm.farthest_point_sampling(q.mean(1), 8, guarantee=torch.arange(50) < 1)
        fna_attention(q, k, v, idx, pinv="ridge")
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError):
            fna_attention(q, k, v, idx, pinv="nonsense")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ridge_stays_finite_in_half_precision_with_sinks(dtype):
    _, q, k, v = _planted(factor=30.0, dtype=dtype)
    idx = lm.farthest_point_sampling(q.mean(1).float(), 64)
    out = fna_attention(q, k, v, idx, pinv="ridge")
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out.float(), exact_attention(q.float(), k.float(), v.float())) < 1.0
    assert torch.isfinite(segment_mean_attention(q, k, v, 32, pinv="ridge")).all()


def test_fps_deterministic_guarantee_exclude_and_padding():
    feats = torch.randn(3, 30, 8)
    guarantee = torch.zeros(30, dtype=torch.bool)
    guarantee[[2, 5]] = True
    exclude = torch.zeros(30, dtype=torch.bool)
    exclude[10:] = True
    idx = lm.farthest_point_sampling(feats, 12, guarantee=guarantee, exclude=exclude)
    assert torch.equal(idx, lm.farthest_point_sampling(feats, 12, guarantee=guarantee, exclude=exclude))
    assert idx[:, :2].tolist() == [[2, 5]] * 3
    assert (idx < 10).all()  # excluded tokens never chosen
    # 10 allowed tokens for 12 slots: all of them chosen, then padded with repeats
    assert all(len(set(row.tolist())) == 10 for row in idx)
    # vectorised over the batch = the same as one row at a time
    for b in range(3):
        row = lm.farthest_point_sampling(feats[b:b + 1], 12, guarantee=guarantee, exclude=exclude)
        assert torch.equal(row[0], idx[b])


def test_fps_picks_outliers_first_and_spreads():
    feats = torch.randn(1, 100, 4)
    feats[0, 37] = 50.0
    idx = lm.farthest_point_sampling(feats, 5)
    assert idx[0, 0].item() == 37


def test_random_selection_is_seeded():
    a = lm.random_selection(2, 50, 8, seed=3, device="cpu")
    assert torch.equal(a, lm.random_selection(2, 50, 8, seed=3, device="cpu"))
    assert not torch.equal(a, lm.random_selection(2, 50, 8, seed=4, device="cpu"))
    assert all(len(set(r.tolist())) == 8 for r in a)


def test_segment_means_and_nystrom_full_rank_is_exact():
    x = torch.arange(10, dtype=torch.float64).reshape(1, 1, 10, 1)
    assert segment_means(x, 5).flatten().tolist() == [0.5, 2.5, 4.5, 6.5, 8.5]
    q, k, v = _qkv(n=30)
    # one token per segment: segment means are the tokens themselves
    assert rel_err(segment_mean_attention(q, k, v, 30, pinv="exact"), exact_attention(q, k, v)) < 1e-6


def test_sdpa_and_math_exact_agree():
    q, k, v = _qkv(dtype=torch.float32)
    assert rel_err(sdpa_attention(q, k, v), exact_attention(q, k, v)) < 1e-6


# ------------------------------------------------------------------------------ masking


def _state(residual, num_layers=4, layer=0, prefix=1):
    state = ForwardState(tower="image", num_layers=num_layers, num_prefix=prefix)
    state.begin_layer(layer, residual)
    return state


def test_detection_classifies_massive_and_artifact():
    residual = torch.nn.functional.normalize(torch.randn(2, 20, 16), dim=-1)
    residual[:, 3] *= 5  # artifact: ≈5× median norm
    residual[:, 7] *= 60  # massive
    residual[:, 0] *= 100  # CLS (prefix) is never flagged
    massive, artifact = detect_tokens(residual, num_prefix=1, artifact_ratio=3, massive_ratio=20)
    assert massive.nonzero()[:, 1].tolist() == [7, 7]
    assert artifact.nonzero()[:, 1].tolist() == [3, 3]


def test_key_mask_matches_explicit_reference():
    b, h, n, d = 2, 2, 12, 8
    q, k, v = _qkv(b, h, n, d, dtype=torch.float32)
    residual = torch.randn(b, n, 16)
    residual[:, 5] *= 6
    variant = parse_variant("exact+mask:tokens=artifact")
    out = variant.attend(q, k, v, _state(residual))
    logits = (q @ k.transpose(-1, -2)) * d**-0.5
    blocked = torch.zeros(n, n, dtype=torch.bool)
    blocked[:, 5] = True
    blocked[5, 5] = False  # a masked token still attends to itself
    ref = torch.softmax(logits.masked_fill(blocked, float("-inf")), -1) @ v
    assert rel_err(out, ref) < 1e-6


def test_value_mask_zeroes_values():
    q, k, v = _qkv(2, 2, 12, 8, dtype=torch.float32)
    residual = torch.nn.functional.normalize(torch.randn(2, 12, 16), dim=-1)
    residual[:, 4] *= 6
    out = parse_variant("mask:action=values").attend(q, k, v, _state(residual))
    v0 = v.clone()
    v0[:, :, 4] = 0
    assert rel_err(out, exact_attention(q, k, v0)) < 1e-6


def test_fna_with_key_mask_equals_masked_exact_when_all_tokens_are_landmarks():
    q, k, v = _qkv(2, 2, 16, 8)
    masked = torch.zeros(2, 16, dtype=torch.bool)
    masked[:, [3, 9]] = True
    from fnabench.variants.mask import key_keep_mask

    ref = exact_attention(q, k, v, attn_mask=key_keep_mask(masked))
    idx = torch.arange(16).expand(2, 16)
    out = fna_attention(q, k, v, idx, pinv="exact", key_masked=masked)
    assert rel_err(out, ref) < 1e-6


def test_mask_layers_and_no_detection_is_noop():
    q, k, v = _qkv(1, 2, 10, 8, dtype=torch.float32)
    residual = torch.nn.functional.normalize(torch.randn(1, 10, 16), dim=-1)
    residual[:, 2] *= 8
    variant = parse_variant("mask:layers=2:")
    ref = exact_attention(q, k, v)
    assert rel_err(variant.attend(q, k, v, _state(residual, layer=1)), ref) < 1e-6  # layer 1 untouched
    assert rel_err(variant.attend(q, k, v, _state(residual, layer=2)), ref) > 1e-3
    plain = torch.randn(1, 10, 16)
    plain = plain / plain.norm(dim=-1, keepdim=True)  # equal norms: nothing detected
    assert rel_err(variant.attend(q, k, v, _state(plain, layer=3)), ref) < 1e-6


def test_fna_plus_mask_excludes_masked_tokens_from_landmarks():
    q, k, v = _qkv(1, 2, 30, 8, dtype=torch.float32)
    residual = torch.nn.functional.normalize(torch.randn(1, 30, 16), dim=-1)
    residual[:, 11] *= 8
    state = _state(residual)
    out = parse_variant("fna:m=8+mask").attend(q, k, v, state)
    assert torch.isfinite(out).all()
    assert 11 not in state.landmarks[0].tolist()
    assert state.history[0][1][0, 11]  # recorded as an artifact token


@pytest.mark.parametrize("causal", [False, True])
def test_fallback_auto_runs_exact_exactly_where_counted_flops_say_the_approximation_costs_more(causal):
    from fnabench.measure import count_flops

    seen = set()
    for n in (48, 96, 192, 384):
        for spec in ("fna:m=32", "fna:m=32,pinv=ridge", "nystrom:m=32", "fna:m=16,landmarks=random"):
            q, k, v = _qkv(b=1, h=2, n=n, d=16, dtype=torch.float32)
            plain, auto = parse_variant(spec), parse_variant(spec + ",fallback=auto")
            state = ForwardState("image", 1)

            def cost(variant, state=state, q=q, k=k, v=v):
                return count_flops(lambda: variant.attend(q, k, v, state, causal=causal)).attention

            pays = cost(plain) < cost(parse_variant("exact"))
            out = auto.attend(q, k, v, state, causal=causal)
            assert state.approximated == {0: pays}, (n, spec)
            ref = plain.attend(q, k, v, state, causal=causal) if pays else \
                parse_variant("exact").attend(q, k, v, state, causal=causal)
            assert torch.equal(out, ref), (n, spec)
            assert cost(auto) == min(cost(plain), cost(parse_variant("exact")))  # the decision is free
            seen.add(pays)
    assert seen == {True, False}  # the grid crosses over
    assert parse_variant("fna:m=32").canonical == parse_variant("fna:m=32,fallback=none").canonical

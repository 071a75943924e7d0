"""Recall data: systems, token layout, training-trace statistics, recall queries and probes, baselines."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from fnabench.tasks.recall.baselines import least_squares_errors, least_squares_predictions, zero_errors
from fnabench.tasks.recall.queries import build_example, layout_positions
from fnabench.tasks.recall.run_config import ConfigError, DataConfig, EvalConfig
from fnabench.tasks.recall.systems import haar_orthogonal, make_corpus, make_systems
from fnabench.tasks.recall.tokens import LABEL_VALUE, TokenLayout
from fnabench.tasks.recall.traces import (
    sample_batch,
    sample_cut_count,
    sample_cuts,
    sample_num_systems,
    sample_trace,
    zipf_pmf,
)

DATA = DataConfig(state_dim=3, num_labels=8, context=64, train_systems=300, val_systems=12)


@pytest.fixture(scope="module")
def corpus():
    return make_corpus(DATA)


# ------------------------------------------------------------------------------------------- systems


def test_haar_orthogonal_is_orthogonal_and_unbiased():
    q = haar_orthogonal(4, 20000, np.random.default_rng(0))
    np.testing.assert_allclose(q @ np.swapaxes(q, 1, 2), np.broadcast_to(np.eye(4), q.shape), atol=1e-12)
    # Haar measure: every entry has mean 0 and variance 1/n; both determinants are equally likely
    assert abs(q[:, 0, 0].mean()) < 0.02 and abs(q[:, 2, 1].mean()) < 0.02
    assert abs((q**2).mean() - 0.25) < 0.01
    assert abs((np.linalg.det(q) > 0).mean() - 0.5) < 0.02
    # without the sign correction, QR's convention biases the diagonal
    raw = haar_orthogonal(4, 20000, np.random.default_rng(0), sign_fix=False)
    assert abs(raw[:, 0, 0].mean()) > 0.3


def test_trajectories_follow_the_dynamics_and_keep_the_norm(corpus):
    traces, a = corpus.train_traces.astype(np.float64), corpus.train.A
    assert traces.shape == (DATA.train_systems, DATA.context, DATA.state_dim)
    np.testing.assert_allclose(traces[:, 1:], np.einsum("sij,stj->sti", a, traces[:, :-1]), atol=1e-5)
    norms = (traces**2).sum(-1)
    np.testing.assert_allclose(norms, norms[:, :1].repeat(DATA.context, 1), rtol=1e-4)
    assert abs(norms[:, 0].mean() - 1.0) < 0.1  # x0 ~ N(0, I/n)


def test_families_and_disjoint_validation_set(corpus):
    rng = np.random.default_rng(0)
    ident = make_systems("ident", 3, 5, rng)
    assert np.array_equal(ident.A, np.broadcast_to(np.eye(3), (5, 3, 3)))
    gauss = make_systems("gauss", 3, 5, rng, noise_std=0.1)
    assert gauss.C.shape == (5, 3, 6)
    assert np.abs(np.linalg.eigvals(gauss.A)).max() == pytest.approx(0.95)
    y = gauss.simulate(np.arange(5), gauss.initial_states((5,), rng), 10, rng)
    assert y.shape == (5, 10, 3)
    with pytest.raises(ConfigError, match="valid"):
        make_systems("nope", 3, 5, rng)
    train, val = corpus.train.A.reshape(len(corpus.train), -1), corpus.val.A.reshape(len(corpus.val), -1)
    assert np.abs(train[:, None] - val[None]).max(-1).min() > 1e-3


# ------------------------------------------------------------------------------------------- tokens


def test_token_layout_is_the_papers_57_dim_encoding():
    layout = TokenLayout(5, 25)
    assert layout.dim == 57 and layout.start_dim == 50 and layout.flag_dim == 51
    assert layout.state_slice == slice(52, 57)
    tokens = layout.empty(4)
    layout.put_start(tokens, 0)
    layout.put_open(tokens, 1, 7)
    layout.put_states(tokens, 2, np.array([[1, 2, 3, 4, 5]], dtype=np.float32))
    layout.put_close(tokens, 3, 7)
    expected = np.zeros((4, 57), dtype=np.float32)
    expected[0, 50] = expected[1, 14] = expected[3, 15] = LABEL_VALUE
    expected[2, 51] = 1.0
    expected[2, 52:] = [1, 2, 3, 4, 5]
    np.testing.assert_array_equal(tokens, expected)


# ------------------------------------------------------------------------------------- training traces


def test_zipf_draws_match_the_power_law():
    pmf = zipf_pmf(25, 1.5)
    k = np.arange(1, 26)
    np.testing.assert_allclose(pmf, k**-1.5 / (k**-1.5).sum())
    scipy_stats = pytest.importorskip("scipy.stats")
    np.testing.assert_allclose(pmf, scipy_stats.zipfian.pmf(k, 1.5, 25), rtol=1e-10)
    rng = np.random.default_rng(0)
    draws = np.array([sample_num_systems(rng, 25, 1.5) for _ in range(20000)])
    assert draws.min() >= 1 and draws.max() <= 25
    freq = np.bincount(draws, minlength=26)[1:] / len(draws)
    assert np.abs(freq - pmf).max() < 0.01


def test_cut_counts_are_poisson_and_positions_uniform():
    rng = np.random.default_rng(1)
    for n_sys in (1, 4):
        counts = np.array([sample_cut_count(rng, n_sys, DATA) for _ in range(20000)])
        lam = 2.0 * n_sys
        pmf = np.array([math.exp(-lam) * lam**k / math.factorial(k) for k in range(25)])
        freq = np.bincount(counts, minlength=25)[:25] / len(counts)
        assert np.abs(freq - pmf).max() < 0.01
        assert abs(counts.mean() - lam) < 0.1 and abs(counts.var() - lam) < 0.3
    assert sample_cut_count(np.random.default_rng(0), 1000, DATA) == DATA.max_cuts == 31  # capped
    cuts = [sample_cuts(rng, 4, DATA) for _ in range(20000)]
    for c in cuts[:500]:
        assert c[0] == 0 and c[-1] == DATA.context - 1 and np.all(np.diff(c) >= 0)
    positions = np.concatenate([c[1:-1] for c in cuts])
    positions = positions[positions > 0]  # the start cut is always there
    hist = np.bincount(positions, minlength=DATA.context - 1)[1:] / len(positions)
    assert np.abs(hist - 1 / (DATA.context - 2)).max() < 0.004


def test_segments_continue_their_trajectories(corpus):
    rng = np.random.default_rng(2)
    layout = TokenLayout(DATA.state_dim, DATA.num_labels)
    resumptions = 0
    for _ in range(300):
        trace = sample_trace(corpus, DATA, layout, rng)
        tokens = trace.tokens
        assert tokens.shape == (DATA.context, layout.dim) and tokens[0, layout.start_dim] == LABEL_VALUE
        pointer = dict.fromkeys(trace.systems, 0)
        pos = 1
        for seg in trace.segments:
            assert seg.start == pos and seg.system in trace.systems and seg.label == trace.labels[seg.system]
            assert seg.first_state == pointer[seg.system]  # continues where this system stopped
            resumptions += seg.first_state > 0 and seg.n_obs > 0
            if seg.opened:
                assert tokens[pos, layout.open_dim(seg.label)] == LABEL_VALUE
                states = layout.states(tokens[pos + 1:pos + 1 + seg.n_obs])
                np.testing.assert_array_equal(states, corpus.train_traces[seg.system, seg.first_state:][:seg.n_obs])
                assert layout.is_payload(tokens[pos + 1:pos + 1 + seg.n_obs]).all()
                pos += 1 + seg.n_obs
            if seg.closed:
                assert tokens[pos, layout.close_dim(seg.label)] == LABEL_VALUE
                pos += 1
            pointer[seg.system] += seg.n_obs
        assert pos == DATA.context  # the segments tile the context exactly
        assert sum(s.n_obs for s in trace.segments) == layout.is_payload(tokens).sum()
    assert resumptions > 300  # resumed segments are common


def test_labels_are_permuted_per_trace(corpus):
    rng = np.random.default_rng(3)
    layout = TokenLayout(DATA.state_dim, DATA.num_labels)
    firsts, pairs = [], set()
    for _ in range(4000):
        trace = sample_trace(corpus, DATA, layout, rng)
        labels = [trace.labels[s] for s in trace.systems]
        assert len(set(labels)) == len(labels)  # distinct within a trace
        firsts.append(labels[0])
        pairs.add((trace.systems[0], labels[0]))
    freq = np.bincount(firsts, minlength=DATA.num_labels) / len(firsts)
    assert np.abs(freq - 1 / DATA.num_labels).max() < 0.025  # any label for any system
    assert len(pairs) > 3 * DATA.train_systems // 2  # systems get different labels in different traces


def test_batch_targets_and_mask(corpus):
    layout = TokenLayout(DATA.state_dim, DATA.num_labels)
    batch = sample_batch(corpus, DATA, layout, 4, np.random.default_rng(4))
    assert batch["inputs"].shape == (4, DATA.context - 1, layout.dim)
    assert batch["targets"].shape == (4, DATA.context - 1, DATA.state_dim)
    # the mask keeps exactly the targets that are observations
    tokens = np.concatenate([batch["inputs"], np.zeros_like(batch["inputs"][:, :1])], axis=1)
    assert np.array_equal(batch["mask"][:, :-1], layout.is_payload(tokens[:, 1:-1]))


# ------------------------------------------------------------------------------------------- queries


QUERY = EvalConfig(haystack=3, segment_obs=5, examples=2, traces=6, ks=(1, 2, 3), batch=8)


def _val(corpus):
    return corpus.val


def test_query_layout(corpus):
    layout = TokenLayout(DATA.state_dim, DATA.num_labels)
    cfg10 = replace(QUERY, haystack=5, segment_obs=10)
    assert cfg10.seq_len == 12 * (5 + 1)
    assert layout_positions(cfg10)[1] == 1 + 12 * 5
    for needle in (0, 2):
        cfg = replace(QUERY, needle=needle)
        ex = build_example(corpus.val, cfg, layout, np.random.default_rng(5))
        s, h = cfg.segment_obs, cfg.haystack
        opens, final = layout_positions(cfg)
        assert ex.tokens.shape == (cfg.traces, cfg.seq_len, layout.dim) and ex.final_open == final
        assert ex.needle_open == opens[needle] == 1 + needle * (s + 2)
        for j, pos in enumerate(opens):
            assert (ex.tokens[:, pos, layout.open_dim(ex.labels[j])] == LABEL_VALUE).all()
            assert (ex.tokens[:, pos + s + 1, layout.close_dim(ex.labels[j])] == LABEL_VALUE).all()
        assert (ex.tokens[:, final, layout.open_dim(ex.labels[needle])] == LABEL_VALUE).all()
        assert len(set(ex.labels[:h].tolist())) == h
        # haystack segments show x_0..x_{s-1}; the query continues the needle with x_s, x_{s+1}, …
        a = corpus.val.A[ex.systems[needle]]
        hay = layout.states(ex.tokens[:, opens[needle] + 1:opens[needle] + 1 + s]).astype(np.float64)
        query = layout.states(ex.tokens[:, final + 1:]).astype(np.float64)
        np.testing.assert_allclose(query[:, 0], hay[:, -1] @ a.T, atol=1e-5)
        np.testing.assert_allclose(query[:, 1:], query[:, :-1] @ a.T, atol=1e-5)
        assert (np.diff(ex.tokens[:, :, layout.state_slice], axis=0) != 0).any()  # traces differ in x0


def test_probes(corpus):
    layout = TokenLayout(DATA.state_dim, DATA.num_labels)
    s, h = QUERY.segment_obs, QUERY.haystack
    plain = build_example(corpus.val, QUERY, layout, np.random.default_rng(6))
    ex = {p: build_example(corpus.val, QUERY, layout, np.random.default_rng(6), p)
          for p in ("misdirected", "sync", "unseen_label", "unseen_system")}
    final = plain.final_open
    payload = slice(final + 1, None)
    # misdirected: the next haystack system's label, the needle's payload
    assert ex["misdirected"].query_label == plain.labels[1]
    np.testing.assert_array_equal(ex["misdirected"].tokens[:, payload], plain.tokens[:, payload])
    np.testing.assert_array_equal(ex["misdirected"].tokens[:, :final], plain.tokens[:, :final])
    # unseen label: a label absent from the context, the needle's payload
    assert ex["unseen_label"].query_label not in plain.labels[:h]
    np.testing.assert_array_equal(ex["unseen_label"].tokens[:, payload], plain.tokens[:, payload])
    # unseen system: absent label, a fresh system from its start
    fresh = ex["unseen_system"]
    assert fresh.systems[-1] not in fresh.systems[:h] and fresh.history_offset == 0
    first = layout.states(fresh.tokens[:, final + 1]).astype(np.float64)
    np.testing.assert_allclose(layout.states(fresh.tokens[:, final + 2]), first @ corpus.val.A[fresh.systems[-1]].T,
                               atol=1e-5)
    # sync: every haystack system's next state (index s) is the same vector, where the query resumes
    sync = ex["sync"]
    nexts = [layout.states(sync.tokens[:, 1 + j * (s + 2) + s]).astype(np.float64) @ corpus.val.A[sync.systems[j]].T
             for j in range(h)]
    for j in range(1, h):
        np.testing.assert_allclose(nexts[j], nexts[0], atol=1e-5)
    np.testing.assert_allclose(layout.states(sync.tokens[:, final + 1]), nexts[0], atol=1e-5)
    with pytest.raises(ConfigError, match="probe"):
        build_example(corpus.val, QUERY, layout, np.random.default_rng(6), "bogus")


# ------------------------------------------------------------------------------------------- baselines


def test_least_squares_is_exact_once_n_plus_one_states_are_seen():
    rng = np.random.default_rng(7)
    for n in (3, 5):
        systems = make_systems("ortho_haar", n, 50, rng)
        states = systems.simulate(np.arange(50), systems.initial_states((50,), rng), 3 * n)
        err = least_squares_errors(states)
        assert err[:, n + 1:].max() <= 1e-8
        assert err[:, 1:n].min() > 1e-6  # fewer transitions than n: not identifiable yet
        np.testing.assert_array_equal(least_squares_predictions(states)[:, :2], 0.0)


def test_zero_predictor_median_is_087_for_n5():
    rng = np.random.default_rng(8)
    systems = make_systems("ortho_haar", 5, 1000, rng)
    states = systems.simulate(np.arange(1000)[None], systems.initial_states((100, 1000), rng), 3)
    median = np.median(zero_errors(states))
    assert median == pytest.approx(0.8703, abs=0.01)  # median of chi²_5 / 5

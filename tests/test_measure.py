"""Counted FLOPs against closed forms; latency and memory measurement behave."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fnabench
from fnabench import measure

timm = pytest.importorskip("timm")

WIDTH, DEPTH, HEADS, PATCH = 768, 12, 12, 16
HEAD_DIM = WIDTH // HEADS


def _vit_b16(size: int):
    return timm.create_model("vit_base_patch16_224", pretrained=False, img_size=size, device="meta").eval()


def _tokens(size: int) -> int:
    return (size // PATCH) ** 2 + 1


def _exact_layer_macs(n: int) -> int:
    linear = 12 * n * WIDTH * WIDTH  # qkv 3, proj 1, MLP 8
    return linear + 2 * n * n * WIDTH  # QKᵀ and AV over all heads


def _fna_attention_macs(n: int, m: int, iters: int = 6, pinv: str = "newton") -> int:
    """Per layer, all heads: A (m²d), B (2mNd), Newton (4·iters·m³) then ZB (m²d), or the ridge LU solve
    (m³/3 + m²d), out (2Nmd)."""
    inverse = 4 * iters * m**3 + m * m * HEAD_DIM if pinv == "newton" else m**3 / 3 + m * m * HEAD_DIM
    return HEADS * (m * m * HEAD_DIM + 2 * m * n * HEAD_DIM + inverse + 2 * n * m * HEAD_DIM)


def _fps_macs(n: int, m: int) -> int:
    return n * HEAD_DIM * (m + 1)  # centroid distance, then one distance row per pick


def _vit_macs(size: int, fna_layers: int = 0, m: int = 64, pinv: str = "newton") -> int:
    n = _tokens(size)
    patches = n - 1
    total = patches * WIDTH * 3 * PATCH * PATCH + WIDTH * 1000  # patch embedding, head
    total += DEPTH * _exact_layer_macs(n)
    if fna_layers:
        total -= fna_layers * 2 * n * n * WIDTH
        total += fna_layers * _fna_attention_macs(n, m, pinv=pinv) + _fps_macs(n, m)
    return total


@pytest.mark.parametrize("size", [224, 896])
def test_vit_b16_exact_flops_match_closed_form(size):
    model = _vit_b16(size)
    x = torch.randn(1, 3, size, size, device="meta")
    counted = fnabench.count_flops(model, x)
    expected = 2 * _vit_macs(size)
    assert abs(counted.total - expected) / expected < 0.01
    n = _tokens(size)
    assert counted.attention == 2 * DEPTH * 2 * n * n * WIDTH  # CPU SDPA is counted (upstream counts 0)
    if size == 224:
        assert counted.total / 1e9 == pytest.approx(35.2, rel=0.01)
    with fnabench.patch(model, "exact"):
        patched = fnabench.count_flops(model, x)
    assert patched.total == counted.total and patched.attention == counted.attention


@pytest.mark.parametrize("pinv", ["newton", "ridge"])
@pytest.mark.parametrize("size", [224, 896])
def test_vit_b16_fna_flops_match_closed_form(size, pinv):
    model = _vit_b16(size)
    x = torch.randn(1, 3, size, size, device="meta")
    with fnabench.patch(model, f"fna:m=64,layers=-6:,pinv={pinv}"):
        counted = fnabench.count_flops(model, x)
    expected = 2 * _vit_macs(size, fna_layers=6, m=64, pinv=pinv)
    assert abs(counted.total - expected) / expected < 0.01
    # the counted attention part includes landmark selection and the pseudo-inverse
    n = _tokens(size)
    attention = 2 * (6 * 2 * n * n * WIDTH + 6 * _fna_attention_macs(n, 64, pinv=pinv) + _fps_macs(n, 64))
    assert abs(counted.attention - attention) / attention < 0.01


def test_cpu_flash_sdpa_kernel_is_counted_on_real_tensors():
    model = timm.create_model("vit_base_patch16_224", pretrained=False, depth=2).eval()
    counted = fnabench.count_flops(model, torch.randn(1, 3, 224, 224))
    n = _tokens(224)
    assert counted.by_op["_scaled_dot_product_flash_attention_for_cpu"] == 2 * 2 * 2 * n * n * WIDTH
    assert counted.attention == counted.by_op["_scaled_dot_product_flash_attention_for_cpu"]


def test_exact_pinv_is_counted():
    x = torch.randn(1, 3, 224, 224)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, depth=2).eval()
    with fnabench.patch(model, "fna:m=16,pinv=exact"):
        counted = fnabench.count_flops(model, x)
    # 12 heads × 2 layers of a 16×16 pinv: SVD (4+8+9)·16³ plus the 2·16³ product
    assert counted.by_op["linalg_pinv"] == 12 * 2 * 23 * 16**3


def test_linear_solves_are_counted():
    """LU solves (2/3·m³ + 2·m²·k) and triangular solves (m²·k), which the upstream counter leaves at 0."""
    a, rhs = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 5)
    assert fnabench.count_flops(torch.linalg.solve, a, rhs).total == 6 * (2 * 8**3 // 3 + 2 * 8 * 8 * 5)
    assert fnabench.count_flops(torch.linalg.solve, a, rhs[..., 0]).total == 6 * (2 * 8**3 // 3 + 2 * 8 * 8)
    triangular = fnabench.count_flops(lambda x, y: torch.linalg.solve_triangular(x, y, upper=False), a.tril(), rhs)
    assert triangular.total == 6 * 8 * 8 * 5
    assert fnabench.count_flops(torch.linalg.solve, a[0, 0], rhs).total == 6 * (2 * 8**3 // 3 + 2 * 8 * 8 * 5)


def test_cpu_sdpa_and_mha_fast_path_counted():
    q = torch.randn(2, 4, 16, 32)
    sdpa = fnabench.count_flops(lambda: F.scaled_dot_product_attention(q, q, q))
    assert sdpa.total == 2 * 2 * (2 * 4 * 16 * 16 * 32)
    assert sdpa.attention == sdpa.total

    mha = nn.MultiheadAttention(64, 4, batch_first=True).eval()
    x = torch.randn(2, 10, 64)
    counted = fnabench.count_flops(lambda: mha(x, x, x, need_weights=False))
    projections = 2 * (2 * 10 * 64 * 64 * 4)
    attention = 2 * (2 * 2 * 10 * 10 * 64)
    assert counted.total == projections + attention
    assert torch.backends.mha.get_fastpath_enabled()  # restored afterwards


def test_attention_range_name_is_shared():
    from fnabench.variants.variant import ATTENTION_RANGE

    assert ATTENTION_RANGE == measure.ATTENTION_RANGE


def test_measure_latency_and_throughput():
    calls = []
    lat = fnabench.measure_latency(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7
    assert 0 <= lat.min <= lat.q1 <= lat.median <= lat.q3 <= lat.max
    assert lat.throughput(4) == pytest.approx(4 / lat.median)


def test_measure_interleaved_alternates_rounds_and_times_each_entry():
    import contextlib
    import time

    from fnabench.measure import measure_interleaved

    log: list[str] = []

    def entry(name: str, seconds: float):
        @contextlib.contextmanager
        def cm():
            log.append(f"enter {name}")
            yield lambda: (log.append(name), time.sleep(seconds))
            log.append(f"leave {name}")

        return cm

    slow, fast = measure_interleaved([entry("a", 0.02), entry("b", 0.002)], warmup=1, repeats=3)
    calls = [x for x in log if " " not in x]
    # round 0: a (warm-up + timed), b (warm-up + timed); round 1 reversed; round 2 forward again
    assert calls == ["a", "a", "b", "b", "b", "a", "a", "b"]
    assert log.count("enter a") == log.count("leave a") == 3
    assert slow.repeats == fast.repeats == 3
    assert slow.min > 0.015 and fast.median < slow.median / 2
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        measure_interleaved([entry("a", 0)], repeats=0)


def test_peak_memory_sees_a_large_allocation():
    def alloc():
        t = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
        return t.sum()

    peak = fnabench.peak_memory(alloc)
    assert 40 * 2**20 < peak < 512 * 2**20

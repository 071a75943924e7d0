"""FNA side by side with the official formula and its FPS (torch-quickfps), same inputs, same process.

The "official" rows are written here from the paper's formula as the official repository runs it
(docs: ../shared/reference/fna.md §2): landmarks from ``torch_quickfps.sample(points, K, mask=…, h=8,
low_d=8, return_points=False)`` on the head-mean queries with CLS guaranteed and excluded from the FPS
pool, then A = softmax(s·Q_S K_Sᵀ), B = SDPA(Q_S, K, V), Ṽ = NS₆(A)·B, out = SDPA(Q, K_S, Ṽ) with the
six-step Newton–Schulz inverse. Ours is ``Variant.attend`` with a fresh forward state per call (FPS every
call, as in a model forward), the paper's inverse (``pinv=newton``) and our ridge solve as their own rows.
All rows of one (N, threads) are timed interleaved, so other load hits them alike.

    python benchmarks/official_fna.py                               # N = 257 … 16385, threads 1 and 2
    python benchmarks/official_fna.py --sizes 4097 --threads-list 1,2 --csv benchmarks/results/official_fna_cpu.csv

Needs ``pip install torch-quickfps`` (CPU wheels on PyPI); without it the official rows are skipped with the reason.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from attention import NUM_PREFIX, make_call, make_inputs
from benchutil import (
    add_common_args,
    device_name,
    fixed,
    fmt,
    header,
    int_list,
    rel_frobenius,
    report,
    setup,
    spin_up,
    time_all,
)

import fnabench
from fnabench.variants import parse_variant

DEFAULT_SIZES = [257, 1025, 4097, 16385]
COLUMNS = [("n", "N"), ("threads", "threads"), ("impl", "implementation"), ("median_ms", "median ms"),
           ("iqr_ms", "IQR ms"), ("repeats", "reps"), ("speedup", "× exact"), ("flop_bound", "FLOP bound"),
           ("vs_official", "× official"), ("select_ms", "select ms"), ("select_share", "select share"),
           ("rel_err", "rel. err"), ("jaccard", "landmarks ∩ official")]
CSV_KEYS = ["device", "device_name", "dtype", "batch", "heads", "head_dim", "m", "n", "threads", "impl", "spec",
            "median_ms", "iqr_ms", "min_ms", "repeats", "speedup", "flop_bound", "vs_official", "select_ms",
            "select_share", "rel_err", "jaccard", "load_before", "skipped"]


def newton_schulz(a: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """The Nyströmformer iterative pseudo-inverse as the paper's code runs it: Z₀ = Aᵀ / max column sum (per
    matrix), then Z ← ¼ Z (13I − AZ (15I − AZ (7I − AZ)))."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    z = a.mT / a.sum(dim=-2, keepdim=True).amax(dim=-1, keepdim=True)
    for _ in range(iters):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def official_landmarks(q: torch.Tensor, m: int, quickfps) -> torch.Tensor:
    """[B, m] indices: CLS guaranteed, the other m − 1 by quickfps on the head-mean queries of the other tokens."""
    b, _, n, _ = q.shape
    points = q.mean(dim=1).contiguous()
    pool = torch.ones(b, n, dtype=torch.bool, device=q.device)
    pool[:, :NUM_PREFIX] = False
    picked = quickfps.sample(points, m - NUM_PREFIX, mask=pool, h=8, low_d=8, return_points=False)
    prefix = torch.arange(NUM_PREFIX, device=q.device).expand(b, NUM_PREFIX)
    return torch.cat([prefix, picked.long()], dim=1)


def official_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The paper's formula with fixed landmarks ``idx`` [B, m] shared by every head."""
    gather = idx[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1])
    q_s, k_s = q.gather(2, gather), k.gather(2, gather)
    a = torch.softmax((q_s @ k_s.mT) * q.shape[-1] ** -0.5, dim=-1)
    v_s = newton_schulz(a) @ F.scaled_dot_product_attention(q_s, k, v)
    return F.scaled_dot_product_attention(q, k_s, v_s)


def official_call(q, k, v, m: int, quickfps) -> Callable[[], torch.Tensor]:
    """One official FNA call: landmark selection then the formula (as ``make_call`` does for ours)."""
    return lambda: official_core(q, k, v, official_landmarks(q, m, quickfps))


def our_landmarks(spec: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """The landmark indices our variant picks for this input ([B, m])."""
    from fnabench.variants import ForwardState

    variant = parse_variant(spec)
    state = ForwardState(tower="image", num_layers=1, num_prefix=NUM_PREFIX)
    state.begin_layer(0, None)
    with torch.no_grad():
        variant.attend(q, k, v, state)
    return state.landmarks  # the indices FNA selected at this layer, [B, m]


def jaccard(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    """|a ∩ b| / |a ∪ b| of two landmark sets, mean over the batch."""
    if a is None or b is None:
        return None
    scores = []
    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        x, y = set(x), set(y)
        scores.append(len(x & y) / len(x | y))
    return sum(scores) / len(scores)


def run_cell(args, n: int, threads: int, quickfps) -> list[dict]:
    """Every implementation at one (N, threads): FLOPs, interleaved timing, error and landmark agreement."""
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    q, k, v = make_inputs(args.batch, args.heads, n, args.head_dim, device=device, dtype=torch.float32,
                          seed=args.seed)
    meta = make_inputs(args.batch, args.heads, n, args.head_dim, device="meta", dtype=torch.float32, seed=args.seed)
    load = os.getloadavg()[0]
    base = {"device": "cpu", "device_name": device_name(device), "dtype": "float32", "batch": args.batch,
            "heads": args.heads, "head_dim": args.head_dim, "m": args.m, "n": n, "threads": threads,
            "load_before": load}
    exact_flops = fnabench.count_flops(make_call(parse_variant("exact"), *meta)).total
    specs = {"exact (SDPA)": "exact", "ours, pinv=newton (paper)": f"fna:m={args.m},pinv=newton",
             "ours, pinv=ridge": f"fna:m={args.m},pinv=ridge"}
    rows, calls, selects = [], [], []
    for impl, spec in specs.items():
        variant = parse_variant(spec)
        flops = fnabench.count_flops(make_call(variant, *meta)).total
        rows.append(dict(base, impl=impl, spec=variant.canonical, flop_bound=exact_flops / flops))
        calls.append(make_call(variant, q, k, v))
    official_idx = None
    if quickfps is None:
        rows.append(dict(base, impl="official (quickfps + NS6)", skipped="torch-quickfps is not installed"))
    else:
        rows.append(dict(base, impl="official (quickfps + NS6)", spec="paper formula, torch_quickfps.sample",
                         flop_bound=rows[1]["flop_bound"]))  # the same formula as ours with pinv=newton
        calls.append(official_call(q, k, v, args.m, quickfps))
        with torch.no_grad():
            official_idx = official_landmarks(q, args.m, quickfps)
    lats = time_all([fixed(c) for c in calls], device=device, repeats=args.repeats, warmup=args.warmup,
                    budget_s=args.budget, interleave=True)
    with torch.no_grad():
        ref = calls[0]()
        outs = [c() for c in calls]
    for row, lat, out in zip(rows, lats, outs, strict=False):
        row.update(median_ms=lat.median * 1e3, iqr_ms=lat.iqr * 1e3, min_ms=lat.min * 1e3, repeats=lat.repeats,
                   speedup=lats[0].median / lat.median, rel_err=rel_frobenius(out, ref))
    # landmark selection alone, timed interleaved: ours (head-mean q + FPS op) and quickfps
    from fnabench.variants.landmarks import farthest_point_sampling

    core = parse_variant(specs["ours, pinv=newton (paper)"]).core
    guarantee = core["guarantee"].mask(n, NUM_PREFIX)
    exclude = core["exclude"].mask(n, NUM_PREFIX)
    selects.append(lambda: farthest_point_sampling(q.mean(dim=1), args.m, guarantee=guarantee, exclude=exclude))
    if quickfps is not None:
        selects.append(lambda: official_landmarks(q, args.m, quickfps))
    sel = time_all([fixed(c) for c in selects], device=device, repeats=args.repeats, warmup=args.warmup,
                   budget_s=args.budget / 4, interleave=True)
    ours_idx = our_landmarks(specs["ours, pinv=newton (paper)"], q, k, v)
    for row in rows[1:3]:
        row["select_ms"] = sel[0].median * 1e3
        row["jaccard"] = jaccard(ours_idx, official_idx)
    if quickfps is not None:
        rows[3]["select_ms"] = sel[1].median * 1e3
        rows[3]["jaccard"] = 1.0
        official = rows[3]["median_ms"]
        for row in rows:
            row["vs_official"] = official / row["median_ms"]
    for row in rows[1:]:
        if row.get("select_ms") and row.get("median_ms"):
            row["select_share"] = row["select_ms"] / row["median_ms"]
        print(f"  N={n:>6} t={threads} {row['impl']:<28} {fmt(row.get('median_ms'))} ms  × exact "
              f"{fmt(row.get('speedup'))}  × official {fmt(row.get('vs_official'))}", file=sys.stderr, flush=True)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", type=int_list, default=DEFAULT_SIZES, help="sequence lengths N (CLS included)")
    p.add_argument("--threads-list", type=int_list, default=[1, 2], help="torch intra-op threads, one cell each")
    p.add_argument("--m", type=int, default=64, help="landmarks")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--budget", type=float, default=20.0, help="seconds of timed calls per row, min 3 repeats")
    add_common_args(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.device = "cpu"
    setup(args)
    try:
        import torch_quickfps as quickfps
    except ImportError:
        quickfps = None
        print("# torch-quickfps is not installed (pip install torch-quickfps): official rows skipped", file=sys.stderr)
    print(header(torch.device("cpu"), torch.float32,
                 [f"B={args.batch}, H={args.heads}, d={args.head_dim}, m={args.m}; random N(0,1) q, k, v; CLS "
                  "guaranteed; every FNA row selects its landmarks on every call",
                  "timing schedule: interleaved (all implementations of one N and thread count together)"]),
          flush=True)
    spin_up(torch.device("cpu"))
    rows = [row for n in args.sizes for t in args.threads_list for row in run_cell(args, n, t, quickfps)]
    report(rows, COLUMNS, args.csv, CSV_KEYS)
    return 0


if __name__ == "__main__":
    sys.exit(main())

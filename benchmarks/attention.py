"""Attention-kernel benchmark: exact SDPA vs FNA (landmark selection included) vs Nyströmformer.

One multi-head attention call on random q, k, v [B, H, N, d] per row. Every method runs through
the same path a patched model uses (``Variant.attend`` with a fresh ``ForwardState`` per call), so
FNA rows include FPS landmark selection on the head-mean queries, CLS guaranteed.

    python benchmarks/attention.py                        # CPU (or CUDA when available), N = 256 … 16384
    python benchmarks/attention.py --quick                # smoke test: N = 256, 1024, 2 repeats
    python benchmarks/attention.py --device cuda --dtype float16 --csv out/attn_fp16.csv

Columns are explained in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from collections.abc import Callable

import torch
from benchutil import (
    DTYPES,
    add_common_args,
    device_name,
    fixed,
    fmt,
    header,
    int_list,
    rel_frobenius,
    report,
    run_sizes,
    setup,
    time_all,
    timed,
)

import fnabench
from fnabench.variants import ForwardState, Variant, parse_variant
from fnabench.variants.fna import fna_attention
from fnabench.variants.landmarks import farthest_point_sampling

DEFAULT_SIZES = [256, 512, 1024, 2048, 4096, 8192, 16384]
DEFAULT_METHODS = "exact,fna:m=32,fna:m=64,fna:m=128,nystrom:m=64"
NUM_PREFIX = 1  # one CLS token, guaranteed as a landmark (the variant's default guarantee=prefix)

COLUMNS = [
    ("n", "N"),
    ("method", "method"),
    ("median_ms", "median ms"),
    ("iqr_ms", "IQR ms"),
    ("min_ms", "min ms"),
    ("repeats", "reps"),
    ("speedup", "speed-up"),
    ("gflops", "GFLOPs"),
    ("flop_bound", "FLOP bound"),
    ("of_bound", "of bound"),
    ("rel_err", "rel. err"),
    ("peak_mb", "peak MB"),
    ("select_ms", "select ms"),
    ("core_ms", "core ms"),
]
CSV_KEYS = [
    "device", "device_name", "dtype", "threads", "batch", "heads", "head_dim", "n", "method", "spec", "m",
    "median_ms", "iqr_ms", "q1_ms", "q3_ms", "min_ms", "max_ms", "repeats", "speedup", "speedup_min", "gflops",
    "flop_bound", "of_bound", "of_bound_min", "rel_err", "peak_mb", "select_ms", "core_ms", "compiled", "skipped",
]


def make_inputs(batch: int, heads: int, n: int, d: int, *, device: torch.device | str, dtype: torch.dtype,
                seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded standard-normal q, k, v [B, H, N, d] (drawn in float32 on CPU, then moved and cast)."""
    device = torch.device(device)
    if device.type == "meta":
        return tuple(torch.empty(batch, heads, n, d, device="meta", dtype=dtype) for _ in range(3))  # type: ignore[return-value]
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, n, d, generator=gen).to(device=device, dtype=dtype)
                 for _ in range(3))  # type: ignore[return-value]


def make_call(variant: Variant, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One attention call as a model forward makes it: a new forward state each time, so FNA
    reselects its landmarks on every call (FPS is part of the timed work)."""
    state = ForwardState(tower="image", num_layers=1, num_prefix=NUM_PREFIX)

    def call() -> torch.Tensor:
        state.begin_layer(0, None)
        return variant.attend(q, k, v, state)

    return call


def compiled_call(variant: Variant, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], torch.Tensor]:
    """:func:`make_call` through ``torch.compile``, compiled by one call here so timing never sees it."""
    compiled = torch.compile(make_call(variant, q, k, v), dynamic=False)
    with torch.no_grad():
        compiled()
    return compiled


def split_specs(text: str) -> list[str]:
    """Split a comma-separated list of variant specs whose own keys are comma-separated too:
    'exact,fna:m=64,pinv=exact' → ['exact', 'fna:m=64,pinv=exact'] (a piece like 'key=value', with
    no component name before '=', continues the previous spec)."""
    specs: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        continues = "=" in piece and ":" not in piece.split("=", 1)[0]
        if continues and specs:
            specs[-1] += "," + piece
        else:
            specs.append(piece)
    return specs


def is_exact(variant: Variant) -> bool:
    """Exact attention (any implementation), subject to ``--max-exact-n``."""
    return variant.core.name == "exact"


def child_peak_memory(spec: str, batch: int, heads: int, n: int, d: int, dtype_name: str, seed: int,
                      threads: int) -> int:
    """Peak CPU memory (bytes above the inputs) of one call, run in a fresh process so that memory
    freed by earlier rows and kept by the allocator does not hide this row's peak."""
    torch.set_num_threads(threads)
    variant = parse_variant(spec)
    dtype = DTYPES[dtype_name]
    # initialise thread pools and kernels at a small size first, so their one-off memory is not counted
    small = make_inputs(batch, heads, min(n, 256), d, device="cpu", dtype=dtype, seed=seed)
    with torch.no_grad():
        make_call(variant, *small)()
    del small
    q, k, v = make_inputs(batch, heads, n, d, device="cpu", dtype=dtype, seed=seed)
    return fnabench.peak_memory(make_call(variant, q, k, v), device="cpu")


def peak_memory_mb(args: argparse.Namespace, spec: str, n: int, device: torch.device,
                   call: Callable[[], torch.Tensor]) -> float:
    """Peak memory of one call in MB (2**20 bytes) above the inputs: CUDA in-process, CPU in a child."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return fnabench.peak_memory(call, device=device) / 2**20
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        peak = pool.apply(child_peak_memory, (spec, args.batch, args.heads, n, args.head_dim, args.dtype, args.seed,
                                              torch.get_num_threads()))
    return peak / 2**20


def has_breakdown(variant: Variant) -> bool:
    """FNA with the default selection (FPS on head-mean q), which :func:`breakdown` reproduces."""
    core = variant.core
    return core.name == "fna" and core["landmarks"] == "fps" and core["features"] == "q" and variant.mask is None


def breakdown(args: argparse.Namespace, variant: Variant, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              device: torch.device) -> tuple[float, float]:
    """Median ms of FNA's two parts: landmark selection (head-mean q + FPS) and the Nyström core."""
    core = variant.core
    n = q.shape[-2]
    guarantee = core["guarantee"].mask(n, NUM_PREFIX).to(device)
    exclude = core["exclude"].mask(n, NUM_PREFIX).to(device)

    def select() -> torch.Tensor:
        return farthest_point_sampling(q.mean(dim=1), core["m"], guarantee=guarantee, exclude=exclude)

    with torch.no_grad():
        idx = select()
    kw = {"device": device, "repeats": args.repeats, "warmup": args.warmup, "budget_s": args.budget / 2}
    sel = timed(select, **kw)
    nys = timed(lambda: fna_attention(q, k, v, idx, pinv=core["pinv"], pinv_iters=core["iters"]), **kw)
    return sel.median * 1e3, nys.median * 1e3


def run_size(args: argparse.Namespace, n: int, variants: list[Variant], device: torch.device,
             dtype: torch.dtype) -> list[dict]:
    """All methods at sequence length ``n``: counted FLOPs, then timing (all methods together, see
    ``--schedule``), then error vs exact SDPA, peak memory and the FNA breakdown, row by row."""
    base = {"device": str(device), "device_name": device_name(device), "dtype": args.dtype,
            "threads": torch.get_num_threads(), "batch": args.batch, "heads": args.heads,
            "head_dim": args.head_dim, "n": n}
    q, k, v = make_inputs(args.batch, args.heads, n, args.head_dim, device=device, dtype=dtype, seed=args.seed)
    meta = make_inputs(args.batch, args.heads, n, args.head_dim, device="meta", dtype=dtype, seed=args.seed)
    exact_flops = fnabench.count_flops(make_call(parse_variant("exact"), *meta)).total
    rows, calls = [], {}
    for i, variant in enumerate(variants):
        flops = fnabench.count_flops(make_call(variant, *meta)).total
        row = dict(base, method=variant.short, spec=variant.canonical,
                   m=variant.core["m"] if "m" in variant.core.values else None,
                   gflops=flops / 1e9, flop_bound=exact_flops / flops if flops else None)
        if is_exact(variant) and n > args.max_exact_n:
            row["skipped"] = f"N > --max-exact-n {args.max_exact_n}"
        else:
            calls[i] = make_call(variant, q, k, v)
        rows.append(row)
    if args.compile:  # each approximation once more, through torch.compile (compiled before timing starts)
        for variant in variants[1:]:
            i = len(rows)
            rows.append(dict(rows[variants.index(variant)], method=f"{variant.short} [compiled]", compiled=True))
            calls[i] = compiled_call(variant, q, k, v)
        variants = variants + variants[1:]
    lats = time_all([fixed(c) for c in calls.values()], device=device, repeats=args.repeats, warmup=args.warmup,
                    budget_s=args.budget, interleave=args.interleave)
    for i, lat in zip(calls, lats, strict=True):
        rows[i].update(median_ms=lat.median * 1e3, iqr_ms=lat.iqr * 1e3, q1_ms=lat.q1 * 1e3, q3_ms=lat.q3 * 1e3,
                       min_ms=lat.min * 1e3, max_ms=lat.max * 1e3, repeats=lat.repeats)
    # variants[0] is exact SDPA: the reference for speed-up and error, unless it was skipped
    with torch.no_grad():
        ref = calls[0]() if 0 in calls else None
    exact = rows[0] if ref is not None else None
    for i, (variant, row) in enumerate(zip(variants, rows, strict=True)):
        if i not in calls:
            print(f"  N={n:>6} {variant.short:<16} skipped (N > --max-exact-n)", file=sys.stderr, flush=True)
            continue
        if ref is not None and exact is not None:
            with torch.no_grad():
                row["rel_err"] = rel_frobenius(calls[i](), ref)
            row["speedup"] = exact["median_ms"] / row["median_ms"]
            row["speedup_min"] = exact["min_ms"] / row["min_ms"]
            if row["flop_bound"]:
                row["of_bound"] = row["speedup"] / row["flop_bound"]
                row["of_bound_min"] = row["speedup_min"] / row["flop_bound"]
        if not args.no_memory and not row.get("compiled"):
            row["peak_mb"] = peak_memory_mb(args, variant.canonical, n, device, calls[i])
        if has_breakdown(variant) and not args.no_breakdown and not row.get("compiled"):
            row["select_ms"], row["core_ms"] = breakdown(args, variant, q, k, v, device)
        print(f"  N={n:>6} {variant.short:<16} {row['median_ms']:10.2f} ms  speed-up {fmt(row.get('speedup'))}  "
              f"peak MB {fmt(row.get('peak_mb'))}", file=sys.stderr, flush=True)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", type=int_list, default=None,
                   help="sequence lengths N, comma-separated (default: 256,512,...,16384)")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma-separated variant specs; 'exact' (SDPA) is the reference for speed-up and error")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10, help="timed calls per row (fewer for slow rows, see --budget)")
    p.add_argument("--budget", type=float, default=30.0,
                   help="seconds of timed calls per row; slow rows (exact at large N) get fewer repeats, min 3")
    p.add_argument("--max-exact-n", type=int, default=16384, help="skip exact attention above this N")
    p.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    p.add_argument("--no-breakdown", action="store_true", help="skip timing FNA's selection and core separately")
    p.add_argument("--quick", action="store_true", help="smoke test: N = 256, 1024 and 2 repeats")
    p.add_argument("--compile", action="store_true",
                   help="also time every approximation through torch.compile, as extra '[compiled]' rows")
    add_common_args(p)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes = args.sizes or [256, 1024]
        args.repeats, args.warmup = 2, 1
    args.sizes = args.sizes or DEFAULT_SIZES
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, dtype = setup(args)
    args.dtype = str(dtype).replace("torch.", "")
    try:
        variants = [parse_variant(spec) for spec in split_specs(args.methods)]
    except fnabench.SpecError as err:
        raise SystemExit(f"--methods: {err}") from None
    # exact SDPA is the reference for speed-up and error: it always runs, first
    variants = [parse_variant("exact")] + [v for v in variants if v.canonical != "exact:impl=sdpa"]
    print(header(device, dtype, [f"B={args.batch}, H={args.heads}, d={args.head_dim}; random N(0,1) q, k, v; "
                                 f"FNA rows include FPS landmark selection (CLS guaranteed)",
                                 f"timing schedule: {'interleaved' if args.interleave else 'sequential'}",
                                 "GFLOPs counted (2 x multiply-adds); peak MB = memory above the inputs "
                                 + ("(peak CUDA allocated)" if device.type == "cuda" else
                                    "(peak RSS of a fresh process)")]), flush=True)
    rows = run_sizes(args.sizes, lambda n: run_size(args, n, variants, device, dtype), device)
    report(rows, COLUMNS, args.csv, CSV_KEYS)
    return 0


if __name__ == "__main__":
    sys.exit(main())

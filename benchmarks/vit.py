"""End-to-end benchmark: a ViT at growing resolution, exact vs FNA vs Nyström.

The model is a random-initialised timm ViT-B/16 (N = (S/16)² + 1 tokens at image size S), or with
``--model`` any registered fnabench model, e.g. the real DINOv2-S that works offline.
Rows: the unpatched model, the patched model with ``exact`` (the reference), FNA and Nyström on
``--layers``, and ``null`` on the same layers (attention that costs nothing, out = V).
T_exact / T_null is the measured Amdahl bound: no approximation of those layers' attention can beat it.

    python benchmarks/vit.py                    # S = 224, 448, 896 on CPU (or CUDA when available)
    python benchmarks/vit.py --quick            # smoke test: S = 224, 2 repeats
    python benchmarks/vit.py --device cuda --batch 8 --m 32 --layers=-11: --csv out/vit.csv
    python benchmarks/vit.py --model offline:dinov2-s --sizes 224,448 --batch 10

Columns are explained in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from collections.abc import Callable, Iterator

import torch
from benchutil import (
    Entry,
    add_common_args,
    device_name,
    header,
    int_list,
    report,
    run_sizes,
    setup,
    time_all,
)

import fnabench

MODEL = "vit_base_patch16_224"

COLUMNS = [
    ("size", "S"),
    ("tokens", "N"),
    ("method", "method"),
    ("gflops", "GFLOPs"),
    ("attn_gflops", "attn GFLOPs"),
    ("median_ms", "median ms"),
    ("iqr_ms", "IQR ms"),
    ("min_ms", "min ms"),
    ("repeats", "reps"),
    ("images_per_s", "img/s"),
    ("speedup", "speed-up"),
    ("amdahl", "Amdahl bound"),
    ("of_amdahl", "of bound"),
]
CSV_KEYS = [
    "device", "device_name", "dtype", "threads", "model", "batch", "size", "tokens", "method", "spec", "gflops",
    "attn_gflops", "median_ms", "iqr_ms", "q1_ms", "q3_ms", "min_ms", "max_ms", "repeats", "images_per_s",
    "speedup", "amdahl", "of_amdahl", "speedup_min", "amdahl_min", "of_amdahl_min",
]


def build_model(size: int, device: torch.device | str, dtype: torch.dtype, name: str | None = None) -> torch.nn.Module:
    """``name`` from fnabench's model registry, else a random-initialised ViT-B/16; in eval mode."""
    if name is not None:
        from fnabench.models.registry import load_model

        return load_model(name, image_size=size).model.to(device=device, dtype=dtype).eval()
    import timm

    model = timm.create_model(MODEL, pretrained=False, img_size=size, device=device)
    return model.to(dtype=dtype).eval()


def token_count(model: torch.nn.Module) -> int | None:
    """Sequence length of a timm ViT (patches + prefix tokens); None for other families."""
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or not hasattr(patch_embed, "num_patches"):
        return None
    return int(patch_embed.num_patches) + int(getattr(model, "num_prefix_tokens", 1))


def patched(model: torch.nn.Module, spec: str | None) -> contextlib.AbstractContextManager:
    """``fnabench.patch(model, spec)``, or nothing for the unpatched model (spec None)."""
    return contextlib.nullcontext() if spec is None else fnabench.patch(model, spec)


def count(meta_model: torch.nn.Module, size: int, batch: int, dtype: torch.dtype,
          spec: str | None) -> fnabench.FlopCount:
    """Counted FLOPs of one forward, on the meta device (no memory, no compute)."""
    x = torch.empty(batch, 3, size, size, device="meta", dtype=dtype)
    with patched(meta_model, spec):
        return fnabench.count_flops(meta_model, x)


def run_size(args: argparse.Namespace, size: int, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """All rows at one image size; ``exact`` (patched) is the speed-up reference, ``null`` the bound."""
    layers = args.layers
    specs: list[tuple[str, str | None]] = [
        ("unpatched", None),
        ("exact", "exact"),
        (f"fna:m={args.m} [{layers}]", f"fna:m={args.m},layers={layers}"),
        (f"fna:m={args.m},pinv=newton [{layers}]", f"fna:m={args.m},pinv=newton,layers={layers}"),  # official inverse
        (f"nystrom:m={args.nystrom_m} [{layers}]", f"nystrom:m={args.nystrom_m},layers={layers}"),
        (f"null [{layers}]", f"null:layers={layers}"),
    ]
    if args.no_unpatched:
        specs = specs[1:]
    torch.manual_seed(args.seed)
    model = build_model(size, device, dtype, args.model)
    meta_model = copy.deepcopy(model).to("meta") if args.model else build_model(size, "meta", dtype)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 3, size, size, generator=gen).to(device=device, dtype=dtype)
    base = {"device": str(device), "device_name": device_name(device), "dtype": str(dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(), "model": args.model or MODEL, "batch": args.batch, "size": size,
            "tokens": token_count(model)}
    rows = []
    for label, spec in specs:
        flops = count(meta_model, size, args.batch, dtype, spec)
        rows.append(dict(base, method=label, spec=spec or "", gflops=flops.total / 1e9,
                         attn_gflops=flops.attention / 1e9))

    def entry(spec: str | None) -> Entry:
        @contextlib.contextmanager
        def cm() -> Iterator[Callable[[], object]]:
            with patched(model, spec):
                yield lambda: model(x)

        return cm

    lats = time_all([entry(spec) for _, spec in specs], device=device, repeats=args.repeats, warmup=args.warmup,
                    budget_s=args.budget, interleave=args.interleave)
    for row, lat in zip(rows, lats, strict=True):
        row.update(median_ms=lat.median * 1e3, iqr_ms=lat.iqr * 1e3, q1_ms=lat.q1 * 1e3, q3_ms=lat.q3 * 1e3,
                   min_ms=lat.min * 1e3, max_ms=lat.max * 1e3, repeats=lat.repeats,
                   images_per_s=lat.throughput(args.batch))
        print(f"  S={size:>4} {row['method']:<24} {row['median_ms']:10.1f} ms", file=sys.stderr, flush=True)
    ref = next(r for r in rows if r["spec"] == "exact")
    null = next(r for r in rows if r["spec"].startswith("null"))
    bound = ref["median_ms"] / null["median_ms"]
    bound_min = ref["min_ms"] / null["min_ms"]
    for row in rows:
        row["speedup"] = ref["median_ms"] / row["median_ms"]
        row["speedup_min"] = ref["min_ms"] / row["min_ms"]
        if row["spec"] not in ("", "exact"):  # approximations of --layers: compare with their bound
            row["amdahl"], row["amdahl_min"] = bound, bound_min
            row["of_amdahl"] = row["speedup"] / bound
            row["of_amdahl_min"] = row["speedup_min"] / bound_min
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", type=int_list, default=None,
                   help="image sizes S, multiples of the patch size (default: 224,448,896)")
    p.add_argument("--model", default=None,
                   help="a registered fnabench model (e.g. offline:dinov2-s); default: random-init timm ViT-B/16")
    p.add_argument("--m", type=int, default=64, help="FNA landmarks")
    p.add_argument("--nystrom-m", type=int, default=64, help="Nyström landmarks (segment means)")
    p.add_argument("--layers", default="-6:", help="blocks to approximate, as a Python slice over the 12 blocks")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10, help="timed forwards per row (fewer for slow rows, see --budget)")
    p.add_argument("--budget", type=float, default=60.0,
                   help="seconds of timed forwards per row; slow rows get fewer repeats, min 3")
    p.add_argument("--no-unpatched", action="store_true", help="skip the unpatched row")
    p.add_argument("--quick", action="store_true", help="smoke test: S = 224 and 2 repeats")
    add_common_args(p)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes = args.sizes or [224]
        args.repeats, args.warmup = 2, 1
    args.sizes = args.sizes or [224, 448, 896]
    bad = [s for s in args.sizes if s % 16]
    if bad and args.model is None:
        p.error(f"--sizes must be multiples of the patch size 16, got {bad}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import timm
    except ImportError:
        raise SystemExit("benchmarks/vit.py needs timm: pip install 'fnabench[clip]'") from None
    device, dtype = setup(args)
    try:
        fnabench.parse_variant(f"fna:m={args.m},layers={args.layers}")
    except fnabench.SpecError as err:
        raise SystemExit(f"--m/--layers: {err}") from None
    model_line = args.model or f"timm {timm.__version__} {MODEL} (random init)"
    print(header(device, dtype, [f"{model_line}, batch {args.batch}, "
                                 f"approximated blocks {args.layers}",
                                 f"timing schedule: {'interleaved' if args.interleave else 'sequential'}",
                                 "GFLOPs counted (2 x multiply-adds); speed-up vs the patched exact model; "
                                 "Amdahl bound = T_exact / T_null"]), flush=True)
    rows = run_sizes(args.sizes, lambda size: run_size(args, size, device, dtype), device)
    report(rows, COLUMNS, args.csv, CSV_KEYS)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Harness overhead: images/s of a task run through fnabench vs a bare loop of the same forwards.

The harness path is what a sweep cell does for its metrics: patch the model with the variant, run
the task's ``evaluate`` (batching, progress bar, dtype/device moves, metric maths) and unpatch. The
bare path is a plain ``for batch in data: model(batch)`` over the same preprocessed images. Both
are timed in the same process, alternating, and the medians compared. Target: ratio ≥ 0.95.

    python benchmarks/overhead.py [--model tiny:vit] [--size 224] [--images 64] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fnabench
from fnabench.tasks.base import Settings, batches
from fnabench.tasks.registry import make_task


def _bare(loaded, images: torch.Tensor, batch_size: int) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in batches(images, batch_size):
            loaded.embed(batch)
    return time.perf_counter() - t0


def _harness(loaded, task, prepared, settings: Settings, variant: str) -> float:
    t0 = time.perf_counter()
    with fnabench.patch(loaded.model, variant):
        task.evaluate(loaded, prepared, settings)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny:vit")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--variant", default="exact")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quiet", action="store_true", help="no progress bar in the harness path")
    args = parser.parse_args(argv)

    loaded = fnabench.load_model(args.model, image_size=args.size)
    task = make_task("fidelity:synthetic", {"num_synthetic": args.images})
    progress = None
    if not args.quiet:
        from tqdm.auto import tqdm

        def progress(it, desc, total):
            return tqdm(it, desc=desc, total=total, leave=False)

    settings = Settings(image_size=args.size, batch_size=args.batch_size, limit=args.images,
                        **({"progress": progress} if progress else {}))
    prepared = task.prepare(loaded, settings)
    images = prepared.images
    n = images.shape[0]
    _bare(loaded, images, args.batch_size)  # warm-up both paths
    _harness(loaded, task, prepared, settings, args.variant)
    bare, harness = [], []
    for _ in range(args.rounds):
        bare.append(_bare(loaded, images, args.batch_size))
        harness.append(_harness(loaded, task, prepared, settings, args.variant))
    bare_ips, harness_ips = n / statistics.median(bare), n / statistics.median(harness)
    print(f"model {args.model} @{args.size}px, {n} images, batch {args.batch_size}, variant {args.variant}, "
          f"torch threads {torch.get_num_threads()}, {args.rounds} alternating rounds")
    print(f"bare loop : {bare_ips:8.2f} images/s (median {statistics.median(bare):.3f} s)")
    print(f"harness   : {harness_ips:8.2f} images/s (median {statistics.median(harness):.3f} s)")
    print(f"ratio harness/bare: {harness_ips / bare_ips:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()

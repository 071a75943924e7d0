"""``fnabench tune MODEL TASK --budget B``: the command line of the FNA-setting search
(:mod:`fnabench.harness.tune`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fnabench._errors import EXIT_FOUND, EXIT_OK
from fnabench.harness.config import tomllib
from fnabench.harness.tune import DEFAULT_M, DEFAULT_PROXY, DEFAULT_VARIANT, TuneError, TuneSpec, tune


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise TuneError(f"{flag} {text!r}: accepted: comma-separated integers, e.g. 16,32,64") from None


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _options(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise TuneError(f"--task-option {item!r}: accepted: KEY=VALUE, e.g. limit=1000")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value  # a bare word: a string
    return out


def add_parser(sub) -> None:
    p = sub.add_parser("tune", help="search FNA's knobs for the cheapest setting within an accuracy budget")
    p.add_argument("model", help="a model name, e.g. offline:dinov2-s")
    p.add_argument("task", help="the task the budget is on, e.g. knn:digits")
    p.add_argument("--budget", type=float, default=1.0,
                   help="largest drop of the task's primary metric vs exact, in its units (default 1.0)")
    p.add_argument("--max-cells", type=int, default=12, help="task cells at most, exact and the default included")
    p.add_argument("--out", help="results folder (default: results/tune-<model>-<task>)")
    p.add_argument("--image-size", type=int, help="input size in px (default: the model's own)")
    p.add_argument("--proxy", default=DEFAULT_PROXY, help="the cheap task run on every setting first")
    p.add_argument("--proxy-images", type=int, default=8, help="items the proxy runs on (its sweep limit)")
    p.add_argument("--m", default=",".join(map(str, DEFAULT_M)), help="landmark counts to try, e.g. 16,32,64,128")
    p.add_argument("--blocks", default="", help="how many last blocks FNA replaces, e.g. all,9,6,3 "
                   "(default: all, 3/4, 1/2, 1/4 of the depth)")
    p.add_argument("--landmarks", default="", help="landmark selections to try (default fps,random)")
    p.add_argument("--pinv", default="ridge,newton", help="inverses to try (default ridge,newton)")
    p.add_argument("--default", default=DEFAULT_VARIANT, help="the hand-picked setting to compare with")
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the task, e.g. limit=1000 (repeatable)")
    p.add_argument("--limit", type=int, help="items per task cell (the sweep limit)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--timing-repeats", type=int, default=2, help="paired timing rounds with exact per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--online", action="store_true", help="allow hub downloads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=command)


def spec_from_args(args) -> TuneSpec:
    return TuneSpec(model=args.model, task=args.task, budget=args.budget, max_cells=args.max_cells,
                    image_size=args.image_size, proxy=args.proxy, proxy_images=args.proxy_images,
                    m=_int_list(args.m, "--m"), blocks=_str_list(args.blocks), landmarks=_str_list(args.landmarks),
                    pinv=_str_list(args.pinv), default=args.default, task_options=_options(args.task_option),
                    limit=args.limit, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                    timing_repeats=args.timing_repeats, seed=args.seed, offline=not args.online)


def command(args) -> int:
    if args.threads is not None:
        if args.threads < 1:
            raise TuneError(f"--threads {args.threads}: accepted: an integer >= 1")
        import torch

        torch.set_num_threads(args.threads)
    spec = spec_from_args(args)
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in f"tune-{spec.model}-{spec.task}")
    outcome = tune(spec, args.out or Path("results") / slug, quiet=args.quiet)
    print(outcome.report)
    exact = outcome.state.points.get(outcome.state.exact)
    return EXIT_OK if exact is not None and exact.task is not None and not math.isnan(exact.task) else EXIT_FOUND

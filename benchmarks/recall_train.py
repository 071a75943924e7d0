"""Training speed of a recall preset: one step profiled, the step's ways of running timed side by side in one
process, and what this CPU's ``torch.mm`` reaches on the model's matrix shapes.

    python benchmarks/recall_train.py --preset cpu-n5 --threads 1 --steps 60 [--csv benchmarks/results/recall_train.csv]

Each way runs the same batches (``batch_tensors(config, step)``) from the same initial weights; "same weights"
says whether its weights after the timed steps equal the plain step's bit for bit (a way that changes the
rounding, such as a compiled or fused step, keeps the mathematics but not the bits). Ratios are against the
plain step in the same process; rounds alternate the ways so load drifts hit all of them alike.
"""

from __future__ import annotations

import argparse
import copy
import csv
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from fnabench.tasks.recall.costs import train_step_flops
from fnabench.tasks.recall.network import build_model, masked_mse
from fnabench.tasks.recall.presets import get_preset
from fnabench.tasks.recall.training import batch_tensors


def _step(model, optimizer, batch, clip: float) -> None:
    inputs, targets, mask = batch
    loss = masked_mse(model(inputs), targets, mask)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()


def _make(config, fused: bool = False, compiled: bool = False):
    torch.manual_seed(config.train.seed)
    model = build_model(config)
    kwargs = {"fused": True} if fused else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay,
                                  **kwargs)
    forward = torch.compile(model) if compiled else model
    return model, forward, optimizer


class Prefetch:
    """Samples the next step's batch on a background thread while the current step runs (same batches)."""

    def __init__(self, config, start: int) -> None:
        self.config, self.next_step, self._thread, self._batch = config, start, None, None
        self._launch()

    def _launch(self) -> None:
        step = self.next_step

        def work() -> None:
            self._batch = batch_tensors(self.config, step)

        self._thread = threading.Thread(target=work, daemon=True)
        self._thread.start()

    def get(self):
        self._thread.join()
        batch = self._batch
        self.next_step += 1
        self._launch()
        return batch


def profile_step(config, steps: int) -> dict[str, float]:
    """Mean seconds per step in each part: sampling the batch, forward + loss, backward, clip + optimiser."""
    model, _, optimizer = _make(config)
    parts = {"sample": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    for step in range(steps + 2):
        t0 = time.perf_counter()
        inputs, targets, mask = batch_tensors(config, step)
        t1 = time.perf_counter()
        loss = masked_mse(model(inputs), targets, mask)
        t2 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        optimizer.step()
        t4 = time.perf_counter()
        if step >= 2:
            for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                parts[key] += dt / steps
    return parts


def mm_rate(config, tokens: int, repeats: int = 30) -> dict[str, float]:
    """GFLOP/s of torch.mm at the model's dense shapes (tokens × n_embd against its projections), fwd-like."""
    d = config.model.n_embd
    shapes = {"qkv": (tokens, d, 3 * d), "proj": (tokens, d, d), "mlp_in": (tokens, d, 4 * d),
              "mlp_out": (tokens, 4 * d, d)}
    out = {}
    for name, (m, k, n) in shapes.items():
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            torch.mm(a, b)
        t0 = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        out[name] = 2 * m * k * n * repeats / (time.perf_counter() - t0) / 1e9
    return out


def compare(config, steps: int, rounds: int, ways: list[str]) -> dict[str, dict]:
    """Seconds per step of each way, in alternating rounds of ``steps`` steps, and whether weights stay equal."""
    built = {w: _make(config, fused=w == "fused", compiled=w == "compiled") for w in ways}
    times: dict[str, list[float]] = {w: [] for w in ways}
    step0 = {w: 0 for w in ways}
    for w in ways:  # warm-up (compilation included)
        _, forward, optimizer = built[w]
        for s in range(3):
            _step(forward, optimizer, batch_tensors(config, s), config.train.grad_clip)
        step0[w] = 3
    for _ in range(rounds):
        for w in ways:
            _, forward, optimizer = built[w]
            fetch = Prefetch(config, step0[w]) if w == "prefetch" else None
            t0 = time.perf_counter()
            for s in range(step0[w], step0[w] + steps):
                batch = fetch.get() if fetch else batch_tensors(config, s)
                _step(forward, optimizer, batch, config.train.grad_clip)
            times[w].append((time.perf_counter() - t0) / steps)
            step0[w] += steps
    ref = built["plain"][0].state_dict()
    out = {}
    for w in ways:
        same = all(torch.equal(ref[k], v) for k, v in built[w][0].state_dict().items())
        out[w] = {"s_per_step": statistics.median(times[w]), "rounds": times[w], "same_weights": same}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cpu-n5")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=20, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ways", default="plain,fused,prefetch,compiled")
    p.add_argument("--csv", help="append the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = get_preset(args.preset)
    model = build_model(config)
    batch = batch_tensors(config, 0)
    tokens = batch[0].shape[0] * batch[0].shape[1]
    flops = train_step_flops(model, *batch)
    parts = profile_step(config, args.steps)
    step_s = sum(parts.values())
    print(f"{args.preset}, {args.threads} thread(s): {tokens} tokens/step, {flops / 1e9:.2f} counted GFLOP/step")
    print("one step: " + ", ".join(f"{k} {v * 1e3:.1f} ms ({v / step_s:.0%})" for k, v in parts.items()))
    rates = mm_rate(config, tokens)
    print("torch.mm at the model's shapes: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in rates.items()))
    print(f"the step reaches {flops / step_s / 1e9:.1f} counted GFLOP/s ({tokens / step_s:,.0f} tokens/s)")
    ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    if "plain" not in ways:
        ways.insert(0, "plain")
    result = compare(copy.deepcopy(config), args.steps, args.rounds, ways)
    base = result["plain"]["s_per_step"]
    rows = []
    for w, r in result.items():
        print(f"{w:9s} {r['s_per_step'] * 1e3:7.1f} ms/step  {tokens / r['s_per_step']:9,.0f} tokens/s  "
              f"{base / r['s_per_step']:.2f}x plain  same weights: {r['same_weights']}  "
              f"rounds: {', '.join(f'{x * 1e3:.0f}' for x in r['rounds'])} ms")
        rows.append({"preset": args.preset, "threads": args.threads, "way": w, "ms_per_step": r["s_per_step"] * 1e3,
                     "tokens_per_s": tokens / r["s_per_step"], "x_plain": base / r["s_per_step"],
                     "same_weights": r["same_weights"]})
    if args.csv:
        path = Path(args.csv)
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

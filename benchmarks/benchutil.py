"""Helpers shared by the benchmark scripts: devices, dtypes, adaptive timing, tables and CSV."""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

import fnabench
from fnabench.harness.records import cpu_name
from fnabench.measure import Latency, measure_interleaved

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

#: environment variables that change CPU threading; printed in the header when set
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Flags both scripts share: device, dtype, threads, timing, seed, CSV."""
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's default, usually the number of cores)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    p.add_argument("--schedule", choices=["auto", "interleaved", "sequential"], default="auto",
                   help="interleaved: one timed call per method per round, so a change in other load hits all "
                        "methods alike (robust ratios on a shared CPU); sequential: all repeats of one method, "
                        "then the next; auto: interleaved on CPU, sequential on CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", help="also write the rows to this CSV file")


def setup(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """Apply ``--threads``; resolve ``--device``, the dtype and the timing schedule (sets ``args.interleave``)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    args.interleave = args.schedule == "interleaved" or (args.schedule == "auto" and device.type == "cpu")
    return device, DTYPES[args.dtype]


def run_sizes(sizes: Sequence[int], run_size: Callable[[int], list[dict]], device: torch.device) -> list[dict]:
    """Spin the device up, then the rows of every size in turn (CUDA cache emptied between sizes)."""
    spin_up(device)
    rows: list[dict] = []
    for size in sizes:
        rows.extend(run_size(size))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def int_list(text: str) -> list[int]:
    """argparse type: '256,512,1024' → [256, 512, 1024]."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def resolve_device(name: str) -> torch.device:
    """'auto' → CUDA when available, else CPU; a CUDA request without a GPU is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: torch {torch.__version__} sees no CUDA device")
    return device


def device_name(device: torch.device) -> str:
    """Human name of the device: the GPU's name, or the CPU model from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def cpu_count() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def header(device: torch.device, dtype: torch.dtype, extra: Sequence[str] = ()) -> str:
    """The lines printed above every table: what ran where, so a number is never read out of context."""
    env = ", ".join(f"{k}={os.environ[k]}" for k in THREAD_ENV if k in os.environ) or "none set"
    lines = [
        f"device: {device} ({device_name(device)}), cpu cores: {cpu_count()}, "
        f"torch threads: {torch.get_num_threads()} (thread env: {env})",
        f"torch {torch.__version__}, fnabench {fnabench.__version__}, dtype {str(dtype).replace('torch.', '')}",
    ]
    if device.type == "cpu" and hasattr(os, "getloadavg"):
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        lines.append(f"load average before the run (1/5/15 min): {load}; other busy processes distort CPU timings")
    if device.type == "cuda":
        lines.append(f"tf32 matmul: {torch.backends.cuda.matmul.allow_tf32}, cudnn tf32: "
                     f"{torch.backends.cudnn.allow_tf32}")
    lines.extend(extra)
    return "\n".join(f"# {line}" for line in lines)


def sync(device: torch.device) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spin_up(device: torch.device, seconds: float = 3.0) -> None:
    """Keep the device busy with matmuls for ``seconds`` before any timing: the first seconds of work
    on a fresh process (clock ramp-up, thread-pool start, a VM's idle cores) run measurably slower."""
    a = torch.randn(512, 512, device=device)
    end = time.perf_counter() + seconds
    with torch.no_grad():
        while time.perf_counter() < end:
            for _ in range(8):
                a = torch.tanh(a @ a)
            sync(device)


def timed(
    fn: Callable[[], object],
    *,
    device: torch.device,
    repeats: int,
    warmup: int,
    budget_s: float,
    min_repeats: int = 3,
) -> Latency:
    """``measure_latency`` with a time budget: one probe call (counted as warm-up) estimates the
    cost, and when ``warmup + repeats`` calls would exceed ``budget_s`` seconds the repeats shrink
    (never below ``min_repeats``, nor above what was asked) and the remaining warm-up is dropped."""
    with torch.no_grad():
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        probe = time.perf_counter() - t0
    warmup_left = max(warmup - 1, 0)
    if probe * (warmup_left + repeats) > budget_s:
        warmup_left = 0
        repeats = max(min(repeats, min_repeats), min(repeats, int(budget_s / max(probe, 1e-9))))
    return fnabench.measure_latency(fn, warmup=warmup_left, repeats=repeats, device=device)


#: a zero-argument factory of a context manager that yields the call to time (set-up such as
#: patching a model happens outside the timed region)
Entry = Callable[[], contextlib.AbstractContextManager[Callable[[], object]]]


def fixed(fn: Callable[[], object]) -> Entry:
    """An :data:`Entry` for a call that needs no set-up."""
    return lambda: contextlib.nullcontext(fn)


def _one_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call, timed by ``fnabench.measure_latency`` (CUDA events on a GPU)."""
    return fnabench.measure_latency(fn, warmup=0, repeats=1, device=device).median


def time_all(
    entries: Sequence[Entry],
    *,
    device: torch.device,
    repeats: int,
    warmup: int,
    budget_s: float,
    interleave: bool,
    min_repeats: int = 3,
) -> list[Latency]:
    """Latency of each entry. Sequential: :func:`timed` per entry. Interleaved: warm each entry up,
    then rounds of one timed call per entry (order reversed every other round), so slow drifts in
    other load affect every entry alike; rounds shrink to fit ``budget_s`` × entries, min 3."""
    if not interleave:
        out = []
        for entry in entries:
            with entry() as fn:
                out.append(timed(fn, device=device, repeats=repeats, warmup=warmup, budget_s=budget_s,
                                 min_repeats=min_repeats))
        return out
    probes = []
    for entry in entries:
        with entry() as fn:
            probe = _one_call(fn, device)
            for _ in range(warmup - 1):
                if probe * warmup > budget_s / 4:  # slow call: one warm-up is enough
                    break
                probe = _one_call(fn, device)
        probes.append(probe)
    rounds = repeats
    total = sum(probes)
    if total * rounds > budget_s * len(entries):
        rounds = max(min(repeats, min_repeats), int(budget_s * len(entries) / max(total, 1e-9)))
    return measure_interleaved(entries, warmup=0, repeats=rounds, device=device)  # warmed up above


def fmt(value: object, digits: int = 3) -> str:
    """Table cell: floats to ``digits`` significant figures (no exponent for ordinary sizes), None → '–'."""
    if value is None:
        return "–"
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        if value == 0 or 1e-3 <= abs(value) < 1e6:
            text = f"{value:.{digits}g}"
            if "e" in text:  # e.g. 1.23e+03 for 1234.5 at 3 digits
                text = f"{value:.0f}"
            return text
        return f"{value:.{digits - 1}e}"
    return str(value)


def render_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """Rows (dicts) as a text table; ``columns`` are (key, title) pairs. Uses tabulate when installed."""
    titles = [title for _, title in columns]
    body = [[fmt(row.get(key)) for key, _ in columns] for row in rows]
    try:
        from tabulate import tabulate
    except ImportError:
        widths = [max(len(t), *(len(r[i]) for r in body)) if body else len(t) for i, t in enumerate(titles)]
        lines = ["  ".join(t.rjust(w) for t, w in zip(titles, widths, strict=True)),
                 "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in body]
        return "\n".join(lines)
    return tabulate(body, headers=titles, tablefmt="github", disable_numparse=True, stralign="right")


def write_csv(path: str | Path, rows: Sequence[dict], keys: Sequence[str]) -> None:
    """Write ``rows`` with the columns ``keys`` (full precision; empty cell for missing values)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(keys), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in keys})


def rel_frobenius(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖_F / ‖ref‖_F, accumulated in float64."""
    ref64 = ref.double()
    return ((out.double() - ref64).norm() / ref64.norm()).item()


def report(rows: Sequence[dict], columns: Sequence[tuple[str, str]], csv_path: str | None,
           csv_keys: Sequence[str]) -> None:
    """Print the table and, when asked, write the CSV: how every benchmark ends."""
    print(render_table(rows, columns))
    if csv_path:
        write_csv(csv_path, rows, csv_keys)
        print(f"# wrote {csv_path}")

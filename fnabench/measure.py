"""Cost, counted and measured: FLOPs, latency, throughput, peak memory. Depends on torch alone.

FLOPs are counted per dispatched op with ``torch.utils.flop_counter``'s formulas (the same ones
``FlopCounterMode`` uses), with its known gaps closed: CPU SDPA (counted 0 upstream) gets the SDPA
formula, SVD and pinv get Golub & Van Loan's operation counts, fnabench's compiled FPS op gets the eager
loop's count, and the ``nn.MultiheadAttention``
fast path (invisible to counters) is switched off while counting. 1 FLOP = 1 multiply or add, so
FLOPs = 2 × multiply-adds; elementwise ops and softmax are not counted (the usual convention).
FLOPs inside a variant's token mixing (the profiler range ``fnabench::attention``) and inside any
SDPA call, whichever kernel runs it, are also reported as ``attention``.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils import flop_counter as _fc
from torch.utils._python_dispatch import TorchDispatchMode

#: profiler range that variants open around their token mixing
ATTENTION_RANGE = "fnabench::attention"

_aten = torch.ops.aten
_SDPA_OPS = {
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_attention_math",
}


def _sdpa_formula(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return _fc.sdpa_flop_count(query, key, value)


def _svd_formula(a_shape, *args, out_shape=None, **kwargs) -> int:
    """Golub & Van Loan's R-SVD cost with U and V: 4m²n + 8mn² + 9n³ (m ≥ n), per matrix."""
    *batch, rows, cols = a_shape
    m, n = max(rows, cols), min(rows, cols)
    count = 1
    for b in batch:
        count *= b
    return count * (4 * m * m * n + 8 * m * n * n + 9 * n**3)


def _pinv_formula(a_shape, *args, out_shape=None, **kwargs) -> int:
    """pinv = SVD, then V·Σ⁺·Uᵀ (2·m·n·k FLOPs for the product)."""
    *batch, rows, cols = a_shape
    count = 1
    for b in batch:
        count *= b
    return _svd_formula(a_shape) + count * 2 * rows * cols * min(rows, cols)


def _batch(*shapes: tuple, core: int = 2) -> int:
    """Matrices in a broadcast batch: the product of the broadcast leading dimensions."""
    count = 1
    for b in torch.broadcast_shapes(*(tuple(s[:-core]) for s in shapes)):
        count *= b
    return count


def _solve_formula(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """LU solve of A·X = B: factorisation 2/3·m³ plus two triangular solves 2·m²·k, per matrix."""
    m = a_shape[-1]
    if len(b_shape) == len(a_shape) - 1:  # torch's rule: then B is a (batch of) vector(s)
        b_shape = (*b_shape, 1)
    return _batch(a_shape, b_shape) * (2 * m**3 // 3 + 2 * m * m * b_shape[-1])


def _lu_formula(a_shape, *args, out_shape=None, **kwargs) -> int:
    """LU factorisation of an m×m matrix: 2/3·m³ FLOPs, per matrix."""
    return _batch(a_shape, core=2) * (2 * a_shape[-1] ** 3 // 3)


def _triangular_formula(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """Triangular solve of A·X = B (A m×m, B m×k): m²·k FLOPs (m²/2 multiply-adds per column)."""
    return _batch(a_shape, b_shape) * a_shape[-1] * a_shape[-1] * b_shape[-1]


def _fps_formula(x, candidate, g_order, g_count, first, m, *args, out_val=None, **kwargs) -> int:
    """fnabench's compiled farthest-point sampling (variants/fps_kernel.py): per row, one x·p product (2·N·D) after
    every pick that has a next one, min(m, guaranteed + candidates) − 1 of them: the eager loop's count."""
    _, n, d = x.shape
    picks = (g_count + candidate.sum(-1)).clamp(max=m)
    return int(2 * n * d * (picks - 1).clamp(min=0).sum())


#: formulas for fnabench's own compiled ops, by qualified name (they may load after a counter starts)
_OWN_OPS = {"fnabench::fps": _fps_formula}


def _extra_formulas() -> dict:
    extra = {}
    cpu_sdpa = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None and cpu_sdpa not in _fc.flop_registry:
        extra[cpu_sdpa] = _fc.shape_wrapper(_sdpa_formula)
    for op_name, formula in (("_linalg_svd", _svd_formula), ("linalg_pinv", _pinv_formula),
                             ("_linalg_solve_ex", _solve_formula), ("linalg_lu_factor_ex", _lu_formula),
                             ("linalg_solve_triangular", _triangular_formula)):
        op = getattr(_aten, op_name, None)
        if op is not None and op not in _fc.flop_registry:
            extra[op] = _fc.shape_wrapper(formula)
    return extra


@dataclass
class FlopCount:
    """Counted FLOPs (not MACs) of one call: ``total``, the ``attention`` part, and per op."""

    total: int
    attention: int
    by_op: dict[str, int] = field(default_factory=dict)

    @property
    def gflops(self) -> float:
        return self.total / 1e9

    @property
    def attention_gflops(self) -> float:
        return self.attention / 1e9

    @property
    def other(self) -> int:
        """FLOPs outside attention (projections, MLPs, patch embedding, heads)."""
        return self.total - self.attention

    @property
    def macs(self) -> int:
        return self.total // 2


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.registry = {**_fc.flop_registry, **_extra_formulas()}
        self.total = 0
        self.attention = 0
        self.by_op: dict[str, int] = defaultdict(int)
        self._ranges: list[bool] = []  # open profiler ranges (LIFO): is each one ours?
        self.paused = False  # while a count aside runs (count_flops_aside)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused:
            return out
        packet = func._overloadpacket
        name = packet.__name__
        if name == "_record_function_enter_new":
            self._ranges.append(bool(args) and args[0] == ATTENTION_RANGE)
        elif name == "_record_function_exit":
            if self._ranges:
                self._ranges.pop()
        elif packet in self.registry or getattr(packet, "_qualified_op_name", None) in _OWN_OPS:
            formula = self.registry.get(packet) or _OWN_OPS[packet._qualified_op_name]
            flops = int(formula(*args, **kwargs, out_val=out))
            self.total += flops
            self.by_op[name] += flops
            if any(self._ranges) or name in _SDPA_OPS:
                self.attention += flops
        return out


class _SdpaAsAttention(TorchFunctionMode):
    """Marks every ``F.scaled_dot_product_attention`` call as attention, whichever kernel it decomposes to."""

    def __init__(self, counter: _Counter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not F.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        self.counter._ranges.append(True)
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.counter._ranges.pop()


@contextlib.contextmanager
def _no_mha_fastpath():
    """The fused nn.MultiheadAttention path hides every FLOP of the layer from counters."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None:
        yield
        return
    previous = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(previous)


def count_flops(model: Callable, *inputs, **kwargs) -> FlopCount:
    """Run ``model(*inputs, **kwargs)`` once without grad and count its FLOPs (2 × multiply-adds)."""
    counter = _Counter()
    _RUNNING.append(counter)
    try:
        with torch.no_grad(), _no_mha_fastpath(), counter, _SdpaAsAttention(counter):
            model(*inputs, **kwargs)
    finally:
        _RUNNING.remove(counter)
    return FlopCount(counter.total, counter.attention, dict(counter.by_op))


_RUNNING: list[_Counter] = []  # counts in progress, outermost first


def count_flops_aside(model: Callable, *inputs, **kwargs) -> FlopCount:
    """:func:`count_flops`, unseen by any count already running: for a side computation such as a cost
    model evaluated on meta tensors in the middle of a counted forward (``fallback=auto``)."""
    outer = [c for c in _RUNNING if not c.paused]
    for c in outer:
        c.paused = True
    try:
        return count_flops(model, *inputs, **kwargs)
    finally:
        for c in outer:
            c.paused = False


# ---------------------------------------------------------------------------------------------
# time


@dataclass
class Latency:
    """Seconds per call over ``repeats`` timed runs after warm-up: median, quartiles, extremes."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    repeats: int
    device: str
    times: tuple[float, ...] = ()  # every timed call, in order (rounds, for measure_interleaved)
    others_busy: float | None = None  # CPU cores other processes kept busy meanwhile (Linux), else None

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    def throughput(self, items: int) -> float:
        """Items per second at the median latency (images/s for a batch of ``items`` images)."""
        return items / self.median

    def as_dict(self) -> dict:
        return {"median_s": self.median, "q1_s": self.q1, "q3_s": self.q3, "min_s": self.min,
                "max_s": self.max, "repeats": self.repeats, "device": self.device, "times_s": list(self.times),
                "others_busy_cores": self.others_busy}


class OtherLoad:
    """How many CPU cores *other* processes kept busy while the block ran (Linux ``/proc/stat``).

    All cores' busy time minus this process's own CPU time, per second of wall time. A timing taken
    while another job ran is not comparable with one taken on a quiet machine, and this says which
    it was. ``cores`` is None where ``/proc/stat`` is missing or the block was too short to tell (< 0.2 s).
    """

    MIN_WALL_S = 0.2

    def __enter__(self) -> OtherLoad:
        self.cores: float | None = None
        self._start = self._sample()
        return self

    def __exit__(self, *exc) -> None:
        end = self._sample()
        if self._start is None or end is None:
            return
        wall, busy, own = (b - a for a, b in zip(self._start, end, strict=True))
        if wall >= self.MIN_WALL_S:
            self.cores = max(0.0, (busy - own) / wall)

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        ticks = os.sysconf("SC_CLK_TCK")
        own = os.times()
        return time.perf_counter(), (user + nice + system + irq + softirq + steal) / ticks, own.user + own.system


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one ``fn()`` takes: CUDA events on a GPU, ``perf_counter`` on CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _summary(times: list[float], device: torch.device, others_busy: float | None = None) -> Latency:
    if len(times) >= 4:
        q1, _, q3 = statistics.quantiles(times, n=4)
    else:
        q1, q3 = min(times), max(times)
    return Latency(statistics.median(times), q1, q3, min(times), max(times), len(times), str(device),
                   tuple(times), others_busy)


def measure_latency(
    fn: Callable[[], object],
    *,
    warmup: int = 2,
    repeats: int = 10,
    device: str | torch.device = "cpu",
    min_time: float = 0.0,
) -> Latency:
    """Time ``fn()``: ``warmup`` untimed calls, then at least ``repeats`` timed calls (and at least
    ``min_time`` seconds in all). CUDA events on a GPU, ``perf_counter`` on CPU."""
    device = torch.device(device)
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        _sync(device)
        times: list[float] = []
        started = time.perf_counter()
        while len(times) < repeats or time.perf_counter() - started < min_time:
            times.append(_timed_call(fn, device))
    return _summary(times, device)


def measure_interleaved(
    entries: Sequence[Callable[[], contextlib.AbstractContextManager[Callable[[], object]]]],
    *,
    warmup: int = 1,
    repeats: int = 5,
    device: str | torch.device = "cpu",
) -> list[Latency]:
    """Time several calls in alternating rounds, so a drift in machine load hits them all alike.

    Each entry is a context-manager factory that yields the call to time (e.g. a model patched with
    one variant); entering and leaving it is not timed. Every round enters each entry once and times
    one call, in reversed order every other round; the first round adds ``warmup`` untimed calls.
    Returns one ``Latency`` per entry, in order: their ratios are the fair speed comparison, and
    ``times[r]`` of two entries are round ``r``'s pair. Each also says how busy other processes kept
    the machine meanwhile (:class:`OtherLoad`).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"measure_interleaved: repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    device = torch.device(device)
    times: list[list[float]] = [[] for _ in entries]
    with torch.no_grad(), OtherLoad() as load:
        for round_ in range(repeats):
            order = range(len(entries)) if round_ % 2 == 0 else reversed(range(len(entries)))
            for i in order:
                with entries[i]() as fn:
                    for _ in range(warmup if round_ == 0 else 0):
                        fn()
                    _sync(device)
                    times[i].append(_timed_call(fn, device))
    return [_summary(t, device, load.cores) for t in times]


# ---------------------------------------------------------------------------------------------
# memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_free_heap() -> None:
    """Give memory the C allocator holds for reuse back to the OS (glibc), so the call's own need shows in RSS."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_high_water_mark() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _high_water_mark() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


class _RssSampler(threading.Thread):
    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = _rss_bytes()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, _rss_bytes())
            self._stop_event.wait(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, _rss_bytes())


def peak_memory(fn: Callable[[], object], *, device: str | torch.device = "cpu",
                interval: float = 0.001) -> int:
    """Bytes of memory ``fn()`` needed above what was in use before it: peak allocated device memory
    on CUDA; on CPU, the process's peak resident memory (Linux's VmHWM, reset before the call; where it
    cannot be reset, RSS sampled every ``interval`` s)."""
    device = torch.device(device)
    with torch.no_grad():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) - base
        if not os.path.exists("/proc/self/statm"):
            raise OSError("peak CPU memory needs /proc/self/statm (Linux)")
        _release_free_heap()
        base = _rss_bytes()
        if _reset_high_water_mark():  # exact: the kernel's own peak-RSS counter, reset for this call
            fn()
            return max(0, _high_water_mark() - base)
        sampler = _RssSampler(interval)
        sampler.start()
        try:
            fn()
        finally:
            peak = sampler.stop()
        return max(0, peak - base)

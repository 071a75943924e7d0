"""The thread policy of the variants' small-op stretches: one intra-op thread, restored afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run a stretch of small ops on one intra-op thread, then restore the thread count.

    A sequential loop of small ops (FPS's picks, the landmark solve) gains nothing from a second
    thread, and with another process busy on the machine each parallel region waits for a scheduler
    slice: 2-thread FPS at N = 4096 ran 4-10x slower under load than on one thread.
    """
    if torch.compiler.is_compiling():  # a compiled graph has its own threading; keep it traceable
        yield
        return
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

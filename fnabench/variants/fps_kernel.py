"""Farthest-point sampling's sequential loop as one compiled CPU call: the op ``torch.ops.fnabench.fps``.

The eager loop in landmarks.py spends most of its time in per-step op overhead (five to ten small ops per pick,
about 25 µs each). This op runs the same loop in C++: per row, each pick takes x·p in one BLAS matrix-vector
product, then one pass updates the running squared distance ``min(score, ‖x‖² − 2 x·p + ‖p‖²)`` of every
token, sets the pick's score to −inf and finds the first argmax;
guaranteed tokens come first and a row that runs out of candidates repeats its last pick — the eager rule,
step for step, so the landmark sets are the same (tests). Rows run in parallel.

It is built on first use with torch's C++ extension tools (a C++20 compiler and ninja), once per torch version,
into ``$FNABENCH_CACHE/ops/torch-<version>/`` (default ``~/.cache/fnabench``), and registered with
``torch.library``. Where it cannot be built, :func:`available` is False, a one-line warning says why, and FPS
runs eager. ``FNABENCH_FPS=eager`` turns the op off (benchmarks compare both).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from fnabench._io import cache_root

NAME = "fnabench_fps"
_SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <limits>
#include <vector>

// x [B, N, D] float32, candidate [B, N] bool, g_order [B, K] int64, g_count [B] int64, first [B] int64.
// Per pick: one BLAS matrix-vector product for x·p, then one pass that updates every token's running squared
// distance, sets the pick to -inf and finds the next pick (the first maximum, as torch.argmax takes it).
at::Tensor fps_cpu(const at::Tensor& x_in, const at::Tensor& candidate_in, const at::Tensor& g_order_in,
                   const at::Tensor& g_count_in, const at::Tensor& first_in, int64_t m) {
  TORCH_CHECK(x_in.dim() == 3 && x_in.scalar_type() == at::kFloat, "fps: x must be float32 [B, N, D]");
  auto x = x_in.contiguous();
  auto candidate = candidate_in.to(at::kBool).contiguous();
  auto g_order = g_order_in.to(at::kLong).contiguous();
  auto g_count = g_count_in.to(at::kLong).contiguous();
  auto first = first_in.to(at::kLong).contiguous();
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), K = g_order.size(1);
  auto out = at::empty({B, m}, x.options().dtype(at::kLong));
  auto sq_all = (x * x).sum(-1).contiguous();  // [B, N], as the eager loop's squared norms
  const bool* cp = candidate.data_ptr<bool>();
  const int64_t* gp = g_order.data_ptr<int64_t>();
  const int64_t* gc = g_count.data_ptr<int64_t>();
  const int64_t* fp = first.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  const float inf = std::numeric_limits<float>::infinity();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> score(N);
    auto dots = at::empty({N}, x.options());
    for (int64_t b = begin; b < end; ++b) {
      const at::Tensor xb = x[b];
      const float* sq = sq_all.data_ptr<float>() + b * N;
      const bool* cb = cp + b * N;
      int64_t n_cand = 0;
      for (int64_t i = 0; i < N; ++i) {
        score[i] = cb[i] ? inf : -inf;
        n_cand += cb[i];
      }
      const int64_t limit = gc[b] + n_cand;
      int64_t last = 0, best = 0;
      for (int64_t step = 0; step < m; ++step) {
        int64_t pick;
        if (step < gc[b]) pick = gp[b * K + std::min<int64_t>(step, K - 1)];
        else if (step < limit) pick = step == 0 ? fp[b] : best;
        else pick = last;
        op[b * m + step] = pick;
        last = pick;
        if (step + 1 >= m || step + 1 >= limit) continue;  // no next pick to choose: the rest repeat this one
        at::mv_out(dots, xb, xb[pick]);
        const float* dp = dots.data_ptr<float>();
        const float sp = sq[pick];
        float top = -inf;
        best = 0;
        for (int64_t i = 0; i < N; ++i) {
          float s = score[i];
          if (i == pick) s = -inf;
          else {
            const float dist = sq[i] - 2.f * dp[i] + sp;
            if (dist < s) s = dist;
          }
          score[i] = s;
          if (s > top) { top = s; best = i; }
        }
      }
    }
  });
  return out;
}

TORCH_LIBRARY(fnabench, lib) {
  lib.def("fps(Tensor x, Tensor candidate, Tensor g_order, Tensor g_count, Tensor first, int m) -> Tensor");
}
TORCH_LIBRARY_IMPL(fnabench, CPU, lib) {
  lib.impl("fps", &fps_cpu);
}
"""

_STATE: dict[str, object] = {}


def build_dir() -> Path:
    """Where the op is built and cached: one folder per torch version (its ABI)."""
    return cache_root() / "ops" / f"torch-{torch.__version__.replace('+', '-')}" / NAME


def available() -> bool:
    """Whether ``torch.ops.fnabench.fps`` can run here: built (or loaded from the cache) on the first call;
    False with a one-line warning where it cannot be built, or with ``FNABENCH_FPS=eager``."""
    if os.environ.get("FNABENCH_FPS", "auto") == "eager":
        return False
    if "ok" not in _STATE:
        _STATE["ok"] = _load()
    return bool(_STATE["ok"])


def _load() -> bool:
    if hasattr(torch.ops, "fnabench") and hasattr(torch.ops.fnabench, "fps"):
        return True
    try:
        from torch.utils import cpp_extension

        folder = build_dir()
        folder.mkdir(parents=True, exist_ok=True)
        source = folder / f"{NAME}.cpp"
        if not source.is_file() or source.read_text() != _SOURCE:
            source.write_text(_SOURCE)
        # ATen's headers want C++20 from torch 2.14 on; without torch/extension.h (no pybind) it builds in seconds
        cpp_extension.load(NAME, sources=[str(source)], extra_cflags=["-O3", "-std=c++20"],
                           build_directory=str(folder), is_python_module=False, verbose=False)
        return True
    except Exception as err:  # no compiler, no ninja, a read-only cache: eager FPS, said once
        warnings.warn(f"fnabench: the compiled farthest-point sampling op could not be built "
                      f"({type(err).__name__}: {' '.join(str(err).split())[:200]}); FPS runs eager", stacklevel=3)
        return False


def fps(x: torch.Tensor, candidate: torch.Tensor, g_order: torch.Tensor, g_count: torch.Tensor,
        first: torch.Tensor, m: int) -> torch.Tensor:
    """[B, m] picks of the compiled loop (see the module doc); inputs as ``landmarks._fps_row_masks`` makes them."""
    return torch.ops.fnabench.fps(x, candidate, g_order, g_count, first, m)

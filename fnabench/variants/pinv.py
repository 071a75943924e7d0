"""Pseudo-inverses of the landmark block A (or a solve against it), always in at least float32.

The truncated Newton–Schulz iteration is the official code's choice: with attention sinks A is
numerically singular, and 4–6 steps act as a regulariser where an exact pinv amplifies the
near-null directions (reference fna.md §5.2). ``ridge`` (fnabench's FNA default, chosen by measured
fidelity and counted FLOPs) regularises instead by shifting A: one LU
solve of (A + λI)·Ṽ = B·V + λ·V_S for the m×d right-hand side, no m×m inverse (about 2/3·m³ + 2·m²·d
FLOPs against Newton's 48·m³ for 6 steps), exact when every token is a landmark, for any λ.
"""

from __future__ import annotations

import torch


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything narrower is promoted to float32."""
    return torch.promote_types(dtype, torch.float32)


def newton_pinv(a: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """Nyströmformer's iterative Moore–Penrose inverse of [..., m, m], started at Aᵀ / max column sum."""
    a = a.to(work_dtype(a.dtype))
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    col_sum = a.abs().sum(dim=-2).amax(dim=-1)[..., None, None]  # per matrix
    z = a.transpose(-1, -2) / col_sum
    for _ in range(iters):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def exact_pinv(a: torch.Tensor, rcond: float | None = None) -> torch.Tensor:
    """``torch.linalg.pinv`` with relative cut-off ``rcond`` (None: torch's default, eps·m)."""
    a = a.to(work_dtype(a.dtype))
    if rcond is None:
        return torch.linalg.pinv(a)
    return torch.linalg.pinv(a, rtol=rcond)


def ridge_values(a: torch.Tensor, bv: torch.Tensor, v_land: torch.Tensor, ridge: float) -> torch.Tensor:
    """Ṽ solving (A + λI)·Ṽ = B·V + λ·V_S: fits A·Ṽ ≈ B·V while staying near the landmarks' own values."""
    wd = work_dtype(a.dtype)
    shifted = a.to(wd, copy=True)
    shifted.diagonal(dim1=-2, dim2=-1).add_(ridge)
    return solve_dominant(shifted, torch.add(bv.to(wd), v_land.to(wd), alpha=ridge))


def solve_dominant(mat: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """X with mat·X = rhs for batches of small, row-diagonally-dominant mat; row-major X.

    A + λI is row-diagonally dominant for λ ≥ 1 (A's rows are softmax rows: positive, summing to one),
    so its transpose is column-dominant and partial pivoting swaps no rows: mat = Uᵀ·Lᵀ from one LU of
    matᵀ, and X follows from two triangular solves. On CPU these run several times faster than
    ``torch.linalg.solve``, whose LAPACK solve with m right-hand sides dominated FNA at 224 px. Any
    other matrix (a pivot swapped, a zero pivot) gets ``torch.linalg.solve``. Counted FLOPs are the
    same: 2/3·m³ for the factorisation and m²·k per triangular solve.
    """
    if torch.compiler.is_compiling():  # the pivot check below reads data: under torch.compile, LAPACK's solve
        return torch.linalg.solve(mat, rhs).contiguous()
    lu, pivots, info = torch.linalg.lu_factor_ex(mat.mT)
    if mat.device.type != "meta":
        in_order = torch.arange(1, mat.shape[-1] + 1, dtype=pivots.dtype, device=pivots.device)
        if not bool(((pivots == in_order).all() & (info == 0).all()).item()):
            return torch.linalg.solve(mat, rhs).contiguous()
    # matᵀ = L·U, so mat·X = rhs is Xᵀ·L·U = rhsᵀ: solve Zᵀ·U = rhsᵀ, then Xᵀ·L = Zᵀ (L unit lower)
    zt = torch.linalg.solve_triangular(lu, rhs.mT, upper=True, left=False)
    xt = torch.linalg.solve_triangular(lu, zt, upper=False, left=False, unitriangular=True)
    # row-major, as the attention call that reads Ṽ over all N queries needs it (a column-major V made the
    # CPU SDPA 4.5x slower)
    return xt.mT.contiguous()


def pseudo_inverse(a: torch.Tensor, method: str, iters: int = 6, rcond: float | None = None) -> torch.Tensor:
    """Dispatch on ``method`` ('newton' or 'exact')."""
    if method == "newton":
        return newton_pinv(a, iters)
    if method == "exact":
        return exact_pinv(a, rcond)
    raise ValueError(f"unknown pinv method {method!r}; accepted: newton, exact")

"""Causal Nyström attention: FNA (and Nyströmformer) in decoders, where no output may see the future.

Each landmark i has a *position* p_i, the last token it depends on (its own token for FNA, the end of
its segment for segment means), sorted p_0 < p_1 < … . Per head, with s = 1/√d:

    A   = softmax(s·Q_S K_Sᵀ), landmark i sees landmark keys j with p_j ≤ p_i   (lower-triangular)
    BV  = softmax(s·Q_S Kᵀ)·V, landmark i sees the keys j ≤ p_i                (its causal row)
    Ṽ   = Z·BV,                Z a lower-triangular inverse of A
    out_t = one softmax over  {landmark keys k_i with p_i < t, values Ṽ_i}
                            ∪ {real keys k_j with p_last(t) < j ≤ t, values v_j}

where p_last(t) is the last landmark position before t. Why it is causal: row i of Ṽ depends on rows
≤ i of BV (Z is lower-triangular), hence only on tokens ≤ p_i < t; the real keys are ≤ t. The
inverse must stay lower-triangular: a Newton–Schulz start at Aᵀ (the bidirectional default) is
upper-triangular and would leak the future, so the iteration here starts at I (A's eigenvalues are
its diagonal, in (0, 1], so it converges). ``exact`` is a triangular solve, ``ridge`` a triangular
solve of A + λI: the exact inverse of a causal A is ill-conditioned (its diagonal holds each
landmark's attention to itself, small in a long prefix), and the ridge keeps Ṽ bounded.

With every token a landmark and the exact inverse, Ṽ = V and out is exact causal attention. The
same rule serves decoding with a landmark KV cache: a new token attends to the m landmark keys with
their Ṽ and to the real tokens after the last landmark (the prefill's tail and what was generated).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fnabench.variants.pinv import work_dtype

#: lower-triangular inverses of A accepted on causal attention
CAUSAL_INVERSES = ("ridge", "exact", "newton")


def stride_positions(n: int, m: int, *, guarantee: torch.Tensor | None = None,
                     exclude: torch.Tensor | None = None) -> torch.Tensor:
    """m landmark positions in [0, n) from the length alone (content never decides): causal-safe.

    Position 0 (the usual attention sink) and guaranteed positions (bool [n]) come first; the rest
    are spread evenly over the other candidates. Sorted, unique, int64 [min(m, n)].
    """
    m = max(1, min(m, n))
    forced = torch.zeros(n, dtype=torch.bool) if guarantee is None else guarantee.cpu().clone()
    forced[0] = True
    if int(forced.sum()) >= m:
        return torch.nonzero(forced).flatten()[:m]
    free = ~forced if exclude is None else ~forced & ~exclude.cpu()
    free_idx = torch.nonzero(free).flatten()
    want = min(m - int(forced.sum()), len(free_idx))
    if want:  # evenly spaced after position 0, the last candidate included
        step = (torch.arange(1, want + 1) * len(free_idx)) // want - 1  # strictly increasing
        forced[free_idx[step]] = True
    return torch.nonzero(forced).flatten()


def causal_order(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Selected indices [B, m] as causal FNA needs them: position 0 in, sorted, no repeats.

    Selectors pad short rows by repeating a pick; each repeat becomes the smallest unused position.
    """
    rows = []
    for row in idx.tolist():
        chosen = sorted(set(row) - {0})[: len(row) - 1]
        chosen = [0, *chosen]
        spare = (i for i in range(n) if i not in set(chosen))
        while len(chosen) < len(row):
            chosen.append(next(spare))
        rows.append(sorted(chosen))
    return torch.tensor(rows, dtype=torch.long, device=idx.device)


def landmark_values(a: torch.Tensor, bv: torch.Tensor, v_land: torch.Tensor, method: str, *,
                    ridge: float = 1.0, iters: int = 6) -> torch.Tensor:
    """Ṽ from the lower-triangular A [.., m, m], B·V and the landmarks' own values [.., m, d].

    ``ridge`` solves (A + λI)·Ṽ = B·V + λ·V_S: Ṽ fits A·Ṽ ≈ B·V while staying near the landmarks'
    own values instead of exploding. It is exact when every token is a landmark (A = P, B·V = P·V,
    V_S = V give Ṽ = V) and for one landmark, whatever λ.
    """
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    if method == "exact":  # (.contiguous(): LAPACK's column-major result slows the attention that reads it)
        return torch.linalg.solve_triangular(a, bv, upper=False).contiguous()
    if method == "ridge":
        return torch.linalg.solve_triangular(a + ridge * eye, bv + ridge * v_land, upper=False).contiguous()
    if method == "newton":
        z = eye.expand_as(a)
        for _ in range(iters):
            az = a @ z
            z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
        return z @ bv
    raise ValueError(f"unknown causal inverse {method!r}; accepted: {', '.join(CAUSAL_INVERSES)}")


def _groups(pos: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Query groups between landmark positions: group g holds tokens (p_{g-1}, p_g] (the last: to n-1).

    Returns (start [B, m+1], size [B, m+1], widest group W).
    """
    b = pos.shape[0]
    minus_one = torch.full((b, 1), -1, dtype=pos.dtype, device=pos.device)
    ends = torch.cat([pos, torch.full((b, 1), n - 1, dtype=pos.dtype, device=pos.device)], 1)
    starts = torch.cat([minus_one, pos], 1) + 1
    size = (ends - starts + 1).clamp(min=0)
    return starts, size, int(size.max())


def causal_nystrom_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_land: torch.Tensor,
    k_land: torch.Tensor,
    land_pos: torch.Tensor,
    v_land_of: Callable[[torch.Tensor], torch.Tensor],
    *,
    scale: float,
    inverse: str = "ridge",
    ridge: float = 1.0,
    iters: int = 6,
    key_masked: torch.Tensor | None = None,
    return_cache: bool = False,
):
    """Causal Nyström attention of [B, H, N, d] q, k, v with landmarks at sorted ``land_pos`` [B, m].

    ``v_land_of`` maps V to the landmarks' own values, as ``q_land``/``k_land`` came from Q and K
    (a gather for FNA, segment means for Nyströmformer); the ridge inverse shrinks Ṽ toward them.

    ``key_masked`` [B, N] removes tokens as keys (except for themselves). With ``return_cache`` also
    returns (k_land, Ṽ), what a landmark KV cache keeps.
    """
    bsz, heads, n, _ = q.shape
    wd = work_dtype(q.dtype)
    dev = q.device
    pos = land_pos.to(device=dev, dtype=torch.long)
    m = pos.shape[1]
    tokens = torch.arange(n, device=dev)
    kept = torch.ones(bsz, n, dtype=torch.bool, device=dev) if key_masked is None else ~key_masked.to(dev)

    qf, kf, vf = q.to(wd), k.to(wd), v.to(wd)
    ql, kl = q_land.to(wd), k_land.to(wd)
    # A: landmark i over landmark keys j with p_j <= p_i; B·V: landmark i over keys <= p_i
    a_mask = pos[:, None, :] <= pos[:, :, None]
    a_mask = a_mask & (kept.gather(1, pos)[:, None, :] | torch.eye(m, dtype=torch.bool, device=dev))
    a = torch.softmax(((ql @ kl.transpose(-1, -2)) * scale).masked_fill(~a_mask[:, None], float("-inf")), -1)
    own = tokens[None, None, :] == pos[:, :, None]
    b_mask = (tokens[None, None, :] <= pos[:, :, None]) & (kept[:, None, :] | own)
    b_logits = ((ql @ kf.transpose(-1, -2)) * scale).masked_fill(~b_mask[:, None], float("-inf"))
    bv = torch.softmax(b_logits, -1) @ vf
    v_land = v_land_of(vf)
    v_tilde = landmark_values(a, bv, v_land, inverse, ridge=ridge, iters=iters)

    # queries in groups between landmark positions; group g sees landmarks < g and its own tokens up to itself
    starts, size, width = _groups(pos, n)
    offs = torch.arange(width, device=dev)
    qpos = starts[:, :, None] + offs  # [B, G, W]
    valid = offs[None, None, :] < size[:, :, None]
    qpos_c = qpos.clamp(0, n - 1)
    groups = m + 1

    def seg(x: torch.Tensor) -> torch.Tensor:  # [B, H, N, d] → [B, H, G, W, d]
        flat = qpos_c.reshape(bsz, 1, groups * width, 1).expand(bsz, x.shape[1], groups * width, x.shape[-1])
        return x.gather(2, flat).reshape(bsz, x.shape[1], groups, width, x.shape[-1])

    qs, ks, vs = seg(qf), seg(kf), seg(vf)
    land_logits = (qs @ kl[:, :, None].transpose(-1, -2)) * scale  # [B, H, G, W, m]
    land_ok = torch.arange(m, device=dev)[None, :] < torch.arange(groups, device=dev)[:, None]  # [G, m]
    land_logits = land_logits.masked_fill(~land_ok[None, None, :, None, :], float("-inf"))
    kept_seg = kept.gather(1, qpos_c.reshape(bsz, -1)).reshape(bsz, groups, width)
    local_ok = (offs[None, :] <= offs[:, None])[None, None] & valid[:, :, None, :]  # [B, G, W, W]
    local_ok = local_ok & (kept_seg[:, :, None, :] | torch.eye(width, dtype=torch.bool, device=dev))
    local_logits = ((qs @ ks.transpose(-1, -2)) * scale).masked_fill(~local_ok[:, None], float("-inf"))
    weights = torch.softmax(torch.cat([land_logits, local_logits], -1), -1)
    out_seg = weights[..., :m] @ v_tilde[:, :, None] + weights[..., m:] @ vs  # [B, H, G, W, d]

    dv = v.shape[-1]  # the values' head size (it may differ from q/k's)
    out = torch.zeros(bsz, heads, n, dv, dtype=wd, device=dev)
    flat_pos = torch.where(valid, qpos_c, n).reshape(bsz, 1, -1, 1).expand(bsz, heads, groups * width, dv)
    out = torch.cat([out, out.new_zeros(bsz, heads, 1, dv)], 2)  # slot n collects padding
    out.scatter_(2, flat_pos, out_seg.reshape(bsz, heads, groups * width, dv))
    out = out[:, :, :n].to(v.dtype)
    if return_cache:
        return out, (k_land, v_tilde.to(v.dtype))
    return out


def causal_fna_attention(q, k, v, landmark_idx: torch.Tensor, *, scale: float | None = None,
                         inverse: str = "ridge", ridge: float = 1.0, iters: int = 6,
                         key_masked: torch.Tensor | None = None, return_cache: bool = False):
    """Causal FNA: the landmarks are real tokens at ``landmark_idx`` [B, m] (sorted, holding 0)."""
    s = q.shape[-1] ** -0.5 if scale is None else scale
    idx = landmark_idx.to(device=q.device, dtype=torch.long)
    b = q.shape[0]

    def gather(x):  # q/k and v may have different head sizes
        return x.gather(2, idx[:, None, :, None].expand(b, x.shape[1], idx.shape[1], x.shape[-1]))

    return causal_nystrom_core(q, k, v, gather(q), gather(k), idx, gather, scale=s, inverse=inverse, ridge=ridge,
                               iters=iters, key_masked=key_masked, return_cache=return_cache)


def causal_segment_attention(q, k, v, m: int, *, scale: float | None = None, inverse: str = "ridge",
                             ridge: float = 1.0, iters: int = 6):
    """Causal Nyströmformer: landmark i is the mean of segment i, positioned at the segment's last token."""
    b, _, n, d = q.shape
    s = d ** -0.5 if scale is None else scale
    m = min(m, n)
    bounds = torch.linspace(0, n, m + 1).round().long()
    ends = bounds[1:] - 1
    seg_id = torch.bucketize(torch.arange(n), bounds[1:] - 1, right=False)
    one_hot = torch.nn.functional.one_hot(seg_id, m).to(work_dtype(q.dtype)).to(q.device)  # [N, m]
    count = one_hot.sum(0)

    def means(x):
        return (one_hot.T @ x.to(one_hot.dtype)) / count[:, None]

    pos = ends.to(q.device)[None].expand(b, m)
    return causal_nystrom_core(q, k, v, means(q), means(k), pos, means, scale=s, inverse=inverse, ridge=ridge,
                               iters=iters)

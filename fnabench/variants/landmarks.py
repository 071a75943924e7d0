"""Landmark selection: which m real tokens FNA keeps as landmarks, chosen once per forward.

All selectors return int64 indices [B, m]: guaranteed tokens first (in index order), then the
selector's picks among tokens that are neither guaranteed nor excluded, padded by repeating the
last pick when too few candidates remain.
"""

from __future__ import annotations

import torch

from fnabench.variants import fps_kernel
from fnabench.variants.threads import single_thread


def _as_batch_mask(mask: torch.Tensor | None, batch: int, num_tokens: int, device) -> torch.Tensor:
    if mask is None:
        return torch.zeros(batch, num_tokens, dtype=torch.bool, device=device)
    mask = mask.to(device=device, dtype=torch.bool)
    return mask.expand(batch, num_tokens) if mask.dim() == 1 else mask


def _guaranteed_order(guarantee: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the guaranteed indices in index order ([B, k]) and how many each row has ([B])."""
    num_tokens = guarantee.shape[-1]
    k = max(1, min(m, num_tokens))
    rank = torch.arange(num_tokens, 0, -1, device=guarantee.device)  # earlier index, higher rank
    order = torch.topk(guarantee * rank, k, dim=-1).indices
    return order, guarantee.sum(-1).clamp(max=m)


def farthest_point_sampling(
    x: torch.Tensor,
    m: int,
    *,
    guarantee: torch.Tensor | None = None,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Deterministic FPS over [B, N, D] features, vectorised over the batch.

    Guaranteed tokens seed the set; with none, the first pick is the candidate farthest from the
    candidates' centroid. Each later pick maximises the distance to the set chosen so far, so
    outliers (high-norm sink/artifact tokens) enter early. Masks shared by every row (1-D, as specs
    give them) take a path whose guaranteed block and run-out are decided on the host: five small ops
    per pick instead of ten; per-row masks ([B, N]) decide them on the device. On the CPU the loop runs as one
    compiled call where it could be built (variants/fps_kernel.py). All pick the same tokens.
    """
    with single_thread():
        x = x.float()
        sq_norm = (x * x).sum(-1, keepdim=True)  # [B, N, 1]
        if x.device.type == "cpu" and m > 0 and fps_kernel.available():
            return _fps_compiled(x, sq_norm, m, guarantee, exclude)
        if _shared(guarantee) and _shared(exclude):
            return _fps_shared_masks(x, sq_norm, m, guarantee, exclude)
        return _fps_row_masks(x, sq_norm, m, guarantee, exclude)


def _shared(mask: torch.Tensor | None) -> bool:
    """A mask every row shares and the host can read (None, or 1-D on a real device)."""
    return mask is None or (mask.dim() == 1 and mask.device.type != "meta")


def _distance_update(x: torch.Tensor, sq_norm: torch.Tensor, score: torch.Tensor, pick: torch.Tensor) -> None:
    """score ← min(score, ‖x − x_pick‖²) in place, then the pick itself to −inf; ``pick`` is [B, 1]."""
    batch, _, dim = x.shape
    point = x.gather(1, pick[..., None].expand(batch, 1, dim))  # [B, 1, D]
    dist = torch.baddbmm(sq_norm, x, point.transpose(1, 2), alpha=-2).add_(sq_norm.gather(1, pick[..., None]))
    torch.minimum(score, dist, out=score)
    score.scatter_(1, pick[..., None], float("-inf"))


def _centre_pick(x: torch.Tensor, sq_norm: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """[B, 1]: the candidate farthest from the candidates' centroid (``candidate`` [B, N, 1] bool)."""
    centroid = (x * candidate).sum(1, keepdim=True) / candidate.sum(1, keepdim=True).clamp(min=1)  # [B, 1, D]
    dist = torch.baddbmm(sq_norm, x, centroid.transpose(1, 2), alpha=-2).add_((centroid * centroid).sum(-1, True))
    return dist.masked_fill(~candidate, float("-inf")).argmax(1)


def _fps_shared_masks(x, sq_norm, m: int, guarantee, exclude) -> torch.Tensor:
    batch, num_tokens, _ = x.shape
    none = torch.zeros(num_tokens, dtype=torch.bool)
    guarantee = none if guarantee is None else guarantee.to("cpu", torch.bool)
    exclude = (none if exclude is None else exclude.to("cpu", torch.bool)) & ~guarantee
    guaranteed = guarantee.nonzero().flatten().tolist()[:m]
    candidate = ~(guarantee | exclude)
    steps = min(m, len(guaranteed) + int(candidate.sum()))  # picks before the candidates run out
    score = torch.full_like(sq_norm, float("inf"))
    if not bool(candidate.all()):
        score[:, ~candidate.to(x.device)] = float("-inf")
    picks = []
    for step in range(steps):
        if step < len(guaranteed):
            pick = torch.full((batch, 1), guaranteed[step], dtype=torch.long, device=x.device)
        elif step == 0:
            pick = _centre_pick(x, sq_norm, candidate.to(x.device)[None, :, None].expand(batch, -1, -1))
        else:
            pick = score.argmax(1)
        picks.append(pick)
        if step + 1 < steps:
            _distance_update(x, sq_norm, score, pick)
    idx = torch.cat(picks, dim=1)
    return torch.cat([idx, idx[:, -1:].expand(batch, m - steps)], dim=1) if steps < m else idx


def _row_masks(x, m: int, guarantee, exclude) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: the guaranteed indices in order [B, k], how many [B], and the candidates [B, N] (neither
    guaranteed nor excluded)."""
    batch, num_tokens, _ = x.shape
    guarantee = _as_batch_mask(guarantee, batch, num_tokens, x.device)
    exclude = _as_batch_mask(exclude, batch, num_tokens, x.device) & ~guarantee
    return (*_guaranteed_order(guarantee, m), ~(guarantee | exclude))


def _fps_compiled(x, sq_norm, m: int, guarantee, exclude) -> torch.Tensor:
    """The row-mask rule below, its loop in ``torch.ops.fnabench.fps``: masks and the first pick made here."""
    batch = x.shape[0]
    g_order, g_count, candidate = _row_masks(x, m, guarantee, exclude)
    if bool((g_count == 0).any()):  # a row without guarantees starts at the candidate farthest from the centroid
        first = _centre_pick(x, sq_norm, candidate[..., None])[:, 0]
    else:
        first = torch.zeros(batch, dtype=torch.long, device=x.device)
    return fps_kernel.fps(x, candidate, g_order, g_count, first, m)


def _fps_row_masks(x, sq_norm, m: int, guarantee, exclude) -> torch.Tensor:
    batch = x.shape[0]
    g_order, g_count, candidate = _row_masks(x, m, guarantee, exclude)
    # one tensor is both the running min distance and the score: chosen and non-candidates sit at -inf
    # (a fixed number of steps, no data-dependent bounds: it also runs on meta tensors, for FLOP counts)
    first = _centre_pick(x, sq_norm, candidate[..., None])[:, 0]  # a row without guarantees starts here
    score = torch.full_like(sq_norm, float("inf")).masked_fill(~candidate[..., None], float("-inf"))
    limit = g_count + candidate.sum(1)  # steps before a row runs out of candidates
    last = torch.zeros(batch, dtype=torch.long, device=x.device)
    picks = []
    for step in range(m):
        best = first if step == 0 else score.argmax(1)[:, 0]
        g_pick = g_order[:, min(step, g_order.shape[1] - 1)]
        # a row inside its guaranteed block takes the next guaranteed index; one out of candidates repeats
        pick = torch.where(step < g_count, g_pick, torch.where(step < limit, best, last))
        picks.append(pick)
        last = pick
        if step + 1 < m:
            _distance_update(x, sq_norm, score, pick[:, None])
    return torch.stack(picks, dim=1)


def ranked_selection(
    score: torch.Tensor,
    m: int,
    *,
    guarantee: torch.Tensor | None = None,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Guaranteed tokens, then the highest-``score`` candidates ([B, N] scores), padded if short."""
    batch, num_tokens = score.shape
    guarantee = _as_batch_mask(guarantee, batch, num_tokens, score.device)
    exclude = _as_batch_mask(exclude, batch, num_tokens, score.device) & ~guarantee
    # guaranteed tokens outrank everything, earlier indices first; excluded tokens rank last
    rank = torch.arange(num_tokens, 0, -1, device=score.device, dtype=torch.float32)
    norm_score = score.float().clamp(-1e30, 1e30)
    key = torch.where(guarantee, 2e30 + rank, torch.where(exclude, torch.full_like(norm_score, -2e30), norm_score))
    k = min(m, num_tokens)
    top = torch.topk(key, k, dim=-1)
    valid = top.values > -1e30
    idx = top.indices
    # replace invalid (excluded) slots by the last valid pick of their row
    last_valid = (valid.long().cumsum(-1) - 1).clamp(min=0)
    pos = torch.where(valid, torch.arange(k, device=idx.device).expand_as(idx), last_valid)
    idx = idx.gather(1, pos)
    if k < m:
        idx = torch.cat([idx, idx[:, -1:].expand(batch, m - k)], dim=1)
    return idx


def random_selection(
    batch: int,
    num_tokens: int,
    m: int,
    *,
    seed: int,
    device,
    guarantee: torch.Tensor | None = None,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Uniformly random landmarks (the ablation), reproducible from ``seed``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    score = torch.rand(batch, num_tokens, generator=gen).to(device)
    return ranked_selection(score, m, guarantee=guarantee, exclude=exclude)


def norm_first_selection(
    x: torch.Tensor,
    norms: torch.Tensor,
    m: int,
    *,
    ratio: float,
    num_prefix: int,
    guarantee: torch.Tensor | None = None,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """High-norm tokens (norm ≥ ratio × per-image median) forced in, highest first, then FPS fills.

    This makes explicit what FPS does implicitly: massive/artifact tokens become landmarks.
    """
    batch, num_tokens, _ = x.shape
    guarantee = _as_batch_mask(guarantee, batch, num_tokens, x.device)
    exclude = _as_batch_mask(exclude, batch, num_tokens, x.device)
    outliers = high_norm_tokens(norms, ratio, num_prefix) & ~exclude
    forced = ranked_selection(norms.float().masked_fill(~outliers, float("-inf")), m, guarantee=guarantee,
                              exclude=~(outliers | guarantee))
    # forced rows hold guaranteed + outlier tokens first; FPS then fills the rest around them
    n_forced = (guarantee | outliers).sum(-1).clamp(max=m)
    slot = torch.arange(m, device=x.device)
    keep = torch.zeros(batch, num_tokens, dtype=torch.bool, device=x.device)
    keep.scatter_(1, forced, slot[None, :] < n_forced[:, None])
    fps = farthest_point_sampling(x, m, guarantee=keep, exclude=exclude)
    # FPS emits guaranteed tokens in index order; reorder so the forced ones keep norm order
    return torch.where(slot[None, :] < n_forced[:, None], forced, fps)


def high_norm_tokens(norms: torch.Tensor, ratio: float, num_prefix: int = 0) -> torch.Tensor:
    """Bool [B, N]: tokens whose norm is at least ``ratio`` × the median norm of the non-prefix tokens."""
    body = norms[:, num_prefix:] if norms.shape[1] > num_prefix else norms
    median = body.float().median(dim=-1, keepdim=True).values.clamp(min=torch.finfo(torch.float32).tiny)
    out = norms.float() / median >= ratio
    out[:, :num_prefix] = False
    return out

"""A linear head fitted on frozen features: multinomial logistic regression on standardised inputs (L-BFGS from
zeros, so deterministic); the ``linear:`` task's probe and the offline classifiers' head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LinearProbe:
    """A fitted multinomial logistic regression on standardised features."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor  # [D, C]
    bias: torch.Tensor  # [C]

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C] logits."""
        return ((x.double() - self.mean) / self.std) @ self.weight + self.bias


def fit_linear_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float = 1e-3,
                     max_iter: int = 100) -> LinearProbe:
    """Minimise mean cross-entropy + weight_decay/2 · ‖W‖² from zeros with L-BFGS (convex, so deterministic)."""
    x = x.double()
    mean, std = x.mean(dim=0), x.std(dim=0, correction=0).clamp(min=1e-6)  # as StandardScaler
    z = (x - mean) / std
    weight = torch.zeros(z.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-7,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ weight + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearProbe(mean, std, weight.detach(), bias.detach())

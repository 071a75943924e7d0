"""Figures: training dynamics (error vs training examples with IQR bands) and ICL accuracy vs checkpoint."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .config import ConfigError

DEFAULT_KS = ("1", "2", "3", "8")


def _pyplot():
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise ConfigError("plotting needs matplotlib: pip install 'fnabench[recall]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_dynamics(runs: Sequence[tuple[str, dict]], out: str | Path, ks: Sequence[str] | None = None,
                  title: str | None = None) -> Path:
    """One column per run, linear (top) and log (bottom) y: median error at k after the final open label vs
    training examples, IQR band, the zero-predictor level, and dotted lines at the k=1 / k=2 emergence points."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(runs), figsize=(4.2 * len(runs) + 0.6, 6.4), squeeze=False, sharex="col")
    colors = plt.get_cmap("viridis")
    for col, (label, summary) in enumerate(runs):
        available = list(summary["model"]["final"])
        chosen = [k for k in (ks or DEFAULT_KS) if k in available] or available
        if ks is None and "8" not in available and available[-1] not in chosen:
            chosen.append(available[-1])  # the latest k evaluated stands in for k = 8
        x = summary["examples"]
        zero = summary["zero"]["final"][available[0]]["median"]
        for row, scale in enumerate(("linear", "log")):
            ax = axes[row][col]
            for i, k in enumerate(chosen):
                curve = summary["model"]["final"][k]
                color = colors(i / max(1, len(chosen) - 1) * 0.9)
                ax.plot(x, curve["median"], color=color, label=f"k={k} after final", lw=1.6)
                ax.fill_between(x, curve["q25"], curve["q75"], color=color, alpha=0.2, lw=0)
            ax.axhline(zero, color="black", ls="--", lw=1, label="zero predictor")
            for k, style in (("1", ":"), ("2", "-.")):
                point = summary.get("emergence", {}).get(k, {}).get("examples")
                if point is not None:
                    ax.axvline(point, color="grey", ls=style, lw=1, label=f"k={k} emerges")
            ax.set_yscale(scale)
            if scale == "linear":
                ax.set_ylim(0, 1.4 * zero)  # the untrained model's larger errors are clipped here, not on the log axis
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(label, fontsize=10)
            else:
                ax.set_xlabel("training examples")
            if col == 0:
                ax.set_ylabel(f"median squared error ({scale})")
    axes[0][0].legend(fontsize=7, loc="upper right")
    fig.suptitle(title or f"{runs[0][1]['task']}: error k observations after the query's open label\n"
                 "(median over examples, IQR band)", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def plot_icl(rows: Sequence[dict], out: str | Path, title: str = "ICL: first vs second target token") -> Path:
    """Greedy top-1 accuracy on the first and (given the true first) second target token vs checkpoint step."""
    plt = _pyplot()
    rows = sorted(rows, key=lambda r: r["step"])
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(steps, [r["first_accuracy"] for r in rows], "o-", label="first token")
    ax.plot(steps, [r["second_accuracy"] for r in rows], "s-", label="second token (true first given)")
    ax.set_xlabel("checkpoint step")
    ax.set_ylabel("top-1 accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out

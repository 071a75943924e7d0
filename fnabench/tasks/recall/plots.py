"""Figures: training dynamics (error vs training examples with IQR bands), every run's k = 1 / k = 2 curves on
one plot, ICL accuracy vs checkpoint, circuits and patching."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fnabench.tasks.recall.metrics import emergence_point
from fnabench.tasks.recall.run_config import ConfigError

DEFAULT_KS = ("1", "2", "3", "8")


def _pyplot():
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise ConfigError("plotting needs matplotlib: pip install 'fnabench[recall]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out: str | Path) -> Path:
    """Lay out, write ``out`` (its folder made) at 130 dpi and close the figure."""
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


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
                found = summary.get("emergence", {}).get(k)
                point = emergence_point(found) if found else None
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
    return _save(plt, fig, out)


def plot_emergence(runs: Sequence[tuple[str, dict]], out: str | Path, title: str | None = None) -> Path:
    """Every run on one plot: the median error at k = 1 (solid) and k = 2 (dashed) after the query's open label
    vs training examples, one colour per run (a marker where it emerges), with the zero predictor's error and the
    emergence threshold (``eval.emergence_fraction`` × the zero predictor's) as horizontal lines; log y. ``runs``:
    (label, evaluation summary with its curve over checkpoints)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.4, 4.6))
    colors = plt.get_cmap("tab10")
    zeros, thresholds, handles = [], [], []
    for i, (label, summary) in enumerate(runs):
        color = colors(i % 10)
        handles.append(plt.Line2D([], [], color=color, lw=2, label=label))
        x = summary["examples"]
        for k, style, marker in (("1", "-", "o"), ("2", "--", "^")):
            if k not in summary["model"]["final"]:
                continue
            y = summary["model"]["final"][k]["median"]
            ax.plot(x, y, color=color, ls=style, lw=1.5)
            zeros.append(summary["zero"]["final"][k]["median"])
            found = summary.get("emergence", {}).get(k)
            if found:
                thresholds.append((found["threshold"], found["threshold"] / zeros[-1]))
                point = emergence_point(found)
                if point is not None and point in x:
                    ax.plot([point], [y[x.index(point)]], marker=marker, color=color, ms=6, ls="none")
    handles += [plt.Line2D([], [], color="grey", ls="-", marker="o", label="k = 1 (recall)"),
                plt.Line2D([], [], color="grey", ls="--", marker="^", label="k = 2 (continuation)")]
    for values, style, name in ((zeros, "-", "zero predictor"),
                                ([t for t, _ in thresholds], ":", "emergence threshold")):
        levels = sorted({float(f"{v:.3g}") for v in values})
        if not levels:
            continue
        if name == "emergence threshold":
            fractions = sorted({float(f"{f:.3g}") for _, f in thresholds})
            name += f" ({' / '.join(f'{f:g}' for f in fractions)} × zero predictor)"
        shown = f"{levels[0]:.3g}" if len(levels) == 1 else f"{levels[0]:.3g}–{levels[-1]:.3g}"
        for level in levels:
            ax.axhline(level, color="black", ls=style, lw=1.1)
        handles.append(plt.Line2D([], [], color="black", ls=style, lw=1.1, label=f"{name}: {shown}"))
    ax.set_yscale("log")
    ax.set_xlabel("training examples")
    ax.set_ylabel("median squared error")
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    task = runs[0][1].get("task", "recall") if runs else "recall"
    ax.set_title(title or f"{task}: k = 1 (solid) and k = 2 (dashed) after the query's open label, every run\n"
                 "(median over examples; markers where each emerges)", fontsize=9)
    return _save(plt, fig, out)


def plot_icl(rows: Sequence[dict], out: str | Path, title: str = "ICL: first vs second target token") -> Path:
    """Greedy top-1 accuracy on the first and (given the true first) second target token vs training tokens
    (vs checkpoint step when a checkpoint's tokens are unknown)."""
    plt = _pyplot()
    by_tokens = all(r.get("tokens") is not None for r in rows)
    rows = sorted(rows, key=lambda r: (r["tokens"], r["step"]) if by_tokens else r["step"])
    x = [r["tokens"] if by_tokens else r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(x, [r["first_accuracy"] for r in rows], "o-", label="first token")
    ax.plot(x, [r["second_accuracy"] for r in rows], "s-", label="second token (true first given)")
    ax.set_xlabel("training tokens" if by_tokens else "checkpoint step")
    ax.set_ylabel("top-1 accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(plt, fig, out)


_PORT = {"q": (-0.22, "tab:blue"), "k": (0.0, "tab:green"), "v": (0.22, "tab:red")}


def _node_xy(name: str, n_layer: int, n_head: int) -> tuple[float, float]:
    """Where a writer (or a reader's writer) sits: embedding left, per layer a column of heads then the MLP,
    the read-out right."""
    middle = (n_head - 1) / 2
    if name == "emb":
        return 0.0, middle
    if name == "out":
        return 2.0 * n_layer + 1, middle
    if name.startswith("m"):
        return 2.0 + 2 * int(name[1:]), middle
    layer, head = name[1:].split(".h")
    return 1.0 + 2 * int(layer), float(head.split(".")[0])


def plot_circuits(panels: Sequence[Sequence[tuple[str, dict]]], out: str | Path) -> Path:
    """A grid of circuits, one row per sequence of (title, circuit dict from
    :func:`fnabench.tasks.recall.prune.find_circuit`): heads by layer and head index, MLPs between layers; each
    kept edge drawn from its writer to its reader (queries blue, keys green, values red, MLP and read-out
    inputs black); nodes with a kept edge filled."""
    plt = _pyplot()
    cols = max(len(row) for row in panels)
    fig, axes = plt.subplots(len(panels), cols, figsize=(5.2 * cols, 3.6 * len(panels) + 0.4), squeeze=False)
    cells = [(axes[i][j], panel) for i, row in enumerate(panels) for j, panel in enumerate(row)]
    for i, row in enumerate(panels):
        for j in range(len(row), cols):
            axes[i][j].axis("off")
    for ax, (title, circuit) in cells:
        n_layer, n_head = circuit["graph"]["n_layer"], circuit["graph"]["n_head"]
        used: set[str] = {"emb", "out"}
        for writer, reader in circuit["edges"]:
            x0, y0 = _node_xy(writer, n_layer, n_head)
            x1, y1 = _node_xy(reader, n_layer, n_head)
            kind = reader.rsplit(".", 1)[-1] if reader.startswith("a") else ""
            offset, color = _PORT.get(kind, (0.0, "black"))
            ax.annotate("", xy=(x1 - 0.12, y1 + offset), xytext=(x0 + 0.12, y0),
                        arrowprops={"arrowstyle": "-", "color": color, "alpha": 0.55, "lw": 0.9,
                                    "connectionstyle": "arc3,rad=0.12", "shrinkA": 0, "shrinkB": 0})
            used.add(writer)
            used.add(reader.rsplit(".", 1)[0] if kind else reader)
        nodes = ["emb", "out"] + [f"a{layer}.h{h}" for layer in range(n_layer) for h in range(n_head)]
        nodes += [f"m{layer}" for layer in range(n_layer)]
        for name in nodes:
            x, y = _node_xy(name, n_layer, n_head)
            on = name in used
            ax.scatter([x], [y], s=260 if name in ("emb", "out") else 170, zorder=3,
                       color="gold" if on and name.startswith("m") else ("lightsteelblue" if on else "white"),
                       edgecolors="black" if on else "lightgrey", linewidths=1.0)
            label = {"emb": "emb", "out": "out"}.get(name) or (name.upper() if name.startswith("m")
                                                              else "h" + name.split(".h")[1])
            ax.text(x, y, label, ha="center", va="center", fontsize=6, zorder=4,
                    color="black" if on else "grey")
        ax.set_xticks([1.0 + 2 * layer for layer in range(n_layer)], [f"layer {layer}" for layer in range(n_layer)],
                      fontsize=8)
        ax.set_yticks([])
        ax.set_xlim(-0.6, 2 * n_layer + 1.6)
        ax.set_ylim(-0.8, n_head - 0.2)
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
        ax.set_title(title, fontsize=9)
    handles = [plt.Line2D([], [], color=c, label=f"{k} input") for k, (_, c) in _PORT.items()]
    handles.append(plt.Line2D([], [], color="black", label="MLP / read-out input"))
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.4 / (3.6 * len(panels) + 0.4), 1, 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def plot_patching(rows_by_swap: dict[str, list[dict]], out: str | Path, title: str = "") -> Path:
    """Token-swap activation patching per layer: median squared error of the k = 1 and k = 2 predictions against
    the needle's, the other system's and the donor's states."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(rows_by_swap), figsize=(5.0 * len(rows_by_swap), 3.8), squeeze=False)
    colors = {"needle": "tab:blue", "other": "tab:orange", "donor": "tab:green"}
    for ax, (swap, rows) in zip(axes[0], rows_by_swap.items(), strict=True):
        layers = [r for r in rows if r["layer"].startswith("l")]
        x = [int(r["layer"][1:]) for r in layers]
        for key in (k for k in layers[0] if k != "layer"):
            k, whose = key.split("_")
            ax.plot(x, [r[key] for r in layers], color=colors[whose], ls="-" if k == "k1" else ":", marker="o", ms=3,
                    label=f"k={k[1]} vs {whose}")
        ax.set_xticks(x, [str(i) if i < len(x) - 1 else f"{i}\n(read-out)" for i in x], fontsize=8)
        ax.set_xlabel("layer whose input is patched")
        ax.set_ylabel("median squared error")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.set_title(f"{swap} position patched from the donor", fontsize=9)
    axes[0][0].legend(fontsize=7, ncol=2)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(plt, fig, out)

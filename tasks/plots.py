"""The learning-curve plot logged with each run.

Plots are drawn on a `matplotlib.figure.Figure` of their own, never through pyplot: pyplot keeps a
process-wide list of figures and needs a backend chosen for the whole process, and fitflow runs
inside the user's own Python (a notebook's inline backend must stay as it is)."""

from __future__ import annotations

from pathlib import Path


def plot_learning_curves(history: dict[str, list[float]], path: str | Path) -> Path:
    """One panel per metric, train and validation side by side; returns the PNG's path."""
    from matplotlib.figure import Figure

    names = sorted({key.split("_", 1)[1] for key in history if key.startswith(("train_", "val_"))},
                   key=lambda name: (name != "loss", name))
    fig = Figure(figsize=(4 * len(names), 3.2))
    axes = fig.subplots(1, len(names), squeeze=False)
    for ax, name in zip(axes[0], names):
        for split in ("train", "val"):
            values = history.get(f"{split}_{name}")
            if values:
                ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=split)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)  # PNG through the Agg renderer, whatever backend the process has
    return path

"""The plots an image run logs beside its learning curves: where the model confuses classes, and
which validation images it gets wrong.

Multi-label runs have no confusion matrix (a row may hold any number of classes, so there is
no single true and predicted class to cross); they log `label_scores.png` instead: per class,
precision, recall and F1 on the validation split at the 0.5 threshold, and how many images hold
the class. Their misclassified images are those whose predicted label set differs from the true one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tasks.images_prepare import ImagesPrepared
from tasks.labels import SEPARATOR, THRESHOLD
from tasks.training import predict_outputs

MISCLASSIFIED_SHOWN = 25  # a 5 x 5 grid: enough to see a pattern, small enough to read


def validation_plots(model: torch.nn.Module, prepared: ImagesPrepared, folder: Path) -> list[Path]:
    """confusion_matrix.png (multilabel: label_scores.png) and misclassified.png of the validation
    split (the images, not a sample)."""
    p = prepared.preprocessor
    paths, truth = prepared.val.paths, prepared.val.targets.numpy()
    outputs = np.concatenate([predict_outputs(model, p.load_images(paths[i : i + 256])).numpy()
                              for i in range(0, len(paths), 256)])
    multilabel = p.task == "multilabel"
    # multilabel: a class is predicted where its sigmoid reaches the threshold, i.e. its logit reaches logit(threshold)
    predicted = outputs >= np.log(THRESHOLD / (1 - THRESHOLD)) if multilabel else outputs.argmax(1)
    truth = truth.astype(bool) if multilabel else truth
    wrong = np.flatnonzero((predicted != truth).any(axis=1) if multilabel else predicted != truth)
    if len(wrong) > MISCLASSIFIED_SHOWN:  # spread over the split (it is in class order), not the first class only
        wrong = wrong[np.linspace(0, len(wrong) - 1, MISCLASSIFIED_SHOWN).astype(int)]
    shown = p.load_images([paths[i] for i in wrong]) if len(wrong) else torch.empty(0)
    mean, std = torch.tensor(p.mean).view(1, -1, 1, 1), torch.tensor(p.std).view(1, -1, 1, 1)
    pixels = (shown * std + mean).clamp(0, 1) if len(wrong) else shown  # back from the normalisation, to look at
    def name(label) -> str:  # a class index, or a multi-label row of booleans
        return (SEPARATOR.join(np.asarray(p.classes)[label]) or "(none)") if multilabel else p.classes[label]

    titles = [f"{name(truth[i])} -> {name(predicted[i])}" for i in wrong]
    scores = (plot_label_scores(truth, predicted, p.classes, folder / "label_scores.png") if multilabel
              else plot_confusion_matrix(truth, predicted, p.classes, folder / "confusion_matrix.png"))
    return [scores, plot_image_grid(pixels, titles, folder / "misclassified.png")]


def plot_label_scores(truth: np.ndarray, predicted: np.ndarray, classes: list[str], path: Path) -> Path:
    """Multi-label: precision, recall and F1 per class (bars), with the count of true images per class."""
    hits = (truth & predicted).sum(axis=0)
    precision = hits / np.maximum(predicted.sum(axis=0), 1)
    recall = hits / np.maximum(truth.sum(axis=0), 1)
    f1 = 2 * hits / np.maximum(truth.sum(axis=0) + predicted.sum(axis=0), 1)
    k = len(classes)
    fig = _figure((min(0.6 * k + 4, 16), 4.5))
    ax = fig.subplots()
    for offset, (label, values) in zip((-0.27, 0, 0.27), (("precision", precision), ("recall", recall), ("F1", f1))):
        ax.bar(np.arange(k) + offset, values, width=0.27, label=label)
    ax.set_xticks(range(k), [f"{c} ({n} true)" for c, n in zip(classes, truth.sum(axis=0))], rotation=90 if k > 6 else 0)
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower right")
    ax.set_title(f"validation: {int((truth == predicted).all(axis=1).sum())} of {len(truth)} label sets right")
    return _save(fig, path)


def plot_confusion_matrix(truth: np.ndarray, predicted: np.ndarray, classes: list[str], path: Path) -> Path:
    """Counts of (true class, predicted class), true classes as rows."""
    k = len(classes)
    counts = np.bincount(truth * k + predicted, minlength=k * k).reshape(k, k)
    size = min(0.5 * k + 2, 14)
    fig = _figure((size, size))
    ax = fig.subplots()
    ax.imshow(counts, cmap="Blues")
    if k <= 30:  # beyond that the numbers overlap; the colours still show the pattern
        for (row, col), count in np.ndenumerate(counts):
            ax.text(col, row, str(count), ha="center", va="center", fontsize=8,
                    color="white" if count > counts.max() / 2 else "black")
        ax.set_xticks(range(k), classes, rotation=90)
        ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"validation: {int(np.trace(counts))} of {len(truth)} right")
    return _save(fig, path)


def plot_image_grid(pixels: torch.Tensor, titles: list[str], path: Path) -> Path:
    """Images (N, C, H, W) in [0, 1] with a title each; an empty grid says there was nothing to show."""
    columns = 5
    rows = max(1, -(-len(titles) // columns))
    fig = _figure((2 * columns, 2.2 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, pixels, titles):
        array = image.permute(1, 2, 0).numpy()
        ax.imshow(array[..., 0] if array.shape[2] == 1 else array, cmap="gray" if array.shape[2] == 1 else None)
        ax.set_title(title, fontsize=8)
    if not titles:
        axes[0, 0].text(0, 0.5, "no misclassified validation images", fontsize=10)
    return _save(fig, path)


def _figure(size: tuple[float, float]):
    from matplotlib.figure import Figure  # not pyplot: see tasks/plots.py

    return Figure(figsize=size)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path

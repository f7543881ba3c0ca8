"""The plots fitflow logs are PNG files drawn without touching the process's matplotlib state: fitflow
runs inside the user's own Python (the API in a notebook), whose backend and pyplot figures are theirs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DRAW_EVERY_PLOT = """
import json, sys
import matplotlib
matplotlib.use("svg")  # the user's choice, made before fitflow runs
import matplotlib.pyplot as plt
mine = plt.figure()  # and a figure of the user's own, open
import numpy as np, pandas as pd, torch
from tasks.image_plots import plot_confusion_matrix, plot_image_grid, plot_label_scores
from tasks.plots import plot_learning_curves
from tasks.sweep_report import plot_metric_by_param

out = sys.argv[1]
truth, predicted = np.array([0, 1, 2, 1]), np.array([0, 2, 2, 1])
files = [
    plot_learning_curves({"train_loss": [1.0, 0.5], "val_loss": [1.1, 0.6], "val_accuracy": [0.5, 0.8]}, out + "/curves.png"),
    plot_confusion_matrix(truth, predicted, ["a", "b", "c"], out + "/confusion.png"),
    plot_label_scores(np.eye(3, dtype=bool), np.eye(3, dtype=bool), ["a", "b", "c"], out + "/labels.png"),
    plot_image_grid(torch.rand(2, 3, 8, 8), ["a -> b", "b -> c"], out + "/grid.png"),
    plot_image_grid(torch.empty(0), [], out + "/empty_grid.png"),
    plot_metric_by_param(pd.DataFrame({"lr": [0.01, 0.1], "val_loss": [0.3, 0.2], "state": ["complete", "pruned"]}),
                         {"lr": {"low": 0.01, "high": 0.1, "log": True}}, "val_loss", out + "/sweep.png"),
]
print(json.dumps({"backend": matplotlib.get_backend(), "pyplot_figures": plt.get_fignums(),
                  "mine": mine.number, "files": [str(f) for f in files]}))
"""


def test_plots_are_pngs_and_leave_the_users_backend_and_figures_alone(tmp_path):
    done = subprocess.run([sys.executable, "-c", DRAW_EVERY_PLOT, str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["backend"] == "svg", "a plot switched the process's matplotlib backend"
    assert seen["pyplot_figures"] == [seen["mine"]], "a plot left a figure in pyplot's list, or closed the user's"
    assert len(seen["files"]) == 6
    for file in map(Path, seen["files"]):
        assert file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{file.name} is not a PNG"

"""fitflow's Python API: Keras' compile + fit over the flow's engine, tracked in MLflow.

    import fitflow
    trainer = fitflow.compile(model, optimizer="adamw", loss="cross_entropy", experiment="demo")
    history = trainer.fit((x, y), validation_data=(x_val, y_val), epochs=20, batch_size=128,
                          callbacks=[fitflow.callbacks.EarlyStopping(patience=5)])
    trainer.evaluate((x_test, y_test)); trainer.predict(x_new); trainer.log_model(name="demo")

    fitflow.train(TrainConfig(...))   # the config's entry: the `train` flow

`import fitflow` is light: torch, Prefect and MLflow load on first use of `compile`, `train`,
`Trainer`, `History` or `callbacks`, after the environment is set up as every entry point sets it.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

__all__ = ["History", "Trainer", "callbacks", "compile", "train"]
_LAZY = {"compile": "fitflow.trainer", "Trainer": "fitflow.trainer", "History": "tasks.training", "train": "flows.train",
         "callbacks": "fitflow"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'fitflow' has no attribute {name!r}")
    if "prefect" not in sys.modules:  # Prefect reads its settings once, at import: set them first
        from flows.environment import configure_environment

        configure_environment()
    if name == "callbacks":  # a submodule: importing it binds it here
        return importlib.import_module("fitflow.callbacks")
    return getattr(importlib.import_module(_LAZY[name]), name)

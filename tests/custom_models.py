"""User-style nn.Modules, named by import path in tests (`custom_models:TinyNet`)."""

import os

import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, in_features: int, out_features: int, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features, width), nn.Tanh(), nn.Linear(width, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class NaNAfterFirstStep(nn.Module):
    """Healthy for the shape check and the first step, then returns NaN: a diverging model."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.linear(x)
        return out * float("nan") if self.training and self.calls > 2 else out


class CrashOnceNet(nn.Module):
    """A user's model whose device fails once: the `crash_at`-th training step raises, unless
    `marker` exists (it is created at the crash), so a retried task runs through."""

    def __init__(self, in_features: int, out_features: int, crash_at: int, marker: str, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Dropout(0.2), nn.Linear(width, out_features))
        self.crash_at, self.marker, self.steps = crash_at, marker, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.steps += 1
            if self.steps == self.crash_at and not os.path.exists(self.marker):
                open(self.marker, "w").close()
                raise RuntimeError("simulated device failure")
        return self.body(x)


class CrashOnceCNN(CrashOnceNet):
    """CrashOnceNet for images: a small conv net sized by in_shape/num_outputs, as fitflow's own
    image models are."""

    def __init__(self, in_shape: tuple, num_outputs: int, crash_at: int, marker: str) -> None:
        nn.Module.__init__(self)
        self.body = nn.Sequential(nn.Conv2d(in_shape[0], 8, 3, padding=1), nn.ReLU(), nn.Dropout(0.2),
                                  nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, num_outputs))
        self.crash_at, self.marker, self.steps = crash_at, marker, 0


class HoldAtEpochs(nn.Module):
    """A linear model that holds training at the start of given epochs until the test releases it.

    At the first training step of epoch e in `epochs` it creates `folder/reached-e` and waits for
    `folder/release-e`: a test acts at a known point of training (after epoch e - 1 ended and was
    journaled) however fast or slow the machine is. An epoch starts at the first training-mode
    call after one in eval mode (the output check before training, each validation pass).
    """

    def __init__(self, in_features: int, out_features: int, folder: str, epochs: list[int], wait_s: float = 300) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.folder, self.hold_at, self.wait_s = folder, set(epochs), wait_s
        self.epoch, self.was_training = 0, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._count_epochs()
        return self.linear(x)

    def _count_epochs(self) -> None:
        if self.training and not self.was_training:
            self.epoch += 1
            if self.epoch in self.hold_at:
                self._hold(self.epoch)
        self.was_training = self.training

    def _hold(self, epoch: int) -> None:
        import time
        from pathlib import Path

        folder = Path(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"reached-{epoch}").touch()
        deadline = time.monotonic() + self.wait_s  # only a guard against a test that never releases
        while not (folder / f"release-{epoch}").exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"held at epoch {epoch} for {self.wait_s} s: nothing released it")
            time.sleep(0.02)


class HoldAtEpochsCNN(HoldAtEpochs):
    """HoldAtEpochs for images: a small conv net sized by in_shape/num_outputs."""

    def __init__(self, in_shape: tuple, num_outputs: int, folder: str, epochs: list[int], wait_s: float = 300) -> None:
        nn.Module.__init__(self)
        self.body = nn.Sequential(nn.Conv2d(in_shape[0], 8, 3, padding=1), nn.ReLU(), nn.Dropout(0.2),
                                  nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, num_outputs))
        self.folder, self.hold_at, self.wait_s = folder, set(epochs), wait_s
        self.epoch, self.was_training = 0, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._count_epochs()
        return self.body(x)


def wait_until_held(process, folder, epoch: int) -> None:
    """Wait until a `fitflow train` process running HoldAtEpochs is held at `epoch` (fail if it exits)."""
    import time
    from pathlib import Path

    deadline = time.monotonic() + 300  # only a guard against a hang
    while not (Path(folder) / f"reached-{epoch}").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read().decode()[-3000:]
        time.sleep(0.01)

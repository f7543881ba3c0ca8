"""Which code a run ran: the git commit of this checkout and whether it had uncommitted changes.

Tags on the run: `mlflow.source.git.commit` (MLflow's own tag: the UI shows it as the run's
source version) and `fitflow.git.dirty` ("true" when tracked files differ from the commit or
untracked files are present: the commit alone does not say what ran). A checkout that is not a
git repository (an image built without `.git`), or a machine without git, gets no tags.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tasks.checkout import REPO


def code_version_tags(checkout: Path = REPO) -> dict[str, str]:
    """Asked at every run: a long-lived `fitflow serve` or worker sees the checkout change (tens of ms)."""
    git = shutil.which("git")
    if git is None:
        return {}
    try:
        commit = subprocess.run([git, "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True, timeout=30)
        if commit.returncode != 0:
            return {}
        status = subprocess.run([git, "status", "--porcelain"], cwd=checkout, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    tags = {"mlflow.source.git.commit": commit.stdout.strip()}
    if status.returncode == 0:
        tags["fitflow.git.dirty"] = "true" if status.stdout.strip() else "false"
    return tags

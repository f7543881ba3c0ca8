"""docs/reliability.md cannot drift from the tests it reports.

Checked: every test the page names exists; every test of the fault and input files is named
there; each count in its inputs table equals what the test tries (hypothesis' max_examples, or
the number of parametrized cases); the total is their sum.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "reliability.md"
# Files whose every test is a fault injection or a bad-input test: each must have its row.
FAULT_FILES = ["test_resume.py", "test_checkpoints.py", "test_tracking_outage.py", "test_concurrency.py",
               "test_security.py", "test_properties.py", "test_model_loading.py",
               "test_table_input.py", "test_metrics_journal.py"]
REFERENCE = re.compile(r"`tests/(test_\w+\.py)::(test_\w+)`")


def _tests_in(file: str) -> set[str]:
    tree = ast.parse((REPO / "tests" / file).read_text(encoding="utf-8"))
    return {node.name for node in tree.body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_")}


def _section(title: str) -> str:
    text = PAGE.read_text(encoding="utf-8")
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def test_every_named_test_exists():
    references = REFERENCE.findall(PAGE.read_text(encoding="utf-8"))
    assert len(references) > 30
    missing = [f"{file}::{name}" for file, name in references if name not in _tests_in(file)]
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"


def test_every_fault_and_input_test_is_on_the_page():
    named = set(REFERENCE.findall(PAGE.read_text(encoding="utf-8")))
    unlisted = [f"{file}::{name}" for file in FAULT_FILES for name in sorted(_tests_in(file)) if (file, name) not in named]
    assert not unlisted, f"add these tests to docs/reliability.md: {unlisted}"


def _inputs_tried(file: str, name: str) -> int:
    test = getattr(importlib.import_module(file.removesuffix(".py")), name)
    settings = getattr(test, "_hypothesis_internal_use_settings", None)
    if settings is not None:
        return settings.max_examples
    cases = [mark.args[1] for mark in getattr(test, "pytestmark", []) if mark.name == "parametrize"]
    assert cases, f"{file}::{name} is neither a hypothesis nor a parametrized test: its count cannot be checked"
    return len(cases[0])


def test_input_counts_are_what_the_tests_try():
    rows = re.findall(r"^\| [^|]+ \| (\d+) \| [^|]+ \| `tests/(test_\w+\.py)::(test_\w+)` \|$",
                      _section("Bad inputs tried"), re.MULTILINE)
    assert len(rows) >= 8
    for count, file, name in rows:
        assert int(count) == _inputs_tried(file, name), f"{file}::{name}: the page says {count}"
    total = sum(int(count) for count, _, _ in rows)
    generated = sum(int(count) for count, file, _ in rows if file == "test_properties.py")
    assert f"Total per CI run: **{total}** bad or random inputs ({generated} generated, {total - generated} hand-written)" \
        in " ".join(_section("Bad inputs tried").split())

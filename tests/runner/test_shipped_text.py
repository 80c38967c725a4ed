"""The demo's evaluation text ships with it (assets/demo/eval/), so its table is the same on every machine. It
must be held out: no long line and no window of it may appear in the text the demo trained on (the stdlib's
train split, dsquant.runner.data), checked here against the train split of the Python running the tests."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

from dsquant.runner.data import SHIPPED_DIR, shipped_text, stdlib_files, stdlib_text

ABOUT = json.loads((SHIPPED_DIR / "texts.json").read_text())
LONG_LINE = 50  # characters, stripped: shorter lines are idioms every module repeats (`except (OSError, ...):`)
WINDOW = 96  # characters


@pytest.fixture(scope="module")
def train():
    files = stdlib_files("train")
    if not files:
        pytest.skip("this Python has no stdlib source to compare with")
    text = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
    return text, {line.strip() for line in text.splitlines()}


def test_the_shipped_texts_are_small_and_what_texts_json_says():
    held, info = shipped_text("heldout")
    calib, _ = shipped_text("calibration")
    for part in ("heldout", "calibration"):
        assert (SHIPPED_DIR / ABOUT[part]["file"]).stat().st_size < 256_000
    assert info["files"] == len(ABOUT["heldout"]["files"]) and info["chars"] == len(held) > 32_768
    assert len(calib) == 32_768  # the slice texts.json describes
    with pytest.raises(ValueError, match="split must be"):
        shipped_text("train")


def test_the_listed_files_are_held_out_by_the_path_rule():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    present = [f for f in ABOUT["heldout"]["files"] if (stdlib / f).is_file()]
    if not present:
        pytest.skip("none of the held-out files exists in this stdlib")
    held, train = set(stdlib_files("heldout")), set(stdlib_files("train"))
    for f in present:
        assert stdlib / f in held and stdlib / f not in train, f


def _duplicated_lines(text: str, train_lines: set[str]) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if len(ln.strip()) >= LONG_LINE and ln.strip() in train_lines]


def test_no_held_out_line_or_window_appears_in_the_training_text(train):
    text, lines = train
    held, _ = shipped_text("heldout")
    assert not (dup := _duplicated_lines(held, lines)), dup[:3]
    windows = [held[i : i + WINDOW] for i in range(0, len(held) - WINDOW, WINDOW)]  # back to back
    assert not (dup := [w for w in windows if w in text]), dup[:3]


def test_the_whole_held_out_split_has_near_duplicates_that_the_check_finds(train):
    """Why the shipped text is a selection: the raw split holds copies of training text (the code-page tables
    encodings/cp437.py, cp862.py, cp863.py against the other cp*.py; modules renamed between versions)."""
    _, lines = train
    raw, _ = stdlib_text("heldout")
    if not raw:
        pytest.skip("this Python has no stdlib source")
    assert len(_duplicated_lines(raw, lines)) > 100

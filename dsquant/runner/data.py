"""Evaluation and demo-training text: the Python standard library's own source, read at run time.

Every machine with Python has it, so the demo model trains and evaluates with no download. Files are
the stdlib's `*.py` (sorted by relative path, tests, site-packages and caches excluded); a file is
held out for evaluation when the first byte of sha1(relative path) is < 16 (about 1 in 16 files), a
rule that depends only on the path, so the split is the same on every machine and Python version
(the files themselves differ between versions: the protocol records the version and file count).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import sysconfig
from pathlib import Path

# Control characters other than whitespace (\t \n \v \f \r). Text, logs with colour escapes included, has
# almost none; binary data that happens to be valid UTF-8 (bytes below 0x80) is over a fifth of them.
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")
CONTROL_LIMIT = 0.1
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}


def stdlib_files(split: str = "heldout") -> list[Path]:
    """Sorted stdlib source files of one split ("train" or "heldout")."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if _EXCLUDED_DIRS & set(Path(rel).parts[:-1]):
            continue
        held = hashlib.sha1(rel.encode()).digest()[0] < 16
        if held == (split == "heldout"):
            out.append(p)
    return out


def stdlib_text(split: str = "heldout") -> tuple[str, dict]:
    """The split's files concatenated (each preceded by a newline-free header-less join) and a description."""
    files = stdlib_files(split)
    text = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
    info = {
        "source": f"python{sys.version_info.major}.{sys.version_info.minor} stdlib ({split} split)",
        "files": len(files),
        "chars": len(text),
    }
    return text, info


def read_user_text(path: str | Path, option: str) -> str:
    """The text of a file given on the command line (`option` names it: --text-file, --calibrate).

    Refuses, with a ValueError naming the option and file, what would be scored or calibrated on as if it were
    text: a missing file, bytes that are not UTF-8, a file that is empty or mostly control characters.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{option} {p}: no such text file")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{option} {p}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); give a "
                         f"UTF-8 text file") from None
    if not text.strip():
        raise ValueError(f"{option} {p}: the file is empty")
    control = len(_CONTROL.findall(text))
    if control > CONTROL_LIMIT * len(text):
        raise ValueError(f"{option} {p}: {100 * control / len(text):.0f}% of its characters are control "
                         f"characters, so it is binary data, not text; give a UTF-8 text file")
    return text
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "assets" / "demo" / "eval"


def shipped_text(split: str = "heldout") -> tuple[str, dict]:
    """The demo's own text (assets/demo/eval/, described in texts.json): "heldout" files for evaluation or the
    "calibration" slice of the train split, from the Python the demo trained on. The same bytes on every machine,
    so the demo's table does not depend on the local Python."""
    about = json.loads((SHIPPED_DIR / "texts.json").read_text())
    if split not in ("heldout", "calibration"):
        raise ValueError(f"split must be 'heldout' or 'calibration', got {split!r}")
    part = about[split]
    text = (SHIPPED_DIR / part["file"]).read_text(encoding="utf-8")
    info = {"source": f"python{about['python']} stdlib ({split} text shipped with dsquant)", "chars": len(text)}
    if "files" in part:
        info["files"] = len(part["files"])
    return text, info

"""read_user_text: what --text-file and --calibrate accept as text, and what they refuse."""

from __future__ import annotations

import pytest

from dsquant.runner.data import read_user_text


@pytest.mark.parametrize("data,text", [
    ("plain text\n".encode(), "plain text\n"),
    ("\ufeffwith a byte-order mark: é\n".encode(), "with a byte-order mark: é\n"),  # as Windows editors save
    (b"\x1b[31mred\x1b[0m log line\tcolumns\r\n" * 20, "\x1b[31mred\x1b[0m log line\tcolumns\r\n" * 20),
], ids=["plain", "bom", "ansi-log"])
def test_text_is_read_exactly(tmp_path, data, text):
    (tmp_path / "t.txt").write_bytes(data)
    assert read_user_text(tmp_path / "t.txt", "--text-file") == text


@pytest.mark.parametrize("data,message", [
    ("café".encode("latin-1"), "--opt {path}: not UTF-8 text (byte 0xe9 at offset 3)"),
    (b"\x00\x01text\x02\x03", "--opt {path}: 50% of its characters are control characters"),
    (b" \n\t", "--opt {path}: the file is empty"),
], ids=["latin-1", "control", "blank"])
def test_what_is_not_text_is_refused_naming_the_file(tmp_path, data, message):
    path = tmp_path / "t.txt"
    path.write_bytes(data)
    with pytest.raises(ValueError, match="^" + message.format(path=path).replace("(", r"\(").replace(")", r"\)")):
        read_user_text(path, "--opt")

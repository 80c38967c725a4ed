"""Tokenizers for eval/generate: the checkpoint's own tokenizer.json through the `tokenizers` library.

The demo model uses a byte-level tokenizer whose ids are the byte values 0..255, plus <|bos|> = 256
and <|eos|> = 257, built here with `tokenizers` so the shipped tokenizer.json is a standard one.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel

BOS, EOS = "<|bos|>", "<|eos|>"


def build_byte_tokenizer() -> Tokenizer:
    """Byte-level tokenizer: id == byte value for 0..255, then <|bos|> 256 and <|eos|> 257."""
    alphabet = ByteLevel.alphabet()  # the 256 printable stand-ins GPT-2 byte-level BPE uses
    byte_to_char = _bytes_to_unicode()
    assert set(byte_to_char.values()) == set(alphabet)
    vocab = {byte_to_char[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS])
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the ByteLevel pre-tokenizer's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def load_tokenizer(checkpoint: str | Path, override: str | Path | None = None) -> Tokenizer:
    """The tokenizer at `override` (a tokenizer.json or a directory holding one), else the checkpoint's.

    Raises ValueError naming the path when there is none.
    """
    path = Path(override) if override else Path(checkpoint)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        where = f"--tokenizer {override}" if override else f"checkpoint {checkpoint}"
        raise ValueError(
            f"{where}: no tokenizer.json found; pass --tokenizer PATH (a tokenizer.json or a directory with one)"
        )
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise ValueError(f"{file}: not a valid tokenizer.json ({e})") from None

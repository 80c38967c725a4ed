"""The DeepSeek-V4 runner's KV cache: what attention needs from earlier positions, so a decode step runs one token.

Per layer (LayerCache), in the activation dtype:
    window      the last window_size - 1 keys (K = V, normed and rotated) [B, <W, hd]: all a query at the next
                position reads of the raw keys
    compressor  (HCA and CSA layers) the compressed entries so far [B, T, hd] plus the projected rows (wkv, wgate)
                of the open window; CSA also keeps the last closed window's rows, whose first-half channels the
                next entry pools (attention.py, Compressor)
    indexer     (CSA layers) the same for the indexer's own compressor: its keys [B, T, c]
Entries and indexer keys grow by one per `ratio` tokens: on V4-Flash (head_dim 512, ratios 4 / 128, window 128)
a layer holds about (128 + S / ratio) * 512 values per sequence, against S * 512 for the whole sequence.
A cache continues from where it stopped (start_pos = the tokens it holds) or restarts at start_pos 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class CompressorState:
    """A Compressor's progress: entries [B, T, width], the open window's projected rows kv / gate [B, r < ratio,
    out] and, with overlapping windows, the last closed window's (kv, gate) [B, ratio, out]."""

    entries: torch.Tensor | None = None
    kv: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    prev: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class LayerCache:
    window: torch.Tensor | None = None  # [B, <W, hd]
    compressor: CompressorState = field(default_factory=CompressorState)
    indexer: CompressorState = field(default_factory=CompressorState)


class V4Cache:
    """The per-layer caches of one batch of sequences and the number of positions they hold."""

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.length = 0
        self.layers = [LayerCache() for _ in range(n_layers)]

    def advance(self, start_pos: int, n: int) -> None:
        """Take n tokens at start_pos: the next ones (start_pos == length) or a new sequence (start_pos 0)."""
        if start_pos == 0:
            self.layers = [LayerCache() for _ in range(self.n_layers)]
        elif start_pos != self.length:
            raise ValueError(f"positions from {start_pos} asked of a cache holding {self.length}: the V4 cache "
                             "continues where it stopped or restarts at 0")  # fmt: skip
        self.length = start_pos + n

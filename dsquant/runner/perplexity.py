"""Perplexity, KL divergence and top-1 agreement: the arithmetic of `dsquant eval`.

Protocol (printed with every result): the text is tokenized once; with the checkpoint's BOS id, one
BOS is prepended to the whole stream (GPTQ style, not one per window). The stream is cut into
floor(n / seq_len) non-overlapping windows of seq_len tokens (a shorter tail is dropped; --max-tokens
caps n first). In each window, position i predicts token i + 1, so seq_len - 1 tokens are scored per
window. Token-level perplexity = exp(sum of NLL / number of scored tokens), summed in float64 and
divided once (nanochat's loss_eval). Against a base model on the same windows:
    KLD   = mean over scored positions of KL(p_base || p_quant) = sum_v p_b (log p_b - log p_q)
    top-1 = fraction of scored positions where both models' argmax token agrees
    delta = (ppl_quant - ppl_base) / ppl_base, in percent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def make_windows(ids: list[int] | torch.Tensor, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids -> int64 [W, seq_len] non-overlapping windows (ValueError when not even one fits)."""
    if seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2 (one token predicts the next), got {seq_len}")
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    n = ids.numel() if max_tokens is None else min(ids.numel(), max_tokens)
    w = n // seq_len
    if w == 0:
        raise ValueError(
            f"the text has {n} tokens{' after --max-tokens' if max_tokens is not None else ''}, "
            f"fewer than one window of --seq-len {seq_len}"
        )
    return ids[: w * seq_len].view(w, seq_len)


def token_nll(logits: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """logits [W, S, V], windows [W, S] -> float64 NLL [W, S - 1] of tokens 1..S-1."""
    logp = logits[:, :-1].double().log_softmax(dim=-1)
    return -logp.gather(-1, windows[:, 1:, None].to(logits.device)).squeeze(-1)


def kl_top1(base_logits: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per scored position: KL(base || quant) float64 [W, S - 1] and argmax agreement bool [W, S - 1]."""
    lb = base_logits[:, :-1].double().log_softmax(dim=-1)
    lq = logits[:, :-1].double().log_softmax(dim=-1).to(lb.device)
    kl = (lb.exp() * (lb - lq)).sum(dim=-1)
    return kl, lb.argmax(dim=-1) == lq.argmax(dim=-1)


@dataclass
class Accumulator:
    """Sums over windows; every figure is divided once at the end."""

    nll_sum: float = 0.0
    tokens: int = 0
    base_nll_sum: float = 0.0
    kld_sum: float = 0.0
    top1_hits: int = 0

    def add(self, logits: torch.Tensor, windows: torch.Tensor, base_logits: torch.Tensor | None = None) -> None:
        nll = token_nll(logits, windows)
        self.nll_sum += float(nll.sum())
        self.tokens += nll.numel()
        if base_logits is not None:
            self.base_nll_sum += float(token_nll(base_logits, windows).sum())
            kl, agree = kl_top1(base_logits, logits)
            self.kld_sum += float(kl.sum())
            self.top1_hits += int(agree.sum())

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.tokens)

    @property
    def base_ppl(self) -> float:
        return math.exp(self.base_nll_sum / self.tokens)

    def comparison(self) -> dict:
        return {
            "delta_ppl_pct": 100.0 * (self.ppl - self.base_ppl) / self.base_ppl,
            "kld": self.kld_sum / self.tokens,
            "top1": self.top1_hits / self.tokens,
        }

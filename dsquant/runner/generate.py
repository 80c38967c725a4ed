"""Text generation with the runner: prefill the prompt into the model's cache, then decode token by token.

The cache is the family's (dsquant.runner.family.new_cache): V3's paged latent cache, V4's window and
compressed entries.

Greedy at temperature 0; otherwise softmax(logits / temperature) sampled with top-k / top-p (the sample
kernel on CUDA, its reference on CPU) from a seeded generator, so a given seed reproduces the text.
On CUDA with DeepSeek's 512 + 64 latent, each decode step runs the MLA decode kernel over the cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from dsquant.progress import Progress
from dsquant.runner.family import new_cache


@dataclass
class Generation:
    token_ids: list[int]
    prompt_tokens: int
    prefill_s: float
    decode_s: float

    @property
    def decode_tok_per_s(self) -> float:
        n = len(self.token_ids) - 1  # the first new token comes from the prefill
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


@torch.no_grad()
def generate(
    model: torch.nn.Module, prompt_ids: list[int], *, max_new_tokens: int = 64, temperature: float = 0.0,
    top_p: float = 1.0, top_k: int = 0, kv_cache: str = "bf16", eos_id: int | list | None = None, seed: int = 0,
    device: str = "cpu", context: tuple[int, str] | None = None, progress: bool = False,
) -> Generation:  # fmt: skip
    """prompt ids -> the new token ids (stops after max_new_tokens or at an EOS id).

    context: (the model's context length, where it comes from), checked against prompt + max_new_tokens before
    anything runs. progress: tokens/s and time left on stderr while decoding."""
    if not prompt_ids:
        raise ValueError("the prompt is empty (no tokens to condition on)")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    if context is not None and len(prompt_ids) + max_new_tokens > context[0]:
        room = context[0] - len(prompt_ids)
        fix = f"use --max-new-tokens {room} or less" if room > 0 else "shorten the prompt"
        raise ValueError(
            f"the prompt ({len(prompt_ids)} tokens) plus --max-new-tokens {max_new_tokens} exceeds the "
            f"model's context, {context[0]} tokens ({context[1]}); {fix}"
        )
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top-p <= 1, got {temperature} and {top_p}")
    eos = set(eos_id if isinstance(eos_id, list) else [] if eos_id is None else [eos_id])
    cache = new_cache(model, 1, len(prompt_ids) + max_new_tokens, kv_cache, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    params = (torch.tensor([top_k], dtype=torch.int32, device=device),
              torch.tensor([top_p], dtype=torch.float32, device=device))  # fmt: skip
    bar = Progress("generate", max_new_tokens, enabled=progress, every=1.0)
    t0 = time.perf_counter()
    logits = model(torch.tensor([prompt_ids], device=device), 0, cache)[:, -1]
    out: list[int] = []
    pos = len(prompt_ids)
    t1 = None
    while True:
        if temperature == 0:
            nxt = logits.argmax(dim=-1)
        else:
            probs = (logits / temperature).softmax(dim=-1)
            u = torch.rand(1, generator=gen, device=device)
            nxt = model.ops.sample(probs, *params, u)
        out.append(int(nxt))
        bar.update()
        if t1 is None:
            _sync(device)
            t1 = time.perf_counter()
        if len(out) >= max_new_tokens or out[-1] in eos:
            break
        logits = model(nxt.view(1, 1), pos, cache)[:, -1]
        pos += 1
    _sync(device)
    bar.close()
    return Generation(out, len(prompt_ids), t1 - t0, time.perf_counter() - t1)


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()

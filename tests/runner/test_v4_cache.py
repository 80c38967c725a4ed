"""The DeepSeek-V4 KV cache (dsquant.runner.v4.cache): a prefill, a chunk and single decode steps give the logits of
the uncached forward of the same prefix, and `generate` the tokens of greedy decoding on the whole sequence, in
float32 on CPU, on a model with every layer type (sliding window only, CSA with the indexer, HCA), a window shorter
than the prompt and entries closing during the decode (CSA every 4 positions, HCA at position 127)."""

from __future__ import annotations

import pytest
import torch

from dsquant.runner.family import new_cache
from dsquant.runner.generate import generate
from dsquant.runner.v4.demo_model import DEMO_V4_CONFIG, trainable_model

# the demo's layers [0, 4, 128, 4] (sliding, CSA, HCA, CSA), window 8, top-3 entries per query. 16 indexer heads:
# with the demo's 2, many scores are exactly 0 (ReLU), and which of those tied entries topk keeps depends on how
# many entries the row has (as in transformers and the official model), so an earlier position's choice would
# change with the length of the sequence; over 16 heads a score is 0 too rarely to reach the top 3
CONFIG = dict(DEMO_V4_CONFIG, sliding_window=8, index_topk=3, index_n_heads=16)


@pytest.fixture(scope="module")
def model():
    return trainable_model(CONFIG, seed=1).eval()


def test_v4_cached_steps_give_the_uncached_logits(model):
    tokens = torch.randint(0, CONFIG["vocab_size"], (2, 133), generator=torch.Generator().manual_seed(3))
    cache = new_cache(model, 2, tokens.shape[1])
    steps = [(0, 119), (119, 122)] + [(i, i + 1) for i in range(122, tokens.shape[1])]
    with torch.no_grad():
        whole = model(tokens)
        for a, b in steps:
            torch.testing.assert_close(model(tokens[:, a:b], a, cache), model(tokens[:, :b])[:, a:],
                                       msg=lambda m, a=a, b=b: f"positions {a}..{b - 1}: {m}")  # fmt: skip
        # a query's logits do not depend on the tokens after it (what the cache relies on)
        torch.testing.assert_close(whole[:, :119], model(tokens[:, :119]))
    assert cache.length == tokens.shape[1]
    with pytest.raises(ValueError, match="continues where it stopped"):
        model(tokens[:, :1], 5, cache)


def test_v4_generate_with_the_cache_is_greedy_on_the_whole_sequence(model):
    prompt = torch.randint(0, CONFIG["vocab_size"], (124,), generator=torch.Generator().manual_seed(4)).tolist()
    out = generate(model, prompt, max_new_tokens=6, eos_id=None)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out.token_ids == ids[len(prompt) :]

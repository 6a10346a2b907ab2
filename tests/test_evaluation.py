"""Streaming perplexity on a tiny model built from a config."""
import math
import threading

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from analysis.evaluation import EvaluationError, perplexity, perplexity_stream


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def windows(n=5, seqlen=16):
    return torch.randint(0, 97, (n, seqlen), generator=torch.Generator().manual_seed(1))


def test_stream_yields_every_window_and_matches_the_model_loss(tiny):
    w = windows()
    ups = list(perplexity_stream(tiny, w))
    assert [u.windows_done for u in ups] == [1, 2, 3, 4, 5]
    assert all(u.windows_total == 5 for u in ups)
    assert [u.tokens for u in ups] == [15, 30, 45, 60, 75]
    with torch.no_grad():
        losses = [tiny(input_ids=w[i: i + 1], labels=w[i: i + 1]).loss.item() for i in range(5)]
    assert ups[-1].ppl == pytest.approx(math.exp(sum(losses) / 5), rel=1e-5)
    assert ups[0].ppl == pytest.approx(math.exp(losses[0]), rel=1e-5)
    assert perplexity(tiny, w) == pytest.approx(ups[-1].ppl)


def test_batched_windows_give_the_same_perplexity(tiny):
    w = windows()
    ups = list(perplexity_stream(tiny, w, batch_size=2))
    assert [u.windows_done for u in ups] == [2, 4, 5]
    assert [u.tokens for u in ups] == [30, 60, 75]
    assert ups[-1].ppl == pytest.approx(perplexity(tiny, w, batch_size=1), rel=1e-5)
    with pytest.raises(EvaluationError, match="batch_size"):
        list(perplexity_stream(tiny, w, batch_size=0))
    with pytest.raises(EvaluationError, match=r"got shape \(16,\)"):
        perplexity(tiny, w[0])


def test_stream_stops_early_with_event_or_callable(tiny):
    stop = threading.Event()
    done = []
    for u in perplexity_stream(tiny, windows(), stop=stop):
        done.append(u.windows_done)
        if u.windows_done == 2:
            stop.set()
    assert done == [1, 2]
    n = []
    ups = list(perplexity_stream(tiny, windows(), stop=lambda: len(n) >= 3 or n.append(1)))
    assert len(ups) == 3


def test_bad_windows_raise(tiny):
    with pytest.raises(ValueError, match="non-empty"):
        list(perplexity_stream(tiny, torch.zeros(0, 16, dtype=torch.long)))

"""Shared fixtures: the real packaged default model, loaded once per test session."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2"


@pytest.fixture(scope="session")
def default_model():
    from analysis.loading import load_model

    return load_model("default", device="cpu")


@pytest.fixture(scope="session")
def wikitext_dir():
    if not (WIKITEXT / "test.txt").exists():
        pytest.skip("WikiText-2 not found beside the checkout (../shared/data/wikitext-2)")
    return WIKITEXT


def cancel_when(job, text: str, then=None) -> None:
    """Make a running `job` cancel itself at the first progress message containing `text` (calling
    `then()` first, if given): a cancel at a known point of a prune."""
    report = job.report

    def on_report(msg, frac=None):
        report(msg, frac)
        if text in msg:
            if then is not None:
                then()
            job.cancel()
    job.report = on_report


def word_tokenizer(words: int = 119):
    """A word-level tokenizer: "w0" .. "w{words - 1}" are token ids 0 .. words - 1, then <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({f"w{i}": i for i in range(words)} | {"<unk>": words}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>")


def save_tiny_llama(path: Path, seed: int = 0) -> Path:
    """A 3-block LLaMA with random weights (drawn with `seed`) and a word-level tokenizer, saved as a local
    checkpoint folder (what a user's own model directory looks like)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=120)
    LlamaForCausalLM(cfg).save_pretrained(path)
    word_tokenizer(119).save_pretrained(path)
    return path


def tiny_sweep_base(folder: Path):
    """Base settings of a sweep on a tiny LLaMA saved in `folder`, calibrated and evaluated on a text
    of its own words (disjoint halves of one file); by path, so Ray workers load it themselves."""
    import random

    from analysis.settings import CalibrationSettings, EvaluationSettings, ModelSettings, RunSettings

    model = save_tiny_llama(folder / "tiny")
    rng = random.Random(0)
    text = folder / "text.txt"
    text.write_text("\n".join(" ".join(f"w{rng.randrange(119)}" for _ in range(20)) for _ in range(200)))
    return RunSettings(model=ModelSettings(str(model)), calibration=CalibrationSettings(str(text), 4, 32),
                       evaluation=EvaluationSettings(str(text), 32, 6))

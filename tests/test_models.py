"""Model resolution, loading and matrix discovery on real (small, locally built) models."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_llama

from analysis.layers import find_layers, prunable_layers
from analysis.loading import ModelLoadError, load_model, package_version, resolve_source


def test_default_model_is_real_smollm2(default_model):
    info = default_model.info
    assert info.architecture == "LlamaForCausalLM"
    assert info.n_blocks == 30
    assert 130e6 < info.n_params < 140e6
    assert "4-bit" in info.quantization
    layers = prunable_layers(default_model.model)
    assert len(layers) == 30 * 7
    assert [r.kind for r in layers[:7]] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    # a pretrained model predicts a sensible continuation: " Paris" is its top token
    tok, model = default_model.tokenizer, default_model.model
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        nxt = model(ids).logits[0, -1].argmax().item()
    assert tok.decode([nxt]).strip() == "Paris"


def test_second_load_reads_the_converted_cache(default_model):
    """The fixture already converted the GGUF once; a second load reads the safetensors folder and
    does not convert again (load time is measured in bench/, not asserted here)."""
    folder = Path(default_model.info.path)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    # another package version's weights (and the unversioned folder of older alphascope versions) are stale: gone
    stale = [folder.parent / "smollm2", folder.parent / "smollm2-0.0.1"]
    for old in stale:
        old.mkdir(exist_ok=True)
        (old / "model.safetensors").write_bytes(b"old weights")
    again = load_model("default")
    assert Path(again.info.path) == folder and folder.parent.name == "converted"
    assert folder.name == f"smollm2-{package_version('smollm2')}" and not any(old.exists() for old in stale)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_local_folder_roundtrip(tmp_path):
    save_tiny_llama(tmp_path)
    lm = load_model(str(tmp_path), device="cpu")
    assert lm.info.n_blocks == 3
    assert len(prunable_layers(lm.model)) == 21


@pytest.mark.parametrize(
    "build, n_blocks, kinds",
    [
        ("gpt2", 2, ["c_attn", "c_proj", "c_fc", "c_proj"]),
        ("opt", 2, ["k_proj", "v_proj", "q_proj", "out_proj", "fc1", "fc2"]),
        ("llama", 2, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ],
)
def test_discovery_on_small_models(build, n_blocks, kinds):
    import transformers as tf

    if build == "gpt2":
        cfg = tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0)
        m = tf.GPT2LMHeadModel(cfg)
    elif build == "opt":
        m = tf.OPTForCausalLM(tf.OPTConfig(num_hidden_layers=2, hidden_size=32, ffn_dim=64, num_attention_heads=2,
                                           vocab_size=50, word_embed_proj_dim=32))
    else:
        m = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=2, vocab_size=50))
    layers = find_layers(m)
    pr = [r for r in layers if r.prunable]
    assert len(pr) == n_blocks * len(kinds)
    assert [r.kind for r in pr if r.block == 0] == kinds
    for r in pr:
        w = r.weight()
        assert tuple(w.shape) == (r.rows, r.cols)
        assert w.data_ptr() == r.module.weight.data_ptr()  # a view, so pruning it edits the model
    assert any(r.kind == "embed_tokens" and not r.prunable for r in layers)
    if build == "gpt2":  # Conv1D stores (in, out); we expose (out, in)
        c_fc = next(r for r in pr if r.kind == "c_fc")
        assert (c_fc.rows, c_fc.cols) == (128, 32)


@pytest.mark.parametrize("bad", ["", "./no/such/folder", "not a model id!", "/etc/passwd", "a" * 300, "/" + "b" * 300])
def test_bad_sources_give_clear_errors(bad):
    with pytest.raises(ModelLoadError):
        resolve_source(bad)


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="Could not load"):
        load_model("someone/no-such-model-xyz", device="cpu")


def test_hub_id_loads_from_the_local_hf_cache_without_the_hub(tmp_path):
    """A Hugging Face id the user downloaded earlier loads offline from the HF cache layout
    (models--org--name/snapshots/<rev>/), with no retries against the unreachable hub; an id the
    cache lacks fails at once with a message naming the cache."""
    snap = tmp_path / "hub" / "models--someone--tiny-llama" / "snapshots" / ("0" * 40)
    save_tiny_llama(snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = ("import time; from analysis.loading import load_model, ModelLoadError\n"
            "lm = load_model('someone/tiny-llama', device='cpu'); print(lm.info.n_blocks, lm.info.architecture)\n"
            "t = time.perf_counter()\n"
            "try: load_model('someone/not-cached', device='cpu')\n"
            "except ModelLoadError as e: print(round(time.perf_counter() - t, 1), e)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    first, second = out.stdout.strip().splitlines()
    assert first == "3 LlamaForCausalLM"
    seconds, message = second.split(" ", 1)
    assert float(seconds) < 5 and "not in the local Hugging Face cache" in message


def test_hub_reachability_is_probed_once_a_minute(monkeypatch):
    """The probe is a TCP connect to $HF_ENDPOINT (loopback here), and its answer is reused."""
    import socket

    from huggingface_hub import constants

    from analysis import loading as models

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(models, "_HUB_CHECK", {})
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    assert models.hub_reachable()
    server.close()
    assert models.hub_reachable()  # reused within HUB_CHECK_TTL
    monkeypatch.setattr(models, "HUB_CHECK_TTL", 0.0)
    assert not models.hub_reachable()  # asked again: nothing listens any more


def test_a_gemma_model_whose_tokenizer_has_no_bos_is_refused_at_load(tmp_path):
    """Gemma's windows start with BOS (its perplexity collapses without it): a tokenizer without one is named
    when the model loads, not later as a calibration error."""
    from conftest import word_tokenizer
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    Gemma3ForCausalLM(cfg).save_pretrained(tmp_path)
    word_tokenizer(119).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="BOS token.*bos_token"):
        load_model(str(tmp_path), device="cpu")

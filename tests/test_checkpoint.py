"""Checkpoint folders read without loading the model: validation, streamed spectra equal to the
in-memory ones, the disk cache, and the CLI's streamed path. Real tiny models saved as safetensors
shards; nothing mocked (one tripwire shows that a command loads no model)."""
import json
import struct

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from analysis.allocation import Allocation, allocate
from analysis.checkpoint import CheckpointError, open_checkpoint
from analysis.cli import main
from analysis.layers import find_layers
from analysis.loading import ModelLoadError, converted_dir, load_model, packaged_key
from analysis.spectra import analyze, analyze_checkpoint, checkpoint_layers, esd, streamed_esd
from tests.conftest import save_tiny_llama


def sharded_llama(path, tied=False, seed=0):
    """A 3-block LLaMA with random weights saved as many small safetensors shards plus an index."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path, max_shard_size="60KB")
    return model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALPHASCOPE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_sharded_checkpoint_lists_every_tensor_in_its_shard(tmp_path):
    model = sharded_llama(tmp_path)
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.index is not None and len(ckpt.shards) > 5
    state = model.state_dict()
    assert set(ckpt.tensors) == set(state)
    key = "model.layers.1.mlp.down_proj.weight"
    assert ckpt.tensors[key].shape == tuple(state[key].shape)
    assert torch.equal(torch.cat(list(ckpt.chunks(key, elements=500)), dim=1), state[key])  # wide: column blocks
    key = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(torch.cat(list(ckpt.chunks(key, elements=500)), dim=0), state[key])  # tall: row blocks


@pytest.mark.parametrize("tied", [False, True])
def test_streamed_spectra_equal_in_memory(tmp_path, cache, tied):
    model = sharded_llama(tmp_path, tied=tied)
    for farms, normalize in ((False, False), (True, False), (False, True)):
        mem = analyze(model, farms=farms, normalize=normalize, include_outside=True)
        streamed = analyze_checkpoint(tmp_path, farms=farms, normalize=normalize, include_outside=True, device="cpu")
        assert not streamed.cached
        pd.testing.assert_frame_equal(streamed.metrics, mem.metrics, rtol=1e-9)
        assert ("lm_head" in set(streamed.metrics["kind"])) is not tied  # a tied head is the embedding
        for name, ev in mem.esds.items():
            np.testing.assert_allclose(streamed.esds[name], ev, rtol=1e-9, atol=1e-12 * ev.max())


def test_names_blocks_kinds_match_the_loaded_model(tmp_path):
    sharded_llama(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    want = [(r.name, r.block, r.kind, r.group, r.rows, r.cols, r.prunable) for r in find_layers(loaded)]
    got = [(r.name, r.block, r.kind, r.group, r.rows, r.cols, r.prunable)
           for r in checkpoint_layers(open_checkpoint(tmp_path), include_outside=True)]
    assert got == want
    assert ("model.layers.2.self_attn.q_proj", 2, "q_proj") in [g[:3] for g in got]


def test_gram_accumulated_over_slices_equals_the_whole_matrix(tmp_path):
    model = sharded_llama(tmp_path)
    ckpt = open_checkpoint(tmp_path)
    for key in ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.down_proj.weight",
                "model.embed_tokens.weight"):
        want = esd(model.state_dict()[key])
        np.testing.assert_allclose(streamed_esd(ckpt, key, elements=300), want, rtol=1e-9, atol=1e-12 * want.max())


def test_non_finite_weights_are_reported_not_fitted(tmp_path, cache):
    model = sharded_llama(tmp_path)
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path, max_shard_size="60KB")
    row = analyze_checkpoint(tmp_path).metrics.set_index("name").loc["model.layers.1.self_attn.k_proj"]
    assert row["status"] == "non-finite weights" and np.isnan(row["alpha"])


def test_a_packaged_model_is_streamed_by_its_name_and_an_absent_one_says_how_to_load_it():
    by_name = analyze_checkpoint("default")  # its converted folder under the cache, as the CLI streams it
    by_folder = analyze_checkpoint(converted_dir(packaged_key("default")))
    pd.testing.assert_frame_equal(by_name.metrics, by_folder.metrics)
    assert len(by_name.metrics) == 210
    with pytest.raises(CheckpointError, match="not on this machine.*load_model"):
        analyze_checkpoint("nobody-here/no-such-model")
    with pytest.raises(ModelLoadError, match="does not exist"):
        analyze_checkpoint("/no/such/folder")


def test_another_fit_rule_refits_the_cached_spectra(tmp_path, cache, monkeypatch):
    """Switching the xmin rule (or the tail length) reuses the cached ESDs: only the fits run again, and the
    table is the one computed from scratch."""
    import analysis.spectra

    model = sharded_llama(tmp_path)
    for farms in (False, True):
        analyze_checkpoint(tmp_path, farms=farms, include_outside=True)
        with monkeypatch.context() as m:  # a spy: no matrix is read again
            m.setattr(analysis.spectra, "_checkpoint_matrices", lambda *a: pytest.fail("spectra computed again"))
            for fit, min_tail in (("scan", 10), ("median", 10), ("scan", 2)):
                got = analyze_checkpoint(tmp_path, fit=fit, farms=farms, include_outside=True, min_tail=min_tail)
                want = analyze(model, fit=fit, farms=farms, include_outside=True, min_tail=min_tail)
                pd.testing.assert_frame_equal(got.metrics, want.metrics, rtol=1e-9)
                assert got.fit == fit and not got.cached
        assert analyze_checkpoint(tmp_path, fit="scan", farms=farms, include_outside=True).cached  # stored too


def test_cache_hit_on_reopen_and_invalidated_when_a_shard_changes(tmp_path, cache):
    sharded_llama(tmp_path, seed=0)
    first = analyze_checkpoint(tmp_path, include_outside=True)
    again = analyze_checkpoint(tmp_path, include_outside=True)
    assert not first.cached and again.cached
    pd.testing.assert_frame_equal(again.metrics, first.metrics)
    assert all(np.array_equal(again.esds[k], v) for k, v in first.esds.items())
    assert not analyze_checkpoint(tmp_path, fit="median", include_outside=True).cached  # other settings: own entry

    other = sharded_llama(tmp_path / "other", seed=1)  # same shapes, other weights, written over one shard
    shard = open_checkpoint(tmp_path).tensors["model.layers.2.mlp.up_proj.weight"].shard
    shard.write_bytes((tmp_path / "other" / shard.name).read_bytes())
    changed = analyze_checkpoint(tmp_path, include_outside=True)
    assert not changed.cached
    row = changed.metrics.set_index("name").loc["model.layers.2.mlp.up_proj"]
    assert row["lambda_max"] == pytest.approx(esd(other.model.layers[2].mlp.up_proj.weight).max(), rel=1e-9)


def _index(path):
    return json.loads((path / "model.safetensors.index.json").read_text())


def _one_line(e):
    assert "\n" not in str(e)
    return str(e)


def test_folder_without_config(tmp_path):
    sharded_llama(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path)
    assert "no config.json" in _one_line(e.value) and str(tmp_path) in str(e.value)


def test_index_naming_an_absent_shard(tmp_path):
    sharded_llama(tmp_path)
    gone = _index(tmp_path)["weight_map"]["model.layers.0.mlp.up_proj.weight"]
    (tmp_path / gone).unlink()
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path)
    assert "absent shard" in _one_line(e.value) and gone in str(e.value)


def test_index_naming_a_tensor_its_shard_lacks(tmp_path):
    sharded_llama(tmp_path)
    index = _index(tmp_path)
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = index["weight_map"]["model.norm.weight"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path)
    assert "mlp.extra.weight" in _one_line(e.value) and "model.safetensors.index.json" in str(e.value)


def test_truncated_shard(tmp_path):
    sharded_llama(tmp_path)
    shard = tmp_path / _index(tmp_path)["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path)
    assert "truncated" in _one_line(e.value) and shard.name in str(e.value)


@pytest.mark.parametrize("damage", ["garbage", "huge_length", "empty"])
def test_corrupt_header(tmp_path, damage):
    save_tiny_llama(tmp_path)
    shard = tmp_path / "model.safetensors"
    data = bytearray(shard.read_bytes())
    if damage == "garbage":
        data[8:40] = b"\xff" * 32
    elif damage == "huge_length":
        data[:8] = struct.pack("<Q", len(data) * 2)
    else:
        data = b""
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path)
    assert shard.name in _one_line(e.value)
    with pytest.raises(ModelLoadError) as e:  # checked before transformers reads the shard
        load_model(str(tmp_path), device="cpu")
    assert shard.name in _one_line(e.value)


def test_cli_corrupt_checkpoint_one_line(tmp_path, capsys):
    save_tiny_llama(tmp_path)
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + shard.read_bytes()[24:])
    capsys.readouterr()
    for command in (["spectra"], ["eval", "--text", "default"]):
        assert main([*command, "--model", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "corrupt safetensors header" in err and "\n" not in err, err


def test_cli_spectra_streams_and_caches(tmp_path, cache, capsys):
    model = sharded_llama(tmp_path / "m")
    out = tmp_path / "alpha.csv"
    assert main(["spectra", "--model", str(tmp_path / "m"), "--out", str(out), "--include-outside"]) == 0
    first = capsys.readouterr().out
    assert "from the cache" not in first
    pd.testing.assert_frame_equal(pd.read_csv(out), pd.read_csv(_csv(analyze(model, include_outside=True), tmp_path)))
    assert main(["spectra", "--model", str(tmp_path / "m"), "--out", str(out), "--include-outside"]) == 0
    assert "from the cache" in capsys.readouterr().out
    # weightwatcher's tail rule, all digits in JSON, and what streaming does not use is said
    js = tmp_path / "alpha.json"
    assert main(["spectra", "--model", str(tmp_path / "m"), "--out", str(js), "--fit", "scan", "--min-tail", "2",
                 "--dtype", "bfloat16"]) == 0
    assert "note: --dtype unused" in capsys.readouterr().err
    want = analyze(model, fit="scan", min_tail=2).metrics
    np.testing.assert_allclose(pd.read_json(js)["alpha"].to_numpy(), want["alpha"].to_numpy(), rtol=1e-13)
    for bad in (["--min-tail", "1"], ["--out", str(tmp_path / "a.parquet")]):
        assert main(["spectra", "--model", str(tmp_path / "m"), *bad]) == 2
        assert capsys.readouterr().err.startswith(f"error: {bad[0]}: ")
    assert main(["spectra", "--model", str(tmp_path / "m"), "--min-tail", "5"]) == 2  # the default fit is peak
    assert "error: --min-tail: only the scan fit reads it, and the fit is peak" in capsys.readouterr().err
    # the file says what made it, and how far to trust each fit; the eigenvalues themselves on request
    assert pd.read_json(js)[["fit", "min_tail", "farms"]].drop_duplicates().values.tolist() == [["scan", 2, False]]
    assert {"beyond_mp", "alpha_stderr"} <= set(pd.read_csv(out).columns)
    npz = tmp_path / "esds.npz"
    assert main(["spectra", "--model", str(tmp_path / "m"), "--out", str(out), "--esds", str(npz)]) == 0
    with np.load(npz) as z:
        esds = analyze(model).esds
        assert set(z.files) == set(esds)  # (streamed: equal to the in-memory ESDs to round-off)
        assert all(np.allclose(z[n], esds[n], rtol=1e-9, atol=1e-12 * esds[n].max()) for n in esds)
    assert main(["spectra", "--model", str(tmp_path / "m"), "--esds", str(tmp_path / "esds.csv")]) == 2
    assert "error: --esds: " in (err := capsys.readouterr().err) and "name the file .npz" in err


def test_cli_allocate_of_the_weights_alone_loads_no_model_and_prune_reads_the_cached_spectra(
        tmp_path, cache, capsys, monkeypatch):
    """allocate without calibration text takes the shapes from config.json and the spectra from the shards (cached):
    the same ratios as from the loaded model, and no model is built, so a model larger than memory can be allocated.
    prune loads the model to prune it, and reads its allocation's spectra from the shards and the cache too."""
    from analysis.cli import options

    model = sharded_llama(tmp_path / "m")
    want = allocate(analyze(model).metrics, 0.6, "alphapruning", epsilon=0.3)

    def tripwire(*args, **kwargs):
        raise AssertionError("allocate loaded the model")
    with monkeypatch.context() as patch:
        patch.setattr(options, "load_model", tripwire)
        for method, extra in (("alphapruning", ["--epsilon", "0.3", "--dtype", "bfloat16"]), ("uniform", []),
                              ("custom", ["--points", "0:0.4,1:0.8"])):
            argv = ["allocate", "--model", tmp_path / "m", "--allocation", method, "--sparsity", "0.6", *extra,
                    "--out", tmp_path / f"{method}.json", "--npy", tmp_path / f"{method}.npy"]
            assert main([str(a) for a in argv]) == 0
            assert Allocation.load(tmp_path / f"{method}.json").achieved == pytest.approx(0.6, abs=1e-6)
    got = Allocation.load(tmp_path / "alphapruning.json").per_layer
    assert list(got) == list(want.per_layer)  # the model's module order, as the loaded model gives it
    np.testing.assert_allclose(list(got.values()), list(want.per_layer.values()), rtol=1e-12)
    assert "note: --dtype unused: the model was not loaded" in capsys.readouterr().err
    assert np.load(tmp_path / "uniform.npy").shape == (len(got),)
    assert analyze_checkpoint(tmp_path / "m").cached  # the spectra allocate streamed were kept

    folder = save_tiny_llama(tmp_path / "t")  # (with a tokenizer: prune evaluates)
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(f"w{i % 97}" for i in range(2000)))
    argv = ["prune", "--model", folder, "--pruner", "magnitude", "--allocation", "alphapruning", "--sparsity", "0.5",
            "--eval", text, "--eval-seqlen", "32", "--max-windows", "1", "--device", "cpu", "--db",
            tmp_path / "runs.sqlite", "--out", tmp_path / "run.json"]
    assert main([str(a) for a in argv]) == 0
    assert analyze_checkpoint(folder).cached  # prune streamed its allocation's spectra, and kept them
    ran = json.loads((tmp_path / "run.json").read_text())["allocation"]["per_layer"]
    dense = AutoModelForCausalLM.from_pretrained(folder)
    assert ran == pytest.approx(allocate(analyze(dense).metrics, 0.5, "alphapruning").per_layer, rel=1e-12)


def _csv(result, tmp_path):
    path = tmp_path / "mem.csv"
    result.table().to_csv(path, index=False)
    return path

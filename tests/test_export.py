"""Exports: model folders (dense, compressed-tensors bitmask) reload to identical weights, the
llm-compressor recipe parses with llm-compressor's own parser to the same per-matrix numbers, the
AlphaPruning .npy round-trips, and bad destinations are refused before any work, losing nothing."""
import errno
import json
import os
import re

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers.modeling_utils
from conftest import save_tiny_llama
from test_pruning import calib_ids, tiny_gemma3, tiny_llama
from transformers import AutoModelForCausalLM

from analysis import cli
from analysis.export import (
    FORMATS,
    ExportError,
    check_destination,
    export,
    folder_bytes,
    load_pruned,
    module_order,
    ratios_npy,
    recipe_yaml,
)
from analysis.layers import prunable_layers
from analysis.pruning import prune


def pruned(model_fn=tiny_llama, nm=None, ratios=None, method="magnitude"):
    """A tiny model pruned with `ratios` (module name -> sparsity; default: a non-uniform ramp)."""
    model = model_fn()
    names = [r.name for r in prunable_layers(model)]
    per_layer = ratios or {n: 0.2 + 0.6 * i / (len(names) - 1) for i, n in enumerate(names)}
    prune(model, per_layer, method=method, calib=calib_ids(), nm=nm)
    return model, {"method": "custom", "sparsity": 0.5, "per_block": [], "per_layer": per_layer}


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def zero_fraction(model, name):
    w = model.get_submodule(name).weight
    return float((w == 0).float().mean())


# ---------------------------------------------------------------------------------------------
# model folders


@pytest.mark.parametrize("model_fn", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3-tied"])
def test_compressed_unstructured_nonuniform_reloads_identical(tmp_path, model_fn):
    model, alloc = pruned(model_fn, method="wanda")
    out = export(model, None, alloc, tmp_path / "c", format="compressed")
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors"
    sc = q["sparsity_config"]
    assert sc["format"] == "sparse-bitmask" and sc["sparsity_structure"] == "unstructured"
    assert sc["targets"] == ["Linear"] and sc["ignore"] == ["lm_head"]
    names = list(alloc["per_layer"])
    # of the entire model, as llm-compressor fills it: below the pruned matrices' share (embedding, norms are dense)
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    assert sc["global_sparsity"] == pytest.approx(zeros / sum(p.numel() for p in model.parameters()))
    assert sc["global_sparsity"] < sum(zero_fraction(model, n) * model.get_submodule(n).weight.numel()
                                       for n in names) / sum(model.get_submodule(n).weight.numel() for n in names)
    with safetensors.safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert f"{names[0]}.bitmask" in keys and f"{names[0]}.row_offsets" in keys and f"{names[0]}.weight" not in keys
    reloaded = load_pruned(out)
    assert_same_weights(model, reloaded)
    for n, r in alloc["per_layer"].items():  # the non-uniform allocation survives, matrix by matrix
        assert zero_fraction(reloaded, n) == pytest.approx(r, abs=0.02)
    if model.config.tie_word_embeddings:
        assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    assert json.loads((out / "allocation.json").read_text())["per_layer"] == alloc["per_layer"]


def test_compressed_24_uses_the_24_format_and_is_smaller(tmp_path):
    model, alloc = pruned(nm="2:4", ratios={r.name: 0.5 for r in prunable_layers(tiny_llama())})
    with torch.no_grad():  # groups with fewer than 2 non-zeros still store 2 values (zeros among them)
        model.model.layers[0].mlp.down_proj.weight[0, :8] = torch.tensor([0.0, 0, 0, 0, 0, -0.0, 3, 0])
    out = export(model, None, alloc, tmp_path / "c24", format="compressed")
    sc = json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sc["format"] == "sparse-24-bitmask" and sc["sparsity_structure"] == "2:4"
    assert sc["global_sparsity"] == pytest.approx(sum(int((p == 0).sum()) for p in model.parameters())
                                                  / sum(p.numel() for p in model.parameters()))
    name = "model.layers.0.mlp.down_proj"
    with safetensors.safe_open(out / "model.safetensors", "pt") as f:
        assert list(f.get_tensor(f"{name}.compressed").shape) == [64, 64]  # 64 x 128 at 2 of every 4
        assert f.get_tensor(f"{name}.shape").flatten().tolist() == [64, 128]
    reloaded = load_pruned(out)
    assert_same_weights(model, reloaded)
    dense = export(model, None, alloc, tmp_path / "d", format="dense")
    linear = sum(p.numel() * 4 for n, p in model.named_parameters() if n.removesuffix(".weight") in alloc["per_layer"])
    # 2:4 in float32: half the values plus 1 bit per weight -> saves ~15/32 of the pruned matrices' bytes
    assert folder_bytes(dense) - folder_bytes(out) == pytest.approx(linear * 15 / 32, rel=0.05)


def test_dense_export_reloads_with_transformers(tmp_path):
    model, alloc = pruned()
    out = export(model, None, alloc, tmp_path / "d")  # dense is the default
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # as mkdir makes it: readable by a serving account
    for format in FORMATS:  # and so is every file, the weights too (safetensors writes them 0600)
        folder = export(model, None, alloc, tmp_path / format, format=format)
        assert {f.name: f.stat().st_mode & 0o777 for f in folder.iterdir()} == \
            {f.name: 0o666 & ~umask for f in folder.iterdir()}, format
    assert_same_weights(model, AutoModelForCausalLM.from_pretrained(out))
    assert_same_weights(model, load_pruned(out))


@pytest.mark.parametrize("nm", [None, "2:4"])
def test_dense_ct_export_carries_the_sparsity_metadata_and_reloads_with_transformers(tmp_path, nm):
    ratios = {r.name: 0.5 for r in prunable_layers(tiny_llama())} if nm else None
    model, alloc = pruned(nm=nm, ratios=ratios)
    out = export(model, None, alloc, tmp_path / "dct", format="dense-ct")
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    sc = q["sparsity_config"]
    assert q["quant_method"] == "compressed-tensors" and sc["format"] == "dense"
    assert sc["sparsity_structure"] == ("2:4" if nm else "unstructured")
    assert sc["targets"] == ["Linear"] and sc["ignore"] == ["lm_head"]
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    assert sc["global_sparsity"] == pytest.approx(zeros / sum(p.numel() for p in model.parameters()))
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert type(hf.config.quantization_config).__name__ == "CompressedTensorsConfig"  # read, not ignored
    assert_same_weights(model, hf)
    assert_same_weights(model, load_pruned(out))


def test_transformers_does_not_decompress_the_compressed_format(tmp_path):
    """Why "dense" is the default: with compressed-tensors 0.19 (no sparse compressors left) transformers
    loads the bitmask-compressed matrices as fresh random weights. If this starts failing, a current
    loader reads the format again and "compressed" can become the default."""
    model, alloc = pruned()
    out = export(model, None, alloc, tmp_path / "c", format="compressed")
    hf = AutoModelForCausalLM.from_pretrained(out)
    name = next(iter(alloc["per_layer"]))
    assert not torch.equal(hf.get_submodule(name).weight, model.get_submodule(name).weight)


# ---------------------------------------------------------------------------------------------
# allocation files


@pytest.fixture(scope="module")
def recipe_parser():
    pytest.importorskip("llmcompressor")
    from llmcompressor.recipe import Recipe

    return Recipe


@pytest.mark.parametrize("pruner, nm, cls", [("sparsegpt", None, "SparseGPTModifier"),
                                             ("wanda", (2, 4), "WandaPruningModifier")])
def test_recipe_parses_with_llmcompressor_to_the_same_numbers(tmp_path, recipe_parser, pruner, nm, cls):
    from compressed_tensors.utils import match_named_modules

    model, alloc = pruned()
    per_layer = module_order(alloc["per_layer"], model)
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_yaml(per_layer, pruner, nm, note="test allocation\nsecond line"))
    recipe = recipe_parser.create_instance(str(path))
    (modifier,) = recipe.modifiers
    assert type(modifier).__name__ == cls
    assert modifier.sparsity == list(per_layer.values()) and modifier.targets == list(per_layer)
    assert modifier.mask_structure == ("2:4" if nm else "0:0")
    # llm-compressor pairs sparsity[i] with the i-th module its targets match, in module order
    matched = [n for n, _ in match_named_modules(model, modifier.targets)]
    assert matched == list(per_layer)


@pytest.mark.parametrize("pruner, nm", [("sparsegpt", None), ("wanda", None), ("wanda", (2, 4))])
def test_llmcompressor_oneshot_applies_the_recipe(tmp_path, recipe_parser, pruner, nm):
    """The recipe re-runs elsewhere: llm-compressor's own oneshot prunes every matrix to its ratio
    (within one weight per row: its Wanda rounds per row). With 2:4, the first block's matrices, at
    ratio 0, stay dense: llm-compressor would give any N:M target the pattern whatever its sparsity."""
    import datasets
    from llmcompressor import oneshot

    model = AutoModelForCausalLM.from_pretrained(save_tiny_llama(tmp_path / "model"))  # oneshot reads its tokenizer
    names = [r.name for r in prunable_layers(model)]
    if nm:
        per_layer = {n: 0.0 if n.startswith("model.layers.0.") else 0.5 for n in names}
    else:
        per_layer = {n: 0.3 + 0.4 * i / (len(names) - 1) for i, n in enumerate(names)}
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_yaml(module_order(per_layer, model), pruner, nm))
    assert ("stay dense" in path.read_text().splitlines()[0]) == bool(nm)
    ids = calib_ids(n=8, seqlen=32, vocab=model.config.vocab_size - 1)
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    oneshot(model=model, dataset=data, recipe=str(path), num_calibration_samples=len(ids),
            max_seq_length=ids.shape[1], output_dir=None)
    modules = dict(model.named_modules())
    for name, ratio in per_layer.items():
        w = modules[name].weight
        assert float(w.eq(0).float().mean()) == pytest.approx(ratio, abs=1 / w.shape[1]), name


def test_recipe_caveats_name_expert_matrices():
    from analysis.export import recipe_caveats

    dense = {"model.layers.0.self_attn.q_proj": 0.5, "model.layers.0.mlp.down_proj": 0.5}
    assert recipe_caveats(dense) == []
    (caveat,) = recipe_caveats({**dense, "model.layers.0.mlp.experts.3.gate_proj": 0.5})
    assert caveat.startswith("1 of the recipe's 3 targets are expert matrices (e.g. model.layers.0.mlp.experts.3.")


@pytest.mark.parametrize("nm", ["2:4", (2,), (2.0, 4.0)])
def test_recipe_refuses_an_nm_that_is_not_two_integers(nm):
    with pytest.raises(ExportError, match=r"nm must be \(N, M\), e.g. \(2, 4\)"):
        recipe_yaml({"model.layers.0.mlp.up_proj": 0.5}, "sparsegpt", nm)


def test_npy_round_trip_in_module_order(tmp_path):
    model, alloc = pruned()
    shuffled = dict(reversed(list(alloc["per_layer"].items())))
    path = tmp_path / "ratios.npy"
    path.write_bytes(ratios_npy(module_order(shuffled, model)))
    got = np.load(path)
    assert got.dtype == np.float64 and got.shape == (len(prunable_layers(model)),)
    assert got.tolist() == [alloc["per_layer"][r.name] for r in prunable_layers(model)]


# ---------------------------------------------------------------------------------------------
# bad destinations


def test_destination_checks(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ExportError, match="existing file"):
        check_destination(f)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty.*--overwrite"):
        check_destination(full)
    with pytest.raises(ExportError, match="holds files but no saved model"):  # e.g. a home folder, by mistake
        check_destination(full, overwrite=True)
    (full / "config.json").write_text("{}")  # an earlier export
    assert check_destination(full, overwrite=True) == full
    assert check_destination(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    with pytest.raises(ExportError, match="is a file"):
        check_destination(f / "below")


def test_unwritable_destination(tmp_path):
    try:
        check_destination("/sys/alphascope-export-test")
    except ExportError as e:
        assert "no file can be created in /sys" in str(e)
    else:
        pytest.skip("/sys is writable here")


def test_overwrite_replaces_the_old_export(tmp_path):
    model, alloc = pruned()
    out = tmp_path / "m"
    out.mkdir()
    (out / "old.txt").write_text("old")
    (out / "config.json").write_text("{}")
    export(model, None, alloc, out, format="compressed", overwrite=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()


@pytest.fixture
def fill_disk(monkeypatch):
    """Call it to make every weights file write fail with ENOSPC, at the two places weights are
    written: the compressed writer (safetensors) and transformers' save_pretrained."""
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def fill():
        monkeypatch.setattr(safetensors.torch, "save_file", no_space)
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", no_space)
    return fill


@pytest.mark.parametrize("fmt", ["compressed", "dense"])
def test_full_disk_removes_the_partial_folder_and_keeps_the_old_one(tmp_path, fill_disk, fmt):
    model, alloc = pruned()
    fill_disk()
    with pytest.raises(ExportError, match="No space left on device"):
        export(model, None, alloc, tmp_path / "new", format=fmt)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a partial staging folder
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("previous export")
    (old / "config.json").write_text("{}")
    with pytest.raises(ExportError):
        export(model, None, alloc, old, format=fmt, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old"] and (old / "keep.txt").read_text() == "previous export"


# ---------------------------------------------------------------------------------------------
# the command line (in-process: the same main() as `python -m analysis`)


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case, message", [
    ("file", "--save-model: .* is an existing file"),
    ("full", "--save-model: .* is not empty.*--overwrite"),
    ("unwritable_out", "--out: cannot write"),
])
def test_cli_prune_refuses_bad_destinations_before_loading(tmp_path, capsys, case, message):
    f, full = tmp_path / "file", tmp_path / "full"
    f.write_text("x")
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    args = {"file": ["--save-model", f], "full": ["--save-model", full], "unwritable_out": ["--out", f / "run.json"]}
    # a model that does not exist: had the destination been checked after loading, this would be the error
    code, _, err = run(capsys, "prune", "--model", tmp_path / "no-model", "--eval", "default",
                       "--db", tmp_path / "r.sqlite", *args[case])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: ") and re.search(message, err), err
    assert (full / "keep.txt").read_text() == "mine"


def test_cli_prune_saves_compressed_model(tmp_path, capsys):
    model_dir = save_tiny_llama(tmp_path / "tiny")
    out = tmp_path / "saved"
    code, stdout, err = run(capsys, "prune", "--model", model_dir, "--device", "cpu", "--method", "magnitude",
                            "--nm", "2:4", "--nsamples", 2, "--seqlen", 16, "--eval", "default", "--eval-seqlen", 32,
                            "--max-windows", 1, "--db", tmp_path / "r.sqlite", "--save-model", out,
                            "--save-format", "compressed")
    assert code == 0, err
    assert "saved the pruned model (compressed)" in stdout
    assert "note: --save-format compressed: transformers' from_pretrained does not decompress this layout" in err
    sc = json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sc["format"] == "sparse-24-bitmask"
    reloaded = load_pruned(out)
    assert zero_fraction(reloaded, "model.layers.0.mlp.up_proj") == 0.5
    assert (out / "tokenizer.json").exists() and (out / "allocation.json").exists()
    # its allocation names the pattern, so its recipe is a 2:4 one (not unstructured 50%)
    recipe = tmp_path / "r.yaml"
    code, _, err = run(capsys, "export", "--allocation", out / "allocation.json", "--recipe", recipe)
    assert code == 0 and "mask_structure: '2:4'" in recipe.read_text(), err
    assert "note: the allocation was made for the N:M pattern 2:4" in err
    # and the pruner it was pruned with, so a Wanda prune's folder gives a Wanda recipe, as its run record does
    assert json.loads((out / "allocation.json").read_text())["params"]["run"] == {"pruner": "magnitude"}
    code, _, err = run(capsys, "prune", "--model", model_dir, "--device", "cpu", "--method", "wanda", "--allocation",
                       "uniform", "--sparsity", 0.5, "--nsamples", 2, "--seqlen", 16, "--eval", "default",
                       "--eval-seqlen", 32, "--max-windows", 1, "--db", tmp_path / "r.sqlite", "--save-model",
                       tmp_path / "wanda")
    assert code == 0, err
    code, _, err = run(capsys, "export", "--allocation", tmp_path / "wanda" / "allocation.json", "--recipe", recipe)
    assert code == 0 and "WandaPruningModifier" in recipe.read_text(), err


def test_cli_prune_says_when_it_saves_in_another_dtype_than_the_checkpoints(tmp_path, capsys):
    """A bf16 checkpoint pruned in float32 (--dtype auto on a CPU) is saved in float32, twice its size: said,
    with the way to keep bf16; pruned in bf16 it is saved in bf16, without a note."""
    from analysis.checkpoint import stored_dtype

    model_dir = save_tiny_llama(tmp_path / "tiny")
    AutoModelForCausalLM.from_pretrained(model_dir).to(torch.bfloat16).save_pretrained(model_dir)
    assert stored_dtype(model_dir) == "bfloat16"
    for dtype, out in (("auto", tmp_path / "f32"), ("bfloat16", tmp_path / "bf16")):
        code, _, err = run(capsys, "prune", "--model", model_dir, "--device", "cpu", "--dtype", dtype, "--method",
                           "magnitude", "--sparsity", 0.5, "--allocation", "uniform", "--eval", "default",
                           "--eval-seqlen", 32, "--max-windows", 1, "--db", tmp_path / "r.sqlite", "--save-model", out)
        assert code == 0, err
        assert stored_dtype(out) == ("float32" if dtype == "auto" else "bfloat16")
        note = ("note: --save-model: saved in float32, the dtype it was pruned in; the checkpoint stores bfloat16 "
                "(prune with --dtype bfloat16 to save in it)")
        assert (note in err) == (dtype == "auto"), err


def test_cli_prune_full_disk_keeps_the_run_record(tmp_path, capsys, fill_disk):
    model_dir = save_tiny_llama(tmp_path / "tiny")
    fill_disk()
    out, record = tmp_path / "saved", tmp_path / "run.json"
    code, _, err = run(capsys, "prune", "--model", model_dir, "--device", "cpu", "--method", "magnitude",
                       "--sparsity", 0.5, "--allocation", "uniform", "--eval", "default", "--eval-seqlen", 32,
                       "--max-windows", 1,
                       "--db", tmp_path / "r.sqlite", "--out", record, "--save-model", out,
                       "--save-format", "compressed")
    assert code == 2 and "error: --save-model: cannot write" in err and "No space left on device" in err
    assert not out.exists() and json.loads(record.read_text())["achieved"]["overall"] == pytest.approx(0.5)
    assert not [p for p in tmp_path.iterdir() if "saved" in p.name]  # no partial folder either


def test_cli_export_writes_recipe_and_npy(tmp_path, capsys, recipe_parser):
    from analysis.allocation import Allocation

    model, alloc = pruned()
    path = Allocation.from_dict(alloc).save(tmp_path / "alloc.json")
    recipe, npy = tmp_path / "r.yaml", tmp_path / "r.npy"
    code, stdout, err = run(capsys, "export", "--allocation", path, "--recipe", recipe, "--recipe-pruner", "wanda",
                            "--npy", npy)
    assert code == 0, err
    (modifier,) = recipe_parser.create_instance(str(recipe)).modifiers
    assert modifier.sparsity == list(alloc["per_layer"].values()) == np.load(npy).tolist()
    assert modifier.mask_structure == "0:0" and type(modifier).__name__ == "WandaPruningModifier"
    assert recipe.read_text().startswith(f"# alphascope allocation '{alloc['method']}' for ")  # as the Prune page's
    # without --recipe-pruner: the pruner the allocation was searched or pruned with, where its file says
    searched = tmp_path / "s.json"
    Allocation.from_dict({**alloc, "params": {**alloc.get("params", {}), "pruner": "wanda"}}).save(searched)
    record = tmp_path / "run.json"  # a run record's allocation was pruned with its config's method
    record.write_text(json.dumps({"config": {"method": "magnitude"}, "allocation": alloc}))
    for source, want in ((path, "SparseGPTModifier"), (searched, "WandaPruningModifier"),
                         (record, "SparseGPTModifier")):  # magnitude: llm-compressor's SparseGPT modifier then
        code, _, err = run(capsys, "export", "--allocation", source, "--recipe", recipe)
        assert code == 0 and type(recipe_parser.create_instance(str(recipe)).modifiers[0]).__name__ == want, err
        assert ("as the allocation was made with wanda" in err) == (source == searched), err
    assert Allocation.load(record).pruner == "magnitude" and Allocation.load(path).pruner is None
    code, _, err = run(capsys, "export", "--allocation", path)
    assert code == 2 and "nothing to write" in err
    code, _, err = run(capsys, "export", "--allocation", path, "--recipe", tmp_path)
    assert code == 2 and err.startswith("error: --recipe:") and "is a folder" in err
    for option in (["--recipe-pruner", "wanda"], ["--nm", "2:4"]):  # recipe options without a recipe
        code, _, err = run(capsys, "export", "--allocation", path, "--npy", tmp_path / "x.npy", *option)
        assert code == 2 and err.startswith(f"error: {option[0]}: it sets the llm-compressor recipe"), err
    assert not (tmp_path / "x.npy").exists()
    nested = tmp_path / "new" / "folder" / "r.npy"  # missing folders are made, as for --out
    assert run(capsys, "export", "--allocation", path, "--npy", nested)[0] == 0 and nested.is_file()


def test_cli_export_nm_checks_the_widths_of_the_allocations_model(tmp_path, capsys):
    from analysis.allocation import Allocation, allocate, custom_allocation
    from analysis.layers import layer_table

    folder = save_tiny_llama(tmp_path / "tiny")  # matrix widths 64 and 128
    table = layer_table(AutoModelForCausalLM.from_pretrained(folder))
    path = allocate(table, 0.5, "uniform", model=str(folder)).save(tmp_path / "alloc.json")
    recipe = tmp_path / "r.yaml"
    code, _, err = run(capsys, "export", "--allocation", path, "--recipe", recipe, "--nm", "2:5")
    assert code == 2 and "error: --nm: N:M 2:5 needs matrix widths divisible by 5" in err and not recipe.exists()
    code, _, err = run(capsys, "export", "--allocation", path, "--recipe", recipe, "--nm", "2:4")
    assert code == 0 and "mask_structure: '2:4'" in recipe.read_text() and "warning" not in err
    two_four = Allocation.load(path)
    two_four.params["nm"] = "2:4"  # as a prune --nm 2:4 run saves it
    code, _, err = run(capsys, "export", "--allocation", two_four.save(tmp_path / "24.json"), "--recipe", recipe,
                       "--nm", "4:8")
    assert code == 0 and "note: --nm 4:8 replaces the pattern 2:4 the allocation was pruned with" in err
    assert "mask_structure: '4:8'" in recipe.read_text()
    # an N:M recipe prunes every targeted matrix to the pattern: an allocation of other ratios is refused
    spread = custom_allocation([(0.0, 0.3), (1.0, 0.7)], table, 0.5, model=str(folder))
    code, _, err = run(capsys, "export", "--allocation", spread.save(tmp_path / "spread.json"), "--recipe",
                       tmp_path / "s.yaml", "--nm", "2:4")
    assert code == 2 and err.startswith("error: --nm: an N:M pattern 2:4 prunes a matrix to 0.5") and "differ" in err
    assert not (tmp_path / "s.yaml").exists()
    other = allocate(table, 0.5, "uniform", model=str(tmp_path / "gone")).save(tmp_path / "other.json")
    code, _, err = run(capsys, "export", "--allocation", other, "--recipe", recipe, "--nm", "2:4")
    assert code == 0 and f"warning: --nm: matrix widths not checked: {tmp_path / 'gone'}:" in err


def test_cli_export_writes_the_targets_in_the_models_module_order(tmp_path, capsys):
    """llm-compressor gives the i-th sparsity to the i-th matched module in module order: a file whose matrices
    are in another order (here sorted by name, as a JSON tool may leave them) still pairs each with its ratio."""
    from analysis.allocation import Allocation, custom_allocation
    from analysis.layers import layer_table

    folder = save_tiny_llama(tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(folder)
    table = layer_table(model)
    offsets = {name: 0.01 * i for i, name in enumerate(table["name"])}  # every matrix its own ratio
    alloc = custom_allocation([(0.0, 0.3), (1.0, 0.6)], table, 0.5, model=str(folder), offsets=offsets)
    shuffled = alloc.to_dict()
    shuffled["per_layer"] = dict(sorted(shuffled["per_layer"].items(), key=lambda item: item[0][::-1]))
    assert list(shuffled["per_layer"]) != list(alloc.per_layer)
    path = Allocation.from_dict(shuffled).save(tmp_path / "shuffled.json")
    code, _, err = run(capsys, "export", "--allocation", path, "--npy", tmp_path / "r.npy")
    assert code == 0 and "warning" not in err, err
    in_module_order = [n for n, _ in model.named_modules() if n in alloc.per_layer]
    assert np.load(tmp_path / "r.npy").tolist() == [alloc.per_layer[n] for n in in_module_order]
    # a file that names no model (written by hand): its order is kept, unless --model names the model
    shuffled["model"] = ""
    path = Allocation.from_dict(shuffled).save(tmp_path / "no_model.json")
    code, _, err = run(capsys, "export", "--allocation", path, "--npy", tmp_path / "r.npy")
    assert code == 0 and "the allocation names no model; give it with --model" in err, err
    assert np.load(tmp_path / "r.npy").tolist() == list(shuffled["per_layer"].values())
    code, _, err = run(capsys, "export", "--allocation", path, "--npy", tmp_path / "r.npy", "--model", folder)
    assert code == 0 and "warning" not in err, err
    assert np.load(tmp_path / "r.npy").tolist() == [alloc.per_layer[n] for n in in_module_order]
    # what the file states is checked against its ratios, as prune does: here a sparsity they do not prune
    shuffled["sparsity"] = shuffled["achieved"] = 0.3
    path = Allocation.from_dict(shuffled).save(tmp_path / "edited.json")
    code, _, err = run(capsys, "export", "--allocation", path, "--recipe", tmp_path / "r.yaml", "--model", folder)
    assert code == 0 and ("warning: the allocation says sparsity 30.00% (achieved 30.00%), but on this model its "
                          "ratios prune 50.00% of the weights") in err, err
    code, _, err = run(capsys, "export", "--allocation", path, "--npy", tmp_path / "n.npy", "--model", tmp_path / "no")
    assert code == 2 and err.startswith("error: --model: ") and err.count("\n") == 1, err


# ---------------------------------------------------------------------------------------------
# the Prune page's Export section (Streamlit AppTest, the real default model)


def test_prune_page_export_section(tmp_path, monkeypatch):
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest
    from test_app import APP, run_until_idle, set_prune_inputs

    monkeypatch.setenv("ALPHASCOPE_RUNS_DB", str(tmp_path / "runs.sqlite"))
    at = AppTest.from_file(APP, default_timeout=300)
    at.run()
    at.button(key="model_load").click().run()
    at.switch_page("pages/prune.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.radio(key="prune_export_format").value == "dense"
    assert at.download_button(key="prune_recipe_download").disabled  # nothing pruned yet
    assert at.button(key="prune_export").disabled

    def settings():  # magnitude (no calibration) on one short window: quick on two cores
        set_prune_inputs(at, method="magnitude", alloc="uniform", eval_seqlen=64, windows=1)

    settings()
    at.button(key="prune_run").click().run()
    settings()
    run_until_idle(at, "prune")
    assert not at.download_button(key="prune_recipe_download").disabled
    assert not at.download_button(key="prune_npy_download").disabled
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    (full / "config.json").write_text("{}")  # an earlier export, replaced when asked
    at.text_input(key="prune_export_dir").input(str(full))
    at.radio(key="prune_export_format").set_value("compressed")
    at.button(key="prune_export").click().run()
    assert any("not empty" in e.value for e in at.error) and (full / "keep.txt").exists()
    at.checkbox(key="prune_export_overwrite").check()
    from analysis.loading import converted_dir

    own = converted_dir("smollm2")  # the loaded model's own folder: never saved over, even when overwriting
    weights = {f.name: f.stat().st_mtime_ns for f in own.iterdir()}
    at.text_input(key="prune_export_dir").input(str(own))
    at.button(key="prune_export").click().run()
    assert any(f"holds what the loaded model reads ({own.resolve()})" in e.value for e in at.error)
    assert {f.name: f.stat().st_mtime_ns for f in own.iterdir()} == weights
    at.text_input(key="prune_export_dir").input(str(full))
    at.button(key="prune_export").click().run()
    assert not at.error and any("Saved the pruned model (compressed)" in s.value for s in at.success)
    assert any("load_pruned" in i.value for i in at.info)
    shared = at.session_state["work"].model
    assert_same_weights(shared, load_pruned(full))


def test_a_compressed_export_loads_decompressed_and_its_spectra_load_it(tmp_path, capsys):
    """A folder saved compressed is a model like any other: load_model decompresses it (transformers alone
    leaves its matrices random, above), and the spectra, which cannot be streamed from it, load it."""
    from analysis.loading import load_model
    from analysis.spectra import NotStreamable, analyze_checkpoint

    loaded = load_model(str(save_tiny_llama(tmp_path / "tiny")))
    per_layer = {r.name: 0.5 for r in prunable_layers(loaded.model)}
    prune(loaded.model, per_layer, method="magnitude")
    out = export(loaded.model, loaded.tokenizer, {"method": "custom", "sparsity": 0.5, "per_block": [],
                                                  "per_layer": per_layer}, tmp_path / "c", format="compressed")
    assert_same_weights(loaded.model, load_model(str(out)).model)
    with pytest.raises(NotStreamable, match="stored compressed"):
        analyze_checkpoint(out)
    code, report, _ = run(capsys, "spectra", "--model", out, "--out", tmp_path / "s.csv")
    assert code == 0 and "21 matrices of c" in report

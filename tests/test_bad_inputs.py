"""Every bad input the command line and the dashboard answer: one line `error: ...` and exit status 2
(CLI), an error box (pages), before the model's weights load (or any spectra, prune), and nothing lost.

The CLI cases run `python -m analysis ...` in a subprocess, offline ($HF_HUB_OFFLINE), against real
files: a small local checkpoint (3-block LLaMA, word-level tokenizer, context 2048), the same with the
packaged SmolLM2 tokenizer (a tokenizer of another model), binary and Latin-1 texts, a corrupt run store.
"""
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import save_tiny_llama

from analysis.allocation import allocate
from analysis.data import MAX_UPLOAD_MB, DataError, load_text, save_text, text_source_problem
from analysis.layers import layer_table
from analysis.loading import converted_dir, estimate_memory
from analysis.store import RunStore, StoreError

ROOT = Path(__file__).resolve().parents[1]
LATIN1 = "Café crème, naïve résumé. ".encode("latin-1") * 200


@pytest.fixture(scope="module")
def bad(tmp_path_factory, wikitext_dir) -> Path:
    """A folder of bad inputs; the CLI cases name them as {bad}/... (WikiText-2 test, the default
    evaluation text, must be there: settings refuse a missing text before anything else)."""
    d = tmp_path_factory.mktemp("bad")
    (d / "binary.txt").write_bytes(bytes(range(256)) * 16)  # NUL bytes: not text
    (d / "latin1.txt").write_bytes(LATIN1)
    (d / "short.txt").write_text("just four words here\n")
    (d / "blank.txt").write_text("\n  \n\t\n")
    (d / "broken.json").write_text('{"format": ')
    (d / "not-a-store.sqlite").write_bytes(b"this is not a SQLite file " * 100)
    (d / "file").write_text("a file, not a folder\n")
    (d / "folder").mkdir()
    (d / "notes").mkdir()
    (d / "notes" / "todo.txt").write_text("not a model\n")
    RunStore(d / "no-runs.sqlite")
    tiny = save_tiny_llama(d / "tiny")
    # the tokenizer of another model: the packaged SmolLM2's (49152 tokens) beside 120 embedding rows
    (d / "no-tokenizer").mkdir()
    shutil.copy(tiny / "config.json", d / "no-tokenizer")
    from transformers import Qwen2Config

    # transformers builds an empty tokenizer (1 token) for a Qwen folder without tokenizer files
    Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=120).save_pretrained(d / "qwen-no-tokenizer")
    broken = Path(shutil.copytree(tiny, d / "broken-config"))
    (broken / "config.json").write_text('{"model_type": ')
    for name, key, value in [("wider", "hidden_size", 128), ("more-blocks", "num_hidden_layers", 4),
                             ("fewer-blocks", "num_hidden_layers", 2)]:  # a config.json of other weights
        folder = Path(shutil.copytree(tiny, d / name))
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(config | {key: value}))
    other = Path(shutil.copytree(tiny, d / "mismatch"))
    for f in converted_dir("smollm2").glob("tokenizer*"):
        shutil.copy(f, other)
    # an allocation made for a 2-block model of the same family: its names miss the third block
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    two = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=120))
    allocate(layer_table(two), 0.3, "uniform", model="two-block").save(d / "other-model.json")
    # allocate writes a file at sparsity 0; prune refuses it
    allocate(layer_table(LlamaForCausalLM.from_pretrained(tiny)), 0.0, "uniform", model="tiny").save(d / "zero.json")
    return d


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "analysis", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)


TINY = "--model={bad}/tiny"
CLI_CASES = [
    # options argparse refuses (one line too), and no prefix matching
    ("eval --tex {bad}/short.txt", "unrecognized arguments: --tex"),
    ("eval --eval {bad}/short.txt", "--eval-seqlen: Evaluation text has 5 tokens"),  # eval's --text, as prune names it
    ("prune --eval-seq 64", "unrecognized arguments: --eval-seq"),
    ("prune --pruner foo", "argument --pruner/--method: invalid choice: 'foo'"),
    ("allocate --allocation foo --sparsity 0.5", "argument --allocation/--method: invalid choice: 'foo'"),
    ("prune --sparsity half", "argument --sparsity: invalid float value"),
    # settings
    ("prune --sparsity 1.3", "--sparsity: sparsity must be in (0, 0.99], got 1.3"),
    ("prune --sparsity 1.2", "--sparsity: sparsity must be in (0, 0.99], got 1.2"),
    ("prune --sparsity nan", "--sparsity: sparsity must be a finite number, got nan"),
    ("prune --sparsity -0.1", "--sparsity: sparsity must be in (0, 0.99], got -0.1"),
    ("prune --epsilon 1.5", "--epsilon: epsilon = 1.5 is outside [0, 1)"),
    ("prune --epsilon -1", "--epsilon: epsilon = -1 is outside [0, 1)"),
    ("prune --allocation foo", "--allocation: must be one of uniform, alphapruning, farms, owl, auto or an allocation "
                               "JSON file; 'foo' is neither"),
    ("prune --allocation nowhere.json --method magnitude --max-windows 1", "neither"),
    ("prune --allocation {bad}/broken.json", "--allocation: {bad}/broken.json: not valid JSON"),
    ("eval --allocation {bad}/broken.json", "--allocation: {bad}/broken.json: not valid JSON"),
    ("export --allocation nowhere.json --npy {bad}/r.npy", "--allocation: nowhere.json: cannot read it (No such file"),
    ("prune --fit nonsense", "--fit: Unknown fit 'nonsense'; choose one of peak"),
    ("prune --allocation owl --owl-threshold 0", "--owl-threshold: owl_threshold must be > 0"),
    ("prune --nm 2x4", "--nm: N:M must look like '2:4', got '2x4'"),
    ("prune --nm 2:4:8", "--nm: N:M must look like '2:4', got '2:4:8'"),
    ("prune --sparsity 0.5 --nm 4:2", "--nm: N:M needs 0 < N < M, got 4:2"),
    ("prune --nm 0:4", "--nm: N:M needs 0 < N < M, got 0:4"),
    ("prune --pruner sparsegpt --nm 2:3", "--nm: SparseGPT prunes 128 input columns at a time, so an N:M pattern's M "
                                          "must divide 128 (2:4, 4:8, ...); 2:3 does not"),
    ("prune --nsamples 0", "--nsamples: n_samples must be an integer >= 1, got 0"),
    ("prune --seqlen 1", "--seqlen: seqlen must be an integer >= 2, got 1"),
    ("prune --max-windows 0", "--max-windows: max_windows must be an integer >= 1, got 0"),
    ("eval --max-windows -3", "--max-windows: max_windows must be an integer >= 1, got -3"),
    ("prune --batch-size 0", "--batch-size: batch_size must be an integer >= 1"),
    ("allocate --method uniform", "--sparsity is required"),
    # options the chosen allocation does not read, refused as prune and sweep refuse them
    ("allocate --allocation uniform --sparsity 0.5 --epsilon 0.2", "--epsilon: only alphapruning, farms and auto use "
                                                                   "it, and the allocation is uniform"),
    ("allocate --allocation uniform --sparsity 0.5 --points 0:0.3,1:0.9", "--points: only custom uses it"),
    ("allocate --allocation alphapruning --sparsity 0.5 --pruner sparsegpt", "--pruner: only auto uses it"),
    ("allocate --allocation farms --sparsity 0.5 --nsamples 4 --seed 1", "--nsamples: only owl and auto use it, and "
                                                                         "the allocation is farms, so --nsamples, "
                                                                         "--seed would be ignored"),
    ("eval --text default --eval default", "--text and --eval name the same option: give one of them"),
    ("allocate --method auto --sparsity 0", "--sparsity: an allocation search needs a sparsity above 0"),
    ("prune --allocation auto --sparsity 0", "--sparsity: sparsity must be in (0, 0.99], got 0"),
    ("prune --allocation {bad}/zero.json", "--allocation: allocation file '{bad}/zero.json' prunes nothing"),
    ("allocate --method custom --sparsity 0.5", "--allocation custom needs --points"),
    ("allocate --method custom --points 0:0.5,1:1.0 --sparsity 0.5",
     "control point '1:1.0': sparsity 1 is outside [0, 0.99]"),
    ("allocate --method custom --points 0:-0.2,1:0.5 --sparsity 0.5",
     "control point '0:-0.2': sparsity -0.2 is outside [0, 0.99]"),
    ("allocate --method custom --points 0:0.5,1.5:0.6 --as-drawn", "--points: control point '1.5:0.6': depth 1.5 is "
                                                                   "outside"),
    ("allocate --method custom --points 0:0.5,half:0.6 --as-drawn", "--points: bad control point 'half:0.6'"),
    # options the run would ignore
    ("prune --nm 2:4 --sparsity 0.7", "--sparsity: an N:M pattern (2:4) prunes every matrix to (M-N)/M, so no "
                                      "allocation or sparsity applies; drop --sparsity or --nm"),
    ("prune --nm 2:4 --allocation owl", "--allocation: an N:M pattern (2:4) prunes every matrix to (M-N)/M"),
    ("prune --allocation {bad}/other-model.json --sparsity 0.6",
     "--sparsity: {bad}/other-model.json is an allocation at sparsity 0.3, which it keeps; drop --sparsity 0.6"),
    ("prune --allocation owl --search-text {bad}/short.txt", "--search-text: only the allocation search (auto) "
                                                             "scores on a held-out text"),
    ("allocate --method uniform --sparsity 0.5 --search-text {bad}/short.txt", "--search-text: only the allocation "
                                                                               "search (auto)"),
    ("allocate --method custom --points 0:0.4,1:0.8 --as-drawn --sparsity 0.5",
     "--sparsity: --as-drawn keeps the curve's own budget, so --sparsity 0.5 would be ignored"),
    ("prune --allocation uniform --epsilon 0.2", "--epsilon: only alphapruning, farms and auto use it, and the "
                                                 "allocation is uniform, so --epsilon would be ignored; drop it"),
    ("prune --allocation owl --metric stable_rank", "--metric: only alphapruning, farms and auto use it, and the "
                                                    "allocation is owl"),
    ("prune --owl-lambda 0.1", "--owl-lambda: only owl and auto use it, and the allocation is alphapruning"),
    ("prune --search-steps 3", "--search-steps: only auto uses it, and the allocation is alphapruning"),
    ("prune --nm 2:4 --fit scan", "--fit: an N:M pattern (2:4) makes no allocation, so --fit would be ignored"),
    ("sweep --allocations uniform,owl --epsilons 0.1,0.2", "--epsilons: only alphapruning, farms and auto use it, "
                                                           "and the allocation is uniform or owl"),
    ("sweep --allocations alphapruning --owl-lambdas 0.1", "--owl-lambdas: only owl and auto use it"),
    ("sweep --allocations uniform --search-steps 4", "--search-steps: only auto uses it"),
    ("sweep --allocations {bad}/other-model.json,{bad}/./other-model.json --epsilons 0.1",
     "--epsilons: only alphapruning, farms and auto use it, and the allocation is a file, so --epsilons would be"),
    ("prune --allocation farms --metric stable_rank", "--metric: farms changes only the power-law fit, which metric "
                                                      "'stable_rank' does not use: it would be alphapruning's"),
    ("sweep --allocations alphapruning,farms --metric log_norm", "--metric: farms changes only the power-law fit"),
    # text sources
    ("prune --eval nowhere.txt", "--eval: evaluation text: Text file 'nowhere.txt' does not exist"),
    ("eval --text nowhere.txt", "--text: evaluation text: Text file 'nowhere.txt' does not exist"),
    ("eval --eval nowhere.txt", "--eval: evaluation text: Text file 'nowhere.txt' does not exist"),  # as typed
    ("prune --eval {bad}/folder", "--eval: evaluation text: '{bad}/folder' is a folder, not a text file"),
    ("prune --calib /dev/null", "--calib: calibration text: '/dev/null' is not a regular file (a device or a pipe)"),
    ("prune --calib hf:x", "--calib: calibration text: Use 'hf:<dataset>[:<config>]:<split>'"),
    ("prune --calib wikitext2:training", "Unknown WikiText-2 split 'training'"),
    ("prune --eval {bad}/binary.txt", "--eval: evaluation text: '{bad}/binary.txt' is not a text file"),
    ("allocate --method owl --sparsity 0.5 --calib {bad}/binary.txt", "--calib: calibration text: '{bad}/binary.txt' "
                                                                       "is not a text file"),
    ("prune --calib {bad}/latin1.txt", "--calib: calibration text: '{bad}/latin1.txt' is not valid utf-8 text "
                                       "(byte 0xe9 at offset 3); save it as UTF-8 or name its encoding (--encoding"),
    ("prune --eval {bad}/latin1.txt --encoding klingon", "--encoding: Unknown text encoding 'klingon'"),
    # the model's tokenizer and config, read before its weights
    (f"prune {TINY} --calib {{bad}}/short.txt", "--seqlen: Calibration text has 4 tokens, fewer than one "
                                                "window of 256"),
    (f"prune {TINY} --calib {{bad}}/short.txt --eval {{bad}}/short.txt", "fewer than one window of 256; use a "
     "longer text or shorter windows. (The text is cut in two: its first half calibrates, its second half evaluates.)"),
    (f"eval {TINY} --text {{bad}}/short.txt", "--eval-seqlen: Evaluation text has 4 tokens, fewer than one "
                                              "window of 512"),
    (f"eval {TINY} --text {{bad}}/blank.txt", "--text: The evaluation text is empty (nothing but white space)"),
    (f"prune {TINY} --calib {{bad}}/blank.txt", "--calib: The calibration text is empty"),
    (f"prune {TINY} --seqlen 4096", "--seqlen: seqlen = 4096 tokens is longer than the context of '{bad}/tiny' "
                                    "(max_position_embeddings = 2048)"),
    (f"eval {TINY} --eval-seqlen 2049", "--eval-seqlen: seqlen = 2049 tokens is longer than the context"),
    (f"prune {TINY} --nm 2:5", "--nm: N:M 2:5 needs matrix widths divisible by 5; 21 matrices of '{bad}/tiny' are "
                               "not (e.g. model.layers.0.self_attn.q_proj, width 64)"),
    (f"prune {TINY} --allocation {{bad}}/other-model.json",
     "the allocation does not fit this model: 0 of its 14 names are not prunable matrices of the model and 7 of "
     "the model's 21 prunable matrices are missing"),
    (f"eval {TINY} --allocation {{bad}}/other-model.json", "7 of the model's 21 prunable matrices are missing"),
    ("prune --model={bad}/mismatch", "The tokenizer of '{bad}/mismatch' has 49152 tokens but the model has only 120 "
                                     "embedding rows: the tokenizer belongs to another model"),
    # models, devices, dtypes
    ("prune --model nobody/no-such-model", "Could not load 'nobody/no-such-model': it is not a packaged model or "
                                           "local folder, it is not in the local Hugging Face cache"),
    ("spectra --model ./no/such/folder", "Model folder './no/such/folder' does not exist"),
    # streamed spectra fall back to the model load, which explains; no progress bar before the line
    ("spectra --model={bad}/broken-config", "Could not load '{bad}/broken-config': It looks like the config file "
                                            "at '{bad}/broken-config/config.json' is not a valid JSON file"),
    ("prune --model 'not an id!'", "is neither a packaged model, a local folder nor a Hugging Face id"),
    ("prune --model={bad}/no-tokenizer", "Could not load '{bad}/no-tokenizer': it has no tokenizer this installation "
                                         "can read"),
    ("eval --model={bad}/qwen-no-tokenizer", "Could not load '{bad}/qwen-no-tokenizer': it has no tokenizer this "
                                             "installation can read (tokenizer.json, or tokenizer.model with "
                                             "sentencepiece); copy the tokenizer files of its model beside config.json "
                                             "(what was found has 1 token)."),
    pytest.param("prune --device cuda", "--device: CUDA was requested but no CUDA device is available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")),
    ("prune --device quantum", "--device: Unknown device 'quantum'; use auto, cpu, cuda or cuda:<index>"),
    ("spectra --dtype nonsense", "--dtype: dtype must be auto, float32, bfloat16, float16, got 'nonsense'"),
    # outputs and the run store, checked before any work
    ("spectra --out {bad}/file/metrics.json", "--out: cannot write {bad}/file/metrics.json: {bad}/file is a file, "
                                              "not a folder"),
    ("spectra --out {bad}/folder", "--out: {bad}/folder is a folder, not a file"),
    ("spectra --out {bad}/m.csv --json", "--json: --out {bad}/m.csv names a CSV file; name it .json, or drop --json"),
    (f"prune {TINY} --device cpu --device-map auto", "--device: --device-map auto places the weights itself"),
    ("allocate --method uniform --sparsity 0.5 --out {bad}/file/a.json", "--out: cannot write {bad}/file/a.json"),
    ("prune --out {bad}/file/run.json", "--out: cannot write {bad}/file/run.json"),
    (f"prune {TINY} --db {{bad}}/not-a-store.sqlite", "--db: {bad}/not-a-store.sqlite is not a run store (file is "
                                                      "not a database); move it aside or choose another file"),
    ("runs --db {bad}/not-a-store.sqlite", "--db: {bad}/not-a-store.sqlite is not a run store"),
    ("runs --db {bad}/file/runs.sqlite", "--db: no run store at {bad}/file/runs.sqlite"),
    ("runs --db {bad}/no-such-store.sqlite", "--db: no run store at {bad}/no-such-store.sqlite"),  # not made empty
    ("runs --db {bad}/no-runs.sqlite --show 999", "--show: no run with id 999 in {bad}/no-runs.sqlite"),
    ("runs --db {bad}/no-runs.sqlite --delete 3-1", "--delete: expected run ids such as 3,5-7, got '3-1'"),
    ("runs --db {bad}/no-runs.sqlite --delete 2,x", "--delete: expected run ids such as 3,5-7"),
    ("runs --db {bad}/no-runs.sqlite --delete 4,9", "--delete: no run with id 4, 9 in {bad}/no-runs.sqlite (python -m "
                                                    "analysis runs lists them); nothing deleted"),
    ("runs --db {bad}/no-runs.sqlite --delete 1 --show 1", "give --show or --delete, not both"),
    # an output over one of the command's own inputs, or two outputs in one file
    ("prune --calib {bad}/short.txt --out {bad}/short.txt",
     "--out: {bad}/short.txt would overwrite what --calib reads ({bad}/short.txt); write it elsewhere"),
    ("prune --out {bad}/refused.sqlite", "--out: {bad}/refused.sqlite would overwrite what --db reads"),
    (f"spectra {TINY} --out {{bad}}/tiny/config.json", "--out: {bad}/tiny/config.json would overwrite what --model "
                                                       "reads ({bad}/tiny)"),
    ("allocate --method uniform --sparsity 0.5 --out {bad}/a.json --npy {bad}/a.json",
     "--npy: {bad}/a.json is also the --out file; give each output its own"),
    ("prune --save-model {bad}/notes --overwrite", "--save-model: {bad}/notes holds files but no saved model "
                                                   "(config.json): overwriting replaces only a model folder"),
    (f"prune {TINY} --save-model {{bad}}/tiny --overwrite",
     "--save-model: {bad}/tiny holds what --model reads ({bad}/tiny), which saving would replace"),
    (f"prune {TINY} --save-model {{bad}}/saved --out {{bad}}/saved",
     "--out: {bad}/saved is in the --save-model folder ({bad}/saved), which the export fills"),
    # the sweep's checks on the model's tokenizer: one line before its own, and before a store is made
    (f"sweep {TINY} --calib {{bad}}/short.txt", "--seqlen: Calibration text has"),
    ("sweep --model={bad}/missing", "--model: Model folder '{bad}/missing' does not exist."),
]


CASE_ARGS = [c.values[0] if hasattr(c, "marks") else c[0] for c in CLI_CASES]


@pytest.mark.parametrize("args, message", CLI_CASES, ids=CASE_ARGS)
def test_cli_bad_input_is_one_line_and_exit_2(args, message, bad):
    import shlex

    argv = shlex.split(args.format(bad=bad))
    db = bad / "refused.sqlite"
    if argv[0] in ("prune", "sweep") and "--db" not in argv:
        argv += ["--db", str(db)]  # not the user's run store
    r = run_cli(*argv)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert message.format(bad=bad) in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "Loading weights" not in r.stderr  # refused before the weights load
    assert r.stdout == ""
    assert not db.exists()  # nothing written: not even an empty store


@pytest.mark.parametrize("args, message", [
    ("spectra --model={bad}/wider", "{bad}/wider does not match its config.json: model.layers.0.self_attn.q_proj"
                                    ".weight is stored as (64, 64) but the config makes it (64, 128)"),
    ("eval --model={bad}/wider", "'{bad}/wider' does not match its config.json: "),
    ("spectra --model={bad}/more-blocks", "no tensor model.layers.3.self_attn.q_proj.weight"),
    ("prune --model={bad}/more-blocks --pruner magnitude --allocation uniform --sparsity 0.5",
     "'{bad}/more-blocks' lacks weights its config.json asks for: no model.layers.3.input_layernorm.weight"),
    ("spectra --model={bad}/fewer-blocks", "holds blocks its config.json does not have: model.layers.2."),
    ("eval --model={bad}/fewer-blocks", "holds blocks its config.json does not have: model.layers.2."),
])
def test_a_config_of_other_weights_is_refused_not_run_on_random_or_dropped_weights(args, message, bad):
    """transformers would leave a tensor of another shape or a missing block random, and drop the blocks beyond
    the config's: every number from such a model would be meaningless, so the load (or the streamed spectra)
    stops with one error line (after transformers' own report) and records nothing."""
    import shlex

    db = bad / "config-runs.sqlite"
    argv = shlex.split(args.format(bad=bad))
    if argv[0] != "spectra":
        argv += ["--max-windows", "1", "--db", str(db)] if argv[0] == "prune" else ["--max-windows", "1"]
    r = run_cli(*argv)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message.format(bad=bad) in last, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not db.exists() or len(RunStore(db)) == 0


def test_nothing_written_by_refused_runs(bad):
    """A refused prune leaves the run store as it was and writes no output file."""
    db = bad / "kept.sqlite"
    RunStore(db)
    r = run_cli("prune", f"--model={bad}/tiny", "--nm", "2:5", "--db", str(db), "--out", str(bad / "r.json"))
    assert r.returncode == 2
    assert len(RunStore(db)) == 0 and not (bad / "r.json").exists()
    assert (bad / "not-a-store.sqlite").read_bytes() == b"this is not a SQLite file " * 100  # left as it was


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """The 3-block checkpoint alone, for the cases that need no WikiText-2 (the `bad` folder does)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny")


def nan_copy(folder: Path, to: Path) -> Path:
    """A copy of the checkpoint `folder` with one NaN in block 1's down projection."""
    from transformers import AutoModelForCausalLM

    to = Path(shutil.copytree(folder, to))
    model = AutoModelForCausalLM.from_pretrained(to)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(to)
    return to


def test_nan_weights_are_refused_before_the_dense_evaluation(tiny_folder, tmp_path):
    """A NaN is found once the weights are read, before the dense perplexity (hours on a large model) and
    before anything is pruned; the run store keeps nothing."""
    folder = nan_copy(tiny_folder, tmp_path / "nan")
    db = tmp_path / "runs.sqlite"
    r = run_cli("prune", f"--model={folder}", "--method", "magnitude", "--allocation", "uniform", "--sparsity", "0.5",
                "--eval", "default", "--eval-seqlen", "32", "--max-windows", "1", "--db", str(db))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "error: 'model.layers.1.mlp.down_proj' has non-finite weights (NaN or inf), which no pruner can rank; "
        "nothing was pruned (the Spectra page and `spectra` flag such matrices)")
    assert "perplexity" not in r.stderr and len(RunStore(db)) == 0
    # evaluating it or allocating from its spectra (streamed from its shards) works, with a word that the numbers
    # mean nothing
    for args in (["eval", "--text", "default", "--eval-seqlen", "32", "--max-windows", "1"],
                 ["allocate", "--allocation", "alphapruning", "--sparsity", "0.5"]):
        r = run_cli(*args, f"--model={folder}")
        assert r.returncode == 0 and "warning: 'model.layers.1.mlp.down_proj' has non-finite weights" in r.stderr


def test_the_dashboard_says_at_load_that_weights_are_nan_and_prunes_none_of_them(tiny_folder, tmp_path):
    """The Model page says which matrix has NaN weights as soon as the model is loaded, every page that uses it
    repeats it, the Spectra page counts the matrix as not fitted, and Prune's Run is off."""
    from streamlit.testing.v1 import AppTest

    folder = nan_copy(tiny_folder, tmp_path / "nan")
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.run()
    at.radio(key="model_choice").set_value("Local checkpoint folder").run()
    at.text_input(key="model_folder").input(str(folder)).run()
    at.button(key="model_load").click().run()
    assert not at.exception and at.success[0].value.startswith("Loaded **")
    said = "'model.layers.1.mlp.down_proj' has non-finite weights (NaN or inf)"
    assert [w.value for w in at.warning if said in w.value], [w.value for w in at.warning]
    at.switch_page("pages/spectra.py").run()
    for _ in range(120):  # the spectra run in the background
        if any("not fitted: non-finite weights" in c.value for c in at.caption):
            break
        time.sleep(0.5)
        at.run()
    assert any("21 prunable" in c.value and "; 1 not fitted: non-finite weights)" in c.value for c in at.caption)
    assert any(said in w.value for w in at.warning)
    at.switch_page("pages/allocation.py").run()  # the preset says what it did with the matrix it could not fit
    assert not at.exception and any(w.value.startswith("alphapruning: ") for w in at.warning), \
        [w.value for w in at.warning]
    at.switch_page("pages/prune.py").run()
    assert not at.exception and any(said in w.value for w in at.warning)
    assert at.button(key="prune_run").disabled


def test_work_on_the_weights_alone_needs_no_tokenizer(tiny_folder, tmp_path):
    """A folder of weights and config.json (no tokenizer files) is enough for what reads no text: the spectra of a
    checkpoint that cannot be streamed, an allocation from the spectra, its export. What reads text names the
    missing tokenizer."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "weights-only"
    folder.mkdir()
    shutil.copy(tiny_folder / "config.json", folder)
    model = AutoModelForCausalLM.from_pretrained(tiny_folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # not streamable: the spectra load the model
    assert not any(folder.glob("*.safetensors")) and not any(folder.glob("tokenizer*"))
    r = run_cli("spectra", f"--model={folder}", "--out", str(tmp_path / "alpha.csv"))
    assert r.returncode == 0 and len(pd.read_csv(tmp_path / "alpha.csv")) == 21, r.stderr[-2000:]
    for allocation in ("uniform", "alphapruning"):
        out = tmp_path / f"{allocation}.json"
        r = run_cli("allocate", f"--model={folder}", "--allocation", allocation, "--sparsity", "0.5", "--out", str(out))
        assert r.returncode == 0 and json.loads(out.read_text())["method"] == allocation, r.stderr[-2000:]
    r = run_cli("export", "--allocation", str(tmp_path / "alphapruning.json"), "--npy", str(tmp_path / "a.npy"))
    assert r.returncode == 0 and "not read" not in r.stderr, r.stderr[-2000:]  # its module order was read
    r = run_cli("allocate", f"--model={folder}", "--allocation", "owl", "--sparsity", "0.5")
    assert r.returncode == 2 and "it has no tokenizer this installation can read" in r.stderr, r.stderr[-2000:]


def test_a_search_scored_on_the_evaluation_text_is_refused_or_named(tiny_folder, tmp_path):
    """The search text is compared with the evaluation text by name and by bytes (a copy under another name is
    the same text): prune refuses it; a searched allocation records it, and evaluating on it is named."""
    from analysis.data import default_corpus_path

    copy = tmp_path / "copy.txt"
    shutil.copyfile(default_corpus_path(), copy)
    r = run_cli("prune", f"--model={tiny_folder}", "--allocation", "auto", "--search-text", str(copy), "--eval",
                "default", "--db", str(tmp_path / "runs.sqlite"))
    assert r.returncode == 2 and "the search text must not be the evaluation text" in r.stderr, r.stderr[-2000:]
    out = tmp_path / "auto.json"
    r = run_cli("allocate", f"--model={tiny_folder}", "--allocation", "auto", "--sparsity", "0.5", "--search-text",
                str(copy), "--search-steps", "1", "--nsamples", "2", "--seqlen", "32", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(out.read_text())["params"]["search_text"]["source"] == str(copy)
    r = run_cli("eval", f"--model={tiny_folder}", "--allocation", str(out), "--text", "default", "--eval-seqlen", "32",
                "--max-windows", "1", "--nsamples", "2", "--seqlen", "32")
    assert r.returncode == 0 and f"warning: this allocation's search was scored on {copy}, the text this run is " \
        "evaluated on" in r.stderr, r.stderr[-2000:]
    shutil.copyfile(copy, tmp_path / "test.txt")
    r = run_cli("allocate", f"--model={tiny_folder}", "--allocation", "auto", "--sparsity", "0.5", "--search-text",
                str(tmp_path / "test.txt"), "--search-steps", "1", "--nsamples", "2", "--seqlen", "32")
    assert r.returncode == 0 and f"warning: --search-text {tmp_path / 'test.txt'} names a test split" in r.stderr


def test_owl_ratios_measured_on_the_evaluation_text_are_named(tiny_folder, tmp_path):
    """allocate measures OWL's outlier ratios on the whole calibration text (prune would calibrate on the half it
    does not evaluate): the file records that text, and a run evaluated on it says its perplexity is not held out."""
    from analysis.data import default_corpus_path

    copy = tmp_path / "copy.txt"
    shutil.copyfile(default_corpus_path(), copy)
    out = tmp_path / "owl.json"
    r = run_cli("allocate", f"--model={tiny_folder}", "--allocation", "owl", "--sparsity", "0.5", "--calib", str(copy),
                "--nsamples", "2", "--seqlen", "32", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(out.read_text())["params"]["calibration"]["source"] == str(copy)
    common = ["--eval-seqlen", "32", "--max-windows", "1", "--nsamples", "2", "--seqlen", "32"]
    r = run_cli("eval", f"--model={tiny_folder}", "--allocation", str(out), "--text", "default", *common)
    assert r.returncode == 0 and f"warning: this allocation's OWL ratios were measured on {copy}, the text this run " \
        "is evaluated on, all of it" in r.stderr, r.stderr[-2000:]  # the same bytes under another name
    other = tmp_path / "other.txt"
    other.write_text(" ".join(f"word{i % 89}" for i in range(3000)))
    r = run_cli("eval", f"--model={tiny_folder}", "--allocation", str(out), "--text", str(other), *common)
    assert r.returncode == 0 and "OWL ratios were measured" not in r.stderr, r.stderr[-2000:]


def test_export_refuses_an_allocation_that_misses_a_matrix(tiny_folder, tmp_path):
    """AlphaPruning's .npy is a list in module order: a matrix missing from the file would shift every ratio after
    it onto the wrong matrix. Export checks the file against its model as prune does."""
    r = run_cli("allocate", f"--model={tiny_folder}", "--allocation", "uniform", "--sparsity", "0.5", "--out",
                str(tmp_path / "a.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads((tmp_path / "a.json").read_text())
    del d["per_layer"]["model.layers.0.mlp.down_proj"]
    (tmp_path / "missing.json").write_text(json.dumps(d))
    r = run_cli("export", "--allocation", str(tmp_path / "missing.json"), "--npy", str(tmp_path / "a.npy"))
    assert r.returncode == 2 and "no ratio for 'model.layers.0.mlp.down_proj'" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "a.npy").exists()


def test_a_run_records_allocation_says_how_that_run_pruned(tiny_folder, tmp_path):
    """A run record given as --allocation brings its ratios, not its pruner or row-wise refinement: pruned otherwise
    the result is not that run's, and the run says so (an N:M pattern, which is part of the ratios, is replayed)."""
    r = run_cli("prune", f"--model={tiny_folder}", "--pruner", "wanda", "--allocation", "uniform", "--sparsity", "0.5",
                "--rowwise", "trim", "--nsamples", "2", "--seqlen", "32", "--eval", "default", "--eval-seqlen", "32",
                "--max-windows", "1", "--db", str(tmp_path / "runs.sqlite"), "--out", str(tmp_path / "run.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    common = ["--allocation", str(tmp_path / "run.json"), "--nsamples", "2", "--seqlen", "32", "--eval", "default",
              "--eval-seqlen", "32", "--max-windows", "1", "--db", str(tmp_path / "runs.sqlite")]
    caveat = "warning: this allocation is a run record's, whose run pruned with wanda with row-wise TRIM"
    r = run_cli("prune", f"--model={tiny_folder}", "--pruner", "wanda", *common)
    assert r.returncode == 0 and f"{caveat}; pruned here with wanda, the result" in r.stderr, r.stderr[-2000:]
    r = run_cli("prune", f"--model={tiny_folder}", "--pruner", "wanda", "--rowwise", "trim", *common)
    assert r.returncode == 0 and "run record's" not in r.stderr, r.stderr[-2000:]
    r = run_cli("eval", f"--model={tiny_folder}", "--pruner", "magnitude", *common[:-2])
    assert r.returncode == 0 and f"{caveat}; pruned here with magnitude, the result" in r.stderr, r.stderr[-2000:]


def test_a_run_that_reads_no_calibration_text_ignores_its_length(tiny_folder, tmp_path):
    """Magnitude with a uniform allocation reads no calibration text: one too short is no reason to refuse
    it; Wanda is refused with the same text."""
    short = tmp_path / "short.txt"
    short.write_text("just four words here\n")
    common = ["--allocation", "uniform", "--sparsity", "0.5", "--calib", str(short), "--eval", "default",
              "--eval-seqlen", "32", "--max-windows", "1", "--db", str(tmp_path / "runs.sqlite")]
    r = run_cli("prune", f"--model={tiny_folder}", "--method", "magnitude", *common)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "no calibration text read (magnitude with this allocation does not use --calib)" in r.stderr
    assert len(RunStore(tmp_path / "runs.sqlite")) == 1
    r = run_cli("prune", f"--model={tiny_folder}", "--method", "wanda", *common)
    assert r.returncode == 2 and "--seqlen: Calibration text has" in r.stderr


def test_an_nm_runs_allocation_replays_with_its_pattern(tiny_folder, tmp_path):
    """A 2:4 run's allocation (every ratio 0.5, params.nm "2:4") given back to prune or eval prunes 2:4 again, with a
    note: unstructured 50% would be another model."""
    from transformers import AutoModelForCausalLM

    from analysis.layers import layer_table

    alloc = allocate(layer_table(AutoModelForCausalLM.from_pretrained(tiny_folder)), 0.5, "uniform",
                     model=str(tiny_folder))
    alloc.params["nm"] = "2:4"
    path = alloc.save(tmp_path / "nm.json")
    common = ["--method", "magnitude", "--allocation", str(path), "--eval", "default", "--eval-seqlen", "32",
              "--max-windows", "1"]
    r = run_cli("prune", f"--model={tiny_folder}", *common, "--db", str(tmp_path / "runs.sqlite"),
                "--out", str(tmp_path / "r.json"), "--save-model", str(tmp_path / "saved"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"note: {path} was made for the N:M pattern 2:4: the run prunes with that pattern" in r.stderr
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["config"]["nm"] == [2, 4] and record["config"]["allocation"] == "n:m"
    assert record["config"]["epsilon"] is None  # the file's (a uniform allocation has none), not --epsilon's default
    r = run_cli("prune", f"--model={tiny_folder}", *common, "--epsilon", "0.1", "--fit=scan")
    assert r.returncode == 2 and r.stderr == (f"error: --epsilon: {path} is an allocation with its own ratios, so "
                                              "--epsilon, --fit would be ignored; drop them\n")
    r = run_cli("eval", f"--model={tiny_folder}", *common)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "pruned with magnitude + uniform, 2:4: 0.5000 sparsity" in r.stderr
    # the model it saved, evaluated as it is, is not called dense
    r = run_cli("eval", f"--model={tmp_path / 'saved'}", *common[4:])
    assert r.returncode == 0 and "sparse perplexity" in r.stderr and "dense" not in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("args, message", [
    (["prune", "--limit", "3"], "--limit: no --tasks are given, so --limit would be ignored; drop it"),
    (["prune", "--save-format", "compressed", "--overwrite"],
     "--save-format: --save-model is not given, so --save-format, --overwrite would be ignored; drop them"),
    (["eval", "--tasks", "cloze", "--max-windows", "2"],
     "--max-windows: eval --tasks scores the zero-shot tasks instead of perplexity (measure it in a run of its own), "
     "so --max-windows would be ignored; drop it"),
])
def test_options_a_command_would_ignore_are_refused(tiny_folder, tmp_path, capsys, args, message):
    from analysis.cli import main

    assert main([args[0], f"--model={tiny_folder}", "--eval", "default", "--db", str(tmp_path / "r.sqlite"),
                 *args[1:]] if args[0] == "prune" else [args[0], f"--model={tiny_folder}", *args[1:]]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_a_run_says_before_loading_when_it_may_not_fit_in_memory(tiny_folder, tmp_path, capsys, monkeypatch):
    """An estimate above the free memory is a warning before the weights load (the estimate is an upper bound)."""
    from analysis.cli import main

    monkeypatch.setenv("ALPHASCOPE_MEMORY_LIMIT_BYTES", "100000")
    assert main(["prune", f"--model={tiny_folder}", "--method", "magnitude", "--allocation", "uniform", "--eval",
                 "default", "--eval-seqlen", "32", "--max-windows", "1", "--db", str(tmp_path / "r.sqlite")]) == 0
    err = capsys.readouterr().err
    assert f"warning: '{tiny_folder}' may not fit here to be loaded and pruned: it needs up to" in err
    assert err.index("may not fit here to be loaded and pruned") < err.index("perplexity")
    assert "original values" not in err  # the command line prunes the model it loaded: no copy of them is kept
    assert "no calibration text read; evaluation on default" in err  # magnitude + uniform reads none
    assert main(["eval", f"--model={tiny_folder}", "--text", "default", "--eval-seqlen", "32",
                 "--max-windows", "1"]) == 0
    assert f"warning: '{tiny_folder}' may not fit here to be loaded and evaluated" in capsys.readouterr().err
    assert main(["allocate", f"--model={tiny_folder}", "--allocation", "owl", "--sparsity", "0.5", "--nsamples", "2",
                 "--seqlen", "32"]) == 0
    assert f"warning: '{tiny_folder}' may not fit here to be loaded and allocated" in capsys.readouterr().err
    # a search holds more than a prune: its caches are counted and named (analysis.search.search_memory)
    assert main(["allocate", f"--model={tiny_folder}", "--allocation", "auto", "--sparsity", "0.5", "--nsamples", "2",
                 "--seqlen", "32", "--search-steps", "1", "--search-verify", "none", "--out",
                 str(tmp_path / "auto.json")]) == 0
    assert "the allocation search's caches" in capsys.readouterr().err
    # an allocation of the weights alone reads the checkpoint's shards one matrix at a time: it loads no model
    assert main(["allocate", f"--model={tiny_folder}", "--allocation", "alphapruning", "--sparsity", "0.5"]) == 0
    assert "may not fit here" not in capsys.readouterr().err
    # room for the weights and the run's working memory, not for a copy of the pruned matrices: no warning
    est = estimate_memory(str(tiny_folder), "float32", 16, 256, 1, 32)
    monkeypatch.setenv("ALPHASCOPE_MEMORY_LIMIT_BYTES", str(est.weights + est.working + est.prunable // 2))
    assert main(["prune", f"--model={tiny_folder}", "--pruner", "magnitude", "--allocation", "uniform", "--eval",
                 "default", "--eval-seqlen", "32", "--max-windows", "1", "--db", str(tmp_path / "r.sqlite")]) == 0
    assert "may not fit here to be loaded and pruned" not in capsys.readouterr().err
    # a sweep restores its dense weights before each run: it keeps their copy, and says so before it starts
    monkeypatch.setenv("ALPHASCOPE_MEMORY_LIMIT_BYTES", "100000")
    assert main(["sweep", f"--model={tiny_folder}", "--pruners", "magnitude", "--allocations", "uniform",
                 "--sparsities", "0.5", "--eval", "default", "--eval-seqlen", "32", "--max-windows", "1",
                 "--db", str(tmp_path / "s.sqlite")]) == 0
    err = capsys.readouterr().err
    assert "original values of the pruned matrices" in err and "Hessians" not in err
    assert err.index("may not fit here to be loaded and pruned") < err.index("dense reference")


def test_a_calibration_batch_longer_than_its_text_is_a_warning(tiny_folder, tmp_path, capsys):
    from analysis.cli import main

    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog near the river bank today. " * 20)
    args = ["prune", f"--model={tiny_folder}", "--method", "wanda", "--allocation", "uniform", "--calib", str(text),
            "--seqlen", "32", "--eval", "default", "--eval-seqlen", "32", "--max-windows", "1", "--db",
            str(tmp_path / "r.sqlite"), "--out", str(tmp_path / "r.json")]
    assert main([*args, "--nsamples", "64"]) == 0
    assert re.search(r"warning: calibration asks for 64 x 32 = 2048 tokens of a text of \d+: its windows overlap",
                     capsys.readouterr().err)
    assert any("its windows overlap" in w for w in json.loads((tmp_path / "r.json").read_text())["warnings"])
    assert main([*args, "--nsamples", "2"]) == 0
    assert "windows overlap" not in capsys.readouterr().err


def test_a_dataset_that_cannot_be_read_names_the_option(tiny_folder):
    r = run_cli("eval", f"--model={tiny_folder}", "--text", "hf:nosuch_dataset_xyz:test", "--max-windows", "1")
    assert r.returncode == 2 and r.stderr.startswith("error: --text: "), r.stderr[-2000:]
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args, ignored", [(["--pruner", "sparsegpt"], "--pruner"),
                                           (["--method", "sparsegpt"], "--pruner"),  # its older name
                                           (["--nsamples", "4", "--seed", "3"], "--nsamples, --seed")])
def test_eval_without_an_allocation_refuses_the_options_it_would_ignore(tiny_folder, args, ignored):
    r = run_cli("eval", f"--model={tiny_folder}", "--eval", "default", *args)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"error: {ignored.split(',')[0]}: only eval --allocation prunes (and calibrates); ")
    assert f"{ignored} would be ignored" in r.stderr


def test_every_command_names_the_pruner_and_the_allocation_alike_and_takes_the_older_names():
    from analysis.cli import build_parser

    parse = build_parser().parse_args
    for command, new, old, value in [("prune", "--pruner", "--method", "sparsegpt"),
                                     ("eval", "--pruner", "--method", "sparsegpt"),
                                     ("sweep", "--pruners", "--methods", "wanda,sparsegpt"),
                                     ("allocate", "--allocation", "--method", "owl")]:
        a, b = parse([command, new, value]), parse([command, old, value])
        assert (a.methods if command == "sweep" else a.method) == value
        assert vars(a) == vars(b)
    assert parse(["allocate", "--allocation", "auto", "--pruner", "wanda"]).pruner == "wanda"


def test_an_option_given_by_both_its_names_is_refused(capsys):
    from analysis.cli import main

    assert main(["sweep", "--pruners", "wanda", "--methods", "magnitude", "--sparsities", "0.5"]) == 2
    assert capsys.readouterr().err == "error: --pruners and --methods name the same option: give one of them\n"
    assert main(["allocate", "--allocation=owl", "--method", "uniform", "--sparsity", "0.5"]) == 2
    assert "--allocation and --method name the same option" in capsys.readouterr().err


def test_an_allocation_made_for_another_model_of_the_same_names_is_a_warning(tiny_folder, tmp_path):
    """The names fit, so it applies, but its ratios were chosen for another model's layers: said; the same
    model spelled otherwise (a trailing slash) is no other model. A file whose ratios were edited by hand
    without its sparsity is applied as its ratios say, with a warning."""
    from transformers import AutoModelForCausalLM

    other = Path(shutil.copytree(tiny_folder, tmp_path / "other"))
    alloc = allocate(layer_table(AutoModelForCausalLM.from_pretrained(tiny_folder)), 0.5, "uniform",
                     model=str(tiny_folder)).save(tmp_path / "alloc.json")
    common = ["--allocation", str(alloc), "--method", "magnitude", "--eval", "default", "--eval-seqlen", "32",
              "--max-windows", "1"]
    warned = f"warning: this allocation was made for {tiny_folder}, not {other}: its ratios were chosen"
    r = run_cli("eval", f"--model={other}", *common)
    assert r.returncode == 0 and warned in r.stderr, r.stderr[-2000:]
    r = run_cli("eval", f"--model={tiny_folder}/", *common)
    assert r.returncode == 0 and "was made for" not in r.stderr, r.stderr[-2000:]
    # a file edited by hand: its ratios prune more than both numbers it states
    import json

    d = json.loads(alloc.read_text())
    d["per_layer"] = {name: 0.7 for name in d["per_layer"]}
    alloc.write_text(json.dumps(d))
    r = run_cli("eval", f"--model={tiny_folder}", *common)
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("warning: the allocation says sparsity 50.00% (achieved 50.00%), but on this model its ratios prune "
            "70.00% of the weights (edited by hand?)") in r.stderr
    assert "pruned with magnitude + uniform: 0.7" in r.stderr
    # or its sparsity alone: the run record would say 30% of a run that prunes 70%
    d["sparsity"], d["achieved"] = 0.3, 0.7
    alloc.write_text(json.dumps(d))
    r = run_cli("eval", f"--model={tiny_folder}", *common)
    assert r.returncode == 0 and ("warning: the allocation says sparsity 30.00% (achieved 70.00%), but on this model "
                                  "its ratios prune 70.00% of the weights") in r.stderr, r.stderr[-2000:]
    # or its achieved alone; and its per_block, still the 0.5 of the file it was, is not what its blocks prune
    d["sparsity"], d["achieved"] = 0.7, 0.9
    alloc.write_text(json.dumps(d))
    r = run_cli("eval", f"--model={tiny_folder}", *common)
    assert r.returncode == 0 and "warning: the allocation says sparsity 70.00% (achieved 90.00%)" in r.stderr
    assert ("warning: per_block[0] is 0.500000 but its matrices' ratios in per_layer average 0.700000 (edited by "
            "hand?); what prunes is its per_layer ratios") in r.stderr, r.stderr[-2000:]
    d["per_block"], d["achieved"] = [0.7] * (len(d["per_block"]) + 1), 0.7
    alloc.write_text(json.dumps(d))
    r = run_cli("eval", f"--model={tiny_folder}", *common)
    assert r.returncode == 0 and "warning: per_block has 4 ratios, the model has 3 blocks" in r.stderr, r.stderr[-2000:]
    assert "the allocation says" not in r.stderr


def test_out_into_a_missing_folder_is_made_and_a_file_replaced_says_so(bad):
    """A missing output folder is not an error: it is made (for spectra as for allocate and prune). An existing
    file is replaced, with a note before the run."""
    out = bad / "new" / "folder" / "metrics.csv"
    r = run_cli("spectra", f"--model={bad}/tiny", "--device", "cpu", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(pd.read_csv(out)) == 21 and "exists" not in r.stderr
    out.write_text("an earlier table\n")
    r = run_cli("spectra", f"--model={bad}/tiny", "--device", "cpu", "--out", str(out))
    assert r.returncode == 0 and f"note: --out: {out} exists; it will be replaced" in r.stderr, r.stderr[-2000:]
    assert len(pd.read_csv(out)) == 21


# --------------------------------------------------------------------------------------------
# the engine's functions behind those messages


def test_text_files_binary_encoding(bad):
    assert "is not a text file" in text_source_problem(str(bad / "binary.txt"))
    assert "is not valid utf-8 text" in text_source_problem(str(bad / "latin1.txt"))
    assert text_source_problem(str(bad / "latin1.txt"), "latin-1") is None
    assert load_text(str(bad / "latin1.txt"), encoding="latin-1").startswith("Café crème")
    with pytest.raises(DataError, match="is not valid utf-8"):
        load_text(str(bad / "latin1.txt"))
    with pytest.raises(DataError, match="not a text file"):
        load_text(str(bad / "binary.txt"))
    assert load_text(str(bad / "short.txt")) == "just four words here\n"
    utf16 = bad / "utf16.txt"
    utf16.write_text("wide text", encoding="utf-16")  # NUL bytes, but text in the encoding named
    assert load_text(str(utf16), encoding="utf-16") == "wide text"


def test_uploads_too_large_or_not_text_are_not_kept(tmp_path):
    with pytest.raises(DataError, match=f"uploads are limited to {MAX_UPLOAD_MB} MB"):
        save_text("big.txt", b"a" * (MAX_UPLOAD_MB * 2**20 + 1), tmp_path)
    with pytest.raises(DataError, match="not a text file"):
        save_text("photo.txt", bytes(range(256)), tmp_path)
    with pytest.raises(DataError, match="not valid utf-8"):
        save_text("latin.txt", LATIN1, tmp_path)
    assert list(tmp_path.iterdir()) == []
    kept = save_text("latin.txt", LATIN1, tmp_path, encoding="latin-1")  # the Prune page's Text encoding
    assert kept.read_bytes() == LATIN1


def test_locked_store_refuses_and_keeps_earlier_runs(tmp_path):
    from analysis.pipeline import make_record

    store = RunStore(tmp_path / "runs.sqlite", timeout=0.2)
    store.add(make_record({"model": "a"}, None, None, 1.0, 2.0, {}))
    holder = sqlite3.connect(store.path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process writing
    with pytest.raises(StoreError, match="is locked by another process"):
        store.add(make_record({"model": "b"}, None, None, 1.0, 2.0, {}))
    with pytest.raises(StoreError, match="is locked by another process"):  # what prune and sweep ask before a run
        RunStore(store.path, timeout=0.2).check_writable()
    assert list(store.all()["model"]) == ["a"]  # readers still see the earlier runs (WAL)
    holder.execute("ROLLBACK")
    assert store.check_writable() is store
    store.add(make_record({"model": "c"}, None, None, 1.0, 2.0, {}))
    assert list(store.all()["model"]) == ["a", "c"]


def test_other_sqlite_file_is_not_a_run_store(tmp_path):
    path = tmp_path / "other.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE runs (x)")
    with pytest.raises(StoreError, match="is not a run store"):
        RunStore(path)


# --------------------------------------------------------------------------------------------
# the dashboard


@pytest.fixture()
def corrupt_runs_db(bad):
    old = os.environ.get("ALPHASCOPE_RUNS_DB")
    os.environ["ALPHASCOPE_RUNS_DB"] = str(bad / "not-a-store.sqlite")
    yield bad / "not-a-store.sqlite"
    if old is None:
        os.environ.pop("ALPHASCOPE_RUNS_DB", None)
    else:
        os.environ["ALPHASCOPE_RUNS_DB"] = old


def test_app_with_a_corrupt_run_store_starts_and_says_so(corrupt_runs_db, bad):
    """The app starts; Compare and Prune's Run show the store's problem in an error box; uploads that
    are too large or not text are refused on the Prune page. (A small local checkpoint is loaded.)"""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.run()
    assert not at.exception
    at.switch_page("pages/compare.py").run()
    assert not at.exception
    assert [e.value for e in at.error] == [f"{corrupt_runs_db} is not a run store (file is not a database); move it "
                                           "aside or choose another file (--db, or $ALPHASCOPE_RUNS_DB)."]
    at.switch_page("pages/model.py").run()
    at.radio(key="model_choice").set_value("Local checkpoint folder").run()
    at.text_input(key="model_folder").input(str(bad / "tiny")).run()
    at.button(key="model_load").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]

    at.switch_page("pages/prune.py").run()
    at.selectbox(key="prune_alloc").set_value("uniform").run()
    upload = at.file_uploader(key="prune_text_upload")
    upload.set_value(("big.txt", b"word " * (MAX_UPLOAD_MB * 2**20 // 5 + 1), "text/plain")).run()
    assert not at.exception
    assert any(f"uploads are limited to {MAX_UPLOAD_MB} MB" in e.value for e in at.error), [e.value for e in at.error]
    at.file_uploader(key="prune_text_upload").set_value(("photo.txt", bytes(range(256)) * 4, "text/plain")).run()
    assert any("Upload refused: 'photo.txt' is not a text file" in e.value for e in at.error)
    assert at.selectbox(key="prune_eval_source").value == "default"  # the evaluation text did not change
    at.file_uploader(key="prune_text_upload").set_value(None).run()
    at.button(key="prune_run").click().run()
    assert not at.exception
    assert any("is not a run store" in e.value and "The run was not started." in e.value for e in at.error)
    assert "_prune_seen" not in at.session_state and not at.get("progress")  # no job started


def test_every_case_is_listed_once():
    assert len(CASE_ARGS) == len(set(CASE_ARGS)) >= 30
    assert {a.split()[0] for a in CASE_ARGS} == {"prune", "eval", "allocate", "spectra", "runs", "export", "sweep"}


def test_an_export_neither_overwrites_its_allocation_nor_writes_two_outputs_in_one_file(bad, tmp_path):
    alloc = tmp_path / "alloc.json"
    shutil.copy(bad / "other-model.json", alloc)
    for args, message in ((["--recipe", str(alloc)], f"--recipe: {alloc} would overwrite what --allocation reads"),
                          (["--recipe", str(tmp_path / "r"), "--npy", str(tmp_path / "r")],
                           f"--npy: {tmp_path / 'r'} is also the --recipe file")):
        r = run_cli("export", "--allocation", str(alloc), *args)
        assert r.returncode == 2 and r.stderr.startswith(f"error: {message}"), r.stderr
    assert alloc.read_bytes() == (bad / "other-model.json").read_bytes() and not (tmp_path / "r").exists()


def test_output_cut_short_by_its_reader_is_no_error():
    """`python -m analysis runs --show 3 | head`: the reader closes the pipe; no "error: Broken pipe" line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "analysis", "models"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT, env=env)
    proc.stdout.close()  # before the command writes its first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == ""

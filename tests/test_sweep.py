"""Sweeps (analysis.sweep): grid expansion, bad grids, resume from the run store, and the same sweep
in this process and on a local Ray (2 CPUs) with a worker killed once and a configuration that
always fails. Models are tiny LLaMAs saved to a temporary folder, so Ray workers load them by path."""
import http.server
import os
import re
import socket
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from conftest import save_tiny_llama, tiny_sweep_base

from analysis.allocation import allocate
from analysis.layers import layer_table
from analysis.loading import load_model
from analysis.pipeline import run, spectra_used
from analysis.settings import AllocationSettings, ModelSettings, RunSettings, SettingsError
from analysis.store import RunStore
from analysis.sweep import (
    CANCELLED,
    DONE,
    FAILED,
    FAULT_FILE_ENV,
    SKIPPED,
    SweepGrid,
    allocation_label,
    config_key,
    config_label,
    finished_keys,
    measure_dense,
    parse_values,
    run_config,
    run_sweep,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_sweep_base(tmp_path_factory.mktemp("sweep"))


def allocation_file(path: Path, blocks: int) -> str:
    """A uniform allocation JSON for a tiny LLaMA with `blocks` blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=blocks, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=120)
    allocate(layer_table(LlamaForCausalLM(cfg)), 0.4, "uniform").save(path)
    return str(path)


def grid(base, **axes):
    return SweepGrid(base, **{"methods": ("wanda",), "allocations": ("uniform", "alphapruning"), "sparsities": (0.5,),
                              "seeds": (0, 1), **axes})


def test_expansion_crosses_the_axes(tiny, tmp_path):
    file = allocation_file(tmp_path / "alloc.json", 3)
    g = SweepGrid(tiny, methods=("wanda", "magnitude"), allocations=("uniform", "alphapruning", "owl", file),
                  curves=(((0.0, 0.4), (1.0, 0.8)),), sparsities=(0.5, 0.6), epsilons=(0.1, 0.3),
                  owl_lambdas=(0.05,), seeds=(0, 1)).check()
    configs = g.expand()
    # wanda: uniform 2 sparsities x 2 seeds, alphapruning x 2 epsilons, owl x 1 lambda, the file (its own
    # sparsity) x 2 seeds, the curve 2 x 2; magnitude reads calibration text only for OWL: one seed elsewhere
    assert len(configs) == (4 + 8 + 4 + 2 + 4) + (2 + 4 + 4 + 1 + 2)
    assert {c.calibration.seed for c in configs if c.prune.method == "magnitude" and c.allocation.method != "owl"} \
        == {0}
    assert len({config_key(c) for c in configs}) == len(configs)
    alpha = [c for c in configs if c.allocation.method == "alphapruning"]
    assert {(c.allocation.sparsity, c.allocation.epsilon) for c in alpha} == {(0.5, 0.1), (0.5, 0.3), (0.6, 0.1),
                                                                              (0.6, 0.3)}
    assert {c.allocation.owl_lambda for c in configs if c.allocation.method == "owl"} == {0.05}
    assert {c.calibration.seed for c in configs} == {0, 1}
    assert all(c.calibration.n_samples == 4 and c.evaluation.max_windows == 6 for c in configs)
    custom = [c for c in configs if c.allocation.method == "custom"]
    assert len(custom) == 6 and custom[0].allocation.points == ((0.0, 0.4), (1.0, 0.8))
    # the file's configurations are shown at its own sparsity (0.4), not the grid's
    from analysis.sweep import Outcome, outcome_table

    at_file = next(c for c in configs if c.allocation.method == "file")
    assert outcome_table([Outcome("k", at_file, "skipped")])["sparsity"].tolist() == [0.4]
    # a run deleted from the store since the sweep stored it is not shown as if it were there
    outcomes = [Outcome("a", at_file, "done", run_id=3), Outcome("b", at_file, "skipped", run_id=5),
                Outcome("c", at_file, "failed")]
    assert outcome_table(outcomes, stored={5: 0})["status"].tolist() == ["deleted", "skipped", "failed"]
    assert outcome_table(outcomes)["status"].tolist() == ["done", "skipped", "failed"]
    assert " at 0.4, seed" in config_label(at_file)
    # a key follows the settings, not the object: equal settings rebuilt give the same key
    assert config_key(RunSettings.from_dict(configs[0].to_dict())) == config_key(configs[0])


def test_a_stored_run_is_named_by_its_settings():
    """The Compare page's lines: runs of another ε, λ, TRIM or calibration are not one line; an N:M run is named by
    its pattern (it takes no allocation); a record without readable settings gets no name from them."""
    from analysis.settings import AllocationSettings, CalibrationSettings, PruneSettings
    from analysis.sweep import run_line

    def named(**parts):
        return run_line({"config": {"settings": RunSettings(**parts).to_dict()}})

    alpha = AllocationSettings(method="alphapruning", epsilon=0.2)
    assert named(allocation=alpha, prune=PruneSettings("wanda")) == \
        {"line": "wanda + alphapruning ε=0.2", "setup": "calib default 16×256"}
    assert named(allocation=AllocationSettings(method="owl", owl_lambda=0.04), prune=PruneSettings("sparsegpt",
                                                                                                   rowwise="trim"),
                 calibration=CalibrationSettings(n_samples=4, seqlen=64)) == \
        {"line": "sparsegpt + owl λ=0.04 + trim", "setup": "calib default 4×64"}
    assert named(allocation=alpha, prune=PruneSettings("magnitude", nm="2:4"))["line"] == "magnitude + 2:4"
    # a run is named by the dtype it ran in: "auto" that picked float32 and float32 asked for are one setup
    from analysis.settings import ModelSettings

    def ran(dtype_asked: str, dtype_used: str) -> str:
        settings = RunSettings(model=ModelSettings(dtype=dtype_asked)).to_dict()
        return run_line({"config": {"settings": settings, "dtype": dtype_used}})["setup"]
    assert ran("auto", "torch.float32") == ran("float32", "float32") == "calib default 16×256"
    assert ran("auto", "torch.bfloat16") == ran("bfloat16", "bfloat16") == "calib default 16×256, dtype bfloat16"
    assert named(model=ModelSettings(dtype="float16"))["setup"].endswith("dtype float16")  # (no record of it)
    assert run_line({"config": {"method": "wanda"}}) is None
    assert run_line({"config": {"settings": {"prune": {"no_such_setting": 1}}}}) is None


def test_a_path_spelled_otherwise_is_the_same_configuration(tiny, tmp_path, monkeypatch):
    """A resumed sweep skips what it ran whatever the spelling of its model folder or texts: relative or
    absolute, with a trailing slash."""
    folder = Path(tiny.model.source).resolve()
    monkeypatch.chdir(folder.parent)
    text = tmp_path / "calib.txt"
    text.write_text("words " * 500)
    base = replace(tiny, calibration=replace(tiny.calibration, source=str(text)))
    again = replace(base, model=replace(tiny.model, source=f"{folder.name}/"),
                    calibration=replace(tiny.calibration, source=f"{tmp_path}/../{tmp_path.name}/calib.txt"))
    assert config_key(again) == config_key(base)
    assert config_key(replace(base, calibration=replace(tiny.calibration, seed=9))) != config_key(base)


def test_the_search_settings_reach_auto_alone(tiny, tmp_path):
    """Only auto configurations keep the sweep's search settings, so changing the search re-runs them and no
    other configuration (their keys stay those of a sweep with the default search)."""
    file = allocation_file(tmp_path / "alloc.json", 3)
    axes = {"allocations": ("uniform", "owl", "auto", file), "curves": (((0.0, 0.4), (1.0, 0.8)),), "seeds": (0,)}
    searched = replace(tiny, allocation=replace(tiny.allocation, search_steps=3, search_text=str(ROOT / "README.md"),
                                                search_verify="all", search_then_steps=2))
    plain, other = grid(tiny, **axes).check().expand(), grid(searched, **axes).check().expand()
    for a, b in zip(plain, other):
        same = a.allocation.method != "auto"
        assert (config_key(a) == config_key(b)) == same, a.allocation.method
    auto = next(c.allocation for c in other if c.allocation.method == "auto")
    assert (auto.search_steps, auto.search_verify, auto.search_then_steps) == (3, "all", 2)


def test_searches_with_other_settings_are_other_lines_of_the_plot():
    from analysis.settings import AllocationSettings

    assert allocation_label(AllocationSettings(method="auto")) == "auto"
    assert allocation_label(AllocationSettings(method="auto", search_objective="kl")) == "auto kl"
    other = AllocationSettings(method="auto", search_space="block+kind", search_verify="all", search_steps=16,
                               search_step=0.05, search_text="/data/valid.txt")
    assert allocation_label(other) == "auto block+kind, verify all, 16 generations, step 0.05, on valid.txt"
    assert allocation_label(AllocationSettings(method="auto", search_text="wikitext2:valid")) == \
        "auto on wikitext2:valid"
    staged = AllocationSettings(method="auto", search_text="wikitext2:valid", search_then_steps=40,
                                search_then_samples=256)
    assert allocation_label(staged) == "auto on wikitext2:valid, then 40 generations on 256 windows"


def test_a_curve_of_many_points_has_a_label_a_legend_can_hold():
    """A typed curve is named by its points; one of a block's worth of points (a search's, used as the curve) by
    their count and a digest: another curve is another line, and the label stays short."""
    from analysis.settings import AllocationSettings

    assert allocation_label(AllocationSettings(method="custom", points=((0, 0.5), (1, 0.8)))) == "custom 0:0.5,1:0.8"
    many = tuple((i / 29, 0.4 + 0.01 * i) for i in range(30))
    label = allocation_label(AllocationSettings(method="custom", points=many))
    assert re.fullmatch(r"custom, 30 points #[0-9a-f]{6}", label)
    other = allocation_label(AllocationSettings(method="custom", points=(*many[:-1], (1, 0.5))))
    assert other != label and len(other) == len(label)


@pytest.mark.parametrize("axes, field, message", [
    ({"methods": ()}, "sweep.methods", "the grid is empty"),
    ({"allocations": ()}, "sweep.allocations", "the grid is empty"),
    ({"sparsities": (0.5, 1.2)}, "sweep.sparsities", "outside (0, 0.99]"),
    ({"sparsities": (0.0,)}, "sweep.sparsities", "outside (0, 0.99]"),
    ({"epsilons": (0.1, 1.5)}, "sweep.epsilons", "epsilon = 1.5 is outside [0, 1)"),
    ({"owl_lambdas": (-0.1,)}, "sweep.owl_lambdas", "outside [0, 1)"),
    ({"seeds": (-1,)}, "sweep.seeds", ">= 0"),
    ({"allocations": ("uniform", "nowhere.json")}, "sweep.allocations", "neither"),
    ({"methods": ("wanda", "lasso")}, "sweep.methods", "unknown pruner"),
    ({"rowwise": ()}, "sweep.rowwise", "the grid is empty"),
    ({"rowwise": (None, "rows")}, "sweep.rowwise", "rowwise must be one of trim or none, got 'rows'"),
])
def test_bad_grid_is_refused_before_anything_runs(tiny, tmp_path, axes, field, message):
    store = RunStore(tmp_path / "runs.sqlite")
    with pytest.raises(SettingsError, match=re.escape(message)) as e:
        run_sweep(grid(tiny, **axes), store)
    assert e.value.field == field and len(store) == 0


def test_bad_lists_and_addresses(tiny, tmp_path):
    assert parse_values("0.1, 0.3,", float, "sweep.epsilons") == (0.1, 0.3)
    with pytest.raises(SettingsError, match="empty item") as e:
        parse_values("0.5,,0.6", float, "sweep.sparsities")
    assert e.value.field == "sweep.sparsities"
    with pytest.raises(SettingsError, match="'abc' is not a number") as e:
        parse_values("0.1,abc", float, "sweep.epsilons")
    assert e.value.field == "sweep.epsilons"
    with pytest.raises(SettingsError, match="not an integer"):
        parse_values("0,1.5", int, "sweep.seeds")
    store = RunStore(tmp_path / "runs.sqlite")
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # not Ray
    threading.Thread(target=web.serve_forever, daemon=True).start()
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, says nothing (as a proxy with nothing behind it)
    for address, message in [("127.0.0.1:1", "cannot reach a Ray cluster"), ("nonsense", "not a Ray address"),
                             (f"127.0.0.1:{web.server_address[1]}", r"is not a Ray cluster \(no gRPC server\)"),
                             (f"127.0.0.1:{silent.getsockname()[1]}", r"is not a Ray cluster \(no gRPC server\)")]:
        with pytest.raises(SettingsError, match=message) as e:
            run_sweep(grid(tiny), store, address=address)
        assert e.value.field == "sweep.address"
    web.shutdown()
    silent.close()
    assert len(store) == 0


@pytest.mark.parametrize("args, message", [
    (["--epsilons", "0.1,abc"], "error: --epsilons: 'abc' is not a number"),
    (["--sparsities", "0.5,1.2", "--address", "127.0.0.1:1"], "error: --sparsities: sparsity 1.2 is outside"),
    (["--rowwise", "none,trm"], "error: --rowwise: rowwise must be one of trim or none, got 'trm'"),
    (["--workers", "0", "--eval", "default"], "error: --workers: workers must be an integer >= 1, got 0"),  # no banner
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, args, message):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "analysis", "sweep", "--model", str(tmp_path / "no-model"), *args,
                        "--db", str(tmp_path / "runs.sqlite")], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=300)
    assert p.returncode == 2 and p.stderr.strip() == p.stderr.strip().splitlines()[0]
    assert p.stderr.startswith(message), p.stderr


def test_cli_offers_a_search_the_held_out_split_of_the_evaluation_text(tmp_path):
    """A search scored on the calibration text is told of the valid split beside the evaluation text
    (once the model's tokenizer took the texts, before its weights load: here the run store is no store); not when
    it has a search text, nor without a search."""
    for name in ("test.txt", "valid.txt", "calib.txt"):  # three texts (the same bytes would be one text)
        (tmp_path / name).write_text(" ".join(f"{name[0]}{i % 100}" for i in range(3000)))
    (tmp_path / "runs.sqlite").write_bytes(b"not a store " * 100)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-m", "analysis", "sweep", "--model", str(save_tiny_llama(tmp_path / "tiny")),
            "--sparsities", "0.5", "--calib", str(tmp_path / "calib.txt"), "--eval", str(tmp_path / "test.txt"),
            "--seqlen", "32", "--eval-seqlen", "32", "--db", str(tmp_path / "runs.sqlite")]
    hint = f"hint: the search is scored on the calibration text; --search-text {tmp_path / 'valid.txt'} (held out"
    for extra, hinted in ((["--allocations", "uniform,auto"], True), (["--allocations", "uniform"], False),
                          (["--allocations", "auto", "--search-text", str(tmp_path / "valid.txt")], False)):
        p = subprocess.run([*base, *extra], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
        assert p.returncode == 2 and "is not a run store" in p.stderr.splitlines()[-1], p.stderr
        assert (hint in p.stderr) == hinted, p.stderr


def test_a_sweep_run_is_the_pipeline_run(tiny):
    """run_config on the worker's cached model, with the sweep's dense reference, records what
    analysis.pipeline.run records on a freshly loaded model (what `python -m analysis prune` does)."""
    settings = replace(tiny, allocation=replace(tiny.allocation, method="alphapruning", sparsity=0.6, epsilon=0.2))
    dense = measure_dense([settings])
    run_config(replace(settings, allocation=replace(settings.allocation, method="uniform")), dense)  # prunes it once
    ours = run_config(settings, dense)
    m = settings.model
    theirs = run(load_model(m.source, device=m.device, dtype=m.dtype), settings).record
    assert ours["dense_ppl"] == pytest.approx(theirs["dense_ppl"], rel=1e-6)
    assert ours["pruned_ppl"] == pytest.approx(theirs["pruned_ppl"], rel=1e-6)
    assert ours["allocation"]["per_layer"] == pytest.approx(theirs["allocation"]["per_layer"])
    assert ours["achieved"]["overall"] == pytest.approx(theirs["achieved"]["overall"])
    assert (ours["config"]["origin"], theirs["config"]["origin"]) == ("sweep", "library")


def test_the_pipeline_run_checks_its_model_first_and_warns_of_weights_pruned_before(tiny, tmp_path):
    loaded = load_model(tiny.model.source)
    other = replace(tiny, allocation=replace(tiny.allocation, method="file",
                                             file=allocation_file(tmp_path / "two-blocks.json", 2)))
    with pytest.raises(SettingsError, match="the allocation does not fit this model") as e:
        run(loaded, other, on_ppl=lambda *a: pytest.fail("evaluated before the check"))
    assert e.value.field == "allocation.file"
    first = run(loaded, tiny).record
    assert "warnings" not in first
    # settings naming no model (RunSettings() says "default"), as a script may pass them: the record names the
    # model that ran, so that a rerun of it loads that one
    again = run(loaded, replace(tiny, model=ModelSettings())).record  # on the weights the first run pruned
    assert again["config"]["settings"]["model"]["source"] == loaded.info.source
    assert again["dense_ppl"] == pytest.approx(first["pruned_ppl"], rel=1e-5)
    assert any(re.match(r"5\d\.\d% of the prunable weights are zero already", w) for w in again["warnings"])


def test_auto_starts_come_from_the_sweeps_dense_spectra(tiny, monkeypatch):
    """An "auto" configuration's AlphaPruning and FARMS starts use the spectra the sweep measured once
    (measure_dense), not spectra measured again per search, and give the search the pipeline run makes."""
    import analysis.pipeline

    settings = replace(tiny, allocation=replace(tiny.allocation, method="auto", sparsity=0.6, search_steps=2))
    farms = replace(settings.allocation, method="farms").spectra
    assert spectra_used(settings.allocation) == {"metrics": settings.allocation.spectra, "farms_metrics": farms}
    assert spectra_used(replace(settings.allocation, search_from="a.json")) == {}
    assert spectra_used(settings.allocation, nm="2:4") == {}
    dense = measure_dense([settings])
    assert set(dense.metrics) == {settings.allocation.spectra, farms}
    theirs = run(load_model(settings.model.source), settings).record
    with monkeypatch.context() as m:
        m.setattr(analysis.pipeline, "dense_spectra", lambda *a, **k: pytest.fail("spectra measured again"))
        ours = run_config(settings, dense)
    assert ours["allocation"]["per_layer"] == pytest.approx(theirs["allocation"]["per_layer"])
    assert ours["allocation"]["params"]["start"] == theirs["allocation"]["params"]["start"]


@pytest.fixture(scope="module")
def in_process(tiny, tmp_path_factory):
    """A 4-configuration sweep run here; (grid, store, outcomes)."""
    g = grid(tiny)
    store = RunStore(tmp_path_factory.mktemp("in-process") / "runs.sqlite")
    return g, store, run_sweep(g, store)


def test_in_process_sweep_and_resume(tiny, in_process):
    from analysis import sweep

    g, store, outcomes = in_process
    assert [o.status for o in outcomes] == [DONE] * 4 and len(store) == 4
    assert "loaded" not in sweep._WORKER and "dense" not in sweep._WORKER  # the sweep's own model is freed
    assert all(o.attempts == 1 and o.pruned_ppl > 0 for o in outcomes)
    assert set(finished_keys(store)) == {o.key for o in outcomes}
    assert len({o.dense_ppl for o in outcomes}) == 1  # measured once for the sweep
    # the same sweep again: nothing runs
    again = run_sweep(g, store)
    assert [o.status for o in again] == [SKIPPED] * 4 and len(store) == 4
    assert [o.run_id for o in again] == [o.run_id for o in outcomes]
    assert [(o.pruned_ppl, o.achieved) for o in again] == [(o.pruned_ppl, o.achieved) for o in outcomes]
    # one more seed: only its two configurations run; the progress says which runs, and (detail) how far it is
    heard = []
    more = run_sweep(replace(g, seeds=(0, 1, 2)), store, progress=lambda m, f: heard.append((m, f)), detail=True)
    assert [o.status for o in more].count(DONE) == 2 and len(store) == 6
    first = config_label(next(o.settings for o in more if o.status == DONE))
    assert (f"1/2 {first}: running", 0.0) in heard
    blocks = [(m, f) for m, f in heard if m.startswith(f"1/2 {first}: ") and "block" in m]
    assert blocks and all(0.0 <= f <= 0.5 for _, f in blocks), heard  # the first configuration's half of the bar
    assert [f for _, f in heard] == sorted(f for _, f in heard)
    assert {o.settings.calibration.seed for o in more if o.status == DONE} == {2}
    # the stored runs' dense perplexity is the new ones': a resume does not measure it again
    assert {o.dense_ppl for o in more} == {outcomes[0].dense_ppl}
    assert not [m for m, _ in heard if m.startswith("dense reference: perplexity")], heard


def test_resume_runs_again_on_weights_or_texts_written_over_since(tmp_path):
    """A run stored on other weights or another text under the same paths is not this configuration's."""
    base = tiny_sweep_base(tmp_path)
    g = SweepGrid(base, methods=("magnitude",), allocations=("uniform",), sparsities=(0.5,), seeds=(0, 0))
    assert len(g.check().expand()) == 1  # a value listed twice is one configuration
    store = RunStore(tmp_path / "runs.sqlite")
    (first,) = run_sweep(g, store)
    assert first.status == DONE and store.get(first.run_id)["sweep"]["content"]["weights"]
    assert run_sweep(g, store)[0].status == SKIPPED
    save_tiny_llama(Path(base.model.source), seed=1)  # other weights, same folder
    (other,) = run_sweep(g, store)
    assert other.status == DONE and other.key != first.key and other.pruned_ppl != first.pruned_ppl
    text = Path(base.evaluation.source)
    text.write_text(text.read_text() + "\nw1 w2 w3")
    assert run_sweep(g, store)[0].status == DONE and len(store) == 3
    assert run_sweep(g, store)[0].status == SKIPPED


def test_cli_sweep_writes_its_table_and_a_resumed_one_shows_the_stored_results(tiny, tmp_path, capsys):
    from analysis.cli import main

    args = ["sweep", "--model", tiny.model.source, "--methods", "magnitude", "--allocations", "uniform,owl",
            "--sparsities", "0.5", "--seeds", "0", "--calib", tiny.calibration.source, "--nsamples", "4",
            "--seqlen", "32", "--eval", tiny.evaluation.source, "--eval-seqlen", "32", "--max-windows", "6",
            "--db", str(tmp_path / "runs.sqlite")]
    assert main([*args, "--out", str(tmp_path / "first.json")]) == 0
    first = pd.read_json(tmp_path / "first.json")
    assert list(first["status"]) == [DONE, DONE] and first["pruned_ppl"].notna().all() and first["run"].min() >= 1
    assert main([*args, "--out", str(tmp_path / "again.csv")]) == 0
    again = pd.read_csv(tmp_path / "again.csv")
    assert list(again["status"]) == [SKIPPED, SKIPPED]
    assert list(again["run"]) == list(first["run"]) and list(again["pruned_ppl"]) == list(first["pruned_ppl"])
    assert main([*args, "--out", str(tmp_path / "table.parquet")]) == 2
    assert "--out: " in capsys.readouterr().err


def test_resume_finds_runs_stored_before_a_setting_was_added(in_process, tmp_path):
    """A run stored by a version without a setting (here allocation.search_step) and under that version's
    key is still found as finished: the key is recomputed with the setting's default."""
    _, store, outcomes = in_process
    record = store.get(outcomes[0].run_id)
    del record["config"]["settings"]["allocation"]["search_step"]
    record["sweep"]["key"] = "a key computed without search_step"
    older = RunStore(tmp_path / "runs.sqlite")
    run_id = older.add(record)
    assert finished_keys(older) == {outcomes[0].key: run_id}
    # a run whose model folder is gone since keeps its stored key, and does not stop the others being found
    record["config"]["settings"]["model"]["source"] = str(tmp_path / "deleted-model")
    gone = older.add(record)
    assert finished_keys(older) == {outcomes[0].key: run_id, "a key computed without search_step": gone}


def test_row_wise_sparsity_is_an_axis_of_its_own_lines(tiny, tmp_path):
    """--rowwise none,trim runs every configuration both ways, as lines of their own; the runs without
    it keep the keys of a sweep without the axis, so an older sweep's runs are not run again."""
    from analysis.sweep import line_label, sweep_row

    store = RunStore(tmp_path / "runs.sqlite")
    outcomes = run_sweep(grid(tiny, rowwise=(None, "trim"), seeds=(0,)), store)
    assert [o.status for o in outcomes] == [DONE] * 4
    plain = [o for o in outcomes if o.settings.prune.rowwise is None]
    assert {o.key for o in plain} == {config_key(c) for c in grid(tiny, seeds=(0,)).expand()}
    rows = [sweep_row(store.get(o.run_id)) for o in outcomes]
    assert [r["allocation"] for r in rows] == ["uniform", "alphapruning ε=0.3", "uniform + trim",
                                               "alphapruning ε=0.3 + trim"]
    assert [line_label(o.settings) for o in outcomes] == [r["allocation"] for r in rows]
    for o in outcomes:
        record = store.get(o.run_id)
        assert record["config"]["settings"]["prune"]["rowwise"] == o.settings.prune.rowwise
        assert record["achieved"]["overall"] == pytest.approx(0.5, abs=1e-3)  # TRIM keeps each matrix's ratio
    trimmed = {o.settings.allocation.method: o.pruned_ppl for o in outcomes if o.settings.prune.rowwise}
    assert trimmed != {o.settings.allocation.method: o.pruned_ppl for o in plain}  # other weights were pruned


def test_a_text_no_configuration_can_use_is_one_error_before_any_run(tiny, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3")
    store = RunStore(tmp_path / "runs.sqlite")
    with pytest.raises(SettingsError, match="Evaluation text has 3 tokens") as e:
        run_sweep(grid(replace(tiny, evaluation=replace(tiny.evaluation, source=str(short)))), store)
    assert e.value.field == "evaluation.seqlen" and len(store) == 0


def test_stop_before_start_cancels_everything_here(tiny, tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    stop, heard = threading.Event(), []
    stop.set()
    outcomes = run_sweep(grid(tiny), store, stop=stop, progress=lambda m, f: heard.append((m, f)))
    assert [o.status for o in outcomes] == [CANCELLED] * 4 and len(store) == 0
    # not "4/4 ... cancelled" at 100%: no configuration ran
    assert heard[-1] == ("cancelled after 0 of 4 configurations (the finished ones are stored)", 0.0)


def test_a_stop_during_a_prune_ends_the_run_without_evaluating_the_half_pruned_model(tiny):
    """A sweep's Cancel is seen between two blocks of the prune; the run then ends at once (the partly pruned model
    is not scored on every evaluation window first), its record marked stopped."""
    loaded, stop, scored = load_model(tiny.model.source), threading.Event(), []

    def progress(message, fraction):
        if "block" in message:
            stop.set()
    result = run(loaded, replace(tiny, allocation=AllocationSettings(sparsity=0.5)), progress=progress, stop=stop,
                 on_ppl=lambda label, update: scored.append(label))
    assert result.record["stopped"] and result.report.blocks_done < 3
    assert result.record["pruned_ppl"] is None and set(scored) == {"dense"}


def test_a_stop_during_the_dense_reference_cancels_everything_there(tiny, tmp_path):
    store, stop, seen = RunStore(tmp_path / "runs.sqlite"), threading.Event(), []

    def progress(message, fraction):
        seen.append(message)
        if message.startswith("dense reference: perplexity"):
            stop.set()
    one_by_one = replace(tiny, evaluation=replace(tiny.evaluation, batch_size=1))  # 6 windows, 6 batches
    outcomes = run_sweep(grid(one_by_one), store, stop=stop, progress=progress)
    assert [o.status for o in outcomes] == [CANCELLED] * 4 and len(store) == 0
    assert seen[:2] == ["dense reference: loading the model", "dense reference: spectra"]
    assert sum(m.startswith("dense reference: perplexity") for m in seen) == 1  # it stopped after one batch


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """A local Ray with 2 CPUs for this module; its workers see FAULT_FILE_ENV (a file that does not
    exist yet: a test creates it to kill one worker once). Ray's memory monitor is off: on a shared
    machine it killed workers of these tiny models for other processes' memory, and those extra
    retries made the attempt counts below depend on the neighbours."""
    ray = pytest.importorskip("ray")
    from analysis.sweep import start_ray

    fault = tmp_path_factory.mktemp("fault") / "kill-one-worker"
    env = {FAULT_FILE_ENV: str(fault), "RAY_memory_monitor_refresh_ms": "0"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    start_ray(workers=2)
    yield fault
    ray.shutdown()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_ray_sweep_equals_in_process_retries_and_reports(tiny, in_process, local_ray, tmp_path):
    g, _, here = in_process
    bad = allocation_file(tmp_path / "other-model.json", 4)  # names a block this model lacks: fails every time
    local_ray.write_text("")  # the first configuration to start kills its worker process
    store = RunStore(tmp_path / "runs.sqlite")
    outcomes = run_sweep(replace(g, allocations=(*g.allocations, bad)), store, workers=2)
    assert not local_ray.exists()
    by_key = {o.key: o for o in outcomes}
    for o in here:  # same seeds, same runs
        ray_o = by_key[o.key]
        assert ray_o.status == DONE
        assert ray_o.pruned_ppl == pytest.approx(o.pruned_ppl, rel=1e-5)
        assert ray_o.dense_ppl == pytest.approx(o.dense_ppl, rel=1e-5)
        assert ray_o.achieved == pytest.approx(o.achieved)
    # the killed attempt was retried and says so, in the outcome and in the stored record
    retried = [o for o in outcomes if o.status == DONE and o.attempts == 2]
    assert len(retried) == 1 and store.get(retried[0].run_id)["sweep"]["attempts"] == 2
    # the configuration that always fails (its allocation is another model's: a bad input, which a retry would
    # repeat): tried once, reported with its error, not stored
    failed = [o for o in outcomes if o.status == FAILED]
    assert len(failed) == 2 and all(o.attempts == 1 for o in failed)  # both seeds
    assert all("the allocation does not fit this model" in o.error for o in failed)
    assert len(store) == 4 and set(finished_keys(store)) == {o.key for o in here}
    # each worker process loaded the model once, however many configurations it ran
    workers = {o.worker["pid"]: o.worker["loads"] for o in outcomes if o.status == DONE}
    assert set(workers.values()) == {1}


def test_a_bad_input_fails_once_in_process(tiny, tmp_path):
    """A configuration whose allocation is another model's fails the same way every time: reported after one try,
    and the sweep goes on."""
    bad = allocation_file(tmp_path / "other-model.json", 4)
    store = RunStore(tmp_path / "runs.sqlite")
    outcomes = run_sweep(grid(tiny, allocations=("uniform", bad), seeds=(0,)), store)
    assert [(o.status, o.attempts) for o in outcomes] == [(DONE, 1), (FAILED, 1)]
    assert "the allocation does not fit this model" in outcomes[1].error and len(store) == 1


def test_auto_searches_once_per_configuration_here_and_on_ray(tiny, local_ray, tmp_path):
    """"auto" in a grid: each configuration runs its own search (seeded by its calibration seed, with
    the base's steps and objective) where the configuration runs; on Ray the same searches give the
    same allocations and perplexities as in this process."""
    base = replace(tiny, allocation=replace(tiny.allocation, search_steps=3, search_objective="kl"))
    g = SweepGrid(base, methods=("wanda",), allocations=("auto", "uniform"), sparsities=(0.6,), seeds=(0, 1))
    autos = [c for c in g.check().expand() if c.allocation.method == "auto"]
    assert [(c.allocation.search_seed, c.calibration.seed) for c in autos] == [(0, 0), (1, 1)]
    here_store, ray_store = RunStore(tmp_path / "here.sqlite"), RunStore(tmp_path / "ray.sqlite")
    here = run_sweep(g, here_store)
    there = {o.key: o for o in run_sweep(g, ray_store, workers=2)}
    assert all(o.status == DONE for o in here) and all(o.status == DONE for o in there.values())
    for o in here:
        mine, theirs = here_store.get(o.run_id), ray_store.get(there[o.key].run_id)
        assert theirs["allocation"]["per_layer"] == mine["allocation"]["per_layer"]
        assert there[o.key].pruned_ppl == pytest.approx(o.pruned_ppl, rel=1e-5)
        if o.settings.allocation.method == "auto":
            params = mine["allocation"]["params"]
            assert params["seed"] == o.settings.calibration.seed and params["steps"] == 3
            assert params["objective"] == "kl" and mine["achieved"]["overall"] == pytest.approx(0.6, abs=0.01)


def test_ray_workers_draw_no_progress_bars(local_ray):
    """Ray forwards each redraw of a worker's progress bar as an empty "(_ray_task pid=...)" line."""
    import ray

    assert ray.get(ray.remote(lambda: os.environ.get("TQDM_DISABLE")).remote()) == "1"


def test_ray_sweep_stops_on_the_stop_flag(tiny, local_ray, tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    stop = threading.Event()
    g = grid(tiny, sparsities=(0.3, 0.5, 0.7), seeds=(0, 1, 2))  # 18 configurations
    outcomes = run_sweep(g, store, workers=2, stop=stop, on_outcome=lambda o: stop.set())
    statuses = [o.status for o in outcomes]
    assert len(outcomes) == 18 and CANCELLED in statuses and set(statuses) <= {DONE, CANCELLED}
    assert len(store) == statuses.count(DONE) >= 1


def test_worker_model_is_loaded_once(tiny):
    from analysis.sweep import worker_info, worker_model

    first, dense = worker_model(tiny.model)
    loads = worker_info()["loads"]
    again, _ = worker_model(tiny.model)
    assert again is first and worker_info()["loads"] == loads
    assert dense.weights and all(w.device.type == "cpu" for w in dense.weights.values())


def test_compare_page_plots_sweeps_and_launches_one(tiny, in_process, monkeypatch, tmp_path):
    from streamlit.testing.v1 import AppTest

    _, store, _ = in_process
    monkeypatch.setenv("ALPHASCOPE_RUNS_DB", str(store.path))
    at = AppTest.from_file(str(ROOT / "pages" / "compare.py"), default_timeout=120).run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("Pareto front" in c.proto.spec for c in at.get("plotly_chart"))  # the sweep's figure
    before = len(store)
    at.text_input(key="sweep_model").set_value(tiny.model.source)
    at.text_input(key="sweep_eval").set_value(tiny.evaluation.source)
    at.number_input(key="sweep_max_windows").set_value(2)
    at.text_input(key="sweep_sparsities").set_value("0.5,1.5")
    at.button[0].click().run()  # the form's submit button
    assert [e.value for e in at.error] == ["sparsities: sparsity 1.5 is outside (0, 0.99]"]
    at.text_input(key="sweep_sparsities").set_value("0.4")
    at.text_input(key="sweep_seeds").set_value("5")
    at.multiselect(key="sweep_allocations").set_value(["uniform", "auto"])
    at.number_input(key="sweep_search_steps").set_value(2)
    at.number_input(key="sweep_search_step").set_value(0.05)
    at.text_input(key="sweep_search_text").set_value(tiny.evaluation.source)
    at.button[0].click().run()
    assert any("must not be the evaluation text" in e.value for e in at.error)
    held = tmp_path / "held.txt"
    held.write_text(" ".join(f"w{(3 * i) % 119}" for i in range(2000)))
    at.text_input(key="sweep_search_text").set_value(str(held))
    at.selectbox(key="sweep_search_space").set_value("block+kind")
    at.selectbox(key="sweep_search_verify").set_value("none")
    at.multiselect(key="sweep_rowwise").set_value([])
    at.button[0].click().run()
    assert [e.value for e in at.error] == ["rowwise: no row-wise choice (none, trim) given: the grid is empty"]
    at.multiselect(key="sweep_rowwise").set_value(["trim"])
    at.button[0].click().run()
    assert not at.error, [e.value for e in at.error]
    job = at.session_state["sweep_seen"]
    assert job.wait(300) and job.status == "done", job.error
    assert [o.status for o in job.result] == [DONE, DONE] and len(store) == before + 2
    searched = store.get(job.result[1].run_id)["allocation"]
    assert searched["method"] == "auto" and searched["params"]["steps"] == 2 and searched["params"]["seed"] == 5
    assert searched["params"]["step"] == 0.05
    assert searched["params"]["space"] == "block+kind" and searched["params"]["verify"] == "none"
    assert searched["params"]["fitness"].startswith("held-out")
    assert {store.get(o.run_id)["config"]["settings"]["prune"]["rowwise"] for o in job.result} == {"trim"}


def test_one_sweep_at_a_time_in_a_process(tiny, tmp_path):
    """Two in-process sweeps would share one model copy (one restoring the dense weights while the
    other prunes them): the second is refused while the first runs, and runs once it ended."""
    from analysis.sweep import SweepBusy

    store = RunStore(tmp_path / "runs.sqlite")
    started, go_on = threading.Event(), threading.Event()

    def hold(message, fraction):  # the first sweep waits inside its pending work until told to go on
        started.set()
        go_on.wait(120)

    first = threading.Thread(target=run_sweep, args=(grid(tiny, allocations=("uniform",), seeds=(0,)), store),
                             kwargs={"progress": hold})
    first.start()
    try:
        assert started.wait(120)
        with pytest.raises(SweepBusy, match="another sweep is running in this process"):
            run_sweep(grid(tiny, allocations=("uniform",), seeds=(1,)), store)
    finally:
        go_on.set()
        first.join(300)
    assert [o.status for o in run_sweep(grid(tiny, allocations=("uniform",), seeds=(1,)), store)] == [DONE]


def test_compare_page_shows_the_servers_running_sweep_in_every_tab(tmp_path, monkeypatch):
    """A sweep started in one tab (or before a reload) is shown, with its Cancel button, in another,
    whose Start button is disabled meanwhile."""
    from streamlit.testing.v1 import AppTest

    from components.state import start_sweep_job

    monkeypatch.setenv("ALPHASCOPE_RUNS_DB", str(tmp_path / "runs.sqlite"))

    def sweep(job):
        job.report("1/4 wanda uniform 0.5 done", 0.25)
        job.stop.wait(120)

    job = start_sweep_job(sweep)
    try:
        assert start_sweep_job(sweep) is None  # one at a time
        at = AppTest.from_file(str(ROOT / "pages" / "compare.py"), default_timeout=60).run()
        assert not at.exception, [e.value for e in at.exception]
        assert at.button[0].disabled  # the form's Start
        # and its fields: one typed in meanwhile would be submitted later while showing an older value
        assert at.text_input(key="sweep_epsilons").disabled and at.multiselect(key="sweep_methods").disabled
        assert any("Sweep (running): 1/4 wanda uniform 0.5 done" in p.proto.text for p in at.get("progress"))
        at.button(key="sweep_cancel").click().run()
        assert job.wait(30) and job.status == "cancelled"
    finally:
        job.cancel()
        job.wait(30)


def test_sweep_figure_means_spread_and_pareto_front():
    import pandas as pd

    from components.figures import pareto_front, sweep_figure

    runs = pd.DataFrame({"method": ["wanda"] * 6 + ["sparsegpt"] * 2,
                         "allocation": ["uniform"] * 3 + ["owl λ=0.08"] * 3 + ["uniform"] * 2,
                         "sparsity": [0.5, 0.5, 0.6, 0.5, 0.5, 0.6, 0.5, 0.6],
                         "pruned_ppl": [20.0, 22.0, 40.0, 19.0, 21.0, 45.0, 18.0, float("nan")]})
    fig = sweep_figure(runs)
    uniform = next(t for t in fig.data if t.name == "uniform" and t.xaxis == "x2")  # panels: sparsegpt, wanda
    assert list(uniform.y) == [21.0, 40.0]  # mean over the two seeds at 0.5
    assert list(uniform.error_y.array) == [1.0, 0.0] and list(uniform.error_y.arrayminus) == [1.0, 0.0]
    front = next(t for t in fig.data if t.name == "Pareto front" and t.xaxis == "x2")
    assert list(zip(front.x, front.y)) == [(0.5, 20.0), (0.6, 40.0)]  # owl's 0.5 mean (20) beats uniform's (21)
    assert sum(t.showlegend is not False and t.name == "uniform" for t in fig.data) == 1
    # the sparsegpt panel has one sparsity left (its 0.6 run has no perplexity): the axis stays near it
    assert fig.layout.xaxis.range == (0.45, 0.55) and fig.layout.xaxis2.range is None
    points = pd.DataFrame({"sparsity": [0.5, 0.5, 0.6, 0.7], "ppl": [20.0, 19.0, 40.0, 35.0]})
    assert pareto_front(points).to_dict("list") == {"sparsity": [0.5, 0.7], "ppl": [19.0, 35.0]}
    # runs of two models, or of two calibration setups, are never averaged as if they were seeds
    mixed = pd.DataFrame({"method": ["wanda"] * 4, "allocation": ["uniform"] * 4, "sparsity": [0.6] * 4,
                          "model": ["/m/smol", "/m/smol", "/m/tiny", "/m/smol"],
                          "setup": ["calib default 16×256"] * 3 + ["calib default 2×64"],
                          "pruned_ppl": [240.0, 250.0, 50000.0, 300.0]})
    fig = sweep_figure(mixed)
    lines = {(t.xaxis, t.name): list(t.y) for t in fig.data if t.name != "Pareto front"}
    assert lines == {("x", "uniform (calib default 16×256)"): [245.0], ("x", "uniform (calib default 2×64)"): [300.0],
                     ("x2", "uniform (calib default 16×256)"): [50000.0]}
    assert [a.text for a in fig.layout.annotations] == ["smol · wanda", "tiny · wanda"]
    # two folders of one name are two models, named in full
    same_name = mixed.assign(model=["/a/checkpoint", "/a/checkpoint", "/b/checkpoint", "/a/checkpoint"])
    assert [a.text for a in sweep_figure(same_name).layout.annotations] == ["/a/checkpoint · wanda",
                                                                            "/b/checkpoint · wanda"]

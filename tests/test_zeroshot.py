"""Zero-shot accuracy through lm-eval: the local cloze task on the real default model (dense twice,
then pruned), task errors that come at once without a hub, and the CLI's run record."""
import copy
import json
import time

import datasets
import pytest
from conftest import save_tiny_llama
from huggingface_hub import constants as hub_constants
from transformers import PreTrainedTokenizerFast

from analysis import loading, zeroshot
from analysis.allocation import allocate
from analysis.cli import main
from analysis.data import calibration_text, evaluation_text
from analysis.layers import layer_table
from analysis.pruning import prune
from analysis.zeroshot import ZeroShotError, check_tasks, cloze_docs, evaluate, local_tasks

LIMIT = 40  # cloze documents per run: enough to separate a dense model from a 70%-pruned one


def test_local_task_is_found_by_lm_eval_task_manager():
    assert local_tasks() == ("cloze",)
    assert zeroshot._task_manager(False).task_index["cloze"].yaml_path.parent == zeroshot.TASKS_DIR


def test_cloze_docs_come_from_the_evaluation_half_only():
    docs = cloze_docs()
    assert len(docs) > 500
    evaluation, calibration = (" ".join(t.split()) for t in (evaluation_text("default"), calibration_text("default")))
    found = 0
    for d in docs:
        answer = d["choices"][d["label"]]
        assert len({c.lower() for c in d["choices"]}) == 4
        found += " ".join((d["context"] + " " + answer + ".").split()[-8:]) in evaluation  # the sentence's end
        assert " ".join(d["context"].split()) not in calibration
    assert found >= 0.99 * len(docs)  # (a sentence re-joined after a closing quote may differ in spacing)
    assert cloze_docs() == docs  # seeded: the same documents every time
    assert cloze_docs(seed=1) != docs


def test_dense_accuracy_is_reproducible_and_pruning_lowers_it(default_model):
    model, tok = default_model.model, default_model.tokenizer
    seen = []
    first = evaluate(model, tok, "cloze", limit=LIMIT, progress=lambda m, f: seen.append(f))
    again = evaluate(model, tok, ["cloze"], limit=LIMIT)
    assert first.scores == again.scores
    acc = first.accuracy()["cloze"]
    assert {s.metric for s in first.scores} == {"acc", "acc_norm"}
    assert all(s.n == LIMIT and s.stderr > 0 for s in first.scores)
    assert acc > 0.6  # chance is 0.25
    assert seen and seen[-1] == 1.0

    pruned = copy.deepcopy(model)  # the session fixture stays dense for the other tests
    prune(pruned, allocate(layer_table(pruned), 0.7, method="uniform").per_layer, method="magnitude")
    low = evaluate(pruned, tok, "cloze", limit=LIMIT).accuracy()["cloze"]
    assert low < acc - 0.2


def test_stop_flag_ends_the_run_without_scores(default_model):
    result = evaluate(default_model.model, default_model.tokenizer, "cloze", limit=LIMIT, stop=lambda: True)
    assert result.stopped and result.scores == []


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No hub and empty datasets caches, whatever this machine has."""
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    return tmp_path


@pytest.mark.parametrize("task", ["boolq", "arc_easy", "no_such_task"])
def test_hub_task_without_hub_fails_at_once_with_one_line(offline, task, capsys):
    t0 = time.perf_counter()
    with pytest.raises(ZeroShotError) as err:
        check_tasks(f"cloze,{task}")
    assert time.perf_counter() - t0 < 30  # a retrying hub would take minutes
    message = str(err.value)
    assert "\n" not in message and f"'{task}'" in message and "not reachable" in message and "cloze" in message
    # the CLI says the same before loading any model, exit status 2
    assert main(["eval", "--tasks", task, "--model", "/nonexistent/model"]) == 2
    assert capsys.readouterr().err.startswith(f"error: --tasks: task '{task}'")


def test_a_misspelt_local_task_is_named(offline, capsys):
    """Where the hub's tasks cannot run, a name close to a local task is its typo, not a hub task to explain."""
    assert main(["eval", "--tasks", "clozee", "--model", "/nonexistent/model"]) == 2
    assert capsys.readouterr().err == "error: --tasks: unknown task 'clozee': did you mean the local task 'cloze'?\n"


def test_unknown_task_named_when_lm_eval_tasks_are_indexed(offline):
    (offline / "datasets" / "aps___super_glue" / "boolq").mkdir(parents=True)  # something cached: look closer
    with pytest.raises(ZeroShotError, match="unknown task 'no_such_task'"):
        check_tasks("no_such_task")
    with pytest.raises(ZeroShotError, match="needs the dataset 'allenai/ai2_arc'"):
        check_tasks("arc_easy")


def test_bad_task_lists_and_limits():
    with pytest.raises(ZeroShotError, match="No task"):
        check_tasks(" , ")
    with pytest.raises(ZeroShotError, match="not a task name"):
        check_tasks("cloze;rm")
    assert main(["eval", "--tasks", "cloze", "--limit", "0"]) == 2


@pytest.mark.parametrize("command", [["eval"], ["prune", "--method", "magnitude", "--eval", "default"]])
def test_a_tokenizer_without_eos_or_bos_is_refused_before_the_weights_load(tmp_path, capsys, monkeypatch, command):
    model = save_tiny_llama(tmp_path / "tiny")  # its word-level tokenizer has neither token
    loads = []
    real = loading.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: loads.append(a) or real(*a, **k))  # records, then loads for real
    if command[0] == "prune":
        command = [*command, "--db", str(tmp_path / "runs.sqlite")]
    assert main([*command, "--model", str(model), "--tasks", "cloze"]) == 2
    assert "--tasks: lm-eval needs a tokenizer with an EOS or BOS token" in capsys.readouterr().err
    assert loads == []


def test_cli_prune_with_tasks_keeps_scores_in_the_record(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside a git checkout, where lm-eval's own `git describe` would complain
    model = save_tiny_llama(tmp_path / "tiny")
    tok = PreTrainedTokenizerFast.from_pretrained(model)
    tok.eos_token = "w0"  # lm-eval starts empty contexts with EOS (or BOS); the tiny tokenizer has none
    tok.save_pretrained(model)
    out = tmp_path / "run.json"
    code = main(["prune", "--model", str(model), "--allocation", "uniform", "--sparsity", "0.5", "--method",
                 "magnitude", "--calib", "default", "--nsamples", "2", "--seqlen", "16", "--eval", "default",
                 "--eval-seqlen", "16", "--max-windows", "2", "--tasks", "cloze", "--limit", "5",
                 "--db", str(tmp_path / "runs.sqlite"), "--out", str(out)])
    assert code == 0
    captured = capfd.readouterr()
    assert "zero-shot accuracy of the pruned model" in captured.out and "acc_norm" in captured.out
    assert "not a git repository" not in captured.err
    record = json.loads(out.read_text())
    scores = record["zeroshot"]["scores"]
    assert {(s["task"], s["metric"]) for s in scores} == {("cloze", "acc"), ("cloze", "acc_norm")}
    assert all(s["n"] == 5 and 0.0 <= s["value"] <= 1.0 for s in scores)
    assert zeroshot.record_accuracy(record) == {"cloze": scores[0]["value"] if scores[0]["metric"] == "acc"
                                                else scores[1]["value"]}


# ---------------------------------------------------------------------------------------------
# dashboard


def _table_with(app, column: str):
    """The page's dataframe with `column` (AppTest does not keep st.dataframe keys)."""
    tables = [d.value for d in app.dataframe if column in d.value.columns]
    assert len(tables) == 1, [list(d.value.columns) for d in app.dataframe]
    return tables[0]


@pytest.fixture
def runs_db(tmp_path, monkeypatch):
    path = tmp_path / "runs.sqlite"
    monkeypatch.setenv("ALPHASCOPE_RUNS_DB", str(path))
    return path


def test_prune_page_scores_the_current_weights_in_the_background(runs_db):
    from test_app import fresh_app, run_until_idle

    app = fresh_app()
    app.button(key="model_load").click().run()
    app.switch_page("pages/prune.py").run()
    assert app.multiselect(key="prune_zs_tasks").value == ["cloze"]
    app.number_input(key="prune_zs_limit").set_value(8).run()
    app.button(key="prune_zs_run").click().run()
    assert app.session_state["work"].job.name == "zero-shot"
    app.number_input(key="prune_zs_limit").set_value(8)  # (AppTest re-creates the widgets with their defaults)
    run_until_idle(app, "zero-shot")
    assert not app.error, [e.value for e in app.error]
    table = _table_with(app, "weights")
    assert list(table["weights"]) == ["dense", "dense"] and set(table["metric"]) == {"acc", "acc_norm"}
    assert (table["n"] == 8).all() and table["value"].between(0, 1).all()


def test_prune_page_scores_of_pruned_weights_join_their_run(runs_db):
    from test_app import fresh_app, run_until_idle, set_prune_inputs

    from analysis.store import RunStore

    app = fresh_app()
    app.button(key="model_load").click().run()
    app.switch_page("pages/prune.py").run()

    def small():
        set_prune_inputs(app, alloc="uniform", n_samples=2, calib_seqlen=64, eval_seqlen=64, windows=1, zs_limit=8)

    small()
    app.button(key="prune_run").click().run()
    small()
    run_until_idle(app, "prune")
    run_id = app.session_state["work"].run_id
    assert run_id == int(RunStore(runs_db).all()["id"].max())
    app.button(key="prune_zs_run").click().run()
    small()
    run_until_idle(app, "zero-shot")
    assert not app.error, [e.value for e in app.error]
    assert set(_table_with(app, "stored")["stored"]) == {f"run {run_id}"}
    scores = RunStore(runs_db).get(run_id)["zeroshot"]
    assert scores["tasks"] == ["cloze"] and {s["n"] for s in scores["scores"]} == {8}
    app.button(key="prune_restore").click().run()
    assert app.session_state["work"].run_id is None


def test_compare_page_shows_accuracy_columns_when_present(runs_db):
    from test_app import fresh_app

    from analysis.store import RunStore

    store = RunStore(runs_db)
    config = {"model": "default", "method": "wanda", "allocation": "uniform", "sparsity": 0.5, "eval": "default"}
    store.add({"config": config, "dense_ppl": 20.0, "pruned_ppl": 30.0})
    store.add({"config": config, "dense_ppl": 20.0, "pruned_ppl": 31.0,
               "zeroshot": {"scores": [{"task": "cloze", "metric": "acc", "value": 0.75, "stderr": 0.05, "n": 40}]}})
    app = fresh_app()
    app.switch_page("pages/compare.py").run()
    assert not app.exception, [e.value for e in app.exception]
    table = _table_with(app, "acc cloze")
    assert table["acc cloze"].isna().tolist() == [True, False] and table["acc cloze"].iloc[1] == 0.75

"""Streamlit AppTest of every dashboard page, with the real packaged default model.

AppTest runs the page scripts headless (no browser, no JavaScript); background jobs run in real
threads, so tests re-run the page until the job's progress bar is gone. The curve editor is set
through st.session_state (see components/curve_editor), the rest through the widgets themselves.
"""
import ast
import json
import math
import re
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
WAIT_S = 900  # spectra and pruning share two CPU cores with everything else here
# CPython 3.11 can fail ast.parse with this SystemError when another thread builds an AST at the same
# time (python/cpython#106905): the page script's parse races a background job's (lm-eval parses its task
# configs). Nothing of the app's is wrong then, and the next rerun parses fine, so that rerun is repeated.
CPYTHON_AST_RACE = "AST constructor recursion depth mismatch"


def fresh_app() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=300)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def run_until_idle(at: AppTest, what: str, timeout: float = WAIT_S) -> AppTest:
    """Re-run until no progress bar shows (background jobs finished)."""
    t0 = time.time()
    while True:
        at.run()
        if at.exception and all(CPYTHON_AST_RACE in e.value for e in at.exception):
            at.run()
        assert not at.exception, [e.value for e in at.exception]
        if not at.get("progress"):
            return at
        if time.time() - t0 > timeout:
            pytest.fail(f"{what} still running after {timeout} s: {[p.proto.text for p in at.get('progress')]}")
        time.sleep(1.0)


def reload_tab(at: AppTest, timeout: float = 120) -> AppTest:
    """A reload of `at`'s tab: a new session on its URL (its settings token and model), the old one gone."""
    from components.state import SETTINGS_URL_KEY, URL_KEYS, _settings_by_url

    kept, _ = _settings_by_url()
    kept[at.query_params[SETTINGS_URL_KEY]]["connected"] = lambda: False
    reload = AppTest.from_file(APP, default_timeout=timeout)
    reload.query_params[SETTINGS_URL_KEY] = at.query_params[SETTINGS_URL_KEY]
    for name, value in zip(URL_KEYS, at.session_state["model_key"]):  # (app.py writes them in a browser's URL)
        reload.query_params[name] = value
    return reload.run()


def trace_names(chart) -> list[str]:
    """The names of a drawn Plotly chart's traces."""
    return [trace.get("name") for trace in json.loads(chart.proto.spec)["data"]]


def set_prune_inputs(at: AppTest, **values) -> AppTest:
    """Set Prune page inputs named by their key without "prune_" (method, alloc: select boxes; the others
    number inputs), then run. Tests call it again after a rerun: AppTest re-creates a page's widgets
    with their defaults."""
    for name, value in values.items():
        widget = at.selectbox if name in ("method", "alloc") else at.number_input
        widget(key=f"prune_{name}").set_value(value)
    return at.run()


def texts(at: AppTest) -> str:
    return "\n".join(m.value for m in at.markdown)


def metric(at: AppTest, label: str) -> str:
    found = [m.value for m in at.metric if m.label == label]
    assert found, f"no metric {label!r}; have {[m.label for m in at.metric]}"
    return found[0]


# Inputs whose value is not kept across a page change (app.py, PERSIST), and why.
NOT_PERSISTED = {
    "alloc_matrix_pick": "its options are the loaded model's matrices",
    "compare_models": "a filter over the stored runs, whose options change as runs are added",
    "compare_methods": "a filter over the stored runs",
    "compare_eval": "a filter over the stored runs",
    "compare_curves": "a filter over the stored runs",
    "compare_delete": "runs to delete are chosen for one click of Delete",
    "prune_export_overwrite": "replacing a folder is asked for at each export",
    "prune_sparsity_nm": "shows an N:M pattern's fixed sparsity, not a setting",
    "sweep_model": "follows the loaded model",
}
INPUT_WIDGETS = {"checkbox", "toggle", "radio", "selectbox", "multiselect", "slider", "select_slider",
                 "number_input", "text_input", "text_area", "segmented_control", "pills", "color_picker",
                 "date_input", "time_input"}


def page_inputs() -> dict[str, str]:
    """Key -> page of every input widget on the pages whose key is a literal or a module-level constant
    (the per-matrix offset inputs, keyed per matrix, keep their values in the allocation instead)."""
    found = {}
    for page in sorted((ROOT / "pages").glob("*.py")):
        tree = ast.parse(page.read_text())
        constants = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
                     and isinstance(n.value, ast.Constant) for t in n.targets if isinstance(t, ast.Name)}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in INPUT_WIDGETS):
                continue
            for kw in node.keywords:
                if kw.arg == "key" and isinstance(kw.value, ast.Constant):
                    found[kw.value.value] = page.name
                elif kw.arg == "key" and isinstance(kw.value, ast.Name) and kw.value.id in constants:
                    found[constants[kw.value.id]] = page.name
    return found


def test_every_setting_is_kept_across_pages_or_named_as_not():
    """A setting added to a page without adding it to app.py's PERSIST resets when the user visits
    another page; this names it. (AppTest cannot show the reset: the browser test does, for the Prune page.)"""
    app_tree = ast.parse(Path(APP).read_text())
    persist = next(ast.literal_eval(n.value) for n in app_tree.body if isinstance(n, ast.Assign)
                   and any(isinstance(t, ast.Name) and t.id == "PERSIST" for t in n.targets))
    inputs = page_inputs()
    assert len(inputs) > 80  # the walk found the pages' inputs
    forgotten = sorted(k for k in inputs if k not in persist and k not in NOT_PERSISTED)
    assert not forgotten, f"add these to PERSIST in app.py, or to NOT_PERSISTED here with a reason: {forgotten}"
    assert not set(persist) & set(NOT_PERSISTED)
    stale = sorted(set(persist) - set(inputs)) + sorted(set(NOT_PERSISTED) - set(inputs))
    assert not stale, f"no input on the pages has these keys: {stale}"
    assert len(set(persist)) == len(persist)
    # a reload puts a setting back when the page its key's prefix names is shown: a key of another prefix never is
    prefixes = next(ast.literal_eval(n.value) for n in app_tree.body if isinstance(n, ast.Assign)
                    and any(isinstance(t, ast.Name) and t.id == "PAGE_KEYS" for t in n.targets))
    misnamed = sorted(k for k in persist if not k.startswith(prefixes[Path(inputs[k]).stem.capitalize()]))
    assert not misnamed, f"name these after their page's prefix in app.py's PAGE_KEYS: {misnamed}"


@pytest.fixture(scope="module")
def runs_db(tmp_path_factory):
    import os

    path = tmp_path_factory.mktemp("runs") / "runs.sqlite"
    old = os.environ.get("ALPHASCOPE_RUNS_DB")
    os.environ["ALPHASCOPE_RUNS_DB"] = str(path)
    yield path
    if old is None:
        os.environ.pop("ALPHASCOPE_RUNS_DB", None)
    else:
        os.environ["ALPHASCOPE_RUNS_DB"] = old


@pytest.fixture(scope="module")
def app(runs_db) -> AppTest:
    """One session with the default model loaded (pages are visited in turn by the tests)."""
    at = fresh_app()
    assert at.radio(key="model_choice").value.startswith("SmolLM2")  # the default is preselected
    at.button(key="model_load").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


# ---------------------------------------------------------------------------------------------


def test_a_reload_keeps_the_model_the_server_holds(app):
    """The URL names the loaded model (?model=...); a new session opened on that URL (a reload, a second tab)
    has it at once, and a URL naming a model the server does not hold loads nothing."""
    again = AppTest.from_file(APP, default_timeout=300)
    again.query_params["model"] = "default"
    again.run()
    assert not again.exception and again.session_state["model_key"] == app.session_state["model_key"]
    # the Model page (the default page) shows that model's choices, so Load is about the model the session has
    source, device, dtype, _ = app.session_state["model_key"]
    assert again.radio(key="model_choice").value.startswith("SmolLM2")
    assert (again.selectbox(key="model_device").value, again.selectbox(key="model_dtype").value) == (device, dtype)
    assert dtype == "float32"  # "auto" would not tell the two apart
    other = AppTest.from_file(APP, default_timeout=300)
    other.query_params["model"] = "/not/loaded/anywhere"
    other.run()
    assert not other.exception and "model_key" not in other.session_state


def test_a_load_goes_on_when_the_user_leaves_the_model_page(app):
    """Load model runs in the background: a session that goes to another page while it loads (which stops the
    Model page's script) sees its progress there, then has the model, and its spectra start."""
    from analysis.jobs import Job
    from components.state import LOAD_KEY, load_shared_model

    key, go = app.session_state["model_key"], threading.Event()
    at = fresh_app()
    # as start_model_load starts it, held until the test lets it finish
    at.session_state[LOAD_KEY] = Job(lambda j: go.wait(60) and load_shared_model(*key), tag=key).start()
    at.switch_page("pages/spectra.py").run()
    assert not at.exception and "model_key" not in at.session_state
    assert [p.text.split(":")[0] for p in at.get("progress")] == ["Loading default (started on the Model page)"]
    assert not [i for i in at.info if "No model loaded yet" in i.value]  # the load's progress instead
    go.set()
    at.session_state[LOAD_KEY].wait(60)
    run_until_idle(at, "spectra")
    assert not at.exception and at.session_state["model_key"] == key and LOAD_KEY not in at.session_state
    assert not [i for i in at.info if "No model loaded yet" in i.value]


def test_a_load_that_fails_says_why_and_leaves_no_model(tmp_path):
    """A load that fails in the background (weights that do not read) is an error on the Model page, and the
    session has no model and no load left."""
    from conftest import save_tiny_llama

    from components.state import LOAD_KEY

    folder = tmp_path / "broken"
    save_tiny_llama(folder)
    for weights in folder.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    at = fresh_app()
    at.radio(key="model_choice").set_value("Local checkpoint folder").run()
    at.text_input(key="model_folder").set_value(str(folder)).run()
    at.button(key="model_load").click().run()
    assert not at.exception and [e.value for e in at.error if "corrupt safetensors header" in e.value] == \
        [e.value for e in at.error], [e.value for e in at.error]  # the load's own error, once
    assert len(at.error) == 1
    assert "model_key" not in at.session_state and LOAD_KEY not in at.session_state


def test_a_reload_keeps_the_settings_and_a_second_tab_gets_its_own():
    """The URL names the tab's settings (?s=...): a new session on it after the tab went away (a reload) takes
    them back, the Allocation page's curve too, and says weights pruned before are not; one opened while the tab
    is still there (a copied URL) starts from a copy of them, under a token of its own.
    A setting is put back when its page is first shown (here the Model page; the browser test sees the others).
    (AppTest runs app.py, whose loop keeps the settings, only in a session's first run: the test writes what that
    loop would have kept.)"""
    from components.state import SETTINGS_URL_KEY, _settings_by_url

    tab = fresh_app()
    token = tab.query_params[SETTINGS_URL_KEY]
    tab.session_state["_persisted"].update(model_dtype="bfloat16", learn_seed=7, alloc_points=[[0.0, 0.3], [1.0, 0.7]])

    copy = AppTest.from_file(APP, default_timeout=300)
    copy.query_params[SETTINGS_URL_KEY] = token
    copy.run()
    assert copy.session_state["model_dtype"] == "bfloat16" and copy.query_params[SETTINGS_URL_KEY] != token
    assert not [c for c in copy.sidebar.caption if "settings are back" in c.value]
    copy.session_state["_persisted"]["alloc_points"][0][1] = 0.1
    assert tab.session_state["_persisted"]["alloc_points"] == [[0.0, 0.3], [1.0, 0.7]]  # not the copy's

    kept, _ = _settings_by_url()
    kept[token]["connected"] = lambda: False  # the first tab went away: a reload
    reload = AppTest.from_file(APP, default_timeout=300)
    reload.query_params[SETTINGS_URL_KEY] = token
    reload.run()
    assert any("Your settings are back after the reload" in c.value for c in reload.sidebar.caption)
    assert reload.session_state["model_dtype"] == "bfloat16" and reload.query_params[SETTINGS_URL_KEY] == token
    assert reload.selectbox(key="model_dtype").value == "bfloat16"
    assert reload.session_state["alloc_points"] == [[0.0, 0.3], [1.0, 0.7]]  # (state, not a widget: at once)
    assert "learn_seed" not in reload.session_state and reload.session_state["_persisted"]["learn_seed"] == 7
    stranger = AppTest.from_file(APP, default_timeout=300)
    stranger.query_params[SETTINGS_URL_KEY] = "no-such-token"
    stranger.run()
    assert "model_dtype" not in stranger.session_state or stranger.session_state["model_dtype"] != "bfloat16"
    assert not stranger.session_state["_persisted"] and not stranger.exception  # (e.g. after a server restart)


def test_model_page_loads_the_default_model(app):
    assert metric(app, "Decoder blocks") == "30"
    assert metric(app, "Prunable matrices") == "210"
    assert "SmolLM2-135M-Instruct" in app.success[0].value
    assert any("Estimated memory" in c.value for c in app.caption)
    for key in ("model_device", "model_dtype"):
        assert app.selectbox(key=key).value == "auto"
    assert app.checkbox(key="model_trust").value is False


@pytest.mark.parametrize("kind, key, value, message", [
    ("Local checkpoint folder", "model_folder", "/nonexistent/model/folder", "does not exist"),
    ("Local checkpoint folder", "model_folder", "models/tiny-llama", f"'{Path.cwd()}/models/tiny-llama' does not"),
    ("Hugging Face model id", "model_hf_id", "not a valid id!!", "neither a packaged model"),
])
def test_bad_model_source_shows_an_error(kind, key, value, message):
    at = fresh_app()
    at.radio(key="model_choice").set_value(kind).run()
    at.text_input(key=key).input(value).run()
    assert not at.exception
    assert len(at.error) == 1 and message in at.error[0].value  # said at once, and Load is off until it is mended
    assert at.button(key="model_load").disabled
    assert "model_key" not in at.session_state  # nothing was loaded


def test_a_folder_without_tokenizer_files_loads_for_its_spectra_and_says_what_needs_text(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=120)).save_pretrained(tmp_path / "weights-only")
    at = fresh_app()
    at.radio(key="model_choice").set_value("Local checkpoint folder").run()
    at.text_input(key="model_folder").input(str(tmp_path / "weights-only")).run()
    at.button(key="model_load").click().run()
    assert not at.exception and not at.error
    assert at.success[0].value.startswith("Loaded **")
    assert any("has no tokenizer files" in w.value for w in at.warning)
    at.switch_page("pages/spectra.py")
    run_until_idle(at, "spectra of the weights-only model")
    assert not at.warning and at.selectbox(key="spectra_layer").options  # the spectra need no tokenizer
    at.switch_page("pages/allocation.py")
    run_until_idle(at, "allocation page")
    assert at.button(key="alloc_search_run").disabled  # the search reads calibration text
    assert any("has no tokenizer files" in c.value for c in at.caption)
    at.checkbox(key="alloc_more").check().run()
    assert not any("OWL" in c.value for c in at.caption if "in the background" in c.value)  # it is not coming
    t0 = time.time()
    while "farms" not in at.selectbox(key="alloc_preset").options and time.time() - t0 < WAIT_S:
        time.sleep(1.0)
        at.run()
    assert at.selectbox(key="alloc_preset").options == ["uniform", "alphapruning", "farms"]
    assert not any("in the background" in c.value for c in at.caption)
    at.switch_page("pages/prune.py").run()
    assert not at.exception and "has no tokenizer files" in at.warning[0].value


def test_pages_without_a_model_point_to_the_model_page():
    at = fresh_app()
    for page in ("spectra", "allocation", "prune"):
        at.switch_page(f"pages/{page}.py").run()
        assert not at.exception
        assert any("No model loaded" in i.value for i in at.info), page


def test_learn_page_alpha_follows_the_tail_index():
    at = fresh_app()
    at.switch_page("pages/learn.py").run()
    assert not at.exception
    gauss_edge = metric(at, "MP bulk edge")
    assert metric(at, "Eigenvalues beyond the edge") == "0"  # pure noise stays inside the MP bulk
    at.radio(key="learn_kind").set_value("Heavy-tailed entries").run()
    at.slider(key="learn_mu").set_value(1.0).run()
    heavy = float(metric(at, "Fitted α"))
    at.slider(key="learn_mu").set_value(4.0).run()
    lighter = float(metric(at, "Fitted α"))
    assert heavy < 2.0 < lighter  # heavier entries -> heavier ESD tail -> smaller alpha
    at.radio(key="learn_kind").set_value("Low-rank spikes + noise").run()
    at.slider(key="learn_strength").set_value(2.0).run()
    assert int(metric(at, "Eigenvalues beyond the edge")) == at.slider(key="learn_rank").value
    # the noise's edge (unit variance, Q = 2), not one the spikes push out through the mean eigenvalue
    assert float(metric(at, "MP bulk edge")) == pytest.approx((1 + 2 ** -0.5) ** 2, rel=5e-3) == float(gauss_edge)
    assert not at.exception


def test_spectra_page(app):
    app.switch_page("pages/spectra.py")
    run_until_idle(app, "spectra")
    assert app.title[0].value == "Spectra"
    # the packaged weights went through 4-bit quantization: a few (0.03%) are exactly zero already
    zeros = [float(m.group(1)) for c in app.caption
             if (m := re.search(r"([\d.]+)% of the prunable weights analyzed here are zero", c.value))]
    assert zeros and zeros[0] < 0.1
    assert len(app.dataframe) == 1
    table = app.dataframe[0].value
    assert len(table) == 211  # 210 block matrices + the (tied) embedding
    assert metric(app, "With a tail beyond MP") == "201 of 210"  # trained weights: nearly all have a real tail
    assert (table.loc[table["prunable"], "beyond_mp"] > 0).sum() == 201 and table["fit"].unique().tolist() == ["peak"]
    assert {b.proto.label for b in app.get("download_button")} == {"Download metrics (CSV)", "Download ESDs (.npz)"}
    # a fit on a tail of a few eigenvalues says so under its α
    few = table[table["prunable"] & (table["alpha_stderr"] > 1) & (table["beyond_mp"] > 0)]["name"].iloc[0]
    app.selectbox(key="spectra_layer").set_value(few).run()
    assert any("This α rests on a tail of" in c.value for c in app.caption)
    layer = "model.layers.7.mlp.down_proj"
    app.selectbox(key="spectra_layer").set_value(layer).run()
    alpha = float(table.set_index("name").loc[layer, "alpha"])
    assert f"α = **{alpha:.2f}**" in texts(app)
    for key in ("spectra_mp", "spectra_rand"):
        app.checkbox(key=key).check().run()
    app.toggle(key="spectra_log").set_value(False).run()
    assert not app.exception
    assert len(app.get("plotly_chart")) == 3  # depth, heatmap, ESD (drawn content: see the browser test)
    # another layer's ESD over this one; no pruned copy yet to compare with
    assert "this layer, my pruned copy" not in app.selectbox(key="spectra_overlay").options
    app.selectbox(key="spectra_overlay").set_value("model.layers.0.mlp.down_proj").run()
    assert "model.layers.0.mlp.down_proj" in trace_names(app.get("plotly_chart")[-1])
    app.selectbox(key="spectra_overlay").set_value("none").run()
    # while another session has the shared model pruned in place, the randomized ESD does not read it
    gate = app.session_state["work"].gate
    gate.lease("session elsewhere", "session elsewhere's pruned weights to be restored")
    try:
        app.run()
        assert any("session elsewhere has pruned in place" in c.value for c in app.caption)
    finally:
        gate.release("session elsewhere")
    app.run()
    assert not any("pruned in place right now" in c.value for c in app.caption) and not app.exception
    # the scan fit's smallest tail is set on the page (read by scan only), as --min-tail on the command line
    assert app.number_input(key="spectra_min_tail").disabled
    app.selectbox(key="spectra_fit").set_value("scan").run()
    app.number_input(key="spectra_min_tail").set_value(2).run()
    run_until_idle(app, "spectra")
    scan = app.dataframe[0].value
    assert scan["fit"].unique().tolist() == ["scan"] and scan["min_tail"].unique().tolist() == [2]
    assert scan.loc[scan["prunable"], "n_tail"].min() < 10  # weightwatcher's floor lets some tails be that small
    app.selectbox(key="spectra_fit").set_value("peak").run()  # (the app fixture is shared)
    run_until_idle(app, "spectra")


def _budget(at: AppTest) -> float:
    m = re.search(r"Budget as drawn: \*\*([\d.]+)%\*\*", texts(at))
    assert m, texts(at)
    return float(m.group(1))


def test_allocation_budget_follows_the_curve(app):
    app.switch_page("pages/allocation.py")
    run_until_idle(app, "spectra")
    assert len(app.data_editor) == 1  # the numeric editor of the control points
    app.session_state["alloc_points"] = [[0.0, 0.2], [1.0, 0.2]]
    app.run()
    assert _budget(app) == pytest.approx(20.0)
    app.session_state["alloc_points"] = [[0.0, 0.3], [0.5, 0.6], [1.0, 0.9]]
    app.run()
    drawn = _budget(app)
    assert 55.0 < drawn < 65.0
    assert metric(app, "Applied budget") == "50.0%"  # normalized to the 50% target by default
    app.radio(key="alloc_mode").set_value("as drawn").run()
    assert metric(app, "Applied budget") == f"{drawn:.1f}%"
    applied = app.session_state["alloc_custom"]
    assert applied.method == "custom" and applied.per_block[0] < applied.per_block[-1]
    app.radio(key="alloc_mode").set_value("normalized to target").run()


def test_allocation_presets_and_json(app):
    from analysis.allocation import allocate

    app.switch_page("pages/allocation.py")
    run_until_idle(app, "spectra")
    app.selectbox(key="alloc_preset").set_value("uniform").run()
    app.button(key="alloc_load_preset").click().run()
    pts = app.session_state["alloc_points"]
    assert len(pts) == 7 and all(p[1] == pytest.approx(0.5) for p in pts)
    assert _budget(app) == pytest.approx(50.0)
    # an allocation JSON written by the engine loads as the curve
    n = len(app.session_state["alloc_custom"].per_block)
    table = pd.DataFrame({"name": [f"model.layers.{b}.mlp.up_proj" for b in range(n)], "block": range(n),
                          "params": 1000, "prunable": True})
    alloc = allocate(table, 0.3, "uniform")
    app.file_uploader(key="alloc_upload").upload("a.json", json.dumps(alloc.to_dict()).encode(), "application/json")
    app.run()
    app.run()
    assert not app.exception
    assert _budget(app) == pytest.approx(30.0)
    assert not [i for i in app.info if "keep their offsets" in i.value]
    # per-matrix ratios: the curve takes the per-block ratios, and every matrix keeps its offset from them, so the
    # curve applied as drawn is the file; dropping the offsets leaves one ratio per block
    per_matrix = alloc.to_dict()
    per_matrix["per_layer"].update({f"model.layers.{b}.mlp.down_proj": 0.5 for b in range(n)})
    app.file_uploader(key="alloc_upload").clear().upload("kinds.json", json.dumps(per_matrix).encode(),
                                                         "application/json")
    app.run()
    app.run()
    [note] = [i.value for i in app.info if "keep their offsets" in i.value]
    assert "kinds.json" in note and "20.0% apart" in note
    app.radio(key="alloc_mode").set_value("as drawn").run()
    applied = app.session_state["alloc_custom"]
    assert {name: applied.per_layer[name] for name in per_matrix["per_layer"]} == pytest.approx(per_matrix["per_layer"])
    assert applied.per_layer["model.layers.0.self_attn.q_proj"] == pytest.approx(0.3)  # not in the file: its block's
    assert _budget(app) > 30.0
    app.button(key="alloc_drop_offsets").click().run()
    assert not [i for i in app.info if "keep their offsets" in i.value]
    assert all(r == pytest.approx(0.3) for r in app.session_state["alloc_custom"].per_layer.values())
    assert _budget(app) == pytest.approx(30.0)
    app.radio(key="alloc_mode").set_value("normalized to target").run()
    bad = app.file_uploader(key="alloc_upload")
    bad.clear().upload("bad.json", b'{"format": "x"}', "application/json")
    app.run()
    assert any("Could not load bad.json" in e.value for e in app.error)
    # a curve whose offsets a hand edit left as integers; an allocation of a 2-block model: its curve, and a note
    edited = {**alloc.to_dict(), "params": {"points": [[0, 0.3], [1, 0.3]], "offsets": {table["name"][0]: 0}}}
    app.file_uploader(key="alloc_upload").clear().upload("edited.json", json.dumps(edited).encode(), "application/json")
    app.run()
    app.run()
    assert not app.exception and any("keep their offsets from edited.json" in i.value for i in app.info)
    other = allocate(table.head(14).assign(block=[b // 7 for b in range(14)]), 0.4, "uniform")
    app.file_uploader(key="alloc_upload").clear().upload("other.json", json.dumps(other.to_dict()).encode(),
                                                         "application/json")
    app.run()  # the upload, then the rerun that draws its curve and shows the note once
    assert not app.exception and app.session_state["alloc_points"] == [[0.0, 0.4], [1.0, 0.4]]
    assert any(i.value.startswith("The allocation was made for another model (2 blocks") for i in app.info)
    app.run()
    assert not any("made for another model" in i.value for i in app.info)
    # a curve downloaded "normalized to target" loads back as it was saved: normalized, at its own target
    app.slider(key="alloc_target").set_value(0.6)
    app.radio(key="alloc_mode").set_value("normalized to target")
    app.session_state["alloc_points"] = [[0.0, 0.5], [1.0, 0.9]]  # drawn at 70%
    app.run()
    saved = app.session_state["alloc_custom"]
    assert saved.achieved == pytest.approx(0.6) and saved.params["normalize"]
    app.slider(key="alloc_target").set_value(0.4)
    app.radio(key="alloc_mode").set_value("as drawn").run()
    app.file_uploader(key="alloc_upload").clear().upload("saved.json", json.dumps(saved.to_dict()).encode(),
                                                         "application/json")
    app.run()
    assert not app.exception and app.slider(key="alloc_target").value == pytest.approx(0.6)
    assert app.radio(key="alloc_mode").value == "normalized to target"
    assert app.session_state["alloc_custom"].per_layer == pytest.approx(saved.per_layer)
    assert any(i.value == "The target is now 60%, the one saved.json was normalized to." for i in app.info)
    app.slider(key="alloc_target").set_value(0.5).run()  # the default again, for the tests that share the app


def test_allocation_per_matrix_offsets(app):
    app.switch_page("pages/allocation.py")
    run_until_idle(app, "spectra")
    app.radio(key="alloc_mode").set_value("as drawn").run()
    app.selectbox(key="alloc_preset").set_value("uniform").run()
    app.button(key="alloc_load_preset").click().run()

    def offset_input(label):
        [box] = [n for n in app.number_input if n.label == label]
        return box

    def note():
        return " ".join(i.value for i in app.info if "keep their offsets" in i.value)

    def ratios(kind):
        return {round(r, 6) for n, r in app.session_state["alloc_custom"].per_layer.items() if n.endswith(kind)}

    assert offset_input("k_proj").value == 0.0 and not note()
    offset_input("k_proj").set_value(-0.1).run()  # every key projection 10 points below its block
    assert not app.exception
    assert ratios("k_proj") == {0.4} and ratios("q_proj") == {0.5}
    assert "from your edits" in note() and offset_input("k_proj").value == pytest.approx(-0.1)
    one = "model.layers.3.mlp.down_proj"
    app.selectbox(key="alloc_matrix_pick").set_value(one).run()
    offset_input("Its offset").set_value(0.2).run()  # one matrix alone
    applied = app.session_state["alloc_custom"]
    assert applied.per_layer[one] == pytest.approx(0.7) and applied.per_layer["model.layers.4.mlp.down_proj"] == 0.5
    assert ratios("k_proj") == {0.4} and applied.params["offsets"][one] == pytest.approx(0.2)
    assert offset_input("down_proj").value == pytest.approx(0.2 / len(applied.per_block), abs=1e-4)
    offset_input("k_proj").set_value(0.0).run()
    assert ratios("k_proj") == {0.5} and set(app.session_state["alloc_custom"].params["offsets"]) == {one}
    assert "from your edits (up to 20.0% apart in a block)" in note()  # block 3: its down_proj and the rest
    # offsets loaded from a file, then edited, say so
    per_matrix = app.session_state["alloc_custom"].to_dict()
    per_matrix["per_layer"].update({n: 0.6 for n in per_matrix["per_layer"] if n.endswith("up_proj")})
    app.file_uploader(key="alloc_upload").upload("ups.json", json.dumps(per_matrix).encode(), "application/json")
    app.run()
    app.run()
    assert "from ups.json" in note()
    before = dict(app.session_state["alloc_custom"].per_layer)
    offset_input("v_proj").set_value(offset_input("v_proj").value - 0.05).run()
    assert "from ups.json, edited" in note()
    after = app.session_state["alloc_custom"].per_layer
    assert all(after[n] == pytest.approx(before[n] - 0.05 if n.endswith("v_proj") else before[n]) for n in before)
    app.file_uploader(key="alloc_upload").clear()
    app.button(key="alloc_drop_offsets").click().run()
    assert not note() and offset_input("v_proj").value == 0.0
    app.radio(key="alloc_mode").set_value("normalized to target").run()
    # the search's held-out window count applies to a held-out text only
    windows = app.number_input(key="alloc_search_samples")
    assert windows.disabled and windows.value is None
    app.text_input(key="alloc_search_text").input("wikitext2:valid").run()
    assert not app.number_input(key="alloc_search_samples").disabled
    assert app.number_input(key="alloc_search_then_samples").disabled  # until there is a second stage
    app.number_input(key="alloc_search_then_steps").set_value(20).run()
    assert not app.number_input(key="alloc_search_then_samples").disabled
    app.number_input(key="alloc_search_then_steps").set_value(0).run()
    app.text_input(key="alloc_search_text").input("").run()


def test_allocation_undo_takes_back_each_change_of_the_curve(app):
    """Undo takes back the curve's changes one at a time, newest first: here offsets dropped, a kind offset
    set, a reshaped curve (as a drag or the table leaves it)."""
    app.switch_page("pages/allocation.py")
    run_until_idle(app, "spectra")
    app.selectbox(key="alloc_preset").set_value("uniform").run()
    app.button(key="alloc_load_preset").click().run()
    uniform = app.session_state["alloc_points"]
    app.session_state["alloc_points"] = [[0.0, 0.3], [1.0, 0.7]]
    app.run()
    [k_proj] = [n for n in app.number_input if n.label == "k_proj"]
    k_proj.set_value(-0.1).run()
    with_offsets = app.session_state["alloc_custom"].per_layer
    app.button(key="alloc_drop_offsets").click().run()
    assert not app.session_state["alloc_custom"].params.get("offsets")

    app.button(key="alloc_undo").click().run()  # the offsets are back
    assert app.session_state["alloc_custom"].per_layer == pytest.approx(with_offsets)
    assert [n for n in app.number_input if n.label == "k_proj"][0].value == pytest.approx(-0.1)
    app.button(key="alloc_undo").click().run()  # the reshaped curve, without them
    assert app.session_state["alloc_points"] == [[0.0, 0.3], [1.0, 0.7]]
    assert not app.session_state["alloc_custom"].params.get("offsets")
    app.button(key="alloc_undo").click().run()  # the preset
    assert app.session_state["alloc_points"] == uniform
    assert not app.exception


def test_prune_runs_in_the_background_and_restores(app, runs_db):
    app.switch_page("pages/prune.py").run()
    assert not app.exception
    assert "dense (shared model) · 0.03% of prunable weights are zero" in texts(app)
    assert app.selectbox(key="prune_recipe_pruner").value == "sparsegpt"  # no prune yet: the default

    def small_settings():  # so the test stays quick on two cores
        set_prune_inputs(app, alloc="uniform", n_samples=4, calib_seqlen=64, eval_seqlen=128, windows=3)

    small_settings()
    app.button(key="prune_run").click().run()
    assert not app.exception
    # clicking elsewhere (another page) does not stop the job
    app.switch_page("pages/learn.py").run()
    assert app.session_state["work"].job.status in ("running", "done")
    app.switch_page("pages/prune.py").run()
    small_settings()  # (AppTest re-creates the page's widgets with their defaults)
    run_until_idle(app, "prune")
    assert not app.error, [e.value for e in app.error]
    ppl = float(metric(app, "Perplexity (prune)"))
    dense = float(metric(app, "Dense baseline perplexity"))
    assert math.isfinite(ppl) and ppl > dense > 1
    assert "pruned copy — wanda 50% (uniform) · 50.00% of prunable weights are zero" in texts(app)
    assert app.selectbox(key="prune_recipe_pruner").value == "wanda"  # the recipe's modifier: the prune's
    # the shared model is untouched
    from components.state import load_shared_model

    shared = load_shared_model(*app.session_state["model_key"]).model
    assert float(shared.model.layers[0].self_attn.q_proj.weight.eq(0).float().mean()) < 0.01  # (4-bit zeros only)
    from analysis.store import RunStore

    runs = RunStore(runs_db).all()
    assert len(runs) == 1 and runs["pruned_ppl"][0] == pytest.approx(ppl, abs=0.01)
    # a reload of the tab (a new session on its URL, the old one gone) finds its pruned copy and the prune's result
    reload = reload_tab(app)
    reload.switch_page("pages/prune.py").run()
    assert not reload.exception and reload.session_state["work"] is app.session_state["work"]
    assert "pruned copy — wanda 50% (uniform) · 50.00% of prunable weights are zero" in texts(reload)
    assert float(metric(reload, "Perplexity (prune)")) == ppl
    # the Spectra page draws a layer's ESD in the pruned copy over its dense one
    app.switch_page("pages/spectra.py").run()
    app.selectbox(key="spectra_overlay").set_value("this layer, my pruned copy").run()
    run_until_idle(app, "spectra")
    assert not app.exception and "my pruned copy" in trace_names(app.get("plotly_chart")[-1])
    app.selectbox(key="spectra_overlay").set_value("none").run()
    app.switch_page("pages/prune.py").run()
    small_settings()
    # choosing another model (here: another dtype) says, before Load, that loading it drops the pruned copy
    app.switch_page("pages/model.py").run()
    app.selectbox(key="model_dtype").set_value("bfloat16").run()
    assert any(w.value.startswith("Loading this choice drops your weights") for w in app.warning)
    app.selectbox(key="model_dtype").set_value("auto").run()
    assert not app.warning
    app.switch_page("pages/prune.py").run()
    app.button(key="prune_restore").click().run()
    assert "dense (shared model) · 0.03% of prunable weights are zero" in texts(app)
    assert app.selectbox(key="prune_recipe_pruner").value == "sparsegpt"  # no prune to follow


def test_prune_page_prunes_with_your_curve(app, runs_db):
    """The curve drawn on the Allocation page is what a "custom curve" run prunes, and the run record keeps its
    control points (so the CLI's --allocation custom --curve redoes it); after Restore dense, the perplexity
    shown says it was of the weights before."""
    from analysis.store import RunStore

    app.switch_page("pages/allocation.py")
    run_until_idle(app, "spectra")
    app.session_state["alloc_points"] = [[0.0, 0.2], [1.0, 0.6]]
    app.radio(key="alloc_mode").set_value("as drawn").run()
    curve = app.session_state["alloc_custom"]
    app.switch_page("pages/prune.py").run()
    set_prune_inputs(app, alloc="custom curve (Allocation page)", n_samples=4, calib_seqlen=64, eval_seqlen=64,
                     windows=1)
    assert any(f"prunes {curve.achieved:.1%}" in c.value for c in app.caption)
    app.button(key="prune_run").click().run()
    run_until_idle(app, "custom prune")
    assert not app.error, [e.value for e in app.error]
    store = RunStore(runs_db)
    record = store.get(int(store.all()["id"].max()))
    assert record["config"]["allocation"] == "custom"
    assert record["allocation"]["per_layer"] == pytest.approx(curve.per_layer)
    assert record["config"]["settings"]["allocation"]["points"] == [[0.0, 0.2], [1.0, 0.6]]
    assert record["config"]["settings"]["allocation"]["as_drawn"] is True
    from analysis.allocation import Allocation

    assert Allocation.from_dict(record).per_layer == pytest.approx(curve.per_layer)  # prune --allocation RUN.json
    assert any(m.label == "Perplexity (prune)" for m in app.metric)
    app.button(key="prune_restore").click().run()
    assert any(m.label == "Perplexity (prune, before Restore dense)" for m in app.metric)
    app.switch_page("pages/allocation.py").run()
    app.radio(key="alloc_mode").set_value("normalized to target").run()


def test_owl_preset_is_the_allocation_an_owl_run_applies(app, runs_db):
    """The Allocation page's OWL preset and an OWL run on the Prune page, with the same calibration
    settings (chosen on the Prune page) and the same λ (each page has its slider), give the same per-block ratios."""
    from analysis.settings import AllocationSettings
    from analysis.store import RunStore

    app.switch_page("pages/prune.py").run()
    app.selectbox(key="prune_alloc").set_value("OWL (outlier-guided)")
    app.number_input(key="prune_n_samples").set_value(4)
    app.number_input(key="prune_calib_seed").set_value(1)  # (the Allocation page's OWL preset reads it too)
    app.number_input(key="prune_calib_seqlen").set_value(64)
    app.number_input(key="prune_eval_seqlen").set_value(64)
    app.number_input(key="prune_windows").set_value(1)
    app.run()
    app.slider(key="prune_owl_lambda").set_value(0.04).run()
    app.button(key="prune_run").click().run()
    run_until_idle(app, "OWL prune")
    assert not app.error, [e.value for e in app.error]
    store = RunStore(runs_db)
    run_id = int(store.all()["id"].max())
    record = store.get(run_id)
    assert record["config"]["allocation"] == "owl" and record["config"]["n_samples"] == 4
    assert record["config"]["seed"] == 1 and record["config"]["settings"]["calibration"]["seed"] == 1
    # the dashboard's run is a CLI command away: its record to download, and the command that reruns it
    assert any(f"python -m analysis prune --rerun run-{run_id}.json" in c.value for c in app.caption)
    assert (record["config"]["device"], record["config"]["dtype"]) == ("cpu", "float32")
    assert record["allocation"]["params"]["owl_lambda"] == pytest.approx(0.04)
    app.slider(key="prune_owl_lambda").set_value(AllocationSettings.owl_lambda).run()  # (the app is shared)
    applied = record["allocation"]["per_block"]
    assert max(applied) - min(applied) > 0.01  # OWL is not uniform here

    app.switch_page("pages/allocation.py").run()
    app.checkbox(key="alloc_more").check().run()
    app.slider(key="alloc_owl_lambda").set_value(0.04).run()
    # the OWL ratios are the Prune run's shared job (already done); FARMS spectra may still be running
    preset, t0 = None, time.time()
    while preset is None:
        app.run()
        # (AppTest does not expose st.dataframe's key: the preset table is the one with an "owl" column)
        preset = next((d.value for d in app.dataframe if "owl" in d.value.columns), None)
        if preset is None and time.time() - t0 > WAIT_S:
            pytest.fail(f"no OWL preset after {WAIT_S} s: {[c.value for c in app.caption]}")
        time.sleep(1.0)
    assert preset["owl"].tolist() == pytest.approx(applied, abs=1e-9)
    app.slider(key="alloc_owl_lambda").set_value(AllocationSettings.owl_lambda).run()
    app.checkbox(key="alloc_more").uncheck().run()
    app.switch_page("pages/prune.py").run()
    app.button(key="prune_restore").click().run()
    app.number_input(key="prune_calib_seed").set_value(0).run()  # (the app is shared)


def test_prune_page_shows_an_nm_patterns_sparsity_and_keeps_the_target(app):
    app.switch_page("pages/prune.py").run()
    app.slider(key="prune_sparsity").set_value(0.7).run()
    app.selectbox(key="prune_nm").set_value("2:4").run()
    shown = app.slider(key="prune_sparsity_nm")
    assert shown.value == pytest.approx(0.5) and shown.disabled and app.selectbox(key="prune_alloc").disabled
    assert any(c.value.startswith("2:4 prunes every matrix to 50%: the allocation") for c in app.caption)
    app.selectbox(key="prune_nm").set_value("4:8").run()
    assert app.slider(key="prune_sparsity_nm").value == pytest.approx(0.5)
    app.selectbox(key="prune_nm").set_value("unstructured").run()
    # the target slider is back (its value, 0.7 again in a browser, comes back through app.py's PERSIST, which
    # AppTest runs only in a session's first run: the browser test sees it)
    assert not app.slider(key="prune_sparsity").disabled
    app.slider(key="prune_sparsity").set_value(0.5).run()


def test_prune_page_takes_your_own_evaluation_text(app, tmp_path):
    app.switch_page("pages/prune.py").run()
    app.selectbox(key="prune_eval_source").set_value("your own text (file path or hf:...)").run()
    app.text_input(key="prune_eval_own").input(str(tmp_path / "missing.txt")).run()
    assert any("Evaluation text: Text file" in e.value and "does not exist" in e.value for e in app.error)
    assert app.button(key="prune_run").disabled and app.button(key="prune_eval").disabled
    own = tmp_path / "own.txt"
    own.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    app.text_input(key="prune_eval_own").input(str(own)).run()
    assert not app.error and not app.button(key="prune_run").disabled
    app.number_input(key="prune_eval_seqlen").set_value(64)
    app.number_input(key="prune_windows").set_value(2).run()
    app.button(key="prune_eval").click().run()
    run_until_idle(app, "evaluation of your own text")
    assert not app.error, [e.value for e in app.error]
    ppl = float(metric(app, "Perplexity (eval)"))
    assert math.isfinite(ppl) and ppl < 20  # a text repeating one sentence is easy to predict
    # an uploaded file is kept (by content) and becomes the evaluation text
    app.file_uploader(key="prune_text_upload").upload("My notes.txt", own.read_bytes(), "text/plain")
    app.run()
    kept = Path(app.session_state["prune_eval_own"])
    assert app.session_state["prune_eval_source"] == "your own text (file path or hf:...)"
    assert kept.read_bytes() == own.read_bytes() and kept.name.endswith("-My_notes.txt")
    assert not app.error and not app.warning and not app.button(key="prune_run").disabled


def test_prune_page_reads_other_encodings_and_refuses_short_texts_before_a_job(app, tmp_path):
    app.switch_page("pages/prune.py").run()
    own = tmp_path / "latin1.txt"
    own.write_bytes("Le café était très animé ce matin-là, près de la fenêtre. ".encode("latin-1") * 40)
    app.selectbox(key="prune_eval_source").set_value("your own text (file path or hf:...)").run()
    app.text_input(key="prune_eval_own").input(str(own)).run()
    assert any("is not valid utf-8 text" in e.value and "Text encoding" in e.value for e in app.error)
    assert app.button(key="prune_eval").disabled
    app.text_input(key="prune_encoding").input("klingon").run()
    assert any("Unknown text encoding 'klingon'" in e.value for e in app.error)
    app.text_input(key="prune_encoding").input("latin-1").run()
    assert not app.error and not app.button(key="prune_eval").disabled
    # a window longer than the whole text: refused on the click, before any job (the last one stays)
    before = app.session_state["work"].job
    app.number_input(key="prune_eval_seqlen").set_value(4096).run()
    app.button(key="prune_eval").click().run()
    refused = [e.value for e in app.error]
    assert len(refused) == 1 and "Evaluation text has" in refused[0] and "Nothing was started" in refused[0]
    assert app.session_state["work"].job is before
    app.button(key="prune_run").click().run()
    assert any("Window length (tokens): Evaluation text has" in e.value and "one window of 4096" in e.value
               for e in app.error)
    assert app.session_state["work"].job is before
    app.number_input(key="prune_eval_seqlen").set_value(64).run()
    app.text_input(key="prune_encoding").input("utf-8")
    app.selectbox(key="prune_eval_source").set_value("default").run()
    assert not app.error


def test_compare_page_lists_the_run(app):
    app.switch_page("pages/compare.py").run()
    assert not app.exception
    table = app.dataframe[0].value
    assert len(table) >= 1 and {"pruned_ppl", "dense_ppl", "achieved"} <= set(table.columns)
    assert table["achieved"].iloc[-1] == pytest.approx(0.5, abs=0.01)
    assert app.get("download_button")
    # runs are named by their settings: the OWL run at λ 0.04 (above) is not one line with OWL at the default
    assert "wanda + owl λ=0.04" in set(table["line"])
    # its λ, ε and calibration text are columns of their own (of the downloaded CSV too)
    owl = table[table["line"] == "wanda + owl λ=0.04"]
    assert (owl["owl_lambda"] == 0.04).all() and owl["epsilon"].isna().all() and owl["calibration"].notna().all()
    assert any("wanda + owl λ=0.04" in label for label in app.multiselect(key="compare_delete").options)

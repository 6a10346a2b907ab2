"""The memory model (README, "Memory model"): a private copy when it fits, else the shared model
leased and pruned in place behind its gate; the memory estimate; device_map="auto"; the local
Hugging Face cache picker. Tiny LLaMA checkpoints built from a config, real torch, real files; the
memory limit is forced with $ALPHASCOPE_MEMORY_LIMIT_BYTES."""
import gc
import math
import time
from dataclasses import replace

import pytest
import torch

from analysis import search as search_module
from analysis import session
from analysis.evaluation import perplexity
from analysis.jobs import CANCELLED, DONE, ERROR, Job
from analysis.layers import zero_fraction
from analysis.loading import MEMORY_LIMIT_ENV, cached_checkpoints, estimate_memory, load_model
from analysis.pipeline import run
from analysis.pruners import PruneError
from analysis.session import (
    ModelGate,
    WorkingCopy,
    evaluate_job,
    evaluate_weights_job,
    lease_problem,
    prune_and_evaluate,
    prune_device,
    prune_need,
    search_job,
    zeroshot_weights_job,
)
from analysis.settings import AllocationSettings, CalibrationSettings, EvaluationSettings, PruneSettings, RunSettings
from tests.conftest import cancel_when, save_tiny_llama

SETTINGS = RunSettings(allocation=AllocationSettings(method="uniform", sparsity=0.5),
                       prune=PruneSettings(method="wanda"), calibration=CalibrationSettings(n_samples=2, seqlen=16),
                       evaluation=EvaluationSettings(source="default", seqlen=16, max_windows=3))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture
def tiny(tiny_dir):
    return load_model(str(tiny_dir), device="cpu")


def lease_only_limit(model) -> int:
    """A memory limit with room for a prune in place but not for a private copy."""
    need = prune_need(model, SETTINGS)
    copy, lease = need.weights + need.working, need.prunable + need.working
    assert lease < copy
    return (copy + lease) // 2


def wait_for_message(job: Job, text: str, timeout: float = 60.0) -> str:
    t0 = time.time()
    while text not in job.progress[0]:
        assert not job.done, (job.status, job.error)
        assert time.time() - t0 < timeout, job.progress
        time.sleep(0.05)
    return job.progress[0]


def test_your_weights_line_says_a_prune_is_under_way():
    import threading

    work, release = WorkingCopy("k", ModelGate(), "session A"), threading.Event()
    work.job = Job(lambda j: release.wait(30), name="prune").start()
    assert work.describe().startswith("being pruned")
    release.set()
    assert work.job.wait(30) and work.describe() == "dense (shared model)"


def test_a_copy_when_it_fits_else_the_lease_and_a_bit_identical_restore(tiny, monkeypatch):
    shared = tiny.model
    dense = {k: v.clone() for k, v in shared.state_dict().items()}
    windows = torch.randint(0, 119, (3, 16), generator=torch.Generator().manual_seed(1))
    dense_ppl = perplexity(shared, windows)
    gate = ModelGate()

    roomy = WorkingCopy("k", gate, "session A")
    job = Job(lambda j: prune_and_evaluate(j, roomy, shared, tiny.tokenizer, SETTINGS), name="prune").start()
    assert job.wait(300) and job.status == DONE, job.traceback
    assert roomy.model is not shared and not roomy.leased and gate.holder is None
    assert roomy.describe().startswith("pruned copy — wanda 50%")
    roomy.drop()

    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(lease_only_limit(shared)))
    work = WorkingCopy("k", gate, "session A")
    job = Job(lambda j: prune_and_evaluate(j, work, shared, tiny.tokenizer, SETTINGS), name="prune").start()
    assert job.wait(300) and job.status == DONE, job.traceback
    assert work.leased and work.model is shared and gate.holder == "session A"
    assert zero_fraction(shared) == pytest.approx(0.5, abs=0.01)
    assert work.describe().startswith("pruned in place — wanda 50%")

    # another session's dense evaluation waits in the queue, named, instead of reading pruned weights
    reader = Job(lambda j: _read_dense(j, gate, shared, windows), name="eval").start()
    msg = wait_for_message(reader, "waiting for session A's pruned weights to be restored")
    assert "position 1 in the queue" in msg and gate.queue() == ["session B"]
    work.restore()
    assert reader.wait(60) and reader.status == DONE
    assert reader.result == dense_ppl  # the dense weights, exactly
    assert gate.holder is None and not work.pruned and work.model is None
    assert all(torch.equal(v, dense[k]) for k, v in shared.state_dict().items())  # bit-identical


def _read_dense(job: Job, gate: ModelGate, model, windows) -> float:
    with gate.reading("session B", job):
        return evaluate_job(job, model, windows).ppl


def test_cancel_while_leased_restores_and_releases(tiny, monkeypatch):
    shared = tiny.model
    dense = {k: v.clone() for k, v in shared.state_dict().items()}
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(lease_only_limit(shared)))
    work = WorkingCopy("k", ModelGate(), "session A")

    def cancel_in_block_2(j):
        cancel_when(j, "block 2/")
        return prune_and_evaluate(j, work, shared, tiny.tokenizer, SETTINGS)

    job = Job(cancel_in_block_2, name="prune").start()
    assert job.wait(300) and job.status == "cancelled"
    assert work.gate.holder is None and not work.pruned
    assert all(torch.equal(v, dense[k]) for k, v in shared.state_dict().items())


def test_a_session_gone_while_leasing_gives_the_dense_weights_back(tiny, monkeypatch):
    """A closed tab's state is dropped by Streamlit: its lease must not keep the others waiting."""
    shared = tiny.model
    dense = {k: v.clone() for k, v in shared.state_dict().items()}
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(lease_only_limit(shared)))
    gate = ModelGate()

    def session_that_leaves() -> None:
        work = WorkingCopy("k", gate, "session A")  # (its job refers back to it: a cycle only the collector frees)
        work.job = Job(lambda j: prune_and_evaluate(j, work, shared, tiny.tokenizer, SETTINGS), name="prune").start()
        assert work.job.wait(300) and work.job.status == DONE, work.job.traceback
        assert gate.holder == "session A" and zero_fraction(shared) == pytest.approx(0.5, abs=0.01)

    gc.disable()  # as rare as the frozen model makes full collections in the app
    try:
        session_that_leaves()
        assert gate.holder == "session A"  # gone, but not collected yet
        waiter = WorkingCopy("k", gate, "session C")  # waiting for the lease collects the gone session's state
        waiter.lease(shared)
        assert gate.holder == "session C"
        assert all(torch.equal(v, dense[k]) for k, v in shared.state_dict().items())
        waiter.restore()
    finally:
        gc.enable()
    assert gate.holder is None
    again = WorkingCopy("k", gate, "session B")  # a restored lease is not given back twice
    again.lease(shared)
    again.restore()
    del again
    gc.collect()
    assert gate.holder is None


def test_a_disconnected_session_loses_its_lease_to_the_waiters(tiny, monkeypatch):
    """Streamlit keeps a closed or reloaded tab's session for a reconnection (so its state is never
    garbage): the waiters ask whether the holder is connected, and take the lease back once it has been
    away for ABANDON_S with no job running (a running prune finishes first). A connected holder keeps
    it however long others wait."""
    shared = tiny.model
    dense = {k: v.clone() for k, v in shared.state_dict().items()}
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(lease_only_limit(shared)))
    monkeypatch.setattr(session, "RECLAIM_S", 0.0)
    monkeypatch.setattr(session, "ABANDON_S", 0.3)
    gate, here = ModelGate(), {"A": True}
    a = WorkingCopy("k", gate, "session A", connected=lambda: here["A"])
    a.job = Job(lambda j: prune_and_evaluate(j, a, shared, tiny.tokenizer, SETTINGS), name="prune").start()
    assert a.job.wait(300) and a.job.status == DONE, a.job.traceback
    assert a.leased and gate.holder == "session A"

    c = WorkingCopy("k", gate, "session C")
    waiting = Job(lambda j: c.lease(shared, j), name="lease").start()
    time.sleep(1.0)  # many reclaims, each past ABANDON_S: a connected holder is never disconnected
    assert gate.holder == "session A" and a.pruned and not a.abandoned
    waiting.cancel()
    assert waiting.wait(10) and waiting.status == CANCELLED

    here["A"] = False  # the tab is closed: idle, pruned in place
    c.job = Job(lambda j: c.lease(shared, j), name="lease").start()
    assert c.job.wait(30) and c.job.status == DONE, c.job.traceback
    assert gate.holder == "session C" and not a.pruned and not a.leased
    assert "session A was disconnected for" in a.abandoned
    assert all(torch.equal(v, dense[k]) for k, v in shared.state_dict().items())
    c.restore()

    here["A"] = True  # A comes back and prunes again; then its tab is reloaded in the middle of a prune
    def prune_until_reloaded(j):
        report = j.report

        def on_report(msg, frac=None):
            report(msg, frac)
            if "block 2/" in msg and here["A"]:
                here["A"] = False
                time.sleep(1.0)  # many reclaims past ABANDON_S while the prune still runs
        j.report = on_report
        return prune_and_evaluate(j, a, shared, tiny.tokenizer, SETTINGS)

    a.job = Job(prune_until_reloaded, name="prune").start()
    while not a.leased:
        assert not a.job.done, a.job.traceback
        time.sleep(0.05)
    assert a.abandoned == ""  # a new lease forgets the old notice
    c.job = Job(lambda j: c.lease(shared, j), name="lease").start()
    assert c.job.wait(60) and c.job.status == DONE, c.job.traceback
    assert a.job.status == DONE, a.job.traceback  # finished, not cancelled: its record was made
    assert a.job.result["pruned_ppl"] is not None
    assert gate.holder == "session C" and not a.pruned
    assert all(torch.equal(v, dense[k]) for k, v in shared.state_dict().items())
    c.restore()
    assert gate.holder is None


def test_the_background_copy_never_waits_for_a_lease_so_a_waiting_evaluation_can_be_cancelled(tiny, monkeypatch):
    """The Prune page makes a private copy in the background when one fits. While another session leases
    the shared model, that copy must not wait in the gate holding the session's lock: an Evaluate would
    wait behind it, silent and deaf to Cancel (seen in a browser)."""
    shared = tiny.model
    gate = ModelGate()
    a = WorkingCopy("k", gate, "session A")
    a.lease(shared)
    b = WorkingCopy("k", gate, "session B")
    b.prepare(shared, prune_need(shared, SETTINGS))  # room for a copy: no memory limit here
    time.sleep(0.5)
    assert not b.lock.locked() and b.model is None and gate.queue() == []
    windows = torch.randint(0, 100, (2, 16))
    b.job = Job(lambda j: evaluate_weights_job(j, b, shared, windows), name="eval").start()
    assert "(position 1 in the queue)" in wait_for_message(b.job, "session A's pruned weights to be restored")
    b.job.cancel()
    assert b.job.wait(5) and b.job.status == CANCELLED
    a.restore()
    assert gate.holder is None and gate.queue() == []


def test_a_reload_takes_back_the_model_of_its_dtype(tiny_dir):
    """The URL names the model's source, device and dtype: a reload of a session on the float32 copy
    does not come back on the bfloat16 one the server also holds."""
    from streamlit.testing.v1 import AppTest

    from tests.test_app import APP

    keys = {}
    for dtype in ("bfloat16", "float32"):
        at = _app()
        at.selectbox(key="model_dtype").set_value(dtype).run()
        keys[dtype] = _load_folder(at, str(tiny_dir)).session_state["model_key"]
    # (the app writes the URL: seen in a browser; AppTest does not carry the app's writes back to at.query_params)
    for dtype in ("float32", "bfloat16"):
        again = AppTest.from_file(APP, default_timeout=120)
        again.query_params.update(model=str(tiny_dir), device="cpu", dtype=dtype)
        again.run()
        assert not again.exception and again.session_state["model_key"] == keys[dtype]
    # the Model page's estimate counts the Prune page's evaluation windows, not only its calibration
    at.switch_page("pages/prune.py").run()
    at.number_input(key="prune_eval_seqlen").set_value(64).run()
    at.switch_page("pages/model.py").run()
    assert any("an evaluation batch of 1 x 64" in c.value for c in at.caption), [c.value for c in at.caption]


def test_no_room_at_all_is_a_clear_error_not_a_crash(tiny, monkeypatch):
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "1000")
    need = prune_need(tiny.model, SETTINGS)
    assert "Not enough memory to prune" in lease_problem(tiny.model, need)
    work = WorkingCopy("k", ModelGate(), "session A")
    job = Job(lambda j: prune_and_evaluate(j, work, tiny.model, tiny.tokenizer, SETTINGS), name="prune").start()
    assert job.wait(60) and job.status == ERROR and "Not enough memory to prune" in job.error
    assert work.gate.holder is None and zero_fraction(tiny.model) == 0.0


def test_a_cancel_before_the_search_has_a_best_so_far_ends_it_at_once(tiny, monkeypatch):
    """Until the search has scored its starts it has nothing to return: a cancel during its statistics (or
    spectra, OWL) ends the job there instead of after them."""
    settings = AllocationSettings(method="auto", sparsity=0.5, search_steps=2)
    search = Job(lambda j: search_job(j, tiny.model, ModelGate(), "a search", tiny.tokenizer, False, settings,
                                      "wanda", SETTINGS.calibration, "default"), name="search")
    cancel_when(search, "search statistics: block 1/")
    messages, report = [], search.report
    search.report = lambda message, fraction=None: (messages.append(message), report(message, fraction))
    assert search.start().wait(120) and search.status == CANCELLED, search.traceback
    assert search.result is None and not search.updates()
    assert messages[-1].startswith("search statistics: block 1/")  # no block after it, no start scored
    # and while its first start is scored (its levels, minutes for SparseGPT or a large model): stopped there too
    search = Job(lambda j: search_job(j, tiny.model, ModelGate(), "a search", tiny.tokenizer, False, settings,
                                      "sparsegpt", SETTINGS.calibration, "default"), name="search")
    cancel_when(search, "search: scoring the start uniform")
    scored = []
    monkeypatch.setattr(search_module, "window_losses", lambda *a, **k: scored.append(1))
    assert search.start().wait(120) and search.status == CANCELLED, search.traceback
    assert search.result is None and not search.updates() and not scored  # stopped among its levels


def test_a_search_whose_session_went_away_is_cancelled(tiny, monkeypatch):
    """A reloaded or closed tab cannot see, cancel or use its search: once its session has been disconnected for
    ABANDON_S without a break the search is cancelled; a connection back within that time restarts the count."""
    monkeypatch.setattr(session, "ABANDON_S", 0.5)
    settings = AllocationSettings(method="auto", sparsity=0.5, search_steps=100_000)
    t0 = time.monotonic()

    def connected() -> bool:  # away at first, back before 0.5 s, away for good from 1 s on
        return 0.3 <= time.monotonic() - t0 < 1.0

    search = Job(lambda j: search_job(j, tiny.model, ModelGate(), "a search", tiny.tokenizer, False, settings,
                                      "wanda", SETTINGS.calibration, "default", connected=connected),
                 name="search").start()
    assert search.wait(120) and search.status == CANCELLED, (search.status, search.traceback)
    assert search.finished_at - search.started_at >= 1.0  # not while it was back


def test_the_search_copies_dense_weights_through_the_gate_and_needs_room(tiny, monkeypatch):
    """The dashboard's allocation search writes into its model: it searches a copy of the shared model,
    made after a session's prune in place is restored (never from pruned weights), or says why not."""
    shared = tiny.model
    dense = {k: v.clone() for k, v in shared.state_dict().items()}
    gate = ModelGate()
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(lease_only_limit(shared)))
    work = WorkingCopy("k", gate, "session A")
    job = Job(lambda j: prune_and_evaluate(j, work, shared, tiny.tokenizer, SETTINGS), name="prune").start()
    assert job.wait(300) and job.status == DONE and work.leased, job.traceback
    monkeypatch.delenv(MEMORY_LIMIT_ENV)  # room for the search's copy now

    searched = []
    settings = AllocationSettings(method="auto", sparsity=0.5, search_steps=2)

    def run(j):
        out = search_job(j, shared, gate, "session B's search", tiny.tokenizer, False, settings, "wanda",
                         SETTINGS.calibration, "default")
        searched.append(zero_fraction(shared))  # the shared weights while the search's copy was pruned
        return out

    search = Job(run, name="search").start()
    wait_for_message(search, "waiting for session A's pruned weights to be restored")
    work.restore()
    assert search.wait(300) and search.status == DONE, search.traceback
    assert search.result.achieved == pytest.approx(0.5, abs=1e-6) and search.updates()  # improvements emitted
    assert searched == [0.0] and all(torch.equal(v, dense[k]) for k, v in shared.state_dict().items())

    monkeypatch.setenv(MEMORY_LIMIT_ENV, "1000")
    search = Job(lambda j: search_job(j, shared, gate, "session B's search", tiny.tokenizer, False, settings,
                                      "wanda", SETTINGS.calibration, "default"), name="search").start()
    assert search.wait(60) and search.status == ERROR
    assert "needs a private copy of the model" in search.error and gate.holder is None


def test_zero_shot_of_dense_weights_waits_for_a_prune_in_place_to_be_restored(tiny, monkeypatch):
    """Zero-shot accuracy of a session's dense weights reads the shared model through the gate: while
    another session has it pruned in place it waits, and then scores the dense weights."""
    shared, tok = tiny.model, tiny.tokenizer
    tok.eos_token = "<unk>"  # lm-eval starts empty contexts with EOS; the word-level test tokenizer has none
    reader = WorkingCopy("k", ModelGate(), "session B")
    dense = zeroshot_weights_job(Job(lambda j: None), reader, shared, tok, "cloze", limit=8).accuracy()

    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(lease_only_limit(shared)))
    work = WorkingCopy("k", reader.gate, "session A")
    job = Job(lambda j: prune_and_evaluate(j, work, shared, tok, SETTINGS), name="prune").start()
    assert job.wait(300) and job.status == DONE and work.leased, job.traceback
    scores = Job(lambda j: zeroshot_weights_job(j, reader, shared, tok, "cloze", limit=8), name="zero-shot").start()
    wait_for_message(scores, "waiting for session A's pruned weights to be restored")
    work.restore()
    assert scores.wait(300) and scores.status == DONE, scores.traceback
    assert scores.result.accuracy() == dense


def test_estimate_before_load_includes_pruning_and_refuses_what_cannot_fit(tiny_dir, monkeypatch):
    est = estimate_memory(str(tiny_dir), "float32", n_samples=2, seqlen=16)
    loaded = load_model(str(tiny_dir), device="cpu")
    assert est.weights == sum(p.numel() * 4 for p in loaded.model.parameters())
    assert 0 < est.prunable < est.weights and est.hessians > 0 and est.activations > 0
    assert estimate_memory(str(tiny_dir), "bfloat16", 2, 16).weights == est.weights // 2
    assert est.problem(torch.device("cpu")) is None
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(est.weights))
    msg = est.problem(torch.device("cpu"), "tiny")
    assert msg.startswith("tiny may not fit here to be loaded and pruned")
    short = (est.weights + est.working + est.prunable - est.weights) / 2**10
    assert f"are free ({short:.1f} KiB short)" in msg  # small sizes in KiB: two equal "0.00 GiB" said nothing
    assert "Hessians (SparseGPT; TRIM's Gram matrices)" in msg and "original values" in msg and "a 16-bit dtype" in msg
    # what a run does not do is neither counted nor advised on
    half = replace(estimate_memory(str(tiny_dir), "bfloat16", 0, 16, eval_batch=1, eval_seqlen=16), prunable=0,
                   hessians=0)
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(half.weights // 2))
    msg = half.problem(torch.device("cpu"), "tiny", "evaluated")
    assert msg.startswith("tiny may not fit here to be loaded and evaluated")
    assert "an evaluation batch's logits" in msg and "Hessians" not in msg and "original values" not in msg
    assert "16-bit" not in msg and "calibration" not in msg and "shorter evaluation windows" in msg


def test_device_map_auto_with_disk_offload_evaluates_like_a_resident_model(tiny_dir, monkeypatch):
    resident = load_model(str(tiny_dir), device="cpu")
    windows = torch.randint(0, 119, (3, 16), generator=torch.Generator().manual_seed(2))
    expected = perplexity(resident.model, windows)
    spread = load_model(str(tiny_dir), device_map="auto")
    assert spread.info.device == "device_map=auto" and set(spread.info.placement) == {"cpu"}
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "250000")  # about half the weights: the rest goes to disk
    offloaded = load_model(str(tiny_dir), device_map="auto")
    assert offloaded.info.placement.get("disk", 0) > 0
    assert sum(offloaded.info.placement.values()) == sum(resident.info.placement.values())
    assert perplexity(spread.model, windows) == pytest.approx(expected, rel=1e-6)
    assert perplexity(offloaded.model, windows) == pytest.approx(expected, rel=1e-6)
    assert "offloaded" in lease_problem(offloaded.model, prune_need(offloaded.model, SETTINGS))
    with pytest.raises(PruneError, match="partly offloaded .* they can be evaluated, not pruned"):
        run(offloaded, SETTINGS)  # a one-line error, not a meta-tensor traceback from the block walker


def hf_cache_with_tiny(root, tiny_dir):
    import shutil

    snap = root / "models--someone--tiny-llama" / "snapshots" / "0123456789abcdef"
    shutil.copytree(tiny_dir, snap)
    (root / "models--broken--none" / "snapshots" / "x").mkdir(parents=True)  # no config.json: not listed
    return snap


def test_hf_cache_checkpoints_are_listed_and_load(tiny_dir, tmp_path):
    snap = hf_cache_with_tiny(tmp_path, tiny_dir)
    found = cached_checkpoints(tmp_path)
    assert [(c.repo_id, c.revision, c.path) for c in found] == [("someone/tiny-llama", "0123456789abcdef", snap)]
    loaded = load_model(str(found[0].path), device="cpu")
    assert loaded.info.n_blocks == 3 and math.isfinite(perplexity(loaded.model, torch.tensor([[1, 2, 3, 4]])))


# ---------------------------------------------------------------------------------------------
# two dashboard sessions (Streamlit AppTest; the page scripts share the process's model registry)


def _app():
    from streamlit.testing.v1 import AppTest

    from tests.test_app import APP

    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    return at


def _until(at, done, what: str, timeout: float = 300):
    t0 = time.time()
    while True:
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        if done(at):
            return at
        assert time.time() - t0 < timeout, f"{what}: {[p.proto.text for p in at.get('progress')]}"
        time.sleep(0.5)


def _small_prune_settings(at):
    at.selectbox(key="prune_alloc").set_value("uniform")
    at.number_input(key="prune_n_samples").set_value(2)
    at.number_input(key="prune_calib_seqlen").set_value(16)
    at.number_input(key="prune_eval_seqlen").set_value(16)
    at.number_input(key="prune_windows").set_value(3)
    return at.run()


def _load_folder(at, folder: str):
    at.radio(key="model_choice").set_value("Local checkpoint folder").run()
    at.text_input(key="model_folder").set_value(folder).run()
    at.button(key="model_load").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    return at


def test_two_sessions_under_a_low_memory_limit(tiny_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("ALPHASCOPE_RUNS_DB", str(tmp_path / "runs.sqlite"))
    from components.state import load_shared_model

    a = _load_folder(_app(), str(tiny_dir))
    shared = load_shared_model(*a.session_state["model_key"]).model
    dense = {k: v.clone() for k, v in shared.state_dict().items()}
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(lease_only_limit(shared)))
    a.switch_page("pages/prune.py").run()
    _small_prune_settings(a)
    a.button(key="prune_run").click().run()
    _small_prune_settings(a)
    _until(a, lambda at: not at.get("progress"), "prune")
    assert not a.error, [e.value for e in a.error]
    work = a.session_state["work"]
    assert work.leased and work.label.startswith("wanda 50%")
    from analysis.store import RunStore  # the record names the model it pruned, so it can be run again

    record = RunStore(tmp_path / "runs.sqlite").get(1)
    assert record["config"]["settings"]["model"]["source"] == str(tiny_dir)
    assert any("pruned in place — wanda 50%" in m.value for m in a.markdown)
    assert any("pruned in place for you" in m.value for m in a.info)
    baseline = float([m.value for m in a.metric if m.label == "Dense baseline perplexity"][0])

    b = _load_folder(_app(), str(tiny_dir))  # the same shared model: no second load
    b.switch_page("pages/prune.py").run()
    _small_prune_settings(b)
    assert any(f"held by {work.owner}" in w.value for w in b.warning), (
        [w.value for w in b.warning], [i.value for i in b.info], work.owner, b.session_state["work"].owner)
    assert any("dense (shared model) · 0.00%" in m.value for m in b.markdown)  # not the pruned zeros
    b.button(key="prune_eval").click().run()
    _small_prune_settings(b)
    waiting = [p.proto.text for p in b.get("progress")]
    assert any(f"waiting for {work.owner}'s pruned weights to be restored (position 1" in t for t in waiting), waiting
    b.button(key="prune_cancel").click().run()  # a waiting evaluation ends at once, and nothing was restored
    _until(b, lambda at: not at.get("progress"), "cancel", timeout=10)
    assert [w.value for w in b.warning if w.value.startswith("Cancelled")] == ["Cancelled."]
    b.button(key="prune_eval").click().run()
    _small_prune_settings(b)

    a.button(key="prune_restore").click().run()
    assert any("dense (shared model)" in m.value for m in a.markdown)
    assert all(torch.equal(v, dense[k]) for k, v in shared.state_dict().items())
    _until(b, lambda at: not at.get("progress"), "evaluation")
    b_ppl = float([m.value for m in b.metric if m.label == "Perplexity (eval)"][0])
    assert b_ppl == baseline


def test_model_page_picker_lists_the_hf_cache_and_loads_from_it(tiny_dir, tmp_path, monkeypatch):
    snap = hf_cache_with_tiny(tmp_path, tiny_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    at = _app()
    at.radio(key="model_choice").set_value("Already in the local Hugging Face cache").run()
    picker = at.selectbox(key="model_cached")
    assert picker.options == ["someone/tiny-llama (01234567)"]
    picker.set_value("someone/tiny-llama (01234567)").run()
    at.button(key="model_load").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.session_state["model_key"][0] == str(snap)
    assert any("Weights live on: **cpu**" in c.value for c in at.caption)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lease_on_a_gpu_keeps_the_snapshot_on_the_host(tiny_dir, monkeypatch):
    loaded = load_model(str(tiny_dir), device="cuda", dtype="bfloat16")
    shared = loaded.model
    dense = {k: v.clone() for k, v in shared.state_dict().items()}
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(lease_only_limit(shared)))
    work = WorkingCopy("k", ModelGate(), "session A")
    job = Job(lambda j: prune_and_evaluate(j, work, shared, loaded.tokenizer, SETTINGS), name="prune").start()
    assert job.wait(300) and job.status == DONE, job.traceback
    assert work.leased and all(w.device.type == "cpu" for w in work.dense.weights.values())
    assert zero_fraction(shared) == pytest.approx(0.5, abs=0.01)
    work.restore()
    assert all(torch.equal(v, dense[k]) for k, v in shared.state_dict().items())
    spread = load_model(str(tiny_dir), device_map="auto", dtype="bfloat16")
    assert set(spread.info.placement) == {"cuda:0"}
    on_host = load_model(str(tiny_dir), device="cpu")
    assert prune_device(on_host.model).type == "cuda"  # a host-resident model is pruned block by block there
    job = Job(lambda j: prune_and_evaluate(j, WorkingCopy("h", ModelGate()), on_host.model, on_host.tokenizer,
                                           SETTINGS), name="prune").start()
    assert job.wait(300) and job.status == DONE, job.traceback


def test_cli_device_map_auto_gives_the_resident_perplexity(tiny_dir, capsys):
    from analysis.cli import main

    args = ["eval", "--model", str(tiny_dir), "--text", "default", "--eval-seqlen", "16", "--max-windows", "3"]
    assert main([*args, "--device", "cpu"]) == 0
    resident = capsys.readouterr().out.strip().splitlines()[-1]
    assert main([*args, "--device-map", "auto"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == resident


def test_cli_prune_refuses_before_the_load_a_device_map_that_would_offload(tiny_dir, tmp_path, capsys, monkeypatch):
    """Weights beyond what device_map="auto" may place go to disk, where they cannot be pruned: prune says so before
    it loads anything (and writes no store), not after the load; with the room, it prunes."""
    from analysis.cli import main
    from analysis.loading import format_bytes, placement_room

    db = tmp_path / "runs.sqlite"
    args = ["prune", "--model", str(tiny_dir), "--device-map", "auto", "--pruner", "magnitude", "--sparsity", "0.5",
            "--eval", "default", "--eval-seqlen", "16", "--max-windows", "1", "--db", str(db)]
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "250000")  # about half the weights on the host (and on a GPU)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device-map: the weights ("), err
    assert (f"exceed the {format_bytes(placement_room())} free on the GPUs and the host, so accelerate would put some "
            "on disk, where they can be evaluated, not pruned") in err, err
    assert "\n" not in err.strip() and not db.exists()
    monkeypatch.delenv(MEMORY_LIMIT_ENV)
    assert main(args) == 0 and db.exists()


def test_model_page_refuses_a_model_that_cannot_fit(tiny_dir, tmp_path, monkeypatch):
    import shutil

    folder = shutil.copytree(tiny_dir, tmp_path / "tiny-copy")  # a key no other test loaded
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "100000")
    at = _app()
    at.radio(key="model_choice").set_value("Local checkpoint folder").run()
    at.text_input(key="model_folder").set_value(str(folder)).run()
    at.button(key="model_load").click().run()
    assert not at.exception
    assert any(e.value.startswith(f"Not loaded: '{folder}' may not fit here") for e in at.error), \
        [e.value for e in at.error]
    assert "model_key" not in at.session_state


def test_the_weights_label_names_a_rowwise_refinement(tiny):
    work = WorkingCopy("k", ModelGate(), "session A")
    settings = replace(SETTINGS, prune=PruneSettings(method="wanda", rowwise="trim"))
    job = Job(lambda j: prune_and_evaluate(j, work, tiny.model, tiny.tokenizer, settings), name="prune").start()
    assert job.wait(300) and job.status == DONE, job.traceback
    assert work.label == "wanda + trim 50% (uniform)"

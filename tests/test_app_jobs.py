"""Background jobs (analysis/jobs.py): the Job runner, and prune-then-evaluate on a private copy
of the real default model while the shared model stays dense."""
import threading
import time

import pytest
from conftest import cancel_when

from analysis.jobs import CANCELLED, DONE, ERROR, Job, JobCancelled
from analysis.layers import zero_fraction
from analysis.session import WorkingCopy, prune_and_evaluate
from analysis.settings import AllocationSettings, CalibrationSettings, EvaluationSettings, PruneSettings, RunSettings


def magnitude_50() -> RunSettings:
    """A small uniform 50% magnitude run, so the test stays quick on two cores."""
    return RunSettings(allocation=AllocationSettings(method="uniform", sparsity=0.5),
                       prune=PruneSettings(method="magnitude"), calibration=CalibrationSettings(n_samples=2, seqlen=64),
                       evaluation=EvaluationSettings(source="default", seqlen=64, max_windows=2))


def test_job_reports_progress_updates_and_result():
    gate = threading.Event()

    def work(job):
        for i in range(3):
            job.report(f"step {i}", (i + 1) / 3)
            job.emit(i)
        gate.wait(5)
        return "ok"

    job = Job(work, name="t").start()
    for _ in range(100):
        if job.updates() == [0, 1, 2]:
            break
        time.sleep(0.01)
    assert job.running and not job.done and job.progress == ("step 2", 1.0)
    gate.set()
    assert job.wait(5)
    assert job.status == DONE and job.result == "ok" and job.latest() == 2


def test_job_errors_and_cancel():
    bad = Job(lambda job: (_ for _ in ()).throw(ValueError("sparsity must be in [0, 1)")), name="bad").start()
    bad.wait(5)
    assert bad.status == ERROR and bad.error == "sparsity must be in [0, 1)"
    crash = Job(lambda job: 1 / 0, name="crash").start()
    crash.wait(5)
    assert crash.status == ERROR and crash.error.startswith("ZeroDivisionError")

    def loop(job):
        while True:
            job.check()
            time.sleep(0.01)

    job = Job(loop, name="loop").start()
    job.cancel()
    assert job.wait(5) and job.status == CANCELLED
    with pytest.raises(RuntimeError):
        job.start()
    assert JobCancelled


def test_prune_on_a_private_copy_leaves_the_shared_model_dense(default_model, tmp_path):
    from analysis.store import RunStore

    shared = default_model.model
    dense_zeros = zero_fraction(shared)
    work, store = WorkingCopy("k"), RunStore(tmp_path / "runs.sqlite")
    job = Job(lambda j: prune_and_evaluate(j, work, shared, default_model.tokenizer,
                                           magnitude_50(),
                                           model_name="default", store=store), name="prune").start()
    assert job.wait(600), job.progress
    assert job.status == DONE, job.traceback
    record = job.result
    assert work.model is not shared and work.pruned and work.label.startswith("magnitude 50%")
    assert zero_fraction(work.model) == pytest.approx(0.5, abs=0.005)
    assert zero_fraction(shared) == dense_zeros  # the shared model never changed
    ups = job.updates()
    assert [u.windows_done for u in ups] == [1, 2] and ups[-1].ppl == record["pruned_ppl"]
    runs = store.all()
    assert len(runs) == 1 and runs["pruned_ppl"][0] == pytest.approx(record["pruned_ppl"])
    assert runs["allocation_method"][0] == "uniform" and runs["sparsity"][0] == 0.5
    work.restore()
    assert not work.pruned and zero_fraction(work.model) == dense_zeros


def test_cancel_restores_the_dense_copy(default_model):
    work = WorkingCopy("k")
    started = threading.Event()

    def report_then_cancel(j):
        cancel_when(j, "block 3/", then=started.set)
        return prune_and_evaluate(j, work, default_model.model, default_model.tokenizer,
                                  magnitude_50())

    job = Job(report_then_cancel, name="prune").start()
    assert job.wait(600)
    assert started.is_set() and job.status == CANCELLED
    assert not work.pruned and zero_fraction(work.model) == zero_fraction(default_model.model)

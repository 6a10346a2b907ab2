"""Zero-shot accuracy of a model in memory (dense or pruned), with EleutherAI's lm-evaluation-harness.

The model is wrapped as it is (`HFLM(pretrained=<the nn.Module>)`): nothing is reloaded from disk,
so pruned weights are what gets measured.

Tasks:
  - local tasks, YAML files in analysis/tasks/ that lm-eval finds through
    `TaskManager(include_path=TASKS_DIR)`. "cloze": a last-word cloze over the embedded corpus's
    evaluation half (never its calibration half, see `cloze_docs`), 4 choices, chance 25%;
  - any lm-eval task, e.g. the ones the pruning papers report (`PAPER_TASKS`). Their data comes from
    the Hugging Face hub or its local datasets cache; `check_tasks` refuses them with one line before
    any model work when neither is there (it never waits on an unreachable hub).

Scores are plain rows (`Score`): task, metric (acc, acc_norm, ...), value in [0, 1], its standard
error, and n, the number of documents scored.
"""
from __future__ import annotations

import difflib
import random
import re
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import pandas as pd
from huggingface_hub import constants as hub_constants
from torch import nn

from analysis.data import evaluation_text
from analysis.errors import AlphascopeError
from analysis.loading import hub_reachable
from analysis.runtime import ProgressFn, StopFlag, should_stop

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
CHUNK = 64  # loglikelihood requests per progress report and stop check
# stderr: closed form for mean metrics (acc); draws for the few lm-eval bootstraps (f1, mcc, ...)
BOOTSTRAP_ITERS = 1000


class ZeroShotError(AlphascopeError, ValueError):
    """A task the user named cannot run here (unknown, or its data is out of reach); one line."""


@dataclass(frozen=True)
class Score:
    task: str
    metric: str
    value: float
    stderr: float | None
    n: int


@dataclass
class ZeroShotResult:
    """scores: one row per (task, metric); limit: documents per task (None: all); seconds: wall time;
    stopped: the stop flag ended the run early (then scores is empty)."""

    tasks: tuple[str, ...]
    scores: list[Score] = field(default_factory=list)
    limit: int | None = None
    seconds: float = 0.0
    stopped: bool = False

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(s) for s in self.scores], columns=["task", "metric", "value", "stderr", "n"])

    def accuracy(self) -> dict[str, float]:
        """Task -> acc (the metric the papers' tables report)."""
        return record_accuracy({"zeroshot": self.to_dict()})

    def to_dict(self) -> dict:
        """What a run record keeps (record["zeroshot"])."""
        return {"tasks": list(self.tasks), "limit": self.limit, "seconds": round(self.seconds, 3),
                "stopped": self.stopped, "scores": [asdict(s) for s in self.scores]}


def record_accuracy(record: dict) -> dict[str, float]:
    """Task -> acc of a run record's zero-shot scores (empty when the run had none)."""
    scores = (record.get("zeroshot") or {}).get("scores") or []
    return {s["task"]: s["value"] for s in scores if s.get("metric") == "acc"}


# --------------------------------------------------------------------------------------------
# the local cloze task


SENTENCE_END = re.compile(r'(?<=[.!?])["\']?\s+(?=["\'A-Z])')
LAST_WORD = re.compile(r"^(.*\S)\s+([A-Za-z]{4,})\.$")
WORD = re.compile(r"\b[A-Za-z]{4,}\b")
CONTEXT_SENTENCES = 1  # sentences before the cloze sentence given as context
ATTRIBUTIONS = {"said", "says"}  # '..., he said.': answerable without reading the sentence


@lru_cache(maxsize=4)
def _cloze_docs(n_choices: int, seed: int) -> tuple[dict, ...]:
    docs = []
    for article in evaluation_text("default").split("\n"):
        sentences = [s.strip() for s in SENTENCE_END.split(article) if s.strip()]
        vocabulary = sorted({w.lower(): w for w in reversed(WORD.findall(article))}.values())  # first spelling
        for i in range(1, len(sentences)):  # the first sentence of an article has no context
            m = LAST_WORD.match(sentences[i])
            if not m or m.group(2).lower() in ATTRIBUTIONS:
                continue
            word = m.group(2)
            others = [w for w in vocabulary if w.lower() != word.lower()]
            if len(others) < n_choices - 1:
                continue
            rng = random.Random(seed * 1_000_003 + len(docs))
            choices = [word, *rng.sample(others, n_choices - 1)]
            rng.shuffle(choices)
            context = " ".join([*sentences[max(0, i - CONTEXT_SENTENCES):i], m.group(1)])
            docs.append({"context": context, "choices": choices, "label": choices.index(word)})
    return tuple(docs)


def cloze_docs(n_choices: int = 4, seed: int = 0) -> list[dict]:
    """The documents of the local `cloze` task: {"context", "choices", "label"} dicts.

    Built from the embedded corpus's evaluation half (analysis.data.evaluation_text("default")), so
    no cloze sentence is ever in a calibration batch. A document is a sentence ending in a word of 4+
    letters and a full stop (not 'said'/'says': quote attributions), after up to CONTEXT_SENTENCES
    earlier sentences of its article; the context stops before that last word. The distractors are
    other words of 4+ letters from the same article (drawn with `seed`): on topic, so the model has to
    read the sentence, not only the subject, to pick the right one."""
    return [dict(d, choices=list(d["choices"])) for d in _cloze_docs(n_choices, seed)]


# --------------------------------------------------------------------------------------------
# tasks


def parse_tasks(spec: str | Sequence[str]) -> tuple[str, ...]:
    """Task names from "cloze,boolq" or a sequence of names; duplicates dropped, order kept."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out = tuple(dict.fromkeys(n.strip() for n in names if n and n.strip()))
    if not out:
        raise ZeroShotError(f"No task given; use e.g. 'cloze' (local) or {', '.join(PAPER_TASKS[:3])}.")
    for name in out:
        if not re.fullmatch(r"[\w.\-]+", name):
            raise ZeroShotError(f"'{name}' is not a task name (letters, digits, _ . - only).")
    return out


def local_tasks() -> tuple[str, ...]:
    """The tasks defined in analysis/tasks/ (their YAML `task:` names)."""
    return tuple(sorted(_task_manager(False).all_subtasks))


@lru_cache(maxsize=2)
def _task_manager(include_defaults: bool):
    """lm-eval's index of the local tasks, plus all of lm-eval's own with include_defaults (indexing
    those parses thousands of YAML files, so it is done once per process and only when asked)."""
    from lm_eval.tasks import TaskManager  # noqa: PLC0415 (lm-eval is imported only when used)

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults)


def _datasets_cached(path: str) -> bool:
    """Whether the datasets cache or the hub cache holds anything of dataset `path` ("org/name")."""
    import datasets  # noqa: PLC0415

    candidates = (Path(datasets.config.HF_DATASETS_CACHE) / path.replace("/", "___"),
                  Path(hub_constants.HF_HUB_CACHE) / f"datasets--{path.replace('/', '--')}")
    return any(p.is_dir() and any(p.iterdir()) for p in candidates)


HOW_TO_GET_DATA = "run it once where the hub is reachable (its data is then cached), or use a local task"


def _hub_message(name: str, need: str) -> ZeroShotError:
    return ZeroShotError(f"task '{name}' {need} from the Hugging Face hub ({hub_constants.ENDPOINT}), which is not "
                         f"reachable from here: {HOW_TO_GET_DATA} ({', '.join(local_tasks())}).")


def check_tasks(tasks: str | Sequence[str]) -> tuple[str, ...]:
    """The task names, checked before any model work: each must be a local task, or an lm-eval task
    whose data is reachable (hub up) or cached. Raises ZeroShotError with one line otherwise; with the
    hub unreachable and nothing cached it answers at once, without indexing lm-eval's tasks."""
    names = parse_tasks(tasks)
    local = set(local_tasks())
    remote = [n for n in names if n not in local]
    if not remote:
        return names
    online = hub_reachable()
    if not online and not any(_datasets_cached(p) for p in _cached_dataset_names()):
        for name in remote:  # a local task misspelt, most likely, where the hub's tasks cannot run anyway
            if near := difflib.get_close_matches(name, local, n=1, cutoff=0.75):
                raise ZeroShotError(f"unknown task '{name}': did you mean the local task '{near[0]}'?")
        raise _hub_message(remote[0], "is not a local task (nor checked against lm-eval's task list, which is of "
                                      "no use here): lm-eval's own tasks read their data (none of it in the local "
                                      "datasets cache)")
    index = _task_manager(True).task_index
    for name in remote:
        entry = index.get(name)
        if entry is None:
            near = difflib.get_close_matches(name, [*local, *index], n=1, cutoff=0.75)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise ZeroShotError(f"unknown task '{name}'{hint}: not a local task ({', '.join(sorted(local))}) nor an "
                                f"lm-eval task (list those with: python -m lm_eval ls tasks).")
        path = (entry.cfg or {}).get("dataset_path")
        if not online and path and not _datasets_cached(path):
            raise _hub_message(name, f"needs the dataset '{path}' (not in the local datasets cache)")
    return names


def _cached_dataset_names() -> list[str]:
    """Dataset ids ("org/name") with something in the datasets or hub cache."""
    import datasets  # noqa: PLC0415

    found = []
    root = Path(datasets.config.HF_DATASETS_CACHE)
    if root.is_dir():
        found += [p.name.replace("___", "/") for p in root.iterdir() if p.is_dir() and "___" in p.name]
    hub = Path(hub_constants.HF_HUB_CACHE)
    if hub.is_dir():
        found += [p.name[len("datasets--"):].replace("--", "/") for p in hub.glob("datasets--*")]
    return found


@contextmanager
def _datasets_offline(offline: bool):
    """Make `datasets` read its cache without trying the hub (it would retry an unreachable one)."""
    import datasets  # noqa: PLC0415

    before = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = before or offline
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = before


@contextmanager
def _no_git_hash():
    """Keep lm-eval from running `git describe` in the current folder: the hash of whatever checkout the user
    stands in is not the model's, and outside one git prints "fatal: not a git repository" to the terminal."""
    from lm_eval import evaluator  # noqa: PLC0415

    before = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = before


# --------------------------------------------------------------------------------------------
# evaluation


class _Stopped(Exception):
    """The stop flag was set between two chunks of requests."""


def _wrapped_model(model: nn.Module, tokenizer, batch_size: int, bos: bool, progress: ProgressFn | None,
                   stop: StopFlag):
    """An lm-eval HFLM around the in-memory model that scores loglikelihood requests in chunks of
    CHUNK, reporting progress and checking `stop` between chunks."""
    from lm_eval.models.huggingface import HFLM  # noqa: PLC0415

    class _LM(HFLM):
        started = False  # set by the first request: errors before it come from loading the tasks' data

        def loglikelihood(self, requests, disable_tqdm=False):
            self.started = True
            return super().loglikelihood(requests, disable_tqdm)

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            self.started = True
            return super().loglikelihood_rolling(requests, disable_tqdm)

        def generate_until(self, requests, disable_tqdm=False):
            self.started = True
            return super().generate_until(requests, disable_tqdm)

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
            out = []
            for i in range(0, len(requests), CHUNK):
                if should_stop(stop):
                    raise _Stopped()
                out += super()._loglikelihood_tokens(requests[i:i + CHUNK], disable_tqdm=True,
                                                     override_bs=override_bs)
                if progress:
                    done = min(i + CHUNK, len(requests))
                    progress(f"zero-shot: {done}/{len(requests)} loglikelihood requests", done / len(requests))
            return out

    return _LM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=True if bos else None)


def _scores(results: dict, n_samples: dict) -> list[Score]:
    scores = []
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if metric.endswith("_stderr") or not isinstance(value, int | float) or filt != "none":
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            scores.append(Score(task, metric, float(value),
                                float(stderr) if isinstance(stderr, int | float) else None,
                                int((n_samples.get(task) or {}).get("effective", 0))))
    return scores


def check_tokenizer(tokenizer) -> None:
    """ZeroShotError unless `tokenizer` has an EOS or a BOS token: lm-eval starts an empty context with one."""
    if getattr(tokenizer, "eos_token_id", None) is None and getattr(tokenizer, "bos_token_id", None) is None:
        raise ZeroShotError("lm-eval needs a tokenizer with an EOS or BOS token (it starts empty contexts with "
                            "one); this tokenizer has neither.")


def evaluate(model: nn.Module, tokenizer, tasks: str | Sequence[str], limit: int | None = None,
             batch_size: int | None = None, bos: bool = False, progress: ProgressFn | None = None,
             stop: StopFlag = None, seed: int = 0) -> ZeroShotResult:
    """Zero-shot scores of `model` as it is now on `tasks` (names, or "cloze,boolq").

    limit: the first `limit` documents of each task (None: all); batch_size: sequences per forward
    pass (None: 16 on a CPU, 32 on a GPU); bos: put the tokenizer's BOS first (Gemma needs it, see
    ModelInfo.bos_per_window); seed: lm-eval's seeds. Raises ZeroShotError for a task that cannot run
    here. With `stop` set the run ends early and the result says stopped=True, with no scores."""
    import lm_eval  # noqa: PLC0415

    names = check_tasks(tasks)
    if limit is not None and (isinstance(limit, bool) or int(limit) != limit or limit < 1):
        raise ZeroShotError(f"limit must be a positive integer, got {limit!r}")
    check_tokenizer(tokenizer)
    device = next(model.parameters()).device
    batch_size = batch_size or (32 if device.type == "cuda" else 16)
    lm = _wrapped_model(model, tokenizer, batch_size, bos, progress, stop)
    local = set(local_tasks())
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with _datasets_offline(not hub_reachable() if set(names) - local else False), _no_git_hash():
            out = lm_eval.simple_evaluate(
                lm, tasks=list(names), limit=limit, task_manager=_task_manager(bool(set(names) - local)),
                num_fewshot=0, bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False, random_seed=seed,
                numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    except _Stopped:
        return ZeroShotResult(names, limit=limit, seconds=time.perf_counter() - t0, stopped=True)
    except Exception as e:  # noqa: BLE001 (before the first request, a failure is the task's data)
        if lm.started:
            raise
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ZeroShotError(f"could not load task(s) {', '.join(names)}: {reason}") from e
    finally:
        model.train(was_training)
    return ZeroShotResult(names, _scores(out["results"], out.get("n-samples", {})), limit,
                          time.perf_counter() - t0)

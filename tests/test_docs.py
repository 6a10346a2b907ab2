"""The result tables in the docs are generated from bench/results (bench.report): they must match the measurements
committed beside them."""
import importlib
import json
import re

import pytest

from bench.quality import SEARCH_CONFIG, markdown, reuse_searches, search_keys, summary
from bench.report import BLOCK, DOCS, ROOT, main, render


def test_the_docs_result_tables_are_those_of_bench_results():
    blocks = {doc.name: [(m[2], m[3]) for m in BLOCK.finditer(doc.read_text())] for doc in DOCS}
    assert blocks == {"README.md": [("summary", "default"), ("summary", "gemma3"), ("summary", "gemma3_cuda_full")],
                      "SEARCH.md": [("full", "default"), ("full", "gemma3")]}
    gpu = [m[4] for m in BLOCK.finditer((ROOT / "README.md").read_text()) if m[3] == "gemma3_cuda_full"][0]
    assert gpu.lstrip().startswith("gemma3 on NVIDIA H200: ") and "all 577 windows" in gpu  # the device, whole set
    for doc in DOCS:
        text = doc.read_text()
        assert render(text) == text, f"{doc.relative_to(ROOT)} is out of date: run python -m bench.report"
    assert main(["--check"]) == 0


def test_a_stale_table_is_rewritten_from_the_results():
    readme = (ROOT / "README.md").read_text()
    stale = re.sub(r"\| 0\.7 \| sparsegpt \| [^|]*", "| 0.7 | sparsegpt | 1.0", readme, count=1)
    assert stale != readme
    assert render(stale) == readme
    summary = next(m[4] for m in BLOCK.finditer(readme))
    assert "| 0.7 | sparsegpt |" in summary and "best baseline" in summary


def test_the_benchmark_prints_its_table_for_a_run_without_uniform():
    run = {"seed": 0, "sparsity": 0.7, "method": "wanda", "allocation": "owl", "ppl": 438.5, "achieved": 0.7,
           "prune_s": 51.5, "eval_s": 159.1, "peak_rss_mb": 1869.1}
    results = {"runs": {"0/0.70/wanda/owl": run}, "dense": {"ppl": 24.94}, "epsilon": None,
               "config": {"model": "default", "windows": 32, "eval_windows": 32, "eval_seqlen": 512,
                          "eval_tokens": 16352, "nsamples": 16, "seqlen": 256}}
    assert "| 0.7 | wanda | 438.50 | n/a |" in markdown(results)


def test_a_cell_of_one_seed_other_than_0_names_its_seed():
    # a bare number is read as seed 0 alone; a verified search run on seed 1 only must not be
    def run(seed, alloc, ppl):
        return {"seed": seed, "sparsity": 0.5, "method": "wanda", "allocation": alloc, "ppl": ppl, "achieved": 0.5,
                "prune_s": 1.0, "eval_s": 1.0, "peak_rss_mb": 1.0}
    runs = {f"{k}/0.50/wanda/{a}": run(k, a, ppl) for k, a, ppl in
            [(0, "uniform", 176.1), (1, "uniform", 181.16), (1, "owl", 190.3), (1, "alphapruning", 188.6),
             (1, "auto-verify", 164.63)]}
    results = {"runs": runs, "dense": {"ppl": 61.7}, "epsilon": 0.05,
               "config": {"model": "gemma3", "windows": 16, "eval_windows": 16, "eval_seqlen": 512,
                          "eval_tokens": 8176, "nsamples": 16, "seqlen": 256}}
    assert "| 178.63 (176.1–181.2) | 190.30 (seed 1) | 188.60 (seed 1) | 164.63 (seed 1) |" in markdown(results)
    assert "| 164.6 (seed 1) | -9.1% | -9.1% |" in summary(results)


def test_a_result_file_reuses_only_the_searches_its_runs_read(tmp_path, capsys):
    config = {**{k: 1 for k in SEARCH_CONFIG}, "search_steps": 1}
    searches = {f"{seed}/{s}/{m}/{a}": {"kind": a, "params": {"steps": 1}} for seed in (0, 1)
                for s in ("0.60", "0.70") for m in ("wanda", "sparsegpt")
                for a in ("auto", "auto-verify", "auto-verify-long", "auto-verify-more")}
    searches["1/0.70/sparsegpt/auto-verify-more"]["params"]["steps"] = 20  # run with other --search-steps
    source = tmp_path / "quality_default.json"
    # its last invocation ran 20 generations: the searches of 1 are still this run's
    source.write_text(json.dumps({"config": {**config, "search_steps": 20}, "searches": searches,
                                  "epsilon_selection": {"0.2": 5.0}}))
    keys = search_keys([0.7], ["sparsegpt"], ["owl", "auto-verify-long+trim"], [1])
    assert keys == {"1/0.70/sparsegpt/auto-verify-long", "1/0.70/sparsegpt/auto-verify"}  # and what it goes on from
    own = {"1/0.70/sparsegpt/auto-verify": {"kind": "own"}}
    results = {"config": dict(config), "searches": dict(own)}
    reuse_searches(results, source, config, keys | {"1/0.70/sparsegpt/auto-verify-more"})
    # the 20-generation search is not this run's: it is searched again, and the run says so
    long = "1/0.70/sparsegpt/auto-verify-long"
    assert results["searches"] == {**own, long: searches[long]}
    assert "auto-verify-more ran 20 generations, not 1: searched again" in capsys.readouterr().out
    assert results["epsilon_selection"] == {"0.2": 5.0} and results["config"]["searches_from"] == source.name
    with pytest.raises(SystemExit, match="valid_windows differ"):
        reuse_searches(results, source, {**config, "valid_windows": 2}, keys)


def _options_in_help(main, argv, capsys) -> set[str]:
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--help"])
    assert stop.value.code == 0
    return set(re.findall(r"--[a-z][a-z0-9-]*", capsys.readouterr().out))


def test_every_option_a_command_in_the_docs_shows_exists(capsys):
    # a command copied from the docs must not die on an option that was renamed or removed
    from analysis.cli import main as cli_main
    shown = {}  # (program, subcommand) -> options written after it in the docs
    for doc in DOCS:
        text = doc.read_text().replace("\\\n", " ")  # a command continued over lines is one command
        for m in re.finditer(r"python -m (analysis|bench\.\w+)( [a-z][\w-]*)?([^\n`|]*)", text):
            program, sub = m[1], (m[2] or "").strip()
            if program != "analysis":  # the benchmarks have no subcommands: a bare word is an argument
                sub = ""
            shown.setdefault((program, sub), set()).update(re.findall(r"--[a-z][a-z0-9-]*", m[3]))
    assert ("analysis", "prune") in shown and ("bench.quality", "") in shown
    unknown = {}
    for (program, sub), options in sorted(shown.items()):
        main = cli_main if program == "analysis" else importlib.import_module(program).main
        missing = options - _options_in_help(main, [sub] if sub else [], capsys)
        if missing:
            unknown[f"python -m {program} {sub}".strip()] = sorted(missing)
    assert unknown == {}


def test_the_python_api_examples_of_the_readme_run_as_written(capsys, tmp_path, monkeypatch):
    """README "Python API": its two blocks, each in its own namespace (each can be pasted alone), on the real
    default model; the second adds its record to the run store."""
    from analysis.store import RunStore

    monkeypatch.setenv("ALPHASCOPE_RUNS_DB", str(tmp_path / "runs.sqlite"))
    section = (ROOT / "README.md").read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2
    namespaces: list[dict] = [{}, {}]
    for block, namespace in zip(blocks, namespaces):
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 (the project's own docs)
    first, second = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"0\.500 sparse, perplexity \d+\.\d\d", first)
    dense_ppl, pruned_ppl, achieved = (float(x) for x in second.split())
    assert pruned_ppl > dense_ppl and achieved == pytest.approx(0.6, abs=1e-3)
    assert namespaces[0]["loaded"].model is namespaces[0]["model"]
    assert RunStore().get(namespaces[1]["run_id"])["pruned_ppl"] == pytest.approx(pruned_ppl)

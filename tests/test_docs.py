"""The result tables in the docs are generated from bench/results (bench.report): they must match the measurements
committed beside them."""
import re

from bench.quality import markdown
from bench.report import BLOCK, DOCS, ROOT, main, render


def test_the_docs_result_tables_are_those_of_bench_results():
    blocks = {doc.name: [(m[2], m[3]) for m in BLOCK.finditer(doc.read_text())] for doc in DOCS}
    assert blocks == {"README.md": [("summary", "default"), ("summary", "gemma3")],
                      "SEARCH.md": [("full", "default"), ("full", "gemma3")]}
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

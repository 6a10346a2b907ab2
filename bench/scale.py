"""Research scale: spectra, pruning and perplexity of LLaMA-shaped checkpoints with RANDOM weights.

    python -m bench.scale [--device cpu|cuda] [--sizes 1.1b,7b:2] [--work DIR] [--out FILE] [--steps ...]

No download: each checkpoint is written here from a LlamaConfig, one safetensors shard per decoder
block (plus one for the embedding, final norm and lm_head) with an index and config.json, so a 7B
checkpoint never sits whole in memory. Weights are i.i.d. normal(0, 0.02) stored in bfloat16; the
tokenizer is a byte-level BPE trained here on WikiText-2 *valid* (vocab <= 32000). Random weights
make every alpha and perplexity meaningless: only times and memory are measured.

Sizes: "1.1b" (22 blocks, hidden 2048, MLP 5632, 32 heads / 4 KV heads, vocab 32000; TinyLlama's
shape) and "7b" (32 blocks, 4096 / 11008, 32 heads, vocab 32000; LLaMA-2-7B's shape). "7b:2" writes
only the first 2 blocks: then only the streamed spectra are measured, once with the embedding and
lm_head and once without, and the 32-block time is extrapolated as t(all, 2 blocks) + 30/2 ·
t(blocks only, 2 blocks) (the blocks are identical in shape; peak memory is that of the subset run,
since streaming holds one matrix per worker whatever the depth). "qwen3-moe" is Qwen3-30B-A3B's
mixture-of-experts shape (48 blocks, hidden 2048, 32 heads / 4 KV heads of 128, 128 experts of 768, 8
chosen per token; vocab 32000 here), written with its experts one tensor each as the Hub checkpoints are;
"qwen3-moe:2" (2 blocks, 1.3 B weights) runs every step but weightwatcher on those 2 blocks (prune and
spectra time grow with the number of blocks; the pruners hold one block at a time).

Every measurement runs in its own Python process (`--step`), so its peak resident memory is its own
(resource.getrusage ru_maxrss: the true peak, including the ~0.5 GB that importing torch and
transformers costs; `rss_after_imports_mb` gives that baseline; `process_cpu_seconds` is the CPU
time of all its threads, imports and loading included: less sensitive to a shared machine's load
than wall time). Steps per full size:
  streamed     analysis.spectra.analyze_checkpoint (embedding and lm_head included, as the app does)
               into an empty disk cache (the time includes writing it), then a reopen read from it
  in_memory    load_model (float32 on CPU, bfloat16 on CUDA) then analysis.spectra.analyze; its
               alphas are compared with the streamed ones
  weightwatcher weightwatcher 0.7.7 analyze() on the matrices of the first `--ww-blocks` blocks only
               (built as nn.Linear from the shards), time scaled by blocks / ww-blocks
  wanda, sparsegpt  load, then prune every block matrix to 50% (uniform) on a calibration batch of
               `--calib` sequences x tokens from the embedded corpus (CPU default 8x512, CUDA 128x2048)
  ppl          WikiText-2 test perplexity on the first `--ppl-windows` windows of `--ppl-seqlen` tokens
               (CPU default 2 x 1024; CUDA: the whole test set at 2048), time also scaled to all windows
Results: bench/results/scale_<device>.json, written after every step (rerun to fill in what is
missing; --fresh starts over). The machine's load average is recorded before and after each step.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench import machine_info

OUT_DIR = Path(__file__).resolve().parent / "results"
SIZES = {
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "qwen3-moe": dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                      num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                      num_experts_per_tok=8, vocab_size=32000),
}
FULL_STEPS = ("streamed", "in_memory", "weightwatcher", "wanda", "sparsegpt", "ppl")
SUBSET_STEPS = ("streamed", "streamed_blocks")
MOE_STEPS = ("streamed", "streamed_blocks", "in_memory", "wanda", "sparsegpt", "ppl")  # on the blocks written
STD = 0.02  # LLaMA's initializer_range
BLOCK_MATRICES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# writing a random checkpoint


def is_moe(size: str) -> bool:
    return "num_experts" in SIZES[size]


def model_config(size: str, blocks: int | None = None):
    from transformers import LlamaConfig, Qwen3MoeConfig  # noqa: PLC0415

    shape = dict(SIZES[size])
    if blocks is not None:
        shape["num_hidden_layers"] = blocks
    return (Qwen3MoeConfig if is_moe(size) else LlamaConfig)(**shape, max_position_embeddings=4096,
                                                             tie_word_embeddings=False, dtype="bfloat16")


def block_shapes(cfg) -> dict[str, tuple[int, ...]]:
    h, f = cfg.hidden_size, cfg.intermediate_size
    d = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    shapes = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, q)}
    if getattr(cfg, "num_experts", None):  # Qwen3-MoE: q/k norms, the router, experts one tensor each
        e, m = cfg.num_experts, cfg.moe_intermediate_size
        shapes |= {"mlp.gate": (e, h)} | {f"mlp.experts.{i}.{k}": s for i in range(e)
                                          for k, s in (("gate_proj", (m, h)), ("up_proj", (m, h)),
                                                       ("down_proj", (h, m)))}
        norms = {"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)}
    else:
        shapes |= {"mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f)}
        norms = {}
    return {f"{k}.weight": v for k, v in shapes.items()} | norms | {"input_layernorm.weight": (h,),
                                                                   "post_attention_layernorm.weight": (h,)}


def random_tensor(shape, gen: torch.Generator, device: str) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)  # RMSNorm weights start at one
    w = torch.empty(shape, device=device).normal_(0.0, STD, generator=gen)
    return w.to(torch.bfloat16).cpu()


def train_tokenizer(folder: Path) -> None:
    """Byte-level BPE (vocab <= 32000) trained on WikiText-2 valid, saved into `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    from analysis.data import load_text  # noqa: PLC0415

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=32000, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(load_text("wikitext2:valid").splitlines(), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(folder)


def write_checkpoint(folder: Path, size: str, blocks: int | None, device: str, tokenizer: Path) -> float:
    """Write the random checkpoint shard by shard (one block in memory at a time); seconds taken."""
    from safetensors.torch import save_file  # noqa: PLC0415

    if (folder / "model.safetensors.index.json").exists():
        return 0.0
    t0 = time.perf_counter()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = model_config(size, blocks)
    gen = torch.Generator(device=device).manual_seed(0)
    n = cfg.num_hidden_layers
    shards = {"model-outside.safetensors": {
        "model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size), "model.norm.weight": (cfg.hidden_size,),
        "lm_head.weight": (cfg.vocab_size, cfg.hidden_size)}}
    shards |= {f"model-block-{b:03d}-of-{n:03d}.safetensors": {f"model.layers.{b}.{k}": s
                                                              for k, s in block_shapes(cfg).items()}
               for b in range(n)}
    weight_map, total = {}, 0
    for file, shapes in shards.items():
        tensors = {k: random_tensor(s, gen, device) for k, s in shapes.items()}
        save_file(tensors, tmp / file, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map |= dict.fromkeys(tensors, file)
        del tensors
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    cfg.save_pretrained(tmp)
    for f in tokenizer.iterdir():
        shutil.copy(f, tmp / f.name)
    tmp.rename(folder)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# one measurement (in its own process)


def rss_now_mb() -> float:
    """Resident set size from /proc/self/statm (Linux), in MiB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _load(folder: Path, device: str):
    from analysis.loading import load_model  # noqa: PLC0415

    t0 = time.perf_counter()
    loaded = load_model(str(folder), device=device)
    return loaded, time.perf_counter() - t0


def step_streamed(folder: Path, device: str, args, include_outside: bool = True) -> dict:
    """Streamed spectra into an empty disk cache (the time includes writing it), then a reopen."""
    from analysis.spectra import analyze_checkpoint  # noqa: PLC0415

    os.environ["ALPHASCOPE_CACHE"] = str(folder / "cache")
    shutil.rmtree(folder / "cache", ignore_errors=True)
    t0 = time.perf_counter()
    result = analyze_checkpoint(folder, include_outside=include_outside, device=device)
    t1 = time.perf_counter()
    hit = analyze_checkpoint(folder, include_outside=include_outside, device=device)
    out = {"seconds": round(t1 - t0, 2), "seconds_cache_hit": round(time.perf_counter() - t1, 3),
           "cache_hit": hit.cached, "matrices": len(result.metrics), "device": result.device}
    if include_outside:
        result.metrics[["name", "alpha"]].to_csv(folder / "alpha_streamed.csv", index=False)
    return out


def step_in_memory(folder: Path, device: str, args) -> dict:
    import pandas as pd  # noqa: PLC0415

    from analysis.spectra import analyze  # noqa: PLC0415

    loaded, load_s = _load(folder, device)
    t0 = time.perf_counter()
    result = analyze(loaded.model, include_outside=True)
    seconds = time.perf_counter() - t0
    out = {"load_seconds": round(load_s, 2), "seconds": round(seconds, 2), "dtype": loaded.info.dtype,
           "matrices": len(result.metrics)}
    streamed = folder / "alpha_streamed.csv"
    if streamed.exists():
        both = result.metrics[["name", "alpha"]].merge(pd.read_csv(streamed), on="name", suffixes=("", "_streamed"))
        out["max_abs_alpha_diff_vs_streamed"] = float((both["alpha"] - both["alpha_streamed"]).abs().max())
    return out


def step_weightwatcher(folder: Path, device: str, args) -> dict:
    import logging  # noqa: PLC0415

    import weightwatcher as ww  # noqa: PLC0415

    from analysis.checkpoint import open_checkpoint  # noqa: PLC0415

    ckpt = open_checkpoint(folder)
    blocks = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    modules = torch.nn.ModuleList()
    for b in range(args.ww_blocks):
        for m in BLOCK_MATRICES:
            w = ckpt.tensor(f"model.layers.{b}.{m}.weight").float()
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight.data = w
            modules.append(lin)
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    ww.WeightWatcher(model=modules).analyze(plot=False, randomize=False, mp_fit=False)
    seconds = time.perf_counter() - t0
    return {"blocks_measured": args.ww_blocks, "seconds_measured": round(seconds, 2),
            "seconds_extrapolated_all_blocks": round(seconds * blocks / args.ww_blocks, 1),
            "how": f"block matrices only (no embedding/lm_head), time x {blocks}/{args.ww_blocks}",
            "version": ww.__version__}


def step_prune(folder: Path, device: str, args, method: str) -> dict:
    from analysis.data import calibration_batches, load_text  # noqa: PLC0415
    from analysis.layers import prunable_layers  # noqa: PLC0415
    from analysis.pruning import prune  # noqa: PLC0415

    loaded, load_s = _load(folder, device)
    n, seqlen = args.calib
    calib = calibration_batches(loaded.tokenizer, load_text("default"), n_samples=n, seqlen=seqlen, seed=0)
    t0 = time.perf_counter()
    report = prune(loaded.model, {r.name: 0.5 for r in prunable_layers(loaded.model)}, method=method, calib=calib)
    return {"load_seconds": round(load_s, 2), "seconds": round(time.perf_counter() - t0, 2),
            "calibration": f"{n} x {seqlen} tokens (embedded corpus)", "sparsity": round(report.overall, 4)}


def step_ppl(folder: Path, device: str, args) -> dict:
    from analysis.data import eval_windows, load_text  # noqa: PLC0415
    from analysis.evaluation import perplexity  # noqa: PLC0415

    loaded, load_s = _load(folder, device)
    text = load_text("wikitext2:test")
    every = eval_windows(loaded.tokenizer, text, seqlen=args.ppl_seqlen)
    windows = every if args.ppl_windows == 0 else every[:args.ppl_windows]
    t0 = time.perf_counter()
    perplexity(loaded.model, windows)
    seconds = time.perf_counter() - t0
    return {"load_seconds": round(load_s, 2), "seconds": round(seconds, 2), "windows": len(windows),
            "seqlen": args.ppl_seqlen, "windows_in_test_set": len(every),
            "seconds_extrapolated_whole_test_set": round(seconds * len(every) / len(windows), 1)}


STEPS = {
    "streamed": step_streamed,
    "streamed_blocks": lambda f, d, a: step_streamed(f, d, a, include_outside=False),
    "in_memory": step_in_memory,
    "weightwatcher": step_weightwatcher,
    "wanda": lambda f, d, a: step_prune(f, d, a, "wanda"),
    "sparsegpt": lambda f, d, a: step_prune(f, d, a, "sparsegpt"),
    "ppl": step_ppl,
}


def run_step(args) -> int:
    from transformers import LlamaForCausalLM  # noqa: F401, PLC0415 (in the baseline: every step needs it)

    import analysis.spectra  # noqa: F401, PLC0415

    base = rss_now_mb()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out = STEPS[args.step](Path(args.folder), args.device, args)
    use = resource.getrusage(resource.RUSAGE_SELF)
    out |= {"peak_rss_mb": round(peak_rss_mb(), 1), "rss_after_imports_mb": round(base, 1),
            "process_cpu_seconds": round(use.ru_utime + use.ru_stime, 1)}
    if args.device == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print("RESULT " + json.dumps(out), flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# the whole benchmark


def spawn(step: str, folder: Path, args) -> dict:
    cmd = [sys.executable, "-m", "bench.scale", "--step", step, "--folder", str(folder), "--device", args.device,
           "--calib", f"{args.calib[0]}x{args.calib[1]}", "--ppl-windows", str(args.ppl_windows),
           "--ppl-seqlen", str(args.ppl_seqlen), "--ww-blocks", str(args.ww_blocks)]
    load = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1][7:]) | {"process_seconds": round(time.perf_counter() - t0, 1),
                                        "load_avg_before": [round(x, 2) for x in load],
                                        "load_avg_after": [round(x, 2) for x in os.getloadavg()]}


def extrapolate(size: str, blocks: int, steps: dict) -> dict | None:
    full = SIZES[size]["num_hidden_layers"]
    if "seconds" not in steps.get("streamed", {}) or "seconds" not in steps.get("streamed_blocks", {}):
        return None
    t_all, t_blocks = steps["streamed"]["seconds"], steps["streamed_blocks"]["seconds"]
    return {"streamed_seconds_all_blocks": round(t_all + (full - blocks) / blocks * t_blocks, 1),
            "how": f"t(all, {blocks} blocks) + ({full} - {blocks}) / {blocks} x t(blocks only, {blocks} blocks)"}


def parse_calib(s: str) -> tuple[int, int]:
    n, seqlen = s.lower().split("x")
    return int(n), int(seqlen)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default=None, help=f"comma list of SIZE or SIZE:K (its first K blocks only), SIZE one "
                    f"of {', '.join(SIZES)}; default 1.1b,7b:2 on CPU, 1.1b,7b on CUDA")
    ap.add_argument("--steps", default=None, help=f"comma list of {', '.join(STEPS)} (default: all that apply)")
    ap.add_argument("--work", default="/tmp/alphascope_scale", help="where the checkpoints are written (kept)")
    ap.add_argument("--out", default=None, help="default bench/results/scale_<device>.json")
    ap.add_argument("--calib", type=parse_calib, default=None, help="N x SEQLEN (default 8x512 CPU, 128x2048 CUDA)")
    ap.add_argument("--ppl-windows", type=int, default=None, help="0 = whole test set (default 2 CPU, 0 CUDA)")
    ap.add_argument("--ppl-seqlen", type=int, default=None, help="tokens per window (default 1024 CPU, 2048 CUDA)")
    ap.add_argument("--ww-blocks", type=int, default=2)
    ap.add_argument("--fresh", action="store_true", help="discard earlier results in --out")
    ap.add_argument("--step", default=None, help=argparse.SUPPRESS)  # internal: one measurement
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.calib = args.calib or ((128, 2048) if gpu else (8, 512))
    args.ppl_windows = (0 if gpu else 2) if args.ppl_windows is None else args.ppl_windows
    args.ppl_seqlen = args.ppl_seqlen or (2048 if gpu else 1024)
    if args.step:
        return run_step(args)

    out = Path(args.out or OUT_DIR / f"scale_{'cuda' if gpu else 'cpu'}.json")
    results = {} if args.fresh or not out.exists() else json.loads(out.read_text())
    results |= {"benchmark": "bench/scale.py", "command": "python -m bench.scale " + " ".join(argv or sys.argv[1:]),
                "weights": "RANDOM (normal(0, 0.02), bfloat16): alphas and perplexities are meaningless; "
                           "times and memory only", "machine": machine_info(),
                "note": "shared machine: see load_avg_before/after of every step",
                "torch": torch.__version__}
    results.setdefault("sizes", {})
    work = Path(args.work)
    tokenizer = work / "tokenizer"
    if not (tokenizer / "tokenizer.json").exists():
        log("training the BPE tokenizer on WikiText-2 valid")
        train_tokenizer(tokenizer)
    for spec in (args.sizes or ("1.1b,7b" if gpu else "1.1b,7b:2")).split(","):
        size, _, k = spec.partition(":")
        blocks = int(k) if k else None
        folder = work / (f"{size}-{blocks}blocks" if blocks else size)
        entry = results["sizes"].setdefault(spec, {"config": {**SIZES[size], "blocks_written": blocks
                                                               or SIZES[size]["num_hidden_layers"]}})
        log(f"{spec}: writing the checkpoint to {folder}")
        made = write_checkpoint(folder, size, blocks, args.device, tokenizer)
        if made:
            entry["write_seconds"] = round(made, 1)
        entry["checkpoint_gb"] = round(sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e9, 2)
        steps = entry.setdefault("steps", {})
        todo = MOE_STEPS if is_moe(size) else SUBSET_STEPS if blocks else FULL_STEPS
        for step in todo:
            if (args.steps and step not in args.steps.split(",")) or "seconds" in steps.get(step, {}) \
                    or "seconds_measured" in steps.get(step, {}):
                continue
            log(f"{spec}: {step}")
            steps[step] = spawn(step, folder, args)
            log(f"{spec}: {step}: {steps[step]}")
            if blocks and (x := extrapolate(size, blocks, steps)):
                entry["extrapolated"] = x
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

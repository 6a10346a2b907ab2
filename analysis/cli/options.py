"""Options shared by the commands and the settings they build (analysis.settings holds every default)."""
from __future__ import annotations

import argparse
import sys

from analysis.allocation import METRIC_DIRECTION
from analysis.errors import AlphascopeError
from analysis.layers import UNSUPPORTED, unsupported_weights
from analysis.loading import DEVICE_MAP_AUTO, load_model
from analysis.powerlaw import XMIN_RULES
from analysis.pruners import PRUNERS
from analysis.settings import AllocationSettings, CalibrationSettings, EvaluationSettings, ModelSettings, PruneSettings


class UsageError(AlphascopeError, ValueError):
    """Bad option value; printed as one line."""


# the option that sets each setting (SettingsError.field), so an error names what to change
FLAGS = {
    "model.source": "--model", "spectra.fit": "--fit", "spectra.min_tail": "--min-tail",
    "allocation.method": "--allocation",
    "allocation.file": "--allocation", "allocation.sparsity": "--sparsity", "allocation.epsilon": "--epsilon",
    "allocation.metric": "--metric", "allocation.granularity": "--granularity", "allocation.fit": "--fit",
    "allocation.owl_lambda": "--owl-lambda", "allocation.owl_threshold": "--owl-threshold",
    "allocation.points": "--points", "allocation.search_steps": "--search-steps",
    "allocation.search_step": "--search-step", "allocation.search_space": "--search-space",
    "allocation.search_seed": "--search-seed", "allocation.search_objective": "--search-objective",
    "allocation.search_text": "--search-text", "allocation.search_samples": "--search-samples",
    "allocation.search_verify": "--search-verify",
    "allocation.search_from": "--search-from", "allocation.search_then_steps": "--search-then-steps",
    "allocation.search_then_samples": "--search-then-samples",
    "prune.method": "--pruner", "prune.nm": "--nm",
    "prune.rowwise": "--rowwise", "calibration.source": "--calib",
    "calibration.n_samples": "--nsamples", "calibration.seqlen": "--seqlen", "calibration.seed": "--seed",
    "evaluation.source": "--eval", "evaluation.seqlen": "--eval-seqlen", "evaluation.max_windows": "--max-windows",
    "evaluation.batch_size": "--batch-size", "calibration.encoding": "--encoding", "evaluation.encoding": "--encoding",
    "model.device": "--device", "model.dtype": "--dtype",
    "zeroshot.tasks": "--tasks", "zeroshot.limit": "--limit",
    "sweep.methods": "--pruners", "sweep.allocations": "--allocations", "sweep.sparsities": "--sparsities",
    "sweep.epsilons": "--epsilons", "sweep.owl_lambdas": "--owl-lambdas", "sweep.seeds": "--seeds",
    "sweep.workers": "--workers", "sweep.cpus_per_worker": "--cpus-per-worker", "sweep.address": "--address",
    "sweep.curves": "--curve", "sweep.rowwise": "--rowwise",
}


# a sweep sets some settings through its grid options instead
SWEEP_FLAGS = {"allocation.points": "--curve", "allocation.method": "--allocations", "allocation.file": "--allocations",
               "allocation.sparsity": "--sparsities", "allocation.epsilon": "--epsilons",
               "allocation.owl_lambda": "--owl-lambdas", "prune.method": "--pruners", "calibration.seed": "--seeds"}


PRUNER_HELP = f"{', '.join(PRUNERS)} (default: {PruneSettings.method}; --method: its older name)"


def add_command(sub, name: str, help: str) -> argparse.ArgumentParser:
    # allow_abbrev=False: "--eval" must never be taken as a prefix of "--eval-seqlen"
    return sub.add_parser(name, help=help, allow_abbrev=False)


def print_progress(message: str, fraction: float) -> None:
    print(f"[{fraction:4.0%}] {message}", file=sys.stderr, flush=True)


def add_model_args(p: argparse.ArgumentParser) -> None:
    d = ModelSettings()
    p.add_argument("--model", default=d.source, help="'default' (SmolLM2-135M-Instruct), 'gemma3', a folder or a HF id")
    p.add_argument("--device", default=d.device, help="auto (CUDA if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default=d.dtype, help="auto, float32, bfloat16, float16")
    p.add_argument("--device-map", choices=["auto"], default=None,
                   help="auto: spread the weights over the visible GPUs, then CPU, then disk (accelerate), for "
                        "models larger than one GPU; replaces --device")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run code from the model's repository (off by default)")


def model_settings(args: argparse.Namespace) -> ModelSettings:
    if getattr(args, "device_map", None) == "auto" and typed_flags(args, "--device"):
        raise UsageError("--device: --device-map auto places the weights itself (GPUs, then the CPU), so --device "
                         "would be ignored; drop one of them")
    device = DEVICE_MAP_AUTO if getattr(args, "device_map", None) == "auto" else args.device
    return ModelSettings(args.model, device, args.dtype, args.trust_remote_code)


def load_checked(m: ModelSettings, check=None, tokenizer: bool = True):
    """Load the model; `check(preview)` runs on its tokenizer and config before the weights load.
    tokenizer=False: for work on the weights alone, which a folder without tokenizer files can do."""
    m.check()
    loaded = load_model(m.source, device=m.device, dtype=m.dtype, trust_remote_code=m.trust_remote_code,
                        check=check, tokenizer=tokenizer)
    if left := unsupported_weights(loaded.model):
        print(f"warning: {UNSUPPORTED.format(n=left)}", file=sys.stderr)
    return loaded


def add_calib_args(p: argparse.ArgumentParser, what: str = "calibration", seed: bool = True) -> None:
    d = CalibrationSettings()
    p.add_argument("--calib", default=d.source, help=f"{what} text: default (embedded corpus), wikitext2:valid, "
                   "hf:<dataset>[:<config>]:<split> or a .txt path (the embedded corpus, or a text named for both "
                   "calibration and evaluation, is split in disjoint halves)")
    p.add_argument("--nsamples", type=int, default=d.n_samples, help=f"{what} sequences")
    p.add_argument("--seqlen", type=int, default=d.seqlen, help=f"tokens per {what} sequence")
    if seed:
        p.add_argument("--seed", type=int, default=d.seed, help=f"seed for {what} sampling")
    p.add_argument("--encoding", default=d.encoding, help="encoding of the text files named as text sources")


def calibration_settings(args: argparse.Namespace) -> CalibrationSettings:
    return CalibrationSettings(args.calib, args.nsamples, args.seqlen, args.seed, args.encoding)


def add_eval_args(p: argparse.ArgumentParser, *flags: str) -> None:
    d = EvaluationSettings()
    p.add_argument(*flags, dest="eval", default=d.source, help="evaluation text (same sources as --calib)")
    p.add_argument("--eval-seqlen", type=int, default=d.seqlen, help="tokens per evaluation window")
    p.add_argument("--max-windows", type=int, default=d.max_windows, help="evaluate only the first N windows")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="evaluation windows per forward pass (default: 1 on CPU, 8 on GPU)")


def evaluation_settings(args: argparse.Namespace) -> EvaluationSettings:
    return EvaluationSettings(args.eval, args.eval_seqlen, args.max_windows, args.batch_size, args.encoding)


def add_allocation_args(p: argparse.ArgumentParser, axes: bool = False) -> None:
    """axes: a sweep's comma-separated --epsilons and --owl-lambdas instead of one value each."""
    d = AllocationSettings()
    if axes:
        p.add_argument("--epsilons", default=f"{d.epsilon:g}", help="alphapruning/farms spreads, e.g. 0.1,0.3")
    else:
        p.add_argument("--epsilon", type=float, default=d.epsilon,
                       help="alphapruning/farms spread: ratios in [S(1-eps), S(1+eps)] before the rescaling to the "
                            "budget S; with auto, the search also starts from alphapruning and farms at this eps")
    p.add_argument("--metric", default=d.metric, choices=list(METRIC_DIRECTION),
                   help="per-matrix metric (alphapruning/farms)")
    p.add_argument("--granularity", default=d.granularity, choices=["block", "layer"],
                   help="one ratio per block or per matrix")
    p.add_argument("--fit", default=d.fit, help=f"power-law xmin rule: {', '.join(XMIN_RULES)}")
    if axes:
        p.add_argument("--owl-lambdas", default=f"{d.owl_lambda:g}", help="owl half-ranges, e.g. 0.04,0.08")
    else:
        p.add_argument("--owl-lambda", type=float, default=d.owl_lambda,
                       help="owl: half-range of the sparsities around the target")
    p.add_argument("--owl-threshold", type=float, default=d.owl_threshold,
                   help="owl: outlier = |activation x weight| > M x mean")
    p.add_argument("--search-steps", type=int, default=d.search_steps,
                   help="auto: generations of the allocation search")
    p.add_argument("--search-step", type=float, default=d.search_step,
                   help="auto: sparsity one mutation moves from a block to another (e.g. 0.05 for larger moves)")
    p.add_argument("--search-space", default=d.search_space,
                   help="auto: block (one sparsity per block) or block+kind (also one offset per matrix kind, e.g. "
                        "k_proj or down_proj, shared by every block, each block keeping its sparsity: lets the search "
                        "prune some kinds of matrix less everywhere)")
    if not axes:  # a sweep's searches take the seed of their calibration sample
        p.add_argument("--search-seed", type=int, default=d.search_seed, help="auto: seed of the allocation search")
    p.add_argument("--search-objective", default=d.search_objective,
                   help="auto: what the search minimises: nll (the pruned model's loss) or kl (its KL divergence "
                        "from the dense model)")
    p.add_argument("--search-text", default=d.search_text,
                   help="auto: score the search on this held-out text (a text source as for --calib, e.g. "
                        "wikitext2:valid, best a sample of the text the model will serve; never the evaluation "
                        "text) instead of the calibration text")
    p.add_argument("--search-samples", type=int, default=d.search_samples, metavar="N",
                   help="auto with --search-text: score on N windows of it (default 4 x --nsamples when the search "
                        "prunes for real, else --nsamples); its real prunes are scored on all N, so more text tells a "
                        "real improvement from noise better, at the cost of slower real prunes")
    p.add_argument("--search-verify", nargs="?", const="all", default=d.search_verify, metavar="WHAT",
                   help="auto: what the search prunes for real (one full prune each): none (its fast proxy "
                        "decides), starts (the default: the starts, so the best one after a real prune is the parent, "
                        "and the result, kept only if a real prune confirms it beats that start: a few prunes more) or "
                        "all (the flag alone: also every candidate the proxy confirms, keeping only real improvements; "
                        "slowest, every step measured on the real pruned model; worth it with SparseGPT at high "
                        "sparsity)")
    p.add_argument("--search-then-steps", type=int, default=d.search_then_steps, metavar="N",
                   help="auto with --search-text: then go on from the search's result for N more generations (a "
                        "second stage, search seed + 100), its real prunes scored on more held-out text: "
                        "--search-then-samples windows of the search text")
    p.add_argument("--search-then-samples", type=int, default=d.search_then_samples, metavar="N",
                   help="auto with --search-text and --search-then-steps: the second stage scores on N windows of it "
                        "(default: twice the first stage's)")
    if not axes:
        p.add_argument("--search-from", default=d.search_from, metavar="FILE",
                       help="auto: start the search from this allocation JSON (e.g. a previous search's result, to go "
                            "on from it) instead of uniform / OWL / AlphaPruning / FARMS; give its sparsity")


def allocation_settings(args: argparse.Namespace, method: str, sparsity: float | None, **extra) -> AllocationSettings:
    d = AllocationSettings()
    return AllocationSettings(method=method, sparsity=d.sparsity if sparsity is None else sparsity,
                              epsilon=args.epsilon, metric=args.metric, granularity=args.granularity, fit=args.fit,
                              owl_lambda=args.owl_lambda, owl_threshold=args.owl_threshold,
                              search_steps=args.search_steps, search_step=args.search_step,
                              search_space=args.search_space, search_seed=args.search_seed,
                              search_objective=args.search_objective, search_text=args.search_text,
                              search_samples=args.search_samples, search_verify=args.search_verify,
                              search_from=args.search_from, search_then_steps=args.search_then_steps,
                              search_then_samples=args.search_then_samples, **extra)


def print_ppl(label: str, u) -> None:
    print(f"[{u.windows_done / u.windows_total:4.0%}] {label} perplexity {u.ppl:.3f} after "
          f"{u.windows_done}/{u.windows_total} windows ({u.tokens} tokens)", file=sys.stderr, flush=True)


def typed_flags(args: argparse.Namespace, *flags: str) -> list[str]:
    """Those of `flags` the user gave (main records them in args.typed), not left at their defaults."""
    return [f for f in flags if f in getattr(args, "typed", ())]


def refuse_unused(typed: list[str], reason: str) -> None:
    if typed:
        raise UsageError(f"{typed[0]}: {reason}, so {', '.join(typed)} would be ignored; drop "
                         f"{'it' if len(typed) == 1 else 'them'}")

"""Pruners on tiny hand-checkable matrices, whole-model pruning on tiny models built from configs,
and one check on the real default model."""
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from analysis.calibration import InputStats, replaying, walk_blocks
from analysis.export import export
from analysis.layers import find_blocks, prunable_layers
from analysis.owl import collect_outlier_ratios
from analysis.pruners import PruneError, get_pruner, lowest_k_mask, prune_magnitude, prune_sparsegpt, prune_wanda
from analysis.pruning import DenseSnapshot, prune, prune_layer


def tiny_llama(seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gemma3(seed=0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                           max_position_embeddings=64)
    return Gemma3ForCausalLM(cfg).eval()


def calib_ids(n=4, seqlen=16, vocab=128, seed=0):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def correlated_inputs(tokens=1024, cols=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, cols, generator=g)
    mix = torch.eye(cols) + 0.9 * torch.randn(cols, cols, generator=g) / math.sqrt(cols)
    scale = torch.exp(torch.randn(cols, generator=g))  # uneven feature scales, like LLM activations
    return (z @ mix) * scale


def stats_of(x, hessian=True):
    s = InputStats(x.shape[1], hessian, torch.device("cpu"))
    s.add(x)
    return s


# ---------------------------------------------------------------------------------------------
# single matrices


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.7, 0.93])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_achieved_sparsity_is_exact_per_row(method, ratio):
    torch.manual_seed(1)
    w = torch.randn(24, 300)  # 300 columns: three SparseGPT blocks, the last one partial
    x = correlated_inputs(cols=300)
    s = stats_of(x)
    if method == "magnitude":
        out = prune_magnitude(w, ratio)
    elif method == "wanda":
        out = prune_wanda(w, s.col_norms(), ratio)
    else:
        out = prune_sparsegpt(w, s.hessian(), ratio)
    zeros_per_row = (out == 0).sum(dim=1)
    assert torch.all((zeros_per_row - ratio * 300).abs() <= 0.5 + 1e-9), zeros_per_row


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_nm_pattern_holds(method, nm):
    n, m = nm
    torch.manual_seed(2)
    w = torch.randn(16, 256)
    s = stats_of(correlated_inputs(cols=256))
    if method == "magnitude":
        out = prune_magnitude(w, 0.0, nm)
    elif method == "wanda":
        out = prune_wanda(w, s.col_norms(), 0.0, nm)
    else:
        out = prune_sparsegpt(w, s.hessian(), 0.0, nm)
    zeros = (out.reshape(16, 256 // m, m) == 0).sum(dim=2)
    assert torch.all(zeros >= m - n)
    assert abs(float((out == 0).float().mean()) - (m - n) / m) < 0.01


def test_equal_scores_go_to_the_lower_column_first():
    """Ties (common in dequantized 4-bit weights) are broken by column index, the same on every
    device, for unstructured and N:M masks."""
    w = torch.tensor([[1.0, -1.0, 1.0, 0.5, 1.0, 1.0, -1.0, 1.0]])
    assert torch.equal(prune_magnitude(w, 0.25), torch.tensor([[0.0, -1.0, 1.0, 0.0, 1.0, 1.0, -1.0, 1.0]]))
    assert torch.equal(prune_magnitude(w, 0.5, nm=(2, 4)), torch.tensor([[0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 1.0]]))
    big = torch.randint(0, 4, (64, 256)).float()  # many ties
    assert torch.equal(prune_magnitude(big, 0.6), prune_magnitude(big.clone(), 0.6))


@pytest.mark.parametrize("shape", [(7, 32), (5, 8, 4)])
def test_lowest_k_selection_removes_what_a_stable_sort_would(shape):
    """lowest_k_mask selects (kthvalue) instead of sorting: the same entries as the k first of a stable sort,
    with many ties and NaN scores (ranked last), for every k."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, shape, generator=g).float()
    scores[torch.rand(shape, generator=g) < 0.15] = math.nan
    for k in range(shape[-1] + 1):
        expected = torch.zeros(shape, dtype=torch.bool)
        expected.scatter_(-1, torch.sort(scores, dim=-1, stable=True).indices[..., :k], True)
        assert torch.equal(lowest_k_mask(scores, k), expected), k


@pytest.mark.parametrize("name", ["wanda", "magnitude"])
def test_a_mask_pruner_zeroes_its_mask(name):
    """Pruners that only remove weights give their mask too: what apply zeroes, unstructured and N:M."""
    pruner = get_pruner(name)
    w, norms = torch.randn(16, 32, generator=torch.Generator().manual_seed(1)), torch.rand(32) + 0.1
    for ratio, nm in ((0.6, None), (0.5, (2, 4))):
        mask = pruner.mask(w, ratio, nm, norms)
        assert mask.dtype == torch.bool and torch.equal(pruner.apply(w, ratio, nm, norms), w.masked_fill(mask, 0.0))
    assert get_pruner("sparsegpt").mask is None  # it updates the weights it keeps


def test_wanda_hand_checked_mask():
    # column norms of X are [4, 1, 0.5, 0.25]; scores |W| * norm:
    #   row 0: [1*4, 2*1, 3*0.5, 4*0.25] = [4, 2, 1.5, 1]   -> prune columns 3 and 2
    #   row 1: [4*4, 1*1, 1*0.5, 8*0.25] = [16, 1, 0.5, 2]  -> prune columns 2 and 1
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, -1.0, 1.0, -8.0]])
    x = torch.diag(torch.tensor([4.0, 1.0, 0.5, 0.25]))
    s = stats_of(x, hessian=False)
    assert torch.allclose(s.col_norms(), torch.tensor([4.0, 1.0, 0.5, 0.25]))
    out = prune_wanda(w, s.col_norms(), 0.5)
    expected = torch.tensor([[1.0, 2.0, 0.0, 0.0], [4.0, 0.0, 0.0, -8.0]])
    assert torch.equal(out, expected)
    # magnitude alone would keep the large weights of row 0 instead
    assert torch.equal(prune_magnitude(w, 0.5)[0], torch.tensor([0.0, 0.0, 3.0, 4.0]))


def test_sparsegpt_with_diagonal_hessian_is_magnitude_pruning():
    # equal, uncorrelated input features: no error to compensate, the mask is the magnitude mask
    torch.manual_seed(3)
    w = torch.randn(8, 32)
    h = 3.0 * torch.eye(32)
    assert torch.allclose(prune_sparsegpt(w, h, 0.5), prune_magnitude(w, 0.5), atol=1e-6)


def test_sparsegpt_two_weights_hand_checked():
    # one row, two correlated inputs; pruning 1 of 2 weights. Dampened Hessian Hd, Hinv = Hd^-1.
    # Column 0 has the smaller score w0^2 / Hinv_00, so it is removed, and the optimal-brain-surgeon
    # update moves its contribution onto column 1: w1 <- w1 - w0 * Hinv_01 / Hinv_00.
    w = torch.tensor([[0.5, 1.0]])
    h = torch.tensor([[2.0, 1.8], [1.8, 2.0]])
    hd = h.double() + 0.01 * 2.0 * torch.eye(2, dtype=torch.float64)
    hinv = torch.linalg.inv(hd)
    expected_w1 = 1.0 - 0.5 * hinv[0, 1] / hinv[0, 0]
    out = prune_sparsegpt(w, h, 0.5)
    assert out[0, 0] == 0.0
    assert out[0, 1].item() == pytest.approx(expected_w1.item(), rel=1e-5)
    # the compensated weight reproduces the dense output better than plain removal
    x = torch.tensor([[1.0, 0.9], [0.9, 1.0], [1.0, 1.0]])
    assert torch.norm(x @ (w - out).t()) < torch.norm(x @ (w - torch.tensor([[0.0, 1.0]])).t())


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(nm):
    torch.manual_seed(4)
    x = correlated_inputs(tokens=2048, cols=128)
    w = torch.randn(64, 128)
    s = stats_of(x)
    dense = x @ w.t()
    errs = {
        "magnitude": torch.norm(dense - x @ prune_magnitude(w, 0.5, nm).t()),
        "wanda": torch.norm(dense - x @ prune_wanda(w, s.col_norms(), 0.5, nm).t()),
        "sparsegpt": torch.norm(dense - x @ prune_sparsegpt(w, s.hessian(), 0.5, nm).t()),
    }
    assert errs["sparsegpt"] < errs["wanda"] < errs["magnitude"], errs


def test_dead_input_columns_are_zeroed_without_nan():
    torch.manual_seed(5)
    x = correlated_inputs(cols=32)
    x[:, 3] = 0.0
    out = prune_sparsegpt(torch.randn(4, 32), stats_of(x).hessian(), 0.25)
    assert torch.isfinite(out).all() and torch.all(out[:, 3] == 0)


# ---------------------------------------------------------------------------------------------
# whole models built from configs


def test_prune_tiny_llama_all_methods():
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = tiny_llama()
        refs = prunable_layers(model)
        per_layer = {r.name: 0.3 + 0.1 * (r.block % 2) for r in refs}
        report = prune(model, per_layer, method=method, calib=calib_ids())
        assert not report.stopped and report.blocks_done == 2
        for r in refs:
            zeros = (r.weight() == 0).sum(dim=1)
            assert torch.all((zeros - per_layer[r.name] * r.cols).abs() <= 0.5), (method, r.name)
        expected = sum(per_layer[r.name] * r.params for r in refs) / sum(r.params for r in refs)
        assert report.overall == pytest.approx(expected, abs=1e-3)
        out = model(input_ids=calib_ids(1, 8)).logits
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
def test_inputs_propagate_through_pruned_blocks(make):
    """Statistics gathered for block 1 during the walk equal those of a plain forward of the model
    with block 0 already pruned: inputs went through the pruned block, with the right masks and
    position embeddings (Gemma 3 mixes sliding-window and full-attention blocks). The walk's output,
    replayed through the norm and head, gives that forward's logits."""
    model = make()
    calib = calib_ids(3, 12)
    seen, final = {}, []

    def on_block(b, refs, stats):
        if b == 0:
            for r in refs:
                prune_layer(r, 0.6, "magnitude", None)
            return True
        seen.update({name: s.sq.clone() for name, s in stats.items()})
        return False

    walk_blocks(model, calib, on_block, on_output=final.append)
    refs = [r for r in prunable_layers(model) if r.block >= 1]
    direct = {r.name: InputStats(r.cols, False, torch.device("cpu")) for r in refs}
    hooks = [r.module.register_forward_hook(lambda m, i, o, s=direct[r.name]: s.add(i[0])) for r in refs]
    with torch.no_grad():
        logits = model(input_ids=calib, use_cache=False).logits
    for h in hooks:
        h.remove()
    for name, s in direct.items():
        assert torch.allclose(seen[name], s.sq, rtol=1e-4, atol=1e-5), name
    with replaying(find_blocks(model)[1], final[0]), torch.no_grad():
        replayed = model(input_ids=calib, use_cache=False).logits
    assert torch.allclose(replayed, logits, rtol=1e-4, atol=1e-5)


def test_a_walk_keeps_the_hooks_accelerate_put_on_blocks():
    """accelerate (device_map) wraps each block's forward on the block itself: swapping the forwards to capture
    block inputs, or to replay a walk's output, puts its wrapper back."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    model, calib = tiny_llama(), calib_ids(3, 12)
    blocks = find_blocks(model)[1]
    for blk in blocks:
        add_hook_to_module(blk, ModelHook())
    wrapped = [blk.__dict__["forward"] for blk in blocks]
    final = []
    walk_blocks(model, calib, lambda b, refs, stats: False, on_output=final.append)
    with replaying(blocks, final[0]):
        pass
    assert [blk.__dict__.get("forward") for blk in blocks] == wrapped
    assert all(hasattr(blk, "_hf_hook") for blk in blocks)


def test_prune_stops_between_blocks():
    model = tiny_llama(layers=3)
    calls = []

    def stop():
        return len(calls) >= 1

    report = prune(model, {r.name: 0.5 for r in prunable_layers(model)}, method="wanda", calib=calib_ids(),
                   progress=lambda msg, frac: calls.append(frac), stop=stop)
    assert report.stopped and report.blocks_done == 1
    assert report.per_layer["model.layers.0.mlp.up_proj"] == pytest.approx(0.5)
    assert report.per_layer["model.layers.2.mlp.up_proj"] == 0.0


def test_one_ratio_or_an_allocation_prunes_like_its_per_layer_dict():
    from analysis.allocation import allocate
    from analysis.layers import layer_table

    a, b, c = tiny_llama(), tiny_llama(), tiny_llama()
    alloc = allocate(layer_table(a), 0.5, "uniform")
    reports = [prune(m, given, method="magnitude") for m, given in ((a, 0.5), (b, alloc), (c, alloc.per_layer))]
    assert reports[0].per_layer == reports[1].per_layer == reports[2].per_layer
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))
    with pytest.raises(PruneError, match="per_layer must be {matrix name: ratio}, an Allocation or one ratio"):
        prune(a, [0.5], method="magnitude")


def test_bad_prune_requests_raise_value_errors():
    model = tiny_llama()
    names = [r.name for r in prunable_layers(model)]
    with pytest.raises(ValueError, match="Unknown pruning method"):
        prune(model, {names[0]: 0.5}, method="random")
    with pytest.raises(ValueError, match="not prunable matrices"):
        prune(model, {"model.embed_tokens": 0.5}, method="magnitude")
    with pytest.raises(ValueError, match="must be in"):
        prune(model, {names[0]: 1.0}, method="magnitude")
    with pytest.raises(ValueError, match="needs calibration"):
        prune(model, {names[0]: 0.5}, method="wanda")
    with pytest.raises(ValueError, match="N:M"):
        prune(model, {names[0]: 0.5}, method="magnitude", nm="4:2")
    with torch.no_grad():
        model.get_submodule(names[1]).weight[0, 0] = float("nan")
    for method in ("magnitude", "sparsegpt"):
        with pytest.raises(ValueError, match=f"'{names[1]}' has non-finite weights"):
            prune(model, {names[1]: 0.5}, method=method, calib=torch.zeros(1, 8, dtype=torch.long))
    odd = rf"2:4 prunes a matrix to 0.5 .*; 1 ratio\(s\) differ, e.g. '{names[1]}' asks 0.1"
    with pytest.raises(ValueError, match=odd):
        prune(model, {names[0]: 0.5, names[1]: 0.1, names[2]: 0.0}, method="magnitude", nm="2:4")


def test_bad_devices_and_token_ids_are_refused_alike_by_every_pruner_before_a_weight_changes():
    from analysis.errors import AlphascopeError
    from analysis.evaluation import perplexity

    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = calib_ids()
    cases = [("quantum", calib, "Unknown device 'quantum'"), (None, calib.float(), "must be integers"),
             (None, calib + 1000, r"token id 1\d\d\d is outside the model's vocabulary of 128")]
    if not torch.cuda.is_available():
        cases.append(("cuda", calib, "no CUDA device is available"))
    for method in ("magnitude", "wanda", "sparsegpt"):
        for device, ids, message in cases:
            if method == "magnitude" and device is None:
                continue  # reads no calibration data
            with pytest.raises(AlphascopeError, match=message):
                prune(model, 0.5, method=method, calib=ids, device=device)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    for device, ids, message in cases:
        with pytest.raises(AlphascopeError, match=message):
            perplexity(model, ids, device=device)


def test_outlier_ratios_per_block():
    model = tiny_llama(layers=3)
    ratios = collect_outlier_ratios(model, calib_ids(), owl_threshold=3.0)
    assert sorted(ratios) == [0, 1, 2]
    assert all(0.0 < r < 0.2 for r in ratios.values())
    assert set(collect_outlier_ratios(model, calib_ids(), owl_threshold=1e9).values()) == {0.0}
    # hand count for block 0 at M=3, from the same statistics
    counts, total = 0, 0

    def on_block(b, refs, stats):
        nonlocal counts, total
        if b == 0:
            for r in refs:
                a = r.weight().abs() * stats[r.name].col_norms()
                counts += int((a > 3.0 * a.mean()).sum())
                total += a.numel()
        return False

    walk_blocks(model, calib_ids(), on_block)
    assert ratios[0] == pytest.approx(counts / total)


def test_snapshot_restore_is_bit_identical_and_export_reloads(tmp_path):
    model = tiny_llama()
    before = {r.name: r.weight().detach().clone() for r in prunable_layers(model)}
    snap = DenseSnapshot.take(model)
    prune(model, {r.name: 0.5 for r in prunable_layers(model)}, method="sparsegpt", calib=calib_ids())
    assert any(not torch.equal(before[r.name], r.weight()) for r in prunable_layers(model))
    out = export(model, None, {"method": "uniform", "per_layer": {}}, tmp_path / "pruned")
    assert (out / "allocation.json").exists() and list(out.glob("*.safetensors"))
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for r, r2 in zip(prunable_layers(model), prunable_layers(reloaded)):
        assert torch.equal(r.weight(), r2.weight())
    snap.restore(model)
    for r in prunable_layers(model):
        assert torch.equal(before[r.name], r.weight())
    with pytest.raises(ValueError, match="different model"):
        snap.restore(tiny_llama(layers=3))


# ---------------------------------------------------------------------------------------------
# the real default model


def test_default_model_wanda_beats_magnitude_at_half_sparsity(default_model, wikitext_dir):
    from analysis.data import calibration_batches, eval_windows, load_text, split_text
    from analysis.evaluation import perplexity

    model, tok = default_model.model, default_model.tokenizer
    calib = calibration_batches(tok, split_text(load_text("default"))[0], n_samples=8, seqlen=128)
    windows = eval_windows(tok, (wikitext_dir / "test.txt").read_text(), seqlen=256, max_windows=4)
    snap = DenseSnapshot.take(model)
    per_layer = {r.name: 0.5 for r in prunable_layers(model)}
    try:
        dense = perplexity(model, windows)
        mag_report = prune(model, per_layer, method="magnitude")
        mag = perplexity(model, windows)
        snap.restore(model)
        wanda_report = prune(model, per_layer, method="wanda", calib=calib)
        wanda = perplexity(model, windows)
    finally:
        snap.restore(model)
    assert mag_report.overall == pytest.approx(0.5, abs=1e-3)
    assert wanda_report.overall == pytest.approx(0.5, abs=1e-3)
    assert math.isfinite(wanda) and dense < wanda < mag, (dense, wanda, mag)
    assert perplexity(model, windows) == pytest.approx(dense, rel=1e-6)


def test_layers_fed_the_same_input_share_statistics():
    model = tiny_llama()
    shared = {}

    def on_block(b, refs, stats):
        if b == 0:
            shared.update(stats)
        return False

    walk_blocks(model, calib_ids(), on_block)
    p = "model.layers.0."
    assert shared[p + "self_attn.q_proj"] is shared[p + "self_attn.k_proj"] is shared[p + "self_attn.v_proj"]
    assert shared[p + "mlp.gate_proj"] is shared[p + "mlp.up_proj"]
    assert shared[p + "self_attn.o_proj"] is not shared[p + "self_attn.q_proj"]
    assert shared[p + "mlp.gate_proj"] is not shared[p + "self_attn.q_proj"]
    assert shared[p + "mlp.down_proj"].tokens == 4 * 16


def test_walk_without_data_visits_every_block_in_order():
    """calib=None: the walker visits the blocks (for magnitude pruning) without running them."""
    model = tiny_llama(layers=3)
    seen = []
    done = walk_blocks(model, None, lambda b, refs, stats: seen.append((b, len(refs), dict(stats))))
    assert done == 3 and [s[0] for s in seen] == [0, 1, 2]
    assert all(n == 7 and stats == {} for _, n, stats in seen)
    assert walk_blocks(model, None, lambda *a: None, stop=lambda: True) == 0

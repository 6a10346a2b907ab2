"""Mixture-of-experts models (transformers 5 keeps experts fused in 3-D parameters): every expert's gate,
up and down projection is a matrix of its own for spectra, allocation and the pruners, fed the tokens
the router sent it. Tiny Qwen2-MoE / Mixtral / GPT-OSS / Nemotron-H / Llama 4 / JetMoE models built from configs."""
import re
from operator import attrgetter

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import transformers as tf

from analysis.calibration import ExpertsError, walk_blocks
from analysis.checkpoint import open_checkpoint
from analysis.cli import main as cli_main
from analysis.export import ExportError, export, module_order
from analysis.layers import ExpertsLayout, find_layers, fused_experts, prunable_layers, unsupported_weights
from analysis.owl import collect_outlier_ratios
from analysis.pruners import prune_magnitude, prune_sparsegpt, prune_wanda, wanda_scores
from analysis.pruning import DenseSnapshot, prune, prune_warnings
from analysis.spectra import NotStreamable, analyze, analyze_checkpoint, checkpoint_layers
from analysis.store import RunStore
from tests.conftest import word_tokenizer

MOE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=120)


def qwen2_moe(experts=4, top_k=2, seed=0):
    torch.manual_seed(seed)
    cfg = tf.Qwen2MoeConfig(**MOE, intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                            num_experts=experts, num_experts_per_tok=top_k)
    return tf.Qwen2MoeForCausalLM(cfg).eval()


def mixtral(seed=0):
    torch.manual_seed(seed)
    return tf.MixtralForCausalLM(tf.MixtralConfig(**MOE, intermediate_size=48, num_local_experts=4,
                                                  num_experts_per_tok=2)).eval()


def gpt_oss(seed=0):
    """Experts stored transposed, (E, H, 2I) and (E, I, H), gate and up interleaved, with biases."""
    torch.manual_seed(seed)
    cfg = tf.GptOssConfig(**MOE, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                          layer_types=["full_attention"] * 2)
    model = tf.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_bias"):  # initialised to zero: give the biases a part in the experts' outputs
                p.normal_(0, 0.1)
    return model


def llama4():
    """Experts stored transposed that take their tokens pre-routed: every expert's rows stacked, each token scaled
    by its router score, zero where the router did not choose that expert."""
    torch.manual_seed(0)
    return tf.Llama4ForCausalLM(tf.Llama4TextConfig(**MOE, intermediate_size=32, intermediate_size_mlp=64,
                                                    num_local_experts=4, num_experts_per_tok=1, head_dim=16)).eval()


def jetmoe():
    """Experts in 3-D `weight` parameters of modules of its own, in the MLP and the attention: unsupported."""
    torch.manual_seed(0)
    return tf.JetMoeForCausalLM(tf.JetMoeConfig(**MOE, intermediate_size=32, num_local_experts=4,
                                                num_experts_per_tok=2, kv_channels=16))


def calib(n=4, seqlen=16, seed=0):
    return torch.randint(0, 120, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def routed_inputs(model, ids, router="mlp.gate", chosen=2):
    """Per block: the experts module's input and the router's choice (its output number `chosen`: the experts
    chosen, or the scores), read from the router itself (`router`: its path in the block)."""
    seen = {}
    def keep(b):
        return lambda module, inputs, output: seen.__setitem__(b, (inputs[0], output[chosen]))

    handles = [attrgetter(router)(layer).register_forward_hook(keep(b)) for b, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return {b: (x.reshape(-1, x.shape[-1]), choice) for b, (x, choice) in seen.items()}


def test_every_expert_projection_is_a_matrix_named_as_in_the_checkpoint(tmp_path):
    model = qwen2_moe()
    refs = [r for r in prunable_layers(model) if r.block == 0]
    assert [r.kind for r in refs] == ["q_proj", "k_proj", "v_proj", "o_proj"] + \
        ["experts.gate_proj", "experts.up_proj", "experts.down_proj"] * 4 + \
        ["shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj"]  # a kind of their own
    assert {r.group for r in refs[4:]} == {"mlp"}
    gate = [r for r in find_layers(model) if r.kind == "shared_expert_gate"]
    assert len(gate) == 2 and not any(r.prunable for r in gate)  # a gating vector: listed, not pruned
    routers = [r for r in find_layers(model) if r.kind == "gate"]  # transformers 5's top-k router: not a Linear
    assert [(r.name, r.rows, r.cols, r.prunable) for r in routers] == [
        (f"model.layers.{b}.mlp.gate", 4, 64, False) for b in range(2)]  # (experts, hidden)
    assert routers[0].weight() is model.model.layers[0].mlp.gate.weight
    experts = model.model.layers[0].mlp.experts
    up2 = next(r for r in refs if r.name == "model.layers.0.mlp.experts.2.up_proj")
    assert (up2.rows, up2.cols, up2.group) == (32, 64, "mlp")
    assert up2.weight().data_ptr() == experts.gate_up_proj[2, 32:].data_ptr()  # a view: pruning it edits the model
    model.save_pretrained(tmp_path)  # transformers writes the experts one by one, as the Hub checkpoints are
    ckpt = open_checkpoint(tmp_path)
    for r in refs:
        assert torch.equal(ckpt.tensor(r.name + ".weight"), r.weight()), r.name
    assert unsupported_weights(model) == 0


def test_experts_see_the_tokens_the_router_sent_them():
    model, ids = qwen2_moe(), calib()
    routed = routed_inputs(model, ids)
    got = {}
    walk_blocks(model, ids, lambda b, refs, stats: got.update(stats) or False, hessian=True)
    for b, (x, chosen) in routed.items():
        experts = model.model.layers[b].mlp.experts
        for e in range(4):
            xe = x[(chosen == e).any(-1)]
            gate = got[f"model.layers.{b}.mlp.experts.{e}.gate_proj"]
            assert got[f"model.layers.{b}.mlp.experts.{e}.up_proj"] is gate  # the same tokens: one statistic
            assert gate.tokens == len(xe) > 0
            torch.testing.assert_close(gate.xtx, xe.t() @ xe, rtol=1e-5, atol=1e-5)
            g, u = F.linear(xe, experts.gate_up_proj[e]).chunk(2, dim=-1)
            inner = F.silu(g) * u
            torch.testing.assert_close(got[f"model.layers.{b}.mlp.experts.{e}.down_proj"].sq, (inner ** 2).sum(0),
                                       rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_pruning_experts_is_each_pruner_on_each_expert(method):
    model, ids = qwen2_moe(), calib()
    dense = DenseSnapshot.take(model)
    routed = routed_inputs(model, ids)  # dense inputs of block 0, which is pruned first
    refs = prunable_layers(model)
    report = prune(model, {r.name: 0.5 for r in refs}, method, ids)
    assert report.overall == pytest.approx(0.5)
    x, chosen = routed[0]
    xe = x[(chosen == 1).any(-1)]
    w = dense.weights["model.layers.0.mlp.experts.1.gate_proj"]
    want = {"magnitude": lambda: prune_magnitude(w, 0.5),
            "wanda": lambda: prune_wanda(w, (xe ** 2).sum(0).sqrt(), 0.5),
            "sparsegpt": lambda: prune_sparsegpt(w, xe.t() @ xe * (2 / len(xe)), 0.5)}[method]()
    got = model.model.layers[0].mlp.experts.gate_up_proj[1, :32]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    dense.restore(model)
    assert torch.equal(model.model.layers[0].mlp.experts.gate_up_proj[1, :32], w)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_an_expert_no_calibration_token_reached_is_pruned_by_magnitude(method):
    """Eight experts, one chosen per token, four calibration tokens: at least four experts of every block see
    nothing. Their statistic would be all zeros (SparseGPT would zero the whole expert), so they get magnitude."""
    model, ids = qwen2_moe(experts=8, top_k=1), calib(n=1, seqlen=4)
    routed = routed_inputs(model, ids)
    dense = DenseSnapshot.take(model)
    report = prune(model, {r.name: 0.5 for r in prunable_layers(model)}, method, ids)
    unused = [e for e in range(8) if not (routed[0][1] == e).any()]
    assert len(unused) >= 4
    kinds = ("gate_proj", "up_proj", "down_proj")
    assert {f"model.layers.0.mlp.experts.{e}.{kind}" for e in unused for kind in kinds} <= set(report.by_magnitude)
    assert not any(".experts." not in n for n in report.by_magnitude)
    assert prune_warnings(report)[0].startswith(f"{len(report.by_magnitude)} matrices saw no calibration token")
    for e in unused:
        for kind in ("gate_proj", "up_proj", "down_proj"):
            name = f"model.layers.0.mlp.experts.{e}.{kind}"
            assert report.per_layer[name] == pytest.approx(0.5)
            w = next(r for r in prunable_layers(model) if r.name == name).weight()
            assert torch.equal(w, prune_magnitude(dense.weights[name], 0.5))


def test_owl_counts_outliers_of_the_experts_that_saw_tokens():
    model, ids = qwen2_moe(experts=8, top_k=1), calib(n=1, seqlen=4)
    stats = {}
    walk_blocks(model, ids, lambda b, refs, s: stats.update(s) or False)
    ratios = collect_outlier_ratios(model, ids)
    for b in range(2):
        seen = [r for r in prunable_layers(model) if r.block == b and stats[r.name].tokens]
        assert len(seen) < len([r for r in prunable_layers(model) if r.block == b])  # some experts saw nothing
        scores = [wanda_scores(r.weight().float(), stats[r.name].col_norms()) for r in seen]
        want = sum(int((a > 5 * a.mean()).sum()) for a in scores) / sum(a.numel() for a in scores)
        assert ratios[b] == pytest.approx(want)


@pytest.mark.parametrize("family", ["qwen2_moe", "llama4"])
def test_experts_that_compute_otherwise_are_refused_not_misread(family):
    model = {"qwen2_moe": qwen2_moe, "llama4": llama4}[family]()
    for layer in model.model.layers:  # experts whose output is not down(act(gate) * up) as stored
        (layer.mlp if family == "qwen2_moe" else layer.feed_forward).experts.register_forward_hook(
            lambda m, i, o: o * 2)
    with pytest.raises(ExpertsError, match="magnitude"):
        prune(model, {r.name: 0.5 for r in prunable_layers(model)}, "wanda", calib())
    assert prune(model, {r.name: 0.5 for r in prunable_layers(model)}, "magnitude").overall == pytest.approx(0.5)


FAMILIES = {  # MoE families of transformers 5 with the fused layout, built tiny
    "olmoe": lambda: tf.OlmoeForCausalLM(tf.OlmoeConfig(**MOE, intermediate_size=32, num_experts=8,
                                                        num_experts_per_tok=2)),
    "deepseek_v3": lambda: tf.DeepseekV3ForCausalLM(tf.DeepseekV3Config(
        **MOE, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, n_group=2, topk_group=1)),
    "phimoe": lambda: tf.PhimoeForCausalLM(tf.PhimoeConfig(**MOE, intermediate_size=32, num_local_experts=4,
                                                           num_experts_per_tok=2)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_other_moe_families_prune_their_experts(family):
    """OLMoE, DeepSeek-V3 (its first block dense, shared experts as plain Linear) and PhiMoE (a Linear router):
    every expert is found, the router is not pruned, and SparseGPT's gathered inputs pass the experts check."""
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    refs = prunable_layers(model)
    assert sum(r.expert is not None for r in refs) == {"olmoe": 2, "deepseek_v3": 1, "phimoe": 2}[family] * 3 * \
        {"olmoe": 8, "deepseek_v3": 8, "phimoe": 4}[family]
    assert unsupported_weights(model) == 0
    routers = [r for r in find_layers(model) if r.kind == "router"]  # PhiMoE's router is a Linear
    assert len(routers) == (2 if family == "phimoe" else 0) and not any(r.prunable for r in routers)
    assert prune(model, {r.name: 0.5 for r in refs}, "sparsegpt", calib()).overall == pytest.approx(0.5)


def test_gpt_oss_experts_stored_transposed_interleaved_and_biased():
    """GPT-OSS's layout flags are read: each expert's gate is the even columns of its stored (H, 2I) matrix, its up
    the odd ones; the down projection's statistic is GPT-OSS's own clamped gate of the routed tokens, biases in."""
    model, ids = gpt_oss(), calib()
    experts = model.model.layers[0].mlp.experts
    assert fused_experts(experts) == ExpertsLayout(4, 64, 32, gated=True, concatenated=False, transposed=True,
                                                   bias=True)
    assert unsupported_weights(model) == 0
    refs = {r.name: r for r in prunable_layers(model)}
    assert len(refs) == 2 * (4 + 3 * 4)
    stored = experts.gate_up_proj[2]  # (H, 2I)
    gate, up, down = (refs[f"model.layers.0.mlp.experts.2.{k}"] for k in ("gate_proj", "up_proj", "down_proj"))
    assert (gate.rows, gate.cols, down.rows, down.cols) == (32, 64, 64, 32)
    assert torch.equal(gate.weight(), stored[:, 0::2].t()) and torch.equal(up.weight(), stored[:, 1::2].t())
    assert gate.weight().data_ptr() == stored.data_ptr() and torch.equal(down.weight(), experts.down_proj[2].t())
    x, index = routed_inputs(model, ids, router="mlp.router")[1]
    got = {}
    walk_blocks(model, ids, lambda b, refs, stats: got.update(stats) or False, hessian=True)
    experts = model.model.layers[1].mlp.experts
    for e in range(4):
        xe = x[(index == e).any(-1)]
        h = xe @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
        g, u = h[:, 0::2].clamp(max=experts.limit), h[:, 1::2].clamp(-experts.limit, experts.limit)
        inner = (u + 1) * g * torch.sigmoid(g * experts.alpha)  # GPT-OSS's gate, written out
        assert got[f"model.layers.1.mlp.experts.{e}.gate_proj"].tokens == len(xe) > 0
        torch.testing.assert_close(got[f"model.layers.1.mlp.experts.{e}.up_proj"].xtx, xe.t() @ xe, rtol=1e-5,
                                   atol=1e-5)
        torch.testing.assert_close(got[f"model.layers.1.mlp.experts.{e}.down_proj"].sq, (inner ** 2).sum(0),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_gpt_oss_experts_pruned_in_their_stored_layout(method):
    model, ids = gpt_oss(), calib()
    dense = DenseSnapshot.take(model)
    report = prune(model, {r.name: 0.5 for r in prunable_layers(model)}, method, ids)
    assert report.overall == pytest.approx(0.5) and not report.by_magnitude
    stored = model.model.layers[0].mlp.experts.gate_up_proj[3]
    for cols in (stored[:, 0::2], stored[:, 1::2]):  # every output row of gate and up keeps half its weights
        assert ((cols == 0).sum(0) == 32).all()
    dense.restore(model)
    assert torch.equal(model.model.layers[0].mlp.experts.gate_up_proj[3, :, 1::2].t(),
                       dense.weights["model.layers.0.mlp.experts.3.up_proj"])


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_experts_without_a_gate_prune_up_and_down(method):
    """Nemotron-H's experts (up_proj and down_proj only, act(up) between them) in a hybrid Mamba model."""
    torch.manual_seed(0)
    model = tf.NemotronHForCausalLM(tf.NemotronHConfig(
        **MOE, hybrid_override_pattern="MEM", n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=32, mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16, n_groups=1,
        head_dim=16)).eval()
    layout = fused_experts(model.model.layers[1].mixer.experts)
    assert (layout.gated, layout.transposed, layout.bias) == (False, False, False)
    experts = [r for r in prunable_layers(model) if ".experts." in r.name]
    assert sorted({r.kind for r in experts}) == ["experts.down_proj", "experts.up_proj"] and len(experts) == 2 * 4
    assert unsupported_weights(model) == 0
    report = prune(model, {r.name: 0.5 for r in prunable_layers(model)}, method, calib())
    assert report.overall == pytest.approx(0.5) and not report.by_magnitude


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_llama4_experts_see_their_pre_routed_tokens(method):
    """Expert e's statistic is the tokens the router chose it for, scaled by their scores, as the expert sees them."""
    model, ids = llama4(), calib()
    experts = model.model.layers[1].feed_forward.experts
    assert fused_experts(experts) == ExpertsLayout(4, 64, 32, gated=True, concatenated=True, transposed=True,
                                                   bias=False, pre_routed=True)
    refs = {r.name: r for r in prunable_layers(model)}
    assert len(refs) == 2 * (4 + 3 + 3 * 4)  # attention, the shared expert, 4 routed experts
    up = refs["model.layers.1.feed_forward.experts.3.up_proj"].weight()
    assert torch.equal(up, experts.gate_up_proj[3, :, 32:].t())
    x, scores = routed_inputs(model, ids, router="feed_forward.router", chosen=0)[1]  # it returns (scores, logits)
    got = {}
    walk_blocks(model, ids, lambda b, refs, stats: got.update(stats) or False, hessian=True)
    for e in range(4):
        chosen = scores[:, e] > 0
        xe = x[chosen] * scores[chosen, e, None]
        assert got[f"model.layers.1.feed_forward.experts.{e}.gate_proj"].tokens == int(chosen.sum())
        torch.testing.assert_close(got[f"model.layers.1.feed_forward.experts.{e}.gate_proj"].xtx, xe.t() @ xe,
                                   rtol=1e-5, atol=1e-5)
    report = prune(model, {name: 0.5 for name in refs}, method, ids)
    assert report.overall == pytest.approx(0.5) and unsupported_weights(model) == 0


def test_gemma4_router_is_not_pruned_and_its_experts_are():
    """Gemma 4's router keeps its Linear (`proj`) inside a module named `router`; its experts sit beside a dense MLP."""
    torch.manual_seed(0)
    model = tf.Gemma4ForCausalLM(tf.Gemma4TextConfig(
        **MOE, intermediate_size=64, head_dim=16, enable_moe_block=True, num_experts=4, top_k_experts=2,
        moe_intermediate_size=32, layer_types=["sliding_attention", "full_attention"])).eval()
    routers = [r for r in find_layers(model) if r.name.endswith("router.proj")]
    assert len(routers) == 2 and not any(r.prunable for r in routers)
    assert sum(r.expert is not None for r in prunable_layers(model)) == 2 * 4 * 3
    report = prune(model, {r.name: 0.5 for r in prunable_layers(model)}, "wanda", calib())
    assert report.overall == pytest.approx(0.5) and not report.by_magnitude


def test_memory_estimate_counts_one_hessian_per_expert_input_in_the_largest_block():
    from analysis.layers import layers_by_block
    from analysis.loading import memory_estimate

    est = memory_estimate(qwen2_moe(), "float32", 4, 16)  # 4 experts: gate and up share a Hessian, H=64, I=32
    attention, experts, shared = 4 * 64 * 64, 4 * (64 * 64 + 32 * 32), 2 * 64 * 64 + 64 * 64
    assert est.hessians == 4 * (attention + experts + shared)
    deepseek = FAMILIES["deepseek_v3"]()  # its first block is dense: the estimate is the MoE block's
    blocks = layers_by_block(deepseek)
    assert memory_estimate(deepseek, "float32", 4, 16).hessians > sum(r.cols ** 2 * 4 for r in blocks[0])


def test_other_expert_layouts_are_counted_not_misread():
    model = jetmoe()  # experts in 3-D parameters of JetMoE's own modules, in its MLP and its attention
    assert unsupported_weights(model) == 2 * 4 * (64 * 64 + 64 * 32 + 32 * 64 + 64 * 32)
    assert not any(r.expert is not None for r in prunable_layers(model))
    dbrx = tf.DbrxForCausalLM(tf.DbrxConfig(  # experts stacked in 2-D parameters w1, v1, w2 (experts x inner, hidden)
        d_model=64, n_heads=4, n_layers=2, vocab_size=120, max_seq_len=64,
        attn_config={"kv_n_heads": 2, "rope_theta": 1e4}, ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 4,
                                                                       "moe_top_k": 2}))
    assert unsupported_weights(dbrx) == 2 * 3 * (4 * 32) * 64
    layers = find_layers(dbrx)  # its router is a Linear named `layer` inside the module `router`: not pruned
    assert [r.kind for r in layers if r.block == 0 and r.prunable] == ["Wqkv", "out_proj"]
    assert [r.name for r in layers if r.block == 0 and not r.prunable] == ["transformer.blocks.0.ffn.router.layer"]


def test_spectra_of_experts_streamed_or_loaded(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ALPHASCOPE_CACHE", str(tmp_path / "cache"))
    qwen = qwen2_moe()
    qwen.save_pretrained(tmp_path / "qwen")
    streamed = analyze_checkpoint(tmp_path / "qwen", device="cpu")
    pd.testing.assert_frame_equal(streamed.metrics, analyze(qwen).metrics, rtol=1e-9)
    assert (streamed.metrics["kind"] == "experts.down_proj").sum() == 2 * 4
    for name, model in (("oss", gpt_oss()), ("l4", llama4())):  # experts stored fused: each expert's slice read alone
        model.save_pretrained(tmp_path / name)
        assert any(k.endswith("experts.gate_up_proj") for k in open_checkpoint(tmp_path / name).tensors)
        for farms in (False, True):
            streamed = analyze_checkpoint(tmp_path / name, device="cpu", farms=farms)
            pd.testing.assert_frame_equal(streamed.metrics, analyze(model, farms=farms).metrics, rtol=1e-9)
    # Mixtral's checkpoint keeps experts as block_sparse_moe.experts.<e>.w1/w3/w2, which transformers renames and fuses
    mix = mixtral()
    mix.save_pretrained(tmp_path / "mix")
    assert "model.layers.1.block_sparse_moe.experts.3.w3.weight" in open_checkpoint(tmp_path / "mix").tensors
    streamed = analyze_checkpoint(tmp_path / "mix", device="cpu")
    pd.testing.assert_frame_equal(streamed.metrics, analyze(mix).metrics, rtol=1e-9)
    # experts stored in a form this tool does not find (as if Mixtral's w1/w3/w2 were unknown): the CLI loads the model
    word_tokenizer(119).save_pretrained(tmp_path / "mix")
    monkeypatch.setattr("analysis.spectra._EXPERT_LEAVES", {})
    monkeypatch.setenv("ALPHASCOPE_CACHE", str(tmp_path / "cache2"))  # not the streamed result cached above
    with pytest.raises(NotStreamable):
        checkpoint_layers(open_checkpoint(tmp_path / "mix"))
    assert cli_main(["spectra", "--model", str(tmp_path / "mix"), "--out", str(tmp_path / "mix.csv")]) == 0
    table = pd.read_csv(tmp_path / "mix.csv")
    assert len(table) == 2 * (4 + 1 + 3 * 4) and np.isfinite(table["alpha"]).any()  # attention, router, experts
    # the per-block summary counts the matrices an allocation reads: not the router
    summary = capsys.readouterr().out
    assert re.search(r"^0\s+16\s", summary, re.M) and re.search(r"^1\s+16\s", summary, re.M), summary


def test_pruned_experts_export_and_reload(tmp_path):
    model, ids = mixtral(), calib()
    refs = prunable_layers(model)
    per_layer = {r.name: 0.5 for r in refs}
    prune(model, per_layer, "wanda", ids)
    assert list(module_order(per_layer, model)) == list(per_layer)  # what recipes and .npy files list
    shuffled = list(module_order(dict(reversed(per_layer.items())), model))
    assert shuffled[:4] == [r.name for r in refs[:4]]  # the attention, then block 0's experts at their module
    assert {n.rsplit(".", 2)[0] for n in shuffled[4:16]} == {"model.layers.0.mlp.experts"}
    back = tf.AutoModelForCausalLM.from_pretrained(export(model, None, {"per_layer": per_layer}, tmp_path / "out"))
    for a, b in zip(find_layers(model), find_layers(back)):
        assert a.name == b.name and torch.equal(a.weight(), b.weight()), a.name
    # transformers does not load fused experts under compressed-tensors metadata: refused, nothing written
    with pytest.raises(ExportError, match="dense-ct: 24 pruned matrices .* are slices of fused MoE experts"):
        export(model, None, {"per_layer": per_layer}, tmp_path / "ct", format="dense-ct")
    assert not list(tmp_path.glob("*ct*"))
    # the CLI refuses it before the run
    model.save_pretrained(tmp_path / "mix")
    word_tokenizer(119).save_pretrained(tmp_path / "mix")
    code = cli_main(["prune", "--model", str(tmp_path / "mix"), "--method", "magnitude", "--allocation", "uniform",
                     "--eval", "default", "--eval-seqlen", "32", "--max-windows", "1", "--save-model",
                     str(tmp_path / "ct"), "--save-format", "dense-ct", "--db", str(tmp_path / "runs.sqlite")])
    assert code == 2 and len(RunStore(tmp_path / "runs.sqlite")) == 0 and not (tmp_path / "ct").exists()


def test_model_page_lists_the_experts_and_warns_of_weights_it_cannot_read(tmp_path):
    from tests.test_app import fresh_app, metric, run_until_idle

    mixtral().save_pretrained(tmp_path / "mix")
    jetmoe().save_pretrained(tmp_path / "jet")
    for name in ("mix", "jet"):
        word_tokenizer(119).save_pretrained(tmp_path / name)
    at = fresh_app()
    at.radio(key="model_choice").set_value("Local checkpoint folder").run()
    at.text_input(key="model_folder").input(str(tmp_path / "mix")).run()
    at.button(key="model_load").click().run()
    run_until_idle(at, "spectra of the tiny Mixtral")  # loaded, and its spectra job (on the loaded model) done
    assert not at.error and not at.warning, [e.value for e in at.error] + [w.value for w in at.warning]
    assert metric(at, "Prunable matrices") == str(2 * (4 + 3 * 4))
    at.text_input(key="model_folder").input(str(tmp_path / "jet")).run()
    at.button(key="model_load").click().run()
    assert not at.error, [e.value for e in at.error]
    assert metric(at, "Prunable matrices") == str(len(prunable_layers(jetmoe())))
    assert any("81,920 weights" in w.value and "neither analysed nor pruned" in w.value for w in at.warning)


def test_search_over_blocks_and_kinds_moves_the_experts_kinds_too():
    """The allocation search in the block+kind space on an MoE model: the experts' kinds (found once per expert
    in every block) get offsets like the attention's; the result keeps the budget and every block's ratio."""
    from analysis.allocation import allocate
    from analysis.layers import layer_table
    from analysis.search import search_allocation

    model, ids = qwen2_moe(), calib(n=8, seqlen=32)
    starts = {"uniform": allocate(layer_table(model), 0.6, "uniform")}
    a = search_allocation(model, ids, starts, prune_method="wanda", steps=12, seed=0, screen_samples=2,
                          screen_seqlen=16, space="block+kind", verify="none")
    kinds = a.params["history"][-1]["kinds"]
    assert {"experts.gate_proj", "experts.up_proj", "experts.down_proj"} <= set(kinds)
    assert a.achieved == pytest.approx(0.6, abs=1e-12)
    for r in prunable_layers(model):
        assert a.per_layer[r.name] == pytest.approx(a.per_block[r.block] + kinds[r.kind], abs=1e-12)


def test_prune_page_warns_of_experts_pruned_by_magnitude(tmp_path, monkeypatch):
    from tests.test_app import fresh_app, run_until_idle, set_prune_inputs

    monkeypatch.setenv("ALPHASCOPE_RUNS_DB", str(tmp_path / "runs.sqlite"))
    qwen2_moe(experts=16, top_k=1).save_pretrained(tmp_path / "moe")
    word_tokenizer(119).save_pretrained(tmp_path / "moe")
    at = fresh_app()
    at.radio(key="model_choice").set_value("Local checkpoint folder").run()
    at.text_input(key="model_folder").input(str(tmp_path / "moe")).run()
    at.button(key="model_load").click().run()
    at.switch_page("pages/prune.py").run()
    small = dict(method="sparsegpt", alloc="uniform", n_samples=1, calib_seqlen=8, eval_seqlen=32, windows=2)
    set_prune_inputs(at, **small)
    at.button(key="prune_run").click().run()
    set_prune_inputs(at, **small)
    run_until_idle(at, "prune of a tiny MoE")
    assert not at.error, [e.value for e in at.error]
    assert any("saw no calibration token" in w.value and "pruned by magnitude instead of sparsegpt" in w.value
               for w in at.warning), [w.value for w in at.warning]


def test_an_allocation_that_gives_a_router_a_ratio_is_told_routers_stay_dense(tmp_path):
    """A router is one of the model's matrices, listed by the spectra but never pruned: an allocation file naming
    one is refused with that reason, not as a file made for another model."""
    import json

    from analysis.allocation import allocate
    from analysis.layers import layer_table
    from analysis.loading import ModelPreview
    from analysis.settings import AllocationSettings, SettingsError

    model = qwen2_moe()
    alloc = allocate(layer_table(model), 0.5, "uniform").to_dict()
    alloc["per_layer"]["model.layers.0.mlp.gate"] = 0.5
    path = tmp_path / "router.json"
    path.write_text(json.dumps(alloc))
    preview = ModelPreview("moe", None, model.config, False, model=model)
    with pytest.raises(SettingsError, match=r"'model.layers.0.mlp.gate' is a matrix of this model that is never "
                                            r"pruned \(MoE routers, the embedding and lm_head stay dense\)"):
        AllocationSettings(method="file", file=str(path)).check_model(preview)
    del alloc["per_layer"]["model.layers.0.mlp.gate"]
    alloc["per_layer"]["model.layers.9.mlp.gate"] = 0.5  # another model's router: not this one's
    path.write_text(json.dumps(alloc))
    with pytest.raises(SettingsError, match="was it made for another model"):
        AllocationSettings(method="file", file=str(path)).check_model(preview)

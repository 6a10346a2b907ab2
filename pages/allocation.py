"""Allocation page: draw the layerwise sparsity curve over depth, compare it with the presets."""
import copy
import hashlib
import json

import pandas as pd
import streamlit as st

from analysis.allocation import (
    MAX_RATIO,
    Allocation,
    AllocationError,
    allocate,
    block_offsets,
    block_table,
    control_points,
    curve_of,
    custom_allocation,
    kind_offsets,
    set_kind_offset,
    within_block_spread,
)
from analysis.data import MAX_UPLOAD_MB
from analysis.jobs import DONE, ERROR, Job
from analysis.pruners import PRUNERS
from analysis.search import describe
from analysis.session import search_job
from analysis.settings import (
    SEARCH_OBJECTIVES,
    SEARCH_SPACES,
    SEARCH_STEP_MAX,
    VERIFY_MODES,
    AllocationSettings,
    SettingsError,
    SpectraSettings,
)
from components.curve_editor import clamp_points, curve_editor, curve_points
from components.figures import METHOD_COLORS, allocation_overlay, block_bars_figure, curves_figure
from components.labels import OBJECTIVE_LABELS, SPACE_LABELS, VERIFY_LABELS
from components.state import (
    CUSTOM_ON_PRUNE,
    NO_TOKENIZER_NOTE,
    keep_job,
    model_key,
    owl_job,
    prune_data_settings,
    require_model,
    session_work,
    spectra_job,
    tab_connected,
    through_app,
    wait_for,
)

through_app(__file__)  # (after a server restart, a tab that comes back starts from app.py)

POINTS_KEY = "alloc_points"
OFFSETS_KEY = "_alloc_offsets"  # per-matrix offsets the curve keeps: {"model", "origin", "offsets"} or None
HISTORY_KEY, SEEN_KEY = "_alloc_history", "_alloc_seen"  # Undo: earlier {"points", "offsets"}, and the current one
UNDO_DEPTH = 50
Y_MAX = MAX_RATIO  # highest sparsity a control point may take on the chart: any ratio an allocation may have

st.title("Allocation")
st.caption("How much to prune each block: drag the red curve, or load a preset and adjust it. "
           "The budget is the parameter-weighted mean sparsity over all prunable matrices.")
loaded = require_model()
DEFAULT = AllocationSettings()
DEFAULT_SEARCH = AllocationSettings(method="auto")
fit = st.session_state.get("spectra_fit", SpectraSettings.fit)
st.caption(f"The α-guided presets and the search use the spectra fitted with the xmin rule **{fit}** (chosen on the "
           "Spectra page).")
job = spectra_job(loaded, fit)
wait_for(job, "Computing spectra")
metrics = job.result.metrics
n_blocks = int(metrics.loc[metrics["prunable"], "block"].max()) + 1
params = block_table(metrics)["params"].tolist()


def keep_offsets(offsets: dict[str, float], origin: str) -> None:
    """The curve now comes from `origin`: keep its matrices' offsets from their block's ratio (none: drop them)."""
    st.session_state[OFFSETS_KEY] = {"model": loaded.info.source, "origin": origin, "offsets": offsets} \
        if offsets else None


c1, c2, c3 = st.columns(3)
TARGETS = [round(0.05 * i, 2) for i in range(1, 19)]  # the slider's values
if (next_target := st.session_state.pop("_alloc_target_next", None)) is not None:  # set by an upload
    st.session_state["alloc_target"] = next_target
target = c1.slider("Target sparsity", TARGETS[0], TARGETS[-1], DEFAULT.sparsity, 0.05, key="alloc_target")
epsilon = c2.slider("ε (AlphaPruning / FARMS spread)", 0.0, 0.9, DEFAULT.epsilon, 0.05, key="alloc_epsilon",
                    help="Ratios start in [S(1-ε), S(1+ε)] before rescaling to the budget. Find allocation "
                         "also starts from AlphaPruning and FARMS at this ε.")
if (next_mode := st.session_state.pop("_alloc_mode_next", None)) is not None:  # set by an upload
    st.session_state["alloc_mode"] = next_mode
mode = c3.radio("Apply the curve", ["normalized to target", "as drawn"], key="alloc_mode",
                help="normalized: the curve's shape, scaled so the budget equals the target; "
                     "as drawn: exactly the drawn values (the budget is whatever they imply).")

# ---- presets (FARMS and OWL need extra background work; they appear when ready) ----
presets: dict[str, Allocation] = {
    "uniform": allocate(metrics, target, "uniform", model=loaded.info.source),
    "alphapruning": allocate(metrics, target, "alphapruning", epsilon=epsilon, metric=DEFAULT.metric,
                             granularity=DEFAULT.granularity, model=loaded.info.source),
}
more = st.checkbox("Also FARMS and OWL presets", key="alloc_more",
                   help="FARMS needs a second spectra pass; OWL a calibration pass over the model, with the "
                        "calibration settings of the Prune page. Both run in the background (shared by all "
                        "sessions) and appear here when ready.")
if more:
    owl_lambda = st.slider("OWL λ (spread of the OWL ratios)", 0.0, 0.3, DEFAULT.owl_lambda, 0.01,
                           key="alloc_owl_lambda",
                           help="OWL's ratios lie in [S-λ, S+λ] before rescaling to the budget: blocks with more "
                                "outlier activations are pruned less. The OWL paper uses 0.02 to 0.1.")
    calibration, evaluation = prune_data_settings()  # the OWL preset is what an OWL run there applies
    farms_job = spectra_job(loaded, fit, farms=True)
    owl = owl_job(loaded, calibration, evaluation.source, DEFAULT.owl_threshold) if loaded.tokenizer else None
    running = {}  # name -> job still computing
    if farms_job.status == DONE:
        presets["farms"] = allocate(farms_job.result.metrics, target, "farms", epsilon=epsilon, metric=DEFAULT.metric,
                                    granularity=DEFAULT.granularity, model=loaded.info.source)
    elif farms_job.done:
        st.error(f"FARMS: {farms_job.error}")
    else:
        running["FARMS spectra"] = farms_job
    if owl is None:
        st.caption(NO_TOKENIZER_NOTE)  # no OWL preset: nothing is pending
    elif owl.status == DONE:
        presets["owl"] = allocate(metrics, target, "owl", outlier_ratios=owl.result, owl_lambda=owl_lambda,
                                  model=loaded.info.source)
    elif owl.done:
        st.error(f"OWL: {owl.error}")
    else:
        running["OWL outlier ratios"] = owl
    if running:
        @st.fragment(run_every=1.0)
        def background() -> None:
            """Their progress, every second; the page runs again when one is done, and its preset appears."""
            if any(job.done for job in running.values()):
                st.rerun()
            st.caption("Computing in the background: "
                       + ", ".join(f"{name} {job.progress[1]:.0%}" for name, job in running.items()))

        background()

with st.expander("Preset ratios per block (table)"):
    st.dataframe(pd.DataFrame({"block": range(n_blocks), "params": params,
                               **{name: a.per_block for name, a in presets.items()}}),
                 hide_index=True, key="alloc_preset_table")

# ---- Find allocation: the search (analysis.search) on a private copy, in the background ----
SEARCH_KEY = "alloc_search_job"  # kept for a reload of the tab (keep_job): the search goes on meanwhile
if (_old := st.session_state.get(SEARCH_KEY)) is not None and _old.tag != model_key():
    _old.cancel()  # a search of the model this session had before: of no use to this one
    del st.session_state[SEARCH_KEY]


def _search_curve(job: Job) -> tuple[str, list[float]] | None:
    """(label, per-block ratios) of the search's curve: its result once there is one (a real prune can reject
    the last improvement the search reported), else its best so far; None before its first."""
    if job.result is not None:
        return "search: result", job.result.per_block
    best = job.latest()
    return ("search: best so far", best["per_block"]) if best else None


with st.expander("Find allocation (search)", expanded=SEARCH_KEY in st.session_state):
    st.caption("An evolutionary search over per-block sparsity at the target budget (in the spirit of EvoPress, "
               "Sieberling et al. 2024): it starts from the best of uniform, OWL, AlphaPruning and FARMS "
               "(ε 0.1/0.2/0.3) (or from your curve), then moves sparsity between blocks, keeping the budget "
               "exact, scored on the calibration text of the Prune page (or on a held-out text you name, e.g. "
               "wikitext2:valid; never the evaluation text): by the pruned model's loss, or by its KL divergence "
               "from the dense model. It runs on a private copy of the model; minutes on a CPU.")
    f1, f2, f3, f4, f5 = st.columns(5)
    search_pruner = f1.selectbox("Pruner", list(PRUNERS), key="alloc_search_pruner")
    search_steps = f2.number_input("Generations", 1, 500, DEFAULT.search_steps, key="alloc_search_steps")
    search_step = f3.number_input("Step", 0.005, SEARCH_STEP_MAX, DEFAULT.search_step, 0.005, format="%.3f",
                                  key="alloc_search_step",
                                  help="Sparsity one mutation moves from a block to another: larger steps "
                                       "reshape the curve faster, smaller ones refine it.")
    search_seed = f4.number_input("Seed", 0, 10_000, DEFAULT.search_seed, key="alloc_search_seed")
    search_objective = f5.selectbox("Fitness", SEARCH_OBJECTIVES, key="alloc_search_objective",
                                    index=SEARCH_OBJECTIVES.index(DEFAULT.search_objective),
                                    format_func=OBJECTIVE_LABELS.get)
    search_text = st.text_input("Score on (held-out text)", key="alloc_search_text",
                                placeholder="the calibration text",
                                help="A text source as on the Prune page (wikitext2:valid, a .txt path, "
                                     "hf:<dataset>[:<config>]:<split>): the search is scored on it instead of on the "
                                     "calibration sample the pruner uses. Never the evaluation text.").strip()
    search_samples = st.number_input("Held-out windows", 1, 4096, DEFAULT.search_samples, key="alloc_search_samples",
                                     placeholder="default", disabled=not search_text,
                                     help="How many windows of the held-out text the search scores on (empty: 4x "
                                          "the calibration samples when it prunes for real, else as many). Its real "
                                          "prunes are scored on all of them: more text tells a real improvement from "
                                          "noise better, and makes each real prune's scoring slower.")
    h1, h2 = st.columns(2)
    then_steps = h1.number_input("Then: more generations", 0, 500, DEFAULT.search_then_steps,
                                 key="alloc_search_then_steps", disabled=not search_text,
                                 help="A second stage that goes on from the search's result for this many "
                                      "generations, its real prunes scored on more of the held-out text (so it "
                                      "needs one; EvoPress's selection on more "
                                      "tokens as the search narrows): on both packaged models at SparseGPT 70%, 40 "
                                      "more generations on twice the held-out windows, after the search with "
                                      "\"Every improvement\", gave the best allocations measured (README, "
                                      "\"Allocation search\").")
    then_samples = h2.number_input("Then: held-out windows", 1, 8192, DEFAULT.search_then_samples,
                                   key="alloc_search_then_samples", placeholder="default",
                                   disabled=not (search_text and then_steps),
                                   help="How many windows of the held-out text the second stage scores on (empty: "
                                        "twice the first stage's).")
    suggested = None if search_text else DEFAULT_SEARCH.suggested_search_text(prune_data_settings()[1].source)
    if suggested is not None:
        st.button(f"Score on {suggested}", key="alloc_search_text_suggest", on_click=st.session_state.__setitem__,
                  args=("alloc_search_text", suggested),
                  help="The held-out split of the Prune page's evaluation text: scored on the domain it is judged "
                       "on, the search did better than on the calibration text in most measured cells (README, "
                       "\"Allocation search\"). It never sees the evaluation text itself.")
    search_verify = st.selectbox("Prune for real", VERIFY_MODES, key="alloc_search_verify",
                                 index=VERIFY_MODES.index(DEFAULT.search_verify), format_func=VERIFY_LABELS.get,
                                 help="What the search prunes for real (one full prune each) instead of trusting its "
                                      "fast proxy. The starts and the result: the best start after a real prune is "
                                      "where the search goes on from, and its result is kept only if a real prune "
                                      "confirms it beats that start (a few prunes more). Every improvement: also each "
                                      "candidate the search confirms, keeping only real improvements: slower (4-6x), "
                                      "every step measured on the real pruned model. Worth it with SparseGPT at high "
                                      "sparsity, where the fast search can pick a worse curve.")
    search_space = st.selectbox("Search space", SEARCH_SPACES, key="alloc_search_space",
                                index=SEARCH_SPACES.index(DEFAULT.search_space), format_func=SPACE_LABELS.get,
                                help="Per block: every matrix of a block gets the block's sparsity. Per block and "
                                     "matrix kind: also one offset per kind of matrix (k_proj, down_proj, ...), the "
                                     "same in every block, each block keeping its sparsity, so the search can prune "
                                     "e.g. the key/value projections less everywhere. The curve shows per-block "
                                     "sparsities; \"Use this curve\" keeps the offsets, and the search's JSON "
                                     "has them.")
    mine = st.session_state.get("alloc_custom")  # the applied curve, as of the last run of this page
    mine = mine if mine is not None and mine.model == loaded.info.source else None  # not another model's
    from_mine = st.checkbox("Start from your curve", key="alloc_search_from_mine", disabled=mine is None,
                            help="Refine the curve below (as applied) instead of starting from the presets; the "
                                 "search keeps its budget" + (f" ({mine.achieved:.1%})." if mine else "."))
    search: Job | None = st.session_state.get(SEARCH_KEY)
    g1, g2 = st.columns(2)
    if loaded.tokenizer is None:
        st.caption(NO_TOKENIZER_NOTE)
    if g1.button("Find allocation", key="alloc_search_run",
                 disabled=loaded.tokenizer is None or (search is not None and not search.done)):
        cal, evaluation = prune_data_settings()
        ev = evaluation.source
        cfg = AllocationSettings(method="auto", sparsity=float(target), epsilon=float(epsilon),
                                 search_steps=int(search_steps),
                                 search_step=float(search_step), search_space=search_space,
                                 search_seed=int(search_seed), search_objective=search_objective, fit=fit,
                                 search_text=search_text or None, search_verify=search_verify,
                                 search_samples=int(search_samples) if search_text and search_samples else None,
                                 search_then_steps=int(then_steps) if search_text else 0,
                                 search_then_samples=int(then_samples) if search_text and then_steps and then_samples
                                 else None)
        shared, tok, info, start = loaded.model, loaded.tokenizer, loaded.info, mine if from_mine else None
        # the presets' FARMS spectra and OWL ratios, measured with the same fit, calibration and threshold
        known_farms = farms_job.result.metrics if more and farms_job.status == DONE else None
        known_owl = owl.result if more and owl.status == DONE else None
        work = session_work()
        try:
            cfg.check()
            cfg.check_search_text(ev)
        except SettingsError as e:
            st.error(str(e))
        else:
            if work.leased:  # the search copies the dense shared model, which waits for this session's restore
                st.error("Your weights are the shared model, pruned in place: the search starts from the dense "
                         "model, so restore it first (Prune page, Restore dense).")
            else:
                connected = tab_connected()  # a reload of the tab does not end the search
                search = keep_job(SEARCH_KEY, Job(
                    lambda j: search_job(j, shared, work.gate, f"{work.owner}'s allocation search", tok,
                                         info.bos_per_window, cfg, search_pruner, cal, ev, info.source, metrics,
                                         start, known_farms, known_owl, connected),
                    name="allocation-search", tag=model_key()).start())
    if search is not None and not search.done and not search.cancelled and g2.button("Cancel the search",
                                                                                     key="alloc_search_cancel"):
        search.cancel()
        st.rerun()  # without the button: the search says it is cancelling until it stops

    @st.fragment(run_every=1.0)
    def _search_status() -> None:
        job: Job | None = st.session_state.get(SEARCH_KEY)
        if job is None:
            return
        best = job.latest()
        msg, frac = job.progress
        if job.status == ERROR:
            st.error(f"The search failed: {job.error}")
        elif not job.done:
            # a cancel is seen between the search's steps, and a step (a real prune) can take a while
            pending = "Cancelling at the end of this step (the best so far stays): " if job.cancelled else ""
            st.progress(frac, text=f"{pending}{msg} ({job.elapsed:.0f} s)")
        else:
            st.caption(f"Search {job.status} after {job.elapsed:.0f} s.")
            if job.result is not None:  # also a cancelled search's best so far
                st.code("\n".join(describe(job.result.params)), language=None)
                st.download_button("Download the search's allocation (JSON)",
                                   json.dumps(job.result.to_dict(), indent=2).encode(), file_name="search.json",
                                   mime="application/json", key="alloc_search_download",
                                   help="Every matrix's sparsity as found (with kind offsets too), for "
                                        "`--allocation search.json` on the command line.")
        if best:
            st.metric(f"Best {OBJECTIVE_LABELS[best['objective']]} {'found' if job.done else 'so far'}",
                      f"{best['fitness']:.4f} nats/token",
                      help=f"found at generation {best['step']}. A second stage scores on its own, larger set of "
                           "held-out windows, so the figure can rise when it begins.")
            mine = st.session_state.get("alloc_custom")
            curves = [_search_curve(job)] + ([("your curve", mine.per_block)] if mine else [])
            st.plotly_chart(curves_figure(curves), key="alloc_search_curves")
        if job.done and st.session_state.get("_alloc_search_shown") is not job:
            st.session_state["_alloc_search_shown"] = job
            st.rerun()  # once, so the curve editor shows the final overlay

    _search_status()
    if search is not None and _search_curve(search) and (search.done or search.cancelled):
        if st.button("Use this curve", key="alloc_search_use",
                     help="Take the search's per-block ratios as the control points (one per block), and its kind "
                          "offsets, if it searched them, as each matrix's offset from its block's ratio; the Prune "
                          "page's allocation becomes this curve."):
            st.session_state[POINTS_KEY] = clamp_points(control_points(_search_curve(search)[1]), Y_MAX)[0]
            keep_offsets(block_offsets(search.result, metrics) if search.result is not None else {}, "the search")
            st.session_state["prune_alloc"] = CUSTOM_ON_PRUNE  # what the user took it for
            st.rerun()

p1, p2, p3 = st.columns([2, 1, 1])
preset = p1.selectbox("Preset", list(presets), index=list(presets).index("alphapruning"), key="alloc_preset")
k = p2.number_input("Control points", 2, max(2, n_blocks), min(7, n_blocks), key="alloc_preset_points")
for warning in presets[preset].warnings:  # e.g. a failed fit's α replaced by the mean, ratios at the cap
    st.warning(f"{preset}: {warning}")
if p3.button("Load preset as the curve", key="alloc_load_preset",
             help="Its per-block ratios at that many control points, spread over depth, and each matrix's offset from "
                  "its block's ratio. Between the points the curve is straight, so with fewer points than blocks the "
                  "curve as drawn implies a budget near the preset's, not equal: \"normalized to target\" restores "
                  "it."):
    st.session_state[POINTS_KEY] = clamp_points(control_points(presets[preset].per_block, int(k)), Y_MAX)[0]
    keep_offsets(block_offsets(presets[preset], metrics), f"the {preset} preset")

# ---- the curve: apply a pending drag first, then the numeric table, then draw ----
points = curve_points(POINTS_KEY, [[0.0, target], [0.5, target], [1.0, target]], Y_MAX)
chart_box = st.container()
st.markdown("**Control points** (numeric editing; add or delete rows)")
table = pd.DataFrame(points, columns=["depth", "sparsity"])
editor_key = "alloc_table_" + hashlib.sha1(json.dumps(points).encode()).hexdigest()[:10]
edited = st.data_editor(
    table, key=editor_key, num_rows="dynamic", hide_index=True,
    # no min/max in the columns: the grid would drop a value typed outside them (1.3) or its minus sign (-0.5 as
    # 0.5) without a word; clamp_points below clamps such values and says so
    # step sets the precision the grid keeps (0.01 cut 0.6789 to 0.67) and shows: a block sits at depth b / (n - 1)
    column_config={
        "depth": st.column_config.NumberColumn("depth (0 = first block, 1 = last)", step=0.0001, format="%.4f"),
        "sparsity": st.column_config.NumberColumn("sparsity", step=0.0001, format="%.4f"),
    },
)
new_points, clamped = clamp_points(edited.to_numpy().tolist(), Y_MAX)
if new_points != points and len(new_points) >= 2:
    st.session_state[POINTS_KEY] = points = new_points
    edits = st.session_state.get(editor_key) or {}
    if any(edits.get(k) for k in ("edited_rows", "added_rows", "deleted_rows")):
        # said while the curve is the clamped one: the curve editor's own rerun would drop a one-time flag
        st.session_state["_alloc_table_clamped"] = new_points if clamped else None
        st.rerun()  # the table under its new key now: the next edit, made on this one, would be dropped
elif new_points != points:
    st.warning("Keep at least two control points.")
if clamped or st.session_state.get("_alloc_table_clamped") == points:
    st.info(f"Values outside depth 0–1 or sparsity 0–{Y_MAX:g} were clamped.")

kept = st.session_state.get(OFFSETS_KEY)
offsets = kept["offsets"] if kept and kept["model"] == loaded.info.source else None
if offsets:
    o1, o2 = st.columns([4, 1])
    o1.info(f"The matrices of each block keep their offsets from {kept['origin']} (up to "
            f"{within_block_spread(offsets, metrics):.1%} apart in a block): each matrix is its block's value on the "
            "curve plus its offset. Offsets from a preset, a file or the search average to zero in each block, so the "
            "curve stays each block's mean; offsets you edit need not, and then move the block (the budget "
            "follows: see \"Budget as drawn\").")
    if o2.button("Drop the offsets", key="alloc_drop_offsets",
                 help="One sparsity for every matrix of a block: the curve's."):
        st.session_state[OFFSETS_KEY] = None
        st.rerun()
# every change of the curve (a drag, the table, a preset, a file, the search's curve, offsets) can be taken back
now = copy.deepcopy({"points": points, "offsets": kept})
if (seen := st.session_state.get(SEEN_KEY)) is not None and seen != now:
    history = st.session_state.setdefault(HISTORY_KEY, [])
    history.append(seen)
    del history[:-UNDO_DEPTH]
st.session_state[SEEN_KEY] = now


def _undo() -> None:
    last = st.session_state[HISTORY_KEY].pop()
    st.session_state[POINTS_KEY], st.session_state[OFFSETS_KEY] = copy.deepcopy(last["points"]), last["offsets"]
    st.session_state[SEEN_KEY] = last  # not a change to remember


try:
    drawn = custom_allocation(points, metrics, sparsity=None, normalize=False, model=loaded.info.source,
                              offsets=offsets)
    normalized = custom_allocation(points, metrics, sparsity=target, normalize=True, model=loaded.info.source,
                                   offsets=offsets)
except AllocationError as e:
    st.error(str(e))
    st.stop()
applied = drawn if mode == "as drawn" else normalized
st.session_state["alloc_custom"] = applied  # the Prune page offers it as "custom"

with chart_box:
    overlays = [allocation_overlay(a.per_block, name, METHOD_COLORS.get(name)) for name, a in presets.items()]
    if (found := st.session_state.get(SEARCH_KEY)) is not None and (curve := _search_curve(found)):
        overlays.append(allocation_overlay(curve[1], curve[0], "#2ca02c", "dash"))
    overlays.append({**allocation_overlay(applied.per_block, f"applied ({mode})", "#d62728", "solid"),
                     "mode": "markers", "opacity": 0.5})
    curve_editor(points, overlays, key=POINTS_KEY, y_max=Y_MAX, height=380)
    undo_left = len(st.session_state.get(HISTORY_KEY, []))
    st.button("Undo", key="alloc_undo", on_click=_undo, disabled=not undo_left,
              help=f"Take back the last change of the curve or its offsets ({undo_left} to take back, up to "
                   f"{UNDO_DEPTH}); the target and the mode are the controls above.")
    b1, b2, b3 = st.columns(3)
    b1.metric("Budget as drawn", f"{drawn.achieved:.1%}",
              help="Parameter-weighted mean sparsity of the curve as drawn.")
    off = round(applied.achieved - target, 4) + 0.0  # no "-0.0%" from float noise (+ 0.0 turns -0.0 into 0.0)
    b2.metric("Applied budget", f"{applied.achieved:.1%}", delta=f"{off:+.1%} vs target", delta_color="off",
              delta_arrow="off" if abs(off) < 0.0005 else "auto")  # no arrow for what reads "+0.0%"
    b3.metric("Weights removed", f"{applied.achieved * sum(params) / 1e6:.1f} M of {sum(params) / 1e6:.1f} M")
    st.markdown(f"Budget as drawn: **{drawn.achieved:.1%}** of prunable weights · applied ({mode}): "
                f"**{applied.achieved:.1%}** · target {target:.0%}")
    for w in applied.warnings:
        st.warning(w)


def _edit_offsets(edited: dict[str, float]) -> None:
    """The user changed the per-matrix offsets: keep them, saying where the ones they edited came from."""
    before = st.session_state.get(OFFSETS_KEY)
    origin = before["origin"] if before and before["model"] == loaded.info.source else "your edits"
    if origin != "your edits" and not origin.endswith(", edited"):
        origin += ", edited"
    keep_offsets({n: v for n, v in edited.items() if abs(v) > 1e-12}, origin)


with st.expander("Per-matrix sparsity (offsets from the curve)", expanded=bool(offsets)):
    st.caption("Each matrix's sparsity is its block's value on the curve plus its offset. Set the offset of every "
               "matrix of a kind at once (e.g. prune the key/value projections less everywhere), or of one matrix "
               "alone; an offset that does not average out in its block moves the block's mean and the budget "
               "(\"normalized to target\" rescales back to the target). The table shows the applied ratios (with "
               "\"normalized to target\", after rescaling).")
    current = offsets or {}
    tag = hashlib.sha1(json.dumps(current, sort_keys=True).encode()).hexdigest()[:10]  # fresh inputs on a change
    means = kind_offsets(current, metrics)
    cols = st.columns(max(1, min(len(means), 7)))
    for i, (kind, mean) in enumerate(means.items()):
        key = f"alloc_kind_{kind}_{tag}"
        cols[i % len(cols)].number_input(
            kind, -MAX_RATIO, MAX_RATIO, round(mean, 4), 0.01, format="%.3f", key=key,
            help=f"Mean offset of the {kind} matrices: a change moves every one of them by the same amount.",
            on_change=lambda kind=kind, key=key: _edit_offsets(
                set_kind_offset(current, metrics, kind, float(st.session_state[key]))))
    rows = metrics.loc[metrics["prunable"]]
    m1, m2 = st.columns([3, 1])
    name = m1.selectbox("Matrix", rows["name"].tolist(), key="alloc_matrix_pick")
    key = f"alloc_matrix_offset_{tag}_{name}"
    m2.number_input("Its offset", -MAX_RATIO, MAX_RATIO, round(float(current.get(name, 0.0)), 4), 0.01, format="%.3f",
                    key=key,
                    on_change=lambda name=name, key=key: _edit_offsets({**current, name: float(st.session_state[key])}))
    st.dataframe(pd.DataFrame({"block": rows["block"], "kind": rows["kind"], "matrix": rows["name"],
                               "params": rows["params"], "offset": rows["name"].map(current).fillna(0.0),
                               "applied": rows["name"].map(applied.per_layer)}),
                 hide_index=True, key="alloc_matrix_table")

st.subheader("Applied sparsity per block")
st.plotly_chart(block_bars_figure(applied.per_block, params, target), key="alloc_bars")

st.subheader("Save / load")
s1, s2 = st.columns(2)
s1.download_button("Download allocation (JSON)", json.dumps(applied.to_dict(), indent=2).encode(),
                   file_name="allocation.json", mime="application/json", key="alloc_download")
up = s2.file_uploader("Load an allocation JSON", type=["json"], key="alloc_upload", max_upload_size=MAX_UPLOAD_MB)
for note in st.session_state.pop("_alloc_upload_notes", []):  # from the upload before the rerun below
    s2.info(note)
if up is not None and st.session_state.get("_alloc_upload_id") != up.file_id:
    st.session_state["_alloc_upload_id"] = up.file_id
    try:
        pts, offsets, notes, saved_target = curve_of(Allocation.from_dict(json.loads(up.getvalue())), metrics,
                                                     TARGETS)
    except json.JSONDecodeError as e:
        st.error(f"Could not load {up.name}: not valid JSON ({e.msg} at line {e.lineno})")
    except UnicodeDecodeError:
        st.error(f"Could not load {up.name}: not an allocation JSON (not UTF-8 text)")
    except (AllocationError, ValueError) as e:
        st.error(f"Could not load {up.name}: {e}")
    else:
        st.session_state[POINTS_KEY], clamped = clamp_points(pts, Y_MAX)
        as_loaded = custom_allocation(st.session_state[POINTS_KEY], metrics, normalize=False, offsets=offsets).achieved
        if saved_target is not None:  # saved normalized: it comes back normalized to its own target
            st.session_state["_alloc_mode_next"], st.session_state["_alloc_target_next"] = \
                "normalized to target", saved_target
            if abs(saved_target - target) > 1e-9:
                notes = notes + [f"The target is now {saved_target:.0%}, the one {up.name} was normalized to."]
        elif mode != "as drawn" and abs(as_loaded - target) > 0.0005:
            st.session_state["_alloc_mode_next"] = "as drawn"  # as loaded, not rescaled to the target
            notes = notes + [f"{up.name} prunes {as_loaded:.1%} of this model's weights and the target here is "
                             f"{target:.0%}: the curve is now applied as drawn, as loaded (choose \"normalized to "
                             "target\" to rescale it to the target)."]
        st.session_state["_alloc_upload_notes"] = notes + ([f"Sparsities above {Y_MAX:g} were lowered to the "
                                                             "chart's top."] if clamped else [])
        keep_offsets(offsets, up.name)
        st.rerun()

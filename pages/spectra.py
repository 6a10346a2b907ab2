"""Spectra page: ESD of every weight matrix, alpha across depth, block x kind heatmap, metrics table."""
import hashlib
import io
import math
import re
from contextlib import nullcontext

import streamlit as st

from analysis.layers import find_layers
from analysis.powerlaw import XMIN_RULES
from analysis.settings import SpectraSettings
from analysis.spectra import ALPHA_BANDS, alpha_summary, mp_curve, shuffled_esd
from components.figures import alpha_depth_figure, esd_figure, heatmap_figure
from components.state import (
    require_model,
    session_spectra_job,
    session_work,
    spectra_job,
    through_app,
    wait_for,
    weights_zero_fraction,
)

through_app(__file__)  # (after a server restart, a tab that comes back starts from app.py)

METRICS = ["alpha", "alpha_hat", "stable_rank", "log_norm", "spectral_entropy", "lambda_max", "ks_distance", "n_tail",
           "alpha_stderr", "beyond_mp"]
LAYER_KEY = "spectra_layer"
OVERLAY_KEY = "spectra_overlay"

st.title("Spectra")
loaded = require_model()
work = session_work()

LOW, HIGH = ALPHA_BANDS
with st.expander("How to read α (the power-law exponent of the ESD tail)", expanded=False):
    st.markdown(
        "- The **ESD** is the histogram of the eigenvalues of WᵀW (squared singular values). Training "
        "makes its tail heavy: p(λ) ∝ λ^-α for λ ≥ xmin.\n"
        f"- **α ≈ {LOW:g}–{HIGH:g}**: typical of a well-trained layer.\n"
        f"- **α < {LOW:g}**: very heavy tail, a sign of over-fitting / over-training of that layer.\n"
        f"- **α > {HIGH:g}**: the spectrum is close to a random matrix's (Marchenko–Pastur): the layer is "
        "under-trained and carries little learned structure.\n"
        "- AlphaPruning (Lu et al., NeurIPS 2024) uses this: layers with larger α are pruned more.\n"
        "- Read α only where the layer has a tail: eigenvalues beyond the Marchenko–Pastur edge (`beyond_mp` in the "
        "table; a random matrix has none), and more than a few of them in the fit (`alpha_stderr` = (α−1)/√n_tail "
        "well below 1). A fit to a handful of eigenvalues can have a small KS distance and still say little.\n"
        "- The bands are HT-SR's rule of thumb, and where a layer falls depends on the xmin rule: compare the counts "
        "below under peak, median and scan before reading a layer as over- or under-trained."
    )

c1, c2, c3 = st.columns([1, 1, 2])
fit = c1.selectbox("xmin rule", XMIN_RULES, key="spectra_fit",
                   help="peak: the tail starts near the histogram peak (AlphaPruning's rule, the default here); "
                        "median: at the median eigenvalue; scan: the smallest KS distance over every xmin that keeps "
                        "at least 'Smallest tail' eigenvalues in the tail.")
# weightwatcher's default fit keeps 2; a larger floor keeps a few top eigenvalues from making a huge, noisy α
DEFAULT_TAIL = SpectraSettings.min_tail
min_tail = c1.number_input("Smallest tail", min_value=2, max_value=10_000, value=DEFAULT_TAIL, step=1,
                           key="spectra_min_tail", disabled=fit != "scan",
                           help=f"scan only: the fewest eigenvalues its tail may keep (default {DEFAULT_TAIL}; 2 is "
                                "weightwatcher's default fit; `--min-tail` on the command line).")
min_tail = int(min_tail) if fit == "scan" else DEFAULT_TAIL
farms = c2.checkbox("FARMS", key="spectra_farms",
                    help="Fit the pooled ESD of square sub-windows, against the aspect-ratio bias of α (shown with the "
                         "median rule: README, FARMS; a Gaussian matrix has no tail, and with peak or scan its α is "
                         "noise either way). Slower: one "
                         "eigensolve per window (about 2 x long/short side of a matrix) instead of one per matrix, "
                         "e.g. minutes for Gemma-3-270m on a 2-core CPU; the norm metrics stay the whole matrix's.")
sources = ["shared dense model"] + (["my pruned copy"] if work.pruned else [])
which = c3.radio("Weights", sources, horizontal=True, key="spectra_weights")
if which == "my pruned copy" and work.pruned:
    job, model = session_spectra_job(work, fit, farms, min_tail), work.model
    st.caption(f"Your pruned copy: {work.label}. Other sessions still see the dense model.")
else:
    job, model = spectra_job(loaded, fit, farms, min_tail), loaded.model
wait_for(job, "Computing spectra")
res = job.result
metrics = res.table()  # with beyond_mp, alpha_stderr and the settings
charted = metrics.astype({"beyond_mp": "float64"})  # (a count that is NaN where the fit failed)
zero = weights_zero_fraction(model, work.version if model is work.model else 0)
unfitted = metrics.loc[metrics["prunable"] & (metrics["status"] != "ok"), "status"].value_counts()
st.caption(f"{len(metrics)} matrices ({int(metrics['prunable'].sum())} prunable: the α counts below are of those "
           "fitted" + "".join(f"; {n} not fitted: {status}" for status, n in unfitted.items()) + ") · "
           f"{zero:.2%} of the prunable weights analyzed here are zero"
           + (f" (the packaged {loaded.info.quantization.split(' (')[0]} rounds small weights to 0)"
              if zero and loaded.info.quantization and model is not work.model else "") + " · "
           f"fit '{res.fit}'{' · FARMS' if res.farms else ''}")

summary = alpha_summary(metrics)
m1, m2, m3, m4, m5 = st.columns(5)
m1.metric("Mean α (prunable)", f"{summary['mean_alpha']:.2f}" if summary["fitted"] else "n/a")
m2.metric(f"α < {LOW:g} (over-trained)", summary["below"])
m3.metric(f"{LOW:g} ≤ α ≤ {HIGH:g}", summary["inside"])
m4.metric(f"α > {HIGH:g} (under-trained)", summary["above"])
m5.metric("With a tail beyond MP", f"{summary['with_tail']} of {summary['fitted']}",
          help="Matrices with eigenvalues beyond the Marchenko–Pastur edge of a random matrix of the same shape and "
               "mean eigenvalue. Only there does α read a learned tail: a randomly initialised layer has none, "
               "yet a fit to its bulk can still land in the 'well trained' band (see the Learn page).")


def _npz() -> bytes:
    buf = io.BytesIO()
    res.save_esds(buf)
    return buf.getvalue()


names = metrics["name"].tolist()
if st.session_state.get(LAYER_KEY) not in names:
    st.session_state[LAYER_KEY] = names[0]


def _pick_layer(chart_key: str) -> None:
    """Chart click -> selected layer (the point's customdata is the module name)."""
    event = st.session_state.get(chart_key)
    points = (event or {}).get("selection", {}).get("points", []) if isinstance(event, dict) else \
        getattr(getattr(event, "selection", None), "points", [])
    for p in points:
        name = p.get("customdata")
        name = name[0] if isinstance(name, list) else name
        if name in names:
            st.session_state[LAYER_KEY] = name
            return


# the charts are new widgets for each chosen layer: a chart keeps its clicked point selected, and a click on it
# after another layer was picked from the list would only unselect it (a second click was needed)
tag = hashlib.sha1(st.session_state[LAYER_KEY].encode()).hexdigest()[:8]
depth_key, heat_key = f"spectra_depth_chart_{tag}", f"spectra_heatmap_{tag}"
left, right = st.columns([3, 2])
with left:
    st.subheader("Across depth")
    depth_metric = st.selectbox("Metric", METRICS, key="spectra_depth_metric")
    with st.container(key="spectra_depth_chart"):
        st.plotly_chart(alpha_depth_figure(charted, depth_metric), key=depth_key,
                        on_select=lambda: _pick_layer(depth_key), selection_mode="points")
    st.caption("Click a point to open that layer's ESD.")
    heat_metric = st.selectbox("Heatmap metric", METRICS, key="spectra_heat_metric")
    with st.container(key="spectra_heatmap"):
        st.plotly_chart(heatmap_figure(charted, heat_metric), key=heat_key,
                        on_select=lambda: _pick_layer(heat_key), selection_mode="points")
    if heat_metric == "alpha":
        st.caption(f"Colours by HT-SR's reading: green to yellow {LOW:g}–{HIGH:g} (well trained, greener = heavier "
                   f"tail), purple below {LOW:g} (over-trained), orange to red above {HIGH:g} (close to random).")
with right:
    st.subheader("One layer")
    name = st.selectbox("Layer", names, key=LAYER_KEY)
    row = metrics.set_index("name").loc[name]
    log = st.toggle("Log-log", value=True, key="spectra_log")
    t2, t3 = st.columns(2)  # two to a row: three truncated their labels in this column
    show_mp = t2.checkbox("Marchenko–Pastur", key="spectra_mp")
    show_rand = t3.checkbox("Randomized", key="spectra_rand",
                            help="ESD of the same matrix with its entries shuffled: no learned structure left.")
    eigs = res.esds[name]
    mp = rand = None
    if show_mp:
        mp = mp_curve(eigs, res.mp_ratio(row["rows"], row["cols"]), log=log)
    dense_read = which != "my pruned copy"  # the shared weights: read through the gate, never while pruned in place
    if show_rand:
        with work.gate.reading(work.owner, blocking=False) if dense_read else nullcontext(True) as readable:
            if readable:
                ref = next(r for r in find_layers(model, include_outside=True) if r.name == name)
                rand = shuffled_esd(ref, res.farms, res.normalize)
        if not readable:
            who = f"{work.gate.holder} has" if work.gate.holder else "a session is about to have"
            st.caption(f"The randomized ESD reads the shared dense weights, which {who} pruned in place right now: "
                       "it is drawn once they are restored.")
    # another layer's ESD over this one, or this layer's in the other weights (what pruning did to it)
    counterpart = ("this layer, dense" if model is work.model else "this layer, my pruned copy") if work.pruned \
        else None
    choices = ["none", *([counterpart] if counterpart else []), *(n for n in names if n != name)]
    if st.session_state.get(OVERLAY_KEY) not in choices:
        st.session_state[OVERLAY_KEY] = "none"
    versus = st.selectbox("Overlay", choices, key=OVERLAY_KEY,
                          help="Draw another ESD over this one: another layer's, or, once you have pruned, this "
                               "layer's in the other weights (dense or your pruned copy), to see what pruning did.")
    overlay = None
    if versus == counterpart:
        other = spectra_job(loaded, fit, farms, min_tail) if model is work.model else \
            session_spectra_job(work, fit, farms, min_tail)
        wait_for(other, f"Computing the spectra of {counterpart.removeprefix('this layer, ')}")
        overlay = (counterpart.removeprefix("this layer, "), other.result.esds[name])
    elif versus != "none":
        overlay = (versus, res.esds[versus])
    alpha = float(row["alpha"]) if math.isfinite(row["alpha"]) else None
    st.plotly_chart(esd_figure(eigs, alpha, float(row["xmin"]), log=log, mp=mp, randomized=rand, overlay=overlay,
                               title=f"{name} ({row['rows']} x {row['cols']})"), key="spectra_esd")
    fitted = row["status"] == "ok"
    st.markdown(
        f"α = **{row['alpha']:.2f}**{f' ± {row.alpha_stderr:.2f}' if fitted else ''} · xmin = {row['xmin']:.3g} · "
        f"tail {int(row['n_tail'])} eigenvalues{f' ({row.beyond_mp} beyond the MP edge)' if fitted else ''} · "
        f"KS = {row['ks_distance']:.3f} · λmax = {row['lambda_max']:.3g} · stable rank = "
        f"{row['stable_rank']:.1f} · status: {row['status']}"
    )
    if fitted and row["beyond_mp"] == 0:
        st.caption(":orange[No eigenvalue lies beyond the Marchenko–Pastur edge: this α is a fit to the bulk, as a "
                   "random matrix's would be, and reads no learned tail.]")
    elif fitted and row["alpha_stderr"] > 1:
        st.caption(f":orange[This α rests on a tail of {int(row['n_tail'])} eigenvalues (± {row['alpha_stderr']:.1f}): "
                   "read the ESD itself, or the scan rule's fit, which keeps a longer tail.]")

st.subheader("Metrics table")
st.dataframe(metrics, hide_index=True, key="spectra_table")
# what produced the numbers, in each row and in the file's name: downloads of several settings stay apart
setting = {"model": loaded.info.title, "weights": "pruned copy" if model is work.model else "dense"}
model_name = re.sub(r"[^A-Za-z0-9._-]+", "-", loaded.info.title.rstrip("/").rsplit("/", 1)[-1]).strip("-")  # for a file
stem = "_".join(["spectra", model_name, res.fit] + (["farms"] if res.farms else []) + (["pruned"] if model is work.model
                                                                                  else []))
st.download_button("Download metrics (CSV)", metrics.assign(**setting).to_csv(index=False).encode(),
                   file_name=f"{stem}.csv", mime="text/csv", key="spectra_csv")
st.download_button("Download ESDs (.npz)", _npz, file_name=f"{stem}_esds.npz",
                   mime="application/octet-stream", key="spectra_npz",
                   help="Every matrix's eigenvalues, ascending (FARMS: its windows' pooled), one array per matrix "
                        "name: numpy.load(...)[name]. The command line writes the same with `spectra --esds`.")

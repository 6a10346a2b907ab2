"""Learn page: how the ESD and the fitted alpha respond to noise, heavy tails and low-rank signal."""
import math
import threading

import numpy as np
import streamlit as st
import torch

from analysis.powerlaw import XMIN_RULES, fit_power_law
from analysis.spectra import ALPHA_BANDS, beyond_mp_edge, esd, mp_bounds, mp_curve
from components import synthetic
from components.figures import esd_figure
from components.state import through_app

through_app(__file__)  # (after a server restart, a tab that comes back starts from app.py)


@st.cache_resource
def _one_spectrum_at_a_time() -> threading.Lock:
    """Shared by every session. A slider held down reruns the page faster than a 2000-wide eigendecomposition
    ends, and a run stuck in it cannot be stopped: without the lock the runs pile up and starve the server."""
    return threading.Lock()


@st.cache_data(max_entries=64, show_spinner=False)
def _spectrum(kind: str, n: int, aspect: float, seed: int, **params) -> tuple[np.ndarray, tuple[int, int]]:
    """The ESD of (1/N)·WᵀW of a synthetic matrix W, and W's shape."""
    w = synthetic.make(kind, n, aspect, seed, **params)
    return esd(torch.from_numpy(w), normalize=True), w.shape


run = st.session_state["_learn_run"] = st.session_state.get("_learn_run", 0) + 1
st.title("Learn: what a spectrum says about a layer")
st.markdown(
    "Heavy-Tailed Self-Regularization (Martin & Mahoney, JMLR 2021) reads a layer's training quality "
    "from the **empirical spectral density (ESD)**: the histogram of the eigenvalues of WᵀW. "
    "A random (untrained) matrix gives the **Marchenko–Pastur** bulk with no tail; training builds "
    "correlations that show up as a **power-law tail** p(λ) ∝ λ^-α. Smaller α means a heavier tail. "
    "Play with the matrices below: the ESD is of (1/N)·WᵀW, with the Marchenko–Pastur curve for the "
    "same shape and entry variance, and α is fitted exactly as on the Spectra page. (The Spectra page shows "
    "the eigenvalues of WᵀW itself, so its λ axis has another scale; α, a slope, does not depend on it.)"
)

kind = st.radio("Matrix", ["Gaussian (random)", "Heavy-tailed entries", "Low-rank spikes + noise"],
                horizontal=True, key="learn_kind")
c1, c2, c3 = st.columns(3)
n = c1.slider("Rows N", 100, 2000, 600, step=50, key="learn_n")
aspect = c2.slider("Aspect ratio Q = N / M", 1.0, 8.0, 2.0, step=0.5, key="learn_aspect")
seed = c3.number_input("Seed", 0, 10_000, 0, key="learn_seed")
t1, t2 = st.columns(2)
log = t1.toggle("Log-log axes", value=True, key="learn_log")
rule = t2.radio("xmin rule of the fit", XMIN_RULES, horizontal=True, key="learn_fit",
                help="peak: start of the tail near the histogram peak (default, as on the Spectra page); "
                     "scan: smallest KS distance over all candidates; median: the median eigenvalue.")

if kind.startswith("Heavy"):
    h1, h2 = st.columns(2)
    mu = h1.slider("Tail index μ of the entries (P(|x| > t) ~ t^-μ)", 0.5, 6.0, 1.5, step=0.1, key="learn_mu")
    family = h2.radio("Entry distribution", ["student_t", "pareto"], horizontal=True, key="learn_family")
    matrix = ("heavy_tailed", {"mu": mu, "family": family})
    note = ("Entries with tail index μ < 2 (infinite variance) give a power-law ESD with α ≈ μ/2 + 1 (Martin & "
            "Mahoney); the Marchenko–Pastur curve, drawn from the sample variance, means little there: its edge "
            "runs off with the largest entries. For 2 < μ < 4 a tail still reaches beyond the bulk at this size. "
            "Above μ ≈ 4 the spectrum approaches the MP bulk and, as for pure noise, the fitted α no longer reads "
            "a tail: it need not keep growing with μ.")
elif kind.startswith("Low"):
    s1, s2 = st.columns(2)
    strength = s1.slider("Signal strength s", 0.0, 3.0, 1.5, step=0.05, key="learn_strength")
    rank = s2.slider("Rank (number of spikes)", 1, 10, 3, key="learn_rank")
    matrix = ("spiked", {"strength": strength, "rank": rank})
    threshold = aspect ** -0.25
    out = f"so {rank} spike{'s' if rank > 1 else ''} leave{'' if rank > 1 else 's'} it here" if strength > threshold \
        else "so none leaves it here"
    note = (f"Spikes leave the bulk once s > Q^(-1/4) = {threshold:.2f} (the BBP transition), {out}. "
            "A few outliers are not a power law: the fit may take them and the bulk's edge as a short \"tail\" "
            "and return almost any α (even below 2). Count the eigenvalues beyond the edge and look at the "
            "histogram: HT-SR reads the shape of a whole tail, not single spikes.")
else:
    matrix = ("gaussian", {})
    note = ("Pure noise: the ESD fills the Marchenko–Pastur bulk and ends at its edge; there is no tail. "
            "A power law can still be fitted to the bulk's upper end, and its α swings with the xmin rule, the "
            "matrix size and the aspect ratio, from below 2 to above 20 (change N, Q and the rule to see it), "
            "and often lands inside the \"well trained\" band. So α alone does not tell noise from training: a "
            "real tail goes beyond the MP edge (no eigenvalue does here). An untrained layer looks like this.")

with _one_spectrum_at_a_time():
    if st.session_state["_learn_run"] != run:
        st.stop()  # a later run of this page (the slider moved on) waits for the lock: this one would be stale
    eigs, shape = _spectrum(matrix[0], n, aspect, int(seed), **matrix[1])
fit = fit_power_law(eigs, rule)
q = shape[0] / shape[1]
# the Gaussian and spiked matrices' noise has unit variance; heavy-tailed entries: the sample estimate
# (mean eigenvalue of (1/N)WᵀW = entry variance), as the Spectra page does for real layers
sigma2 = float(np.mean(eigs)) if kind.startswith("Heavy") else 1.0
_, hi = mp_bounds(q, sigma2)

m1, m0, m2, m3, m4 = st.columns(5)
m1.metric("Fitted α", f"{fit.alpha:.2f}" if math.isfinite(fit.alpha) else "n/a")
m0.metric("KS distance", f"{fit.ks_distance:.3f}" if math.isfinite(fit.ks_distance) else "n/a",
          help="Kolmogorov–Smirnov distance between the tail and the fitted power law: smaller is a better fit.")
m2.metric("λmax", f"{eigs.max():.3g}")
m3.metric("MP bulk edge", f"{hi:.3g}")
m4.metric("Eigenvalues beyond the edge", beyond_mp_edge(eigs, q, sigma2))
st.plotly_chart(esd_figure(eigs, fit.alpha, fit.xmin, log=log, mp=mp_curve(eigs, q, log=log, sigma2=sigma2),
                           title=f"{shape[0]} x {shape[1]} matrix", x_title="eigenvalue λ of (1/N)·WᵀW"),
                key="learn_esd")
st.info(note)
low, high = ALPHA_BANDS
st.caption(f"Reading α on real layers, where the ESD has a tail beyond the bulk: ≈ {low:g}–{high:g} well trained; "
           f"< {low:g} very heavy tail (over-fit / over-trained); > {high:g} close to random (under-trained). "
           f"Fit status: {fit.status}" + (f", on a tail of {fit.n_tail} eigenvalues (standard error of α from the "
                                          f"tail's size: ±{fit.alpha_stderr:.2f})" if fit.status == "ok" else "") + ".")

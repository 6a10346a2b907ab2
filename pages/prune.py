import streamlit as st
st.title("prune")

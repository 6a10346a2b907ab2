import streamlit as st
st.title("allocation")

"""fgtrac dashboard entry point: `fgtrac app RUN` (binds to 127.0.0.1) runs this with Streamlit."""

# pandas and plotly are imported here, at the top of the entry script, before any page runs: on a cold server the
# first script run importing plotly.express lazily raced a partially initialised pandas.
import pandas as pd  # noqa: F401
import plotly.express as px  # noqa: F401
import streamlit as st

from app.views import overview

st.set_page_config(page_title="fgtrac", layout="wide")
page = st.navigation([st.Page(overview.render, title="Overview", url_path="overview", default=True)])
page.run()

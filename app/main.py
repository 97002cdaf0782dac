"""fgtrac dashboard entry point: `fgtrac app RUN` (binds to 127.0.0.1) runs this with Streamlit.

Pages are files under app/views (so that AppTest can switch to them); each reads the run only through app.data.
"""

# pandas and plotly are imported here, at the top of the entry script, before any page runs: on a cold server the
# first script run importing plotly.express lazily raced a partially initialised pandas.  The pages draw with
# plotly.graph_objects only (plotly.express alone took 0.3 s of a cold server's first page).
import pandas as pd  # noqa: F401
import plotly.graph_objects as go  # noqa: F401
import streamlit as st

from app import data
from app.ui import md
from fgtrac_core.store.reader import IDLE_STAGE_HINT

st.set_page_config(page_title="fgtrac", layout="wide")
page = st.navigation(
    [
        st.Page(data.EXPLORE, title="Explore", default=True),
        st.Page("views/overview.py", title="Overview", url_path="overview"),
        st.Page("views/stages.py", title="Stages", url_path="stages"),
        st.Page(data.LIFECYCLE, title="Sample lifecycle", url_path="lifecycle"),
        st.Page("views/quality.py", title="Data quality", url_path="quality"),
        st.Page("views/audit.py", title="Audit", url_path="audit"),
    ]
)
shown = data.snapshot_id()  # before any read: a snapshot published during this run triggers one more rerun
if data.fresh("is_stale"):
    st.warning(
        "This run is still being recorded (or its recording was interrupted): showing the latest published "
        f"snapshot, {data.snapshot_age()} old."
    )
for name, status in data.query("incomplete_stages"):
    st.warning(f"Stage {md(name)} is {md(status)}: this run is incomplete, so its analyses describe a partly "
               "trained model.")  # fmt: skip
for name, steps in data.query("idle_stages"):
    st.warning(f"Stage {md(name)} applied learning rate 0 at all {steps} of its steps: it did not change the "
               f"parameters ({IDLE_STAGE_HINT}).")  # fmt: skip
data.follow_snapshots(shown)
page.run()

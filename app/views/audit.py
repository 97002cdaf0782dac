"""Audit: one click re-verifies everything the run recorded; the result reads "Ledger intact" or names the first
failing table/row/field.  A reviewer may pin the public key they expect (otherwise the run's own key is used)."""

from __future__ import annotations

import streamlit as st

from app import data
from app.ui import ledger_metrics, md
from fgtrac_core.errors import FgtracError
from fgtrac_core.verify import VerifyReport, verify_run

RESULT = {True: "pass", False: "FAIL", None: "skipped"}
_REQUESTED = "audit_verify_requested"
_LAST = "audit_last_report"  # (run directory, pinned key's upload id, snapshot identity, VerifyReport)


def _request_verification() -> None:
    st.session_state[_REQUESTED] = True


def _show(report: VerifyReport) -> None:
    if report.ok:
        st.success(f"Ledger intact — {report.n_entries} entries verified in {report.seconds:.2f} s")
    else:
        st.error(f"Ledger check failed: {md(report.first_failure)}")
    pin = "pinned by you" if report.key_pinned else "not pinned: the run's own recorded key was used"
    st.caption(f"Signing key {report.key_fingerprint} ({pin})")
    st.dataframe(
        [
            {"check": c.name, "result": RESULT[c.ok], "count": c.count, "ms": round(c.seconds * 1000, 1),
             "detail": c.detail}
            for c in report.checks
        ],
        hide_index=True,
    )  # fmt: skip


def render() -> None:
    st.title("Audit")
    signing = ledger_metrics()
    st.caption(f"Latest tree head signed {md(signing['signed_at'] or 'never')} by {md(signing['head_fingerprint'])}; "
               f"recorded signer key {md(signing['signer_fingerprint'])}")  # fmt: skip
    key_file = st.file_uploader(
        "Pin a public key (optional)",
        key="pinned_key",
        help="The key file from `fgtrac key export` that you expect this run to be signed with. Without it the "
        "run's own recorded key is used, which only detects accidental change, not a re-signed rewrite.",
    )
    # The click is kept in session state (on_click runs before the script): a snapshot published while the click's
    # run is under way makes the app rerun once, and a plain button reads False in that rerun, so the click was lost.
    st.button("Verify ledger", key="verify_ledger", type="primary", on_click=_request_verification)
    pinned = key_file.file_id if key_file is not None else None
    if st.session_state.pop(_REQUESTED, False):
        shown = data.snapshot_id()
        bar = st.progress(0.0, text="verifying")
        try:
            with data.holding_snapshot():
                report = verify_run(
                    data.run_dir(),
                    public_key=key_file.getvalue() if key_file is not None else None,
                    progress=lambda frac, label: bar.progress(min(frac, 1.0), text=label),
                )
        except FgtracError as exc:
            bar.empty()
            st.session_state.pop(_LAST, None)
            st.error(f"Cannot verify: {md(exc)}")
            return
        bar.empty()
        st.session_state[_LAST] = (str(data.run_dir()), pinned, shown, report)
    last = st.session_state.get(_LAST)
    if last is None or last[:2] != (str(data.run_dir()), pinned):
        st.caption(
            "Recomputes every entry from the tables, rebuilds chain and Merkle root, checks every signed tree "
            "head and re-hashes every checkpoint file, thumbnail and (for bundled pipelines) the source data."
        )
        return
    if last[2] != data.snapshot_id():
        st.info("The recorder has published a newer snapshot since this check: verify again to include it.")
    _show(last[3])


render()

"""ortho-mecha dashboard: the password gate, then navigation over the pages in ``ortho_mecha.ui.PAGES``.

Run with ``streamlit run streamlit_app.py``. Bound to this machine only (the default in
``.streamlit/config.toml``) it opens straight away; bound to any other address it first asks for the
password set in ``ORTHO_MECHA_PASSWORD`` (or ``.streamlit/secrets.toml``), and without one it only says
how to set it. Repeated wrong passwords from one address make it wait (``security.SignInLimiter``).
"""

from __future__ import annotations

import streamlit as st

from ortho_mecha import ui

st.set_page_config(page_title="ortho-mecha", page_icon=ui.page_icon(), layout="wide")


def password_gate() -> None:
    """Stop the script unless this session may see the dashboard.

    Locked out, every page's address shows only the sign-in (or how-to-set-a-password) form and the menu is
    hidden, so no link to a dashboard page is shown before the password was given; signed in, the page the
    address named opens.
    """
    if ui.gate_open():
        return
    ui.sign_in_navigation(st.get_option("server.address")).run()
    st.stop()


password_gate()
ui.navigation().run()

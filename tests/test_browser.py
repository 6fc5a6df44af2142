"""The dashboard in a real browser: Debian's Chromium driven through Playwright against a live `streamlit run`.

Servers bind to loopback only. The LAN password gate is exercised with ``--server.address`` set to a host
name from /etc/hosts that resolves to 127.0.0.1: ``security.is_lan_address`` cannot vouch for a host name,
so the gate is on, while the socket still listens on loopback (the test is skipped without such a name).
A stand-in ComfyUI (``tests/comfy_stub.py``) runs on loopback in the test process; the dashboard gets its
address through ``COMFYUI_API``. Screenshots of every page land in ``tests/artifacts/``.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("playwright")
from playwright.sync_api import Browser, Page, expect, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from ortho_mecha import ui
from tests.comfy_stub import ComfyStub
from tests.test_comfy import FLUX_KEYS, write_model

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
START_TIMEOUT_S = 60
PASSWORD = "correct horse battery staple"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loopback_host_name() -> str | None:
    """A host name other than localhost that resolves to 127.0.0.1 only, from /etc/hosts."""
    try:
        lines = Path("/etc/hosts").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split("#")[0].split()
        if len(fields) < 2 or fields[0] != "127.0.0.1":
            continue
        for name in fields[1:]:
            if name != "localhost" and not name.endswith(".localhost"):
                try:
                    addresses = {info[4][0] for info in socket.getaddrinfo(name, None, socket.AF_INET)}
                except OSError:
                    continue
                if addresses == {"127.0.0.1"}:
                    return name
    return None


class Server:
    def __init__(self, tmp: Path, address: str, env: dict[str, str]) -> None:
        self.port = _free_port()
        self.url = f"http://{address}:{self.port}"
        self.workspace = Path(env["ORTHO_MECHA_WORKSPACE"])
        self.log = tmp / f"streamlit-{self.port}.log"
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "streamlit",
                "run",
                str(REPO / "streamlit_app.py"),
                "--server.port",
                str(self.port),
                "--server.headless",
                "true",
                "--server.address",
                address,
            ],
            cwd=REPO,
            env=env,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
            if self.process.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"streamlit did not start on {self.url}; log:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "ORTHO_MECHA_PASSWORD"}
    env.update(
        ORTHO_MECHA_WORKSPACE=str(tmp / "workspace"),
        ORTHO_MECHA_CACHE=str(tmp / "cache"),
        ORTHO_MECHA_ROOTS=str(tmp / "workspace"),
        **extra,
    )
    return env


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def comfy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyStub]:
    """The stand-in ComfyUI, on loopback in this process; the dashboard finds it through COMFYUI_API."""
    stub = ComfyStub(tmp_path_factory.mktemp("comfy") / "ComfyUI")
    stub.add_standard_files()
    stub.start()
    yield stub
    stub.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, comfy: ComfyStub) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("dashboard")
    # A file outside the roots, and a link to it planted inside a root: the link must never be offered.
    secret = tmp / "outside" / "secret.safetensors"
    secret.parent.mkdir()
    secret.write_bytes(b"not a model")
    (tmp / "workspace" / "models").mkdir(parents=True)
    (tmp / "workspace" / "models" / "escape.safetensors").symlink_to(secret)
    started = Server(tmp, "127.0.0.1", _env(tmp, COMFYUI_API=comfy.url, COMFYUI_DIR=str(comfy.root)))
    yield started
    started.stop()


@pytest.fixture()
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 2200})
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()


def _heatmap(page: Page):
    return page.locator(".vega-embed svg, .vega-embed canvas").first


def _nav(page: Page, title: str) -> None:
    page.get_by_role("link", name=title).click()
    expect(page.get_by_role("heading", name=title).first).to_be_visible(timeout=60_000)  # a first visit imports torch


def _choose(page: Page, label: str, option: str, typed: str = "") -> None:
    """Pick ``option`` in the select box ``label`` (typing ``typed`` first to filter a long list). A rerun
    still under way can re-render the list under the click: the choice is then made again."""
    for _ in range(3):
        chooser = page.get_by_role("combobox", name=label)
        chooser.click()
        if typed:
            chooser.press_sequentially(typed)
        try:
            page.get_by_role("option", name=option).click(timeout=15_000)
            return
        except PlaywrightTimeout:
            page.keyboard.press("Escape")
    pytest.fail(f"could not choose {option!r} in {label!r}")


def test_demo_opens_on_analyse_with_heatmap_and_every_page_renders(server: Server, page: Page) -> None:
    outside: list[str] = []  # the dashboard works offline: nothing is fetched from another server
    page.on("request", lambda request: None if request.url.startswith((server.url, "data:", "blob:"))
            else outside.append(request.url))
    page.goto(server.url)
    expect(page.get_by_role("heading", name="Analyse").first).to_be_visible()
    expect(_heatmap(page)).to_be_visible(timeout=90_000)
    # Each link's text is its icon's ligature name, then the title.
    nav = [link.inner_text().split()[-1] for link in page.locator('[data-testid="stSidebarNav"] a').all()]
    assert nav == ["Analyse", "Mixer", "Merge", "Preview"]
    assert "anime" in page.locator(".vega-embed").first.inner_html()
    page.screenshot(path=ARTIFACTS / "analyse.png", full_page=True)
    _nav(page, "Mixer")
    expect(page.get_by_text("Predicted figures")).to_be_visible()
    expect(page.locator('[data-testid="stDataFrame"]').first).to_be_visible()
    expect(page.get_by_role("button", name="Download recipe")).to_be_visible()
    expect(page.locator(".vega-embed svg, .vega-embed canvas").first).to_be_visible()
    page.screenshot(path=ARTIFACTS / "mixer.png", full_page=True)
    _nav(page, "Merge")
    page.screenshot(path=ARTIFACTS / "merge.png", full_page=True)
    _nav(page, "Preview")
    page.screenshot(path=ARTIFACTS / "preview.png", full_page=True)
    assert not page.locator('[data-testid="stException"]').count()
    assert not outside, outside


def test_every_page_answers_at_its_own_address(server: Server, page: Page) -> None:
    page.goto(server.url)  # the root opens the default page at its own address (a shown job may add a query)
    expect(page).to_have_url(re.compile(r"/analyse(\?.*)?$"))
    for spec in ui.PAGES:
        address = Path(spec.path).stem
        page.goto(f"{server.url}/{address}")
        expect(page.get_by_role("heading", name=spec.title).first).to_be_visible()
        expect(page).to_have_url(re.compile(f"/{address}(\\?.*)?$"))
        assert not page.get_by_text("Page not found").count(), address


def test_a_fresh_servers_first_link_to_a_page_shows_the_dashboards_navigation(tmp_path: Path, page: Page) -> None:
    """Until a session has called st.navigation, Streamlit runs ``pages/*.py`` on their own, listing the files
    ("streamlit app", "analyse", …) in the sidebar; the page runs again through the main script."""
    fresh = Server(tmp_path, "127.0.0.1", _env(tmp_path))
    try:
        page.goto(f"{fresh.url}/mixer?from=link")
        expect(page.get_by_role("heading", name="Mixer").first).to_be_visible(timeout=60_000)  # imports torch
        nav = page.get_by_test_id("stSidebarNav")
        for spec in ui.PAGES:
            expect(nav.get_by_role("link", name=spec.title)).to_be_visible()
        expect(nav.get_by_role("link", name="streamlit app")).to_have_count(0)
        expect(page).to_have_url(re.compile(r"/mixer\?from=link$"))
    finally:
        fresh.stop()


def test_merge_runs_to_done_and_a_reload_shows_the_same_job(server: Server, page: Page) -> None:
    page.goto(server.url)
    expect(_heatmap(page)).to_be_visible(timeout=90_000)
    _nav(page, "Mixer")  # the Mixer makes the plan from the analysis
    expect(page.get_by_text("Plan", exact=True)).to_be_visible()
    _nav(page, "Merge")
    page.get_by_role("textbox", name="Output file name").fill("browser-merge")
    page.get_by_role("button", name="Merge", exact=True).click()
    page.wait_for_url(re.compile(r"merge=[0-9a-f]{32}"))
    job_id = re.search(r"merge=([0-9a-f]{32})", page.url).group(1)
    page.reload()
    # A fresh session (no plan in it) still follows the job named in the URL to its end.
    expect(page.get_by_text("written", exact=False).first).to_be_visible(timeout=90_000)
    assert job_id in page.url
    expect(page.get_by_text("browser-merge.safetensors").first).to_be_visible()
    expect(page.get_by_role("button", name="Download script (.py)")).to_be_visible()
    page.screenshot(path=ARTIFACTS / "merge-done.png", full_page=True)
    assert not page.locator('[data-testid="stException"]').count()


def test_mixer_compares_methods_and_extracts_a_lora(server: Server, page: Page) -> None:
    page.goto(server.url)
    expect(_heatmap(page)).to_be_visible(timeout=90_000)
    _nav(page, "Mixer")
    page.get_by_text("Compare methods", exact=True).click()
    expect(page.get_by_text("pale bars are estimates", exact=False)).to_be_visible(timeout=60_000)
    bars = page.locator(".st-key-mix_compare .vega-embed svg, .st-key-mix_compare .vega-embed canvas").first
    expect(bars).to_be_visible(timeout=30_000)
    page.get_by_text("Extract LoRA", exact=True).first.click()
    _choose(page, "Model to extract", "models/demo/anime.safetensors", typed="demo/anime.safetensors")
    page.get_by_role("spinbutton", name="Rank").fill("4")
    page.get_by_role("spinbutton", name="Rank").press("Enter")
    name = page.get_by_role("textbox", name="LoRA file name")
    expect(name).to_have_value("anime-lora.safetensors", timeout=30_000)
    name.fill("browser-lora")
    name.press("Enter")
    page.locator(".st-key-lora_start button").click()
    page.wait_for_url(re.compile(r"lora=[0-9a-f]{32}"))
    expect(page.get_by_text("wrote", exact=False).first).to_be_visible(timeout=90_000)
    assert (server.workspace / "loras" / "browser-lora.safetensors").is_file()
    expect(page.get_by_text("energy kept (matrix keys)")).to_be_visible(timeout=30_000)
    page.screenshot(path=ARTIFACTS / "mixer-compare-lora.png", full_page=True)
    assert not page.locator('[data-testid="stException"]').count()


def test_preview_renders_through_comfyui(server: Server, comfy: ComfyStub, page: Page) -> None:
    write_model(server.workspace / "merges" / "browser-preview.safetensors", FLUX_KEYS)  # Architecture auto: flux1
    page.goto(f"{server.url}/preview")
    expect(page.get_by_role("heading", name="Preview").first).to_be_visible()
    expect(page.get_by_role("textbox", name="Server address (COMFYUI_API)")).to_have_value(comfy.url)
    page.get_by_label("Model", exact=True).click()
    page.get_by_role("option", name="merges/browser-preview.safetensors").click()
    page.get_by_role("textbox", name="Prompt", exact=True).fill("a lighthouse at dusk")
    page.get_by_role("button", name="Render").click()
    page.wait_for_url(re.compile(r"preview=[0-9a-f]{32}"))
    expect(page.locator('[data-testid="stImage"] img').first).to_be_visible(timeout=60_000)
    expect(page.get_by_text("browser-preview_seed0_001.png", exact=False)).to_be_visible()
    assert any("a lighthouse at dusk" in str(body) for body in comfy.received)
    page.screenshot(path=ARTIFACTS / "preview-done.png", full_page=True)
    assert not page.locator('[data-testid="stException"]').count()


def test_paths_outside_the_roots_are_refused(server: Server, page: Page) -> None:
    page.goto(f"{server.url}/?analysis=../../etc/passwd")
    expect(page.get_by_text("is not a job id").first).to_be_visible()
    base = page.get_by_label("Base model")
    base.click()
    options = page.get_by_role("option").all_inner_texts()
    assert "models/demo/base.safetensors" in options
    assert not any("escape" in option or "secret" in option for option in options)
    page.screenshot(path=ARTIFACTS / "refused.png", full_page=True)


def test_password_gate_refuses_a_wrong_password(tmp_path: Path, browser: Browser) -> None:
    host = _loopback_host_name()
    if host is None:
        pytest.skip("no host name resolving to 127.0.0.1 only in /etc/hosts")
    gated = Server(tmp_path, host, _env(tmp_path, ORTHO_MECHA_PASSWORD=PASSWORD))
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(60_000)
        # The first request to the fresh server is a link straight to a page: the sign-in at that address, then
        # the page with the link's query (it went to the root, and the query was lost).
        page.goto(f"{gated.url}/merge?merge=0123456789abcdef0123456789abcdef")
        expect(page.get_by_role("textbox", name="Password")).to_be_visible(timeout=60_000)
        assert not page.get_by_role("heading", name="Merge").count()
        page.get_by_role("textbox", name="Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("heading", name="Merge").first).to_be_visible(timeout=60_000)
        expect(page).to_have_url(re.compile(r"/merge\?merge=0123456789abcdef0123456789abcdef$"))
        page.goto(gated.url)
        page.get_by_role("textbox", name="Password").fill("wrong")
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_text("wrong password")).to_be_visible()
        assert not page.get_by_role("link", name="Mixer").count()
        page.screenshot(path=ARTIFACTS / "password.png", full_page=True)
        page.get_by_role("textbox", name="Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("heading", name="Analyse").first).to_be_visible()
        # A new session following a link to a page: signed in, it is on that page, with the link's query.
        other = browser.new_context().new_page()
        other.set_default_timeout(60_000)
        other.goto(f"{gated.url}/mixer?mix=0123456789abcdef0123456789abcdef")
        other.get_by_role("textbox", name="Password").fill(PASSWORD)
        other.get_by_role("button", name="Sign in").click()
        expect(other.get_by_role("heading", name="Mixer").first).to_be_visible()
        expect(other.get_by_text("no Mixer plan", exact=False).first).to_be_visible()  # the query's id was read
        other.context.close()
    finally:
        context.close()
        gated.stop()


def test_mixer_block_alphas_preset_and_input_reach_the_plan(server: Server, page: Page) -> None:
    page.goto(server.url)
    expect(_heatmap(page)).to_be_visible(timeout=90_000)
    page.get_by_role("link", name="Mixer").click()  # the demo is Flux-style: block groups double and single
    expect(page.get_by_text("flux1 groups: double, single", exact=False)).to_be_visible(timeout=60_000)
    _choose(page, "Block preset", "structure")
    page.get_by_role("button", name="Apply preset").click()
    expect(page.get_by_role("spinbutton", name="single", exact=True)).to_have_value("0.00")
    page.get_by_role("spinbutton", name="double", exact=True).fill("0.5")
    page.get_by_role("spinbutton", name="double", exact=True).press("Enter")
    expect(page.get_by_role("spinbutton", name="double", exact=True)).to_have_value("0.50")
    page.get_by_role("tab", name="Plan (.json)").click()
    plan = page.get_by_role("tabpanel", name="Plan (.json)").get_by_test_id("stCode")
    expect(plan).to_contain_text('"double": 0.5')
    expect(plan).to_contain_text('"single": 0.0')
    page.get_by_role("heading", name="Block alphas").scroll_into_view_if_needed()
    page.screenshot(path=ARTIFACTS / "mixer-blocks.png", full_page=True)
    assert not page.locator('[data-testid="stException"]').count()

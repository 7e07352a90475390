"""Capture the README's screenshots of the Dagster and MLflow UIs from a demo home.

The pictures in the README must show the real product, so this script starts what
``pipeline dev`` starts (``dagster dev`` and ``mlflow ui`` on the same embedded
stores, each on a free loopback port), drives Debian's Chromium with Playwright
through the pages a user visits, and saves one PNG per page. Every capture waits
for text that only the loaded page shows, so a half-rendered page fails the run
instead of ending up in the README. Backfill dialogs are opened and filled in but
never launched: the demo home is not modified.

Run it after ``pipeline demo`` (not collected by pytest)::

    PIPELINE_HOME=/tmp/demo_home DAGSTER_HOME=/tmp/demo_home/dagster .venv/bin/pipeline demo
    .venv/bin/python -m pipeline_tests.e2e.capture_readme_screenshots \\
        --home /tmp/demo_home --out pipeline_tests/e2e/screenshots
"""

import argparse
import io
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from pipeline.cli import ui_commands
from pipeline.domain.landing import partition_key_of
from pipeline.settings import ensure_dagster_home, load_settings
from pipeline_tests.e2e.conftest import (
    ARTIFACTS,
    e2e_environment,
    free_port,
    start_in_own_session,
    stop_session,
)
from pipeline_tests.e2e.graphql import DagsterGraphQL, wait_for
from pipeline_tests.e2e.test_ui_browser import CHROMIUM, CHROMIUM_ARGS

VIEWPORT = {"width": 1400, "height": 900}
MAX_BYTES = 250_000  # a README should not make readers download megabytes
UI_TIMEOUT_MS = 60_000
START_TIMEOUT_S = 240.0

CREDIBILITY = ("gold", "credibility_posterior")
ANOMALY_SCORES = ("gold", "fx_anomaly_scores")
CHALLENGER = ("models", "fx_challenger_model")
CREDIBILITY_CHECKS = (
    "no_divergent_transitions",
    "posterior_ess_bulk_above_400",
    "posterior_rhat_below_1_01",
)
CHALLENGER_CHECK = "challenger_beats_champion"
BACKFILL_SYMBOLS = ("EURUSD", "GBPUSD", "USDJPY")
REGISTERED_MODEL = "fx_spread_eurusd"
# Facets that make asset nodes taller without telling a README reader anything more
GRAPH_FACETS_OFF = ("Sync status tags", "Latest event", "Kind tag", "Automation", "Partitions")


@dataclass(frozen=True)
class Servers:
    """URLs of the running UIs, a GraphQL client of the Dagster one, the demo's FX days."""

    dagster_url: str
    mlflow_url: str
    client: DagsterGraphQL
    fx_days: tuple[str, str]  # first and last day the demo delivered (relative to its date)


def delivered_fx_days(landing_dir: Path) -> tuple[str, str]:
    """First and last day of the FX tick files in ``landing_dir``."""
    folder = landing_dir / "fx_ticks"
    days = sorted(
        parsed[1]
        for path in (folder.iterdir() if folder.is_dir() else [])
        if (parsed := partition_key_of(path)) is not None and parsed[0] == "fx_ticks"
    )
    if not days:
        raise FileNotFoundError(f"{folder} holds no FX tick files; run `pipeline demo` first")
    return days[0], days[-1]


def _mlflow_ready(url: str) -> bool | None:
    try:
        response = requests.get(f"{url}/health", timeout=5)
    except (requests.ConnectionError, requests.Timeout):
        return None
    return True if response.ok else None


@contextmanager
def running_servers(home: Path, log_dir: Path) -> Iterator[Servers]:
    """Start ``mlflow ui`` and ``dagster dev`` on ``home`` as ``pipeline dev`` does.

    Each server runs in its own session and is stopped with its whole session on
    exit, whatever happened in between, so no server outlives the script.
    ``MLFLOW_UI_URL`` points at this MLflow port, so links Dagster writes while
    these servers run open the MLflow UI started here.
    """
    dagster_port, mlflow_port = free_port(), free_port()
    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    env = e2e_environment(home, MLFLOW_UI_URL=mlflow_url)
    env.pop("PIPELINE_SENSOR_INTERVAL_S")  # the product's interval, not the e2e one
    settings = load_settings(env)
    ensure_dagster_home(settings)
    mlflow_cmd, dagster_cmd = ui_commands(
        settings, dagster_port=dagster_port, mlflow_port=mlflow_port
    )
    procs = []
    try:
        procs.append(start_in_own_session(mlflow_cmd, env, log_dir / "readme_mlflow_ui.log"))
        procs.append(start_in_own_session(dagster_cmd, env, log_dir / "readme_dagster_dev.log"))
        dagster_url = f"http://127.0.0.1:{dagster_port}"
        client = DagsterGraphQL(dagster_url)

        def ready() -> bool | None:
            for proc in procs:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{proc.args[1]} exited with {proc.returncode}; see {log_dir}"
                    )
            return True if client.is_ready() and _mlflow_ready(mlflow_url) else None

        started = time.monotonic()
        wait_for(ready, timeout=START_TIMEOUT_S, interval=1.0, what="dagster dev and mlflow ui")
        print(f"servers ready in {time.monotonic() - started:.0f} s: {dagster_url} {mlflow_url}")
        yield Servers(dagster_url, mlflow_url, client, delivered_fx_days(settings.landing_dir))
    finally:
        for proc in reversed(procs):
            stop_session(proc)


def _save(page: Page, path: Path) -> Path:
    """Screenshot the viewport; a PNG over budget is re-encoded with a 256-colour palette.

    UI pages are flat colours and text, so a palette keeps them sharp at a
    fraction of the size; only plots with gradients ever need it.
    """
    data = page.screenshot(type="png")
    if len(data) > MAX_BYTES:
        from PIL import Image

        image = Image.open(io.BytesIO(data)).convert("RGB")
        buffer = io.BytesIO()
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(
            buffer, format="PNG", optimize=True
        )
        data = buffer.getvalue()
    path.write_bytes(data)
    print(f"  {path.name}: {len(data) / 1000:.0f} kB")
    return path


def _new_page(browser: Browser) -> Page:
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(UI_TIMEOUT_MS)
    page = context.new_page()
    # First visit of an instance opens a "join the community" dialog over everything.
    page.add_locator_handler(
        page.get_by_role("button", name="Skip"), lambda skip: skip.click(), times=3
    )
    return page


def _dagster(page: Page, servers: Servers, path: str) -> None:
    page.goto(f"{servers.dagster_url}{path}", wait_until="networkidle")


def _hide_dagster_navigation(page: Page) -> None:
    """Collapse Dagster's left navigation: the content is what the picture is about."""
    hide = page.get_by_text("Hide navigation", exact=True)
    if hide.is_visible():
        hide.click()


def asset_graph(page: Page, servers: Servers, out: Path) -> Path:
    """Global asset lineage, every group expanded, fitted to the viewport."""
    _dagster(page, servers, "/asset-groups")
    expect(page.get_by_text("Global asset lineage")).to_be_visible()
    _hide_dagster_navigation(page)
    # the asset tree beside the graph: its toggle sits left of the search box
    page.locator('button:has([aria-label="panel_show_right"])').first.click()
    page.locator('button:has([aria-label="config"])').click()
    facets = page.get_by_role("dialog").filter(has_text="Choose Asset Facets")
    for name in GRAPH_FACETS_OFF:
        facets.locator("label").filter(has_text=re.compile(f"^{name}$")).click()
    facets.get_by_role("button", name="Save").click()
    page.locator("#zoom-slider-container").get_by_role("button", name="settings").click()
    page.get_by_role("menuitem", name="Expand all groups").click()
    for name in ("claims_by_district", "credibility_table", "fx_spreads", "fx_model_monitor"):
        expect(page.get_by_text(name, exact=True).first).to_be_visible()
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(1500)  # the fit-to-viewport animation
    return _save(page, out / "asset_graph.png")


def _open_materialize_dialog(page: Page, servers: Servers, asset: Sequence[str]) -> Locator:
    _dagster(page, servers, f"/assets/{'/'.join(asset)}")
    page.locator("button", has_text="Materialize").first.click()
    dialog = page.get_by_role("dialog").filter(has_text="Launch runs to materialize")
    expect(dialog.get_by_text("Partition selection")).to_be_visible()
    return dialog


def backfill_by_date(page: Page, servers: Servers, out: Path) -> Path:
    """The Materialize dialog of ``fx_anomaly_scores``: a date range, every symbol."""
    dialog = _open_materialize_dialog(page, servers, ANOMALY_SCORES)
    dates = dialog.get_by_placeholder(re.compile("^ex: "))
    first, last = servers.fx_days
    dates.fill(f"[{first}...{last}]")
    dates.press("Enter")
    dialog.get_by_role("button", name="All", exact=True).last.click()  # the symbol dimension
    expect(dialog.get_by_text(re.compile(r"^\d+ partitions selected$"))).to_be_visible()
    count = dialog.get_by_text(re.compile(r"^[1-9][\d,]* partitions$"))
    expect(count).to_be_visible()
    expect(dialog.get_by_role("button", name="Launch backfill")).to_be_enabled()
    page.wait_for_load_state("networkidle")  # the partition status bar
    page.wait_for_timeout(1000)
    print(f"  date range selection: {count.inner_text()}")
    return _save(page, out / "backfill_by_date.png")


def backfill_by_symbol(page: Page, servers: Servers, out: Path) -> Path:
    """The Materialize dialog of ``fx_challenger_model`` with a few symbols picked."""
    dialog = _open_materialize_dialog(page, servers, CHALLENGER)
    dialog.get_by_text("Select a partition or create one").click()
    for symbol in BACKFILL_SYMBOLS:
        page.get_by_role("menuitem").filter(has_text=symbol).click()
    dialog.get_by_text("Launch runs to materialize").click()  # closes the picker only
    expect(page.get_by_placeholder("Filter partitions")).to_be_hidden()
    for symbol in BACKFILL_SYMBOLS:  # a chip per symbol in the selection box
        expect(dialog.get_by_text(symbol, exact=True).first).to_be_visible()
    expect(dialog.get_by_text(f"{len(BACKFILL_SYMBOLS)} partitions", exact=True)).to_be_visible()
    expect(dialog.get_by_role("button", name="Launch backfill")).to_be_enabled()
    page.wait_for_timeout(500)
    return _save(page, out / "backfill_by_symbol.png")


def _bottom(locator: Locator) -> float:
    box = locator.bounding_box()
    if box is None:
        raise RuntimeError(f"{locator} is not rendered")
    return box["y"] + box["height"]


def credibility_posterior(page: Page, servers: Servers, out: Path) -> list[Path]:
    """The latest materialisation's metadata, then its trace plot as the UI renders it.

    Dagster shows markdown metadata (the embedded PNG plots) behind a
    ``[Show Markdown]`` link, so the plot is a second picture of its dialog.
    """
    _dagster(page, servers, f"/assets/{'/'.join(CREDIBILITY)}?view=events")
    _hide_dagster_navigation(page)
    for label in ("max_rhat", "n_divergences", "mlflow_run", "shrinkage_plot"):
        expect(page.get_by_text(label, exact=True)).to_be_visible()
    # scroll just enough to show the last metadata row and keep the event's header
    last_row = page.get_by_role("cell", name="shrinkage_plot", exact=True)
    overflow = _bottom(last_row) - (VIEWPORT["height"] - 16)
    if overflow > 0:
        page.mouse.move(VIEWPORT["width"] * 0.7, VIEWPORT["height"] / 2)
        page.mouse.wheel(0, overflow)
        wait_for(
            lambda: True if _bottom(last_row) <= VIEWPORT["height"] else None,
            timeout=10,
            interval=0.2,
            what="the metadata table to scroll into view",
        )
    expect(page.get_by_text("materialized in run")).to_be_in_viewport()
    page.wait_for_timeout(500)
    shots = [_save(page, out / "credibility_posterior.png")]
    row = page.locator("tr", has=page.get_by_text("trace_plot", exact=True))
    row.get_by_text("[Show Markdown]").click()
    plot = page.get_by_role("dialog").filter(has_text="trace_plot").locator("img")
    expect(plot).to_be_visible()
    wait_for(
        lambda: True if plot.evaluate("e => e.complete && e.naturalWidth > 0") else None,
        timeout=30,
        interval=0.2,
        what="the trace plot image to decode",
    )
    shots.append(_save(page, out / "credibility_trace_plot.png"))
    return shots


def _checks_tab(page: Page, servers: Servers, asset: Sequence[str], checks: Sequence[str]) -> None:
    _dagster(page, servers, f"/assets/{'/'.join(asset)}?view=checks")
    expect(page.get_by_text(f"Checks ({len(checks)})")).to_be_visible()
    for check in checks:
        expect(page.locator(f'div[title="{check}"]').first).to_be_visible()
    expect(page.get_by_text("This is a blocking asset check.")).to_be_visible()
    expect(page.get_by_text("Evaluation result")).to_be_visible()
    page.wait_for_timeout(1000)  # the plots below the fold settle the layout


def credibility_checks(page: Page, servers: Servers, out: Path) -> Path:
    """The Checks tab of the posterior: its three convergence gates, passed."""
    statuses = servers.client.asset_check_statuses(CREDIBILITY)
    if statuses != dict.fromkeys(CREDIBILITY_CHECKS, "SUCCEEDED"):
        raise RuntimeError(f"credibility checks are not all passed in this home: {statuses}")
    _checks_tab(page, servers, CREDIBILITY, CREDIBILITY_CHECKS)
    expect(page.get_by_text("Succeeded", exact=True)).to_have_count(len(CREDIBILITY_CHECKS))
    return _save(page, out / "credibility_checks.png")


def fx_challenger_checks(page: Page, servers: Servers, out: Path) -> Path:
    """The Checks tab of the challenger models with the promotion gate."""
    statuses = servers.client.asset_check_statuses(CHALLENGER)
    print(f"  {CHALLENGER_CHECK} for the latest materialisation: {statuses}")
    _checks_tab(page, servers, CHALLENGER, (CHALLENGER_CHECK,))
    expect(page.get_by_role("cell", name="symbols_checked")).to_be_visible()
    return _save(page, out / "fx_challenger_checks.png")


def _credibility_run_path(servers: Servers) -> tuple[str, str]:
    """The MLflow run the posterior's latest materialisation links to: (UI route, run id).

    The link was written when the demo ran, against whatever MLflow port was
    configured then; its route (the URL fragment) is opened on this script's port.
    """
    data = servers.client.execute(
        """query Latest($key: AssetKeyInput!) {
          assetOrError(assetKey: $key) {
            ... on Asset { assetMaterializations(limit: 1) { metadataEntries {
              label
              ... on UrlMetadataEntry { url }
              ... on TextMetadataEntry { text }
            } } }
          }
        }""",
        {"key": {"path": list(CREDIBILITY)}},
    )["assetOrError"]
    materializations = data.get("assetMaterializations") or []
    if not materializations:
        raise RuntimeError(f"{'/'.join(CREDIBILITY)} was never materialised in this home")
    entries = {e["label"]: e for e in materializations[0]["metadataEntries"]}
    url = entries["mlflow_run"]["url"]
    run_id = entries["mlflow_run_id"]["text"]
    fragment = urlsplit(url).fragment
    if run_id not in fragment:
        raise RuntimeError(f"mlflow_run {url!r} does not name run {run_id}")
    return fragment, run_id


def _mlflow_model_training_mode(page: Page, servers: Servers) -> None:
    """Switch the MLflow UI to its classic-ML navigation and close the assistant panel."""
    page.goto(servers.mlflow_url, wait_until="load")
    mode = page.get_by_text("Model training", exact=True)
    expect(mode).to_be_visible()
    mode.click()
    close = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
    try:
        close.click(timeout=5_000)
    except PlaywrightTimeout:
        print("  no MLflow assistant panel to close")


def mlflow_run(page: Page, servers: Servers, out: Path) -> list[Path]:
    """The credibility run Dagster links to: overview with metrics, then its artefacts."""
    route, run_id = _credibility_run_path(servers)
    _mlflow_model_training_mode(page, servers)
    page.goto(f"{servers.mlflow_url}/#{route}", wait_until="load")
    expect(page.get_by_text(run_id, exact=True)).to_be_visible()
    expect(page.get_by_text(re.compile(r"^Metrics \([1-9]\d*\)$"))).to_be_visible()
    expect(page.get_by_text("max_rhat", exact=True)).to_be_visible()
    expect(page.get_by_text(re.compile(r"^Parameters \(\d+\)$"))).to_be_visible()
    page.wait_for_timeout(1000)
    shots = [_save(page, out / "mlflow_run.png")]
    page.get_by_text("Artifacts", exact=True).click()
    page.get_by_text("shrinkage.png", exact=True).click()
    preview = page.get_by_role("img", name="shrinkage.png")
    expect(preview).to_be_visible()
    wait_for(
        lambda: True if preview.evaluate("e => e.complete && e.naturalWidth > 0") else None,
        timeout=30,
        interval=0.2,
        what="the shrinkage plot artefact to load",
    )
    shots.append(_save(page, out / "mlflow_run_artifacts.png"))
    return shots


def mlflow_model(page: Page, servers: Servers, out: Path) -> Path:
    """The registered model of EUR/USD: its versions and the aliases on them."""
    _mlflow_model_training_mode(page, servers)
    page.goto(f"{servers.mlflow_url}/#/models/{REGISTERED_MODEL}", wait_until="load")
    expect(page.get_by_text(REGISTERED_MODEL, exact=True).first).to_be_visible()
    expect(page.get_by_text(re.compile(r"^Version \d+$")).first).to_be_visible()
    expect(page.get_by_role("status", name="champion")).to_be_visible()
    page.wait_for_timeout(1000)
    return _save(page, out / "mlflow_model.png")


Capture = Callable[[Page, Servers, Path], Path | list[Path]]
CAPTURES: tuple[Capture, ...] = (
    asset_graph,
    backfill_by_date,
    backfill_by_symbol,
    credibility_posterior,
    credibility_checks,
    fx_challenger_checks,
    mlflow_run,
    mlflow_model,
)


def capture_all(home: Path, out: Path) -> list[Path]:
    """Start the UIs on ``home``, take every screenshot into ``out``, stop the UIs."""
    if not CHROMIUM.exists():
        raise FileNotFoundError(
            f"{CHROMIUM} is missing; install it with `apt-get install -y chromium`"
        )
    if not (home / "mlflow.db").exists() or not (home / "dagster" / "dagster.yaml").exists():
        raise FileNotFoundError(f"{home} holds no demo state; run `pipeline demo` on it first")
    out.mkdir(parents=True, exist_ok=True)
    saved: list[Path] = []
    with running_servers(home, ARTIFACTS) as servers, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            for capture in CAPTURES:
                print(f"{capture.__name__} …", flush=True)
                page = _new_page(browser)  # fresh storage: no state leaks between pictures
                try:
                    result = capture(page, servers, out)
                finally:
                    page.context.close()
                saved.extend(result if isinstance(result, list) else [result])
        finally:
            browser.close()
    return saved


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and capture every screenshot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True, help="PIPELINE_HOME after `demo`")
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    args = parser.parse_args(argv)
    saved = capture_all(args.home.resolve(), args.out)
    print(f"saved {len(saved)} screenshots under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

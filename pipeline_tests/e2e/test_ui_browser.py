"""What a user sees: the asset graph and the checks of an asset, in headless Chromium.

Screenshots land in ``pipeline_tests/e2e/artifacts/`` (git-ignored), next to the
``dagster dev`` log, so a CI failure can be read without rerunning it.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import keys
from pipeline_tests.e2e.conftest import ARTIFACTS, DagsterDev, Ingested

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
UI_TIMEOUT_MS = 60_000
CURATED_CHECKS = (keys.CHECK_CURATED_CONTRACT, keys.CHECK_RECONCILES)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Debian's Chromium driven by Playwright (no browser download)."""
    if not CHROMIUM.exists():  # .ci/run installs it; a missing browser is a failure
        pytest.fail(f"{CHROMIUM} is missing; install it with `apt-get install -y chromium`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, dagster_dev: DagsterDev, ingested: Ingested) -> Iterator[object]:
    """A fresh page on the e2e server, after the sensors ingested the drop."""
    context = browser.new_context(viewport={"width": 1800, "height": 1100})
    context.set_default_timeout(UI_TIMEOUT_MS)
    page = context.new_page()
    # First visit of an instance opens a "join the community" dialog over everything.
    page.add_locator_handler(
        page.get_by_role("button", name="Skip"), lambda skip: skip.click(), times=3
    )
    try:
        yield page
    finally:
        context.close()


def _shot(page, name: str) -> Path:
    path = ARTIFACTS / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path))
    return path


def test_asset_graph_shows_every_layer(page, dagster_dev: DagsterDev) -> None:
    from playwright.sync_api import expect

    page.goto(f"{dagster_dev.url}/asset-groups", wait_until="networkidle")
    expect(page.get_by_text("Global asset lineage")).to_be_visible()
    page.mouse.click(1200, 1000, button="right")  # the graph canvas' context menu
    page.get_by_role("menuitem", name="Expand all groups").click()
    for name in (
        "claims_by_district",
        "fx_spreads",
        "credibility_table",
        "fx_champion_model",
        "fx_anomaly_scores",
        "fx_model_monitor",
    ):
        expect(page.get_by_text(name, exact=True).first).to_be_visible()
    assert _shot(page, "asset_graph").stat().st_size > 10_000


def test_claims_lineage_shows_passed_checks(page, dagster_dev: DagsterDev) -> None:
    from playwright.sync_api import expect

    page.goto(
        f"{dagster_dev.url}/assets/curated/claims_by_district?view=lineage",
        wait_until="networkidle",
    )
    # the innermost element holding both the node's name and its checks row is its card
    card = page.locator("div", has=page.get_by_text("claims_by_district", exact=True)).filter(
        has_text="Asset checks"
    )
    expect(card.last).to_contain_text(f"{len(CURATED_CHECKS)} / {len(CURATED_CHECKS)} Passed")
    expect(page.get_by_text("credibility_table", exact=True)).to_be_visible()
    _shot(page, "claims_by_district_lineage")


UI_CHECK_STATUSES = ("Succeeded", "Failed", "Skipped", "In progress", "Execution failed")


@pytest.mark.parametrize(
    ("asset_path", "must_pass"),
    [("curated/claims_by_district", True), ("curated/fx_spreads", False)],
)
def test_asset_checks_page_names_each_check_and_its_status(
    page, dagster_dev: DagsterDev, asset_path: str, must_pass: bool
) -> None:
    """Each check is listed by name with a status.

    ``claims_by_district`` was only written by single-partition sensor runs, so
    its checks must show as passed. ``fx_spreads`` was last written by range runs
    of the backfill, whose per-partition check records the UI lists as skipped
    (the result is stored once for the range), so there any status is accepted.
    """
    from playwright.sync_api import expect

    recorded = dagster_dev.client.asset_check_statuses(asset_path.split("/"))
    assert set(recorded) == set(CURATED_CHECKS)
    if must_pass:
        assert recorded == dict.fromkeys(CURATED_CHECKS, "SUCCEEDED")
    page.goto(f"{dagster_dev.url}/assets/{asset_path}?view=checks", wait_until="networkidle")
    expect(page.get_by_text(f"Checks ({len(CURATED_CHECKS)})")).to_be_visible()
    for check in CURATED_CHECKS:
        # the list row: the (possibly middle-truncated) name with its full title, then the status
        row = page.locator("span", has=page.locator(f'div[title="{check}"]')).first
        expect(row).to_be_visible()
        shown = row.locator(":scope > span").inner_text().strip()
        if must_pass:
            assert shown == "Succeeded", (check, shown)
        else:
            assert shown in UI_CHECK_STATUSES, (check, shown)
    expect(page.get_by_text("This is a blocking asset check.")).to_be_visible()
    _shot(page, f"checks_{asset_path.replace('/', '_')}")

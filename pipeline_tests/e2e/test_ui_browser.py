"""What a user sees: the asset graph and the checks of an asset, in headless Chromium.

Screenshots land in ``pipeline_tests/e2e/artifacts/`` (git-ignored), next to the
``dagster dev`` log, so a CI failure can be read without rerunning it.
"""

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import keys
from pipeline_tests.e2e.conftest import (
    ARTIFACTS,
    CLAIMS_MONTH,
    EXPECTED_SYMBOLS,
    FX_DATES,
    DagsterDev,
    Ingested,
)

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
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1800, "height": 1100})
    context.set_default_timeout(UI_TIMEOUT_MS)
    expect.set_options(timeout=UI_TIMEOUT_MS)  # assertions wait as long as actions (5 s default)
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


def _open_graph_menu_item(page, item: str, attempts: int = 3) -> None:
    """Click ``item`` of the graph's settings menu, reopening the menu if something (a
    dialog, a re-render of the graph) closed it before the click landed."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    settings = page.locator("#zoom-slider-container").get_by_role("button", name="settings")
    entry = page.get_by_role("menuitem", name=item)
    for attempt in range(attempts):
        settings.click()
        try:
            entry.click(timeout=10_000)
            return
        except PlaywrightTimeout:
            if attempt == attempts - 1:
                raise


def test_asset_graph_shows_every_layer(page, dagster_dev: DagsterDev) -> None:
    from playwright.sync_api import expect

    page.goto(f"{dagster_dev.url}/asset-groups", wait_until="networkidle")
    expect(page.get_by_text("Global asset lineage")).to_be_visible()
    # the graph's settings button opens its menu once the graph is drawn (a right click on
    # the canvas before that opens nothing, and was flaky on a loaded machine)
    _open_graph_menu_item(page, "Expand all groups")
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


# GraphQL status of a check execution -> how the checks list labels it
UI_CHECK_STATUS = {
    "SUCCEEDED": "Succeeded",
    "FAILED": "Failed",
    "SKIPPED": "Skipped",
    "IN_PROGRESS": "In progress",
    "EXECUTION_FAILED": "Execution failed",
}
# the status filters of a check's Partitions tab
PARTITION_FILTERS = ("Execution Failed", "Failed", "In Progress", "Missing", "Skipped", "Passed")
NOT_PASSED_LABEL = re.compile(
    r"^\s*(failed|skipped|execution failed|in progress|missing)\s*$", re.IGNORECASE
)
EXECUTIONS_LIMIT = 1000


@pytest.mark.parametrize(
    ("asset_path", "must_pass"),
    [("curated/claims_by_district", True), ("curated/fx_spreads", True)],
)
def test_asset_checks_page_names_each_check_and_its_status(
    page, dagster_dev: DagsterDev, asset_path: str, must_pass: bool
) -> None:
    """Each check is listed by name with the status GraphQL records for it.

    ``claims_by_district`` was only written by single-partition sensor runs and
    ``fx_spreads`` last by the range runs of the backfill (in the same package as
    ``test_dagster_dev``); a range run records each partition's own evaluation, so
    the checks of both must have passed, and the page must say so.
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
        assert recorded[check] in UI_CHECK_STATUS, (check, recorded[check])
        # compared ignoring case: the list capitalises its labels with CSS
        assert shown.lower() == UI_CHECK_STATUS[recorded[check]].lower(), (
            check,
            recorded[check],
            shown,
        )
    expect(page.get_by_text("This is a blocking asset check.")).to_be_visible()
    _shot(page, f"checks_{asset_path.replace('/', '_')}")


def latest_check_status_by_partition(
    dagster_dev: DagsterDev, asset_path: str, check: str
) -> dict[str, str]:
    """Partition key -> status of the newest execution of ``check`` for that partition."""
    executions = dagster_dev.client.execute(
        """query Executions($key: AssetKeyInput!, $check: String!, $limit: Int!) {
          assetCheckExecutions(assetKey: $key, checkName: $check, limit: $limit) {
            id status partition
          }
        }""",
        {"key": {"path": asset_path.split("/")}, "check": check, "limit": EXECUTIONS_LIMIT},
    )["assetCheckExecutions"]
    assert len(executions) < EXECUTIONS_LIMIT, "raise EXECUTIONS_LIMIT: history was cut off"
    latest: dict[str, tuple[int, str]] = {}
    for execution in executions:
        key, newest = execution["partition"], int(execution["id"])
        if key is not None and newest > latest.get(key, (-1, ""))[0]:
            latest[key] = (newest, execution["status"])
    return {key: status for key, (_, status) in latest.items()}


def _show_only(page, statuses: set[str]) -> None:
    """Tick exactly ``statuses`` among the status filters of the Partitions tab."""
    from playwright.sync_api import expect

    for name in PARTITION_FILTERS:
        label = page.locator("label").filter(has_text=re.compile(rf"^{name} \([\d,]+\)$"))
        box = label.locator("input[type=checkbox]")
        if box.is_checked() != (name in statuses):
            label.click()
        expect(box).to_be_checked(checked=name in statuses)
    page.wait_for_timeout(500)  # the lists re-render from the statuses already loaded


def _list_row(page, dimension: str, key: str):
    """The row of ``key`` in the partition list filtered by ``dimension`` (date, partition…)."""
    search = page.get_by_placeholder(f"Filter by {dimension}…")
    if search.input_value() != key:
        search.fill(key)
    return page.locator(f'[data-tooltip="{key}"]')


def _assert_detail_shows_passed(page, partition: str, check: str) -> None:
    """The detail pane of ``partition`` tags it Passed, and nothing in it says Failed/Skipped."""
    from playwright.sync_api import expect

    pane = (
        page.locator("div", has=page.get_by_text("Latest execution", exact=True))
        .filter(has=page.locator(f'div[title="{partition}"]'))
        .last
    )
    expect(pane).to_be_visible()
    expect(pane.locator('[data-tooltip="Passed"]')).to_have_text("Passed")
    shown = pane.get_by_text(NOT_PASSED_LABEL)
    assert shown.count() == 0, (check, partition, shown.all_inner_texts())


def _open_check_partitions(
    page, dagster_dev: DagsterDev, asset_path: str, check: str, n_passed: int
) -> None:
    """The Partitions tab of ``check``, nothing selected, once it counts ``n_passed`` Passed.

    Waiting for the count also waits for the statuses the lists are filtered by.
    """
    from playwright.sync_api import expect

    page.goto(f"{dagster_dev.url}/assets/{asset_path}?view=checks", wait_until="networkidle")
    page.locator(f'div[title="{check}"]').first.click()  # select the check in the list
    page.locator('button[role="tab"]#partitions').click()
    passed = page.locator("label").filter(has_text=re.compile(r"^Passed \([\d,]+\)$"))
    expect(passed).to_have_text(f"Passed ({n_passed})")


@pytest.mark.parametrize("check", CURATED_CHECKS)
@pytest.mark.parametrize("asset_path", ["curated/claims_by_district", "curated/fx_spreads"])
def test_partitions_whose_check_passed_show_as_passed_never_failed_or_skipped(
    page, dagster_dev: DagsterDev, asset_path: str, check: str
) -> None:
    """For every partition GraphQL reports ``check`` passed on, the check's Partitions tab
    counts it as Passed, lists it under Passed and under no other status (Failed, Skipped,
    Execution Failed, In Progress, Missing), and its detail pane says Passed: a page that
    shows a passed check as failed or skipped fails.
    """
    from playwright.sync_api import expect

    statuses = latest_check_status_by_partition(dagster_dev, asset_path, check)
    passed = sorted(key for key, status in statuses.items() if status == "SUCCEEDED")
    if asset_path == "curated/claims_by_district":  # written by the claims sensor only
        assert statuses == {CLAIMS_MONTH: "SUCCEEDED"}
    else:  # every (date, symbol) of the drop, and nothing else, has an execution
        assert set(statuses) == {f"{d}|{s}" for d in FX_DATES for s in EXPECTED_SYMBOLS}
    print(f"{asset_path} {check}: passed on {passed}; all latest statuses {statuses}")

    # the tab counts exactly the partitions GraphQL reports passed
    _open_check_partitions(page, dagster_dev, asset_path, check, len(passed))

    for partition in passed:
        date, _, symbol = partition.partition("|")
        primary = "date" if symbol else "partition"
        _open_check_partitions(page, dagster_dev, asset_path, check, len(passed))
        _show_only(page, {"Passed"})
        row = _list_row(page, primary, date)
        expect(row).to_be_visible()
        row.click()
        if symbol:
            symbol_row = _list_row(page, "symbol", symbol)
            expect(symbol_row).to_be_visible()
            symbol_row.click()
        _assert_detail_shows_passed(page, partition, check)

        _open_check_partitions(page, dagster_dev, asset_path, check, len(passed))
        _show_only(page, set(PARTITION_FILTERS) - {"Passed"})
        row = _list_row(page, primary, date)
        if symbol and row.count():  # another symbol of the day did not pass
            row.click()
            row = _list_row(page, "symbol", symbol)
        assert row.count() == 0, f"{check} passed on {partition}, listed as not passed"
    _shot(page, f"check_partitions_{asset_path.replace('/', '_')}_{check}")

"""What the loan-loss simulation stores.

Per valuation date: one summary row per scenario (``gold/loan_loss_summary``: every figure,
its standard error, its bound and the simulations it took), the Euler contributions per
segment and top loan (``gold/loan_loss_contributions``), and the loss samples beside them.
"""

import polars as pl

from pipeline import keys
from pipeline.domain import contracts
from pipeline.resources.lake import LakeResource

EXPERIMENT = "loan_loss"
SUMMARY_TABLE = "loan_loss_summary"
CONTRIBUTIONS_TABLE = "loan_loss_contributions"
BOUND_PREFIX = "max_rel_se_"
"""Summary columns ``max_rel_se_<figure>`` hold the bound the run was configured with."""
LOAN_INPUTS = {
    keys.LOAN_BOOK: ("loan_book", contracts.loan_book_contract),
    keys.LOAN_SCENARIOS: ("loan_scenarios", contracts.loan_scenarios_contract),
}


def read_summary(lake: LakeResource, valuation_date: str) -> pl.DataFrame:
    """Stored per-scenario summaries of a valuation date."""
    return lake.read("gold", SUMMARY_TABLE, {"valuation_date": valuation_date})


def read_contributions(lake: LakeResource, valuation_date: str) -> pl.DataFrame:
    """Stored VaR and ES contributions (segments and top loans) of a valuation date."""
    return lake.read("gold", CONTRIBUTIONS_TABLE, {"valuation_date": valuation_date})


def stored_bounds(row: dict) -> dict[str, float]:
    """The relative SE bound of each figure a stored summary row was produced under."""
    return {
        column.removeprefix(BOUND_PREFIX): float(value)
        for column, value in row.items()
        if column.startswith(BOUND_PREFIX) and value is not None
    }


def samples_uri(lake: LakeResource, valuation_date: str, run_id: str) -> str:
    """Where one run's loss samples of a valuation date are stored.

    Each run writes its own file and the summary row (one atomic Delta commit)
    names it in ``samples_uri``, so the summary is the commit point: a run that
    fails after writing its samples leaves the previous summary and samples
    consistent. Read samples through :func:`committed_samples_uri`.
    """
    return lake.file_uri(
        "gold",
        "loan_loss_distribution",
        f"valuation_date={valuation_date}",
        f"losses_{run_id}.npz",
    )


def committed_samples_uri(lake: LakeResource, valuation_date: str) -> str | None:
    """Samples file named by the stored summary of ``valuation_date`` (None if never written)."""
    summary = read_summary(lake, valuation_date)
    return summary["samples_uri"][0] if summary.height else None


def input_rule_failures(lake: LakeResource, upstream, valuation_date: str) -> list[str]:
    """The contract of one input recomputed on what is stored for the date."""
    table, contract = LOAN_INPUTS[upstream]
    stored = lake.read("curated", table, {"valuation_date": valuation_date})
    if stored.height == 0:
        return [f"curated/{table} has no rows for {valuation_date}"]
    return contracts.contract_failures(
        stored, contract(valuation_date), f"{table} {valuation_date}"
    )

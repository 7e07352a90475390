"""What the loan-loss simulation stores: one summary row per scenario, samples beside it."""

import polars as pl

from pipeline import keys
from pipeline.domain import contracts
from pipeline.resources.lake import LakeResource

EXPERIMENT = "loan_loss"
LOAN_INPUTS = {
    keys.LOAN_BOOK: ("loan_book", contracts.loan_book_contract),
    keys.LOAN_SCENARIOS: ("loan_scenarios", contracts.loan_scenarios_contract),
}


def read_summary(lake: LakeResource, valuation_date: str) -> pl.DataFrame:
    """Stored per-scenario summaries of a valuation date."""
    return lake.read("gold", "loan_loss_summary", {"valuation_date": valuation_date})


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

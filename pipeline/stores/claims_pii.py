"""The PII scan of one claims month, batch by batch, for months of any size.

Presidio looks at one note at a time, so nothing in the scan needs the whole month at
once. Bronze is read in batches (polars' streaming engine); each batch is scrubbed and
its redacted rows and detection log go to local Parquet spill files, which reach the
lake as streams committed together (:meth:`LakeResource.commit_outcome`). Memory is
bounded by the batch; time grows with the number of notes (about 10 ms each).
"""

import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from pipeline.audit import with_audit
from pipeline.resources.lake import LakeResource
from pipeline.resources.lake_stream import FrameStream, Rows
from pipeline.stores.sources import SOURCES, stored_bronze

if TYPE_CHECKING:
    from pipeline.domain.pii import PiiPolicy

CLAIMS = SOURCES["claims"]
SCAN_BATCH_ROWS = 50_000
"""Bronze rows scrubbed at a time."""
DOCUMENT_ID = pl.format("{}#{}", pl.col("_source_file"), pl.col("_row_number"))
"""A delivered row: landing file and row number (also in every curated and quarantine row)."""


@dataclass
class ScrubbedMonth:
    """A month's redacted rows and detection log, spilled and ready to commit.

    Attributes
    ----------
    spans_by_entity_and_action
        ``"<entity> (<action>)"`` to the number of spans.
    documents_with_pii_in_text
        Delivered rows whose free text held at least one span.
    """

    redacted: Rows
    log: Rows
    rows: int
    spans: int
    spans_by_entity_and_action: Counter[str]
    documents_with_pii_in_text: int
    scratch: tempfile.TemporaryDirectory

    def cleanup(self) -> None:
        """Remove the spill files (after the streams were committed)."""
        self.scratch.cleanup()


def scrub_month(
    lake: LakeResource,
    month: str,
    policy: "PiiPolicy",
    salt: bytes,
    *,
    dagster_run_id: str,
    inputs: Mapping[str, int | None],
    batch_rows: int | None = None,
) -> ScrubbedMonth:
    """Scrub every bronze row of ``month`` as ``policy`` says, ``batch_rows`` at a time.

    ``batch_rows`` defaults to :data:`SCAN_BATCH_ROWS`.

    Raises
    ------
    Failure
        When bronze holds no rows for the month.
    """
    bronze, rows = stored_bronze(lake, CLAIMS, month)
    # Presidio (and the spaCy it imports) costs ~4 s of import: loaded by the scan only, so
    # the code server, the daemon and every sensor process start without it
    from pipeline.domain.pii import LOG_COLUMNS, scrub

    scratch = tempfile.TemporaryDirectory(prefix="pii-scan-")
    redacted_dir, log_dir = Path(scratch.name) / "redacted", Path(scratch.name) / "log"
    redacted_dir.mkdir()
    log_dir.mkdir()
    found: Counter[str] = Counter()
    spans = 0
    try:
        batches = bronze.collect_batches(chunk_size=batch_rows or SCAN_BATCH_ROWS, lazy=True)
        for i, batch in enumerate(batches):
            scrubbed, log = scrub(batch, policy, salt, document_id=DOCUMENT_ID)
            scrubbed.drop("_batch_id", strict=False).with_columns(
                pl.lit(month).alias("month")
            ).write_parquet(redacted_dir / f"{i:06d}.parquet")
            if log.height:
                audited = with_audit(
                    log.with_columns(pl.lit(month).alias("month")),
                    dagster_run_id=dagster_run_id,
                    inputs=inputs,
                )
                audited.write_parquet(log_dir / f"{i:06d}.parquet")
                spans += log.height
                found.update(f"{e} ({a})" for e, a in log.select("entity_type", "action").rows())
        empty_log = with_audit(
            pl.DataFrame(schema={**LOG_COLUMNS, "month": pl.String}),
            dagster_run_id=dagster_run_id,
            inputs=inputs,
        )
        logged = pl.scan_parquet(log_dir / "*.parquet") if spans else empty_log.lazy()
        in_text = logged.filter(pl.col("column").is_in(policy.text_columns)).select(
            pl.col("document_id").n_unique()
        )
        return ScrubbedMonth(
            redacted=FrameStream.of_files(sorted(redacted_dir.glob("*.parquet"))),
            log=FrameStream.of_files(sorted(log_dir.glob("*.parquet"))) if spans else empty_log,
            rows=rows,
            spans=spans,
            spans_by_entity_and_action=found,
            documents_with_pii_in_text=int(in_text.collect(engine="streaming").item()),
            scratch=scratch,
        )
    except BaseException:
        scratch.cleanup()
        raise

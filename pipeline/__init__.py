"""Actuarial and market-risk ML platform as a Dagster asset graph."""

import warnings

# Partitioned asset checks, single-run backfills and multi-dimension partition
# mappings are deliberate choices; their beta/preview notices are noise in the UI logs.
try:
    from dagster import BetaWarning, PreviewWarning

    warnings.filterwarnings("ignore", category=BetaWarning)
    warnings.filterwarnings("ignore", category=PreviewWarning)
except ImportError:  # pragma: no cover - dagster is a hard dependency
    pass

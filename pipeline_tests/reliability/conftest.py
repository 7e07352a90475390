"""Helpers shared by the reliability tests: what a Delta log references, and what it does not."""

import json
from pathlib import Path


def referenced_files(table_dir: Path) -> set[str]:
    """Paths (relative to the table) that any commit of the table's log ever added."""
    paths: set[str] = set()
    for entry in sorted((table_dir / "_delta_log").glob("*.json")):
        for line in entry.read_text().splitlines():
            action = json.loads(line) if line.strip() else {}
            if "add" in action:
                paths.add(action["add"]["path"])
    return paths


def unreferenced_files(table_dir: Path) -> list[Path]:
    """Data files under a table that no commit references: what a killed writer left.

    Both whole files never committed (``part-….parquet``) and files cut off while being
    written, still under their staging name (``part-….parquet#1``).
    """
    from urllib.parse import unquote

    referenced = {unquote(p) for p in referenced_files(table_dir)}
    return sorted(
        p
        for pattern in ("*.parquet", "*.parquet#*")
        for p in table_dir.rglob(pattern)
        if "_delta_log" not in p.parts and str(p.relative_to(table_dir)) not in referenced
    )

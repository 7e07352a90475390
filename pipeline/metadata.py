"""Small helpers that turn results into metadata a user reads in the UI."""

import base64
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import polars as pl
from dagster import AssetExecutionContext, MetadataValue, TableColumn, TableSchema

if TYPE_CHECKING:
    from pipeline.resources.lake import FrameStream

_DAGSTER_TYPES = {
    pl.String: "string",
    pl.Float64: "float",
    pl.Int64: "int",
    pl.Int32: "int",
    pl.Boolean: "bool",
    pl.Date: "date",
}


def column_schema(frame: "pl.DataFrame | FrameStream") -> TableSchema:
    """Dagster column schema of a polars frame or stream (shown on the asset page)."""
    return TableSchema(
        columns=[
            TableColumn(name=name, type=_DAGSTER_TYPES.get(type(dtype), str(dtype)))
            for name, dtype in frame.schema.items()
        ]
    )


def markdown_table(frame: pl.DataFrame, *, max_rows: int = 20, float_fmt: str = "{:.4g}") -> str:
    """Render the first rows of a frame as a markdown table."""
    if frame.height == 0:
        return "_no rows_"
    head = frame.head(max_rows)
    lines = ["| " + " | ".join(head.columns) + " |", "|" + "---|" * head.width]
    for row in head.iter_rows():
        cells = [float_fmt.format(v) if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    if frame.height > max_rows:
        lines.append(f"\n_{frame.height - max_rows} more rows_")
    return "\n".join(lines)


def counts_table(counts: Mapping[str, int], *, label: str = "reason") -> str:
    """Markdown table of counts, largest first."""
    if not counts:
        return "_none_"
    rows = sorted(counts.items(), key=lambda kv: -kv[1])
    return "\n".join([f"| {label} | rows |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]])


def png_markdown(png: bytes, alt: str) -> MetadataValue:
    """Embed a PNG in markdown metadata (the UI renders it inline)."""
    encoded = base64.b64encode(png).decode("ascii")
    return MetadataValue.md(f"![{alt}](data:image/png;base64,{encoded})")


def attach_per_partition(
    context: AssetExecutionContext, by_partition: Mapping[str, Mapping[str, Any]]
) -> None:
    """Give each partition of the run its own metadata (row counts, versions, links, plots).

    A run over a partition range copies its output metadata to every partition's
    materialisation, so a run total such as ``dagster/row_count`` would be shown on
    each partition as if it were that partition's. Metadata attached to a partition
    here overrides the run's for that partition, in single-partition runs alike.
    """
    for partition_key, metadata in by_partition.items():
        context.add_asset_metadata(dict(metadata), partition_key=partition_key)

"""The code location loads, and its asset graph matches a reviewed snapshot.

The snapshot (``snapshots/asset_graph.json``) holds, per asset key: upstream keys,
explicit partition mappings, the partitions definition, the group and each check
with its blocking flag. Descriptions, metadata, code versions and resource
configuration are left out: they change without changing the graph.

After an intended change to the graph, regenerate and review the diff::

    UPDATE_SNAPSHOTS=1 .venv/bin/python -m pytest pipeline_tests/test_definitions.py
"""

import difflib
import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from pipeline.definitions import defs

SNAPSHOT = Path(__file__).parent / "snapshots" / "asset_graph.json"
LAYERS = ("bronze", "curated", "gold", "models")
HEAVY_MODULES = ("pymc", "pyspark", "mlflow", "arviz", "sklearn", "nutpie", "pytensor")
REPO = Path(__file__).resolve().parents[1]


def describe_partitions(partitions_def: dg.PartitionsDefinition | None) -> str | None:
    """A stable label of a partitions definition (type, dimensions, start)."""
    if partitions_def is None:
        return None
    if isinstance(partitions_def, dg.MultiPartitionsDefinition):
        dims = [
            f"{d.name}={describe_partitions(d.partitions_def)}"
            for d in sorted(partitions_def.partitions_defs, key=lambda d: d.name)
        ]
        names = "×".join(
            d.name for d in sorted(partitions_def.partitions_defs, key=lambda d: d.name)
        )
        return f"multi:{names}({', '.join(dims)})"
    if isinstance(partitions_def, dg.DynamicPartitionsDefinition):
        return f"dynamic:{partitions_def.name}"
    if isinstance(partitions_def, dg.StaticPartitionsDefinition):
        return f"static:{','.join(partitions_def.get_partition_keys())}"
    if isinstance(partitions_def, dg.TimeWindowPartitionsDefinition):
        kind = {
            "0 0 * * *": "daily",
            "0 0 1 * *": "monthly",
            "0 * * * *": "hourly",
            "0 0 * * 0": "weekly",
        }.get(partitions_def.cron_schedule, f"cron[{partitions_def.cron_schedule}]")
        return f"{kind} from {partitions_def.start.date().isoformat()}"
    return type(partitions_def).__name__


def asset_graph_snapshot(definitions: dg.Definitions) -> dict:
    graph = definitions.resolve_asset_graph()
    snapshot = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        mappings = {
            # dagster's mapping reprs list their parameters (offsets, dimension) and no ids
            parent.to_user_string(): repr(mapping)
            for parent, mapping in node.partition_mappings.items()
        }
        checks = {
            check_key.name: (
                "blocking" if graph.get_check_spec(check_key).blocking else "non-blocking"
            )
            for check_key in sorted(node.check_keys, key=lambda c: c.name)
        }
        snapshot[key.to_user_string()] = {
            "deps": sorted(parent.to_user_string() for parent in node.parent_keys),
            "partition_mappings": dict(sorted(mappings.items())),
            "partitions": describe_partitions(node.partitions_def),
            "group": node.group_name,
            "checks": checks,
        }
    return snapshot


def test_code_location_loads() -> None:
    dg.Definitions.validate_loadable(defs)
    assert defs.resolve_asset_graph().get_all_asset_keys()


def test_asset_graph_matches_snapshot() -> None:
    current = json.dumps(asset_graph_snapshot(defs), indent=2, sort_keys=False, ensure_ascii=False)
    current += "\n"
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
        SNAPSHOT.write_text(current, encoding="utf-8")
        return
    if not SNAPSHOT.exists():
        pytest.fail(f"no snapshot at {SNAPSHOT}; create it with UPDATE_SNAPSHOTS=1")
    expected = SNAPSHOT.read_text(encoding="utf-8")
    if current != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True),
                current.splitlines(keepends=True),
                fromfile="snapshot (expected)",
                tofile="current definitions",
            )
        )
        pytest.fail(
            "asset graph differs from the snapshot; if the change is intended, run\n"
            "  UPDATE_SNAPSHOTS=1 .venv/bin/python -m pytest pipeline_tests/test_definitions.py\n"
            f"and review the diff:\n{diff}"
        )


def test_every_asset_is_partitioned_and_lives_in_a_known_layer() -> None:
    graph = defs.resolve_asset_graph()
    keys = graph.get_all_asset_keys()
    unpartitioned = sorted(k.to_user_string() for k in keys if graph.get(k).partitions_def is None)
    assert unpartitioned == []
    misplaced = sorted(k.to_user_string() for k in keys if k.path[0] not in LAYERS)
    assert misplaced == [], f"first key element must be one of {LAYERS}"


def test_every_check_guards_a_partition_and_curated_checks_block() -> None:
    """Checks are partitioned like their asset, so each result belongs to one partition
    (the cross-run gates filter check records by partition key)."""
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        for check_key in node.check_keys:
            spec = graph.get_check_spec(check_key)
            label = f"{key.to_user_string()}:{check_key.name}"
            assert spec.partitions_def == node.partitions_def, f"{label} is not per partition"
            if key.path[0] == "curated":
                assert spec.blocking, f"{label} must block"


_PROBE = """
import json, sys
import pipeline.definitions
heavy = json.loads(sys.argv[1])
loaded = sorted({k.split(".")[0] for k in sys.modules} & set(heavy))
print(json.dumps(loaded))
"""


def test_loading_the_code_location_imports_no_heavy_library(tmp_path: Path) -> None:
    """Design rule: pymc, Spark, MLflow and friends are imported inside functions, so
    ``dagster definitions validate`` and the UI load the location in a few seconds."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PIPELINE_", "LAKE_"))
    }
    env.update({"PIPELINE_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)})
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(HEAVY_MODULES)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
    # loading the definitions writes nothing: not into the home, not into the cwd
    assert sorted(p.name for p in tmp_path.iterdir()) == []

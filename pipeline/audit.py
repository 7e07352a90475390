"""Audit columns of gold rows, and the code versions of the assets.

Every gold row says who made it, with which code, with which model and from which
data (:func:`with_audit`, called by every gold writer so the logic lives once):

``dagster_run_id``
    The Dagster run that wrote the row.
``code_version``
    ``<package version>+<git commit>`` of the code that ran (:func:`code_version`).
``mlflow_run_id``
    The MLflow run of the model involved (the fit, the simulation, the scoring
    model's training run); null where no model was involved.
``input_versions``
    JSON of ``"<layer>/<table>"`` to the Delta version read (:func:`input_versions`),
    e.g. ``{"curated/claims_by_district": 12}``.

Assets declare a ``code_version`` (:func:`asset_code_version`): a hash of the source
of the asset's module and of every ``pipeline.domain``, ``pipeline.jobs`` and
``pipeline.stores`` module it imports, directly or through one another. The package
version alone changes only at a release, so the UI would never show a partition as
stale after a change of the science between releases; the asset module alone would
miss the modules where the numbers are computed. Resources, settings, metadata and
policies are left out: they move, show or schedule values without changing them, and
a change there would mark every partition of every asset stale for nothing.
"""

import ast
import functools
import hashlib
import importlib.metadata
import json
import os
import subprocess
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path

import polars as pl
from dagster import AssetsDefinition

from pipeline.resources.lake import LakeResource

AUDIT_COLUMNS = ("dagster_run_id", "code_version", "mlflow_run_id", "input_versions")
COMMIT_ENV = "PIPELINE_GIT_COMMIT"
"""Commit of a deployment without a git checkout (set by CI or the deploy step)."""
PACKAGE_ROOT = Path(__file__).resolve().parent
HASHED_PACKAGES = ("pipeline.domain", "pipeline.jobs", "pipeline.stores")


@functools.cache
def package_version() -> str:
    """The installed version of ``pipeline``, else the one in ``pyproject.toml``."""
    pyproject = PACKAGE_ROOT.parent / "pyproject.toml"
    if pyproject.is_file():  # a checkout: the source that runs is the one described here
        with pyproject.open("rb") as handle:
            return str(tomllib.load(handle).get("project", {}).get("version", "unknown"))
    try:
        return importlib.metadata.version("pipeline")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@functools.cache
def git_commit() -> str:
    """``git rev-parse HEAD`` of the checkout holding this package, else ``PIPELINE_GIT_COMMIT``.

    Never fails: without git, outside a checkout or after 5 s it falls back to the
    environment variable, then to ``"unknown"``.
    """
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],  # noqa: S607 (git from PATH, no shell, fixed arguments)
            cwd=PACKAGE_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        done = None
    if done is not None and done.returncode == 0 and done.stdout.strip():
        return done.stdout.strip()
    return os.environ.get(COMMIT_ENV, "").strip() or "unknown"


def code_version() -> str:
    """``<package version>+<git commit>`` of the code running now (computed once)."""
    return f"{package_version()}+{git_commit()}"


def input_versions(lake: LakeResource, *tables: str) -> dict[str, int | None]:
    """Current Delta version of each ``"<layer>/<table>"`` (``None`` when it does not exist).

    Take them just before reading the inputs: a write in between would be recorded
    as the older version.
    """
    versions = {}
    for name in tables:
        layer, table = name.split("/", 1)
        versions[name] = lake.version(layer, table)
    return versions


def with_audit(
    frame: pl.DataFrame,
    *,
    dagster_run_id: str,
    inputs: Mapping[str, int | None],
    mlflow_run_id: str | None = None,
) -> pl.DataFrame:
    """``frame`` with the :data:`AUDIT_COLUMNS` set on every row.

    Parameters
    ----------
    mlflow_run_id
        The model's MLflow run. ``None`` keeps an ``mlflow_run_id`` column the frame
        already has (one run per row, e.g. an evaluation per symbol), else adds nulls.
    inputs
        ``"<layer>/<table>"`` to the Delta version read, stored as sorted JSON.
    """
    if mlflow_run_id is not None:
        mlflow = pl.lit(mlflow_run_id, dtype=pl.String)
    elif "mlflow_run_id" in frame.columns:
        mlflow = pl.col("mlflow_run_id").cast(pl.String)
    else:
        mlflow = pl.lit(None, dtype=pl.String)
    return frame.with_columns(
        pl.lit(dagster_run_id, dtype=pl.String).alias("dagster_run_id"),
        pl.lit(code_version(), dtype=pl.String).alias("code_version"),
        mlflow.alias("mlflow_run_id"),
        pl.lit(json.dumps(dict(inputs), sort_keys=True), dtype=pl.String).alias("input_versions"),
    )


# --- code versions of assets ----------------------------------------------------------------


def _module_file(module: str) -> Path | None:
    parts = module.split(".")[1:]
    if not parts:
        return None
    relative = Path(*parts)
    for candidate in (
        PACKAGE_ROOT / relative.with_suffix(".py"),
        PACKAGE_ROOT / relative / "__init__.py",
    ):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(module: str, source: str) -> set[str]:
    """``pipeline`` modules imported anywhere in ``source`` (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pipeline."))
        elif (
            isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline")
        ):
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.add(name if _module_file(name) else node.module)
    found.discard(module)
    return found


@functools.cache
def asset_code_version(module: str) -> str:
    """Hash of ``module``'s source and of the computing modules it reaches (module docstring)."""
    digest, seen, todo = hashlib.sha256(), set(), [module]
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        source = path.read_text(encoding="utf-8")
        todo.extend(m for m in _imported_modules(name, source) if m.startswith(HASHED_PACKAGES))
    for name in sorted(seen):
        digest.update(name.encode() + b"\0" + _module_file(name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def with_code_versions(assets: Sequence[AssetsDefinition], module: str) -> list[AssetsDefinition]:
    """``assets`` (defined in ``module``) declaring :func:`asset_code_version` of it."""
    version = asset_code_version(module)
    return [
        a.map_asset_specs(lambda spec: spec.replace_attributes(code_version=version))
        for a in assets
    ]

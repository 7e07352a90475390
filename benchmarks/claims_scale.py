"""Claims ingest from 1 to 50 million policy rows: bounded memory, linear time, exact statistics.

Run ``python -m benchmarks.claims_scale`` (1M, 10M and 50M rows), ``--sizes 1000000,5000000``
or ``--quick`` (1M, 2M and 5M rows: the same buckets of 1,000,000 rows, so the sizes curate in
1, 2 and 5 buckets).

For each size, one month's landing CSV is generated (columns of the claims contract, 240
districts, Poisson claim counts; 0.1 % of the rows repeat an earlier row's policy id further
down the file with other values, which the contract quarantines as duplicates). Then a fresh
Python process materialises ``bronze/claims`` and ``curated/claims_by_district`` with their
blocking checks, exactly as a run does (in-process executor, ephemeral instance, a fresh
``PIPELINE_HOME``), and reports:

* wall time of the materialisation (process start and imports excluded);
* peak memory: the process's peak resident set (``ru_maxrss``, which counts file pages it
  mapped too) and the peak of its anonymous memory (``RssAnon``, sampled every 20 ms: the
  heap the ingest itself holds);
* rows in, curated, quarantined, and the number of key buckets used.

A second fresh process computes the reference: a plain eager polars group-by of the same
CSV (first occurrence of each policy id kept, exposure summed the contract's way, as
decimals of 1e-12 policy-years). The stored ``claims_by_district`` must equal it exactly,
district by district; the deviation from a plain float64 sum is printed beside it.

Targets (exit status 1 when one fails):

* peak memory at the largest size within 1.5x of the smallest (both measures reported;
  judged on ``ru_maxrss``);
* time linear: seconds per million rows at the largest size within 1.3x of the
  second largest;
* statistics identical to the plain group-by at every size.

Then the PII scan of the same path (``claims_redacted`` and ``pii_detection_log``, Presidio
on every adjuster note, batches of 50,000 rows) on the demo generator's months with notes
and personal columns, 200,000 and 800,000 rows (``--quick``: 100,000 and 300,000; below
about 200,000 rows polars' read-ahead of bronze is not yet full): seconds per
row and peak anonymous memory of the scan step alone (bronze is materialised first, by
another process), same targets: memory within 1.5x, time per row within 1.3x.

Results in ``benchmarks/results/claims_scale.json``.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "claims_scale.json"
MONTH = "2026-09"
SIZES = (1_000_000, 10_000_000, 50_000_000)
PII_SIZES = (200_000, 800_000)
QUICK_PII_SIZES = (100_000, 300_000)
QUICK_SIZES = (1_000_000, 2_000_000, 5_000_000)
DISTRICTS = 240
DUPLICATE_SHARE = 0.001
GENERATE_CHUNK = 2_000_000
MEMORY_TARGET, TIME_TARGET = 1.5, 1.3


def generate(path: Path, n: int, seed: int = 7) -> int:
    """Write one month's claims CSV of ``n`` rows; return how many repeat an earlier id."""
    import numpy as np
    import polars as pl

    rng = np.random.default_rng(seed)
    duplicates = 0
    with path.open("wb") as out:
        for start in range(0, n, GENERATE_CHUNK):
            m = min(GENERATE_CHUNK, n - start)
            ids = np.arange(start, start + m)
            repeat = rng.random(m) < DUPLICATE_SHARE
            repeat &= ids > 0
            # a repeated id names a row earlier in the file, so the first occurrence is kept
            ids[repeat] = (rng.random(int(repeat.sum())) * ids[repeat]).astype(np.int64)
            duplicates += int(repeat.sum())
            chunk = pl.DataFrame(
                {
                    "policy_id": ids,
                    "district": rng.integers(0, DISTRICTS, m),
                    "valuation_month": [MONTH] * m,
                    "exposure": np.round(rng.uniform(0.01, 1.0, m), 6),
                    "claim_count": rng.poisson(0.08, m),
                }
            ).with_columns(
                pl.format("P{}", pl.col("policy_id").cast(pl.String).str.zfill(9)).alias(
                    "policy_id"
                ),
                pl.format("D{}", pl.col("district").cast(pl.String).str.zfill(3)).alias("district"),
            )
            chunk.write_csv(out, include_header=start == 0)
    return duplicates


CHILD = r"""
import json, re, resource, sys, threading, time
peak = {"anon_kb": 0}
def sample():
    while True:
        status = open("/proc/self/status").read()
        anon = int(re.search(r"RssAnon:\s+(\d+)", status).group(1))
        peak["anon_kb"] = max(peak["anon_kb"], anon)
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
import dagster as dg
from pipeline import keys
from pipeline.definitions import build_definitions
from pipeline.resources import build_resources
from pipeline.settings import get_settings
settings = get_settings()
defs = build_definitions(settings)
resources = build_resources(settings)
def materialize(month, *asset_keys):
    return dg.materialize(
        [*defs.assets, *(defs.asset_checks or [])],
        selection=dg.AssetSelection.assets(*asset_keys),
        partition_key=month, resources=resources, instance=dg.DagsterInstance.ephemeral(),
    )
"""
"""What both measured child processes start with: a 20 ms sampler of anonymous memory
(``peak``), the definitions and resources of the settings, and ``materialize``."""

INGEST = (
    CHILD
    + r"""
month, out = sys.argv[1], sys.argv[2]
baseline_anon_kb = peak["anon_kb"]
started = time.perf_counter()
result = materialize(month, keys.BRONZE_CLAIMS, keys.CLAIMS_BY_DISTRICT)
seconds = time.perf_counter() - started
checks = {f"{e.asset_key.to_user_string()}:{e.check_name}": e.passed
          for e in result.get_asset_check_evaluations()}
(event,) = result.asset_materializations_for_node("curated__claims_by_district")
meta = {k: v.value for k, v in event.metadata.items()}
resources["lake"].read("curated", "claims_by_district", {"month": month}).write_parquet(out)
time.sleep(0.05)
print(json.dumps({
    "seconds": seconds,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "peak_anon_mb": peak["anon_kb"] / 1024,
    "imports_anon_mb": baseline_anon_kb / 1024,
    "rows_in": meta["rows_in"], "rows_curated": meta["rows_curated"],
    "rows_quarantined": meta["rows_quarantined"], "buckets": meta["buckets"],
    "checks": checks,
}))
"""
)

SCAN = (
    CHILD
    + r"""
month, step = sys.argv[1], sys.argv[2]
scan = [keys.CLAIMS_REDACTED, keys.PII_DETECTION_LOG]
import pipeline.domain.pii  # Presidio's import is not the scan's work
imports_kb = peak["anon_kb"]
started = time.perf_counter()
result = materialize(month, *([keys.BRONZE_CLAIMS] if step == "bronze" else scan))
seconds = time.perf_counter() - started
logged = [e for e in result.get_asset_materialization_events()
          if e.asset_key == keys.PII_DETECTION_LOG]
time.sleep(0.05)
print(json.dumps({
    "seconds": seconds,
    "peak_anon_mb": peak["anon_kb"] / 1024,
    "imports_anon_mb": imports_kb / 1024,
    "spans": logged[0].materialization.metadata["dagster/row_count"].value if logged else 0,
}))
"""
)

REFERENCE = r"""
import json, sys
import polars as pl
from pipeline.domain.contracts import EXPOSURE_SUM_DTYPE
csv, out = sys.argv[1], sys.argv[2]
rows = pl.read_csv(csv, schema_overrides={"exposure": pl.Float64, "claim_count": pl.Int64})
first = rows.unique("policy_id", keep="first", maintain_order=True)
stats = first.group_by("district").agg(
    pl.col("exposure").cast(EXPOSURE_SUM_DTYPE).sum().cast(pl.Float64),
    pl.col("exposure").sum().alias("exposure_float_sum"),
    pl.col("claim_count").sum(),
    pl.len().cast(pl.Int64).alias("n_policies"),
).sort("district")
stats.write_parquet(out)
print(json.dumps({"rows": rows.height, "kept": first.height}))
"""


def run_child(code: str, args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter; its last stdout line is JSON."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"child failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(root: Path, n: int, bucket_rows: int | None) -> dict[str, Any]:
    """Generate, ingest and compare one size."""
    import polars as pl

    home = root / f"n{n}"
    landing = home / "landing" / "claims"
    landing.mkdir(parents=True)
    csv = landing / f"claims_{MONTH}.csv"
    started = time.perf_counter()
    duplicates = generate(csv, n)
    generate_s = time.perf_counter() - started
    old = time.time() - 3600
    os.utime(csv, (old, old))
    env = {
        **os.environ,
        "PIPELINE_HOME": str(home),
        "DAGSTER_HOME": str(home / "dagster"),
        "TMPDIR": str(home / "tmp"),
        "PIPELINE_PARTITIONS_START": "2026-01-01",
    }
    if bucket_rows:
        env["PIPELINE_CURATE_BUCKET_ROWS"] = str(bucket_rows)
    (home / "tmp").mkdir()
    stored_path, reference_path = home / "stored.parquet", home / "reference.parquet"
    ingest = run_child(INGEST, [MONTH, str(stored_path)], env)
    reference = run_child(REFERENCE, [str(csv), str(reference_path)], env)
    stored = pl.read_parquet(stored_path).sort("district")
    expected = pl.read_parquet(reference_path)
    identical = (
        stored.select("district", "exposure", "claim_count", "n_policies").equals(
            expected.select("district", "exposure", "claim_count", "n_policies")
        )
        and stored.height == expected.height
    )
    float_gap = (
        (expected["exposure"] - expected["exposure_float_sum"]).abs() / expected["exposure"]
    ).max()
    return {
        "rows": n,
        "csv_mb": csv.stat().st_size / 2**20,
        "generate_s": generate_s,
        "duplicates_generated": duplicates,
        **ingest,
        "reference_rows_kept": reference["kept"],
        "statistics_identical": bool(identical),
        "max_rel_gap_to_float_sum": float(float_gap),
        "seconds_per_million_rows": ingest["seconds"] / (n / 1e6),
    }


def measure_scan(root: Path, n: int) -> dict[str, Any]:
    """The PII scan of one generated month of ``n`` rows with notes."""
    import secrets

    from pipeline.domain.demo_data import claims_truth, generate_claims

    home = root / f"pii{n}"
    landing = home / "landing" / "claims"
    landing.mkdir(parents=True)
    csv = landing / f"claims_{MONTH}.csv"
    generate_claims(MONTH, claims_truth(), n_policies=n).write_csv(csv)
    old = time.time() - 3600
    os.utime(csv, (old, old))
    (home / "tmp").mkdir()
    env = {
        **os.environ,
        "PIPELINE_HOME": str(home),
        "DAGSTER_HOME": str(home / "dagster"),
        "TMPDIR": str(home / "tmp"),
        "PIPELINE_PARTITIONS_START": "2026-01-01",
        "PIPELINE_PII_SALT": secrets.token_hex(16),
    }
    run_child(SCAN, [MONTH, "bronze"], env)
    scan = run_child(SCAN, [MONTH, "scan"], env)  # a fresh process: the scan's memory alone
    return {"rows": n, **scan, "ms_per_row": scan["seconds"] / n * 1e3}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.claims_scale")
    parser.add_argument("--quick", action="store_true", help="1M, 2M and 5M rows")
    parser.add_argument("--sizes", help="comma-separated row counts (at least two)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"default {RESULTS}")
    parser.add_argument(
        "--bucket-rows", type=int, help="PIPELINE_CURATE_BUCKET_ROWS (default 1,000,000)"
    )
    args = parser.parse_args(argv)
    sizes = (
        tuple(sorted({int(x) for x in args.sizes.split(",") if x.strip()}))
        if args.sizes
        else (QUICK_SIZES if args.quick else SIZES)
    )
    if len(sizes) < 2:
        parser.error("--sizes needs at least two row counts")
    bucket_rows = args.bucket_rows
    results: dict[str, Any] = {
        "sizes": list(sizes),
        "bucket_rows": bucket_rows or 1_000_000,
        "load_start": os.getloadavg(),
        "cpus": os.cpu_count(),
        "host": platform.node(),
        "per_size": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-claims-") as tmp:
        for n in sizes:
            one = measure(Path(tmp), n, bucket_rows)
            results["per_size"][str(n)] = one
            print(
                f"{n:>12,} rows ({one['csv_mb']:,.0f} MB CSV): {one['seconds']:7.1f} s "
                f"({one['seconds_per_million_rows']:.2f} s per million), peak RSS "
                f"{one['peak_rss_mb']:,.0f} MB, peak anonymous {one['peak_anon_mb']:,.0f} MB "
                f"(after imports {one['imports_anon_mb']:,.0f} MB); {one['rows_curated']:,} "
                f"curated + {one['rows_quarantined']:,} quarantined "
                f"(generated duplicates {one['duplicates_generated']:,}) in "
                f"{one['buckets']} bucket(s); statistics identical to a plain group-by: "
                f"{one['statistics_identical']} (float64 sum differs by at most "
                f"{one['max_rel_gap_to_float_sum']:.1e} relative); checks passed: "
                f"{all(one['checks'].values())}",
                flush=True,
            )
            write(results, args.out)
        scans = results["pii_scan"] = {}
        for n in QUICK_PII_SIZES if args.quick else PII_SIZES:
            one = scans[str(n)] = measure_scan(Path(tmp), n)
            print(
                f"PII scan {n:>9,} rows: {one['seconds']:6.1f} s ({one['ms_per_row']:.2f} ms "
                f"per row), {one['spans']:,} spans, peak anonymous {one['peak_anon_mb']:,.0f} MB",
                flush=True,
            )
            write(results, args.out)
    small, second, large = (results["per_size"][str(n)] for n in (sizes[0], sizes[-2], sizes[-1]))
    memory_ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
    anon_ratio = large["peak_anon_mb"] / small["peak_anon_mb"]
    time_ratio = large["seconds_per_million_rows"] / second["seconds_per_million_rows"]
    results.update(
        memory_ratio=memory_ratio,
        anon_memory_ratio=anon_ratio,
        time_per_row_ratio=time_ratio,
        load_end=os.getloadavg(),
    )
    scan_small, scan_large = (results["pii_scan"][k] for k in sorted(results["pii_scan"], key=int))
    scan_memory = scan_large["peak_anon_mb"] / scan_small["peak_anon_mb"]
    scan_time = scan_large["ms_per_row"] / scan_small["ms_per_row"]
    results.update(pii_scan_memory_ratio=scan_memory, pii_scan_time_per_row_ratio=scan_time)
    misses = []
    if scan_memory > MEMORY_TARGET:
        misses.append(f"PII scan peak memory {scan_memory:.2f}x")
    if scan_time > TIME_TARGET:
        misses.append(f"PII scan time per row {scan_time:.2f}x")
    if memory_ratio > MEMORY_TARGET:
        misses.append(f"peak RSS {memory_ratio:.2f}x from {sizes[0]:,} to {sizes[-1]:,} rows")
    if time_ratio > TIME_TARGET:
        misses.append(f"time per row {time_ratio:.2f}x from {sizes[-2]:,} to {sizes[-1]:,}")
    for n, one in results["per_size"].items():
        if not one["statistics_identical"]:
            misses.append(f"{int(n):,} rows: statistics differ from the plain group-by")
        if one["rows_quarantined"] != one["rows"] - one["reference_rows_kept"]:
            misses.append(f"{int(n):,} rows: quarantined rows are not the repeated policy ids")
        if not all(one["checks"].values()):
            misses.append(f"{int(n):,} rows: a check failed {one['checks']}")
    results["misses"] = misses
    write(results, args.out)
    print(
        f"peak RSS {memory_ratio:.2f}x (anonymous {anon_ratio:.2f}x) from {sizes[0]:,} to "
        f"{sizes[-1]:,} rows (target <= {MEMORY_TARGET}x); time per row {time_ratio:.2f}x from "
        f"{sizes[-2]:,} to {sizes[-1]:,} rows (target <= {TIME_TARGET}x)"
    )
    print(
        f"PII scan: peak anonymous memory {scan_memory:.2f}x, time per row {scan_time:.2f}x "
        f"from {scan_small['rows']:,} to {scan_large['rows']:,} rows"
    )
    print("PASS" if not misses else "FAIL: " + "; ".join(misses))
    return 1 if misses else 0


def write(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())

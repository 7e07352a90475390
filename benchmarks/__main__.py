"""Run every benchmark: ``python -m benchmarks [--quick] [name ...]``.

Each benchmark measures ratios against a baseline in the same run and exits
non-zero when a target is missed; results land in ``benchmarks/results/``.
"""

import argparse
import importlib
import sys
import time

BENCHMARKS = (
    "loan_loss",
    "fx_models",
    "credibility",
    "dev_idle",
    "scale",
    "claims_scale",
    "instance_scale",
)


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks in turn and report which missed their targets."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, same targets")
    parser.add_argument("names", nargs="*", help=f"subset of {', '.join(BENCHMARKS)}")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    failed = []
    for name in args.names or BENCHMARKS:
        print(f"\n=== benchmarks.{name} ===", flush=True)
        started = time.perf_counter()
        module = importlib.import_module(f"benchmarks.{name}")
        code = module.main(["--quick"] if args.quick else [])
        verdict = "PASS" if code == 0 else "FAIL"
        print(f"=== {name}: {verdict} in {time.perf_counter() - started:.0f} s")
        if code:
            failed.append(name)
    if failed:
        print(f"\nmissed targets: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

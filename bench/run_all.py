"""Run every benchmark in ``bench/`` and print one table of figures against targets.

Each benchmark runs as its own process (``--quick`` passed on), one after the
other, its output shown as it goes; its figures are read back from
``bench/results/<name>.json``. The table lists every figure with its target and
``pass`` / ``falls short``; ``bench/results/summary.json`` keeps it, with the
machine and each benchmark's running time.

Exit status: 0 when every benchmark ran and wrote its results (whether or not its
targets were met: these are measurements, not tests), 1 otherwise.

Usage::

    .venv/bin/python bench/run_all.py --quick            # all of them, a few minutes
    .venv/bin/python bench/run_all.py                    # full: tens of minutes
    .venv/bin/python bench/run_all.py --quick --only ingest fanout
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Final

import _common as c

# In the order they run: the cheap ones first.
BENCHES: Final = [
    "log_cost",
    "latency",
    "cpu_overhead",
    "cpu_lockstep",
    "ingest",
    "fanout",
    "memory",
    "dashboard",
    "scale",
    "faults",
]
TIMEOUT_S: Final = {"quick": 600, "full": 3600}


def rows_of(name: str, result: dict[str, Any]) -> list[dict[str, Any]]:
    """The table rows of one benchmark's results."""
    if "checks" in result:
        return [
            {
                "bench": name,
                "figure": check["figure"],
                "value": f"{c.fmt(check['value'])} {check['unit']}".strip(),
                "target": check["target"],
                "verdict": check["verdict"],
            }
            for check in result["checks"]
        ]
    if name == "faults" and "summary" in result:  # bench/faults.py's own format
        summary = result["summary"]
        return [
            {
                "bench": name,
                "figure": f"points lost / duplicated, {summary['trials']} trials x kill -9",
                "value": f"{summary['lost']} / {summary['duplicated']}",
                "target": summary.get("target", "0 lost, 0 duplicated"),
                "verdict": "pass" if summary.get("met") else "falls short",
            }
        ]
    return [{"bench": name, "figure": "?", "value": "?", "target": "?", "verdict": "no figures"}]


def run_one(name: str, quick: bool, wait_quiet: float) -> dict[str, Any]:
    busy = c.wait_for_quiet(wait_quiet) if wait_quiet > 0 else None
    script = c.BENCH / f"{name}.py"
    out = c.RESULTS / f"{name}.json"
    command = [sys.executable, str(script)] + (["--quick"] if quick else [])
    print(f"\n##### {name}: {' '.join(Path(a).name if '/' in a else a for a in command)}")
    started = time.time()
    try:
        returncode = subprocess.run(
            command, cwd=c.ROOT, timeout=TIMEOUT_S["quick" if quick else "full"]
        ).returncode
    except subprocess.TimeoutExpired:
        returncode = None
    elapsed = time.time() - started
    fresh = out.exists() and out.stat().st_mtime >= started
    result = json.loads(out.read_text()) if fresh else {}
    rows = rows_of(name, result) if fresh else []
    if not fresh:
        why = "timed out" if returncode is None else f"exit status {returncode}, no results"
        rows = [{"bench": name, "figure": "-", "value": "-", "target": "-", "verdict": why}]
    return {
        "bench": name,
        "returncode": returncode,
        "seconds": elapsed,
        "ran": fresh,
        "rows": rows,
        "load": result.get("load"),
        "busy_before_cores": busy,
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    columns = ["bench", "figure", "value", "target", "verdict"]
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in columns}
    line = "  ".join(f"{k:<{widths[k]}}" for k in columns).rstrip()
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(f"{str(row[k]):<{widths[k]}}" for k in columns).rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every benchmark's quick mode")
    parser.add_argument("--only", nargs="+", metavar="NAME", help=f"some of {BENCHES}")
    parser.add_argument("--skip", nargs="+", metavar="NAME", default=[], help="leave out")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="before each benchmark, wait up to S seconds for other processes to go quiet",
    )
    args = parser.parse_args(argv)
    wanted = [b for b in (args.only or BENCHES) if b not in args.skip]
    unknown = [b for b in wanted if b not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; known: {BENCHES}")
    present = [b for b in wanted if (c.BENCH / f"{b}.py").exists()]
    for missing in sorted(set(wanted) - set(present)):
        print(f"(bench/{missing}.py not present: skipped)")
    info = c.machine()
    print(
        f"trainwire benchmarks, {'quick' if args.quick else 'full'} mode: {', '.join(present)}"
        f"\nmachine: {info['cpu_model']}, {info['cpus']} CPUs, python {info['python']}"
    )
    started = time.time()
    runs = [run_one(name, args.quick, args.wait_quiet) for name in present]
    rows = [row for run in runs for row in run["rows"]]
    print(f"\n##### summary ({time.time() - started:.0f} s)")
    print_table(rows)
    busy = [r["bench"] for r in runs if r["load"] and c.load_note(r["load"])]
    if busy:
        print(
            f"\nOther processes kept the machine busy during {', '.join(busy)}: those figures"
            " are pessimistic; see each one's 'machine load' line."
        )
    c.RESULTS.mkdir(parents=True, exist_ok=True)
    summary = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "machine": info,
        "seconds": time.time() - started,
        "rows": rows,
        "runs": [{k: v for k, v in run.items() if k != "rows"} for run in runs],
    }
    out = c.RESULTS / "summary.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"summary: {out.relative_to(c.ROOT)}")
    return 0 if all(run["ran"] for run in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Throughput and peak memory of `tunelab data check` (no tokenization) on a generated 1M-line chat file.

    .venv/bin/python bench/data_check.py [--lines 1000000]

Generates a seeded chat JSONL (system + user + assistant, ~560 bytes a line, every prompt distinct)
in a temporary folder, then measures, side by side in this process and its children:
  baseline_read   reading the lines (bytes) and nothing else
  baseline_json   reading + stdlib json.loads of every line: the floor of any pure-Python check
  check_structure `tunelab data check FILE --no-tokens --near-dup-max 0` (all record rules, exact
                  duplicates, conflicts, leakage, length outliers; no near-duplicates)
  check_default   `tunelab data check FILE --no-tokens` (plus near-duplicates on the first 100,000
                  examples: the documented cap)
Each check runs as a child process (the real CLI, interpreter start and imports included); its peak
RSS comes from os.wait4. Writes bench/results/data_check.json and prints it as one JSON line.
Goal (issue 3): >= 50 MB/s without tokenization and < 1 GB peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "data_check.json"
GOAL_MB_PER_S = 50.0
GOAL_PEAK_RSS_MIB = 1024.0
_WORDS = str.split(
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by word "
    "but not what all were we when your can said there use an each which she do how their if will up other about "
    "out many then them these so some her would make like him into time has look two more write go see number no "
    "way could people my than first water been call who oil its now find long down day did get come made may part "
    "order invoice refund account password login error crash slow screen payment card delivery package address"
)


def generate(path: Path, lines: int, seed: int = 0) -> int:
    """A chat JSONL of `lines` distinct examples; returns its size in bytes."""
    rng = random.Random(seed)
    choices, randint = rng.choices, rng.randint
    system = {"role": "system", "content": "You are a support assistant. Answer in one or two sentences."}
    with path.open("w", encoding="utf-8") as f:
        for i in range(lines):
            user = f"Ticket {i}: " + " ".join(choices(_WORDS, k=randint(10, 50)))
            answer = " ".join(choices(_WORDS, k=randint(15, 70))).capitalize() + "."
            record = {"messages": [system, {"role": "user", "content": user}, {"role": "assistant", "content": answer}]}
            f.write(json.dumps(record) + "\n")
    return path.stat().st_size


def baseline(path: Path, parse: bool) -> float:
    started = time.perf_counter()
    loads = json.loads
    with path.open("rb") as f:
        if parse:
            for line in f:
                loads(line)
        else:
            for _ in f:
                pass
    return time.perf_counter() - started


def run_check(path: Path, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "tunelab", "data", "check", str(path), "--no-tokens", "--json", *extra]
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(child.pid, 0)  # the child's own rusage: its peak RSS
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        lines = out.read().strip().splitlines()
        stderr = err.read()
    summary = json.loads(lines[-1]) if lines else {}
    return {
        "command": "tunelab data check FILE --no-tokens --json " + " ".join(extra),
        "seconds": round(seconds, 2),
        "exit_code": os.waitstatus_to_exitcode(status),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "examples": summary.get("examples"),
        "issues": summary.get("issues"),
        "notes": summary.get("notes"),
        "stderr_tail": stderr[-300:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-") as folder:
        path = Path(folder) / "chat.jsonl"
        started = time.perf_counter()
        size = generate(path, args.lines)
        generate_s = time.perf_counter() - started
        mb = size / 1e6
        read_s = baseline(path, parse=False)
        json_s = baseline(path, parse=True)
        structure = run_check(path, ["--near-dup-max", "0"])
        default = run_check(path, [])
    for run in (structure, default):
        run["mb_per_s"] = round(mb / run["seconds"], 1)
        run["lines_per_s"] = round(args.lines / run["seconds"])
        run["vs_json_loads"] = round(run["seconds"] / json_s, 2)  # x the time of parsing the JSON alone
    result = {
        "bench": "data_check",
        "lines": args.lines,
        "bytes": size,
        "avg_line_bytes": round(size / args.lines),
        "generate_s": round(generate_s, 1),
        "baseline_read": {"seconds": round(read_s, 2), "mb_per_s": round(mb / read_s, 1)},
        "baseline_json": {"seconds": round(json_s, 2), "mb_per_s": round(mb / json_s, 1), "lines_per_s": round(args.lines / json_s)},
        "check_structure": structure,
        "check_default": default,
        "goal": {"mb_per_s": GOAL_MB_PER_S, "peak_rss_mib": GOAL_PEAK_RSS_MIB},
        "meets_goal": {
            "throughput": structure["mb_per_s"] >= GOAL_MB_PER_S,
            "memory": max(structure["peak_rss_mib"], default["peak_rss_mib"]) < GOAL_PEAK_RSS_MIB,
        },
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_before": [round(x, 2) for x in load_before],
                    "load_avg_after": [round(x, 2) for x in os.getloadavg()]},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

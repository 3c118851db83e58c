"""What recording the training dynamics (train/dynamics.py) costs a training step, in one process.

    python bench/dynamics_overhead.py                          # tiny-test: the worst case (tiny steps)
    python bench/dynamics_overhead.py --model smollm2-135m-instruct --steps 12

The same model, examples and steps run through the loop's own train_step, alternating step by step
between recording off and on (so a machine that slows down or speeds up weighs on both alike); the
first --warmup steps of each are not timed. Short chat-like examples (lengths uniform in 55..66
tokens, the last 30% the answer), packed into rows of 256, --examples-per-step a step.

Two measurements, both as ratios against this process's own step time:
- step_time_ratio: median step time with recording / without (noisy on a shared machine: the
  recording is a few hundred microseconds against steps of 10 ms to seconds);
- recording_share: the time spent inside the recorder (collecting each micro-batch's token losses,
  reducing them per example, writing the step's line) over the mean step time with recording,
  timed around those calls alone: the overhead itself, free of the machine's noise.
Writes bench/results/dynamics_overhead.json (or --out) with both, per model, and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
RESULTS = Path(__file__).resolve().parent / "results"


class _TimedRecorder:
    """The real recorder, with the time spent in it added up."""

    def __init__(self, recorder):
        self.recorder, self.seconds = recorder, 0.0

    def add(self, micro, losses):
        started = time.perf_counter()
        self.recorder.add(micro, losses)
        self.seconds += time.perf_counter() - started

    def discard(self):
        self.recorder.discard()

    def write_step(self, step, epoch, keep=True):
        started = time.perf_counter()
        self.recorder.write_step(step, epoch, keep)
        self.seconds += time.perf_counter() - started


def measure(model: str, device: str, steps: int, warmup: int, examples_per_step: int, seed: int = 0) -> dict:
    import torch

    from tunelab.config import load_recipe
    from tunelab.data.pack import example_length, pack_rows, plan_steps
    from tunelab.train.dynamics import DynamicsRecorder
    from tunelab.train.loop import batch_builder, train_step
    from tunelab.train.setup import setup_training

    rng = random.Random(seed)
    total = 2 * (steps + warmup)
    examples = []
    for _ in range(total * examples_per_step):
        n = rng.randint(55, 66)
        ids = [rng.randint(10, 40000) for _ in range(n)]
        cut = int(n * 0.7)
        examples.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    recipe = load_recipe(None, [f"model.name={model}", "model.dtype=float32", "lora.dropout=0",
                                "train.warmup_ratio=0", "train.lr_schedule=constant", "train.compile=false"])
    setup = setup_training(recipe, total, device)
    lengths = [example_length(e) for e in examples]
    rows = pack_rows(lengths, 256)
    plan = plan_steps(examples, rows, tokens_per_step=examples_per_step * 61, micro_batch_tokens=256, epochs=1,
                      seed=seed, max_steps=total)
    make_batch = batch_builder(setup, examples, pad_id=0)
    no_signal = SimpleNamespace(received=None)
    times: dict[str, list[float]] = {"off": [], "on": []}
    recorded_s = 0.0
    with tempfile.TemporaryDirectory() as folder:
        recorder = _TimedRecorder(DynamicsRecorder.open(Path(folder), examples, 0))
        for index, step in enumerate(plan):
            mode = "on" if index % 2 else "off"
            before = recorder.seconds
            started = time.perf_counter()
            result = train_step(setup, step, index, make_batch, _ctx(), no_signal, 1.0,
                                recorder if mode == "on" else None)
            if mode == "on":
                recorder.write_step(index + 1, step.epoch, not result.skipped)
            if device == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - started
            if index >= 2 * warmup:
                times[mode].append(elapsed)
                if mode == "on":
                    recorded_s += recorder.seconds - before
        recorder.recorder.close()
        lines = (Path(folder) / "dynamics.jsonl").read_text().count("\n")
    median_off, median_on = statistics.median(times["off"]), statistics.median(times["on"])
    return {
        "model": model, "device": device, "timed_steps_each": len(times["on"]), "examples_per_step": examples_per_step,
        "tokens_per_step_mean": round(statistics.mean(s.tokens for s in plan), 1),
        "step_s_median_off": round(median_off, 5), "step_s_median_on": round(median_on, 5),
        "step_time_ratio": round(median_on / median_off, 4),
        "recording_s_per_step": round(recorded_s / len(times["on"]), 6),
        "recording_share": round(recorded_s / sum(times["on"]), 5),
        "lines_written": lines,
    }


def _ctx():
    from tunelab.train.distributed import SINGLE_PROCESS

    return SINGLE_PROCESS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="alias or folder (repeatable; default tiny-test)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=40, help="timed steps of each mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each mode")
    parser.add_argument("--examples-per-step", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS / "dynamics_overhead.json")
    args = parser.parse_args()
    import torch

    results = [measure(m, args.device, args.steps, args.warmup, args.examples_per_step) for m in args.model or ["tiny-test"]]
    report = {
        "what": "training step time with the training dynamics recorded vs not, same process, steps alternating",
        "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "results": results,
    }
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    kept = [r for r in previous.get("results", []) if (r["model"], r["device"]) not in
            {(n["model"], n["device"]) for n in results}]
    report["results"] = kept + results
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

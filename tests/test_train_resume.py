"""`tunelab train` as a subprocess: SIGKILL at random steps then --resume reproduces the per-step
losses of an uninterrupted run; a damaged newest checkpoint is skipped for the previous one;
SIGTERM writes a complete checkpoint and exits with code 75 and the resume command."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train_examples import reverse_pairs, write_chat_jsonl
from tunelab.train.checkpoint import find_resumable, list_checkpoints, verify_checkpoint
from tunelab.train.loop import EXIT_INTERRUPTED

TOTAL_STEPS = 24
RECIPE = f"""\
name: resume
model: {{name: tiny-test}}
data: {{train: train.jsonl, valid: valid.jsonl, test: test.jsonl, max_seq_len: 128}}
method: lora
lora: {{dropout: 0.1}}      # dropout draws random numbers: resuming must restore the generator
train:
  epochs: 100
  max_steps: {TOTAL_STEPS}
  tokens_per_step: 256      # two rows of 128 per step, one per micro-batch: accumulation
  micro_batch_tokens: 128
  lr: 5.0e-3
  warmup_ratio: 0.1
  eval_every_steps: 6
  checkpoint_every_steps: 3
  keep_checkpoints: 2
  early_stop_patience: null
out_dir: runs
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("resume")
    write_chat_jsonl(folder / "train.jsonl", reverse_pairs(24, seed=1))
    write_chat_jsonl(folder / "valid.jsonl", reverse_pairs(4, seed=2))
    write_chat_jsonl(folder / "test.jsonl", reverse_pairs(4, seed=3))
    (folder / "recipe.yaml").write_text(RECIPE)
    return folder


def _start(workdir: Path, name: str, resume: bool = False) -> subprocess.Popen:
    command = [sys.executable, "-m", "tunelab", "train", "recipe.yaml", f"name={name}"] + (["--resume"] if resume else [])
    # OpenMP threads that spin-wait are 10x+ slower on shared cores; the same setting in every run
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen, timeout_s: float = 240) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=timeout_s)
    return process.returncode, stderr


def _steps_logged(log: Path) -> int:
    if not log.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in log.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


def _wait_for_step(process: subprocess.Popen, log: Path, step: int, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while _steps_logged(log) < step:
        if process.poll() is not None:
            pytest.fail(f"training ended (code {process.returncode}) before step {step}: {process.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no step {step} within {timeout_s} s")
        time.sleep(0.005)


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "train" / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    steps = [r["step"] for r in train]
    assert steps == sorted(set(steps)), f"a step is logged twice or out of order: {steps}"
    return {r["step"]: r["loss"] for r in train}


@pytest.fixture(scope="module")
def uninterrupted(workdir):
    code, stderr = _finish(_start(workdir, "straight"))
    assert code == 0, stderr[-3000:]
    run = workdir / "runs" / "straight"
    losses = _losses(run)
    assert sorted(losses) == list(range(1, TOTAL_STEPS + 1))
    # the run directory's contract
    manifest = json.loads((run / "manifest.json").read_text())
    for key in ("torch", "transformers", "peft", "seed", "git_sha", "tokenizer_sha256", "chat_template_sha256"):
        assert key in manifest, key
    assert manifest["data_fingerprint"]["sha256"]
    summary = json.loads((run / "train" / "summary.json").read_text())
    assert {"steps", "best_step", "best_val_loss", "stopped_early", "tokens", "train_time_s", "method",
            "trainable_params", "total_params"} <= set(summary)
    assert (run / "recipe.yaml").is_file() and any((run / "train" / "tb").iterdir())
    assert (run / "adapter" / "adapter_config.json").is_file() and not (run / "model").exists()
    return run, losses


def _assert_same_run(run: Path, reference: tuple[Path, dict[int, float]]) -> None:
    ref_run, ref_losses = reference
    losses = _losses(run)
    assert sorted(losses) == sorted(ref_losses)
    worst = max(abs(losses[s] - ref_losses[s]) for s in ref_losses)
    assert worst <= 1e-6, f"per-step losses differ by up to {worst}"
    ours = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    theirs = load_file(str(ref_run / "adapter" / "adapter_model.safetensors"))
    for name, tensor in theirs.items():
        assert torch.allclose(ours[name], tensor, atol=1e-6), name
    assert json.loads((run / "train" / "summary.json").read_text())["steps"] == TOTAL_STEPS


def test_sigkill_at_random_steps_then_resume_reproduces_the_losses(workdir, uninterrupted):
    kill_steps = sorted(random.Random(4).sample(range(2, TOTAL_STEPS - 2), 3))
    run = workdir / "runs" / "killed"
    process = _start(workdir, "killed")
    for number, step in enumerate(kill_steps):
        _wait_for_step(process, run / "train" / "log.jsonl", step)
        process.send_signal(signal.SIGKILL)
        process.wait()
        if number == 1:
            # damage the newest checkpoint: resume must skip it and take the one before
            _, newest = list_checkpoints(run / "checkpoints")[-1]
            (newest / "optimizer.safetensors").write_bytes(b"damaged")
            assert verify_checkpoint(newest) is not None
            chosen, skipped = find_resumable(run / "checkpoints")
            assert chosen != newest and skipped
        process = _start(workdir, "killed", resume=True)
    code, stderr = _finish(process)
    assert code == 0, stderr[-3000:]
    events = [json.loads(line) for line in (run / "train" / "log.jsonl").read_text().splitlines()]
    assert sum(e.get("event") == "resume" for e in events) >= 1
    _assert_same_run(run, uninterrupted)


def test_sigterm_checkpoints_exits_75_and_resumes(workdir, uninterrupted):
    run = workdir / "runs" / "termed"
    process = _start(workdir, "termed")
    _wait_for_step(process, run / "train" / "log.jsonl", 7)
    process.send_signal(signal.SIGTERM)
    code, stderr = _finish(process)
    assert code == EXIT_INTERRUPTED, stderr[-3000:]
    assert "resume with: tunelab train recipe.yaml name=termed --resume" in stderr
    chosen, skipped = find_resumable(run / "checkpoints")
    assert chosen is not None and not skipped
    assert int(chosen.name.split("-")[1]) == max(_losses(run))  # the last finished step
    code, stderr = _finish(_start(workdir, "termed", resume=True))
    assert code == 0, stderr[-3000:]
    _assert_same_run(run, uninterrupted)

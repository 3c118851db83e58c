"""`tunelab train --nproc 2` on CPU (torchrun, gloo, tiny model): the same weights as one process,
a NaN on one rank skipped on both, a killed rank stopping the job with an error, not a hang; the
same for full fine-tuning sharded with FSDP2 (train.distributed: fsdp), whose sharded checkpoints
resume to the weights of an uninterrupted run.

Each run starts processes that import torch and transformers, on a shared 2-core machine: few, short
runs (6 steps), one thread per process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import faults
from faults import DUMP_ENV, KILL_ENV, NAN_ENV, step_for_rank
from train_examples import reverse_pairs, write_chat_jsonl
from tunelab.config import Recipe
from tunelab.errors import ConfigError
from tunelab.train.distributed import FullyShardedContext, resolve_strategy

STEPS = 6
# 11 examples (~48 tokens) pack into 6 rows of <= 128 tokens, read as steps of 3, 2 and 1 rows (one
# micro-batch each): rank 0 takes 2 of 3, and in every third step rank 1 has no micro-batch at all
RECIPE = f"""\
name: dist
model: {{name: tiny-test}}
data: {{train: train.jsonl, valid: valid.jsonl, test: test.jsonl, max_seq_len: 128}}
method: lora
lora: {{dropout: 0.0}}      # dropout masks depend on which rank runs a row: off, to compare weights
train:
  epochs: 100
  max_steps: {STEPS}
  tokens_per_step: 256
  micro_batch_tokens: 128
  lr: 5.0e-3
  warmup_ratio: 0.0
  eval_every_steps: 3
  checkpoint_every_steps: 3
  early_stop_patience: null
out_dir: runs
"""
# float32 sums in a different order (per-rank partial sums, then the all-reduce)
WEIGHT_ATOL = 1e-5
# full fine-tuning: AdamW divides by sqrt(v), which can magnify float32 rounding where a gradient is
# tiny; measured 1.1e-8 on this run, bounded here far below lr * steps (6e-4)
FULL_WEIGHT_ATOL = 1e-5
FULL = ("method=full", "train.lr=1.0e-4")
FSDP = (*FULL, "train.distributed=fsdp")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("dist")
    write_chat_jsonl(folder / "train.jsonl", reverse_pairs(11, seed=1))
    write_chat_jsonl(folder / "valid.jsonl", reverse_pairs(4, seed=2))
    write_chat_jsonl(folder / "test.jsonl", reverse_pairs(4, seed=3))
    (folder / "recipe.yaml").write_text(RECIPE)
    return folder


def _start(
    workdir: Path, name: str, nproc: int | None, extra_env: dict[str, str] | None = None, overrides: tuple[str, ...] = ()
) -> subprocess.Popen:
    command = [sys.executable, "-m", "tunelab", "train", "recipe.yaml", f"name={name}", *overrides]
    command += [f"--nproc={nproc}"] if nproc else []
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", **(extra_env or {})}
    if extra_env:  # faults asked for: every process of the run loads them (tests/faults.py)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(faults.SITE), env.get("PYTHONPATH")]))
    return subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(process: subprocess.Popen, timeout_s: float = 300) -> tuple[int, str]:
    try:
        _, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_all(process)
        raise
    return process.returncode, stderr


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train" / "log.jsonl").read_text().splitlines()]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(run) if r["kind"] == "train"}


@pytest.fixture(scope="module")
def one_process(workdir):
    code, stderr = _finish(_start(workdir, "one", None))
    assert code == 0, stderr[-3000:]
    return workdir / "runs" / "one"


def test_two_ranks_reach_the_weights_of_one_process(workdir, one_process):
    code, stderr = _finish(_start(workdir, "two", 2))
    assert code == 0, stderr[-3000:]
    run = workdir / "runs" / "two"
    # logs come from rank 0 only: every step once
    steps = [r["step"] for r in _records(run) if r["kind"] == "train"]
    assert steps == list(range(1, STEPS + 1))
    assert stderr.count("trained 6 steps") == 1, stderr[-3000:]
    ours, theirs = _losses(run), _losses(one_process)
    assert max(abs(ours[s] - theirs[s]) for s in theirs) <= 1e-5, (ours, theirs)
    evals = [r for r in _records(run) if r["kind"] == "eval"]
    ref_evals = [r for r in _records(one_process) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6]
    assert all(abs(a["val_loss"] - b["val_loss"]) <= 1e-5 for a, b in zip(evals, ref_evals, strict=True))
    a = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(one_process / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    moved = False
    for name in b:
        assert torch.allclose(a[name], b[name], atol=WEIGHT_ATOL, rtol=0), (name, (a[name] - b[name]).abs().max())
        moved |= bool(b[name].abs().max() > 0)
    assert moved


@pytest.fixture(scope="module")
def full_one_process(workdir):
    # `--nproc 1` also goes through torchrun (a process group of one): the reference for full fine-tuning
    code, stderr = _finish(_start(workdir, "full-1", 1, overrides=FULL))
    assert code == 0, stderr[-3000:]
    return workdir / "runs" / "full-1"


def _assert_same_full_training(run: Path, reference: Path, atol: float) -> float:
    """Every step's loss within 1e-5 and the output weights within `atol`; returns the largest difference."""
    ours, theirs = _losses(run), _losses(reference)
    assert sorted(ours) == list(range(1, STEPS + 1))
    assert max(abs(ours[s] - theirs[s]) for s in theirs) <= 1e-5, (ours, theirs)
    a = load_file(str(run / "model" / "model.safetensors"))
    b = load_file(str(reference / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[name] - b[name]).abs().max()) for name in b)
    assert worst <= atol, worst
    return worst


def test_full_fine_tuning_two_ranks_equal_one_under_torchrun(workdir, full_one_process):
    code, stderr = _finish(_start(workdir, "full-2", 2, overrides=FULL))
    assert code == 0, stderr[-3000:]
    _assert_same_full_training(workdir / "runs" / "full-2", full_one_process, FULL_WEIGHT_ATOL)


def test_nan_on_one_rank_is_skipped_on_both(workdir):
    out = workdir / "nan-params"
    out.mkdir(exist_ok=True)
    code, stderr = _finish(_start(workdir, "nan", 2, {NAN_ENV: "2@1", DUMP_ENV: str(out)}))
    assert code == 0, stderr[-3000:]
    events = [r for r in _records(workdir / "runs" / "nan") if r["kind"] == "event" and r["event"] == "nonfinite_skipped"]
    assert [e["step"] for e in events] == [2]
    steps = [r["step"] for r in _records(workdir / "runs" / "nan") if r["kind"] == "train"]
    assert steps == [1, 3, 4, 5, 6]
    rank0, rank1 = load_file(str(out / "rank-0.safetensors")), load_file(str(out / "rank-1.safetensors"))
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name


def _worker_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (read from /proc)."""
    found: dict[int, int] = {}
    pending = [launcher_pid]
    while pending:
        pid = pending.pop()
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        pending += [int(c) for c in children]
        ranks = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"RANK=")]
        if ranks and pid != launcher_pid:
            found[int(ranks[0])] = pid
    return found


def _wait_for(process: subprocess.Popen, ready, what: str, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.05)


def _kill_all(process: subprocess.Popen) -> None:
    # torchrun starts each worker in a session of its own: kill them by pid, then torchrun
    for pid in _worker_pids(process.pid).values():
        os.kill(pid, signal.SIGKILL)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()


def test_killed_rank_stops_the_job_with_an_error_then_resume_continues(workdir):
    # long enough that it is still training when the rank is killed
    overrides = ("train.max_steps=2000", "train.epochs=1000")
    process = _start(workdir, "killed", 2, overrides=overrides)
    run = workdir / "runs" / "killed"
    _wait_for(process, lambda: (run / "checkpoints" / "step-3" / "COMPLETE").is_file(), "checkpoint of step 3")
    workers = _worker_pids(process.pid)
    assert sorted(workers) == [0, 1]
    os.kill(workers[1], signal.SIGKILL)
    killed_at = time.monotonic()
    code, stderr = _finish(process, timeout_s=90)
    took_s = time.monotonic() - killed_at
    assert code != 0
    assert took_s < 60, f"the job took {took_s:.0f} s to stop"
    # torchrun names the rank that died; our last line says how to go on
    assert "Signal 9 (SIGKILL)" in stderr, stderr[-3000:]
    assert "resume with: tunelab train recipe.yaml name=killed train.max_steps=2000" in stderr.lower(), stderr[-3000:]

    resumed = _start(workdir, "killed", 2, overrides=("--resume", *overrides))
    try:
        def continued() -> bool:
            records = _records(run)
            resumes = [i for i, r in enumerate(records) if r["kind"] == "event" and r["event"] == "resume"]
            return bool(resumes) and any(r["kind"] == "train" for r in records[resumes[-1] :])

        _wait_for(resumed, continued, "step after resuming")
    finally:
        _kill_all(resumed)
    records = _records(run)
    start = [r for r in records if r["kind"] == "event" and r["event"] == "resume"][-1]
    after = [r["step"] for r in records[records.index(start) :] if r["kind"] == "train"]
    assert start["step"] >= 3 and after[0] == start["step"] + 1


def test_sigterm_to_one_rank_stops_both_at_the_same_step_with_a_checkpoint(workdir):
    process = _start(workdir, "termed", 2, overrides=("train.max_steps=2000", "train.epochs=1000"))
    run = workdir / "runs" / "termed"
    _wait_for(process, lambda: (run / "checkpoints" / "step-3" / "COMPLETE").is_file(), "checkpoint of step 3")
    os.kill(_worker_pids(process.pid)[1], signal.SIGTERM)
    code, stderr = _finish(process, timeout_s=90)
    assert code != 0
    # rank 1 got the signal, rank 0 heard of it through the all-reduce: both stopped after the same step
    assert "stopped by SIGTERM after step" in stderr and "stopped by a signal to another rank after step" in stderr
    steps = {line.split(" after step ")[1].split(";")[0] for line in stderr.splitlines() if " after step " in line}
    assert len(steps) == 1, stderr[-3000:]
    last = max(r["step"] for r in _records(run) if r["kind"] == "train")
    assert steps == {str(last)}
    assert (run / "checkpoints" / f"step-{last}" / "COMPLETE").is_file()


@pytest.fixture(scope="module")
def fsdp_two_processes(workdir):
    code, stderr = _finish(_start(workdir, "fsdp-2", 2, overrides=FSDP))
    assert code == 0, stderr[-3000:]
    return workdir / "runs" / "fsdp-2"


def test_fsdp_two_ranks_reach_the_weights_of_one_process(fsdp_two_processes, full_one_process):
    # sharded: each step's gradients are reduce-scattered (summed) per micro-batch, and in every third step
    # rank 1 runs a zero-weight pass; measured: losses equal, weights within 6e-8
    _assert_same_full_training(fsdp_two_processes, full_one_process, FULL_WEIGHT_ATOL)
    # clipping used the global norm over both ranks' shards (all above train.grad_clip = 1, so clipped);
    # measured within 3e-6 relative
    norms = [[r["grad_norm"] for r in _records(run) if r["kind"] == "train"] for run in (fsdp_two_processes, full_one_process)]
    assert min(norms[1]) > 1.0
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)
    checkpoint = fsdp_two_processes / "checkpoints" / f"step-{STEPS}"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["kind"] == "sharded" and manifest["world_size"] == 2
    # each rank wrote its own shard file and generator states; rank 0 the metadata and state
    assert {"dcp/__0_0.distcp", "dcp/__1_0.distcp", "dcp/.metadata", "rng-0.json", "rng-1.json", "state.json"} <= set(
        manifest["files"]
    )
    assert (checkpoint / "COMPLETE").is_file()


def test_fsdp_killed_rank_stops_the_job_then_resume_reaches_the_uninterrupted_weights(workdir, fsdp_two_processes):
    # rank 1 dies by SIGKILL right after step 3 (and its checkpoint); rank 0 is in step 4's collectives
    process = _start(workdir, "fsdp-killed", 2, {KILL_ENV: "3@1"}, overrides=FSDP)
    code, stderr = _finish(process, timeout_s=240)
    run = workdir / "runs" / "fsdp-killed"
    took_s = time.time() - (run / "checkpoints" / "step-3" / "COMPLETE").stat().st_mtime
    assert code != 0
    assert took_s < 60, f"the job took {took_s:.0f} s to stop"
    assert "Signal 9 (SIGKILL)" in stderr, stderr[-3000:]
    # the survivor's one line (its forward's all-gather failed), not a traceback
    assert "error: rank 0: forward/backward (FSDP all-gather, reduce-scatter) failed: another rank stopped" in stderr
    assert "--resume" in stderr.splitlines()[-1], stderr[-3000:]
    assert max(_losses(run)) == 3
    # a sharded checkpoint whose COMPLETE marker is missing (a crash while writing it) is not resumed from
    shutil.copytree(run / "checkpoints" / "step-3", run / "checkpoints" / "step-5")
    (run / "checkpoints" / "step-5" / "COMPLETE").unlink()
    # a copy to resume with another world size
    other = workdir / "runs" / "fsdp-resharded"
    shutil.copytree(run, other)
    recipe = other / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("name: fsdp-killed", "name: fsdp-resharded"))

    code, stderr = _finish(_start(workdir, "fsdp-killed", 2, overrides=("--resume", *FSDP)))
    assert code == 0, stderr[-3000:]
    assert "step-5 skipped: not complete" in stderr, stderr[-3000:]
    resumes = [r for r in _records(run) if r["kind"] == "event" and r["event"] == "resume"]
    assert [(r["step"], r["message"].endswith("step-3")) for r in resumes] == [(3, True)]
    # the same world size continues exactly: measured bit-identical
    _assert_same_full_training(run, fsdp_two_processes, 1e-6)

    # one process resumes what two wrote: DCP reads the new (whole) shards from both ranks' files
    code, stderr = _finish(_start(workdir, "fsdp-resharded", 1, overrides=("--resume", *FSDP)))
    assert code == 0, stderr[-3000:]
    assert "resuming from runs/fsdp-resharded/checkpoints/step-3" in stderr, stderr[-3000:]
    _assert_same_full_training(other, fsdp_two_processes, FULL_WEIGHT_ATOL)


def test_fsdp_nan_on_one_rank_is_skipped_on_both(workdir):
    out = workdir / "fsdp-nan-params"
    out.mkdir(exist_ok=True)
    code, stderr = _finish(_start(workdir, "fsdp-nan", 2, {NAN_ENV: "2@1", DUMP_ENV: str(out)}, overrides=FSDP))
    assert code == 0, stderr[-3000:]
    records = _records(workdir / "runs" / "fsdp-nan")
    events = [r for r in records if r["kind"] == "event" and r["event"] == "nonfinite_skipped"]
    assert [e["step"] for e in events] == [2]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 3, 4, 5, 6]
    # each rank gathered the full parameters from the shards: the same, and no NaN reached them
    rank0, rank1 = load_file(str(out / "rank-0.safetensors")), load_file(str(out / "rank-1.safetensors"))
    assert rank0.keys() == rank1.keys() and len(rank0) > 0
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
        assert torch.isfinite(rank0[name]).all(), name


def test_strategy_defaults_and_refusals():
    assert resolve_strategy("auto", "lora", 1) == "none"
    assert resolve_strategy("auto", "lora", 2) == "ddp"
    assert resolve_strategy("auto", "full", 4) == "ddp"
    with pytest.raises(ConfigError, match="train.distributed: none"):
        resolve_strategy("none", "lora", 2)
    assert resolve_strategy("fsdp", "full", 2) == "fsdp"
    with pytest.raises(ConfigError, match="train.distributed: fsdp shards full fine-tuning only, but method is lora"):
        resolve_strategy("fsdp", "lora", 2)
    assert Recipe().train.distributed == "auto"
    assert step_for_rank("3", 1) == 3 and step_for_rank("3@1", 1) == 3 and step_for_rank("3@1", 0) is None
    assert step_for_rank(None, 0) is None


def test_fsdp_ranks_run_the_same_number_of_passes():
    # FSDP's forward/backward are collectives: a rank short of micro-batches repeats one, marked not real
    rank0, rank1 = (FullyShardedContext(rank=r, world_size=2) for r in (0, 1))
    assert rank0.lockstep_shard(["a", "b", "c"]) == (["a", "c"], 2)
    assert rank1.lockstep_shard(["a", "b", "c"]) == (["b", "a"], 1)
    assert rank1.lockstep_shard(["a"]) == (["a"], 0)
    assert rank0.lockstep_shard(["a", "b"]) == (["a"], 1) and rank1.lockstep_shard(["a", "b"]) == (["b"], 1)
    assert FullyShardedContext(rank=2, world_size=3).lockstep_shard(["a"]) == (["a"], 0)

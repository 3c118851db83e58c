"""`tunelab run`: check -> prepare -> train -> eval -> audit -> report, each stage writing into the run directory.

Reads a Recipe; writes everything the stages write, plus `stages.json` (which stages finished, and
how long each took). A stage that finds a blocking problem stops the run with its message. With
`resume`, finished stages are skipped and training continues from its newest complete checkpoint.
The data is prepared once: the prepare stage starts the run (train/start.py: tokenizer, replay file, data/,
manifest.json) and the training stage trains on what it returned, in this process (`--nproc`: `tunelab
train` under torchrun, whose rank 0 finds data/ prepared and reuses it by its fingerprint).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.config import Recipe
from tunelab.console import say
from tunelab.contract import DataStats, Stages
from tunelab.errors import ConfigError, DataError, TunelabError
from tunelab.files import lend_dir_lock
from tunelab.runs import RunPaths, removed_unless_trained

if TYPE_CHECKING:
    from tunelab.train.start import StartedRun

STAGES = ("check", "prepare", "train", "eval", "audit", "report")


def _check(recipe: Recipe, paths: RunPaths) -> None:
    """Structure and quality of the input files (tokens are counted by prepare); errors stop the run."""
    from tunelab.data.check import check_data

    data = recipe.data
    if not data.train:
        raise ConfigError("data.train is not set: the recipe names no training file")
    report = check_data(
        data.train, data.valid, fmt=data.format, max_seq_len=data.max_seq_len, system_prompt=data.system_prompt,
        measure_speed=False,
    )
    if recipe.eval.keep:  # a bad must-keep file fails now, not after training
        from tunelab.eval.keep import read_keep

        read_keep(recipe.eval.keep)
    for line in report.summary_lines():
        say(line)
    if report.errors:
        shown = [issue.format() for issue in report.issues if issue.severity == "error"][:20]
        more = report.errors - len(shown)
        raise DataError(
            "\n".join([*shown, *([f"... and {more} more"] if more > 0 else [])])
            + f"\n{report.errors} error(s) in the data: fix them (`tunelab data check {data.train}` lists all)"
        )


def _prepare(recipe: Recipe, paths: RunPaths) -> StartedRun:
    """The data stage into the started run folder (train/start.py prepare_run: tokenizer, replay file,
    data/, manifest.json); the training stage trains on what it returns."""
    from tunelab.train.start import prepare_run

    started = prepare_run(recipe, paths)
    counts = DataStats.from_file(paths.data_stats).counts
    say("prepared " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return started


class TrainingFailed(TunelabError):
    """The training stage's child processes (tunelab run --nproc) stopped with an error."""

    exit_code = 1


def _train_in_children(command: Sequence[str], paths: RunPaths, resume_command: str | None) -> None:
    """The training stage as `command` (`tunelab train` under torchrun); this process keeps the run folder's
    lock and lends it to them while it waits."""
    code = subprocess.run(list(command), check=False, env=lend_dir_lock(paths.root)).returncode
    if code != 0:
        raise TrainingFailed(f"training under torchrun stopped (exit code {code}); torchrun's report above names "
                             f"the rank that failed first (Root Cause). Resume with: {resume_command}")


def run_pipeline(
    recipe: Recipe, resume: bool = False, resume_command: str | None = None, train_command: Sequence[str] | None = None
) -> Path:
    """All stages for one recipe; returns the run directory. With `train_command` (tunelab run --nproc), the
    training stage runs as that command (`tunelab train` of the same recipe under torchrun)."""
    paths = RunPaths(recipe.run_dir)
    stages = Stages.load(paths.stages)
    if not resume:
        if paths.root.exists() and any(paths.root.iterdir()):
            raise ConfigError(
                f"{paths.root} already exists; continue it with --resume, or start a new run with name=NEW"
            )
        stages.reset(STAGES)
        if not paths.root.exists():
            # a new run that fails before training (bad data, a model that does not load) leaves no folder behind
            with removed_unless_trained(paths):
                return _run_stages(recipe, paths, stages, resume, resume_command, train_command)
    return _run_stages(recipe, paths, stages, resume, resume_command, train_command)


def _run_stages(
    recipe: Recipe, paths: RunPaths, stages: Stages, resume: bool, resume_command: str | None,
    train_command: Sequence[str] | None,
) -> Path:
    from tunelab.train.start import start_run_dir

    start_run_dir(paths, recipe, resume)
    prepared: list[StartedRun] = []  # the prepare stage's, in this process

    def prepare_stage(recipe: Recipe, paths: RunPaths) -> None:
        prepared.append(_prepare(recipe, paths))

    def train_stage(recipe: Recipe, paths: RunPaths) -> None:
        from tunelab.train.run import train

        if train_command is not None:  # `tunelab train` under torchrun: its rank 0 finds data/ prepared
            _train_in_children(train_command, paths, resume_command)
            return
        # the data prepared once; with resume (prepare finished earlier) the data stage again, which reuses
        # data/ as it is, and training continues from its newest complete checkpoint
        started = prepared[-1] if prepared else _prepare(recipe, paths)
        train(recipe, resume=resume, resume_command=resume_command, started=started)

    def eval_stage(recipe: Recipe, paths: RunPaths) -> None:
        from tunelab.eval.cleaned import compare_cleaned
        from tunelab.eval.run import evaluate

        # the user's own recipe: its model code setting and its python graders hold
        evaluate(paths.root, trust_remote_code=recipe.model.trust_remote_code, python_graders=True)
        # trained on a copy `tunelab data audit --write-clean` wrote: against the run it was cleaned from
        cleaned = compare_cleaned(recipe, paths, trust_remote_code=recipe.model.trust_remote_code, python_graders=True)
        if cleaned is not None:
            say(f"cleaned data: {cleaned['text']}")

    def audit_stage(recipe: Recipe, paths: RunPaths) -> None:
        from tunelab.eval.audit import MIN_PASSES, audit_run, fewest_passes

        # the training examples most likely wrong (audit/): only with dynamics of two passes or more
        if recipe.method == "dpo":  # pairs have no single answer to doubt: no per-example dynamics are recorded
            say("audit: skipped (a preference run records no per-example answer losses)")
            return
        if fewest_passes(paths.root) < MIN_PASSES:
            say(f"audit: skipped (training saw some examples fewer than {MIN_PASSES} times)")
            return
        _, summary = audit_run(paths.root, trust_remote_code=recipe.model.trust_remote_code)
        say(f"audit: {summary.flagged} of {summary.examples} training examples flagged; {paths.audit}")

    def report_stage(recipe: Recipe, paths: RunPaths) -> None:
        from tunelab.report.html import write_report

        html = write_report(paths.root)
        print(paths.report_md.read_text(encoding="utf-8"), flush=True)
        say(f"report: {html}")

    actions: dict[str, Callable[[Recipe, RunPaths], None]] = {
        "check": _check, "prepare": prepare_stage, "train": train_stage, "eval": eval_stage, "audit": audit_stage,
        "report": report_stage,
    }
    for number, stage in enumerate(STAGES, start=1):
        if stages.done(stage):
            say(f"[{number}/{len(STAGES)}] {stage}: finished earlier, skipped")
            continue
        say(f"[{number}/{len(STAGES)}] {stage}")
        started = time.perf_counter()
        actions[stage](recipe, paths)
        stages.record(stage, time.perf_counter() - started, paths.stages)
    total = stages.total_seconds()
    timing = ", ".join(f"{stage} {stages.seconds(stage):.0f} s" for stage in STAGES if stage in stages.root)
    say(f"done in {total / 60:.1f} min ({timing}); run directory {paths.root}")
    return paths.root

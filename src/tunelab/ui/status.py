"""What a run is doing now: its status, progress, ETA and headline numbers, read from its files.

Reads (each optional) a run folder's recipe.yaml, manifest.json (`parent`), stages.json, data/stats.json,
train/log.jsonl, train/plan.json, train/summary.json, eval/metrics.json and report.html, and for a run
started by the UI its sidecar folder `<runs>/.ui/<name>/` (process.json, console.log; see
tunelab.ui.launch). Writes nothing.

How the status is derived (the same rules are in docs/ui.md):
  alive      the UI started the run and its process is still running (process.json); for a run started
             elsewhere (no process.json), a write to its files within the last ACTIVE_WINDOW_S.
  alive:     evaluating  once training finished (stages.json `train` done, or train/summary.json, or
                         eval/metrics.json exists);
             training    once train/log.jsonl has a step;
             preparing   before that (data check, prepare, model loading).
  not alive: done        the process exited 0, or (exit code unknown) eval/metrics.json exists;
             stopped     exit code 75 (checkpointed on SIGTERM), 130 or a signal; or no exit code and no
                         error in the console log (e.g. a CLI run that was interrupted);
             failed      any other exit code, or an `error:` / traceback line at the end of the console log.
  unreadable  one of its files does not fit its model (tunelab.contract; process.json here), or the run
              folder or a file the UI reads is a link out of the runs folder: that run shows only its
              name and why, the others as usual.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from tunelab.config import Recipe, load_recipe
from tunelab.contract import ContractError, DataStats, Manifest, Metrics, Stages, TrainPlan
from tunelab.errors import TunelabError
from tunelab.report.html import read_json
from tunelab.runs import RunPaths, graders_file_fallback

STATUSES = ("preparing", "training", "evaluating", "done", "failed", "stopped", "unreadable")
ACTIVE_WINDOW_S = 300.0  # a run started elsewhere counts as running while its files changed this recently
STOPPED_EXIT_CODES = (75, 130)  # checkpointed on SIGTERM / interrupted (tunelab.cli)
CONSOLE_TAIL_BYTES = 65536
# tqdm's bar as written to a file: "desc:  40%|####      | 4/10 [..."
_TQDM = re.compile(r"^\s*(?P<desc>[\w+:.-]{1,40}):\s*\d+%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)")


@dataclass
class ProcessInfo:
    """A run started by the UI: its process.json, and whether that process is alive now."""

    pid: int
    command: list[str]
    started: float
    exit_code: int | None
    alive: bool


@dataclass
class ArmProgress:
    arm: str
    done: int
    total: int | None
    state: str  # waiting | running | done


@dataclass
class RunState:
    name: str
    status: str
    detail: str
    model: str | None = None
    method: str | None = None
    train_examples: int | None = None
    step: int | None = None
    total_steps: int | None = None
    eta_s: float | None = None
    primary_metric: str | None = None
    tuned_primary: float | None = None
    tuned_ci95: list[float] | None = None
    best_arm: str | None = None
    verdict: str | None = None
    parent: str | None = None  # the parent run's folder name (manifest.json `parent`)
    started_by_ui: bool = False
    eval_progress: list[ArmProgress] = field(default_factory=list)
    status_line: str | None = None  # the console's last line (runs started by the UI)
    updated: float | None = None  # newest write to the run's status files (epoch seconds)
    has_tuned_model: bool = False


# ---------------------------------------------------------------------------------------------- files


def sidecar_dir(out_dir: Path, name: str) -> Path:
    """Where the UI keeps a run's process.json and console.log (the run folder itself must start empty:
    `tunelab run` refuses a non-empty one)."""
    return out_dir / ".ui" / name


def process_alive(pid: int) -> bool:
    """A live, non-zombie process whose command line mentions tunelab (guards against a reused pid). For
    display only: the UI signals only processes it started itself (tunelab.ui.launch.Launcher)."""
    if pid <= 1:  # -1 and 0 name groups of processes to os.kill, 1 is init: never a run
        return False
    proc = Path("/proc") / str(pid)
    if proc.is_dir():
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            return False
        state = stat.rpartition(")")[2].split()[:1]
        return state != ["Z"] and b"tunelab" in cmdline
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


class ProcessRecord(BaseModel):
    """process.json (writer: tunelab.ui.launch)."""

    model_config = ConfigDict(extra="allow", strict=True)

    pid: int
    command: list[str]
    started: float
    exit_code: int | None = None


def read_process(out_dir: Path, name: str) -> ProcessInfo | None:
    """The run's process.json, None when there is none; ContractError when it does not fit ProcessRecord."""
    path = sidecar_dir(out_dir, name) / "process.json"
    if not path.is_file():
        return None
    found = read_json(path)
    if not found.ok:
        raise ContractError(f"{path}: {found.problem}")
    try:
        record = ProcessRecord.model_validate(found.value)
    except ValidationError as err:
        first = err.errors()[0]
        raise ContractError(f"{path}: {'.'.join(map(str, first['loc'])) or '(top level)'}: {first['msg']}") from None
    return ProcessInfo(record.pid, record.command, record.started, record.exit_code,
                       record.exit_code is None and process_alive(record.pid))


def shown_files(out_dir: Path, name: str) -> list[Path]:
    """The files of run `name` the UI reads or serves (in the run folder and its sidecar)."""
    paths, sidecar = RunPaths(out_dir / name), sidecar_dir(out_dir, name)
    return [paths.recipe, paths.manifest, paths.data_stats, paths.data_issues, paths.data_split("test"),
            paths.data_split("train"), paths.train_log, paths.train_summary, paths.plan, paths.stages, paths.metrics,
            paths.predictions, paths.report_html, sidecar / "process.json", sidecar / "console.log"]


def links_out(out_dir: Path, name: str) -> str | None:
    """Why run `name` is not shown when its folder, its sidecar, or a file the UI reads resolves outside
    the runs folder (a symbolic link out of it), else None: links out are never followed."""
    root = out_dir.resolve()
    for folder in (out_dir / name, sidecar_dir(out_dir, name)):
        if folder.exists() and folder.resolve().parent != folder.parent.resolve():
            return f"{folder}: a link out of the runs folder; not followed"
    if not (out_dir / ".ui").resolve().is_relative_to(root):
        return f"{out_dir / '.ui'}: a link out of the runs folder; not followed"
    for path in shown_files(out_dir, name):
        if (path.exists() or path.is_symlink()) and not path.resolve().is_relative_to(root):
            return f"{path}: a link out of the runs folder; not followed"
    return None


def console_text(out_dir: Path, name: str, max_bytes: int = CONSOLE_TAIL_BYTES) -> str | None:
    """The end of a UI-started run's console log, as text (None when there is none)."""
    path = sidecar_dir(out_dir, name) / "console.log"
    if not path.is_file() or not path.resolve().is_relative_to(out_dir.resolve()):
        return None
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - max_bytes))
        return f.read().decode("utf-8", errors="replace")


def console_lines(text: str) -> list[str]:
    """Lines as a terminal shows them: a progress bar's carriage returns keep only its last state."""
    return [line.rsplit("\r", 1)[-1].rstrip() for line in text.replace("\r\n", "\n").split("\n")]


def _last_train_record(paths: RunPaths, tail_bytes: int = CONSOLE_TAIL_BYTES) -> dict[str, Any] | None:
    """The last `train` record of train/log.jsonl, read from the file's end (a long log is not parsed)."""
    if not paths.train_log.is_file():
        return None
    with paths.train_log.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - tail_bytes))
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # a line being written, cut by the tail, or nested too deeply
            continue
        if isinstance(record, dict) and record.get("kind") == "train":
            return record
    return None


def _recipe(paths: RunPaths) -> Recipe | None:
    """The run's recipe.yaml through the recipe model; None when it is missing or no longer valid."""
    if not paths.recipe.is_file():
        return None
    try:
        return load_recipe(paths.recipe, graders_file_fallback(paths, announce=False))  # a moved run keeps its graders
    except TunelabError:
        return None


def _keys(model: type[DataStats | Manifest | TrainPlan], path: Path) -> dict[str, Any]:
    """A file that only adds numbers to the page (its model's keys as found): {} when it is missing or not
    a JSON object, and the run is shown without them rather than as unreadable."""
    try:
        return model.read_keys(path)
    except ContractError:
        return {}


def _last_write(paths: RunPaths) -> float | None:
    candidates = [paths.root, paths.stages, paths.train_log, paths.plan, paths.metrics, paths.predictions,
                  paths.report_html, paths.data_stats]
    times = [p.stat().st_mtime for p in candidates if p.exists()]
    return max(times) if times else None


def _parent_name(manifest: Any) -> str | None:
    parent = manifest.get("parent") if isinstance(manifest, dict) else None
    if isinstance(parent, dict):
        parent = parent.get("path") or parent.get("run")
    return Path(str(parent)).name if parent else None


# ---------------------------------------------------------------------------------------------- progress


def tqdm_bars(text: str) -> list[tuple[str, int, int]]:
    """Every (description, n, total) state of tqdm bars in console text, in order."""
    out = []
    for segment in re.split(r"[\r\n]", text):
        match = _TQDM.match(segment)
        if match:
            out.append((match["desc"], int(match["n"]), int(match["total"])))
    return out


def eval_progress(bars: list[tuple[str, int, int]], arms: list[str], per_arm_total: int | None) -> list[ArmProgress]:
    """Per arm of the evaluation, from its tqdm bar (one bar over all arms whose description names the
    arm being generated): arms before the current one are done, the current one has n - n at its start."""
    started: dict[str, int] = {}
    order: list[str] = []
    latest = 0
    for desc, n, _total in bars:
        if desc not in started:
            started[desc] = n
            order.append(desc)
        latest = n
    current = order[-1] if order else None
    out = []
    for arm in arms:
        if arm not in started:
            out.append(ArmProgress(arm, 0, per_arm_total, "waiting"))
        elif arm != current:
            later = [started[d] for d in order[order.index(arm) + 1:]]
            out.append(ArmProgress(arm, (later[0] - started[arm]) if later else 0, per_arm_total, "done"))
        else:
            out.append(ArmProgress(arm, latest - started[arm], per_arm_total, "running"))
    return out


def _total_steps(paths: RunPaths, recipe: Recipe | None, bars: list[tuple[str, int, int]]) -> int | None:
    steps = _keys(TrainPlan, paths.plan).get("steps")
    if isinstance(steps, int):
        return steps  # the planned optimizer steps (TrainPlan.steps)
    train_bars = [total for desc, _n, total in bars if desc == "train"]
    if train_bars:
        return train_bars[-1]
    return recipe.train.max_steps if recipe is not None else None


# ---------------------------------------------------------------------------------------------- status


def derive_status(*, alive: bool, exit_code: int | None, trained: bool, steps_logged: int, evaluated: bool,
                  console_tail: list[str]) -> tuple[str, str]:
    """(status, why) by the rules in the module docstring."""
    if alive:
        if trained or evaluated:
            return "evaluating", "training finished; evaluating the arms"
        if steps_logged:
            return "training", "training"
        return "preparing", "checking and preparing the data, loading the model"
    last = next((line.strip() for line in reversed(console_tail) if line.strip()), "")
    if exit_code is not None:
        if exit_code == 0:
            return "done", "finished"
        if exit_code in STOPPED_EXIT_CODES or exit_code < 0:
            return "stopped", f"stopped (exit code {exit_code}); continue it with --resume"
        return "failed", last or f"exit code {exit_code}"
    if evaluated:
        return "done", "finished"
    errors = [line for line in console_tail[-20:] if line.startswith("error:") or line.startswith("Traceback")]
    if errors:
        return "failed", last
    if trained:
        return "stopped", "trained, not evaluated"
    return "stopped", "no process is writing to it; continue it with `tunelab run RECIPE --resume`"


def read_run_state(out_dir: Path, name: str, now: float | None = None) -> RunState:
    """Everything the runs list and a run page show about one run; status "unreadable" (and why) when a
    file of it does not fit its model or links out of the runs folder."""
    problem = links_out(out_dir, name)
    if problem is not None:
        return RunState(name=name, status="unreadable", detail=problem)
    try:
        return _read_run_state(out_dir, name, time.time() if now is None else now)
    except ContractError as err:
        return RunState(name=name, status="unreadable", detail=str(err))


def _read_run_state(out_dir: Path, name: str, now: float) -> RunState:
    paths = RunPaths(out_dir / name)
    recipe = _recipe(paths)
    process = read_process(out_dir, name)
    console = console_text(out_dir, name)
    lines = console_lines(console) if console is not None else []
    bars = tqdm_bars(console) if console is not None else []
    last_train = _last_train_record(paths)
    stages = Stages.from_file(paths.stages) if paths.stages.is_file() else None
    trained = (stages is not None and stages.done("train")) or paths.train_summary.is_file()
    metrics = Metrics.from_file(paths.metrics) if paths.metrics.is_file() else None
    updated = _last_write(paths)
    if process is not None:
        alive = process.alive
    else:
        alive = metrics is None and updated is not None and now - updated < ACTIVE_WINDOW_S
    status, detail = derive_status(alive=alive, exit_code=process.exit_code if process else None, trained=trained,
                                   steps_logged=int(last_train is not None), evaluated=metrics is not None, console_tail=lines)

    counts = _keys(DataStats, paths.data_stats).get("counts")
    counts = {k: v for k, v in counts.items() if isinstance(v, int)} if isinstance(counts, dict) else {}
    manifest = _keys(Manifest, paths.manifest)
    state = RunState(
        name=name, status=status, detail=detail, model=recipe.model.name if recipe else None,
        method=recipe.method if recipe else None,
        train_examples=counts.get("train"),
        parent=_parent_name(manifest),
        started_by_ui=process is not None, updated=updated,
        status_line=next((line for line in reversed(lines) if line.strip()), None),
        has_tuned_model=paths.adapter.is_dir() or paths.model.is_dir(),
    )
    if last_train is not None:
        state.step = last_train.get("step") if isinstance(last_train.get("step"), int) else None
        state.total_steps = _total_steps(paths, recipe, bars)
        elapsed = last_train.get("elapsed_s")
        if status == "training":
            loss = last_train.get("loss")
            of = f" of {state.total_steps}" if state.total_steps else ""
            state.detail = f"step {state.step}{of}" + (f", loss {loss:.4f}" if isinstance(loss, float) else "")
            if state.total_steps and isinstance(elapsed, int | float) and math.isfinite(elapsed) and state.step:
                state.eta_s = max(0.0, (state.total_steps - state.step) * elapsed / state.step)
    if status == "evaluating" and recipe is not None:
        test_count = counts.get("test")
        limit = recipe.eval.limit
        per_arm = min(test_count, limit) if isinstance(test_count, int) and limit else test_count
        state.eval_progress = eval_progress(bars, list(recipe.eval.arms), per_arm)
    if metrics is not None:
        state.primary_metric = metrics.primary_metric
        tuned = metrics.arms.get("tuned")
        if tuned is not None:
            state.tuned_primary, state.tuned_ci95 = tuned.primary, list(tuned.ci95) if tuned.ci95 else None
        state.best_arm, state.verdict = metrics.verdict.best_arm, metrics.verdict.text
    return state


def run_names(out_dir: Path) -> list[str]:
    """Run folders (with a recipe.yaml) and runs the UI started whose folder is not written yet."""
    if not out_dir.is_dir():
        return []
    names = {p.name for p in out_dir.iterdir() if RunPaths(p).recipe.is_file() and not p.name.startswith(".")}
    sidecars = out_dir / ".ui"
    if sidecars.is_dir():
        names |= {p.name for p in sidecars.iterdir() if (p / "process.json").is_file()}
    return sorted(names)


def as_dict(state: RunState) -> dict[str, Any]:
    """The state as JSON can hold it: a number that is not finite (from a run's files) is None."""
    from dataclasses import asdict

    def finite(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, list):
            return [finite(v) for v in value]
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        return value

    return finite(asdict(state))

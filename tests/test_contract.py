"""The run directory's contract: a real run on the tiny model, written by the stages' own writers, read
back through the typed models of tunelab.contract. Fails when a writer and the models disagree: a key a
model requires is missing or has another type, or a writer writes a key no model names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import BaseModel

from tunelab.config import ARMS, load_recipe
from tunelab.contract import (
    RUN_FILES,
    ContractError,
    DataFingerprint,
    Manifest,
    Metrics,
    Stages,
    TrainSummary,
)
from tunelab.pipeline import STAGES
from tunelab.report.html import build_report_context

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "triage" / "recipe.yaml"
FAST = ["model.name=tiny-test", "train.max_steps=2", "train.eval_every_steps=1", "train.eval_max_examples=4",
        "eval.limit=3", "eval.forgetting=false"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir) -> Path:
    from tunelab.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("runs")
    return run_pipeline(load_recipe(EXAMPLE, [*FAST, f"out_dir={out}"]))


def _unnamed_keys(model: BaseModel, where: str) -> list[str]:
    """Keys present in the file that no model field names, anywhere in the nested models."""
    found = [f"{where}.{key}" for key in (model.model_extra or {})]
    for name in type(model).model_fields:
        value = getattr(model, name)
        children = value.items() if isinstance(value, dict) else [(name, value)]
        for key, child in children:
            if isinstance(child, BaseModel):
                found += _unnamed_keys(child, f"{where}.{name}" + (f".{key}" if isinstance(value, dict) else ""))
    return found


def test_every_exchanged_file_reads_through_its_model_with_no_unnamed_keys(run_dir):
    for name, model in RUN_FILES.items():
        parsed = model.from_file(run_dir / name)
        records = parsed.root.values() if isinstance(parsed, Stages) else [parsed]
        unnamed = [key for record in records for key in _unnamed_keys(record, name)]
        assert not unnamed, f"written but not in src/tunelab/contract.py (add them there): {unnamed}"


def test_models_keep_every_value_their_writer_wrote(run_dir, tmp_path):
    for name, model in RUN_FILES.items():
        copy = tmp_path / name.replace("/", "-")
        model.from_file(run_dir / name).write(copy)
        assert json.loads(copy.read_text()) == json.loads((run_dir / name).read_text()), name


def test_the_files_say_what_the_run_did(run_dir):
    recipe = load_recipe(run_dir / "recipe.yaml")
    manifest = Manifest.from_file(run_dir / "manifest.json")
    assert (manifest.model, manifest.method, manifest.seed) == ("tiny-test", "lora", recipe.train.seed)
    fingerprint = DataFingerprint.from_file(run_dir / "data" / "fingerprint.json")
    assert manifest.data_sha256 == fingerprint.sha256 and manifest.data_fingerprint == fingerprint.model_dump(exclude_unset=True)
    summary = TrainSummary.from_file(run_dir / "train" / "summary.json")
    assert summary.steps == 2 and summary.output == "adapter" and (run_dir / summary.output).is_dir()
    stages = Stages.from_file(run_dir / "stages.json")
    assert tuple(stages.root) == STAGES
    assert all(stages.done(stage) for stage in stages.root)
    metrics = Metrics.from_file(run_dir / "eval" / "metrics.json")
    assert list(metrics.arms) == list(ARMS) and metrics.n_examples == 3
    assert metrics.verdict.best_arm in ("tuned", "tuned+rag") and metrics.verdict.vs in ("base", "prompt", "rag")
    assert metrics.cost.training is not None and metrics.cost.training.train_time_s == summary.train_time_s


def test_the_report_reads_every_file_of_a_real_run(run_dir):
    context = build_report_context(run_dir)
    assert context["verdict"]["available"] and context["arms"]["available"] and context["manifest"]["available"]
    assert context["training"]["notes"] == [] and context["training"]["best_step"] is not None
    assert [row["arm"] for row in context["arms"]["rows"]] == list(ARMS)


def test_a_file_that_breaks_its_model_is_named_with_the_field(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"steps": "many"}))
    with pytest.raises(ContractError, match=r"summary.json: steps: .*\(and \d+ more\)"):
        TrainSummary.from_file(path)
    with pytest.raises(ContractError, match="missing"):
        TrainSummary.from_file(tmp_path / "absent.json")
    path.write_text("{half")
    with pytest.raises(ContractError, match="not valid JSON"):
        TrainSummary.from_file(path)


def test_stages_is_the_one_reader_and_writer_of_stages_json(tmp_path):
    path = tmp_path / "stages.json"
    stages = Stages.load(path)  # a new run: no file yet, nothing done
    assert stages.root == {} and not stages.done("check")
    stages.record("check", 1.26, path)
    stages.record("prepare", 12.0, path)
    # the same bytes pipeline.py always wrote: json.dumps(indent=1), no trailing newline
    expected = {"check": {"done": True, "seconds": 1.3}, "prepare": {"done": True, "seconds": 12.0}}
    assert path.read_text() == json.dumps(expected, indent=1)
    again = Stages.load(path)
    assert again.done("check") and again.done("prepare") and not again.done("train")
    assert again.total_seconds() == pytest.approx(13.3) and again.seconds("prepare") == 12.0
    again.reset(("prepare", "train"))  # in memory only, until the next record
    assert list(again.root) == ["check"] and Stages.load(path).done("prepare")
    # a stage recorded again keeps its place and its record is replaced whole; other stages' records are kept
    path.write_text(json.dumps({"check": {"done": False, "seconds": 0.5, "note": "x"},
                                "train": {"done": True, "seconds": 3.0, "note": "y"}}))
    later = Stages.load(path)
    later.record("check", 4.0, path)
    assert json.loads(path.read_text()) == {"check": {"done": True, "seconds": 4.0},
                                            "train": {"done": True, "seconds": 3.0, "note": "y"}}
    path.write_text(json.dumps({"check": {"done": "maybe"}}))
    with pytest.raises(ContractError, match=r"stages.json: check.done"):
        Stages.load(path)


def test_a_second_writer_sets_its_keys_and_keeps_the_owners(tmp_path):
    from tunelab.errors import DataError

    path = tmp_path / "manifest.json"
    assert Manifest.read_keys(path) == {}  # missing: nothing yet
    Manifest.update_keys(path, {"parent": {"name": "p"}})  # lifecycle: before training writes the rest
    path.write_text(json.dumps({"model": "m", "parent": {"name": "p"}, "graders": [1]}))
    Manifest.update_keys(path, {"graders": [{"type": "exact"}]})  # eval: only its own key changes
    assert path.read_text() == json.dumps({"model": "m", "parent": {"name": "p"}, "graders": [{"type": "exact"}]},
                                          indent=1) + "\n"
    assert Manifest.read_keys(path)["model"] == "m"  # partial: read as found, not checked against the model
    path.write_text("{half")
    with pytest.raises(DataError, match="manifest.json: not valid JSON; it is not rewritten"):
        Manifest.update_keys(path, {"graders": []})
    assert path.read_text() == "{half"
    with pytest.raises(ContractError, match="not valid JSON"):
        Manifest.read_keys(path)
    path.write_text("[1, 2]")
    with pytest.raises(ContractError, match="manifest.json: not a JSON object"):
        Manifest.read_keys(path)


def test_run_paths_name_every_run_file_once(tmp_path):
    from tunelab.runs import RunPaths

    paths = RunPaths(tmp_path)
    named = [
        (paths.recipe, "recipe.yaml"), (paths.manifest, "manifest.json"), (paths.stages, "stages.json"),
        (paths.data_stats, "data/stats.json"), (paths.data_fingerprint, "data/fingerprint.json"),
        (paths.data_issues, "data/issues.jsonl"),
        (paths.data_split("test"), "data/test.jsonl"),
        (paths.data_tokens("train"), "data/train.tokens.jsonl"), (paths.train_dir, "train"), (paths.train_log, "train/log.jsonl"),
        (paths.plan, "train/plan.json"), (paths.train_summary, "train/summary.json"),
        (paths.metrics, "eval/metrics.json"), (paths.predictions, "eval/predictions.jsonl"),
        (paths.judge_cache, "eval/judge_cache.jsonl"), (paths.adapter_scale, "eval/adapter_scale.json"),
        (paths.external_cache("hosted"), "eval/external/hosted.jsonl"), (paths.audit, "audit"), (paths.drift, "drift"),
    ]
    assert [path.relative_to(tmp_path).as_posix() for path, _ in named] == [name for _, name in named]
    assert set(RUN_FILES) <= {name for _, name in named}  # every file of the contract has its path here

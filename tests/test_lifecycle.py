"""drift, update and rebase (tunelab.lifecycle) on the tiny model.

The parent run is a full fine-tune of tiny-test on a task it learns in seconds (every answer is
"ok"): its tuned arm scores 100% on its own test set, so a drop on data of another task is real.
(LoRA on the random tiny model cannot move its logits far enough to learn anything: the adapter
tests check weights, not quality.)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tunelab.config import Recipe, load_recipe
from tunelab.errors import ConfigError, DataError
from tunelab.runs import RunPaths

WORDS = ("apple", "river", "stone", "cloud", "paper", "window", "garden", "silver", "music", "forest", "candle", "tiger")
ANIMALS = ("cat", "dog", "horse", "bird")


def own_task(rng: random.Random, i: int) -> dict:
    words = " ".join(rng.choice(WORDS) for _ in range(4))
    return {"messages": [{"role": "user", "content": f"Note {i}: {words}"}, {"role": "assistant", "content": "ok"}]}


def other_task(rng: random.Random, i: int) -> dict:
    animal = rng.choice(ANIMALS)
    return {"messages": [{"role": "user", "content": f"Translate sentence {i} to French, please: the {animal} is very big today"},
                         {"role": "assistant", "content": f"le {animal} est grand"}]}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def unlabelled(rows: list[dict]) -> list[dict]:
    return [{"messages": r["messages"][:-1]} for r in rows]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    files = {
        "train": [own_task(rng, i) for i in range(60)], "test": [own_task(rng, i) for i in range(100, 112)],
        "own_new": [own_task(rng, i) for i in range(200, 212)], "other_new": [other_task(rng, i) for i in range(300, 324)],
    }
    paths = {name: write_jsonl(folder / f"{name}.jsonl", rows) for name, rows in files.items()}
    paths["own_unlabelled"] = write_jsonl(folder / "own_unlabelled.jsonl", unlabelled(files["own_new"]))
    paths["other_unlabelled"] = write_jsonl(folder / "other_unlabelled.jsonl", unlabelled(files["other_new"]))
    return paths


def recipe_for(data: dict[str, Path], out: Path, **changes: object) -> Recipe:
    settings = {
        "name": "own", "out_dir": str(out), "model": {"name": "tiny-test"}, "method": "full",
        "data": {"train": str(data["train"]), "test": str(data["test"]), "max_seq_len": 64},
        "train": {"epochs": 6, "lr": 1.0e-2, "tokens_per_step": 256, "micro_batch_tokens": 512, "warmup_ratio": 0.0,
                  "eval_every_steps": 1000, "checkpoint_every_steps": 1000},
        "eval": {"arms": ["prompt", "tuned"], "max_new_tokens": 3, "forgetting": False, "shots": 2, "rag_k": 2},
    }
    for key, value in changes.items():
        section, _, field = key.partition(".")
        if field:
            settings[section][field] = value
        else:
            settings[section] = value
    return Recipe.model_validate(settings)


def train_and_evaluate(recipe: Recipe) -> RunPaths:
    from tunelab.eval.run import evaluate
    from tunelab.train.run import train

    train(recipe, progress=False)
    evaluate(recipe.run_dir, echo=False)
    return RunPaths(recipe.run_dir)


@pytest.fixture(scope="module")
def parent(data, tmp_path_factory, tiny_model_dir) -> RunPaths:
    paths = train_and_evaluate(recipe_for(data, tmp_path_factory.mktemp("runs")))
    tuned = json.loads(paths.metrics.read_text())["arms"]["tuned"]
    assert tuned["primary"] == 1.0  # the premise of the drift tests: the run masters its own task
    return paths


# ---------------------------------------------------------------------------------------------- drift


def test_drift_flags_data_of_another_task_and_not_of_its_own(parent, data):
    from tunelab.lifecycle.drift import drift
    from tunelab.runs import DriftPaths

    own_results = parent.metrics.read_text()
    other = drift(parent.root, data["other_new"])
    assert other.stale and other.basis == "labels"
    assert other.run_test["primary"] == 1.0 and other.new["tuned"]["primary"] == 0.0
    assert other.tuned_change["significant"] and other.tuned_change["delta_points"] == -100.0
    assert set(other.new) == {"tuned", "prompt", "rag+new"}  # the best prompt-only arm of the verdict, and rag with the new pool
    assert other.new["rag+new"]["n"] == 24  # two folds: every new example scored once
    assert other.text.startswith("stale: tuned fell from 100.0%")
    # the best prompt-only arm scored on both sets, paired by example: the tuned arm lost more than it
    assert other.prompt_only_arm == "prompt" and other.stale_basis == "difference in differences"
    did = other.difference_in_differences
    assert did["paired"] is True and did["significant"] and did["delta_points"] == pytest.approx(
        -100.0 - other.prompt_only_change["delta_points"])
    assert other.primary_range == [0.0, 1.0]  # a run without primary_range: a 0-1 score
    on_disk = json.loads((Path(other.folder) / "drift.json").read_text())
    assert on_disk["stale"] is True and Path(other.folder).parent == parent.root / "drift"
    # the check's folder (runs.DriftPaths): the new examples, the arms scored on them, rag's two folds
    check = DriftPaths(Path(other.folder))
    assert len(check.new_examples.read_text().splitlines()) == 24 and check.result.is_file()
    assert set(json.loads((check.eval / "metrics.json").read_text())["arms"]) == {"tuned", "prompt"}
    assert (check.rag_fold("a") / "metrics.json").is_file() and (check.rag_fold("b") / "metrics.json").is_file()

    same = drift(parent.root, data["own_new"])
    assert not same.stale and same.new["tuned"]["primary"] == 1.0
    assert same.folder != other.folder
    assert parent.metrics.read_text() == own_results  # the run's own evaluation is untouched


def test_unlabelled_drift_measures_input_shift(parent, data):
    from tunelab.lifecycle.drift import drift

    other = drift(parent.root, data["other_unlabelled"])
    assert other.basis == "inputs" and other.stale and other.n_unlabelled == 24 and other.n_labelled == 0
    shift = other.input_shift
    assert shift["shifted"] and shift["p_value"] < 0.05
    assert shift["new_unseen_share"] == 1.0 > shift["baseline_ci95"][1]  # no word pair of the new inputs was trained on
    other_words = {"translate", "sentence", "to", "french", "please", "the", "is", "very", "big", "today", *ANIMALS}
    assert len(shift["top_unseen"]) == 5 and set(" ".join(shift["top_unseen"]).split()) <= other_words

    own = drift(parent.root, data["own_unlabelled"])
    assert not own.stale and not own.input_shift["shifted"]
    assert own.input_shift["baseline_ci95"][0] <= own.input_shift["new_unseen_share"] <= own.input_shift["baseline_ci95"][1] + 0.05


def test_new_data_goes_through_the_data_checks(parent, tmp_path):
    from tunelab.lifecycle.drift import drift

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}\n'
                   "not json\n"
                   '{"messages": [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "hi"}]}\n')
    with pytest.raises(DataError) as err:
        drift(parent.root, bad)
    assert f"{bad}:2: invalid_json" in str(err.value) and f"{bad}:3: bad_role_order" in str(err.value)
    assert not (parent.root / "drift" / "bad").exists()


# ---------------------------------------------------------------------------------------------- update


def test_update_records_its_parent_and_reports_both_test_sets(parent, data):
    from tunelab.lifecycle.update import update
    from tunelab.report.compare import format_run_list, list_runs
    from tunelab.runs import data_fingerprint_id, read_lineage

    lineage = update(parent.root, data["other_new"], replay=0.5, name="own-updated")
    child = RunPaths(parent.root.parent / "own-updated")
    manifest = json.loads(child.manifest.read_text())
    assert manifest["parent"]["path"] == str(parent.root) and manifest["parent"]["kind"] == "update"
    assert manifest["parent"]["data_fingerprint"] == data_fingerprint_id(json.loads(parent.manifest.read_text()))
    assert manifest["data_fingerprint"] is not None  # training's own manifest keys sit beside `parent`
    # continued from the parent's weights (a full fine-tune: its model/ is the new run's starting model)
    assert load_recipe(child.recipe).model.name == str(parent.model)

    new_test = [json.loads(line) for line in (child.root / "inputs" / "new_test.jsonl").read_text().splitlines()]
    train_rows = [json.loads(line) for line in (child.root / "inputs" / "train.jsonl").read_text().splitlines()]
    parent_train = [json.loads(line) for line in (parent.data / "train.jsonl").read_text().splitlines()]
    replayed = [r for r in train_rows if r["id"].startswith("train-")]
    assert len(replayed) == round(0.5 * len(parent_train)) and {r["id"] for r in replayed} <= {r["id"] for r in parent_train}
    assert not {r["id"] for r in new_test} & {r["id"] for r in train_rows}  # held out from training

    old, new = lineage.comparisons
    assert (old.what, new.what) == ("old test", "new examples")
    assert old.n_examples == json.loads(parent.metrics.read_text())["n_examples"] and new.n_examples == len(new_test)
    assert old.parent == 1.0 and new.parent == 0.0  # the parent's own numbers on each set
    assert old.text.startswith("old test 100.0 -> ") and new.text.startswith("new examples 0.0 -> ")
    assert read_lineage(child) == lineage

    report = child.report_md.read_text()
    assert "## Parent (update of own" in report and "| tuned | 100.0" in report
    rows = {r.name: r for r in list_runs(parent.root.parent)}
    assert rows["own-updated"].parent == "update of own" and rows["own"].parent is None
    assert rows["own-updated"].data_fingerprint not in (None, rows["own"].data_fingerprint)
    assert "update of own" in format_run_list(list(rows.values()))


def test_update_refuses_unlabelled_examples_and_an_existing_name(parent, data):
    from tunelab.lifecycle.update import update

    with pytest.raises(DataError, match="no_assistant_message"):
        update(parent.root, data["other_unlabelled"], name="never")
    with pytest.raises(ConfigError, match="already exists"):
        update(parent.root, data["other_new"], name=parent.root.name)
    assert not (parent.root.parent / "never").exists()


# ---------------------------------------------------------------------------------------------- python graders


QUARTER = {"type": "python", "name": "quarter", "source": "def grade(sample, item):\n    return 0.25\n"}


def _run_with_python_grader(parent: RunPaths, folder: Path) -> RunPaths:
    """A copy of the parent whose recipe.yaml (a run folder's, not the user's own) has a python grader."""
    import shutil

    import yaml

    copy = RunPaths(shutil.copytree(parent.root, folder / "graded", ignore=shutil.ignore_patterns("drift")))
    recipe = yaml.safe_load(copy.recipe.read_text())
    recipe["eval"]["graders"] = [QUARTER]
    copy.recipe.write_text(yaml.safe_dump(recipe))
    return copy


def _quarter_ran(eval_dir: Path) -> bool:
    arms = json.loads((eval_dir / "metrics.json").read_text())["arms"]
    return all(row["graders"]["quarter"]["mean"] == 0.25 for row in arms.values())


def test_drift_update_rebase_refuse_a_run_folders_python_grader_without_trust_remote_code(parent, data, tmp_path):
    from typer.testing import CliRunner

    from tunelab.cli import app

    run = _run_with_python_grader(parent, tmp_path)
    for args in (["drift", str(run.root), str(data["other_new"])],
                 ["update", str(run.root), "--add", str(data["other_new"]), "--name", "never"],
                 ["rebase", str(run.root), "--model", str(tmp_path / "no-model"), "--name", "never"]):
        result = CliRunner().invoke(app, args)
        assert isinstance(result.exception, ConfigError), (args, result.output)
        assert str(result.exception) == (
            f"{run.recipe}: grader 'quarter' is Python code from the run folder; tunelab does not run a run "
            "folder's code unasked: add --trust-remote-code if you trust this run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graded"]  # refused before any folder was made
    assert not (run.root / "drift").exists()


def test_drift_and_update_run_a_run_folders_python_grader_with_trust_remote_code(parent, data, tmp_path):
    from typer.testing import CliRunner

    from tunelab.cli import app

    run = _run_with_python_grader(parent, tmp_path)
    result = CliRunner().invoke(app, ["drift", str(run.root), str(data["own_new"]), "--trust-remote-code"])
    assert result.exit_code == 0, result.output
    (folder,) = (run.root / "drift").iterdir()
    assert _quarter_ran(folder / "eval") and _quarter_ran(folder / "rag-new-a") and _quarter_ran(folder / "rag-new-b")

    result = CliRunner().invoke(app, ["update", str(run.root), "--add", str(data["other_new"]), "--name", "graded-update",
                                      "--trust-remote-code"])
    assert result.exit_code == 0, result.output
    child = RunPaths(tmp_path / "graded-update")
    assert _quarter_ran(child.eval) and _quarter_ran(child.eval / "new") and _quarter_ran(child.eval / "parent-on-new")


# ---------------------------------------------------------------------------------------------- adapters


def _adapter(tiny_model, folder: Path, seed: int = 1) -> Path:
    """A saved LoRA adapter (rank 4 on q_proj, v_proj) with non-zero B matrices."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    model.save_pretrained(folder)
    return folder


def _lora_recipe(model: str, adapter: Path | None) -> Recipe:
    return Recipe.model_validate({"model": {"name": model, "adapter": str(adapter) if adapter else None},
                                  "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}})


def test_model_adapter_starts_the_trainable_weights_at_the_adapters(tiny_model, tmp_path):
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from tunelab.train.setup import setup_training

    adapter = _adapter(tiny_model, tmp_path / "adapter")
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    setup = setup_training(_lora_recipe("tiny-test", adapter), total_steps=1, device="cpu")
    start = get_peft_model_state_dict(setup.model)
    assert set(start) == set(saved) and all(start[name].equal(saved[name]) for name in saved)
    assert all(p.requires_grad for n, p in setup.model.named_parameters() if "lora_" in n)
    fresh = get_peft_model_state_dict(setup_training(_lora_recipe("tiny-test", None), total_steps=1, device="cpu").model)
    assert not any(fresh[name].equal(saved[name]) for name in saved if "lora_B" in name)  # not a coincidence of init


def _other_shape_model(folder: Path) -> Path:
    """tiny-test's tokenizer on a model half as wide: the same architecture, other shapes."""
    from transformers import AutoModelForCausalLM

    from tunelab.models import load_tokenizer, tiny_config

    tokenizer = load_tokenizer("tiny-test")
    config = tiny_config(len(tokenizer))
    config.hidden_size, config.intermediate_size, config.head_dim = 32, 64, 8
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_an_adapter_that_does_not_fit_the_base_is_refused_in_one_line(tiny_model, tmp_path):
    from tunelab.train.setup import setup_training

    adapter = _adapter(tiny_model, tmp_path / "adapter")
    narrow = _other_shape_model(tmp_path / "narrow")
    with pytest.raises(ConfigError) as err:
        setup_training(_lora_recipe(str(narrow), adapter), total_steps=1, device="cpu")
    message = str(err.value)
    assert "\n" not in message and f"{adapter} does not fit {narrow}" in message
    assert "lora_A.weight is [4, 64] in the adapter but [4, 32] in the model" in message
    with pytest.raises(ConfigError, match="its r is 4 but the recipe's is 8"):
        setup_training(Recipe.model_validate({"model": {"name": "tiny-test", "adapter": str(adapter)},
                                              "lora": {"rank": 8, "alpha": 8, "targets": ["q_proj", "v_proj"]}}),
                       total_steps=1, device="cpu")


# ---------------------------------------------------------------------------------------------- rebase


def test_rebase_trains_on_the_new_base_and_gives_a_migration_verdict(parent, tmp_path):
    from tunelab.lifecycle.rebase import rebase

    narrow = _other_shape_model(tmp_path / "narrow")
    lineage = rebase(parent.root, str(narrow), name="own-narrow")
    child = RunPaths(parent.root.parent / "own-narrow")
    assert load_recipe(child.recipe).model.name == str(narrow)
    assert json.loads(child.manifest.read_text())["parent"]["kind"] == "rebase"
    # the same test examples: the parent's test split, paired example by example
    def examples(run: RunPaths) -> list:
        return [(r["id"], r["messages"]) for r in map(json.loads, (run.data / "test.jsonl").read_text().splitlines())]

    assert examples(child) == examples(parent)
    tuned, prompt_only = lineage.comparisons
    assert tuned.n_examples == 12 and tuned.parent == 1.0 and prompt_only.parent_arm == "prompt"
    assert lineage.decision in ("move", "stay", "either") and lineage.text.startswith(f"{lineage.decision}: new tuned ")
    assert "old tuned 100.0" in lineage.text


def test_rebase_refuses_to_carry_an_adapter_onto_a_base_it_does_not_fit(data, tmp_path):
    from tunelab.lifecycle.rebase import rebase

    lora_parent = train_and_evaluate(recipe_for(data, tmp_path / "runs", name="lora", method="lora", **{
        "train.epochs": 1, "eval.arms": ["tuned"]}))
    narrow = _other_shape_model(tmp_path / "narrow")
    with pytest.raises(ConfigError) as err:
        rebase(lora_parent.root, str(narrow), carry_adapter=True)
    assert "\n" not in str(err.value) and "does not fit" in str(err.value) and "in the adapter but" in str(err.value)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["lora"]  # refused before any folder was made


# ---------------------------------------------------------------------------------------------- the measured case


def test_lifecycle_example_is_what_its_generator_writes_and_its_catalogue_changes(tmp_path):
    import importlib.util
    import sys

    folder = Path(__file__).resolve().parents[1] / "examples" / "lifecycle"
    spec = importlib.util.spec_from_file_location("lifecycle_generate", folder / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    written = module.write_files(tmp_path, seed=0)
    for name, path in written.items():
        assert path.read_bytes() == (folder / "data" / path.name).read_bytes(), name

    def rows(name: str) -> list[dict]:
        return [json.loads(line) for line in (folder / "data" / f"{name}.jsonl").read_text().splitlines()]

    old = rows("train") + rows("valid") + rows("test")
    new = rows("new")
    old_departments = {r["messages"][-1]["content"] for r in old}
    assert {r["messages"][-1]["content"] for r in new} - old_departments == {"home", "mobility"}
    assert not {r["messages"][1]["content"].lower() for r in new} & {r["messages"][1]["content"].lower() for r in old}
    slices = [json.loads(line)["slice"] for line in (folder / "data" / "new.slices.jsonl").read_text().splitlines()]
    assert len(slices) == len(new) and slices.count("new_product") == slices.count("new_wording") == len(new) // 2
    assert load_recipe(folder / "recipe.yaml").eval.arms == ["prompt", "rag", "tuned"]

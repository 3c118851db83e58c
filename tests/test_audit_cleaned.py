"""A cleaned copy of the training data (`tunelab data audit --write-clean`): where it came from,
and a run trained on it compared with the run it was cleaned from, paired on the same test examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.config import load_recipe
from tunelab.errors import ConfigError
from tunelab.runs import RunPaths


def _rows(n: int, source: Path, flagged=()) -> list[dict]:
    """Audit rows, rank 1 = line n (the last line most suspect)."""
    return [{"rank": i + 1, "file": str(source), "line": n - i, "id": f"train-{n - i}", "suspicion": float(n - i),
             "flagged": (n - i) in flagged, "answer": f"a{n - i}", "model_answer": None} for i in range(n)]


def _source(tmp_path: Path, n: int = 10) -> Path:
    path = tmp_path / "user" / "train.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                            for i in range(1, n + 1)))
    return path


def test_write_clean_records_the_run_lines_and_fingerprint_beside_the_copy(tmp_path):
    from tunelab.eval.audit import write_clean
    from tunelab.eval.cleaned import read_provenance, sha256

    source = _source(tmp_path)
    before = source.read_bytes()
    out = tmp_path / "clean" / "train.jsonl"
    _, dropped = write_clean(_rows(10, source, flagged={10, 7}), 3, out, run_dir=tmp_path / "parent")
    assert dropped == [8, 9, 10]
    assert source.read_bytes() == before  # the user's file is untouched
    record = json.loads((tmp_path / "clean" / "train.jsonl.cleaned-from").read_text())
    assert record["parent_run"] == str((tmp_path / "parent").resolve()) and record["source"] == str(source.resolve())
    assert record["dropped_lines"] == [8, 9, 10] and record["rule"] == "top 3"
    assert [r["flagged"] for r in record["dropped"]] == [False, False, True]
    assert record["sha256"] == sha256(out) and record["source_sha256"] == sha256(source)
    assert read_provenance(out) == (record, None)
    # an edited copy no longer says what it lacks: no comparison, and why
    out.write_text(out.read_text() + source.read_text().splitlines()[9] + "\n")
    again, note = read_provenance(out)
    assert again == record and "changed after `tunelab data audit --write-clean` wrote it" in note
    assert read_provenance(source) == (None, None)  # not a cleaned copy


def test_drop_flagged_leaves_out_exactly_the_flagged_examples(tmp_path):
    from tunelab.eval.audit import write_clean

    source = _source(tmp_path)
    out = tmp_path / "c.jsonl"
    _, dropped = write_clean(_rows(10, source, flagged={10, 4, 2}), 0, out, drop_flagged=True, run_dir=tmp_path)
    assert dropped == [2, 4, 10]
    assert [json.loads(line)["messages"][1]["content"] for line in out.read_text().splitlines()] == [
        f"a{i}" for i in (1, 3, 5, 6, 7, 8, 9)]
    assert json.loads((tmp_path / "c.jsonl.cleaned-from").read_text())["rule"] == "flagged"
    with pytest.raises(ConfigError, match="flags no example"):
        write_clean(_rows(10, source), 0, tmp_path / "d.jsonl", drop_flagged=True)
    assert not (tmp_path / "d.jsonl").exists()


# ---------------------------------------------------------------------------------------------- comparison


def _evaluated(root: Path, scores: dict[str, float], primary: str = "accuracy", test_ids=None) -> RunPaths:
    paths = RunPaths(root)
    paths.eval.mkdir(parents=True)
    paths.data.mkdir(parents=True)
    (paths.eval / "predictions.jsonl").write_text("".join(
        json.dumps({"id": i, "arm": arm, "score": s}) + "\n" for i, s in scores.items() for arm in ("base", "tuned")))
    paths.metrics.write_text(json.dumps({"primary_metric": primary, "arms": {"tuned": {"primary": 0.5}}}))
    ids = list(scores) if test_ids is None else test_ids
    paths.data_split("test").write_text("".join(
        json.dumps({"id": i, "source": f"t.jsonl:{k}", "messages": [{"role": "user", "content": i},
                                                                    {"role": "assistant", "content": "x"}]}) + "\n"
        for k, i in enumerate(ids, start=1)))
    return paths


def _cleaned_copy(tmp_path: Path, parent: Path) -> Path:
    from tunelab.eval.audit import write_clean

    source = _source(tmp_path, 12)
    out = tmp_path / "clean.jsonl"
    write_clean(_rows(12, source, flagged={12, 11}), 0, out, drop_flagged=True, run_dir=parent)
    return out


def test_a_run_on_a_cleaned_copy_is_compared_with_its_parent_paired_on_the_same_examples(tmp_path):
    from tunelab.eval.cleaned import compare_cleaned

    ids = [f"test-{k}" for k in range(40)]
    parent = _evaluated(tmp_path / "runs" / "parent", {i: float(k % 4 != 0) for k, i in enumerate(ids)})  # 30 of 40
    # the child gets 10 more right, and scores one example the parent did not (not paired)
    child = _evaluated(tmp_path / "runs" / "child", {**{i: 1.0 for i in ids}, "test-extra": 0.0})
    out = _cleaned_copy(tmp_path, parent.root)
    recipe = load_recipe(None, [f"data.train={out}", f"out_dir={tmp_path / 'runs'}", "name=child"])
    section = compare_cleaned(recipe, child)
    comparison = section["comparison"]
    assert comparison["n_examples"] == 40 and comparison["parent"] == 0.75 and comparison["child"] == 1.0
    assert comparison["delta_points"] == pytest.approx(25.0) and comparison["p_value"] < 0.01
    assert section["helped"] is True and section["dropped_lines"] == [11, 12] and section["dropped_flagged"] == 2
    assert section["parent_run"] == str(parent.root.resolve()) and section["test"] == "this run's own test set"
    assert section["text"].startswith("Trained without the 2 example(s) its audit flagged of parent: test accuracy "
                                      "75.0 -> 100.0 (+25.0 points")
    assert section["text"].endswith("significantly better); removing them helped.")
    written = json.loads(child.metrics.read_text())
    assert written["cleaned"] == section and written["primary_metric"] == "accuracy"  # the other keys are kept

    # the same runs, no difference: said so
    same = _evaluated(tmp_path / "runs" / "same", {i: float(k % 4 != 0) for k, i in enumerate(ids)})
    flat = compare_cleaned(recipe, same)
    assert flat["helped"] is False and flat["comparison"]["delta_points"] == 0.0
    assert flat["text"].endswith("no significant difference from removing them.")


def test_no_comparison_for_an_edited_copy_a_missing_parent_or_another_metric(tmp_path):
    from tunelab.eval.cleaned import compare_cleaned

    ids = [f"test-{k}" for k in range(8)]
    parent = _evaluated(tmp_path / "parent", dict.fromkeys(ids, 0.0))
    child = _evaluated(tmp_path / "child", dict.fromkeys(ids, 1.0), primary="token_f1")
    out = _cleaned_copy(tmp_path, parent.root)
    recipe = load_recipe(None, [f"data.train={out}"])
    other_metric = compare_cleaned(recipe, child)
    assert other_metric["comparison"] is None and "this run scores token_f1 and the parent run" in other_metric["note"]
    assert other_metric["text"].startswith("Not compared with the run it was cleaned from: ")

    child.metrics.write_text(json.dumps({"primary_metric": "accuracy"}))
    (parent.eval / "predictions.jsonl").unlink()
    gone = compare_cleaned(recipe, child)
    assert gone["comparison"] is None and "has no evaluated test set" in gone["note"]

    out.write_text(out.read_text().replace("a1", "b1"))  # edited by hand after it was written
    edited = compare_cleaned(recipe, child)
    assert edited["comparison"] is None and "changed after" in edited["note"] and edited["dropped_lines"] == [11, 12]
    assert json.loads(child.metrics.read_text())["cleaned"] == edited
    from tunelab.report.html import build_report_context

    shown = build_report_context(child.root)["cleaned"]  # the report says why nothing was compared
    assert shown["available"] and shown["text"] == edited["text"] and shown["dropped"].startswith("2 line(s) of ")

    plain = load_recipe(None, [f"data.train={tmp_path / 'user' / 'train.jsonl'}"])
    assert compare_cleaned(plain, child) is None  # not a cleaned copy: nothing written
    assert json.loads(child.metrics.read_text())["cleaned"] == edited


def test_another_test_split_scores_the_tuned_arm_on_the_parents_scored_examples(tmp_path, monkeypatch):
    from tunelab.eval import run as eval_run
    from tunelab.eval.cleaned import compare_cleaned

    parent_ids = [f"test-{k}" for k in range(6)]
    # the parent scored 6 of its 8 test examples (eval.limit); the child's own split has others
    parent = _evaluated(tmp_path / "parent", dict.fromkeys(parent_ids, 0.0), test_ids=[*parent_ids, "test-6", "test-7"])
    child = _evaluated(tmp_path / "child", {"test-0": 1.0, "test-9": 1.0})
    seen = {}

    def fake_evaluate(run_dir, arms=None, test_file=None, *, recipe=None, out_dir=None, **kwargs):
        rows = [json.loads(line) for line in Path(test_file).read_text().splitlines()]
        seen.update(arms=arms, ids=[r["id"] for r in rows], limit=recipe.eval.limit, run=Path(run_dir))
        Path(out_dir, "predictions.jsonl").write_text("".join(
            json.dumps({"id": r["id"], "arm": "tuned", "score": 1.0}) + "\n" for r in rows))

    monkeypatch.setattr(eval_run, "evaluate", fake_evaluate)
    recipe = load_recipe(None, [f"data.train={_cleaned_copy(tmp_path, parent.root)}", "eval.limit=2"])
    section = compare_cleaned(recipe, child)
    assert seen == {"arms": ["tuned"], "ids": parent_ids, "limit": None, "run": child.root}
    assert section["test"] == "the parent's test examples (eval/cleaned/)"
    assert section["comparison"]["n_examples"] == 6 and section["comparison"]["delta_points"] == 100.0


def test_tunelab_run_on_a_written_clean_copy_reports_against_its_parent(tmp_path):
    """End to end on the tiny model: run, audit --write-clean --drop-top 2, run on the copy."""
    import subprocess
    import sys

    from train_examples import reverse_pairs, write_chat_jsonl

    pairs = reverse_pairs(30, seed=11)
    train = write_chat_jsonl(tmp_path / "train.jsonl", pairs[:22])
    test = write_chat_jsonl(tmp_path / "test.jsonl", pairs[22:])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  name: tiny-test\n")
    fast = [str(recipe), f"data.test={test}", "data.valid_fraction=0", "train.max_steps=2",
            "train.budget=null", "eval.limit=6", "eval.forgetting=false", "eval.arms=[base,tuned]",
            f"out_dir={tmp_path / 'runs'}"]

    def tunelab(*args):
        result = subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    tunelab("run", *fast, "name=parent", f"data.train={train}")
    out = tmp_path / "mine" / "train.clean.jsonl"
    audited = tunelab("data", "audit", str(tmp_path / "runs" / "parent"), "--answers", "3", "--write-clean", str(out),
                      "--drop-top", "2")
    assert f"`tunelab run` with data.train={out} compares itself with" in audited.stdout
    assert len(out.read_text().splitlines()) == 20
    child = tunelab("run", *fast, "name=child", f"data.train={out}")
    section = json.loads((tmp_path / "runs" / "child" / "eval" / "metrics.json").read_text())["cleaned"]
    assert section["parent_name"] == "parent" and len(section["dropped_lines"]) == 2
    assert section["comparison"]["n_examples"] == 6 and section["test"] == "this run's own test set"
    assert "cleaned data: Trained without the 2 most suspect example(s)" in child.stderr
    report = (tmp_path / "runs" / "child" / "report.md").read_text()
    assert "### Trained on a cleaned copy" in report and section["text"] in report
    assert "Trained on a cleaned copy" in (tmp_path / "runs" / "child" / "report.html").read_text()

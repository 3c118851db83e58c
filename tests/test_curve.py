"""`tunelab curve`: nested training subsets, one test set for every point, curve.json's shape, the
doubling projection on synthetic scores, and one-line errors for bad --fractions."""

import json
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tunelab.config import load_recipe
from tunelab.curve import (
    FLAT_GAIN_POINTS,
    Curve,
    CurvePoint,
    build_curve,
    describe_training_policy,
    format_table,
    nested_subsets,
    parse_fractions,
    project_doubling,
)
from tunelab.errors import ConfigError

FAST = ["model.name=tiny-test", "train.max_steps=2", "train.eval_every_steps=1", "train.eval_max_examples=4",
        "eval.limit=6", "eval.max_new_tokens=4", "eval.arms=[base,prompt,tuned]", "eval.shots=2"]


def tunelab(*args):
    return subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True, text=True)


def write_task(folder, n=80):
    """A tiny labelling task in one file: the test and validation splits are cut from it, as in `tunelab run`."""
    rng = random.Random(0)
    words = ["red", "green", "blue", "cold", "warm", "fast", "slow", "dark", "bright", "quiet"]
    lines = []
    for i in range(n):
        text = " ".join(rng.choice(words) for _ in range(4)) + f" item {i}"
        label = "short" if len(text) < 30 else "long"
        lines.append(json.dumps({"messages": [{"role": "user", "content": f"Classify: {text}"},
                                              {"role": "assistant", "content": label}]}))
    (folder / "task.jsonl").write_text("\n".join(lines) + "\n")
    recipe = folder / "recipe.yaml"
    recipe.write_text(f"name: task\ndata:\n  train: task.jsonl\n  max_seq_len: 64\nout_dir: {folder / 'runs'}\n")
    return recipe


def read_ids(path):
    return [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def curve_run(tmp_path_factory, tiny_model_dir):
    """A curve of two fractions whose last evaluation was lost, then resumed with a third fraction added."""
    folder = tmp_path_factory.mktemp("curve")
    recipe = load_recipe(write_task(folder), FAST)
    root = folder / "runs" / "task-curve"
    build_curve(recipe, (0.5, 1.0))
    shutil.rmtree(root / "fraction-1" / "eval")
    before = {name: (root / name / "train" / "log.jsonl").read_text() for name in ("fraction-0.5", "fraction-1")}
    curve = build_curve(recipe, (0.25, 0.5, 1.0), resume=True)
    return recipe, curve, root, before


def test_fractions_are_nested_subsets_of_the_training_split(curve_run):
    recipe, curve, root, _ = curve_run
    pool = read_ids(root / "reference" / "data" / "train.jsonl")
    quarter, half, whole = (read_ids(root / f"fraction-{f}" / "data" / "train.jsonl") for f in ("0.25", "0.5", "1"))
    assert [len(quarter), len(half), len(whole)] == [round(0.25 * len(pool)), round(0.5 * len(pool)), len(pool)]
    assert set(quarter) < set(half) < set(whole) == set(pool)
    # training saw exactly the subset: the tokenized rows are those examples' rows
    assert read_ids(root / "fraction-0.25" / "data" / "train.tokens.jsonl") == quarter
    assert [p.examples for p in curve.points] == [len(quarter), len(half), len(whole)]
    assert all(p.train_steps == 2 for p in curve.points)


def test_every_point_is_tested_on_the_test_set_tunelab_run_would_use(curve_run, tokenizer, tmp_path):
    from tunelab.data.prepare import prepare_data

    recipe, curve, root, _ = curve_run
    run_test = prepare_data(recipe, tokenizer, tmp_path / "data").path("test").read_bytes()
    assert (root / "reference" / "data" / "test.jsonl").read_bytes() == run_test
    expected = read_ids(root / "reference" / "data" / "test.jsonl")[:6]  # eval.limit=6
    for name in ("reference", "fraction-0.25", "fraction-0.5", "fraction-1"):
        rows = [json.loads(line) for line in (root / name / "eval" / "predictions.jsonl").read_text().splitlines()]
        arms = {row["arm"] for row in rows}
        assert arms == ({"base", "prompt"} if name == "reference" else {"tuned"})
        for arm in arms:
            assert [row["id"] for row in rows if row["arm"] == arm] == expected, (name, arm)
    assert curve.test_examples == len(expected)


def test_curve_json_has_the_documented_shape(curve_run):
    recipe, curve, root, _ = curve_run
    data = json.loads((root / "curve.json").read_text())
    assert Curve.model_validate(data) == curve
    assert list(data) == ["version", "name", "model", "primary_metric", "train_pool", "seed", "test_file",
                          "test_examples", "points", "reference", "projection", "primary_range",
                          "same_training_policy", "training_policy"]
    assert list(data["points"][0]) == ["fraction", "examples", "run_dir", "primary", "ci95", "train_sample",
                                       "train_steps", "train_time_s", "seconds", "provisional", "provisional_reason",
                                       "epochs", "limited_by", "budget_reached"]
    assert data["primary_range"] == [0.0, 1.0]  # label accuracy: a 0-1 score
    assert data["primary_metric"] == "label_accuracy"
    for point in data["points"]:
        metrics = json.loads((root / point["run_dir"] / "eval" / "metrics.json").read_text())
        assert point["primary"] == metrics["arms"]["tuned"]["primary"]
        assert point["provisional"] == metrics["verdict"]["provisional"]  # 2 steps: still learning
        assert point["provisional"] is True and "train.max_steps=4" in point["provisional_reason"]
        plan = json.loads((root / point["run_dir"] / "train" / "plan.json").read_text())
        assert (point["epochs"], point["limited_by"]) == (plan["epochs"], "max_steps")
        assert point["ci95"][0] <= point["primary"] <= point["ci95"][1]
    reference = json.loads((root / "reference" / "eval" / "metrics.json").read_text())["arms"]
    assert data["reference"]["arm"] == max(("base", "prompt"), key=lambda arm: reference[arm]["primary"])
    assert data["projection"]["to_examples"] == 2 * data["points"][-1]["examples"]
    assert (root / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (root / "curve.html").read_text()
    assert "<svg" in page and "http" not in page.split("<svg", 1)[1]  # self-contained
    assert data["projection"]["text"] in (root / "curve.md").read_text()
    table = format_table(curve)
    assert table.splitlines()[-1] == data["projection"]["text"]
    assert f"{data['points'][0]['examples']:>8}" in table


def test_resume_keeps_finished_points_and_adds_new_fractions(curve_run):
    recipe, curve, root, before = curve_run
    for name, log in before.items():  # neither trained again
        assert (root / name / "train" / "log.jsonl").read_text() == log
    assert (root / "fraction-1" / "eval" / "metrics.json").is_file()  # its lost evaluation was redone
    assert [p.run_dir for p in curve.points] == ["fraction-0.25", "fraction-0.5", "fraction-1"]
    task = root.parents[1] / "task.jsonl"
    original = task.read_text()
    try:
        task.write_text(original + original.splitlines()[0].replace("item 0", "item x") + "\n")
        with pytest.raises(ConfigError, match="the data or the data settings changed since this curve started"):
            build_curve(recipe, (0.25, 1.0), resume=True)
    finally:
        task.write_text(original)


def test_an_existing_curve_folder_is_never_overwritten(curve_run):
    recipe, _, root, _ = curve_run
    before = (root / "curve.json").read_text()
    with pytest.raises(ConfigError, match="already exists"):
        build_curve(recipe, (0.5, 1.0))
    assert (root / "curve.json").read_text() == before


# ---------------------------------------------------------------------------------------------- projection


def synthetic_scores(means, n_test=400, seed=0):
    """Per-example 0/1 scores with the given means, one row per point."""
    rng = np.random.default_rng(seed)
    return np.array([rng.random(n_test) < m for m in means], dtype=float)


def test_a_rising_curve_projects_a_positive_gain_with_an_interval():
    examples = [100, 200, 400]
    scores = synthetic_scores([0.40, 0.50, 0.60])
    projection = project_doubling(examples, scores, seed=0)
    observed = scores.mean(axis=1)
    assert projection.gain == pytest.approx(np.polyfit(np.log2(examples), observed, 1)[0])
    assert 0 < projection.gain_ci95[0] < projection.gain < projection.gain_ci95[1]
    assert projection.gain == pytest.approx(0.10, abs=0.03)
    assert projection.projected == pytest.approx(observed.mean() + 2 * projection.gain)  # 800 is 2 doublings past the mean of log2 x
    assert not projection.flat and not projection.levelled_off
    assert (projection.from_examples, projection.to_examples) == (400, 800)
    assert projection.text.startswith("doubling the training data (400 -> 800 examples) is projected to gain +")


def test_a_flat_curve_says_more_of_the_same_data_will_not_help():
    projection = project_doubling([100, 200, 400], synthetic_scores([0.50, 0.50, 0.50]), seed=0)
    assert projection.flat
    assert projection.gain_ci95[0] <= 0 <= projection.gain_ci95[1]
    assert projection.text.startswith("flat: more of the same data will not help")


def test_a_curve_that_levelled_off_is_flat_even_when_the_fit_over_all_points_rises():
    scores = synthetic_scores([0.30, 0.60, 0.60])
    projection = project_doubling([100, 200, 400], scores, seed=0)
    assert projection.gain_ci95[0] > 0.05  # the straight fit alone would promise a gain
    assert projection.last_gain == pytest.approx(scores[2].mean() - scores[1].mean())
    assert projection.last_gain_ci95[0] < 0 < projection.last_gain_ci95[1]
    assert projection.levelled_off and projection.flat
    assert projection.text.startswith("flat: more of the same data will not help (the curve has levelled off")
    # still rising at the top: the last step does not override the fit
    assert not project_doubling([100, 200, 400], synthetic_scores([0.30, 0.45, 0.60]), seed=0).levelled_off


def test_a_tiny_but_certain_gain_is_flat_too():
    # every example improves a little: the interval excludes 0, but the gain is under one point
    base = np.linspace(0.2, 0.8, 500)
    scores = np.stack([base, base + 0.004, base + 0.008])
    projection = project_doubling([100, 200, 400], scores, seed=0)
    assert projection.gain_ci95[0] > 0 and 100 * projection.gain < FLAT_GAIN_POINTS
    assert projection.flat


def test_a_1_to_10_judge_is_projected_in_points_of_its_range():
    """0.9 of a 1-10 judge per doubling is 10 points of its range, not 90; 7.3 is 70 points."""
    rng = np.random.default_rng(0)
    means = [5.5, 6.4, 7.3]
    scores = np.array([np.clip(m + rng.normal(0, 0.5, 400), 1, 10) for m in means])
    projection = project_doubling([100, 200, 400], scores, seed=0, score_range=(1, 10))
    assert projection.gain == pytest.approx(0.9, abs=0.05)  # stored in the judge's own units
    assert not projection.flat
    points = 100 * projection.gain / 9
    assert f"is projected to gain {points:+.1f} points" in projection.text
    assert f"(to about {100 * (projection.projected - 1) / 9:.1f})" in projection.text
    # a gain of 0.05 a doubling on 1-10 is under one point of its range: flat, though 5 "points" raw
    flat = project_doubling([100, 200, 400], np.stack([np.linspace(2, 9, 500) + d for d in (0, 0.05, 0.1)]),
                            seed=0, score_range=(1, 10))
    assert flat.flat and flat.text.startswith("flat: more of the same data will not help (+0.6 points per doubling")


# ---------------------------------------------------------------------------------------------- training policy


def _point(examples, epochs, limited_by="data", budget_reached=False, provisional=False):
    return CurvePoint(fraction=examples / 400, examples=examples, run_dir=f"fraction-{examples}", primary=0.5,
                      ci95=(0.4, 0.6), train_sample=None, train_steps=10, train_time_s=1.0, seconds=2.0,
                      provisional=provisional, epochs=epochs, limited_by=limited_by, budget_reached=budget_reached)


def test_the_curve_says_whether_every_point_got_the_same_training_per_example():
    same, text = describe_training_policy([_point(100, 3), _point(200, 3), _point(400, 3)])
    assert same is True and text.startswith("every point trained 3 passes over its examples")
    # the budget had room for more passes on the small set, and cut the large one
    same, text = describe_training_policy([_point(100, 6), _point(200, 3), _point(400, 1.7, "budget", True)])
    assert same is False
    assert text == ("the points differ in training per example: 100 examples 6 passes, 200 examples 3 passes, "
                    "400 examples 1.7 passes (cut by the budget); a point with fewer passes than the others shows "
                    "less than its data can give")
    assert describe_training_policy([_point(100, None), _point(200, 3)])[0] is None


def test_a_provisional_point_is_marked_in_every_output():
    points = [_point(100, 3, provisional=True), _point(200, 3)]
    points[0].provisional_reason = "the tuned model is still learning: validation loss -12%"
    projection = project_doubling([100, 200], synthetic_scores([0.5, 0.5]), seed=0)
    curve = Curve(name="t", model="m", primary_metric="exact_match", train_pool=200, seed=0, test_file="t.jsonl",
                  test_examples=400, points=points, reference=None, projection=projection,
                  same_training_policy=True, training_policy="every point trained 3 passes over its examples")
    from tunelab.curve import _html, _markdown

    table = format_table(curve).splitlines()
    assert table[2].endswith("(provisional)") and not table[3].endswith("(provisional)")
    assert "training: every point trained 3 passes over its examples" in format_table(curve)
    markdown = _markdown(curve)
    assert "| 100 | 50.0 [40.0, 60.0] (provisional) |" in markdown
    assert "Provisional at 100 examples: the tuned model is still learning: validation loss -12%" in markdown
    assert "50.0 [40.0, 60.0] (provisional)</td>" in _html(curve, "<svg></svg>")


# ---------------------------------------------------------------------------------------------- inputs


def test_nested_subsets_are_prefixes_of_one_permutation():
    subsets = nested_subsets(101, (0.1, 0.5, 1.0), seed=3)
    assert [len(s) for s in subsets] == [10, 50, 101]
    assert set(subsets[0]) < set(subsets[1]) < set(subsets[2]) == set(range(101))
    assert nested_subsets(101, (0.1, 0.5, 1.0), seed=4)[0] != subsets[0]  # the seed decides which


@pytest.mark.parametrize(("text", "message"), [
    ("0,0.5,1", "--fractions: 0 is not in (0, 1]"),
    ("0.5,1.5", "--fractions: 1.5 is not in (0, 1]"),
    ("0.25,half,1", "--fractions: 'half' is not a number"),
    ("0.5,0.25,1", "--fractions: 0.5,0.25,1 is not increasing"),
    ("0.5,0.5,1", "--fractions: 0.5,0.5,1 repeats"),
    ("1", "--fractions: give at least two"),
])
def test_bad_fractions_are_refused(text, message):
    with pytest.raises(ConfigError) as err:
        parse_fractions(text)
    assert str(err.value).startswith(message)


def test_fractions_that_round_to_the_same_size_are_refused():
    with pytest.raises(ConfigError, match="0.1 and 0.12 of 10 training examples are both 1 examples"):
        nested_subsets(10, (0.1, 0.12, 1.0), seed=0)
    with pytest.raises(ConfigError, match="0.01 of 10 training examples is no example"):
        nested_subsets(10, (0.01, 1.0), seed=0)


def test_cli_bad_fractions_is_one_line_before_anything_loads(tmp_path):
    result = tunelab("curve", str(tmp_path / "missing.yaml"), "--fractions", "0.5,nan")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --fractions: nan is not in (0, 1]: each is a share of the training split"
    assert not (tmp_path / "runs").exists()

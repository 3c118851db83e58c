"""The run report and `tunelab runs`: every section and chart rendered from a complete run directory,
user text escaped, nothing referencing the network (checked statically and in headless Chromium),
missing or damaged files named instead of crashing; runs list by status; runs compare on the same
eval set with the paired test, and refusing different eval sets.

The run directory is written here from Python (make_run) through the typed models of tunelab.contract
(the ones the stages' writers and the report's readers share), with numbers of the size the triage
demo produces; some user text carries HTML.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tunelab.config import ARMS
from tunelab.contract import Manifest, Metrics, TrainSummary
from tunelab.errors import ConfigError
from tunelab.report.compare import compare_runs, format_run_list, list_runs, render_comparison_markdown
from tunelab.report.html import PLOTS, SECTIONS, build_report_context, describe_mapping, write_report

CHROMIUM = Path("/usr/bin/chromium")

# ---------------------------------------------------------------------------------------------- fixture

HOSTILE = '<script>alert("x")</script><img src="https://evil.example/x.png">'
ARM_QUALITY = {"base": 0.18, "prompt": 0.46, "rag": 0.55, "tuned": 0.93, "tuned+rag": 0.91}
ARM_PROMPT_TOKENS = {"base": 52.0, "prompt": 561.0, "rag": 268.0, "tuned": 52.0, "tuned+rag": 268.0}
ARM_LATENCY_MS = {"base": 410.0, "prompt": 1460.0, "rag": 930.0, "tuned": 380.0, "tuned+rag": 960.0}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1), encoding="utf-8")


def make_test_file(folder: Path, n_examples: int, seed: int = 0) -> Path:
    """A user test file (chat JSONL) with a sibling slices file, as examples/triage/generate.py writes."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows, slices = [], []
    for i in range(n_examples):
        answer = json.dumps({"category": rng.choice(["billing", "delivery"]), "urgency": "high",
                             "order_id": str(10000 + i), "product": "router"}, separators=(",", ":"))
        text = f"My router never came, order {10000 + i}!" + (f" {HOSTILE}" if i == 0 else "")
        rows.append({"messages": [{"role": "system", "content": "Triage the ticket. Reply with JSON only."},
                                  {"role": "user", "content": text}, {"role": "assistant", "content": answer}]})
        slices.append({"line": i + 1, "slice": ("seen", "new_combo", "new_template")[i % 3]})
    _write_jsonl(folder / "test.jsonl", rows)
    _write_jsonl(folder / "test.slices.jsonl", slices)
    return folder / "test.jsonl"


def make_run(
    root: Path,
    name: str = "triage",
    model: str = "smollm2-135m-instruct",
    n_examples: int = 30,
    tuned_quality: float = ARM_QUALITY["tuned"],
    seed: int = 0,
    test_file: Path | None = None,
) -> Path:
    """runs/<name>/ with every file a finished `tunelab run` leaves (no weights)."""
    run = root / name
    rng = random.Random(seed)
    quality = {**ARM_QUALITY, "tuned": tuned_quality}
    test_file = test_file or make_test_file(root / f"{name}-input", n_examples)
    test_rows = [json.loads(line) for line in test_file.read_text().splitlines()][:n_examples]

    recipe = (f"name: {name}\nmodel:\n  name: {model}\n  revision: null\nmethod: lora\n"
              "train:\n  max_steps: 40\n  lr: 0.0005\neval:\n  limit: 100\nout_dir: runs\n")
    run.mkdir(parents=True, exist_ok=True)
    (run / "recipe.yaml").write_text(recipe, encoding="utf-8")
    Manifest(
        tunelab="0.1.0", python="3.11.2", torch="2.13.0", transformers="5.24.0", peft="0.21.0", git_sha="c38f997",
        model=model, method="lora", seed=0, data_seed=0,
        data_fingerprint={"version": 1, "inputs": {"train": {"path": "data/train.jsonl", "sha256": "cd34" * 16}},
                          "tokenizer_sha256": "ef56" * 16, "chat_template_sha256": "0a1b" * 16,
                          "settings": {"max_seq_len": 256}, "sha256": "ab12" * 16},
        tokenizer_sha256="ef56" * 16, chat_template_sha256="0a1b" * 16,
    ).write(run / "manifest.json")

    # data stage
    data = run / "data"
    _write_json(data / "stats.json", {
        "counts": {"read": 1100, "accepted": 1097, "rejected": 3, "train": 797, "valid": 100, "test": 200},
        "issues": {"errors": 0, "warnings": 4, "by_code": {"near_duplicate": 3, "too_long": 1}},
        "quality": {"exact_duplicates": 3, "near_duplicates": 3, "leakage": 1, "conflicts": 0,
                    "length_outliers": 2, "too_long": 1},
        "tokens": {"min": 55, "median": 77, "p95": 92, "max": 101, "total": 61209, "trainable_total": 18310},
    })
    _write_jsonl(data / "issues.jsonl", [
        {"path": "examples/triage/data/train.jsonl", "line": 17, "code": "near_duplicate", "severity": "warning",
         "message": f"near-duplicate of line 402 {HOSTILE}"},
        {"path": "examples/triage/data/valid.jsonl", "line": 3, "code": "leakage", "severity": "warning",
         "message": "near-duplicate of train line 88"},
    ])
    _write_jsonl(data / "test.jsonl", [
        {"id": f"test-{i:06d}", "source": f"{test_file}:{i + 1}", "messages": row["messages"]}
        for i, row in enumerate(test_rows)
    ])

    # training
    log = []
    for step in range(1, 41):
        loss = 0.35 + 2.4 * math.exp(-step / 7)
        log.append({"kind": "train", "step": step, "epoch": step / 30, "loss": loss,
                    "token_acc": min(0.97, 1.02 - 0.35 * loss), "lr": 5e-4, "grad_norm": 1.1, "tokens": 2048 * step,
                    "trainable_tokens": 610 * step, "tokens_per_s": 171.0, "peak_mem_gib": 2.1,
                    "elapsed_s": 12.0 * step})
        if step % 10 == 0:
            val = {10: 0.92, 20: 0.51, 30: 0.44, 40: 0.47}[step]
            log.append({"kind": "eval", "step": step, "val_loss": val, "val_token_acc": 1.0 - 0.3 * val,
                        "train_loss": loss * 0.97, "train_token_acc": 1.0 - 0.3 * loss, "is_best": step == 30})
            log.append({"kind": "event", "step": step, "event": "checkpoint", "message": f"checkpoints/step-{step}"})
    log.append({"kind": "event", "step": 40, "event": "overfitting",
                "message": "validation loss rose (0.44 -> 0.47) while train loss fell"})
    _write_jsonl(run / "train" / "log.jsonl", log)
    TrainSummary(
        steps=40, best_step=30, best_val_loss=0.44, stopped_early=False, tokens=81920, trainable_tokens=24400,
        train_time_s=482.0, method="lora", trainable_params=4884480, total_params=139400000, output="adapter",
        output_step=30,
    ).write(run / "train" / "summary.json")

    # evaluation: per-example scores first, then the means metrics.json reports
    predictions, per_arm = [], {a: [] for a in ARMS}
    for i, row in enumerate(test_rows):
        reference = row["messages"][-1]["content"]
        for arm in ARMS:
            score = float(rng.random() < quality[arm])
            output = reference if score else '{"category":"other","urgency":"medium"}'
            if arm == "base" and i == 0:
                output = f"Sure! {HOSTILE}"
                score = 0.0
            per_arm[arm].append(score)
            predictions.append({"id": f"test-{i:06d}", "arm": arm, "prompt_tokens": int(ARM_PROMPT_TOKENS[arm]),
                                "completion_tokens": 24, "output": output, "reference": reference,
                                "score": score, "latency_ms": ARM_LATENCY_MS[arm]})
    _write_jsonl(run / "eval" / "predictions.jsonl", predictions)
    arms = {}
    for arm in ARMS:
        mean = sum(per_arm[arm]) / len(per_arm[arm])
        arms[arm] = {"primary": mean, "ci95": [max(mean - 0.08, 0.0), min(mean + 0.08, 1.0)],
                     "prompt_tokens_mean": ARM_PROMPT_TOKENS[arm], "completion_tokens_mean": 24.3,
                     "latency_ms_p50": ARM_LATENCY_MS[arm], "latency_ms_p95": ARM_LATENCY_MS[arm] * 1.4,
                     "batch_size": 16, "tokens_per_s": 60.0, "finish_reasons": {"stop": 28, "length": 2},
                     "usd_per_1m_queries": round(ARM_PROMPT_TOKENS[arm] * 0.15 + 24.3 * 0.6, 2),
                     "model": "tuned" if arm.startswith("tuned") else "base", "shots_mean": 3.0 if arm != "base" else 0.0,
                     "decoding": {"max_new_tokens": 40, "temperature": 0.0, "top_p": 1.0, "seed": 0},
                     "metrics": {"json_field_accuracy": mean, "json_valid": min(1.0, mean + 0.1),
                                                   "exact_match": mean * 0.9}}
    delta = arms["tuned"]["primary"] - arms["rag"]["primary"]
    winner = "tuned" if delta > 0 else "rag"  # the verdict text says what these numbers say
    usd = {a: round(ARM_PROMPT_TOKENS[a] * 0.15 + 24.3 * 0.6, 2) for a in ARMS}
    Metrics.model_validate({
        "primary_metric": "json_field_accuracy", "n_examples": len(test_rows),
        "primary_reason": "references are JSON objects: per-field accuracy", "output_kind": "json",
        "test_file": str(test_file), "model": model, "tuned_weights": "adapter", "seed": 0, "elapsed_s": 301.5,
        "pools": {"train_examples": 797, "pool_size": 797, "refused": [], "documents": None},
        "arms": arms,
        "verdict": {"best_arm": "tuned", "vs": "rag", "delta": delta, "ci95": [delta - 0.15, delta + 0.15],
                    "p_value": 0.0002, "winner": winner, "recommended": winner, "significant": True,
                    "text": (f"fine-tuning beats the best prompt-only approach by {100 * delta:.1f} points, 95% CI "
                             f"[{100 * delta - 15:.1f}, {100 * delta + 15:.1f}] (tuned vs rag, p = 0.0002)") if delta > 0
                    else (f"the best prompt-only approach beats fine-tuning by {-100 * delta:.1f} points, 95% CI "
                          f"[{-100 * delta - 15:.1f}, {-100 * delta + 15:.1f}]: prefer prompting (rag vs tuned, "
                          "p = 0.0002)")},
        "decoding": {"max_new_tokens": 40, "temperature": 0.0, "top_p": 1.0, "seed": 0, "stop": "end-of-turn",
                     "batch_size": 16},
        "cost": {"prices": {"usd_per_m_input_tokens": 0.15, "usd_per_m_output_tokens": 0.6, "gpu_usd_per_hour": 2.5},
                 "per_arm": {a: {"usd_per_query": usd[a] / 1e6, "usd_per_1m_queries": usd[a],
                                 "prompt_tokens_mean": ARM_PROMPT_TOKENS[a], "tokens_per_s": 60.0} for a in ARMS},
                 "training": {"train_time_s": 482.0, "usd": 0.33, "basis": "train_time_s x gpu_usd_per_hour"},
                 "break_even": {f"tuned vs {a}": {"usd_saved_per_query": (usd[a] - usd["tuned"]) / 1e6,
                                                  "queries": 4100 if a == "rag" else None} for a in ARMS[:3]},
                 "break_even_queries": 4100,
                 "text": "training cost $0.33 is repaid by shorter prompts after 4,100 queries (tuned vs rag)"},
        "prompts": {"instructions": f"Triage the ticket carefully. {HOSTILE}", "shots": 3, "rag_k": 3,
                    "example": {a: [{"role": "system", "content": "Triage the ticket. Reply with JSON only."},
                                    {"role": "user", "content": test_rows[0]["messages"][1]["content"]}] for a in ARMS}},
        "overfitting": {"loss_curve": [{"step": s, "train_loss": 0.5, "val_loss": v}
                                       for s, v in ((10, 0.92), (20, 0.51), (30, 0.44), (40, 0.47))],
                        "overfitting_events": [], "best_step": 30, "best_val_loss": 0.44, "final_val_loss": 0.47,
                        "final_train_loss": 0.35, "final_gap": 0.12, "val_rising_while_train_falls": True,
                        "reference_is_train_answer": 0.02,
                        "verbatim": {a: {"output_is_train_answer": 0.01, "wrong_and_train_answer": 0.0} for a in ARMS},
                        "task_metric": {"arm": "tuned", "metric": "json_field_accuracy", "train_sample_n": 50,
                                        "train_sample": 0.95, "train_sample_ci95": [0.9, 0.99], "test": 0.93,
                                        "test_ci95": [0.85, 1.0], "train_minus_test": 0.02}},
        "forgetting": {"threshold": 0.05, "flagged": False,
                       "text": "no significant loss of general ability (perplexity +1.2%, probes -2.5 points)",
                       "perplexity": {"base": 14.2, "tuned": 14.37, "relative_change": 0.012, "ci95": [-0.004, 0.03],
                                      "flagged": False},
                       "probes": {"n": 40, "base_accuracy": 0.55, "tuned_accuracy": 0.525, "delta": -0.025,
                                  "ci95": [-0.1, 0.05], "p_value": 0.62, "flagged": False,
                                  "by_kind": {"arithmetic": {"n": 14, "base": 0.43, "tuned": 0.43},
                                              "fact": {"n": 14, "base": 0.71, "tuned": 0.64},
                                              "format": {"n": 12, "base": 0.5, "tuned": 0.5}}},
                       "probe_outputs": [{"id": f"fact-{i}", "kind": "fact", "prompt": "What is the capital of France?",
                                          "base_output": "Paris", "base_score": 1.0, "tuned_output": "Paris.",
                                          "tuned_score": 1.0} for i in range(14)]},
    }).write(run / "eval" / "metrics.json")
    return run


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return make_run(tmp_path / "runs")


def tunelab(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True, text=True, cwd=cwd)


class PageParser(HTMLParser):
    """Collects ids by tag, which plots hold an <svg>, every attribute value, style text and tags."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: dict[str, str] = {}  # id -> tag
        self.order: list[str] = []  # section ids in document order
        self.tags: list[str] = []
        self.attributes: list[tuple[str, str, str]] = []  # (tag, name, value)
        self.style_text = ""
        self.figure_stack: list[str] = []
        self.figures_with_svg: dict[str, int] = {}  # figure id -> number of drawn elements inside
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attributes = dict(attrs)
        for name, value in attrs:
            self.attributes.append((tag, name, value or ""))
        if "id" in attributes:
            self.ids[attributes["id"]] = tag
            if tag == "section":
                self.order.append(attributes["id"])
        if tag == "figure":
            self.figure_stack.append(attributes.get("id", ""))
        if self.figure_stack and tag in ("path", "use", "rect", "line", "polyline", "circle", "text"):
            self.figures_with_svg[self.figure_stack[-1]] = self.figures_with_svg.get(self.figure_stack[-1], 0) + 1
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        if tag == "figure" and self.figure_stack:
            self.figure_stack.pop()
        if tag == "style":
            self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.style_text += data


def parse(html: str) -> PageParser:
    parser = PageParser()
    parser.feed(html)
    return parser


def assert_offline(page: PageParser) -> None:
    """Nothing the browser would fetch: no URL in any attribute or style, no external resource tags."""
    for tag, name, value in page.attributes:
        lowered = value.strip().lower()
        assert "http:" not in lowered and "https:" not in lowered, (tag, name, value)
        if name in ("src", "href", "xlink:href", "action", "data", "poster"):
            assert lowered.startswith("#") or lowered.startswith("data:"), (tag, name, value)
    assert "url(" not in page.style_text and "@import" not in page.style_text
    for forbidden in ("script", "link", "iframe", "img", "object", "embed", "base"):
        assert forbidden not in page.tags, forbidden


# ---------------------------------------------------------------------------------------------- report


def test_report_has_every_section_and_plot_in_order(run_dir):
    html_path = write_report(run_dir)
    page = parse(html_path.read_text())
    assert page.order == [section_id for section_id, _ in SECTIONS]  # the verdict comes first
    for plot in PLOTS:
        assert page.ids.get(plot) == "figure", plot
        assert page.figures_with_svg.get(plot, 0) > 10, f"{plot} has no drawing"
    assert (run_dir / "report.md").is_file()


def test_report_shows_the_runs_numbers(run_dir):
    html = write_report(run_dir).read_text()
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    tuned, rag = metrics["arms"]["tuned"], metrics["arms"]["rag"]
    verdict_html = html[html.index('id="verdict"'):html.index('id="data"')]
    assert metrics["verdict"]["text"].split(" (")[0] in verdict_html
    assert f"{100 * tuned['primary']:.1f} [{100 * tuned['ci95'][0]:.1f}, {100 * tuned['ci95'][1]:.1f}]" in verdict_html
    assert "5.2x fewer prompt tokens per query than rag (52 vs 268)" in verdict_html
    assert "repaid by shorter prompts after 4,100 queries" in verdict_html and "use: tuned" in verdict_html
    assert "training cost 0.33 USD (482 s of training)" in verdict_html
    assert f"{100 * rag['primary']:.1f}" in verdict_html
    # data, training, overfitting, forgetting, manifest
    assert "61,209" in html and "near_duplicate" in html and "examples/triage/data/valid.jsonl:3" in html
    assert "step 30" in html and "overfitting signal at step 40" in html
    assert "validation loss rose (0.44 -&gt; 0.47) while train loss fell" in html
    assert "tuned scores 95.0% json_field_accuracy on 50 training examples and 93.0% on the test set" in html
    assert "validation loss rose off its minimum (step 30, 0.44) to 0.47" in html
    assert "not flagged" in html and "14.37" in html and "probe_outputs (14 rows)" in html
    assert "Triage the ticket carefully." in html and "answers cut at max_new_tokens" in html
    assert "c38f997" in html and "transformers" in html and "tunelab run " in html
    # learning vs memorising: one row per slice of the sibling slices file
    for slice_name in ("seen", "new_combo", "new_template"):
        assert f"<td>{slice_name}</td>" in html


def test_the_overfitting_badge_follows_the_judgement_against_noise(run_dir):
    """The log holds a training-time event at step 40 (any rise between two evaluations); metrics.json
    judges the whole curve against its noise, and the badge follows that judgement."""
    metrics_path = run_dir / "eval" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    rise = {"rising": False, "best_step": 30, "rise": 0.03, "tolerance": 0.05, "noise_sd": 0.0125,
            "rise_step": None, "evaluated_step": 30, "evaluated_checkpoint": None}
    metrics["overfitting"].update(val_rise=rise, val_rising_while_train_falls=False)
    metrics_path.write_text(json.dumps(metrics))
    html = write_report(run_dir).read_text()
    training = html[html.index('id="training"'):html.index('id="arms"')]
    assert "overfitting signal at step" not in training and "no overfitting signal" in training
    assert "a rise counts beyond 0.05 (the validation loss&#39;s own noise)" in html
    metrics["overfitting"].update(val_rise={**rise, "rising": True, "rise_step": 40, "evaluated_checkpoint": "before the rise"},
                                  val_rising_while_train_falls=True)
    metrics_path.write_text(json.dumps(metrics))
    html = write_report(run_dir).read_text()
    assert "overfitting signal at step 40" in html
    assert "it began at step 40; the evaluated weights (step 30) come before the rise" in html


def test_report_escapes_user_text(run_dir):
    html = write_report(run_dir).read_text()
    assert HOSTILE not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html  # shown, as text
    page = parse(html)
    assert "script" not in page.tags and "img" not in page.tags
    # every place it reached shows it as text: an issue message, the input of a disagreement and of the five
    # example prompts, a base-arm output and the prompt arm's instructions
    assert html.count("&lt;script&gt;") == 9


def test_report_references_no_network(run_dir):
    html = write_report(run_dir).read_text()
    assert_offline(parse(html))
    assert "<!DOCTYPE svg" not in html and "<?xml" not in html


def test_disagreements_are_side_by_side_with_input_and_reference(run_dir):
    context = build_report_context(run_dir)
    examples = context["examples"]
    assert 0 < len(examples["examples"]) <= 8
    first = examples["examples"][0]
    assert [a["arm"] for a in first["arms"]] == ["base", "prompt", "rag", "tuned", "tuned+rag"]
    scores = [a["score"] for a in first["arms"]]
    assert max(scores) != min(scores)
    assert first["input"].startswith("My router never came") and first["reference"].startswith('{"category"')
    # the first shown are those where tuned and the best prompt-only arm differ the most
    tuned, best_prompt = first["arms"][3]["score"], max(a["score"] for a in first["arms"][:3])
    assert abs(tuned - best_prompt) == 1.0


def test_missing_files_are_named_not_fatal(tmp_path):
    run = tmp_path / "runs" / "empty"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text("name: empty\nmodel: {name: tiny-test}\n")
    html = write_report(run).read_text()
    page = parse(html)
    assert page.order == [section_id for section_id, _ in SECTIONS]
    for missing in ("eval/metrics.json is missing", "data/stats.json is missing", "train/log.jsonl is missing",
                    "eval/predictions.jsonl is missing", "manifest.json is missing"):
        assert missing in html, missing
    assert not any(plot in page.ids for plot in PLOTS)
    assert "No verdict" in (run / "report.md").read_text()


def test_damaged_files_are_reported(run_dir):
    (run_dir / "eval" / "metrics.json").write_text("{not json")
    with (run_dir / "eval" / "predictions.jsonl").open("a") as f:
        f.write("{broken\n")
    html = write_report(run_dir).read_text()
    assert "eval/metrics.json could not be read: not valid JSON" in html
    lines = (run_dir / "eval" / "predictions.jsonl").read_text().count("\n")
    assert f"eval/predictions.jsonl lines {lines} did not parse" in html
    assert "plot-loss" in parse(html).ids  # the rest of the report is still there


@pytest.mark.parametrize(("content", "note"), [
    ("{not json", "data/stats.json could not be read: not valid JSON"),
    ("[1, 2]", "data/stats.json could not be read: not a JSON object"),
])
def test_a_damaged_stats_file_is_named_and_the_rest_of_the_report_stays(run_dir, content, note):
    (run_dir / "data" / "stats.json").write_text(content)
    html = write_report(run_dir).read_text()
    assert note in html and "1,097" not in html
    assert "plot-loss" in parse(html).ids


def test_older_stats_show_the_keys_they_have(run_dir):
    # the fixture's stats.json has counts, issues, quality and tokens only (no split, notes, ...): shown as found
    html = write_report(run_dir).read_text()
    assert "data/stats.json could not be read" not in html and "1,097" in html and "61,209" in html


@pytest.mark.parametrize("odd", [None, 3.5, "text", [1, 2], {"a": {"b": {"c": [1, {"d": 2}]}}}, {"arms": []}])
def test_unexpected_result_shapes_render(run_dir, odd):
    metrics_path = run_dir / "eval" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics.update(cost=odd, forgetting=odd, overfitting=odd)
    metrics_path.write_text(json.dumps(metrics))
    assert_offline(parse(write_report(run_dir).read_text()))


def test_describe_mapping_reads_nested_results():
    described = describe_mapping({"text": "fine", "flagged": True, "threshold": 0.05,
                                  "perplexity": {"base": 14.2, "tuned": 14.4},
                                  "by_kind": {"fact": {"n": 14, "base": 0.7}, "format": {"n": 12, "base": 0.5}}})
    assert described["text"] == "fine" and described["flagged"] is True
    assert described["rows"] == [("threshold", "0.05")]
    assert described["groups"] == [{"title": "perplexity", "rows": [("base", "14.2"), ("tuned", "14.4")]}]
    assert described["tables"][0]["columns"] == ["", "n", "base"]
    assert described["tables"][0]["rows"][1] == ["format", "12", "0.5"]


def test_report_cli_prints_markdown(run_dir):
    result = tunelab("report", str(run_dir))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# tunelab report: triage")
    assert "| tuned | 93.3 [85.3, 100.0] | 52 |" in result.stdout
    assert "report.html" in result.stderr


# ---------------------------------------------------------------------------------------------- browser


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}",
               # a page that did reference the network fails fast here instead of waiting on a timeout
               "--host-resolver-rules=MAP * ~NOTFOUND", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=90)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is absent: apt-get install -y chromium")
def test_report_in_headless_chromium(run_dir, tmp_path):
    html_path = write_report(run_dir)
    dom = _chromium(["--dump-dom", html_path.resolve().as_uri()], tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = parse(dom.stdout)
    assert page.order == [section_id for section_id, _ in SECTIONS]
    for plot in PLOTS:
        assert page.ids.get(plot) == "figure" and page.figures_with_svg.get(plot, 0) > 10, plot
    assert_offline(page)
    assert "<script>" not in dom.stdout  # the hostile text stayed text in the live DOM

    shot = tmp_path / "report.png"
    result = _chromium(["--hide-scrollbars", "--window-size=1280,2400", f"--screenshot={shot}",
                        html_path.resolve().as_uri()], tmp_path / "profile2")
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    from PIL import Image

    image = Image.open(shot).convert("L")
    assert image.size == (1280, 2400)
    colors = image.getcolors(maxcolors=1 << 16)
    assert colors is None or len(colors) > 50  # drawn, not a blank page


# ---------------------------------------------------------------------------------------------- runs


def test_runs_list_status_by_files(tmp_path):
    out = tmp_path / "runs"
    make_run(out, "full")
    for name, files in (("created", []), ("prepared", ["data/stats.json"]), ("training", ["train/log.jsonl"])):
        (out / name).mkdir(parents=True)
        (out / name / "recipe.yaml").write_text(f"name: {name}\nmodel: {{name: tiny-test}}\nmethod: full\n")
        for file in files:
            (out / name / file).parent.mkdir(parents=True, exist_ok=True)
            (out / name / file).write_text("{}")
    (out / "not-a-run").mkdir()
    rows = {r.name: r for r in list_runs(out)}
    assert set(rows) == {"full", "created", "prepared", "training"}
    assert rows["full"].status == "evaluated" and rows["full"].model == "smollm2-135m-instruct"
    assert rows["created"].status == "created" and rows["created"].method == "full"
    assert rows["prepared"].status == "prepared" and rows["training"].status.startswith("training")
    write_report(out / "full")
    assert list_runs(out)[1].status == "reported"
    table = format_run_list(list_runs(out))
    assert "93.3 [" in table and "json_field_accuracy" in table
    result = tunelab("runs", "list", "--out-dir", str(out))
    assert result.returncode == 0 and result.stdout.splitlines()[0].split()[:4] == ["name", "model", "method", "status"]


def test_compare_shows_both_columns_and_the_paired_test(tmp_path):
    out = tmp_path / "runs"
    a = make_run(out, "smollm2", n_examples=60)
    b = make_run(out, "other-model", model="tiny-test", n_examples=60, tuned_quality=0.3, seed=1,
                 test_file=out / "smollm2-input" / "test.jsonl")
    comparison = compare_runs([a, b])
    markdown = render_comparison_markdown(comparison)
    header = next(line for line in markdown.splitlines() if line.startswith("| |"))
    assert header == "| | smollm2 | other-model |"
    assert "| model | smollm2-135m-instruct | tiny-test |" in markdown
    [test] = comparison.tests
    assert test["significant"] and test["delta_points"] < -30 and test["p_value"] < 0.01
    assert "smollm2 is better" in test["text"] and "## Paired test" in markdown

    html_out = tmp_path / "cmp.html"
    result = tunelab("runs", "compare", str(a), str(b), "--out", str(html_out))
    assert result.returncode == 0, result.stderr
    assert result.stdout == markdown
    page = parse(html_out.read_text())
    assert {"runs", "paired-test"} <= set(page.ids)
    assert_offline(page)
    assert "<th>smollm2</th><th>other-model</th>" in html_out.read_text()


def test_compare_of_identical_scores_is_not_significant(tmp_path):
    out = tmp_path / "runs"
    a = make_run(out, "a", n_examples=40)
    b = make_run(out, "b", n_examples=40, test_file=out / "a-input" / "test.jsonl")
    [test] = compare_runs([a, b]).tests
    assert test["delta_points"] == 0 and not test["significant"] and "no significant difference" in test["text"]


def test_compare_refuses_different_eval_sets(tmp_path):
    out = tmp_path / "runs"
    a = make_run(out, "a", n_examples=30)
    fewer = make_run(out, "fewer", n_examples=20, test_file=out / "a-input" / "test.jsonl")
    with pytest.raises(ConfigError, match=r"not evaluated on the same examples .*10 only in .*a \(test-000020"):
        compare_runs([a, fewer])
    other_data = make_run(out, "other-data", n_examples=30, test_file=make_test_file(tmp_path / "other", 30, seed=7))
    with pytest.raises(ConfigError, match="same example ids but different references"):
        compare_runs([a, other_data])
    result = tunelab("runs", "compare", str(a), str(fewer))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1


def test_compare_needs_evaluated_runs(tmp_path):
    out = tmp_path / "runs"
    a = make_run(out, "a")
    b = make_run(out, "b", test_file=out / "a-input" / "test.jsonl")
    (b / "eval" / "predictions.jsonl").unlink()
    with pytest.raises(ConfigError, match="eval/predictions.jsonl is missing; evaluate it first"):
        compare_runs([a, b])
    with pytest.raises(ConfigError, match="no predictions of arm 'nope'"):
        compare_runs([a, a], arm="nope")
    with pytest.raises(ConfigError, match="two or more"):
        compare_runs([a])

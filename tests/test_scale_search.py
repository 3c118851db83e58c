"""Adapter scale (WiSE-FT): the policy's choice among measured scales, scaling in place, the run's chosen
scale used by the tuned arm, chat and export (merged weights at that scale give the adapter model's
logits at that scale)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from test_eval_run import _conversation, build_fake_run
from test_export import logits_of, make_fake_run, prompt_ids
from tunelab.contract import AdapterScale, Metrics, ScaleCandidate
from tunelab.eval.scale_search import choose_scale, retention_gain, within_threshold


def _candidate(scale, task, retention, ppl):
    return ScaleCandidate(scale=scale, task=task, retention=retention, retention_ci95=None, perplexity_change=ppl,
                          within_threshold=within_threshold(retention, ppl, 0.05))


# the usual shape: the fine-tune as trained scores best and forgets most
CURVE = [_candidate(1.0, 0.96, 0.70, 0.11), _candidate(0.75, 0.95, 0.96, 0.04), _candidate(0.5, 0.80, 1.0, 0.01)]


def test_balance_keeps_the_best_task_score_within_the_threshold():
    scale, reason = choose_scale(CURVE, "balance", 0.05, "label_accuracy")
    assert scale == 0.75
    assert reason.startswith("the best validation label_accuracy (95.0) among the scales that keep general ability "
                             "within 5% (retention 96%, perplexity +4.0%)")


def test_task_and_report_policies():
    assert choose_scale(CURVE, "task", 0.05, "m")[0] == 1.0
    scale, reason = choose_scale(CURVE, "report", 0.05, "m")
    assert scale == 1.0 and "report" in reason


def test_balance_when_no_scale_keeps_general_ability_keeps_the_task_score():
    # the routing run: no scale within 5%; halving the adapter kept 79% instead of 65% and lost half the score
    worse = [_candidate(1.0, 0.6, 0.65, 0.02), _candidate(0.75, 0.5, 0.76, 0.005), _candidate(0.5, 0.3, 0.79, 0.0)]
    scale, reason = choose_scale(worse, "balance", 0.05, "m")
    assert scale == 1.0 and reason.startswith("no scale kept general ability within 5%, so the best validation m (60.0")


def test_balance_ties_go_to_the_larger_scale():
    tied = [_candidate(1.0, 0.9, 0.97, 0.02), _candidate(0.75, 0.9, 1.0, 0.01), _candidate(0.5, 0.9, 1.0, 0.0)]
    assert choose_scale(tied, "balance", 0.05, "m")[0] == 1.0
    assert choose_scale(tied, "task", 0.05, "m")[0] == 1.0
    # a tie outside the threshold: the smaller scale is taken only within it, or bought back on evidence
    outside = [_candidate(1.0, 0.9, 0.9, 0.02), _candidate(0.75, 0.9, 0.92, 0.01)]
    assert choose_scale(outside, "balance", 0.05, "m")[0] == 1.0
    assert choose_scale([*outside, _candidate(0.5, 0.9, 0.96, 0.0)], "balance", 0.05, "m")[0] == 0.5
    # perplexity alone can rule a scale out
    assert not within_threshold(1.0, 0.051, 0.05) and within_threshold(0.95, 0.05, 0.05)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    return make_fake_run(tmp_path_factory.mktemp("runs") / "x")


def _write_scale(run_dir, scale):
    AdapterScale(scale=scale, policy="balance", reason="test", metric="m", split="valid", n_examples=0,
                 threshold=0.05, candidates=[]).write(run_dir / "eval" / "adapter_scale.json")


def test_scaling_in_place_interpolates_between_base_and_fine_tune(run_dir):
    from tunelab.models import load_model
    from tunelab.runs import load_tuned_model, set_adapter_scale

    model, tokenizer = load_tuned_model(run_dir, device="cpu", dtype="float32")
    ids = prompt_ids(tokenizer)
    tuned = logits_of(model, ids)
    base = logits_of(load_model("tiny-test", dtype="float32", device="cpu"), ids)
    assert set_adapter_scale(model, 0.0) > 0
    assert torch.allclose(logits_of(model, ids), base, atol=1e-5)
    set_adapter_scale(model, 0.5)
    half = logits_of(model, ids)
    assert (half - tuned).abs().max() > 1e-3 and (half - base).abs().max() > 1e-3
    set_adapter_scale(model, 0.5)  # relative to the trained scaling: never compounds
    assert torch.equal(logits_of(model, ids), half)
    set_adapter_scale(model, 1.0)
    assert torch.equal(logits_of(model, ids), tuned)


def test_export_and_chat_use_the_runs_chosen_scale(run_dir, tmp_path):
    from peft import PeftModel

    from tunelab.models import load_model
    from tunelab.runs import load_tuned_model, set_adapter_scale
    from tunelab.use.chat import load_for_use
    from tunelab.use.export import export_run

    model, tokenizer = load_tuned_model(run_dir, device="cpu", dtype="float32")
    ids = prompt_ids(tokenizer)
    set_adapter_scale(model, 0.5)
    at_half = logits_of(model, ids)
    (run_dir / "eval").mkdir(exist_ok=True)
    _write_scale(run_dir, 0.5)
    try:
        reloaded, _ = load_tuned_model(run_dir, device="cpu", dtype="float32")
        assert torch.equal(logits_of(reloaded, ids), at_half)

        from transformers import AutoModelForCausalLM

        merged = export_run(run_dir, tmp_path / "merged", merge=True)
        assert json.loads((tmp_path / "merged" / "export.json").read_text())["adapter_scale"] == 0.5
        assert merged.checks["max_abs_logit_diff_vs_adapter_model"] <= 1e-4
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
        assert (logits_of(exported, ids) - at_half).abs().max() <= 1e-4

        export_run(run_dir, tmp_path / "adapter")
        adapter = PeftModel.from_pretrained(load_model("tiny-test", dtype="float32", device="cpu"),
                                            str(tmp_path / "adapter"))
        assert (logits_of(adapter, ids) - at_half).abs().max() <= 1e-5

        served = load_for_use(str(run_dir), device="cpu", dtype="float32")  # chat and serve: merged in memory
        assert (logits_of(served.model, ids) - at_half).abs().max() <= 1e-4
    finally:
        (run_dir / "eval" / "adapter_scale.json").unlink()


@pytest.fixture
def few_probes(monkeypatch):
    """Eight of the shipped probes, so the tiny model answers them in seconds at each scale."""
    from tunelab.eval import forgetting

    probes = forgetting._shipped_probes()
    monkeypatch.setattr(forgetting, "_shipped_probes", lambda: probes[::20])


def test_evaluate_searches_the_scales_and_the_tuned_arm_runs_at_the_chosen_one(tmp_path, tiny_model_dir, few_probes):
    from tunelab.eval.run import evaluate
    from tunelab.models import load_model
    from tunelab.runs import load_tuned_model

    run_dir = build_fake_run(tmp_path / "fake", load_model("tiny-test", device="cpu"))
    rng = random.Random(5)
    valid = [_conversation(i, "valid", rng) for i in range(200, 205)]
    (run_dir / "data" / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in valid))
    metrics = evaluate(run_dir, arms="base,tuned", limit=3, echo=False)

    record = AdapterScale.from_file(run_dir / "eval" / "adapter_scale.json")
    assert [c.scale for c in record.candidates] == [1.0, 0.875, 0.75, 0.5]
    assert record.policy == "balance" and record.split == "valid" and record.n_examples == 5
    assert record.metric == "json_field_accuracy"
    assert (record.scale, record.reason) == choose_scale(record.candidates, "balance", 0.05, record.metric)
    assert metrics["forgetting"]["adapter_scale"] == json.loads(record.model_dump_json())
    chosen = next(c for c in record.candidates if c.scale == record.scale)
    assert metrics["forgetting"]["retention"]["value"] == chosen.retention
    # the base model's known probes are its stable set (the tiny template takes a system message), and the
    # metrics file with the new keys reads back through the contract
    kept = metrics["forgetting"]["retention"]
    assert (kept["definition"], kept["renderings"], kept["definition_note"]) == ("stable", 4, None)
    stable = [r["base_stable"] for r in metrics["forgetting"]["probe_outputs"]]
    plain = [r["base_score"] for r in metrics["forgetting"]["probe_outputs"]]
    assert all(st in (0.0, 1.0) and st <= pl for st, pl in zip(stable, plain, strict=True))
    assert (kept["n"], kept["plain"]["n"], kept["unstable"]) == (sum(stable), sum(plain), sum(plain) - sum(stable))
    assert set(kept) >= {"value", "ci95", "n", "flagged", "detectable_drop", "gained", "by_kind", "plain"}
    assert Metrics.from_file(run_dir / "eval" / "metrics.json").forgetting["retention"] == kept
    assert metrics["forgetting"]["perplexity"]["relative_change"] == pytest.approx(chosen.perplexity_change)

    # the tuned arm's outputs are the model's at the chosen scale, as every later loader gets it
    from tunelab.engine.generate import DecodingSettings, generate
    from tunelab.eval.arms import to_eval_example

    model, tokenizer = load_tuned_model(run_dir, device="cpu")
    test = [json.loads(line) for line in (run_dir / "data" / "test.jsonl").read_text().splitlines()][:3]
    conversations = [[m for m in row["messages"] if m["role"] != "assistant"] for row in test]
    assert all(to_eval_example(row, "t").reference for row in test)
    settings = DecodingSettings(**metrics["arms"]["tuned"]["decoding"])
    expected = [g.text for g in generate(model, tokenizer, conversations, settings, 4)]
    rows = [json.loads(line) for line in (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [r["output"] for r in rows if r["arm"] == "tuned"] == expected


def test_no_validation_split_skips_the_search(tmp_path, tiny_model_dir, few_probes):
    from tunelab.eval.run import evaluate
    from tunelab.models import load_model

    run_dir = build_fake_run(tmp_path / "fake", load_model("tiny-test", device="cpu"))
    metrics = evaluate(run_dir, arms="base,tuned", limit=2, echo=False)
    assert metrics["forgetting"]["adapter_scale"]["skipped"].startswith("no validation examples")
    assert not (run_dir / "eval" / "adapter_scale.json").exists()


def test_report_plots_task_score_against_retention_with_the_chosen_scale(tmp_path):
    from test_report import make_run, parse
    from tunelab.report.html import write_report

    run = make_run(tmp_path / "r")
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    record = AdapterScale(scale=0.75, policy="balance", reason="r", metric="json_field_accuracy", split="valid",
                          n_examples=12, threshold=0.05, candidates=CURVE)
    metrics["forgetting"]["adapter_scale"] = json.loads(record.model_dump_json())
    (run / "eval" / "metrics.json").write_text(json.dumps(metrics))
    html = write_report(run).read_text()
    page = parse(html)
    assert page.ids.get("plot-scales") == "figure" and page.figures_with_svg.get("plot-scales", 0) > 10
    assert "chosen: scale 0.75" in html and "retention within 5%" in html

    del metrics["forgetting"]["adapter_scale"]  # a run without a scale search has no such plot
    (run / "eval" / "metrics.json").write_text(json.dumps(metrics))
    assert "plot-scales" not in parse(write_report(run).read_text()).ids


def test_balance_does_not_buy_general_ability_with_the_task():
    # the routing run with 13 replay examples: only half the adapter kept 96% of the probes, at 40 validation
    # points instead of 100; the test score fell to 53. balance keeps the best task score (0.75 ties 1.0 and
    # keeps three probes of 80 more, which could be chance) and flags the loss
    costly = [_candidate(1.0, 1.0, 0.85, 0.047), _candidate(0.75, 1.0, 0.8875, 0.025), _candidate(0.5, 0.4, 0.9625, 0.01)]
    scale, reason = choose_scale(costly, "balance", 0.05, "label_accuracy")
    assert scale == 1.0
    assert reason.startswith("scale 0.5 keeps general ability within 5% but gives up 60.0 points of validation "
                             "label_accuracy (more than eval.scale_max_task_loss 3)")
    assert choose_scale(costly, "balance", 0.05, "m", max_task_loss=60)[0] == 0.5


def _simulated_choice(rng, n, task_full, task_scaled, discordant) -> float:
    """One evaluation: n validation examples answered at scale 1 and at 0.75 (which truly keeps general
    ability); the two answers agree on an example but for a true loss and, with rate `discordant`, a
    symmetric disagreement either way (noise that cancels out in expectation)."""
    full = scaled = 0
    for _ in range(n):
        u = rng.random()
        right_full, right_scaled = u < task_full, u < task_scaled
        if rng.random() < discordant:
            right_scaled = not right_scaled if rng.random() < 0.5 else right_scaled
            right_full = not right_full if right_scaled == right_full else right_full
        full, scaled = full + right_full, scaled + right_scaled
    curve = [_candidate(1.0, full / n, 0.80, 0.03), _candidate(0.75, scaled / n, 0.97, 0.02)]
    return choose_scale(curve, "balance", 0.05, "m")[0]


@pytest.mark.parametrize("n", [10, 64])
def test_balance_error_rates_simulated(n):
    """Seeded simulation of balance's two errors on paired validation scores: taking a scale that truly costs
    20 points of task score (without the guard: every time), and refusing one that truly costs nothing."""
    rng = random.Random(7)
    runs = 2000
    costly = sum(_simulated_choice(rng, n, 0.9, 0.7, 0.0) == 0.75 for _ in range(runs)) / runs
    free = sum(_simulated_choice(rng, n, 0.9, 0.9, 0.0) == 0.75 for _ in range(runs)) / runs
    free_noisy = sum(_simulated_choice(rng, n, 0.9, 0.9, 0.1) == 0.75 for _ in range(runs)) / runs
    # a 20-point loss slips through only when no costly example is among the n: 0.8^10 = 11% at n=10
    assert costly <= {10: 0.12, 64: 0.001}[n]  # measured 9.5% and 0%
    assert free == 1.0  # answers that agree: a scale that costs nothing is always taken
    assert free_noisy >= 0.65  # 10% noisy disagreements cost some free scales (taken 72% at n=10 and 64)


def test_retention_gain_counts_the_probes_one_scale_keeps_and_the_other_lost():
    assert retention_gain([1, 1, 1, 0, 1], [1, 0, 0, 0, 1]) == (2, 0)
    assert retention_gain([1] * 6 + [0], [0] * 6 + [1]) == (6, 1)
    assert retention_gain([1, 0], [1, 0]) == (0, 0)  # no probe kept by one and lost by the other


# the orders run: at 1.0, 84% of the 63 known probes (10 lost to the task's JSON); 0.875 costs 2 points and
# gets 6 of them back; 0.75 keeps as much but costs 7 points
ORDERS = [_candidate(1.0, 0.96, 0.84, 0.029), _candidate(0.875, 0.94, 0.94, 0.02), _candidate(0.75, 0.89, 0.94, 0.013)]
ORDERS_KEPT = {1.0: [1] * 53 + [0] * 10, 0.875: [1] * 59 + [0] * 4, 0.75: [1] * 59 + [0] * 4}


def test_balance_buys_back_general_ability_within_the_task_allowance():
    scale, reason = choose_scale(ORDERS, "balance", 0.05, "json_field_accuracy", probes_kept=ORDERS_KEPT)
    assert scale == 0.875
    assert reason == ("no scale within 3 points of the best validation json_field_accuracy (96.0) keeps general "
                      "ability within 5%; scale 0.875 keeps the most of it (retention 94%, perplexity +2.0%: 6 "
                      "known probes that scale 1 lost, 0 the other way, a net gain beyond 5%) for 2.0 points "
                      "(validation json_field_accuracy 94.0)")
    # no per-probe outcomes: the best task score, as before
    assert choose_scale(ORDERS, "balance", 0.05, "m")[0] == 1.0
    # a net gain within the threshold (4 gained, 3 lost: 1 of 63) is not worth task points, and the reason says so
    chance = {**ORDERS_KEPT, 0.875: [0] * 3 + [1] * 50 + [1] * 4 + [0] * 6}
    scale, reason = choose_scale(ORDERS, "balance", 0.05, "m", probes_kept={**chance, 0.75: chance[1.0]})
    assert scale == 1.0
    assert reason == ("no scale kept general ability within 5%, so the best validation m (96.0; retention 84%, "
                      "perplexity +2.9%); scale 0.875 kept more (retention 94%, perplexity +2.0%) for 2.0 points, "
                      "but 4 known probes gained and 3 lost is a net gain within 5%; the loss is flagged")
    # 3 of 63 (4.8%) is within 5%; 4 (6.3%) is beyond it, also on a validation tie
    three = {**ORDERS_KEPT, 0.875: [1] * 56 + [0] * 7, 0.75: ORDERS_KEPT[1.0]}
    assert choose_scale(ORDERS, "balance", 0.05, "m", probes_kept=three)[0] == 1.0
    four = {**three, 0.875: [1] * 57 + [0] * 6}
    tie = [ORDERS[0], _candidate(0.875, 0.96, 0.90, 0.02), ORDERS[2]]
    assert choose_scale(tie, "balance", 0.05, "m", probes_kept=four)[0] == 0.875
    # a scale within the threshold and the allowance is still preferred: it keeps general ability outright
    within = [*ORDERS[:2], _candidate(0.75, 0.95, 0.97, 0.01)]
    assert choose_scale(within, "balance", 0.05, "m", probes_kept=ORDERS_KEPT)[0] == 0.75
    assert choose_scale(ORDERS, "task", 0.05, "m", probes_kept=ORDERS_KEPT)[0] == 1.0


def _simulated_buy_back(rng, n, lost_at_full, recovered, discordant) -> float:
    """One evaluation of n known probes: scale 1 loses each with probability `lost_at_full`; scale 0.875
    (2 validation points cheaper) gets a probe 1 lost back with probability `recovered`, and on top of that
    a share `discordant` of the probes disagree at random, half each way (what any re-wording does to a
    small model: the base model itself keeps 97% of its stable probes under a new framing)."""
    full, scaled = [], []
    for _ in range(n):
        kept_full = rng.random() >= lost_at_full
        kept_scaled = kept_full or rng.random() < recovered
        if rng.random() < discordant:
            kept_full, kept_scaled = (True, False) if rng.random() < 0.5 else (False, True)
        full.append(float(kept_full))
        scaled.append(float(kept_scaled))
    curve = [_candidate(1.0, 0.96, sum(full) / n, 0.03), _candidate(0.875, 0.94, sum(scaled) / n, 0.02)]
    return choose_scale(curve, "balance", 0.05, "m", probes_kept={1.0: full, 0.875: scaled})[0]


def test_balance_buy_back_error_rates_simulated():
    """Seeded simulation of the buy-back's two errors at the 63 known probes of the default model: paying
    task points for a scale that keeps no more (the two disagree only at random), and missing one that
    gets back part of a 16% loss."""
    rng = random.Random(11)
    runs = 2000

    def rate(recovered, discordant):
        return sum(_simulated_buy_back(rng, 63, 0.16, recovered, discordant) == 0.875 for _ in range(runs)) / runs

    # random disagreement at the base model's own rate under a new framing (3%) and twice it; four times it
    # (12%) is bought 10% of the time
    assert rate(0.0, 0.03) <= 0.02 and rate(0.0, 0.06) <= 0.05 and rate(0.0, 0.12) <= 0.12
    # half of the loss got back is bought 70% of the time (measured), three quarters 90%
    assert rate(0.5, 0.03) >= 0.6 and rate(0.75, 0.03) >= 0.85

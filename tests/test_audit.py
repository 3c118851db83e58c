"""The data audit: training dynamics recorded per example, and the ranking of suspect examples."""

from __future__ import annotations

import json

import pytest
import torch

from train_examples import qa_pairs, random_examples, tokenized
from tunelab.config import load_recipe
from tunelab.data.pack import collate, collate_varlen, trainable_count
from tunelab.runs import RunPaths
from tunelab.train.dynamics import DynamicsRecorder, example_losses, read_dynamics
from tunelab.train.loss import CausalLMLoss


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- dynamics


def _alone(loss: CausalLMLoss, examples, index: int) -> tuple[float, int]:
    out = loss.forward_batch(collate(examples, [(index,)], pad_id=2))
    return out.loss_sum.item(), int(out.count)


@pytest.mark.parametrize("layout", ["masked", "varlen"])
def test_per_example_losses_from_a_packed_batch_equal_each_example_alone(tiny_model, layout):
    from tunelab.train.attention import use_varlen_attention

    examples = random_examples([30, 45, 17, 52, 9, 23], 1, prompt_fraction=0.5)
    loss = CausalLMLoss(tiny_model, chunk_rows=7)  # chunks that cut through examples
    micro_batches = [((1, 0, 2), (3,)), ((5, 4),)]
    with torch.no_grad():
        alone = {i: _alone(loss, examples, i) for i in range(6)}
        if layout == "masked":
            outs = [loss.forward_batch(collate(examples, rows, pad_id=2)) for rows in micro_batches]
        else:
            with use_varlen_attention(tiny_model):
                outs = [loss.forward_batch(collate_varlen(examples, rows, pad_id=2, pad_to_multiple=16))
                        for rows in micro_batches]
    order, sums, counts = example_losses(examples, micro_batches, [o.token_losses for o in outs])
    assert order == [1, 0, 2, 3, 5, 4]
    assert counts == [trainable_count(examples[i]) for i in order] == [alone[i][1] for i in order]
    for index, got in zip(order, sums, strict=True):
        assert got == pytest.approx(alone[index][0], rel=1e-5)
    # the per-example sums add up to the loss the step trains on
    assert sum(sums) == pytest.approx(sum(o.loss_sum.item() for o in outs), rel=1e-6)


def test_token_losses_need_no_gradient_and_leave_the_loss_unchanged(tiny_model):
    examples = random_examples([20, 31], 3, prompt_fraction=0.4)
    loss = CausalLMLoss(tiny_model)
    out = loss.forward_batch(collate(examples, [(0, 1)], pad_id=2))
    assert out.loss_sum.requires_grad and not out.token_losses.requires_grad
    assert out.token_losses.shape == (int(out.count),)
    assert out.token_losses.sum().item() == pytest.approx(out.loss_sum.item(), rel=1e-6)


def _train(tmp_path, tokenizer, pairs, overrides=(), **kwargs):
    from tunelab.train.run import start_run_dir, train_on_examples

    recipe = load_recipe(None, [f"out_dir={tmp_path}", "model.name=tiny-test", "train.tokens_per_step=256",
                                "train.warmup_ratio=0", "lora.dropout=0", "train.eval_every_steps=1000",
                                "train.checkpoint_every_steps=1000", *overrides])
    paths = RunPaths(recipe.run_dir)
    start_run_dir(paths, recipe, resume=False)
    train = tokenized(tokenizer, pairs)
    result = train_on_examples(recipe, paths, tokenizer, train, [], device="cpu", progress=False, **kwargs)
    return result, paths, train


def test_training_records_every_example_once_an_epoch_with_its_answer_tokens(tmp_path, tokenizer, tiny_model_dir):
    result, paths, train = _train(tmp_path, tokenizer, qa_pairs(12), ["train.epochs=3"])
    lines = [json.loads(line) for line in (paths.root / "train" / "dynamics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, result.steps + 1))
    seen = read_dynamics(paths.root / "train")
    assert sorted(seen) == list(range(12))
    for index, entry in seen.items():
        assert entry.epochs == [0, 1, 2]  # seen once in each epoch, in order
        assert entry.tokens == trainable_count(train[index])
    # training on the same answers: the mean loss falls from the first pass to the last
    first = sum(e.mean_losses[0] for e in seen.values())
    last = sum(e.mean_losses[-1] for e in seen.values())
    assert last < first
    # each line's losses sum to the step's logged loss (mean over its trainable tokens)
    log = [json.loads(line) for line in paths.train_log.read_text().splitlines()]
    steps = {r["step"]: r for r in log if r["kind"] == "train"}
    for line in lines:
        mean = sum(line["loss_sum"]) / sum(line["tokens"])
        assert mean == pytest.approx(steps[line["step"]]["loss"], rel=1e-4)


def test_a_resumed_recorder_drops_the_steps_after_its_checkpoint(tmp_path):
    examples = random_examples([10, 12], 0, prompt_fraction=0.5)
    counts = [trainable_count(e) for e in examples]
    recorder = DynamicsRecorder.open(tmp_path, examples, 0)
    for step in (1, 2, 3):
        recorder.add(((0, 1),), torch.ones(sum(counts)) * step)
        recorder.write_step(step, 0)
    recorder.add(((0,),), torch.ones(counts[0]))
    recorder.write_step(4, 0, keep=False)  # a skipped step writes nothing
    recorder.close()
    again = DynamicsRecorder.open(tmp_path, examples, 2)
    again.add(((1,),), torch.full((counts[1],), 5.0))
    again.write_step(3, 0)
    again.close()
    seen = read_dynamics(tmp_path)
    assert seen[0].steps == [1, 2] and seen[0].mean_losses == [1.0, 2.0]
    assert seen[1].steps == [1, 2, 3] and seen[1].mean_losses == [1.0, 2.0, 5.0]


# ---------------------------------------------------------------------------------------------- ranking

LABELS = ("billing", "network", "hardware")


def _label_kind():
    from tunelab.eval.metrics import detect_output_kind

    return detect_output_kind([label for label in LABELS for _ in range(10)])


def _examples_with_losses(rng, n: int, wrong: set[int], passes: int = 4):
    """Label examples whose losses fall with each pass; the `wrong` ones stay high (never learnt)."""
    from tunelab.eval.audit import _Example

    out = []
    for i in range(n):
        label = LABELS[i % 3]
        start = rng.uniform(1.5, 3.0)
        if i in wrong:
            losses = [start + rng.uniform(0.5, 1.5) - 0.3 * k for k in range(passes)]
        else:
            losses = [start * (0.35 ** k) + rng.uniform(0.0, 0.05) for k in range(passes)]
        out.append(_Example(f"train-{i:03d}", f"data/train.jsonl:{i + 1}", (), label, losses))
    return out


def test_planted_wrong_labels_rank_first_and_are_flagged_when_the_model_disagrees():
    import random

    from tunelab.eval.audit import ModelAnswer, rank

    rng = random.Random(0)
    wrong = {5, 17, 42, 77, 90}
    examples = _examples_with_losses(rng, 120, wrong)
    # the model answers every example with its own label, except the wrong ones: it gives the true
    # label, sure of it; and it errs on two right ones (8, 60), unsure
    answers = {e.id: ModelAnswer(e.answer, 0.95) for e in examples}
    for i in wrong:
        answers[examples[i].id] = ModelAnswer(LABELS[(i + 1) % 3], 0.95)
    for i in (8, 60):
        answers[examples[i].id] = ModelAnswer(LABELS[(i + 1) % 3], 0.5)
    rows = rank(examples, _label_kind(), answers)
    assert [r.rank for r in rows] == list(range(1, 121))
    assert {int(r.id[-3:]) for r in rows[:5]} == wrong
    assert {int(r.id[-3:]) for r in rows if r.flagged} == wrong  # the unsure mistakes are not claimed
    for row in rows:
        if int(row.id[-3:]) in (8, 60):  # ranked up by the disagreement, but the reason says why not claimed
            assert row.disagreement == 1.0 and row.suspicion == pytest.approx(min(row.z, 10.0) + 10.0)
            assert "0.50 per token, below the" in row.reason
    assert rows[0].file == "data/train.jsonl" and rows[0].line == int(rows[0].id[-3:]) + 1
    assert rows[0].disagreement == 1.0 and "the model answers" in rows[0].reason
    assert rows[0].suspicion == pytest.approx(min(rows[0].z, 10.0) + 10.0)


def test_clean_data_gets_an_order_of_difficulty_and_no_claim():
    import random

    from tunelab.eval.audit import ModelAnswer, how_to_read, rank

    rng = random.Random(1)
    examples = _examples_with_losses(rng, 120, set())
    answers = {e.id: ModelAnswer(e.answer, 0.9) for e in examples}  # a model that learnt every label
    rows = rank(examples, _label_kind(), answers)
    assert not any(r.flagged for r in rows)
    assert rows == sorted(rows, key=lambda r: -r.suspicion)
    assert "does not claim errors" in how_to_read(0, 120)


def test_label_classes_are_compared_within_themselves():
    """A label whose answers are all harder (longer tokens, rarer words) is not suspect as a whole."""
    from tunelab.eval.audit import _Example, rank

    examples = []
    for i in range(60):
        label = LABELS[i % 3]
        base = 2.0 if label == "hardware" else 0.2  # every hardware answer costs more
        examples.append(_Example(f"e{i}", f"t.jsonl:{i + 1}", (), label, [base + 0.01 * (i % 7)] * 3))
    examples[3].losses = [0.9] * 3  # a billing example far above the other billing ones (and below every hardware)
    rows = rank(examples, _label_kind(), {})
    assert rows[0].id == "e3" and rows[0].z > 10


def test_json_disagreement_names_the_fields_that_differ():
    from tunelab.eval.audit import disagreement
    from tunelab.eval.metrics import OutputKind

    kind = OutputKind("json", "json_field_accuracy", "")
    answer = '{"items":[{"product":"cap","size":"M","color":"red","qty":2}]}'
    same, _ = disagreement(answer, answer, kind)
    assert same == 0.0
    differs, why = disagreement('{"items":[{"product":"cap","size":"L","color":"red","qty":3}]}', answer, kind)
    assert differs == 0.5 and why == "fields that disagree: items[0].size, items[0].qty"
    broken, _ = disagreement("not json", answer, kind)
    assert broken == 1.0


@pytest.mark.parametrize("planted", [0, 10])
def test_flag_rule_error_rates_in_a_seeded_simulation(planted):
    """The claim 'likely wrong' over 100 simulated runs of 200 label examples: losses per pass from a
    skewed clean distribution (some examples are hard), a model that errs on 5% of clean labels,
    unsure (its answer's per-token probability uniform in 0.3..0.85), and answers 70% of the planted
    ones with their true label (it memorised the rest), sure of it (0.75..1.0). Clean runs: at most
    5% of runs claim any error. Planted runs: 90% of claims are right, and 40% of the errors are claimed."""
    import random

    from tunelab.eval.audit import ModelAnswer, _Example, rank

    rng = random.Random(planted)
    runs_claiming, true_claims, false_claims = 0, 0, 0
    for _ in range(100):
        wrong = set(rng.sample(range(200), planted))
        examples, answers = [], {}
        for i in range(200):
            label = LABELS[i % 3]
            hard = rng.lognormvariate(0, 0.6)  # a heavy right tail of hard, correct examples
            if i in wrong:
                losses = [rng.uniform(2.0, 4.0) * (0.85 ** k) for k in range(3)]
                disagrees, sure = rng.random() < 0.7, rng.uniform(0.75, 1.0)
            else:
                losses = [0.4 * hard * (0.5 ** k) + rng.uniform(0, 0.05) for k in range(3)]
                disagrees, sure = rng.random() < 0.05, rng.uniform(0.3, 0.85)
            examples.append(_Example(f"e{i}", f"t.jsonl:{i + 1}", (), label, losses))
            answers[f"e{i}"] = ModelAnswer(LABELS[(i + 1) % 3], sure) if disagrees else ModelAnswer(label, 0.9)
        flagged = [int(r.id[1:]) for r in rank(examples, _label_kind(), answers) if r.flagged]
        runs_claiming += bool(flagged)
        true_claims += sum(i in wrong for i in flagged)
        false_claims += sum(i not in wrong for i in flagged)
    if planted == 0:
        assert runs_claiming <= 5  # <= 5% of clean runs claim an error
    else:
        assert true_claims / (true_claims + false_claims) >= 0.9
        # at most the 70% the model contradicts can be claimed, and only those it is sure of
        assert true_claims / (100 * planted) >= 0.4


# ---------------------------------------------------------------------------------------------- a run, end to end


@pytest.fixture(scope="module")
def audited_run(tmp_path_factory, tiny_model_dir):
    """A tiny-test run trained 3 passes on 24 reversal examples, 3 of whose answers were replaced."""
    from train_examples import reverse_pairs, write_chat_jsonl
    from tunelab.train.run import train

    folder = tmp_path_factory.mktemp("audit")
    pairs = reverse_pairs(24, seed=5)
    for i in (2, 9, 15):  # plausible but wrong: the words not reversed
        question = pairs[i][0]
        pairs[i] = (question, question.removeprefix("Reverse the words: "))
    data = write_chat_jsonl(folder / "train.jsonl", pairs)
    recipe = load_recipe(None, [f"out_dir={folder}", "name=r", "model.name=tiny-test", f"data.train={data}",
                                "data.valid_fraction=0", "data.test_fraction=0", "train.epochs=3",
                                "train.tokens_per_step=512", "train.budget=null", "lora.dropout=0"])
    train(recipe, progress=False)
    return folder, data, pairs


def _echo_decoder(examples):
    from tunelab.eval.audit import ModelAnswer

    return [ModelAnswer(e.answer if int(e.source.rsplit(":", 1)[1]) % 2 else "something else") for e in examples]


def test_audit_writes_one_row_per_training_example_with_file_and_line(audited_run):
    from tunelab.eval.audit import audit_run, read_audit

    folder, data, pairs = audited_run
    rows, summary = audit_run(folder / "r", answers=5, decode=_echo_decoder)
    assert summary.examples == 24 and summary.passes_min == 3 and summary.decoded == 5
    written, saved = read_audit(folder / "r")
    assert [r["id"] for r in written] == [r.id for r in rows] and saved["examples"] == 24
    assert sorted(r["line"] for r in written) == list(range(1, 25))
    assert {r["file"] for r in written} == {str(data)}
    for row in written:  # every row's answer is the one on its line of the user's file
        assert row["answer"] == pairs[row["line"] - 1][1]
    assert [r["suspicion"] for r in written] == sorted((r["suspicion"] for r in written), reverse=True)
    decoded = [r for r in written if r["model_answer"] is not None]
    assert len(decoded) == 5 and all(r["disagreement"] in (0.0, 1.0) or 0 < r["disagreement"] < 1 for r in decoded)


def test_write_clean_copies_the_training_file_without_the_top_lines(audited_run, tmp_path):
    from tunelab.errors import ConfigError
    from tunelab.eval.audit import read_audit, write_clean

    folder, data, _ = audited_run
    before = data.read_bytes()
    rows, _ = read_audit(folder / "r")
    source, dropped = write_clean(rows, 4, tmp_path / "clean.jsonl")
    assert source == data and dropped == sorted(r["line"] for r in rows[:4])
    original = data.read_text().splitlines()
    assert (tmp_path / "clean.jsonl").read_text().splitlines() == [
        line for n, line in enumerate(original, start=1) if n not in dropped]
    assert data.read_bytes() == before  # the user's file is untouched
    with pytest.raises(ConfigError, match="is the training file itself"):
        write_clean(rows, 1, data)


def test_cli_prints_the_top_as_file_line_suspicion_answer_model_answer(audited_run, tmp_path):
    from typer.testing import CliRunner

    from tunelab import cli

    folder, data, _ = audited_run
    result = CliRunner().invoke(cli.app, ["data", "audit", str(folder / "r"), "--top", "3", "--answers", "3",
                                          "--write-clean", str(tmp_path / "c.jsonl"), "--drop-top", "2"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    rows = [json.loads(line) for line in (folder / "r" / "audit" / "audit.jsonl").read_text().splitlines()]
    for line, row in zip(lines[:3], rows[:3], strict=True):
        assert line.startswith(f"{data}:{row['line']}: {row['suspicion']:.1f}: {row['answer']} -> ")
    assert len((tmp_path / "c.jsonl").read_text().splitlines()) == 22
    bad = CliRunner().invoke(cli.app, ["data", "audit", str(folder / "r"), "--drop-top", "2"])
    assert bad.exit_code != 0 and "needs --write-clean" in str(bad.exception)


def test_the_main_job_audits_only_runs_that_saw_every_example_twice(audited_run):
    from tunelab.eval.audit import fewest_passes

    folder, _, _ = audited_run
    assert fewest_passes(folder / "r") == 3  # the pipeline audits from 2
    assert fewest_passes(folder) == 0  # not a run: no dynamics


def test_report_shows_the_top_20_with_file_line_and_how_to_read_it(audited_run):
    from tunelab.eval.audit import ModelAnswer, audit_run
    from tunelab.report.html import build_report_context, render_html, render_markdown

    folder, data, _ = audited_run
    rows, summary = audit_run(folder / "r", answers=24, decode=lambda examples: [ModelAnswer(e.answer) for e in examples])
    assert not summary.claims_errors  # a model that gives every label disagrees with none
    context = build_report_context(folder / "r")
    audit = context["audit"]
    assert audit["title"] == "Hardest training examples (no error claimed)"
    assert [r["where"] for r in audit["rows"]] == [f"{data}:{r.line}" for r in rows[:20]]
    assert audit["how_to_read"] == summary.how_to_read and "does not claim errors" in audit["how_to_read"]
    markdown, html = render_markdown(context), render_html(context)
    assert f"| {data}:{rows[0].line} | {rows[0].suspicion:.1f} |" in markdown
    assert " flagged |" not in markdown.split("| where |")[1].split("## Training")[0]
    assert f"{data}:{rows[19].line}" in html and "20 of 24 shown" in html
    # a model that contradicts every answer, sure of its own: every example is claimed
    rows, summary = audit_run(folder / "r", answers=24, decode=lambda examples: [ModelAnswer("x y z", 1.0)] * len(examples))
    assert summary.flagged == 24 and summary.claims_errors
    assert build_report_context(folder / "r")["audit"]["title"] == "Suspect training examples"


def test_a_run_without_dynamics_gets_a_one_line_error(audited_run, tmp_path):
    import shutil

    from tunelab.errors import ConfigError
    from tunelab.eval.audit import audit_run

    folder, _, _ = audited_run
    copy = tmp_path / "old"
    shutil.copytree(folder / "r", copy, ignore=shutil.ignore_patterns("checkpoints", "dynamics*.jsonl"))
    with pytest.raises(ConfigError, match="no dynamics.jsonl; the run was trained before"):
        audit_run(copy, decode=_echo_decoder)


def test_answer_confidence_scores_only_the_answer_after_its_context(tiny_model, tokenizer):
    import math

    from train_examples import reference_loss_sums
    from tunelab.data.pack import collate
    from tunelab.data.tokenize import tokenize_conversation
    from tunelab.eval.audit import answer_confidences

    context = [{"role": "user", "content": "Route: my wifi drops"}, {"role": "assistant", "content": "NET"},
               {"role": "user", "content": "Route: I was charged twice"}]
    got = answer_confidences(tiny_model, tokenizer, [context, context], ["PAY", "a much longer answer here"])
    for answer, confidence in zip(["PAY", "a much longer answer here"], got, strict=True):
        # the reference: the model's own logits over the same conversation, the earlier answer untrained
        example = tokenize_conversation(tokenizer, [
            context[0], {**context[1], "weight": 0}, context[2], {"role": "assistant", "content": answer}])
        tokens = tokenizer(answer, add_special_tokens=False)["input_ids"]
        assert example.trainable_tokens == len(tokens) + 1  # the answer and its end of turn
        with torch.no_grad():
            ref = reference_loss_sums(tiny_model, collate([{"input_ids": example.input_ids, "labels": example.labels}],
                                                          [(0,)], pad_id=0))
        assert confidence == pytest.approx(math.exp(-ref.loss_sum.item() / int(ref.count)), rel=1e-4)

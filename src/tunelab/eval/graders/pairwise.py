"""A pairwise judge: which of two arms' outputs is better, example by example, with position bias
controlled.

Reads a PairwiseJudge config, the two arms' outputs and the items; asks the judge twice per example,
once with arm a's output as "A" and once as "B" (calls cached like every judge call). A win needs
both orders to prefer the same output; the orders disagreeing (the judge preferring a position, not
an output) is a tie and counted as a position disagreement. Returns the wins, losses, ties, failures
and the win rate (a tie counts half) with a bootstrap interval.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tunelab.eval.graders import judge
from tunelab.eval.graders.samples import make_sample
from tunelab.eval.metrics import bootstrap_ci
from tunelab.specs.templates import TemplateProblem, render

LABELS = ["A", "B", "tie"]


def _ask(spec: Any, first: str, second: str, item: Mapping[str, Any], cache: judge.JudgeCache) -> str:
    namespaces = {"sample_a": make_sample(first), "sample_b": make_sample(second)}
    messages = [{"role": m.role, "content": render(m.text, namespaces["sample_a"], item, namespaces)} for m in spec.input]
    messages[-1]["content"] += "\n\n" + judge.label_instruction(LABELS)
    reply = judge.chat_reply(spec, spec.model, messages, judge.sampling_body(spec.sampling_params), cache)
    return judge.read_label(reply, LABELS)


def compare_pairwise(spec: Any, arm_a: str, arm_b: str, outputs_a: Sequence[str], outputs_b: Sequence[str],
                     items: Sequence[Mapping[str, Any]], cache: judge.JudgeCache, seed: int = 0) -> dict[str, Any]:
    def both_orders(i: int) -> tuple[str | None, str | None, str | None]:
        try:
            a_first = _ask(spec, outputs_a[i], outputs_b[i], items[i], cache)
            b_first = _ask(spec, outputs_b[i], outputs_a[i], items[i], cache)
        except (judge.JudgeFailed, TemplateProblem) as err:
            return None, None, str(err)
        return a_first, b_first, None

    with ThreadPoolExecutor(max_workers=spec.concurrency) as pool:
        answers = list(pool.map(both_orders, range(len(items))))
    outcomes: list[float] = []
    wins = losses = ties = disagreements = 0
    errors = []
    for i, (a_first, b_first, error) in enumerate(answers):
        if error is not None:
            errors.append({"index": i, "error": error})
            continue
        if a_first == "A" and b_first == "B":
            wins += 1
            outcomes.append(1.0)
        elif a_first == "B" and b_first == "A":
            losses += 1
            outcomes.append(0.0)
        else:
            ties += 1
            outcomes.append(0.5)
            disagreements += a_first == b_first != "tie"  # the same position both times: position bias
    win_rate = sum(outcomes) / len(outcomes) if outcomes else None
    ci = list(bootstrap_ci(outcomes, seed=seed)) if outcomes else None
    text = (f"pairwise judge ({spec.model}): {arm_a} wins {wins}, loses {losses}, ties {ties} against {arm_b} "
            f"(win rate {win_rate:.0%}, ties count half; {disagreements} ties from the two orders disagreeing)"
            if win_rate is not None else f"pairwise judge ({spec.model}): every comparison failed")
    return {"a": arm_a, "b": arm_b, "wins": wins, "losses": losses, "ties": ties,
            "position_disagreements": disagreements, "failed": len(errors), "first_errors": errors[:5],
            "win_rate": win_rate, "win_rate_ci95": ci, "text": text}

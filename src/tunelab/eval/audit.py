"""`tunelab data audit`: the training examples ranked by how likely their answer is wrong.

Reads a trained run: data/train.jsonl (each example's source file:line and messages),
data/train.tokens.jsonl (which conversation each tokenized row belongs to), train/dynamics*.jsonl
(each example's answer-token loss every time training saw it: train/dynamics.py) and the tuned model
(adapter/ or model/), whose greedy answers are decoded for the top of the list. Writes RUN/audit/:
  audit.jsonl   one row per training example, most suspect first (keys: AuditRow)
  summary.json  how the ranking was made and what it claims (keys: AuditSummary)
`write_clean` writes a copy of the user's training file without the N most suspect examples.

The signals, per example (dataset cartography, Swayamdipta et al. 2020; confident learning,
Northcutt et al.): across the passes, the mean answer-token loss, the confidence (mean per-token
probability of the answer, exp(-loss)) and its variability (standard deviation), the final pass's
loss, and whether the tuned model's own answer disagrees with the label under the task's metric
(labels: another label; JSON: the fields that differ; text: 1 - token F1). A wrong answer is one the
model keeps finding unlikely while learning everything else: a high loss relative to the run's own
distribution (for label sets, to the examples of the same label: class-conditional, so a label that
is simply harder is not flagged as a whole), and, once trained, a model that answers otherwise.

suspicion = the robust z-score of the ranking signal (RANK_SIGNAL, chosen by measurement: see
docs/audit.md) against the run's own examples (median and MAD), plus DISAGREEMENT_WEIGHT when the
model's answer disagrees (z clipped to +-Z_CAP, so a contradicted answer comes first). An example is *flagged* (claimed likely wrong) only when the model answers
otherwise AND is at least as sure of its own answer as it is, on average, of the training answers of
that label (confident learning's per-class threshold; for JSON and text, of all training answers): a
model that merely errs is unsure, one that was taught a wrong label keeps its own. With none flagged
the ranking is only an order of difficulty.

Why in eval/: it grades the model's answers with the task's own scorers (eval/metrics.py) and decodes
them with the generation engine, and reads training's files; both lie below eval, and data/ (which
must not import train or eval) only owns the file it copies.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError
from tunelab.eval.arms import to_eval_example
from tunelab.eval.metrics import (
    OutputKind,
    detect_output_kind,
    lenient_json,
    normalize_text,
    predicted_label,
    strict_json,
    token_f1,
)
from tunelab.files import write_text_atomic
from tunelab.runs import RunPaths
from tunelab.train.dynamics import read_dynamics

MIN_PASSES = 2  # dynamics need at least two looks at an example
RANK_SIGNAL = "final_loss"  # the best of the dynamics alone on planted errors (docs/audit.md)
DISAGREEMENT_WEIGHT = 10.0  # = Z_CAP: an answer the model contradicts outranks any loss alone (measured: better)
Z_CAP = 10.0  # z-scores are clipped to +-Z_CAP in the suspicion (a last loss 50 MADs out is not 5x more suspect)
MIN_CLASS_SIZE = 8  # smaller label classes are compared with the whole run instead
MAD_FLOOR = 0.02  # nats: a run whose losses are all alike has no outliers, not infinite z-scores
DEFAULT_ANSWERS = 40  # model answers decoded for the top of the ranking


@dataclass
class AuditRow:
    """One training example in RUN/audit/audit.jsonl."""

    rank: int  # 1 = most suspect
    file: str
    line: int
    id: str
    suspicion: float  # higher = more suspect: the robust z-score (+ DISAGREEMENT_WEIGHT if the model disagrees)
    flagged: bool  # claimed likely wrong: an outlier the tuned model also answers otherwise
    answer: str  # the label in the user's file (the conversation's last assistant turn)
    model_answer: str | None  # the tuned model's greedy answer (the top of the list only)
    reason: str
    z: float  # robust z-score of the ranking signal within the run (or its label class)
    passes: int  # times training saw the example
    mean_loss: float  # nats per answer token, mean over the passes
    confidence: float  # mean over the passes of exp(-loss): per-token probability of the answer
    variability: float  # standard deviation of that probability over the passes
    final_loss: float  # the last pass's loss
    disagreement: float | None  # 0 (the model gives the label) .. 1 (entirely different); None: not decoded
    group: str | None = None  # the label class it was compared within (label tasks)
    model_confidence: float | None = None  # the tuned model's per-token probability of its own answer


@dataclass(frozen=True)
class ModelAnswer:
    text: str  # the tuned model's greedy answer
    confidence: float | None = None  # its mean per-token probability under the tuned model (None: not scored)


@dataclass(frozen=True)
class HeldOut:
    """One training example scored by a model that did not train on it (eval/folds.py)."""

    fold: int
    loss: float  # nats per answer token of the answer in the file (inf: could not be scored)
    model_answer: str
    model_confidence: float | None  # per-token probability of its own answer


@dataclass
class AuditSummary:
    examples: int
    passes_min: int
    kind: str  # the task's output kind: label | json | text
    signal: str
    flagged: int
    decoded: int  # examples whose model answer was decoded
    claims_errors: bool
    how_to_read: str
    flag_rule: str = ("the tuned model's answer disagrees with the label and it is at least as sure of its answer as, "
                      "on average, of the training answers of that label (confident learning's per-class threshold)")
    unseen: list[str] = field(default_factory=list)  # example ids training never saw (a budget cut it short)
    folds: int = 0  # --folds K: ranked by out-of-fold loss and answers (0: by the run's own model)


# ---------------------------------------------------------------------------------------------- signals


@dataclass
class _Example:
    id: str
    source: str
    context: tuple[dict[str, str], ...]
    answer: str
    losses: list[float] = field(default_factory=list)  # per pass, mean nats per answer token


def _base_id(row_id: str) -> str:
    return row_id.split("/turn-")[0]  # a per-turn fallback row belongs to its conversation


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_examples(paths: RunPaths) -> list[_Example]:
    """The run's train examples with their losses per pass (an example split into per-turn rows:
    its rows' losses pooled, pass by pass)."""
    train_file, tokens_file = paths.data_split("train"), paths.data_tokens("train")
    for needed in (train_file, tokens_file):
        if not needed.is_file():
            raise ConfigError(f"{needed}: not found; is {paths.root} a run that `tunelab train` finished?")
    dynamics = read_dynamics(paths.train_dir)
    if not dynamics:
        raise ConfigError(f"{paths.train_dir}: no dynamics.jsonl; the run was trained before tunelab recorded "
                          "training dynamics: train it again to audit its data")
    examples = {}
    for record in _read_jsonl(train_file):
        context = to_eval_example(record, record["id"])
        examples[record["id"]] = _Example(record["id"], record["source"], context.context, context.reference)
    pooled: dict[str, list[list[float]]] = {}  # id -> per pass [loss sum, tokens]
    for index, record in enumerate(_read_jsonl(tokens_file)):
        seen = dynamics.get(index)
        if seen is None:
            continue
        passes = pooled.setdefault(_base_id(record["id"]), [])
        for k, loss in enumerate(seen.mean_losses):
            if k == len(passes):
                passes.append([0.0, 0])
            passes[k][0] += loss * seen.tokens
            passes[k][1] += seen.tokens
    for example_id, passes in pooled.items():
        if example_id in examples:
            examples[example_id].losses = [s / max(1, n) for s, n in passes]
    return list(examples.values())


def _robust_z(values: Sequence[float]) -> list[float]:
    median = statistics.median(values)
    mad = statistics.median(abs(v - median) for v in values) * 1.4826
    scale = max(mad, MAD_FLOOR)
    return [(v - median) / scale for v in values]


def signal_values(losses: Sequence[float]) -> dict[str, float]:
    """mean_loss, confidence, variability, final_loss, late_loss of one example's per-pass losses."""
    probs = [math.exp(-loss) for loss in losses]
    return {
        "mean_loss": statistics.fmean(losses), "confidence": statistics.fmean(probs),
        "variability": statistics.pstdev(probs), "final_loss": losses[-1],
        # the first pass is mostly about the format every answer shares: what stays hard after it
        "late_loss": statistics.fmean(losses[1:] or losses),
    }


def ranking_score(values: dict[str, float], signal: str = RANK_SIGNAL) -> float:
    """Higher = more suspect, for each candidate signal (docs/audit.md compares them). Linear, not
    log: on a log scale the spread of the learnt examples' tiny losses (1e-3 or 1e-2 nats: both
    learnt) swamped the difference that matters (measured: planted errors ranked lower)."""
    if signal == "one_minus_confidence":
        return 1.0 - values["confidence"]
    if signal == "cartography":  # low confidence AND low variability: hard to learn and never learnt
        return (1.0 - values["confidence"]) * (1.0 - values["variability"])
    return values[signal]


def z_scores(scores: Sequence[float], groups: Sequence[str | None]) -> list[float]:
    """Robust z-scores against the whole run, or against the example's own group (its label) when that
    group holds at least MIN_CLASS_SIZE examples: class-conditional thresholds."""
    out = _robust_z(scores)
    members: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        if group is not None:
            members.setdefault(group, []).append(i)
    for indices in members.values():
        if len(indices) >= MIN_CLASS_SIZE:
            for i, z in zip(indices, _robust_z([scores[i] for i in indices]), strict=True):
                out[i] = z
    return out


# ---------------------------------------------------------------------------------------------- disagreement


def _leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_leaves(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list):
        out = {}
        for i, item in enumerate(value):
            out.update(_leaves(item, f"{prefix}[{i}]"))
        return out or {prefix: []}
    return {prefix: value}


def disagreement(model_answer: str, answer: str, kind: OutputKind) -> tuple[float, str]:
    """(0 agrees .. 1 disagrees, what differs) under the task's own metric."""
    if kind.kind == "label":
        predicted = predicted_label(model_answer, kind.labels)
        if predicted == normalize_text(answer):
            return 0.0, "the model gives this label"
        return 1.0, f"the model answers {predicted or model_answer!r}"
    if kind.kind == "json":
        ok, reference = strict_json(answer)
        if ok and isinstance(reference, dict | list):
            want, got = _leaves(reference), _leaves(lenient_json(model_answer))
            differ = [key for key, value in want.items() if got.get(key, object()) != value]
            if not differ:
                return 0.0, "the model gives these fields"
            shown = ", ".join(differ[:3]) + (f" and {len(differ) - 3} more" if len(differ) > 3 else "")
            return len(differ) / len(want), f"fields that disagree: {shown}"
    overlap = token_f1(model_answer, answer)
    return 1.0 - overlap, f"the model's answer shares {overlap:.0%} of the words (token F1)"


# ---------------------------------------------------------------------------------------------- ranking


def _self_confidence(groups: Sequence[str | None], probs: Sequence[float]) -> dict[str | None, float]:
    """Confident learning's per-class threshold: the mean probability the trained model gives the
    answers of each label (its last pass, or out of fold), and over every example (key None)."""
    out: dict[str | None, float] = {None: statistics.fmean(probs)}
    for group in set(groups) - {None}:
        out[group] = statistics.fmean(p for p, g in zip(probs, groups, strict=True) if g == group)
    return out


def rank(examples: Sequence[_Example], kind: OutputKind, model_answers: dict[str, ModelAnswer],
         signal: str = RANK_SIGNAL, held_out: dict[str, float] | None = None) -> list[AuditRow]:
    """Every example seen at least once, most suspect first (a pure function of its inputs).
    `held_out`: each example's out-of-fold answer loss (eval/folds.py), ranked by instead of `signal`
    (an example without a finite one keeps its last pass's loss)."""
    seen = [e for e in examples if e.losses]
    if not seen:
        return []
    values = [signal_values(e.losses) for e in seen]
    if held_out is not None:
        for e, v in zip(seen, values, strict=True):
            loss = held_out.get(e.id)
            v["held_out_loss"] = loss if loss is not None and math.isfinite(loss) else v["final_loss"]
        signal = "held_out_loss"
    groups = [normalize_text(e.answer) if kind.kind == "label" else None for e in seen]
    z = z_scores([ranking_score(v, signal) for v in values], groups)
    thresholds = _self_confidence(groups, [math.exp(-v["held_out_loss" if held_out is not None else "final_loss"])
                                           for v in values])
    rows = []
    for example, value, zi, group in zip(seen, values, z, groups, strict=True):
        path, _, line = example.source.rpartition(":")
        answered = model_answers.get(example.id)
        model_answer = None if answered is None else answered.text
        differs, why = (None, "") if model_answer is None else disagreement(model_answer, example.answer, kind)
        flagged = False
        if answered is not None and differs is not None and differs >= 0.5 and answered.confidence is not None:
            # the model's own answer is at least as likely as the answers of its class usually are
            other = predicted_label(model_answer, kind.labels) if kind.kind == "label" else None
            threshold = thresholds.get(other, thresholds[None])
            flagged = answered.confidence >= threshold
            why += (f"; it gives its own answer {answered.confidence:.2f} per token, "
                    f"{'above' if flagged else 'below'} the {threshold:.2f} it gives {other or 'the training answers'}")
        where = 'within its label' if group is not None and groups.count(group) >= MIN_CLASS_SIZE else 'in the run'
        reasons = [f"loss {value['mean_loss']:.2f} nats/token over {len(example.losses)} passes, z {zi:+.1f} {where}"
                   if held_out is None else
                   f"out of fold: loss {value['held_out_loss']:.2f} nats/token from a model that never saw it, "
                   f"z {zi:+.1f} {where}"]
        if why:
            reasons.append(why)
        rows.append(AuditRow(
            rank=0, file=path, line=int(line) if line.isdigit() else 0, id=example.id,
            suspicion=round(max(-Z_CAP, min(Z_CAP, zi)) + DISAGREEMENT_WEIGHT * (differs or 0.0), 3), flagged=bool(flagged),
            answer=example.answer,
            model_answer=model_answer, reason="; ".join(reasons), z=round(zi, 3), passes=len(example.losses),
            mean_loss=round(value["mean_loss"], 4), confidence=round(value["confidence"], 4),
            variability=round(value["variability"], 4), final_loss=round(value["final_loss"], 4),
            disagreement=None if differs is None else round(differs, 3), group=group,
            model_confidence=None if answered is None or answered.confidence is None else round(answered.confidence, 4),
        ))
    rows.sort(key=lambda r: (-r.suspicion, r.file, r.line))
    for i, row in enumerate(rows, start=1):
        row.rank = i
    return rows


def fewest_passes(run_dir: str | Path) -> int:
    """How many times training saw the example it saw least (0: some example never, or no dynamics)."""
    paths = RunPaths(Path(run_dir))
    if not read_dynamics(paths.train_dir):  # none recorded (an older run, or preference tuning)
        return 0
    return min((len(e.losses) for e in load_examples(paths)), default=0)


def how_to_read(flagged: int, decoded: int, folds: int = 0) -> str:
    model = f"the model that never trained on the example ({folds} folds)" if folds else "the tuned model"
    if flagged:
        loss = "out-of-fold loss" if folds else "last pass's loss"
        return (f"{flagged} example(s) are flagged: {model} answers otherwise, and is as sure of its own answer "
                "as it usually is of that label's training answers. Check them first. Suspicion ranks the rest: the "
                f"{loss} as a robust z-score within this run (at most 10), +10 where the model answers otherwise.")
    which = f"of all {decoded}, each out of fold" if folds else f"of the top {decoded} by loss"
    return (f"No example is flagged: where {model} answers otherwise ({which}), it is less sure of its answer "
            "than it usually is of the training answers: its own mistakes, not evidence against the data. The list "
            "is only an order of difficulty, hardest first, against this run's own losses; it does not claim errors.")


def audit_run(run_dir: str | Path, *, answers: int = DEFAULT_ANSWERS, device: str | None = None,
              trust_remote_code: bool = False, decode: Callable[[list[_Example]], list[ModelAnswer]] | None = None,
              held_out: dict[str, HeldOut] | None = None) -> tuple[list[AuditRow], AuditSummary]:
    """Rank a run's training examples and write RUN/audit/. The model answers the `answers` most
    suspect examples by loss (all: answers >= the number of examples); `decode` replaces the tuned
    model (tests). `held_out` (eval/folds.py: every example scored out of fold) replaces both the
    ranking signal and the tuned model's answers."""
    from tunelab.runs import open_run

    paths, recipe = open_run(run_dir, trust_remote_code)
    examples = load_examples(paths)
    kind = detect_output_kind([e.answer for e in examples])
    if held_out is not None:
        model_answers = {i: ModelAnswer(h.model_answer, h.model_confidence) for i, h in held_out.items()}
        rows = rank(examples, kind, model_answers, held_out={i: h.loss for i, h in held_out.items()})
    else:
        by_loss = rank(examples, kind, {})
        chosen_ids = {row.id for row in by_loss[:answers]}
        chosen = [e for e in examples if e.id in chosen_ids]
        if decode is None:
            decode = _tuned_model_decoder(paths, recipe, device)
        model_answers = dict(zip([e.id for e in chosen], decode(chosen), strict=True)) if chosen else {}
        rows = rank(examples, kind, model_answers)
    unseen = [e.id for e in examples if not e.losses]
    flagged = sum(r.flagged for r in rows)
    folds = 1 + max((h.fold for h in held_out.values()), default=0) if held_out else 0
    summary = AuditSummary(
        examples=len(examples), passes_min=min((r.passes for r in rows), default=0), kind=kind.kind,
        signal="held_out_loss" if held_out is not None else RANK_SIGNAL, flagged=flagged, decoded=len(model_answers),
        claims_errors=flagged > 0, how_to_read=how_to_read(flagged, len(model_answers), folds), unseen=unseen,
        folds=folds,
    )
    out = paths.audit
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "audit.jsonl", "".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in rows))
    write_text_atomic(out / "summary.json", json.dumps(asdict(summary), indent=1) + "\n")
    return rows, summary


def _tuned_model_decoder(paths: RunPaths, recipe: Any, device: str | None) -> Callable[[list[_Example]], list[ModelAnswer]]:
    def decode(examples: list[_Example]) -> list[ModelAnswer]:
        from tunelab.engine.generate import DecodingSettings, generate
        from tunelab.runs import load_run_model

        model, tokenizer = load_run_model(paths, recipe, device)
        settings = DecodingSettings(max_new_tokens=recipe.eval.max_new_tokens)
        conversations = [list(e.context) for e in examples]
        texts = [g.text for g in generate(model, tokenizer, conversations, settings, recipe.eval.batch_size)]
        sure = answer_confidences(model, tokenizer, conversations, texts)
        return [ModelAnswer(text, p) for text, p in zip(texts, sure, strict=True)]

    return decode


def answer_confidences(model: Any, tokenizer: Any, contexts: Sequence[Sequence[dict[str, str]]],
                       answers: Sequence[str], batch: int = 8) -> list[float | None]:
    """exp(-mean loss) of each answer's tokens (and its end of turn) after its context under `model`,
    dropout off: the per-token probability the model gives that answer (None: the template failed)."""
    import torch

    from tunelab.data.pack import collate
    from tunelab.data.tokenize import TemplateProblem, tokenize_conversation
    from tunelab.train.dynamics import example_losses
    from tunelab.train.loss import CausalLMLoss

    tokenized: list[dict[str, Any] | None] = []
    for context, answer in zip(contexts, answers, strict=True):
        # only the answer is scored: earlier assistant turns get weight 0
        messages = [{**m, "weight": 0} if m["role"] == "assistant" else dict(m) for m in context]
        try:
            example = tokenize_conversation(tokenizer, [*messages, {"role": "assistant", "content": answer}])
            tokenized.append({"input_ids": example.input_ids, "labels": example.labels}
                             if example.trainable_tokens > 1 else None)
        except TemplateProblem:
            tokenized.append(None)
    scored = [i for i, t in enumerate(tokenized) if t is not None]
    examples = [tokenized[i] for i in scored]
    loss = CausalLMLoss(model)
    device = next(model.parameters()).device
    out: list[float | None] = [None] * len(answers)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch):
                rows = [(i,) for i in range(start, min(start + batch, len(examples)))]
                sums = loss.forward_batch(collate(examples, rows, pad_id=tokenizer.pad_token_id or 0).to(device))
                order, loss_sums, counts = example_losses(examples, [rows], [sums.token_losses])
                for index, total, count in zip(order, loss_sums, counts, strict=True):
                    out[scored[index]] = math.exp(-total / max(1, count))
    finally:
        model.train(was_training)
    return out


def read_audit(run_dir: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
    """(rows, summary) of RUN/audit/, or None when the run has no audit."""
    folder = RunPaths(Path(run_dir)).audit
    if not (folder / "summary.json").is_file() or not (folder / "audit.jsonl").is_file():
        return None
    return _read_jsonl(folder / "audit.jsonl"), json.loads((folder / "summary.json").read_text())


def format_row(row: AuditRow | dict[str, Any]) -> str:
    """`file:line: suspicion: answer -> model answer` (one line)."""
    r = asdict(row) if isinstance(row, AuditRow) else row
    shown = r["model_answer"] if r["model_answer"] is not None else "(not decoded)"
    mark = "  [flagged]" if r["flagged"] else ""
    return f"{r['file']}:{r['line']}: {r['suspicion']:.1f}: {_one_line(r['answer'])} -> {_one_line(shown)}{mark}"


def _one_line(text: str, width: int = 80) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


# ---------------------------------------------------------------------------------------------- clean copy


def write_clean(rows: Sequence[AuditRow | dict[str, Any]], drop_top: int, out: Path, *, drop_flagged: bool = False,
                run_dir: str | Path | None = None) -> tuple[Path, list[int]]:
    """A copy of the training file without the `drop_top` most suspect examples' lines (or, with
    `drop_flagged`, without the flagged ones); the user's file is never modified. With `run_dir` (the
    audited run), OUT.cleaned-from records where the copy came from (eval/cleaned.py), so that a run
    trained on OUT is compared with that run. Returns (the source file, the dropped 1-based lines)."""
    from tunelab.eval.cleaned import provenance_path, write_provenance

    rows = [asdict(r) if isinstance(r, AuditRow) else r for r in rows]
    files = sorted({r["file"] for r in rows})
    if len(files) != 1:
        raise ConfigError(f"--write-clean: the training examples come from {len(files)} files ({', '.join(files[:3])}"
                          "...); it copies one JSONL file: drop the examples from each file by hand")
    source = Path(files[0])
    if source.suffix.lower() != ".jsonl":
        raise ConfigError(f"--write-clean: {source} is not a JSONL file; it copies JSONL files line by line")
    if not source.is_file():
        raise ConfigError(f"--write-clean: {source} (the training file the run read) is not found from here")
    if out.resolve() == source.resolve() or provenance_path(out).resolve() == source.resolve():
        raise ConfigError(f"--write-clean {out}: is the training file itself; tunelab never modifies your data")
    ranked = sorted(rows, key=lambda r: r["rank"])
    if drop_flagged:
        chosen = [r for r in ranked if r["flagged"]]
        if not chosen:
            raise ConfigError("--drop-flagged: the audit flags no example (it claims no error; the ranking is only an "
                              "order of difficulty): nothing to leave out. --drop-top N leaves out the N hardest anyway")
    else:
        chosen = ranked[:drop_top]
    dropped = sorted(r["line"] for r in chosen)
    drop = set(dropped)
    with source.open(encoding="utf-8", newline="") as f:
        kept = [line for number, line in enumerate(f, start=1) if number not in drop]
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, "".join(kept))
    if run_dir is not None:
        write_provenance(out, Path(run_dir), source, chosen, "flagged" if drop_flagged else f"top {drop_top}")
    return source, dropped

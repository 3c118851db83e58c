"""`data check`: every problem of the data in one pass, quality findings, token statistics and a
training time/cost estimate, before any training.

Reads the train (and optional valid) file or folder, streaming (memory does not grow with the file
for JSONL/CSV/Parquet); with a model, reads them a second time to tokenize with its chat template,
then loads the model once for a short measured forward/backward pass. Writes nothing. The structural
pass imports neither torch nor transformers, so format errors are reported at once (on_issue sees
each issue as it is found).

Public API:
  check_data(train, valid=None, *, model=None, tokenizer=None, ...) -> CheckReport
  CheckReport.summary_lines() / .json_lines() / .exit_code      console and --json output
  measure_tokens_per_s(model_name, seq_len) -> (tokens_per_s, device)
"""

from __future__ import annotations

import json
import sys
import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.config import DataConfig, EvalConfig
from tunelab.console import format_duration
from tunelab.data.formats import data_files
from tunelab.data.preference import check_preferences, is_preference_file
from tunelab.data.quality import NEAR_DUP_MAX_EXAMPLES, QualityIndex
from tunelab.data.validate import ERROR, WARNING, Issue, read_examples

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_FILE_LEVEL = ("unreadable_file", "empty_file", "skipped_file")
_PROGRESS_MIN_EXAMPLES = 2000
_MEASURE_SEQ_LEN = 128  # long enough for a per-token cost, short enough to finish in a moment
_MEASURE_MIN_S = 0.3
_MEASURE_MAX_REPEATS = 3


@dataclass
class TrainingEstimate:
    model: str
    device: str
    tokens_per_s: float  # measured forward + backward of a LoRA-like step (see measure_tokens_per_s)
    train_tokens: int  # tokens of one epoch
    epochs: float
    seconds: float
    gpu_price_per_hour: float
    cost_usd: float
    note: str = ""


@dataclass
class CheckReport:
    files: list[str]
    records: int = 0
    examples: int = 0
    bytes_read: int = 0
    formats: Counter[str] = field(default_factory=Counter)
    issues: list[Issue] = field(default_factory=list)
    quality: dict[str, int] = field(default_factory=dict)
    model: str | None = None
    max_seq_len: int = 0
    tokens: dict[str, float] | None = None
    estimate: TrainingEstimate | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return sum(1 for issue in self.issues if issue.severity == ERROR)

    @property
    def warnings(self) -> int:
        return sum(1 for issue in self.issues if issue.severity == WARNING)

    @property
    def exit_code(self) -> int:
        return 1 if self.errors else 0

    def summary(self) -> dict[str, Any]:
        codes = Counter(issue.code for issue in self.issues)
        return {
            "files": self.files, "records": self.records, "examples": self.examples, "bytes": self.bytes_read,
            "formats": dict(self.formats),
            "issues": {"errors": self.errors, "warnings": self.warnings, "by_code": dict(sorted(codes.items()))},
            "quality": self.quality, "model": self.model, "max_seq_len": self.max_seq_len, "tokens": self.tokens,
            "estimate": None if self.estimate is None else self.estimate.__dict__, "notes": self.notes,
        }

    def json_lines(self) -> list[str]:
        """--json: one {"kind": "issue", ...} line per issue, then one {"kind": "summary", ...}."""
        lines = [json.dumps({"kind": "issue", **issue.to_dict()}, ensure_ascii=False) for issue in self.issues]
        lines.append(json.dumps({"kind": "summary", **self.summary()}, ensure_ascii=False))
        return lines

    def summary_lines(self) -> list[str]:
        """The console summary printed after the issues."""
        formats = ", ".join(f"{name} {n}" for name, n in self.formats.most_common()) or "none"
        lines = [f"checked {' and '.join(self.files)}: {self.records} records, {self.examples} valid examples ({formats})"]
        codes = Counter(issue.code for issue in self.issues)
        by_code = ", ".join(f"{code} {n}" for code, n in sorted(codes.items()))
        lines.append(f"errors: {self.errors}, warnings: {self.warnings}" + (f" ({by_code})" if by_code else ""))
        if self.quality:
            lines.append("quality: " + ", ".join(f"{name} {n}" for name, n in self.quality.items()))
        if self.tokens is not None:
            t = self.tokens
            lines.append(
                f"tokens ({self.model}, max_seq_len {self.max_seq_len}): per example min {t['min']}, median {t['median']:g}, "
                f"p95 {t['p95']:g}, max {t['max']}; total {t['total']:,}, trainable {t['trainable_total']:,}"
            )
        if self.estimate is not None:
            e = self.estimate
            lines.append(
                f"training estimate: {e.epochs:g} epochs x {e.train_tokens:,} tokens ~ {format_duration(e.seconds)} on this "
                f"machine ({e.device}, {e.tokens_per_s:,.0f} tokens/s measured in a LoRA-like forward+backward of {e.model}); "
                f"~${e.cost_usd:,.2f} at ${e.gpu_price_per_hour:g}/h" + (f"; {e.note}" if e.note else "")
            )
        lines.extend(f"note: {note}" for note in self.notes)
        return lines


def check_data(
    train: str | Path,
    valid: str | Path | None = None,
    *,
    fmt: str = "auto",
    model: str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_seq_len: int = DataConfig.model_fields["max_seq_len"].default,
    system_prompt: str | None = None,
    epochs: float | None = None,
    gpu_price_per_hour: float = EvalConfig.model_fields["gpu_price_per_hour"].default,
    held_out_fraction: float | None = None,
    measure_speed: bool = True,
    near_dup_max_examples: int | None = NEAR_DUP_MAX_EXAMPLES,
    on_issue: Callable[[Issue], None] | None = None,
) -> CheckReport:
    """Structural checks, quality, then (with a model or tokenizer) tokens and a training estimate.
    `held_out_fraction`: the share of train that `prepare` will split off when no valid file is given
    (default: data.valid_fraction + data.test_fraction), used for the estimate. `epochs`: default, the
    passes the training planner would choose for this many examples (train/plan.py)."""
    inputs = [("train", Path(train))] + ([("valid", Path(valid))] if valid is not None else [])
    report = CheckReport(files=[str(path) for _, path in inputs], max_seq_len=max_seq_len)

    def add(issue: Issue) -> None:
        report.issues.append(issue)
        if on_issue is not None:
            on_issue(issue)

    if fmt == "auto" and is_preference_file(train):  # preference pairs (method: dpo) have their own checks
        check_preferences(report, inputs, model=model, tokenizer=tokenizer, max_seq_len=max_seq_len,
                          system_prompt=system_prompt, near_dup_max_examples=near_dup_max_examples, add=add)
        return report

    # structure, and fingerprints for the quality checks (no torch here)
    index = QualityIndex(near_dup_max_examples=near_dup_max_examples)
    for split, path in inputs:
        if path.exists():
            report.bytes_read += sum(f.stat().st_size for f in data_files(path)[0])
        formats: Counter[str] = Counter()
        index_add = index.add
        for example, issues in read_examples(path, fmt, system_prompt):  # the hot loop: one pass per line
            if example is not None:
                formats[example.format] += 1
                index_add(split, example.path, example.line, example.messages)
                if not issues:
                    continue
            for issue in issues:
                add(issue)
            if example is None and any(issue.code not in _FILE_LEVEL for issue in issues):
                report.records += 1
        report.formats.update(formats)
        report.examples += formats.total()
        report.records += formats.total()
    quality = index.findings()
    for issue in quality.issues:
        add(issue)
    report.quality = quality.counts()
    report.notes.extend(quality.notes)

    if (tokenizer is None and model is None) or not report.examples:
        return report
    report.model = model or getattr(tokenizer, "name_or_path", None) or "tokenizer"
    if tokenizer is None:
        from tunelab.models import load_tokenizer

        tokenizer = load_tokenizer(model)
    train_tokens = _token_phase(report, inputs, tokenizer, fmt, system_prompt, max_seq_len, add)
    if measure_speed and model is not None and train_tokens:
        data_defaults = DataConfig.model_fields
        if held_out_fraction is None:
            held_out_fraction = 0.0 if valid is not None else (
                data_defaults["valid_fraction"].default + data_defaults["test_fraction"].default)
        tokens = int(train_tokens * (1 - held_out_fraction))
        tokens_per_s, device = measure_tokens_per_s(model, min(max_seq_len, _MEASURE_SEQ_LEN))
        if epochs is None:
            from tunelab.data.passes import auto_epochs

            epochs = auto_epochs(round(report.examples * (1 - held_out_fraction)))
        seconds = epochs * tokens / tokens_per_s
        note = f"{held_out_fraction:.0%} of train held out for valid/test" if held_out_fraction else ""
        report.estimate = TrainingEstimate(model, device, tokens_per_s, tokens, epochs, seconds, gpu_price_per_hour,
                                           seconds / 3600 * gpu_price_per_hour, note)
    return report


def _token_phase(report: CheckReport, inputs: list[tuple[str, Path]], tokenizer: PreTrainedTokenizerBase, fmt: str,
                 system_prompt: str | None, max_seq_len: int, add: Callable[[Issue], None]) -> int:
    """Tokenizes every valid example; returns the tokens of the train examples that fit."""
    from tqdm import tqdm

    from tunelab.data.tokenize import TemplateProblem, end_of_turn_probe, token_stats, tokenize_for_training

    template = f"chat template of {report.model}"
    problem = end_of_turn_probe(tokenizer)
    if problem:
        add(Issue(template, 0, "end_of_turn_not_trained", problem))
    lengths, trainable = array("Q"), array("Q")
    train_tokens = too_long = 0
    no_end_of_turn: list[str] = []
    prefix_fallbacks: list[str] = []
    progress = tqdm(total=report.examples, desc="tokenizing", unit="ex", file=sys.stderr,
                    disable=report.examples < _PROGRESS_MIN_EXAMPLES)
    for split, path in inputs:
        for example, _ in read_examples(path, fmt, system_prompt):
            if example is None:
                continue
            progress.update()
            try:
                parts = tokenize_for_training(tokenizer, example.messages, max_seq_len)
            except TemplateProblem as err:
                add(Issue(example.path, example.line, err.code, str(err)))
                continue
            length = sum(p.length for p in parts)
            trained = sum(p.trainable_tokens for p in parts)
            lengths.append(length)
            if any(p.truncated for p in parts):
                trained = 0  # prepare drops it
                too_long += 1
                add(Issue(example.path, example.line, "too_long", f"{max(p.length for p in parts)} tokens > max_seq_len {max_seq_len}"))
            elif trained == 0:  # prepare drops it; the structural pass may have said so already
                if not any(w.code == "zero_trainable_tokens" for w in example.warnings):
                    add(Issue(example.path, example.line, "zero_trainable_tokens", "no assistant token would be trained"))
            elif split == "train":
                train_tokens += length
            trainable.append(trained)
            if not all(p.end_of_turn_trained for p in parts):
                no_end_of_turn.append(example.source)
            if not parts[0].prefix_ok:
                prefix_fallbacks.append(example.source)
    progress.close()
    if no_end_of_turn and not problem:
        add(Issue(template, 0, "end_of_turn_not_trained",
                  f"{len(no_end_of_turn)} examples have an assistant turn without an end-of-turn token (first: {no_end_of_turn[0]})"))
    if prefix_fallbacks:
        add(Issue(template, 0, "prefix_mismatch",
                  f"renders earlier turns differently in {len(prefix_fallbacks)} examples (first: {prefix_fallbacks[0]}); "
                  "prepare trains each turn as its own example"))
    report.quality["too_long"] = too_long
    report.tokens = token_stats(lengths, trainable)
    return train_tokens


def measure_tokens_per_s(model_name: str, seq_len: int) -> tuple[float, str]:
    """Tokens per second of a forward + backward pass of one seq_len row on this machine, the
    fastest of up to 3 repeats after one warm-up pass (a few hundred ms on tiny-test). The weights
    are frozen and the gradient flows to the input embeddings: the cost of a LoRA step (activations'
    backward, no full weight gradients), the recipe default; full fine-tuning costs up to ~1.5x more."""
    import torch

    from tunelab.models import load_model

    model = load_model(model_name, dtype="auto")
    model.requires_grad_(False)
    device = str(next(model.parameters()).device)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=generator).to(device)
    embedding = model.get_input_embeddings()

    def step() -> None:
        inputs = embedding(ids).detach().requires_grad_(True)
        model(inputs_embeds=inputs, labels=ids).loss.backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    step()  # warm-up: allocations, kernel selection
    fastest_s, started = float("inf"), time.perf_counter()
    for _ in range(_MEASURE_MAX_REPEATS):
        begin = time.perf_counter()
        step()
        fastest_s = min(fastest_s, time.perf_counter() - begin)
        if time.perf_counter() - started > _MEASURE_MIN_S:
            break
    # the fastest repeat: a shared machine's other load only ever slows a repeat down
    return seq_len / fastest_s, device

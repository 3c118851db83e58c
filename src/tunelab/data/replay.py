"""Replay: general examples mixed into training so the fine-tune keeps rehearsing what the model could do.

Self-replay (the default): the base model's own greedy answers to the general prompts shipped in
assets/replay_prompts.jsonl (none of them a forgetting probe), generated once per base model by
train/self_replay.py and kept in the model cache (<tunelab home>/replay/<model>/<sha256 of model, prompts and settings>.jsonl), with
a quality check (the answer ended by itself, within REPLAY_MAX_NEW_TOKENS, and has a few words).
`train.replay: FILE` uses the user's own general chat examples instead. `train.replay_share` is the
share of each pass's training examples that are replay; auto is what its share of a pass's tokens buys
(`auto_per_pass`, once the rows are tokenized), written with its reason to data/stats.json and train/plan.json. Replay examples go to training only, never
to the validation or test split (data/prepare.py).

Self-replay rows train the first REPLAY_HEAD_TOKENS tokens of each answer (`replay_head`), where the form
of an answer is decided, so a pass rehearses more different prompts for the same tokens.

Replay is spread across the passes: the data stage keeps a pool of replay examples (auto: every usable
one; a recipe's share: `replay_pool_size`, enough for every pass of the data's auto passes to read
different ones), and each pass over the task data reads its own slice of `per_pass` of them (`ReplaySlices`: a seeded order of the
pool, read on cyclically, so a run with more passes than planned comes round again). Replay then adds a fixed
share to every pass instead of the whole pool to each, and a small task keeps its passes.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.data.pack import trained_positions
from tunelab.data.passes import auto_epochs
from tunelab.models import cache_folder_name, tunelab_home

if TYPE_CHECKING:
    from tunelab.config import ModelConfig, TrainConfig

PROMPTS_FILE = "assets/replay_prompts.jsonl"
REPLAY_MAX_NEW_TOKENS = 128  # a complete short answer; one cut off here would teach the model to stop mid-sentence
REPLAY_MIN_WORDS = 3
AUTO_SHARE = 0.1  # auto's share until the rows are tokenized; auto_per_pass then decides it (docs/training.md, Replay)
REPLAY_TOKEN_SHARE = 0.12  # auto replay adds this to a pass's tokens: training time is its price
REPLAY_HEAD_TOKENS = 12  # a self-replay row trains the first answer tokens only (where the answer's form is decided)
MIN_REPLAY_EXAMPLES = 48  # a recipe's own share keeps at least this many in its pool, for its passes to differ
MIN_REPLAY_PER_PASS = 2  # a tiny task's pass still reads a couple of replay examples
AUTO_RULE = 5  # the auto rule's version, in the data fingerprint: a new rule prepares the data again
SPREAD_RULE = 1  # how replay is spread across passes (a pool, a slice a pass), in the data fingerprint
HEAD_RULE = 1  # how self-replay rows are cut to their first answer tokens, in the data fingerprint


def replay_prompts() -> list[str]:
    text = resources.files("tunelab").joinpath(PROMPTS_FILE).read_text(encoding="utf-8")
    return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]


def self_replay_path(model: ModelConfig) -> Path:
    """Where the base model's answers are cached: one file per model, prompt set and settings."""
    key = json.dumps({"model": model.name, "revision": model.revision, "dtype": model.dtype,
                      "prompts": replay_prompts(), "max_new_tokens": REPLAY_MAX_NEW_TOKENS}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return tunelab_home() / "replay" / cache_folder_name(model.name) / f"{digest}.jsonl"


def good_answer(text: str, finish_reason: str) -> bool:
    """The quality check of a self-replay answer: it ended by itself and says something."""
    return finish_reason == "stop" and len(text.split()) >= REPLAY_MIN_WORDS


@dataclass(frozen=True)
class ReplayPlan:
    """How many replay examples join training, from which file, and why (data/stats.json "replay")."""

    file: str | None
    source: str  # "self" (the base model's answers) | "recipe" (train.replay)
    share: float  # of all training examples
    share_source: str  # "auto" | "recipe"
    reason: str

    def to_dict(self, examples: int, available: int) -> dict[str, Any]:
        return {"file": self.file, "source": self.source, "share": self.share, "share_source": self.share_source,
                "examples": examples, "available": available, "reason": self.reason}


def replay_share_key(train: TrainConfig) -> float | str:
    """What the replay share depends on beyond the data (for the data fingerprint): the recipe's share,
    or the auto rule's version (the auto share is a function of the data, which the fingerprint has), and
    how replay is spread across passes (SPREAD_RULE: the pool written to replay.jsonl depends on it), and for
    self-replay how its rows are cut (replay_head)."""
    share = f"auto-{AUTO_RULE}" if train.replay_share == "auto" else f"{float(train.replay_share):g}"
    head = "" if train.replay else f"/head-{REPLAY_HEAD_TOKENS}.{HEAD_RULE}"
    return f"{share}/spread-{SPREAD_RULE}{head}"


def auto_per_pass(task_tokens: int, replay_tokens: float, pool: int) -> tuple[int, str]:
    """Auto replay's examples a pass and why: as many different ones as REPLAY_TOKEN_SHARE of a pass's tokens
    buys (`task_tokens`: the task's training tokens a pass; `replay_tokens`: a replay row's mean length), at
    least MIN_REPLAY_PER_PASS, at most the `pool`.

    What keeps general ability is how many different general prompts training rehearses (measured on
    routing, 117 examples, 6 passes: 13 replay examples kept 65% of the general probes the base model knew,
    48 kept 78%; on a short-numeric-answer task, 59 kept 76% and all 158 kept 86%), and its price is the
    tokens they add: a fixed share of the tokens, spent on as many prompts as it buys, keeps the price and
    raises the coverage where rows are short (self-replay rows are their first answer tokens: replay_head)."""
    if pool <= 0:
        return 0, "auto: only 0 usable replay examples (after the quality check and leaving out prompts of your data)"
    bought = math.floor(REPLAY_TOKEN_SHARE * task_tokens / replay_tokens) if replay_tokens > 0 else pool
    per_pass = min(pool, max(MIN_REPLAY_PER_PASS, bought))
    why = (f"auto: {per_pass} replay examples a pass of the {pool} usable, what {REPLAY_TOKEN_SHARE:.0%} of a pass's "
           f"tokens buys ({task_tokens} task tokens; a replay row is {replay_tokens:.0f} tokens)")
    if per_pass == pool and bought > pool:
        why += ": every usable one, every pass"
    elif per_pass > bought:
        why += f": at least {MIN_REPLAY_PER_PASS} a pass"
    return per_pass, why


def replay_head(input_ids: list[int], labels: list[int], tokens: int = REPLAY_HEAD_TOKENS) -> tuple[list[int], list[int]]:
    """A self-replay row cut after its first `tokens` trained answer tokens; a row whose answer is no longer
    than that plus one (its end-of-turn) is kept whole. The form of an answer (prose, a list, JSON, a bare
    number) is decided in its first tokens, and a fine-tune's output format bleeds into general prompts there
    (measured on a JSON task: counting prompts answered '{"items": ...'); the rest of a general answer costs
    training time and, as the base model's greedy text, sharpens the model away from ordinary text. The cut
    row has no end-of-turn, so nothing teaches the model to stop mid-answer."""
    trained = trained_positions(labels)
    if len(trained) <= tokens + 1:
        return input_ids, labels
    end = trained[tokens - 1] + 1
    return input_ids[:end], labels[:end]


def replay_pool_size(task_examples: int, per_pass: int, available: int) -> int:
    """Replay examples kept for a run with a recipe's own train.replay_share (data/replay.jsonl): a different
    slice of `per_pass` for each of the data's auto passes, at least MIN_REPLAY_EXAMPLES, at most the
    `available` usable ones. Auto replay keeps every usable one (auto_per_pass decides a pass's slice)."""
    if per_pass <= 0:
        return 0
    passes = max(1, math.ceil(auto_epochs(task_examples)))
    return min(available, max(per_pass, MIN_REPLAY_EXAMPLES, per_pass * passes))


def decide_replay_share(train: TrainConfig, replay_file: Path | None, task_examples: int = 0,
                        available: int = 0) -> ReplayPlan:
    """train.replay_share and its reason; for auto, what replay is (the share a pass is decided once the
    rows are tokenized: auto_per_pass)."""
    source = "recipe" if train.replay else "self"
    file = str(replay_file) if replay_file else None
    if train.replay_share != "auto":
        return ReplayPlan(file if train.replay_share else None, source, float(train.replay_share), "recipe",
                          f"train.replay_share {float(train.replay_share):g}")
    what = ("your general examples (train.replay)" if train.replay else
            f"the base model's own answers to general prompts, each its first {REPLAY_HEAD_TOKENS} answer tokens")
    return ReplayPlan(file, source, AUTO_SHARE, "auto",
                      f"replay is {what}, so the fine-tune keeps rehearsing what the model could do")


def replay_count(task_examples: int, share: float) -> int:
    """Replay examples that make `share` of all training examples: r / (n + r) = share."""
    if share <= 0 or task_examples == 0:
        return 0
    return round(share * task_examples / (1 - share))


def choose_replay(candidates: list[Any], count: int, seed: int) -> list[Any]:
    """A seeded draw of `count` candidates (all of them when there are fewer), in file order."""
    if count >= len(candidates):
        return list(candidates)
    picked = sorted(random.Random(seed).sample(range(len(candidates)), count))
    return [candidates[i] for i in picked]


@dataclass(frozen=True)
class ReplaySlices:
    """Which replay examples each pass reads: `per_pass` of the pool, a different slice each pass.

    The pool (`replay`: indices of the replay examples among the training examples) is put in a seeded order
    once; pass e reads positions e * per_pass ... (e + 1) * per_pass - 1 of it, cyclically. So every pass reads
    exactly `per_pass`, consecutive passes read different ones until the pool is used up, and a run of E passes
    reads min(pool, E x per_pass) different replay examples. A fixed function of (seed, pass): a resumed run
    reads what the uninterrupted one would."""

    task: tuple[int, ...]  # indices of the task's own training examples (every pass reads them all)
    replay: tuple[int, ...]  # indices of the replay pool
    per_pass: int
    seed: int

    def order(self) -> list[int]:
        order = list(self.replay)
        random.Random(self.seed * 7_919 + 17).shuffle(order)
        return order

    def replay_of_pass(self, epoch: int) -> list[int]:
        """The replay examples pass `epoch` reads, in index order."""
        order = self.order()
        if not order:
            return []
        count = min(self.per_pass, len(order))
        return sorted(order[(epoch * count + j) % len(order)] for j in range(count))

    def examples_of_pass(self, epoch: int) -> list[int]:
        """Every example pass `epoch` reads: the task's, then its replay slice."""
        return [*self.task, *self.replay_of_pass(epoch)]


def replay_slices(examples: list[dict[str, Any]] | Any, per_pass: int | None, seed: int) -> ReplaySlices | None:
    """The slices of a run's training examples (replay ones have ids starting `replay-`), or None when every
    pass reads them all: no replay, no `per_pass` (a data folder prepared before replay was spread), or a pool
    no larger than a pass's share."""
    replay = tuple(i for i, e in enumerate(examples) if str(e.get("id", "")).startswith("replay-"))
    if not replay or per_pass is None or per_pass >= len(replay):
        return None
    task = tuple(i for i, e in enumerate(examples) if not str(e.get("id", "")).startswith("replay-"))
    return ReplaySlices(task, replay, int(per_pass), seed)


def replay_read(steps: Any, examples: Any) -> dict[str, int]:
    """What a run's planned steps (data/pack.py Step) read of the replay examples: `read` different ones,
    `reads` in all, over `passes` passes (train/plan.json replay.spread)."""
    seen: list[int] = [i for step in steps for micro in step.micro_batches for row in micro for i in row
                       if str(examples[i].get("id", "")).startswith("replay-")]
    passes = len({step.epoch for step in steps})
    return {"read": len(set(seen)), "reads": len(seen), "passes": passes}

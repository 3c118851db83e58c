"""Replay: general examples mixed into training so the fine-tune keeps rehearsing what the model could do.

Self-replay (the default): the base model's own greedy answers to the general prompts shipped in
assets/replay_prompts.jsonl (none of them a forgetting probe), generated once per base model by
train/self_replay.py and kept in the model cache (<tunelab home>/replay/<model>/<sha256 of model, prompts and settings>.jsonl), with
a quality check (the answer ended by itself, within REPLAY_MAX_NEW_TOKENS, and has a few words).
`train.replay: FILE` uses the user's own general chat examples instead. `train.replay_share` is the
share of training examples that are replay; auto is decided here (`decide_replay_share`) and written
with its reason to data/stats.json and train/plan.json. Replay examples go to training only, never to
the validation or test split (data/prepare.py).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.models import tunelab_home

if TYPE_CHECKING:
    from tunelab.config import ModelConfig, TrainConfig

PROMPTS_FILE = "assets/replay_prompts.jsonl"
REPLAY_MAX_NEW_TOKENS = 128  # a complete short answer; one cut off here would teach the model to stop mid-sentence
REPLAY_MIN_WORDS = 3
AUTO_SHARE = 0.1  # one example in ten at least (docs/training.md, Replay)
MIN_REPLAY_EXAMPLES = 48  # distinct general prompts auto replay rehearses beside a small task
MAX_AUTO_SHARE = 0.3  # auto replay never takes more of the training examples
AUTO_RULE = 2  # the auto rule's version, in the data fingerprint: a new rule prepares the data again


def replay_prompts() -> list[str]:
    text = resources.files("tunelab").joinpath(PROMPTS_FILE).read_text(encoding="utf-8")
    return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]


def self_replay_path(model: ModelConfig) -> Path:
    """Where the base model's answers are cached: one file per model, prompt set and settings."""
    key = json.dumps({"model": model.name, "revision": model.revision, "dtype": model.dtype,
                      "prompts": replay_prompts(), "max_new_tokens": REPLAY_MAX_NEW_TOKENS}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in model.name)[-80:]
    return tunelab_home() / "replay" / folder / f"{digest}.jsonl"


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
    or the auto rule's version (the auto share is a function of the data, which the fingerprint has)."""
    return f"auto-{AUTO_RULE}" if train.replay_share == "auto" else float(train.replay_share)


def auto_replay_share(task_examples: int, available: int) -> tuple[float, str]:
    """The auto share and why: AUTO_SHARE of the training examples, raised until the replay examples are
    MIN_REPLAY_EXAMPLES distinct prompts (or all the usable ones), at most MAX_AUTO_SHARE.

    A small task trained for many passes sees its few replay examples many times: they are soon learned
    by heart and stop holding the model where it was (measured on routing, 117 examples, 6 passes: 13
    replay examples kept 65% of the general probes the base model knew). What keeps general ability is
    how many different general prompts training rehearses, not their share alone."""
    floor = AUTO_SHARE
    wanted = min(available, MIN_REPLAY_EXAMPLES)
    by_count = wanted / (task_examples + wanted) if task_examples + wanted else 0.0
    if task_examples <= 0 or by_count <= floor:
        return floor, f"auto: {floor:.0%} of training examples"
    share = min(MAX_AUTO_SHARE, by_count)
    count = replay_count(task_examples, share)
    capped = " (the most auto gives)" if share < by_count else ""
    return share, (f"auto: {share:.0%} of training examples{capped}, so that {count} different general prompts are "
                   f"rehearsed beside {task_examples} task examples ({floor:.0%} would be {replay_count(task_examples, floor)}, "
                   f"too few: a small set's replay is learned by heart and stops holding the model)")


def decide_replay_share(train: TrainConfig, replay_file: Path | None, task_examples: int = 0,
                        available: int = 0) -> ReplayPlan:
    """train.replay_share, or the auto share (auto_replay_share: from the task's kept training examples
    and the usable replay examples) and its reason."""
    source = "recipe" if train.replay else "self"
    file = str(replay_file) if replay_file else None
    if train.replay_share != "auto":
        return ReplayPlan(file if train.replay_share else None, source, float(train.replay_share), "recipe",
                          f"train.replay_share {float(train.replay_share):g}")
    what = "your general examples (train.replay)" if train.replay else "the base model's own answers to general prompts"
    share, why = auto_replay_share(task_examples, available)
    return ReplayPlan(file, source, share, "auto",
                      f"{why}; replay is {what}, so the fine-tune keeps rehearsing what the model could do")


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

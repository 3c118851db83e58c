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
AUTO_SHARE = 0.1  # one example in ten: the task keeps 90% of the steps (docs/training.md, Replay)


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


def decide_replay_share(train: TrainConfig, replay_file: Path | None) -> ReplayPlan:
    """train.replay_share, or the auto share and its reason."""
    source = "recipe" if train.replay else "self"
    file = str(replay_file) if replay_file else None
    if train.replay_share != "auto":
        return ReplayPlan(file if train.replay_share else None, source, float(train.replay_share), "recipe",
                          f"train.replay_share {float(train.replay_share):g}")
    what = "your general examples (train.replay)" if train.replay else "the base model's own answers to general prompts"
    return ReplayPlan(file, source, AUTO_SHARE, "auto",
                      f"auto: {AUTO_SHARE:.0%} of training examples are {what}, so the fine-tune keeps rehearsing "
                      f"what the model could do; the task keeps {1 - AUTO_SHARE:.0%}")


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

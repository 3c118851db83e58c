"""How often the recipe goes back to a module it already left, on its way from `tunelab run` to the
training loop (issue: "no module is entered, left and entered again more than twice").

    python bench/recipe_journey.py            # prints each module's stays, then the journey itself

Runs `run_pipeline` on 40 triage examples with the tiny-test model, stopped when the training loop
starts, under sys.setprofile. The recipe is followed: every call of a tunelab function that is passed
the recipe or one of its sections (a model of tunelab.config) is a step of its journey, in the
function's module; consecutive steps in one module are one stay. A module's returns are its stays
after the first. The recipe's own module (tunelab.config: validators and properties of the recipe
itself) is not a place it travels to and is left out. Writes nothing but the run folder, in a
temporary directory.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "triage"


class AtTheLoop(Exception):
    """Raised where the training loop would start: the journey ends there."""


def _carries_the_recipe(value: Any) -> bool:
    from pydantic import BaseModel

    return isinstance(value, BaseModel) and type(value).__module__ == "tunelab.config"


def journey(recipe: Any) -> list[str]:
    """The modules (dotted names) of the recipe's stays, in order, from run_pipeline to the training loop."""
    import tunelab
    import tunelab.train.loop as loop
    from tunelab.pipeline import run_pipeline

    package = str(Path(tunelab.__file__).resolve().parent) + os.sep
    stays: list[str] = []

    def follow(frame: FrameType, event: str, _arg: Any) -> None:
        if event != "call" or not frame.f_code.co_filename.startswith(package):
            return
        module = frame.f_globals.get("__name__", "")
        if module == "tunelab.config" or (stays and stays[-1] == module):
            return
        arguments = frame.f_code.co_varnames[: frame.f_code.co_argcount + frame.f_code.co_kwonlyargcount]
        if any(_carries_the_recipe(frame.f_locals.get(name)) for name in arguments):
            stays.append(module)

    def stop(*_args: Any, **_kwargs: Any) -> None:
        raise AtTheLoop

    real_loop, loop.train_loop = loop.train_loop, stop
    sys.setprofile(follow)
    try:
        run_pipeline(recipe)
    except AtTheLoop:
        pass
    finally:
        sys.setprofile(None)
        loop.train_loop = real_loop
    return stays


def tiny_recipe(out_dir: Path) -> Any:
    """40 triage examples, tiny-test, a fixed short plan (no budget: nothing measured)."""
    from tunelab.config import load_recipe

    lines = (EXAMPLES / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    (out_dir / "train.jsonl").write_text("\n".join(lines[:40]) + "\n", encoding="utf-8")
    (out_dir / "valid.jsonl").write_text("\n".join(lines[40:48]) + "\n", encoding="utf-8")
    return load_recipe(EXAMPLES / "recipe.yaml", [
        "model.name=tiny-test", "train.max_steps=2", "eval.forgetting=false", f"out_dir={out_dir / 'runs'}",
        f"data.train={out_dir / 'train.jsonl'}", f"data.valid={out_dir / 'valid.jsonl'}", "name=journey",
    ])


def returns_by_module(stays: list[str]) -> dict[str, int]:
    """Per module, how many times the recipe came back to it after leaving it."""
    return {module: count - 1 for module, count in Counter(stays).items()}


def main() -> None:
    os.environ.setdefault("TUNELAB_HOME", str(ROOT / ".tunelab-test-home"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        stays = journey(tiny_recipe(Path(tmp)))
    returns = returns_by_module(stays)
    print(f"{len(stays)} stays in {len(returns)} modules, {sum(returns.values())} returns to a module already left")
    for module, count in sorted(returns.items(), key=lambda item: -item[1]):
        print(f"  {count:3d} returns  {module}")
    print("journey: " + " -> ".join(module.removeprefix("tunelab.") for module in stays))


if __name__ == "__main__":
    main()

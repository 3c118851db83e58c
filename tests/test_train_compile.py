"""Compiled decoder layers on a CPU: when `train.compile: auto` compiles (a plan long enough, a
working C++ compiler), that a missing compiler means eager training (or a clear error when compile
was asked for), and that a compiled run trains the same model as an eager one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tunelab.train.setup as train_setup
from tunelab.config import load_recipe
from tunelab.errors import ConfigError
from tunelab.train.setup import (
    COMPILE_MIN_SECONDS_CPU,
    COMPILE_MIN_TOKENS_CPU,
    compile_after_plan,
    should_compile,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
RECIPE = Path(__file__).resolve().parents[1] / "examples" / "triage" / "recipe.yaml"
FAST = ["model.name=tiny-test", "eval.forgetting=false", "train.max_steps=3", "train.eval_every_steps=3",
        "train.eval_max_examples=8", "train.tokens_per_step=512", "lora.dropout=0", "train.seed=3"]


@pytest.fixture
def compiler(monkeypatch):
    """Pretend a C++ compiler does (True) or does not (False) work here."""
    def set_to(works: bool) -> None:
        monkeypatch.setattr(train_setup, "_COMPILER_WORKS", {"cpu": works})
    return set_to


def test_auto_compiles_a_cpu_run_only_when_its_plan_is_long_enough_and_a_compiler_works(compiler):
    compiler(True)
    assert compile_after_plan("auto", CPU, COMPILE_MIN_TOKENS_CPU)
    assert not compile_after_plan("auto", CPU, COMPILE_MIN_TOKENS_CPU - 1)
    # fewer tokens, but a slow machine trains them long enough to pay it back (a budget-bound plan)
    assert compile_after_plan("auto", CPU, COMPILE_MIN_TOKENS_CPU - 1, COMPILE_MIN_SECONDS_CPU)
    assert not compile_after_plan("auto", CPU, COMPILE_MIN_TOKENS_CPU - 1, COMPILE_MIN_SECONDS_CPU - 1)
    assert not compile_after_plan(True, CPU, 10**9) and not compile_after_plan(False, CPU, 10**9)  # decided at setup
    assert not compile_after_plan("auto", CUDA, 10**9)  # a GPU decides at setup (should_compile)
    assert not should_compile("auto", CPU, 10**9)  # a CPU waits for the plan
    compiler(False)
    assert not compile_after_plan("auto", CPU, 10**9)


def test_a_failing_toolchain_is_found_once_and_means_no_compiling(monkeypatch):
    calls = []

    def broken(*_args, **_kwargs):
        calls.append(1)
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(train_setup, "_COMPILER_WORKS", {})
    monkeypatch.setattr(torch, "compile", broken)
    assert train_setup.compiler_works() is False and train_setup.compiler_works() is False
    assert calls == [1]


def test_compile_true_without_a_compiler_is_one_clear_error(compiler, tmp_path):
    from tunelab.train.setup import setup_training

    compiler(False)
    recipe = load_recipe(RECIPE, [*FAST, "train.compile=true", f"out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"train.compile: true, .*C\+\+ compiler.*train.compile=false"):
        setup_training(recipe, 3, "cpu")


def _run(tmp_path: Path, name: str, *overrides: str) -> tuple[list[float], dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    from tunelab.train.run import train

    result = train(load_recipe(RECIPE, [*FAST, f"out_dir={tmp_path}", f"name={name}", *overrides]), progress=False)
    log = [json.loads(line) for line in (result.run_dir / "train" / "log.jsonl").read_text().splitlines()]
    plan = json.loads((result.run_dir / "train" / "plan.json").read_text())
    adapter = load_file(str(result.run_dir / "adapter" / "adapter_model.safetensors"))
    return [r["loss"] for r in log if r["kind"] == "train"], plan, adapter


@pytest.mark.skipif(not train_setup.compiler_works(), reason="torch.compile cannot build CPU kernels here")
def test_a_compiled_cpu_run_trains_the_same_model_as_an_eager_one(tmp_path, monkeypatch):
    eager_losses, eager_plan, eager_adapter = _run(tmp_path, "eager", "train.compile=false")
    monkeypatch.setattr(train_setup, "COMPILE_MIN_TOKENS_CPU", 1)  # this 3-step run "pays back" the compiling
    losses, plan, adapter = _run(tmp_path, "compiled")
    assert plan["compiled"] is True and "compiled layers" not in eager_plan["reason"]
    assert eager_plan["compiled"] is False
    assert losses == pytest.approx(eager_losses, rel=1e-4)
    # the adapter is saved under the model's own parameter names, with the same values
    assert adapter.keys() == eager_adapter.keys()
    for name, tensor in adapter.items():
        torch.testing.assert_close(tensor, eager_adapter[name], rtol=1e-3, atol=1e-5)

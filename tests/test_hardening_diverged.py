"""A run whose weights are not finite fails: a step with a finite loss and gradient can still overflow
the weights (train.lr=1e300), after which every step is skipped as non-finite; such a run stops with
exit code 1 and one line, and no weights, evaluation or verdict are written on it."""

from __future__ import annotations

import pytest
import torch

from test_train_loop import BASE, one_thread, train_run  # noqa: F401 (fixtures)
from tunelab.train.loop import NonFiniteTraining


def test_weights_overflowed_by_a_huge_lr_fail_the_run_and_are_never_saved(train_run, tmp_path):  # noqa: F811
    with pytest.raises(NonFiniteTraining) as failed:
        train_run(["name=diverged", "train.lr=1e300", "train.max_steps=3"])
    message = str(failed.value)
    assert message.startswith("the weights are not finite after step 2 (") and "holds inf or NaN" in message
    assert "Lower train.lr" in message and "\n" not in message
    assert failed.value.exit_code == 1
    assert not (tmp_path / "diverged" / "adapter").exists() and not (tmp_path / "diverged" / "train" / "summary.json").exists()


def test_tunelab_run_of_a_diverged_run_exits_1_and_writes_no_verdict(tmp_path):
    from test_pipeline import EXAMPLE, FAST, tunelab

    result = tunelab("run", str(EXAMPLE), *FAST, f"out_dir={tmp_path}", "train.lr=1e300", "train.max_steps=3")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "error: the weights are not finite after step" in result.stderr and "Traceback" not in result.stderr
    run = tmp_path / "triage"
    assert not (run / "eval").exists() and not (run / "report.html").exists() and not (run / "adapter").exists()


def test_the_final_check_catches_weights_spoiled_by_the_last_step(train_run, monkeypatch):  # noqa: F811
    from tunelab.train import loop

    real_step = loop.train_step

    def spoiling_last_step(setup, step, index, *args, **kwargs):
        result = real_step(setup, step, index, *args, **kwargs)
        if index == 2:  # the last of 3 steps: its loss and gradient were finite, the weights are not
            with torch.no_grad():
                setup.trainable_parameters()[0].fill_(float("nan"))
        return result

    monkeypatch.setattr(loop, "train_step", spoiling_last_step)
    with pytest.raises(NonFiniteTraining, match=r"^the weights are not finite after step 3 \("):
        train_run(["name=spoiled", "train.lr=1e-3", "train.max_steps=3"])


def test_finite_training_passes_the_check(train_run, tmp_path):  # noqa: F811
    result, paths = train_run(["name=fine", "train.lr=1e-3", "train.max_steps=2"])
    assert result.steps == 2 and (paths.adapter / "adapter_model.safetensors").is_file()

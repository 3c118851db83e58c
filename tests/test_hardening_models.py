"""Model files tunelab cannot read are one-line errors (a GGUF that is not one, or is cut short; a folder
holding only config.json), and a `rebase` onto such a model leaves no run folder behind, so the retry
gives the same message instead of "already exists"."""

from __future__ import annotations

import json

import pytest

from tunelab.errors import ModelError


@pytest.fixture
def bad_models(tmp_path):
    (tmp_path / "random.gguf").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "short.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    return tmp_path


@pytest.mark.parametrize("name", ["random.gguf", "short.gguf", "config-only"])
def test_unreadable_model_files_are_one_line_model_errors(bad_models, name):
    from tunelab.models import load_model, load_tokenizer

    for load in (load_tokenizer, load_model):
        with pytest.raises(ModelError) as failed:
            load(str(bad_models / name))
        message = str(failed.value)
        assert message.startswith(f"model '{bad_models / name}': cannot load") and "\n" not in message


@pytest.mark.parametrize("model", ["no-such-model", "config-only", "random.gguf"])
def test_a_failed_rebase_leaves_no_run_folder_and_the_retry_says_the_same(tmp_path, bad_models, model):
    from test_report import make_run
    from tunelab.lifecycle.rebase import rebase

    runs = tmp_path / "runs"
    parent = make_run(runs, name="parent")
    target = model if model == "no-such-model" else str(bad_models / model)
    messages = []
    for _ in range(2):
        with pytest.raises(ModelError) as failed:
            rebase(parent, target, name="moved")
        messages.append(str(failed.value))
        assert not (runs / "moved").exists()
    assert messages[0] == messages[1] and "already exists" not in messages[1]


def test_a_failed_tunelab_run_leaves_no_run_folder_and_the_retry_says_the_same(tmp_path):
    from test_pipeline import EXAMPLE, FAST, tunelab

    errors = []
    for _ in range(2):
        result = tunelab("run", str(EXAMPLE), *FAST, f"out_dir={tmp_path}", "model.name=no-such-model")
        assert result.returncode == 2 and "Traceback" not in result.stderr
        errors.append(result.stderr.strip().splitlines()[-1])
        assert not (tmp_path / "triage").exists()
    assert errors[0] == errors[1] and errors[0].startswith("error: model 'no-such-model': not an alias")

"""Secrets go only where the user's own recipe sends them: a run folder's recipe.yaml naming a judge with
an API key (api_key_env, or OPENAI_API_KEY for api.openai.com) is refused by `tunelab eval RUN` (and by
drift, update and rebase) before anything is sent, unless the user passes --trust-remote-code, exactly
like a run folder's python grader."""

from __future__ import annotations

import json

import pytest
import yaml

from stand_in import serving
from test_eval_run import build_fake_run
from test_graders_judge import FakeJudge
from tunelab.errors import ConfigError

SECRET = "ghp_private-token-of-the-user"
JUDGE_INPUT = [{"role": "user", "content": "rate {{ sample.output_text }}"}]


@pytest.fixture(scope="module")
def judge():
    with serving(FakeJudge()) as server:
        yield server


@pytest.fixture
def fake_run(tmp_path, tiny_model_dir):
    from tunelab.models import load_model

    return build_fake_run(tmp_path / "runs" / "foreign", load_model("tiny-test", device="cpu"))


def set_eval(run, **keys) -> None:
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["eval"].update({"arms": ["base"], "limit": 2, "forgetting": False, "graders": [], "pairwise": None, **keys})
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))


def endpoints(base_url: str) -> list[tuple[str, dict]]:
    """(who, eval keys) for each way a recipe makes tunelab call a model endpoint with a key."""
    score = {"type": "score_model", "name": "j", "model": "m", "base_url": base_url, "api_key_env": "MY_PRIVATE_TOKEN",
             "input": JUDGE_INPUT}
    return [
        ("grader 'j'", {"graders": [score]}),
        ("grader 'l'", {"graders": [{"type": "label_model", "name": "l", "model": "m", "base_url": base_url,
                                     "api_key_env": "MY_PRIVATE_TOKEN", "labels": ["a", "b"], "passing_labels": ["a"],
                                     "input": JUDGE_INPUT}]}),
        ("grader 'cos'", {"graders": [{"type": "text_similarity", "name": "cos", "evaluation_metric": "cosine",
                                       "embedding_model": "e", "base_url": base_url, "api_key_env": "MY_PRIVATE_TOKEN",
                                       "input": "{{ sample.output_text }}", "reference": "{{ item.reference }}"}]}),
        ("grader 'part'", {"graders": [{"type": "multi", "name": "m", "calculate_output": "part",
                                        "graders": {"part": {k: v for k, v in score.items() if k != "name"}}}]}),
        ("eval.pairwise", {"pairwise": {"model": "m", "base_url": base_url, "api_key_env": "MY_PRIVATE_TOKEN",
                                        "input": [{"role": "user", "content": "A {{ sample_a.output_text }} B "
                                                                              "{{ sample_b.output_text }}"}]}}),
    ]


@pytest.mark.parametrize("case", range(5))
def test_eval_of_a_run_folder_refuses_a_judge_that_would_be_sent_a_key(fake_run, judge, monkeypatch, case):
    from tunelab.eval.run import evaluate

    monkeypatch.setenv("MY_PRIVATE_TOKEN", SECRET)
    who, keys = endpoints(judge.base_url)[case]
    set_eval(fake_run, **keys)
    before = len(judge.requests)
    with pytest.raises(ConfigError) as refused:
        evaluate(fake_run, echo=False)
    assert str(refused.value) == (
        f"{fake_run / 'recipe.yaml'}: {who} would send the API key in $MY_PRIVATE_TOKEN to {judge.base_url}, as the "
        "run folder's recipe says; tunelab does not send your secrets where a run folder says unasked: add "
        "--trust-remote-code if you trust this run")
    assert len(judge.requests) == before and not (fake_run / "eval" / "metrics.json").exists()


def test_api_openai_com_without_api_key_env_sends_OPENAI_API_KEY_so_it_needs_consent_too(fake_run, monkeypatch):
    from tunelab.eval.run import evaluate

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    set_eval(fake_run, graders=[{"type": "score_model", "name": "j", "model": "m", "input": JUDGE_INPUT}])
    with pytest.raises(ConfigError, match=r"grader 'j' would send the API key in \$OPENAI_API_KEY to https://api.openai.com/v1"):
        evaluate(fake_run, echo=False)


def test_a_judge_without_a_key_needs_no_consent_and_consent_sends_the_key(fake_run, judge, monkeypatch):
    from typer.testing import CliRunner

    from tunelab.cli import app

    monkeypatch.setenv("MY_PRIVATE_TOKEN", SECRET)
    set_eval(fake_run, graders=[{"type": "score_model", "name": "j", "model": "m", "base_url": judge.base_url,
                                 "input": JUDGE_INPUT}])
    result = CliRunner().invoke(app, ["eval", str(fake_run)])
    assert result.exit_code == 0, result.output
    keyless = len(judge.headers_seen)
    assert keyless > 0 and set(judge.headers_seen) == {None}

    set_eval(fake_run, **endpoints(judge.base_url)[0][1])
    result = CliRunner().invoke(app, ["eval", str(fake_run)])
    assert isinstance(result.exception, ConfigError) and result.exception.exit_code == 2  # main() prints it, exits 2
    assert "would send the API key in $MY_PRIVATE_TOKEN" in str(result.exception) and "\n" not in str(result.exception)
    assert len(judge.headers_seen) == keyless
    result = CliRunner().invoke(app, ["eval", str(fake_run), "--trust-remote-code"])
    assert result.exit_code == 0, result.output
    assert judge.headers_seen[keyless:] and set(judge.headers_seen[keyless:]) == {f"Bearer {SECRET}"}
    assert "j" in json.loads((fake_run / "eval" / "metrics.json").read_text())["arms"]["base"]["metrics"]


def test_drift_update_and_rebase_refuse_it_before_anything_is_written(fake_run, judge, monkeypatch):
    from tunelab.config import load_recipe
    from tunelab.lifecycle.lineage import refuse_untrusted_graders
    from tunelab.runs import RunPaths

    monkeypatch.setenv("MY_PRIVATE_TOKEN", SECRET)
    for who, keys in endpoints(judge.base_url):
        set_eval(fake_run, **keys)
        recipe = load_recipe(fake_run / "recipe.yaml")
        with pytest.raises(ConfigError, match=rf"{who} would send the API key in \$MY_PRIVATE_TOKEN"):
            refuse_untrusted_graders(RunPaths(fake_run), recipe, trust_remote_code=False)
        refuse_untrusted_graders(RunPaths(fake_run), recipe, trust_remote_code=True)


EXTERNAL = {"name": "hosted", "base_url": "http://judge.example/v1", "model": "m", "api_key_env": "MY_PRIVATE_TOKEN",
            "price_per_m_input_tokens": 1.0, "price_per_m_output_tokens": 2.0}


def test_drift_update_and_rebase_refuse_a_run_folders_external_arm_with_a_key(fake_run, monkeypatch):
    from tunelab.config import load_recipe
    from tunelab.lifecycle.lineage import refuse_untrusted_graders
    from tunelab.runs import RunPaths

    monkeypatch.setenv("MY_PRIVATE_TOKEN", SECRET)
    set_eval(fake_run, external=[EXTERNAL])
    recipe = load_recipe(fake_run / "recipe.yaml")
    with pytest.raises(ConfigError, match=r"eval.external 'hosted' would send the API key in \$MY_PRIVATE_TOKEN"):
        refuse_untrusted_graders(RunPaths(fake_run), recipe, trust_remote_code=False)
    refuse_untrusted_graders(RunPaths(fake_run), recipe, trust_remote_code=True)

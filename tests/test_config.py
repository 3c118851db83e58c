from pathlib import Path

import pytest

from tunelab.config import DEFAULT_LR, Recipe, load_recipe, parse_override
from tunelab.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_defaults_file_and_overrides_in_that_order(tmp_path):
    path = write(tmp_path, "name: x\ntrain: {epochs: 3, lr: 1.0e-4}\n")
    recipe = load_recipe(path, ["train.lr=5e-5", "model.name=tiny-test"])
    assert recipe.name == "x"
    assert recipe.train.epochs == 3  # file beats default
    assert recipe.train.lr == 5e-5  # command line beats file
    assert recipe.model.name == "tiny-test"
    assert recipe.train.tokens_per_step == Recipe().train.tokens_per_step  # default kept


def test_learning_rate_default_depends_on_method():
    assert load_recipe(None, []).train.lr == DEFAULT_LR["lora"]
    assert load_recipe(None, ["method=full"]).train.lr == DEFAULT_LR["full"] < DEFAULT_LR["lora"]


def test_misspelled_section_names_key_file_line_and_likely_key(tmp_path):
    path = write(tmp_path, "name: x\ntrian:\n  epochs: 1\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert str(err.value) == f"{path}:2: unknown key 'trian' (did you mean 'train'?)"


def test_nested_unknown_key_and_wrong_type_are_all_reported(tmp_path):
    path = write(tmp_path, "train:\n  lrr: 0.1\n  epochs: lots\nlora: {rank: -1}\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    lines = str(err.value).splitlines()
    assert len(lines) == 3
    assert f"{path}:2: unknown key 'train.lrr' (did you mean 'train.lr'?)" in lines
    assert any(line.startswith(f"{path}:3: train.epochs:") and "'lots'" in line for line in lines)
    assert any("lora.rank" in line and "greater than or equal to 1" in line for line in lines)


def test_overrides_parse_yaml_values_and_reject_garbage():
    assert parse_override("train.lr=1e-4") == (["train", "lr"], 1e-4)
    assert parse_override("train.max_steps=null") == (["train", "max_steps"], None)
    assert parse_override("eval.arms=[base,tuned]") == (["eval", "arms"], ["base", "tuned"])
    assert parse_override("name=1e5x") == (["name"], "1e5x")
    for bad in ("train.lr", "=3", "train..lr=1"):
        with pytest.raises(ConfigError, match="expected key=value"):
            parse_override(bad)


def test_unknown_arm_is_refused():
    with pytest.raises(ConfigError, match="unknown arm"):
        load_recipe(None, ["eval.arms=[base,magic]"])


def test_invalid_yaml_and_non_mapping_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe.yaml:2: invalid YAML"):
        load_recipe(write(tmp_path, "name: x\n  bad: [\n"))
    with pytest.raises(ConfigError, match="a recipe is a YAML mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(None, ["method=full", "train.max_steps=7"])
    path = write(tmp_path, recipe.to_yaml())
    assert load_recipe(path) == recipe


def test_data_paths_are_relative_to_the_recipe(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_text("")
    recipe = load_recipe(write(tmp_path, "data: {train: d/train.jsonl}\n"))
    assert Path(recipe.data.train) == tmp_path / "d" / "train.jsonl"


def test_compile_is_auto_by_default_and_accepts_booleans():
    import torch

    from tunelab.train.setup import COMPILE_MIN_TOKENS, should_compile

    assert load_recipe(None, []).train.compile == "auto"
    assert load_recipe(None, ["train.compile=true"]).train.compile is True
    assert load_recipe(None, ["train.compile=false"]).train.compile is False
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert should_compile("auto", cuda, COMPILE_MIN_TOKENS) and not should_compile("auto", cuda, COMPILE_MIN_TOKENS - 1)
    assert not should_compile("auto", cpu, 10**12)
    assert should_compile(True, cpu, 1) and not should_compile(False, cuda, 10**12)

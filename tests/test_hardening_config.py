"""Recipes are read within stated bounds: nested YAML aliases, self-referring aliases, deep nesting
and oversized files are one-line ConfigErrors, never a walk through millions of paths."""

import pytest

from tunelab.config import MAX_CONFIG_BYTES, MAX_CONFIG_NODES, load_recipe, load_yaml_text
from tunelab.errors import ConfigError


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """~1 KB of YAML that expands to width**levels values: each level a mapping of aliases to the last."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for level in range(1, levels):
        refs = ", ".join(f"k{i}: *a{level - 1}" for i in range(width))
        lines.append(f"a{level}: &a{level} {{{refs}}}")
    lines.append(f"lora: {{targets: *a{levels - 1}}}")
    return "\n".join(lines) + "\n"


def test_a_small_recipe_of_nested_aliases_is_refused_by_the_node_limit(tmp_path):
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(alias_bomb())
    assert recipe.stat().st_size < 1500
    with pytest.raises(ConfigError, match=f"at most {MAX_CONFIG_NODES:,} values") as err:
        load_recipe(recipe)
    assert str(err.value).startswith(f"{recipe}: expands to ") and "\n" not in str(err.value)


def test_aliases_within_the_limit_still_load(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: &n demo\nlora: {targets: [q_proj, v_proj]}\neval: {instructions: *n}\n")
    assert load_recipe(recipe).eval.instructions == "demo"


@pytest.mark.parametrize("text, message", [
    ("a: &a [*a]\n", "alias refers to itself"),
    ("[" * 5000 + "]" * 5000, "nested too deeply"),
    ("s: &s " + "x" * 60_000 + "\nl: [" + ", ".join(["*s"] * 100) + "]\n", "characters through YAML aliases"),
])
def test_self_reference_deep_nesting_and_long_expanded_strings_are_refused(text, message):
    with pytest.raises(ConfigError, match=message):
        load_yaml_text(text, "r.yaml")


def test_an_oversized_recipe_file_is_refused_before_it_is_parsed(tmp_path):
    recipe = tmp_path / "big.yaml"
    recipe.write_text("name: x\n# " + "y" * MAX_CONFIG_BYTES + "\n")
    with pytest.raises(ConfigError, match="a config file is at most"):
        load_recipe(recipe)


def test_an_alias_bomb_in_a_command_line_override_is_refused():
    levels = ["&a0 [x, x, x, x, x, x, x, x, x]"] + [f"&a{n} [{', '.join([f'*a{n - 1}'] * 9)}]" for n in range(1, 9)]
    with pytest.raises(ConfigError, match=f"^override 'lora.targets=.*at most {MAX_CONFIG_NODES:,} values"):
        load_recipe(None, [f"lora.targets=[{', '.join(levels)}]"])


def float_fields():
    """Every float field of every recipe section, found from the models themselves."""
    import typing

    from tunelab.config import Recipe

    for section, info in Recipe.model_fields.items():
        model = info.annotation
        if not (isinstance(model, type) and hasattr(model, "model_fields")):
            continue
        for name, field in model.model_fields.items():
            if typing.get_origin(field.annotation) is list:  # lists of floats: test_no_float_in_a_list_...
                continue
            members = typing.get_args(field.annotation) or (field.annotation,)
            # PositiveFloat | "auto" is a union whose float member is Annotated[float, ...]
            if any(m is float or (typing.get_origin(m) is typing.Annotated and typing.get_args(m)[0] is float)
                   for m in members):
                yield f"{section}.{name}"


@pytest.mark.parametrize("key", list(float_fields()))
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_no_float_in_a_recipe_may_be_infinite_or_nan(key, value):
    with pytest.raises(ConfigError, match=f"{key}: Input should be a finite number"):
        load_recipe(None, [f"{key}={value}"])


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_no_float_in_a_list_may_be_infinite_or_nan(value):
    with pytest.raises(ConfigError, match="eval.adapter_scales.0: Input should be a finite number"):
        load_recipe(None, [f"eval.adapter_scales=[{value}, 0.5]"])


def test_float_fields_are_found():
    assert {"train.epochs", "train.lr", "lora.alpha", "eval.gpu_price_per_hour"} <= set(float_fields())


@pytest.mark.parametrize("key", ["train.seed", "data.seed", "train.max_steps", "eval.shots"])
def test_integers_beyond_64_bits_are_refused(key):
    with pytest.raises(ConfigError, match=f"{key}: Value error, must lie between"):
        load_recipe(None, [f"{key}={2**70}"])


@pytest.mark.parametrize("name", ["../x", "/tmp/x", "..", ".", "a/b", "a\\b"])
def test_a_run_name_must_keep_the_run_inside_out_dir(name, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: '{name}'\n")
    with pytest.raises(ConfigError, match=f"^{recipe}:1: name: .*must be one folder name"):
        load_recipe(recipe)


def test_max_new_tokens_must_leave_the_prompt_room_in_the_context():
    from tunelab.use.chat import LoadedModel, decoding_for

    loaded = LoadedModel(model=None, tokenizer=None, name="m", max_context_tokens=256)
    assert decoding_for(loaded, 255, 0.0).max_new_tokens == 255
    for bad in (0, -5, 256, 10**20):
        with pytest.raises(ConfigError, match=f"--max-new-tokens {bad}: must be from 1 to 255"):
            decoding_for(loaded, bad, 0.0)


@pytest.mark.parametrize("args", [["chat", "tiny-test", "--prompt", "hi", "--max-new-tokens", "-5"],
                                  ["chat", "tiny-test", "--prompt", "hi", "--temperature", "1e-45"],
                                  ["chat", "tiny-test", "--prompt", "hi", "--temperature", "nan"]])
def test_cli_decoding_options_are_checked_before_the_model_loads(args):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "Invalid value" in result.stderr

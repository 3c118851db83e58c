import subprocess
import sys


def tunelab(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True, text=True, cwd=cwd)


def test_misspelled_recipe_key_is_one_line_exit_2_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: demo\ntrian:\n  epochs: 1\n")
    result = tunelab("train", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {bad}:2: unknown key 'trian' (did you mean 'train'?)"
    assert "Traceback" not in result.stderr + result.stdout


def test_help_does_not_import_torch():
    heavy = ("torch", "transformers", "peft", "fastapi", "numpy", "matplotlib")  # kept inside the commands
    code = f"import sys; from tunelab.cli import app; print([m for m in {heavy!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_config_show_writes_every_default(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\n")
    result = tunelab("config", "show", str(recipe), "method=full")
    assert result.returncode == 0, result.stderr
    assert "lr: 1.0e-05" in result.stdout and "tokens_per_step: auto" in result.stdout
    assert "budget: auto" in result.stdout


def test_every_command_argument_and_option_has_help_text():
    import click
    import typer

    from tunelab.cli import app

    def walk(command: click.Command, path: str):
        yield path, command
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                yield from walk(sub, f"{path} {name}")

    missing = []
    for path, command in walk(typer.main.get_command(app), "tunelab"):
        if not (command.help or command.short_help):
            missing.append(path)
        for param in command.params:
            if param.name != "help" and not getattr(param, "help", None):
                missing.append(f"{path} {param.name}")
    assert not missing, f"no help text: {missing}"


def test_run_takes_nproc_and_trains_with_the_command_train_nproc_runs(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tunelab.cli import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: x\nout_dir: {tmp_path}\n")
    seen: dict = {}
    monkeypatch.setattr("tunelab.cli.run_pipeline", lambda loaded, **kwargs: seen.update(kwargs))
    result = CliRunner().invoke(app, ["run", str(recipe), "train.seed=3", "--nproc", "2"])
    assert result.exit_code == 0, result.output
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "tunelab", "train", str(recipe), "train.seed=3"]
    assert seen == {"resume": False, "train_command": torchrun,
                    "resume_command": f"tunelab run {recipe} train.seed=3 --resume --nproc=2"}
    CliRunner().invoke(app, ["run", str(recipe), "--resume", "--nproc=2"])
    assert seen["train_command"][-2:] == [str(recipe), "--resume"] and seen["resume"] is True
    CliRunner().invoke(app, ["run", str(recipe)])  # without it: training in this process, as before
    assert seen["train_command"] is None and seen["resume_command"] == f"tunelab run {recipe} --resume"
    assert CliRunner().invoke(app, ["run", str(recipe), "--nproc", "0"]).exit_code == 2

    # `tunelab train --nproc 2` launches the very same command
    launched: list = []
    monkeypatch.setattr(subprocess, "run", lambda command, check: launched.append(command) or
                        subprocess.CompletedProcess(command, 0))
    assert CliRunner().invoke(app, ["train", str(recipe), "train.seed=3", "--nproc", "2"]).exit_code == 0
    assert launched == [torchrun]

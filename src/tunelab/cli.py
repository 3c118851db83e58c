"""The `tunelab` command: parses arguments, calls library functions, prints. Heavy imports (torch,
transformers) happen inside commands so that `--help` and data format errors answer at once."""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

# modules `tunelab --help` loads anyway: the others (torch, transformers, peft, fastapi, numpy and the
# modules that import them, and data formats and models, which cost it time) stay inside their commands
from tunelab.config import ARMS, ModelConfig, Recipe, load_recipe  # ARMS feeds `eval --help`
from tunelab.curve import DEFAULT_FRACTIONS, build_curve, curve_dir, format_table, parse_fractions
from tunelab.errors import ConfigError, TunelabError
from tunelab.lifecycle.update import UpdateSettings  # its defaults feed `update --help`
from tunelab.pipeline import run_pipeline
from tunelab.runs import DriftPaths, RunPaths
from tunelab.specs.graders import read_graders_file
from tunelab.use.serve import MIN_TEMPERATURE, ServeSettings  # ServeSettings' defaults feed `serve --help`

app = typer.Typer(
    help="Fine-tune a language model on your own examples, then prove with numbers whether it was worth it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Check and prepare training data.", no_args_is_help=True)
models_app = typer.Typer(help="Model aliases and the local model cache.", no_args_is_help=True)
runs_app = typer.Typer(help="List and compare runs.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect recipes.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
app.add_typer(runs_app, name="runs")
app.add_typer(config_app, name="config")

Overrides = Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. train.max_steps=20")]
RunDir = Annotated[Path, typer.Argument(help="a run directory, e.g. runs/demo")]
TrustOpt = Annotated[bool, typer.Option(
    "--trust-remote-code", help="run Python code shipped with the model (its auto_map); a run folder's "
    "recipe.yaml never turns this on")]
TrustRunCodeOpt = Annotated[bool, typer.Option(
    "--trust-remote-code", help="run Python code shipped with the model (its auto_map) and the run's python "
    "graders, and send the API keys its judges name (api_key_env); a run folder's recipe.yaml never turns this on")]


def _finite(value: float | None) -> float | None:
    """Option callback: inf and nan parse as floats but mean nothing as a setting."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter("must be a finite number")
    return value


def _temperature(value: float) -> float:
    if not (value == 0 or MIN_TEMPERATURE <= value <= 2):
        raise typer.BadParameter(f"0 (greedy) or from {MIN_TEMPERATURE:g} to 2")
    return value


# ---------------------------------------------------------------------------------------------- config


@config_app.command("show")
def config_show(
    recipe: Annotated[Path, typer.Argument(help="a recipe YAML file")], overrides: Overrides = None
) -> None:
    """Print the resolved recipe with every default written out (and what each `auto` means)."""
    typer.echo(load_recipe(recipe, overrides or []).to_yaml(explain_auto=True), nl=False)


# ---------------------------------------------------------------------------------------------- models


@models_app.command("list")
def models_list() -> None:
    """Aliases, where each lives and whether it is cached."""
    from tunelab.models import list_models

    for row in list_models():
        typer.echo(f"{row['name']:<24} {row['status']:<11} {row['path']}\n{'':<24} {row['description']}")


@models_app.command("pull")
def models_pull(name: Annotated[str, typer.Argument(help="a model alias (see `tunelab models list`)")]) -> None:
    """Prepare a model alias in the cache (verifying it; rebuilding a corrupt entry)."""
    from tunelab.models import ALIASES, ensure_alias

    if name not in ALIASES:
        raise TunelabError(f"'{name}' is not an alias; choose from {', '.join(ALIASES)}")
    typer.echo(str(ensure_alias(name, full_check=True)))


# ---------------------------------------------------------------------------------------------- data


@data_app.command("check")
def data_check(
    train: Annotated[Path, typer.Argument(help="training examples: JSONL, JSON, CSV, Parquet or a folder of them")],
    valid: Annotated[Path | None, typer.Option(help="validation file, checked for leakage too")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="tokenizer, chat template and speed of this model (default: the recipe default, smollm2-135m-instruct)")] = None,
    max_seq_len: Annotated[int, typer.Option(help="tokens; longer examples are reported")] = 512,
    fmt: Annotated[str, typer.Option("--format", help="auto | openai | alpaca | sharegpt | prompt_completion")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable lines")] = False,
    tokens: Annotated[bool, typer.Option(help="tokenize with the model's chat template and estimate training time")] = True,
    epochs: Annotated[float | None, typer.Option(min=0.0, callback=_finite, help="for the training time estimate (default: the passes the training planner would choose for this data)")] = None,
    gpu_price: Annotated[float | None, typer.Option(min=0.0, callback=_finite, help="USD per hour for the cost estimate (default: the recipe default eval.gpu_price_per_hour)")] = None,
    system_prompt: Annotated[str | None, typer.Option(help="added to examples without a system message")] = None,
    near_dup_max: Annotated[int, typer.Option(help="near-duplicate checks cover this many examples per file; -1: all")] = 100_000,
) -> None:
    """Every problem in the data, with file:line, before any training. Exit 1 when any error."""
    from tunelab.data.check import check_data
    from tunelab.data.formats import FORMATS

    if fmt != "auto" and fmt not in FORMATS:
        raise TunelabError(f"--format {fmt}: choose from auto, {', '.join(FORMATS)}")
    estimate = {"epochs": epochs, "gpu_price_per_hour": gpu_price}

    def show(issue) -> None:
        line = json.dumps({"kind": "issue", **issue.to_dict()}, ensure_ascii=False) if as_json else issue.format()
        typer.echo(line)

    report = check_data(
        train, valid, fmt=fmt, model=(model or ModelConfig().name) if tokens else None, max_seq_len=max_seq_len,
        system_prompt=system_prompt, near_dup_max_examples=None if near_dup_max < 0 else near_dup_max, on_issue=show,
        **{key: value for key, value in estimate.items() if value is not None},
    )
    if as_json:
        typer.echo(report.json_lines()[-1])
    else:
        typer.echo("\n".join(report.summary_lines()))
    raise typer.Exit(report.exit_code)


@data_app.command("prepare")
def data_prepare(
    train: Annotated[Path, typer.Argument(help="training examples: JSONL, JSON, CSV, Parquet or a folder of them")],
    out: Annotated[Path, typer.Option(help="output folder")],
    valid: Annotated[Path | None, typer.Option(help="validation file; else a seeded split")] = None,
    test: Annotated[Path | None, typer.Option(help="test file; else a seeded split")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="tokenizer and chat template of this model (default: the recipe default, smollm2-135m-instruct)")] = None,
    max_seq_len: Annotated[int, typer.Option(help="tokens; longer examples are dropped and listed in rejected.jsonl")] = 512,
    fmt: Annotated[str, typer.Option("--format", help="auto | openai | alpaca | sharegpt | prompt_completion")] = "auto",
    seed: Annotated[int, typer.Option(help="seed of the train/valid/test split")] = 0,
    dedupe: Annotated[bool, typer.Option(help="drop exact duplicates within a split")] = True,
    system_prompt: Annotated[str | None, typer.Option(help="added to examples without a system message")] = None,
) -> None:
    """Normalise, dedupe, split, tokenize; write stats and the rejected examples. Exit 1 on data errors."""
    from pydantic import ValidationError

    settings = {"train": str(train), "valid": str(valid) if valid else None, "test": str(test) if test else None,
                "max_seq_len": max_seq_len, "format": fmt, "seed": seed, "dedupe": dedupe, "system_prompt": system_prompt}
    try:
        recipe = Recipe.model_validate({"model": {"name": model} if model else {}, "data": settings})
    except ValidationError as err:
        raise ConfigError("; ".join(f"--{'-'.join(map(str, e['loc'][1:])).replace('_', '-')}: {e['msg']}" for e in err.errors())) from None
    from tunelab.data.prepare import prepare_data
    from tunelab.models import load_tokenizer

    prepared = prepare_data(recipe, load_tokenizer(recipe.model.name), out)
    stats = prepared.stats
    counts, tokens = stats["counts"], stats["tokens"]
    if prepared.reused:
        typer.echo(f"{out}: up to date (inputs, tokenizer, chat template and settings unchanged); nothing recomputed")
    rejected = ", ".join(f"{reason} {n}" for reason, n in stats["rejected_by_reason"].items()) or "none"
    typer.echo(
        f"{out}: train {counts['train']}, valid {counts['valid']}, test {counts['test']} "
        f"(accepted {counts['accepted']}, rejected {counts['rejected']}: {rejected}; see rejected.jsonl)\n"
        f"tokens: per example min {tokens['min']}, median {tokens['median']:g}, p95 {tokens['p95']:g}, max {tokens['max']}; "
        f"total {tokens['total']:,}, trainable {tokens['trainable_total']:,}\n"
        f"issues: {stats['issues']['errors']} errors, {stats['issues']['warnings']} warnings (issues.jsonl)"
    )


@data_app.command("audit")
def data_audit(
    run_dir: RunDir,
    top: Annotated[int, typer.Option(min=0, help="print this many of the most suspect examples")] = 20,
    answers: Annotated[int, typer.Option(min=0, help="the tuned model answers this many of the top examples")] = 40,
    write_clean: Annotated[Path | None, typer.Option(help="write a copy of the training file without the --drop-top most suspect examples")] = None,
    drop_top: Annotated[int, typer.Option(min=0, help="with --write-clean: how many of the most suspect to leave out")] = 0,
    drop_flagged: Annotated[bool, typer.Option(help="with --write-clean: leave out the examples the audit flags")] = False,
    folds: Annotated[int, typer.Option(min=0, help="score each example by a model trained without it: K more trainings")] = 0,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Rank a trained run's examples, most likely wrong first (RUN/audit/audit.jsonl), from its training dynamics
    and the tuned model's answers; print the top as `file:line: suspicion: answer -> model answer`."""
    from tunelab.eval.audit import audit_run, format_row
    from tunelab.eval.audit import write_clean as write_clean_copy

    if (drop_top or drop_flagged) and write_clean is None:
        raise TunelabError(f"{'--drop-top N' if drop_top else '--drop-flagged'} needs --write-clean OUT.jsonl (the copy to write)")
    if drop_top and drop_flagged:
        raise TunelabError("--drop-top N and --drop-flagged: choose one (the flagged, or the N most suspect)")
    if folds:
        from tunelab.eval.folds import audit_with_folds

        rows, summary, trained = audit_with_folds(run_dir, folds, trust_remote_code=trust_remote_code)
        typer.echo(f"out of fold: {folds} trainings on {min(trained.trained_on)}-{max(trained.trained_on)} rows "
                   f"({sum(trained.train_time_s) / 60:.1f} min); {RunPaths(run_dir).audit / 'folds'}")
    else:
        rows, summary = audit_run(run_dir, answers=answers, trust_remote_code=trust_remote_code)
    for row in rows[:top]:
        typer.echo(format_row(row))
    typer.echo(f"{summary.how_to_read}\n{len(rows)} examples ranked: {RunPaths(run_dir).audit / 'audit.jsonl'}")
    if write_clean is not None:
        source, dropped = write_clean_copy(rows, drop_top, write_clean, drop_flagged=drop_flagged, run_dir=run_dir)
        typer.echo(f"{write_clean}: {source} without {len(dropped)} line(s): {', '.join(map(str, dropped)) or 'none'}"
                   + ("" if not dropped else f" ({sum(r.flagged for r in rows if r.line in dropped)} of them flagged)"
                      if summary.claims_errors else " (the hardest examples: the audit claims none of them wrong)")
                   + f"\n`tunelab run` with data.train={write_clean} compares itself with {run_dir} (paired, same test set)")


# ---------------------------------------------------------------------------------------------- stages


NprocOpt = Annotated[
    int | None, typer.Option(min=1, help="processes on this machine (one per GPU): re-launches under torchrun")
]


def _torchrun_train(recipe: Path, overrides: list[str] | None, nproc: int, resume: bool) -> list[str]:
    """`tunelab train` under torchrun, `nproc` processes on this machine (--standalone: a rendezvous on a free
    local port, so several jobs can share the machine)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "tunelab", "train", str(recipe), *(overrides or []), *(["--resume"] if resume else [])]


@app.command()
def train(
    recipe: Annotated[Path, typer.Argument(help="a recipe YAML file (docs/recipe.md)")],
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option(help="continue from the newest complete checkpoint")] = False,
    nproc: NprocOpt = None,
) -> None:
    """Fine-tune (LoRA by default) -> run directory. SIGTERM/Ctrl-C checkpoint and exit 75."""
    loaded = load_recipe(recipe, overrides or [])  # a bad recipe fails here, before any process starts
    if nproc is not None and "RANK" not in os.environ:
        code = subprocess.run(_torchrun_train(recipe, overrides, nproc, resume), check=False).returncode
        if code != 0:
            again = shlex.join(["tunelab", "train", str(recipe), *(overrides or []), "--resume", f"--nproc={nproc}"])
            typer.echo(f"error: training under torchrun stopped (exit code {code}); torchrun's report above names the "
                       f"rank that failed first (Root Cause). Resume with: {again}", err=True)
        raise typer.Exit(code)

    from tunelab.train.loop import TrainingInterrupted
    from tunelab.train.run import train as run_training

    again = shlex.join(["tunelab", "train", str(recipe), *(overrides or []), "--resume",
                        *([f"--nproc={nproc}"] if nproc else [])])
    try:
        result = run_training(loaded, resume=resume, resume_command=again)
    except TrainingInterrupted as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(err.exit_code) from None
    if os.environ.get("RANK", "0") != "0":  # under torchrun the result is printed once
        return
    best = f", best step {result.best_step} (val loss {result.best_val_loss:.4f})" if result.best_step else ""
    typer.echo(f"{result.output_dir}  ({result.steps} steps{best}; {result.tokens:,} tokens in {result.train_time_s:.0f} s)")


@app.command("eval")
def eval_(
    run: RunDir,
    arms: Annotated[str | None, typer.Option(help=f"comma-separated: {','.join(ARMS)}")] = None,
    test: Annotated[Path | None, typer.Option(help="test file instead of the run's test split")] = None,
    limit: Annotated[int | None, typer.Option(help="only the first N test examples")] = None,
    trust_remote_code: TrustRunCodeOpt = False,
    external: Annotated[Path | None, typer.Option(
        help="YAML list of external arms (hosted endpoint, local model, recorded outputs) added to the run's "
             "evaluation; the other arms' results are reused, not regenerated")] = None,
) -> None:
    """Fine-tuned vs prompt engineering vs RAG on the held-out set."""
    from tunelab.eval.run import add_external_arms, evaluate

    if external is not None:
        from tunelab.eval.external import read_external_file

        if arms or test or limit:
            raise ConfigError("--external adds arms to the run's evaluation as it is: leave out --arms, --test "
                              "and --limit (or run `tunelab eval` with them first)")
        add_external_arms(run, read_external_file(external), trust_remote_code=trust_remote_code,
                          python_graders=trust_remote_code)
    else:
        evaluate(run, arms=arms, test_file=test, limit=limit, trust_remote_code=trust_remote_code,
                 python_graders=trust_remote_code)
    typer.echo(f"wrote {RunPaths(run).metrics} and {RunPaths(run).predictions}")


@app.command()
def report(run: RunDir) -> None:
    """Write report.html and report.md for a run (from its files; nothing is recomputed)."""
    from tunelab.report.html import write_report

    html = write_report(run)
    markdown = RunPaths(run).report_md
    typer.echo(markdown.read_text(encoding="utf-8"), nl=False)
    typer.echo(f"wrote {html} and {markdown}", err=True)


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="a recipe YAML file (docs/recipe.md)")],
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option(help="continue an interrupted run")] = False,
    nproc: NprocOpt = None,
) -> None:
    """check -> prepare -> train -> eval -> report, in one command. --resume continues an
    interrupted run from its last finished stage (and training from its newest checkpoint).
    --nproc N trains under torchrun as `tunelab train --nproc N` does; the other stages run once."""
    from tunelab.train.loop import TrainingInterrupted

    loaded = load_recipe(recipe, overrides or [])
    again = shlex.join(["tunelab", "run", str(recipe), *(overrides or []), "--resume",
                        *([f"--nproc={nproc}"] if nproc else [])])
    command = _torchrun_train(recipe, overrides, nproc, resume) if nproc is not None else None
    try:
        run_pipeline(loaded, resume=resume, resume_command=again, train_command=command)
    except TrainingInterrupted as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(err.exit_code) from None


# ---------------------------------------------------------------------------------------------- curve


def _default_fractions() -> str:
    return ",".join(f"{f:g}" for f in DEFAULT_FRACTIONS)


@app.command()
def curve(
    recipe: Annotated[Path, typer.Argument(help="a recipe YAML file (docs/recipe.md)")],
    overrides: Overrides = None,
    fractions: Annotated[str, typer.Option(
        help="nested shares of the training split, smallest first, each in (0, 1]")] = _default_fractions(),
    resume: Annotated[bool, typer.Option(help="continue an interrupted curve, or add fractions to a finished one")] = False,
) -> None:
    """Learning curve: train on nested fractions of the training data, evaluate each on the same
    test set, and project the gain from doubling the data (or say it is flat)."""
    chosen = parse_fractions(fractions)  # a bad list fails before the recipe, torch or any model loads
    loaded = load_recipe(recipe, overrides or [])
    from tunelab.train.loop import TrainingInterrupted

    again = shlex.join(["tunelab", "curve", str(recipe), *(overrides or []), f"--fractions={fractions}", "--resume"])
    try:
        result = build_curve(loaded, chosen, resume=resume, resume_command=again)
    except TrainingInterrupted as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(err.exit_code) from None
    typer.echo(format_table(result))
    folder = curve_dir(loaded)
    typer.echo(f"wrote {folder / 'curve.json'}, {folder / 'curve.png'}, {folder / 'curve.html'} and "
               f"{folder / 'curve.md'}", err=True)


# ---------------------------------------------------------------------------------------------- use


@app.command()
def chat(
    model: Annotated[str, typer.Argument(help="a run directory or a model reference")] = "smollm2-135m-instruct",
    prompt: Annotated[str | None, typer.Option(help="answer this one message and exit")] = None,
    system: Annotated[str | None, typer.Option(help="system prompt")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="tokens generated per answer at most")] = 256,
    temperature: Annotated[float, typer.Option(callback=_temperature, help="0 = greedy (as evaluated)")] = 0.0,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Chat with a model or a run's fine-tuned model: replies stream as they are generated, the
    history is kept; /reset clears it, /exit or Ctrl-D quits. --prompt answers one message."""
    from tunelab.engine.generate import generate
    from tunelab.use.chat import chat_loop, decoding_for, load_for_use

    loaded = load_for_use(model, trust_remote_code=trust_remote_code)
    settings = decoding_for(loaded, max_new_tokens, temperature)
    if prompt is None:
        chat_loop(loaded, settings, system=system)
        return
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    [answer] = generate(loaded.model, loaded.tokenizer, [messages], settings)
    typer.echo(answer.text)


@app.command("generate")
def generate_(
    model: Annotated[str, typer.Argument(help="a run directory or a model reference")],
    input: Annotated[Path, typer.Option(help="JSONL: {\"messages\": [...]} (OpenAI chat) or {\"prompt\": ...} lines")],
    out: Annotated[Path, typer.Option(help="JSONL to write, one line per input line")],
    max_new_tokens: Annotated[int, typer.Option(min=1, help="tokens generated per answer at most")] = 256,
    temperature: Annotated[float, typer.Option(callback=_temperature, help="0 = greedy (as evaluated)")] = 0.0,
    batch_size: Annotated[int, typer.Option(min=1, help="prompts generated together")] = 16,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Batch generation over a file of prompts (a trailing assistant message is kept as the reference)."""
    from tqdm import tqdm

    from tunelab.use.chat import (
        check_out_path,
        decoding_for,
        generate_file,
        load_for_use,
        read_generation_inputs,
    )

    check_out_path(input, out)  # bad paths and bad lines fail here, before the model loads
    total = len(read_generation_inputs(input))
    loaded = load_for_use(model, trust_remote_code=trust_remote_code)
    settings = decoding_for(loaded, max_new_tokens, temperature)
    with tqdm(total=total, unit="prompt", file=sys.stderr, desc="generate") as bar:
        count = generate_file(loaded, input, out, settings, batch_size, progress=bar.update)
    typer.echo(f"{count} replies -> {out}")


@app.command()
def export(
    run: RunDir,
    out: Annotated[Path, typer.Option(help="output folder (outside the run)")],
    merge: Annotated[bool, typer.Option(help="merge the adapter into the base weights")] = False,
    format: Annotated[str, typer.Option(help="safetensors | gguf (gguf is always merged)")] = "safetensors",
    gguf_type: Annotated[str, typer.Option(help="float type of GGUF matrices: f16 | f32")] = "f16",
    force: Annotated[bool, typer.Option(help="replace an earlier export in --out (never files tunelab did not write)")] = False,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Export the adapter (PEFT format), merged safetensors weights, or a GGUF file; verified before
    it lands in --out."""
    from tunelab.use.export import export_run

    result = export_run(run, out, merge=merge, fmt=format, force=force, gguf_type=gguf_type,
                        trust_remote_code=trust_remote_code)
    checks = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.checks.items())
    typer.echo(f"{result.kind} export -> {result.out_dir} ({', '.join(result.files)}); checks: {checks}")


@app.command()
def serve(
    model: Annotated[str, typer.Argument(help="a run directory or a model reference")],
    host: Annotated[str, typer.Option(help="address to listen on; keep loopback unless you set --api-key")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="0 picks a free port (printed)")] = 8000,
    api_key: Annotated[str | None, typer.Option(envvar="TUNELAB_API_KEY", show_envvar=True,
                                                help="require 'Authorization: Bearer KEY'")] = None,
    rag: Annotated[str | None, typer.Option(help="retrieve from a document folder, or 'train' for the run's train split")] = None,
    rag_k: Annotated[int | None, typer.Option(min=1, help="passages retrieved per request; default the recipe's eval.rag_k")] = None,
    model_id: Annotated[str | None, typer.Option(help="the model name clients send; default the run's name")] = None,
    max_batch_size: Annotated[int, typer.Option(min=1, help="requests run together as one batch")] = ServeSettings.max_batch_size,
    batch_window_ms: Annotated[float, typer.Option(min=0.0, callback=_finite, help="how long a request waits for others to batch with")] = ServeSettings.batch_window_ms,
    max_tokens_limit: Annotated[int, typer.Option(min=1, help="largest max_tokens a request may ask for (larger: 400)")] = ServeSettings.max_tokens_limit,
    log_level: Annotated[str, typer.Option(help="info | warning | debug (debug adds the access log)")] = "info",
    trust_remote_code: TrustOpt = False,
) -> None:
    """OpenAI-compatible API server (/v1/chat/completions, streaming and not; /v1/models; /health)."""
    from tunelab.use.serve import serve as run_server

    settings = ServeSettings(max_batch_size=max_batch_size, batch_window_ms=batch_window_ms,
                             max_tokens_limit=max_tokens_limit, rag_k=rag_k)
    run_server(model, host=host, port=port, api_key=api_key, rag=rag, settings=settings, model_id=model_id,
               log_level=log_level, announce=lambda message: typer.echo(f"tunelab: {message}", err=True),
               trust_remote_code=trust_remote_code)


# ---------------------------------------------------------------------------------------------- grade


@app.command()
def grade(
    graders: Annotated[Path, typer.Argument(help="YAML or JSON: one grader or a list (OpenAI's grader shapes)")],
    samples: Annotated[Path, typer.Argument(help='JSONL: {"sample": {"output_text": ...}, "item": {...}} per line')],
) -> None:
    """Try graders before a run: one {"scores": {name: score}} line per input line on stdout (null and
    "errors" where a grader failed), a summary on stderr."""
    from tunelab.eval.graders.grade import Grading, read_samples
    from tunelab.eval.metrics import summarize_scores

    specs = read_graders_file(graders)
    outputs, items = read_samples(samples)
    with Grading(specs) as grading:
        columns = grading.grade(outputs, items)
    for i in range(len(outputs)):
        line: dict[str, object] = {"scores": {name: column.scores[i] for name, column in columns.items()}}
        errors = {name: column.errors[i] for name, column in columns.items() if column.errors[i] is not None}
        if errors:
            line["errors"] = errors
        typer.echo(json.dumps(line, ensure_ascii=False))
    for spec in specs:
        summary = summarize_scores(columns[spec.name].scores, pass_threshold=getattr(spec, "pass_threshold", None))
        mean = "—" if summary["mean"] is None else f"{summary['mean']:.3f}"
        passed = f", pass rate {summary['pass_rate']:.0%}" if summary.get("pass_rate") is not None else ""
        failed = f", {summary['failed']} failed" if summary["failed"] else ""
        typer.echo(f"tunelab: {spec.name} ({spec.type}): mean {mean} over {summary['scored']} samples{passed}{failed}",
                   err=True)


# ---------------------------------------------------------------------------------------------- lifecycle
# tunelab.lifecycle; docs/lifecycle.md


@app.command()
def drift(
    run: RunDir,
    new: Annotated[Path, typer.Argument(help="new examples (any data format); without answers: input shift only")],
    trust_remote_code: TrustRunCodeOpt = False,
) -> None:
    """Is the fine-tune stale on today's data? Scores its tuned and best prompt-only arms on new
    labelled examples against its own test results -> RUN/drift/<time>/drift.json. Exit 0 either way."""
    from tunelab.lifecycle.drift import drift as check_drift

    result = check_drift(run, new, trust_remote_code=trust_remote_code)
    typer.echo(result.text)
    typer.echo(f"wrote {DriftPaths(Path(result.folder)).result}", err=True)


@app.command()
def update(
    run: RunDir,
    add: Annotated[Path, typer.Option("--add", help="new labelled examples (any data format)")],
    replay: Annotated[float, typer.Option(min=0.0, max=1.0, help="share of the parent's training examples trained on again")] = UpdateSettings.replay,
    from_scratch: Annotated[bool, typer.Option("--from-scratch", help="train from the base model instead of the parent's weights")] = False,
    name: Annotated[str | None, typer.Option(help="the new run's folder name (default RUN-update, next to RUN)")] = None,
    trust_remote_code: TrustRunCodeOpt = False,
) -> None:
    """Continue a run with new examples -> a new run whose manifest names its parent, tested on the old
    test set and on the new examples' held-out part, each paired against the parent."""
    from tunelab.lifecycle.update import update as run_update

    typer.echo(run_update(run, add, replay=replay, from_scratch=from_scratch, name=name,
                          trust_remote_code=trust_remote_code).text)


@app.command()
def rebase(
    run: RunDir,
    model: Annotated[str, typer.Option("--model", "-m", help="the new base model: alias, folder, .gguf or hub id")],
    name: Annotated[str | None, typer.Option(help="the new run's folder name (default RUN-on-MODEL, next to RUN)")] = None,
    carry_adapter: Annotated[bool, typer.Option("--carry-adapter", help="start from the parent's adapter (it must fit the new base)")] = False,
    trust_remote_code: TrustRunCodeOpt = False,
) -> None:
    """The same recipe and data on a new base model, every arm on both, and a migration verdict."""
    from tunelab.lifecycle.rebase import rebase as run_rebase

    typer.echo(run_rebase(run, model, name=name, carry_adapter=carry_adapter,
                          trust_remote_code=trust_remote_code).text)


# ---------------------------------------------------------------------------------------------- runs


@runs_app.command("list")
def runs_list(out_dir: Annotated[Path, typer.Option(help="where runs live")] = Path("runs")) -> None:
    """Runs under out_dir with their status and primary metric."""
    from tunelab.report.compare import format_run_list, list_runs

    typer.echo(format_run_list(list_runs(out_dir)))


@runs_app.command("compare")
def runs_compare(
    runs: Annotated[list[Path], typer.Argument(help="two or more run directories")],
    arm: Annotated[str, typer.Option(help="the arm whose per-example scores are compared")] = "tuned",
    out: Annotated[Path | None, typer.Option(help="also write the comparison as a self-contained HTML file")] = None,
) -> None:
    """The same eval set across runs, with the paired test between them."""
    from tunelab.report.compare import compare_runs, render_comparison_markdown, write_comparison_html

    comparison = compare_runs(runs, arm=arm)
    typer.echo(render_comparison_markdown(comparison), nl=False)
    if out is not None:
        typer.echo(f"wrote {write_comparison_html(comparison, out)}", err=True)


# ---------------------------------------------------------------------------------------------- ui


@app.command()
def ui(
    out_dir: Annotated[Path, typer.Option(help="the runs folder to show (and to start runs in)")] = Path("runs"),
    host: Annotated[str, typer.Option(help="address to listen on; any but loopback needs --api-key")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="0 picks a free port (printed)")] = 7860,
    api_key: Annotated[str | None, typer.Option(envvar="TUNELAB_UI_API_KEY", show_envvar=True,
                                                help="required on every request (a login page sets it as a cookie)")] = None,
) -> None:
    """Local web app: runs and their live training, reports, predictions, compare, a playground, start runs."""
    from tunelab.ui.app import serve_ui

    serve_ui(out_dir, host=host, port=port, api_key=api_key, announce=lambda message: typer.echo(f"tunelab: {message}", err=True))


def main() -> None:
    # before torch loads OpenMP: spin-waiting threads made training 15x slower on shared cores;
    # sleeping threads cost little when the cores are free
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # transformers' own generate() calls a property it deprecated; users can do nothing about it
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        app()
    except TunelabError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    except OSError as err:  # the file system said no (permission, not a folder, disk full): the user's to fix
        where = f"{os.fsdecode(err.filename)}: " if isinstance(err.filename, str | bytes) and err.filename else ""
        typer.echo(f"error: {where}{err.strerror or err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()

"""A run trained on a cleaned copy of its parent's data: did leaving out the audit's suspects help?

`tunelab data audit RUN --write-clean OUT.jsonl` (eval/audit.py write_clean) writes the copy and,
beside it, `OUT.jsonl.cleaned-from` (`write_provenance`): the run it was cleaned from, the user's
file and the lines left out (with their answers and why), and the SHA-256 of OUT as written. A later
`tunelab run` whose data.train is exactly OUT finds its parent there (`compare_cleaned`, after the
run's own evaluation) and scores itself against the parent on the parent's test examples, paired by
example id (eval/paired.py, as `tunelab update` does): eval/metrics.json `cleaned`, shown by the report.

Nothing is compared when OUT no longer has the fingerprint it was written with (edited or written
again since: the record no longer says what it holds), when the parent run or its evaluation is
gone, or when the two runs score a different primary metric; `cleaned` then says why, in `note`.
Reads: OUT, OUT.cleaned-from, the parent's data/test.jsonl, eval/metrics.json and
eval/predictions.jsonl. Writes: this run's eval/cleaned/ (only when its own test set lacks some of
the parent's test examples: the tuned arm is scored on those) and its eval/metrics.json `cleaned`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunelab.config import Recipe
from tunelab.contract import ContractError, Metrics
from tunelab.errors import ConfigError
from tunelab.files import write_text_atomic
from tunelab.runs import RunPaths

SUFFIX = ".cleaned-from"  # beside OUT: not a data file's suffix, so a data folder never reads it as examples
FORMAT = 1


def provenance_path(out: Path) -> Path:
    return out.with_name(out.name + SUFFIX)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_provenance(out: Path, run_dir: Path, source: Path, dropped: Sequence[dict[str, Any]], rule: str) -> Path:
    """OUT.cleaned-from: where the copy OUT came from (`dropped`: the audit rows left out)."""
    record = {
        "format": FORMAT, "parent_run": str(run_dir.resolve()), "source": str(source.resolve()),
        "source_sha256": sha256(source), "out": str(out.resolve()), "sha256": sha256(out), "rule": rule,
        "dropped_lines": sorted(r["line"] for r in dropped),
        "dropped": [{k: r.get(k) for k in ("line", "rank", "id", "suspicion", "flagged", "answer", "model_answer")}
                    for r in sorted(dropped, key=lambda r: r["line"])],
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = provenance_path(out)
    write_text_atomic(path, json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    return path


def read_provenance(train: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the record, None) for a cleaned copy whose fingerprint still holds; (record or None, why not)
    for one that cannot be compared; (None, None) for a file that is not a cleaned copy."""
    path = provenance_path(train)
    if not train.is_file() or not path.is_file():
        return None, None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
            raise ValueError("not a record of `tunelab data audit --write-clean`")
    except (ValueError, UnicodeDecodeError) as err:
        return None, f"{path}: unreadable ({err}); no comparison with the run it was cleaned from"
    if sha256(train) != record["sha256"]:
        return record, (f"{train} changed after `tunelab data audit --write-clean` wrote it (its SHA-256 is not the one "
                        f"in {path.name}): the record no longer says which examples it lacks, so it is not compared "
                        "with the run it was cleaned from")
    return record, None


def compare_cleaned(recipe: Recipe, paths: RunPaths, *, trust_remote_code: bool = False,
                    python_graders: bool = False) -> dict[str, Any] | None:
    """The `cleaned` section for a run trained on a cleaned copy (None: data.train is not one), written
    into eval/metrics.json. Call after the run's own evaluation."""
    if not recipe.data.train:
        return None
    record, note = read_provenance(Path(recipe.data.train))
    if record is None and note is None:
        return None
    train = Path(recipe.data.train)
    section: dict[str, Any] = {"file": str(train.resolve()), "provenance": str(provenance_path(train))}
    if record is not None:
        section.update(parent_run=record.get("parent_run"), source=record.get("source"), rule=record.get("rule"),
                       dropped_lines=record.get("dropped_lines", []),
                       dropped_flagged=sum(1 for r in record.get("dropped", []) if r.get("flagged")))
    if note is None:
        try:
            section.update(_compare(record, recipe, paths, trust_remote_code, python_graders))
        except _NoComparison as why:
            note = str(why)
    if note is not None:
        section.update(comparison=None, note=note, text=f"Not compared with the run it was cleaned from: {note}")
    Metrics.update_keys(paths.metrics, {"cleaned": section})
    return section


class _NoComparison(Exception):
    pass


def _primary(paths: RunPaths) -> str | None:
    try:
        return Metrics.read_keys(paths.metrics).get("primary_metric")
    except ContractError:
        return None


def _compare(record: dict[str, Any], recipe: Recipe, paths: RunPaths, trust_remote_code: bool,
             python_graders: bool) -> dict[str, Any]:
    from tunelab.eval.paired import arm_scores, compare_paired

    parent = RunPaths(Path(str(record.get("parent_run"))))
    if parent.root.resolve() == paths.root.resolve():
        raise _NoComparison(f"{paths.root} is the run the copy was cleaned from; train on the copy under another name")
    if not parent.predictions.is_file() or not parent.data_split("test").is_file():
        raise _NoComparison(f"the parent run {parent.root} has no evaluated test set (eval/predictions.jsonl, "
                            "data/test.jsonl) any more")
    primary, parent_primary = _primary(paths), _primary(parent)
    if primary != parent_primary:
        raise _NoComparison(f"this run scores {primary} and the parent run {parent.root} {parent_primary}: "
                            "not comparable")
    try:
        parent_scores = arm_scores(parent.eval, "tuned")
        own = arm_scores(paths.eval, "tuned")
    except (ConfigError, OSError) as err:
        raise _NoComparison(str(err)) from None
    where = "this run's own test set"
    if not set(parent_scores) <= set(own):  # another test split: score the tuned arm on the parent's examples
        own = _score_on_parent_test(recipe, paths, parent, set(parent_scores), trust_remote_code, python_graders)
        where = "the parent's test examples (eval/cleaned/)"
    own = {i: s for i, s in own.items() if i in parent_scores}
    result = compare_paired(f"test {primary}", own, parent_scores, seed=recipe.eval.seed)
    lines = record.get("dropped_lines", [])
    flagged = sum(1 for r in record.get("dropped", []) if r.get("flagged"))
    what = (f"the {len(lines)} example(s) its audit flagged" if record.get("rule") == "flagged"
            else f"the {len(lines)} most suspect example(s) ({flagged} flagged)")
    if result.significant:
        outcome = "removing them helped" if result.delta_points > 0 else "removing them hurt"
    else:
        outcome = "no significant difference from removing them"
    text = f"Trained without {what} of {parent.root.name}: {result.text}; {outcome}."
    return {"parent_name": parent.root.name, "primary_metric": primary, "test": where,
            "parent_score": result.parent, "score": result.child, "comparison": result.model_dump(mode="json"),
            "helped": bool(result.significant and result.delta_points > 0), "note": None, "text": text}


def _score_on_parent_test(recipe: Recipe, paths: RunPaths, parent: RunPaths, ids: set[str], trust_remote_code: bool,
                          python_graders: bool) -> dict[str, float]:
    from tunelab.eval.paired import arm_scores
    from tunelab.eval.run import evaluate

    out = paths.eval / "cleaned"
    out.mkdir(parents=True, exist_ok=True)
    with parent.data_split("test").open(encoding="utf-8") as f:
        rows = [line for line in f if line.strip() and json.loads(line).get("id") in ids]
    write_text_atomic(out / "test.jsonl", "".join(rows))
    data = recipe.model_dump(mode="json")
    data["eval"].update(limit=None, forgetting=False)
    evaluate(paths.root, arms=["tuned"], test_file=out / "test.jsonl", recipe=Recipe.model_validate(data), out_dir=out,
             echo=False, trust_remote_code=trust_remote_code, python_graders=python_graders)
    return arm_scores(out, "tuned")


"""`tunelab data check` and `data prepare` as a user runs them: exit codes, --json, fast format
errors (no torch), and the input left byte-identical."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "data"
DEFECTS = FIXTURES / "defects.jsonl"
CLEAN = FIXTURES / "clean_train.jsonl"


def tunelab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True, text=True)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_check_exit_codes_and_console_lines():
    bad = tunelab("data", "check", str(DEFECTS), "--no-tokens")
    assert bad.returncode == 1, bad.stderr
    assert f"{DEFECTS}:2: invalid_json: " in bad.stdout
    assert f"{DEFECTS}:20: last_not_assistant: " in bad.stdout
    assert "errors: 16, warnings: 2" in bad.stdout
    assert "Traceback" not in bad.stderr
    good = tunelab("data", "check", str(CLEAN), "--valid", str(FIXTURES / "clean_valid.jsonl"), "--no-tokens")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "errors: 0, warnings: 0" in good.stdout


def test_check_json_lines_and_token_estimate_on_the_tiny_model():
    before = _sha(CLEAN)
    result = tunelab("data", "check", str(CLEAN), "--model", "tiny-test", "--json", "--epochs", "3", "--gpu-price", "4")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["kind"] for line in lines] == ["summary"]
    summary = lines[0]
    assert summary["issues"] == {"errors": 0, "warnings": 0, "by_code": {}}
    assert summary["tokens"]["min"] > 0 and summary["tokens"]["trainable_total"] > 0
    estimate = summary["estimate"]
    assert estimate["epochs"] == 3 and estimate["tokens_per_s"] > 0 and estimate["gpu_price_per_hour"] == 4
    assert abs(estimate["seconds"] - 3 * estimate["train_tokens"] / estimate["tokens_per_s"]) < 1e-6
    assert _sha(CLEAN) == before


def test_json_issue_lines_match_the_console():
    result = tunelab("data", "check", str(DEFECTS), "--no-tokens", "--json")
    issues = [json.loads(line) for line in result.stdout.splitlines()][:-1]
    assert result.returncode == 1
    assert [(i["line"], i["code"]) for i in issues][:3] == [(2, "invalid_json"), (3, "invalid_utf8"), (4, "not_an_object")]
    assert {i["severity"] for i in issues} == {"error", "warning"}


def test_structural_check_does_not_import_torch():
    code = (
        "import sys; from tunelab.data.check import check_data; "
        f"report = check_data({str(DEFECTS)!r}); assert report.errors; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_prepare_exit_codes_and_output(tmp_path):
    before = _sha(DEFECTS)
    bad = tunelab("data", "prepare", str(DEFECTS), "--out", str(tmp_path / "bad"), "--model", "tiny-test")
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
    assert (tmp_path / "bad" / "issues.jsonl").is_file()
    good = tunelab("data", "prepare", str(CLEAN), "--out", str(tmp_path / "good"), "--model", "tiny-test", "--seed", "1")
    assert good.returncode == 0, good.stderr
    assert "train " in good.stdout and (tmp_path / "good" / "train.tokens.jsonl").is_file()
    again = tunelab("data", "prepare", str(CLEAN), "--out", str(tmp_path / "good"), "--model", "tiny-test", "--seed", "1")
    assert "up to date" in again.stdout
    assert _sha(DEFECTS) == before
    wrong = tunelab("data", "prepare", str(CLEAN), "--out", str(tmp_path / "x"), "--max-seq-len", "4", "--model", "tiny-test")
    assert wrong.returncode == 2 and "max-seq-len" in wrong.stderr

"""A seeded fuzz harness over what users hand tunelab: data files, recipes and HTTP requests.

Each case is derived from a valid input by seeded random damage (truncation, byte flips, wrong
types, huge and non-finite numbers, deep nesting, aliases, odd files). Asserted for every case: no
exception other than tunelab's own one-line errors (no traceback), an exit code or HTTP status in
the documented set (docs/robustness.md), the user's files byte for byte unchanged, and the memory
of a data check within the stated per-record bound. Counts are fixed (not timed): ~20 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import random
import tracemalloc
from pathlib import Path

import pytest

from test_hardening_files import snapshot
from tunelab.data.check import check_data
from tunelab.data.formats import MAX_RECORD_BYTES
from tunelab.errors import ConfigError

SEED = 19
DATA_CASES = 120
RECIPE_CASES = 400
HTTP_CASES = 150
CHECK_EXIT_CODES = {0, 1}  # data check: clean / errors found
HTTP_STATUSES = {200, 400, 401, 404, 413, 429}  # never 500 for a bad request

VALID_RECORDS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}]},
    {"instruction": "Translate to French", "input": "cat", "output": "chat"},
    {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    {"prompt": "Capital of Peru?", "completion": "Lima"},
]
ODD_VALUES = [None, True, 0, -1, 2**70, 1e308, 1.5, "", "x" * 300, "\u0000", "\ud800", "é東京", [], {}, [[[]]],
              {"role": "user"}, float("inf"), float("nan")]


def odd_value(rng: random.Random):
    return rng.choice(ODD_VALUES)


def damage_record(rng: random.Random, record):
    """Replace, drop or add one field somewhere in a JSON-like value."""
    record = json.loads(json.dumps(record))
    node = record
    for _ in range(rng.randint(0, 3)):
        children = list(node.items()) if isinstance(node, dict) else list(enumerate(node)) if isinstance(node, list) else []
        children = [(k, v) for k, v in children if isinstance(v, dict | list)]
        if not children:
            break
        node = rng.choice(children)[1]
    if isinstance(node, dict) and node:
        key = rng.choice(list(node))
        action = rng.randrange(3)
        if action == 0:
            node[key] = odd_value(rng)
        elif action == 1:
            del node[key]
        else:
            node[rng.choice(["role", "content", "messages", "weight", "name", "tool_calls", "zz"])] = odd_value(rng)
    elif isinstance(node, list) and node:
        node[rng.randrange(len(node))] = odd_value(rng)
    return record


def damage_bytes(rng: random.Random, data: bytes) -> bytes:
    action = rng.randrange(7)
    if action == 0 and data:
        return data[: rng.randrange(len(data))]  # truncated
    if action == 1 and data:
        i = rng.randrange(len(data))
        return data[:i] + bytes([rng.randrange(256)]) + data[i + 1 :]  # one byte flipped
    if action == 2:
        return b"\xef\xbb\xbf" + data.replace(b"\n", b"\r\n")  # BOM and CRLF
    if action == 3:
        return data + b"[" * 5000 + b"]" * 5000 + b"\n"  # nesting deeper than any parser's recursion
    if action == 4:
        return data + b'{"messages": NaN, "x": 1e999, "y": -Infinity}\n'
    if action == 5 and rng.random() < 0.5:  # deep, but within what the JSON parsers accept
        content = b"[" * 900 + b"]" * 900
        return data + b'{"messages": [{"role": "user", "content": ' + content + b'}, {"role": "assistant", "content": "a"}]}\n'
    if action == 5:
        return data + b"\x00\xff\xfe" * rng.randint(1, 50) + b"\n"
    return data + b"\n\n   \n"


def make_data_file(rng: random.Random, folder: Path) -> Path:
    suffix = rng.choice([".jsonl", ".jsonl", ".json", ".csv"])
    records = [damage_record(rng, rng.choice(VALID_RECORDS)) if rng.random() < 0.5 else rng.choice(VALID_RECORDS)
               for _ in range(rng.randint(0, 6))]
    if rng.random() < 0.1:
        records.append({"messages": [{"role": "user", "content": "z" * (MAX_RECORD_BYTES + 1)}]})
    if suffix == ".json":
        data = json.dumps(records, indent=rng.choice([None, 1])).encode()
    elif suffix == ".csv":
        data = ("prompt,completion\n" + "".join(f'"{r.get("prompt", r)}",{len(str(r))}\n' for r in records)).encode()
    else:
        data = "".join(json.dumps(r) + "\n" for r in records).encode()
    path = folder / f"case{suffix}"
    path.write_bytes(damage_bytes(rng, data) if rng.random() < 0.7 else data)
    return path


def test_fuzzed_data_files_give_issues_never_a_crash(tmp_path):
    rng = random.Random(SEED)
    for case in range(DATA_CASES):
        folder = tmp_path / f"c{case}"
        folder.mkdir()
        path = make_data_file(rng, folder)
        before = snapshot(folder)
        tracemalloc.start()
        try:
            report = check_data(folder if rng.random() < 0.3 else path)
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert report.exit_code in CHECK_EXIT_CODES, path
        assert all(issue.line >= 0 and "\n" not in issue.message for issue in report.issues), path
        assert snapshot(folder) == before, path
        assert peak < 16 * MAX_RECORD_BYTES, (path, peak)


RECIPE_KEYS = ["name", "method", "out_dir", "model.name", "model.trust_remote_code", "data.train", "data.max_seq_len",
               "data.valid_fraction", "lora.rank", "lora.alpha", "lora.targets", "train.epochs", "train.lr",
               "train.seed", "train.max_steps", "train.warmup_ratio", "eval.arms", "eval.shots", "eval.seed",
               "trian.epochs", "train", "eval.unknown"]
YAML_VALUES = ["1", "-1", "0", ".inf", "-.inf", ".nan", "1e400", str(2**70), "1.0e-45", "true", "null", "~", "''",
               "'../x'", "/abs/path", "[a, b]", "{a: 1}", "!!python/object:os.system ls", "&a [*a]", "*nowhere",
               "'\\u0000'", "!!binary aGk=", "[[[[[]]]]]", "lora", "full", "x" * 200]


def test_fuzzed_recipes_load_or_give_one_config_error(tmp_path):
    from tunelab.config import load_recipe

    rng = random.Random(SEED)
    recipe = tmp_path / "recipe.yaml"
    for _ in range(RECIPE_CASES):
        lines = []
        for key in rng.sample(RECIPE_KEYS, rng.randint(1, 5)):
            parts = key.split(".")
            value = rng.choice(YAML_VALUES)
            lines.append(f"{parts[0]}: {value}" if len(parts) == 1 else f"{parts[0]}: {{{parts[1]}: {value}}}")
        text = "\n".join(lines) + "\n"
        if rng.random() < 0.2:
            text = text[: rng.randrange(len(text) + 1)]
        recipe.write_text(text)
        try:
            loaded = load_recipe(recipe)
        except ConfigError as err:
            assert str(err) and err.exit_code == 2
            continue
        dumped = json.dumps(loaded.model_dump(mode="json"), allow_nan=False)  # every number finite
        assert "/" not in loaded.name and loaded.name not in (".", ".."), text
        assert len(dumped) < 100_000, text


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_model_dir):
    from fastapi.testclient import TestClient

    from test_export import make_fake_run
    from tunelab.use.chat import load_for_use
    from tunelab.use.serve import ServeSettings, create_app

    loaded = load_for_use(str(make_fake_run(tmp_path_factory.mktemp("runs") / "x")), device="cpu", dtype="float32")
    loaded.max_context_tokens = 256
    app = create_app(loaded, ServeSettings(max_tokens_limit=4, batch_window_ms=0, max_body_bytes=256 * 1024))
    with TestClient(app) as test_client:
        yield test_client


REQUEST_ODD = [None, True, -1, 0, 1e-45, 2**70, -(2**70), 3.5, "", "x", [], {}, [{}], {"role": "user"}, "NaN"]
REQUEST_FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream",
                  "stop", "seed", "presence_penalty", "logprobs", "response_format", "stream_options"]


def test_fuzzed_requests_get_a_4xx_or_an_answer_never_a_500(client):
    rng = random.Random(SEED)
    valid = {"model": "x", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    for _ in range(HTTP_CASES):
        body = json.loads(json.dumps(valid))
        for _ in range(rng.randint(1, 3)):
            field = rng.choice(REQUEST_FIELDS)
            if rng.random() < 0.2:
                body.pop(field, None)
            else:
                body[field] = rng.choice(REQUEST_ODD)
        raw = json.dumps(body)
        action = rng.randrange(6)
        if action == 0:
            raw = raw[: rng.randrange(len(raw))]
        elif action == 1:
            raw = raw.replace("2", "1e999", 1).replace("Hi", "\\ud800", 1)
        elif action == 2:
            raw = '{"model": "x", "messages": ' + "[" * 3000 + "]" * 3000 + "}"
        response = client.post("/v1/chat/completions", content=raw.encode("utf-8", "surrogatepass"),
                               headers={"content-type": rng.choice(["application/json", "text/plain"])})
        assert response.status_code in HTTP_STATUSES, (raw[:200], response.status_code, response.text[:300])
        payload = response.json() if not body.get("stream") or response.status_code != 200 else None
        if response.status_code != 200:
            assert set(payload) == {"error"} and payload["error"]["message"], raw[:200]
    assert client.get("/health").json()["status"] == "ok"


def test_the_cli_never_shows_a_traceback_on_fuzzed_input(tmp_path):
    import subprocess
    import sys

    rng = random.Random(SEED)
    folder = tmp_path / "user"
    folder.mkdir()
    data = make_data_file(rng, folder)
    (folder / "recipe.yaml").write_text("name: ../x\ntrain: {epochs: .inf}\n")
    before = snapshot(folder)
    for args, codes in [
        (["data", "check", str(data), "--no-tokens"], {0, 1}),
        (["data", "check", str(folder), "--no-tokens", "--epochs", "nan"], {2}),
        (["config", "show", str(folder / "recipe.yaml")], {2}),
        (["config", "show", str(folder / "recipe.yaml"), "name=ok", "train.epochs=1", "train.seed=1e999"], {2}),
        (["export", str(folder), "--out", str(folder), "--force"], {2}),
    ]:
        result = subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True, text=True, cwd=folder,
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert result.returncode in codes, (args, result.returncode, result.stderr[-500:])
        assert "Traceback" not in result.stdout + result.stderr, args
    assert snapshot(folder) == before

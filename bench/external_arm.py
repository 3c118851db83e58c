"""An endpoint arm's wall time: 100 test examples, a local server answering each request in 0.2 s.

    .venv/bin/python bench/external_arm.py                  # concurrency 1 and 8, then the cached re-run
    .venv/bin/python bench/external_arm.py --concurrency 1,8,16 --delay-s 0.2 --limit 100

The prompts are the ones `tunelab eval` sends with `prompt: prompt`: the first --limit examples of
examples/triage's test split through the evaluation's PromptBuilder (instructions derived from the train
split + 5 fixed shots). The stand-in server (threading http.server on 127.0.0.1) sleeps --delay-s per
request, then answers the example's reference with a `usage` block. Every concurrency runs in this process,
one after the other, each with an empty cache (eval/external/<name>.jsonl in a temporary folder); then the
last one is run again on its filled cache (no request is sent). Reports wall seconds, requests, and the
speed-up over concurrency 1. The goal (issue: external arms): <= 5 s at concurrency 8.
Writes bench/results/external_arm.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from tunelab.config import EndpointArm  # noqa: E402
from tunelab.engine.generate import DecodingSettings  # noqa: E402
from tunelab.eval import external  # noqa: E402
from tunelab.eval.arms import PromptBuilder, build_pool, derive_instructions, task_system_prompt  # noqa: E402
from tunelab.eval.run import read_examples  # noqa: E402

RESULTS = ROOT / "bench" / "results"
TRIAGE = ROOT / "examples" / "triage" / "data"


class StandIn(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, delay_s: float, answers: dict[str, str]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.delay_s, self.answers, self.requests = delay_s, answers, 0
        self.lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    server: StandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.requests += 1
        time.sleep(self.server.delay_s)
        answer = self.server.answers.get(body["messages"][-1]["content"], "")
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
                           "usage": {"prompt_tokens": 500, "completion_tokens": 20}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--delay-s", type=float, default=0.2)
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--out", type=Path, default=RESULTS / "external_arm.json")
    args = parser.parse_args()

    train = read_examples(TRIAGE / "train.jsonl")
    test = read_examples(TRIAGE / "test.jsonl")[: args.limit]
    builder = PromptBuilder(build_pool(train, test), derive_instructions(train), shots=5, rag_k=5, seed=0,
                            task_system=task_system_prompt(train))
    conversations = [builder.build("prompt", ex) for ex in test]
    server = StandIn(args.delay_s, {ex.user_prompt: ex.reference for ex in test})
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base_url = f"http://127.0.0.1:{server.server_port}/v1"
    settings = DecodingSettings(max_new_tokens=64)

    runs = []
    with tempfile.TemporaryDirectory() as folder:
        levels = [int(c) for c in args.concurrency.split(",")]
        for concurrency in levels:
            arm = EndpointArm(name=f"bench-c{concurrency}", base_url=base_url, model="stand-in",
                              price_per_m_input_tokens=0.4, price_per_m_output_tokens=1.6, concurrency=concurrency)
            cache = Path(folder) / f"{arm.name}.jsonl"
            for pass_name in ("fresh", "cached"):
                if pass_name == "cached" and concurrency != levels[-1]:
                    continue
                sent = server.requests
                started = time.perf_counter()
                result = external.run_endpoint_arm(arm, conversations, settings, cache)
                wall = time.perf_counter() - started
                right = sum(a.text == ex.reference for a, ex in zip(result.answers, test, strict=True))
                runs.append({"concurrency": concurrency, "cache": pass_name, "wall_s": round(wall, 3),
                             "requests_sent": server.requests - sent, "failures": result.failures,
                             "answers_right": right})
                print(f"concurrency {concurrency:>3} {pass_name:>6}: {wall:6.2f} s, "
                      f"{server.requests - sent} requests, {result.failures} failures", flush=True)
    server.shutdown()
    baseline = next(r["wall_s"] for r in runs if r["concurrency"] == levels[0] and r["cache"] == "fresh")
    for r in runs:
        r["speedup_vs_first"] = round(baseline / r["wall_s"], 2) if r["wall_s"] else None
    record = {"bench": "external_arm", "examples": len(test), "server_delay_s": args.delay_s,
              "prompt": "prompt arm (examples/triage, 5 shots)", "goal": "<= 5 s at concurrency 8",
              "runs": runs, "python": platform.python_version(), "machine": platform.machine(),
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

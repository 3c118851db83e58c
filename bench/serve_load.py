"""Loopback load test of `tunelab serve`: N concurrent clients x M requests each, batched vs unbatched.

    .venv/bin/python bench/serve_load.py                      # tiny-test model (default: seconds, any CPU)
    .venv/bin/python bench/serve_load.py --model smollm2-135m-instruct   # the real default model
    .venv/bin/python bench/serve_load.py --model runs/demo    # a run's fine-tuned model

Starts the server as a subprocess on 127.0.0.1 with a free port (never any other address), runs
`--clients` concurrent clients that each send `--requests` chat completions one after another (a
`--stream-fraction` of the clients stream), and reports server errors (5xx, dropped connections),
p50/p95 latency, requests/s and completion tokens/s. The same load runs twice in this process: with
the server's batching (`--max-batch-size`) and with batching off (`--max-batch-size 1`) as the
baseline, so the speedup is a ratio measured side by side. Writes bench/results/serve_load.json.

Requests sample (`--temperature 1.0`, same seed, so they still batch together): tiny-test's
random weights greedily pick a newline forever, which strips to an empty reply, and the streams
would then carry no text at all.

Bounded: each request times out after `--request-timeout-s`, the whole run after `--max-seconds`.
Exit status 1 when any server error occurred.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

HOST = "127.0.0.1"  # loopback only, by design
RESULTS = Path(__file__).resolve().parent / "results" / "serve_load.json"


def start_server(model: str, max_batch_size: int, batch_window_ms: float, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "tunelab", "serve", model, "--host", HOST, "--port", "0",
               "--max-batch-size", str(max_batch_size), "--batch-window-ms", str(batch_window_ms),
               "--log-level", "warning"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    seen = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            raise RuntimeError("server exited before serving:\n" + "".join(seen))
        seen.append(line)
        match = re.search(rf"http://{re.escape(HOST)}:(\d+)/v1", line)
        if match:
            # keep draining stderr so that the server never blocks on a full pipe
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return process, f"http://{HOST}:{match.group(1)}"
    process.kill()
    raise RuntimeError("server did not start within 300 s")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def one_request(client: httpx.AsyncClient, url: str, model_id: str, prompt: str, max_tokens: int,
                      stream: bool, temperature: float) -> dict:
    body = {"model": model_id, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream": stream, "temperature": temperature}
    if stream:
        body["stream_options"] = {"include_usage": True}
    started = time.perf_counter()
    record = {"stream": stream, "status": None, "latency_s": None, "ttft_s": None, "completion_tokens": 0,
              "error": None}
    try:
        if not stream:
            response = await client.post(url, json=body)
            record["status"] = response.status_code
            if response.status_code == 200:
                record["completion_tokens"] = response.json()["usage"]["completion_tokens"]
        else:
            async with client.stream("POST", url, json=body) as response:
                record["status"] = response.status_code
                done = False
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    event = json.loads(line[6:])
                    if "error" in event:
                        record["error"] = "error event"
                        break
                    if event.get("choices") and event["choices"][0]["delta"].get("content") and record["ttft_s"] is None:
                        record["ttft_s"] = time.perf_counter() - started
                    if event.get("usage"):
                        record["completion_tokens"] = event["usage"]["completion_tokens"]
                if response.status_code == 200 and not done and record["error"] is None:
                    record["error"] = "stream ended without [DONE]"
    except httpx.HTTPError as err:  # counted as a server error below: the load test's whole point
        record["error"] = type(err).__name__
    record["latency_s"] = time.perf_counter() - started
    return record


async def run_load(base_url: str, model_id: str, clients: int, requests: int, max_tokens: int,
                   stream_fraction: float, request_timeout_s: float, temperature: float) -> dict:
    url = base_url + "/v1/chat/completions"
    streaming_clients = round(clients * stream_fraction)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=request_timeout_s, limits=limits) as client:

        async def client_loop(c: int) -> list[dict]:
            out = []
            for r in range(requests):
                prompt = f"Client {c}, request {r}: what is {c} plus {r}? Answer briefly."
                out.append(await one_request(client, url, model_id, prompt, max_tokens, c < streaming_clients,
                                             temperature))
            return out

        started = time.perf_counter()
        per_client = await asyncio.gather(*(client_loop(c) for c in range(clients)))
        wall_s = time.perf_counter() - started
    records = [r for rs in per_client for r in rs]
    server_errors = [r for r in records if r["error"] or (r["status"] or 0) >= 500]
    client_errors = [r for r in records if r["status"] and 400 <= r["status"] < 500]
    latencies = sorted(r["latency_s"] for r in records)
    ttfts = sorted(r["ttft_s"] for r in records if r["ttft_s"] is not None)
    tokens = sum(r["completion_tokens"] for r in records)

    def pct(values: list[float], q: float) -> float | None:
        return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 1) if values else None

    return {
        "requests": len(records), "streaming_requests": sum(r["stream"] for r in records),
        "server_errors": len(server_errors), "client_errors_4xx": len(client_errors),
        "error_kinds": sorted({str(r["error"] or r["status"]) for r in server_errors}),
        "wall_s": round(wall_s, 2), "requests_per_s": round(len(records) / wall_s, 2),
        "completion_tokens": tokens, "tokens_per_s": round(tokens / wall_s, 1),
        "latency_ms_p50": pct(latencies, 0.50), "latency_ms_p95": pct(latencies, 0.95),
        "latency_ms_mean": round(statistics.fmean(latencies) * 1000, 1),
        "stream_ttft_ms_p50": pct(ttfts, 0.50), "stream_ttft_ms_p95": pct(ttfts, 0.95),
    }


def measure(args: argparse.Namespace, max_batch_size: int, env: dict[str, str]) -> dict:
    process, base_url = start_server(args.model, max_batch_size, args.batch_window_ms, env)
    try:
        model_id = httpx.get(base_url + "/v1/models", timeout=30).json()["data"][0]["id"]
        warm_up = run_load(base_url, model_id, 2, 1, args.max_tokens, 0.5, args.request_timeout_s, args.temperature)
        asyncio.run(warm_up)
        result = asyncio.run(asyncio.wait_for(
            run_load(base_url, model_id, args.clients, args.requests, args.max_tokens, args.stream_fraction,
                     args.request_timeout_s, args.temperature),
            timeout=args.max_seconds))
    finally:
        stop_server(process)
    # this machine is shared: a 1-minute load average above its core count means the numbers are
    # squeezed by other work (compare runs by their ratio, which is measured back to back)
    return {"max_batch_size": max_batch_size, **result, "load_avg_1min_after": round(os.getloadavg()[0], 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-test",
                        help="alias, folder or run directory; default tiny-test (2 layers, random weights: measures "
                             "the server, not a model); smollm2-135m-instruct for the real default model")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=10, help="per client, one after another")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=1.0, help="see the module docstring")
    parser.add_argument("--stream-fraction", type=float, default=0.2, help="share of clients that stream")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-window-ms", type=float, default=5.0)
    parser.add_argument("--no-baseline", action="store_true", help="skip the unbatched run")
    parser.add_argument("--request-timeout-s", type=float, default=300.0)
    parser.add_argument("--max-seconds", type=float, default=1200.0, help="bound on each load run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.setdefault("HF_HUB_OFFLINE", "1")
    load_before = round(os.getloadavg()[0], 2)
    runs = {"batched": measure(args, args.max_batch_size, env)}
    print(json.dumps({"batched": runs["batched"]}, indent=1), file=sys.stderr)
    if not args.no_baseline:
        runs["unbatched"] = measure(args, 1, env)
        print(json.dumps({"unbatched": runs["unbatched"]}, indent=1), file=sys.stderr)
    report = {
        "what": "tunelab serve under loopback load: concurrent OpenAI-style clients, batched vs batching off",
        "model": args.model, "host": HOST, "clients": args.clients, "requests_per_client": args.requests,
        "max_tokens": args.max_tokens, "temperature": args.temperature, "stream_fraction": args.stream_fraction,
        "batch_window_ms": args.batch_window_ms,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg_1min_before": load_before},
        "runs": runs,
    }
    if "unbatched" in runs and runs["unbatched"]["tokens_per_s"]:
        report["speedup_tokens_per_s"] = round(runs["batched"]["tokens_per_s"] / runs["unbatched"]["tokens_per_s"], 2)
        report["p95_latency_ratio_unbatched_over_batched"] = round(
            runs["unbatched"]["latency_ms_p95"] / runs["batched"]["latency_ms_p95"], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 1 if any(run["server_errors"] for run in runs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

"""The null experiment behind stable retention (docs/evaluation.md, Forgetting): how much of the base model's
own right answers a harmless change of framing loses, with no training at all.

    python bench/probe_framing.py [--model smollm2-135m-instruct]

The base model answers the shipped general probes in the plain rendering (one user turn), under each of
eval/forgetting.py's STABILITY_SYSTEM_PROMPTS, and under one more neutral system prompt that is not among
them (HELD_OUT). Prints and writes to bench/results/probe_framing.json: the plain retention of each framing
(of the probes right in the plain rendering, the share still right with that framing: what the 5% flag
read as forgetting before), and, leaving each framing out in turn, the retention under it of the probes
right in every other framing (what stable retention expects of a harmless change).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
HELD_OUT = "You are an assistant. Be accurate and brief."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    from tunelab.engine.generate import DecodingSettings, generate
    from tunelab.eval.forgetting import (
        PROBE_MAX_NEW_TOKENS,
        STABILITY_SYSTEM_PROMPTS,
        general_probes,
        score_probe,
    )
    from tunelab.models import load_model, load_tokenizer

    tokenizer, model = load_tokenizer(args.model), load_model(args.model)
    probes = general_probes()
    settings = DecodingSettings(max_new_tokens=PROBE_MAX_NEW_TOKENS, seed=0)
    framings = {"plain": None, **{f"system-{i + 1}": s for i, s in enumerate(STABILITY_SYSTEM_PROMPTS)},
                "held-out": HELD_OUT}
    known: dict[str, list[bool]] = {}
    for name, system in framings.items():
        started = time.perf_counter()
        head = [{"role": "system", "content": system}] if system else []
        outputs = generate(model, tokenizer, [[*head, {"role": "user", "content": p.prompt}] for p in probes],
                           settings, args.batch_size)
        known[name] = [score_probe(p, o.text).known >= 1.0 for p, o in zip(probes, outputs, strict=True)]
        print(f"{name}: {sum(known[name])} of {len(probes)} right ({time.perf_counter() - started:.0f} s)", flush=True)

    def kept(base: list[bool], other: list[bool]) -> dict[str, float | int]:
        n = sum(base)
        k = sum(1 for b, o in zip(base, other, strict=True) if b and o)
        return {"kept": k, "n": n, "retention": k / n if n else float("nan")}

    plain_retention = {name: kept(known["plain"], known[name]) for name in framings if name != "plain"}
    leave_one_out = {}
    for left in framings:
        if left == "plain":
            continue
        others = [name for name in framings if name not in ("plain", left)]
        stable = [known["plain"][i] and all(known[o][i] for o in others) for i in range(len(probes))]
        leave_one_out[left] = kept(stable, known[left])
    stable_all = [known["plain"][i] and all(known[f"system-{j + 1}"][i] for j in range(len(STABILITY_SYSTEM_PROMPTS)))
                  for i in range(len(probes))]
    result = {"model": args.model, "probes": len(probes), "framings": framings,
              "right": {name: sum(v) for name, v in known.items()}, "stable_known": sum(stable_all),
              "plain_retention": plain_retention, "leave_one_out_stable_retention": leave_one_out,
              "held_out_stable_retention": kept(stable_all, known["held-out"]),
              "load_average": os.getloadavg()[0]}
    for name, row in plain_retention.items():
        print(f"plain retention under {name}: {row['kept']}/{row['n']} = {row['retention']:.1%}; stable, left out: "
              f"{leave_one_out[name]['kept']}/{leave_one_out[name]['n']} = {leave_one_out[name]['retention']:.1%}")
    out = HERE / "results" / "probe_framing.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"stable_known": result["stable_known"], "held_out": result["held_out_stable_retention"]}))


if __name__ == "__main__":
    main()

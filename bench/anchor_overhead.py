"""What the KL anchor on replay rows (train.anchor, train/anchor.py) costs a training step, in one process.

    python bench/anchor_overhead.py                                   # tiny-test
    python bench/anchor_overhead.py --model smollm2-135m-instruct     # the default model (team lock)

A step like routing's with auto replay: 4 rows of packed examples, --replay-share of the examples replay
examples (~85 tokens, ~45 of them the answer), the rest short task examples (~37 tokens, 5 trained).
The same batches go through the loss module's forward and backward, alternating anchor on / off step by
step (a machine that slows down weighs on both alike); the first --warmup pairs are not timed. Also the
one-time cost: the base model's top-k targets for --replay-examples replay examples, and the chunked loss
alone on the step's trained positions (the part the anchor changes), anchor off / on. Writes
bench/results/anchor_overhead.json (one row per model) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
RESULTS = Path(__file__).resolve().parent / "results" / "anchor_overhead.json"
IGNORE = -100


def _examples(rng: random.Random, vocab: int, replay_share: float, n: int) -> list[dict]:
    out = []
    for i in range(n):
        replay = i < round(replay_share * n)
        prompt, answer = (40, 45) if replay else (32, 5)
        ids = [rng.randrange(100, vocab) for _ in range(prompt + answer)]
        out.append({"id": f"{'replay' if replay else 'train'}-{i}", "input_ids": ids,
                    "labels": [IGNORE] * prompt + ids[prompt:]})
    return out


def _loss_only(setup, batch, repeats: int, warmup: int) -> tuple[float, float]:
    """The chunked loss alone (forward and its gradient) on the step's trained positions, anchor off / on
    alternating: the part of the step the anchor changes, whatever the model's size."""
    import torch

    from tunelab.train.loss import linear_cross_entropy

    module = setup.loss_module
    with torch.no_grad():
        hidden, head = module.hidden_states(batch.input_ids, batch.position_ids, batch.attention_mask, None, 0)
    trainable = batch.labels[:, 1:] != IGNORE
    selected, targets = hidden[:, :-1][trainable].float(), batch.labels[:, 1:][trainable]
    anchor = tuple(t[:, 1:][trainable] for t in (batch.anchor_ids, batch.anchor_logp, batch.anchor_coef))
    timings: dict[bool, list[float]] = {False: [], True: []}
    for i in range(repeats):
        for on in (False, True):
            h = selected.clone().requires_grad_(True)
            started = time.perf_counter()
            loss, _ = linear_cross_entropy(h, head.weight.float(), targets, anchor=anchor if on else None)
            loss.backward()
            if i >= warmup:
                timings[on].append(time.perf_counter() - started)
    return statistics.median(timings[False]), statistics.median(timings[True])


def main() -> None:
    import torch

    from tunelab.config import Recipe
    from tunelab.data.pack import collate, pack_rows
    from tunelab.train.anchor import attach_anchor
    from tunelab.train.setup import setup_training

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-test")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--replay-share", type=float, default=0.29)
    parser.add_argument("--replay-examples", type=int, default=48)
    args = parser.parse_args()
    torch.manual_seed(0)
    recipe = Recipe(model={"name": args.model})
    setup = setup_training(recipe, args.steps, "cpu")
    vocab = setup.model.get_output_embeddings().weight.shape[0]
    rng = random.Random(0)

    pool = _examples(rng, vocab, 1.0, args.replay_examples)
    started = time.perf_counter()
    attach_anchor(setup, recipe, pool, 0)
    targets_s = time.perf_counter() - started

    step_examples = _examples(rng, vocab, args.replay_share, 14)
    attach_anchor(setup, recipe, step_examples, 0)
    plain = [{k: v for k, v in e.items() if not k.startswith("anchor")} for e in step_examples]
    rows = pack_rows([len(e["input_ids"]) for e in step_examples], 256)
    timings: dict[str, list[float]] = {"on": [], "off": []}
    setup.model.train()
    for step in range(args.warmup + args.steps):
        for which, examples in (("off", plain), ("on", step_examples)):
            batch = collate(examples, rows, 0)
            started = time.perf_counter()
            out = setup.loss_module(**batch.model_inputs())
            out.loss_sum.backward()
            elapsed = time.perf_counter() - started
            setup.optimizer.zero_grad(set_to_none=True)
            if step >= args.warmup:
                timings[which].append(elapsed)
    on, off = statistics.median(timings["on"]), statistics.median(timings["off"])
    loss_off, loss_on = _loss_only(setup, collate(step_examples, rows, 0), args.warmup + args.steps, args.warmup)
    row = {"model": args.model, "step_s_anchor_off": round(off, 4), "step_s_anchor_on": round(on, 4),
           "step_time_ratio": round(on / off, 3), "loss_s_anchor_off": round(loss_off, 4),
           "loss_s_anchor_on": round(loss_on, 4), "loss_time_ratio": round(loss_on / loss_off, 3),
           "replay_share": args.replay_share, "steps": args.steps,
           "targets_s": round(targets_s, 2), "targets_examples": args.replay_examples,
           "load_average_1m": round(os.getloadavg()[0], 2), "machine": platform.machine(),
           "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    rows_out = json.loads(RESULTS.read_text())["rows"] if RESULTS.is_file() else []
    rows_out = [r for r in rows_out if r["model"] != args.model] + [row]
    RESULTS.write_text(json.dumps({"rows": rows_out}, indent=1) + "\n")
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()

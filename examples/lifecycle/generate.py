"""The lifecycle case: support tickets routed to a department, where the shop's catalogue changes.

Writes OpenAI chat JSONL to examples/lifecycle/data/ (or --out), seeded (nothing is downloaded;
the same seed writes the same bytes):
  train.jsonl (400), valid.jsonl (50), test.jsonl (100)   the catalogue the first fine-tune knew
  new.jsonl (240)   labelled tickets from later: half about products that were not sold before
                    (two of them go to a department that did not exist), half about the old
                    products in new words (slang and brand-style names)
  new.slices.jsonl  {"line", "slice"} per new.jsonl line: "new_product" or "new_wording"

Each example: a short customer message -> the department, one word:

    computing (laptop, desktop, monitor)   mobile (phone, tablet, smartwatch)
    audio (headphones, speaker)            print (printer, scanner)
    later, new products: home (robot vacuum, smart bulb), mobility (e-bike, e-scooter),
                         audio (soundbar), computing (mini pc)

The department is not a word of the message, so a model cannot copy it: it must have learned which
product goes where. A fine-tune of the old data therefore goes stale on new.jsonl (drift), and an
update with part of new.jsonl should recover it (examples/lifecycle/run.sh; docs/lifecycle.md).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SYSTEM_PROMPT = "Route the support ticket to a department. Reply with the department name only."
OLD_PRODUCTS = {
    "laptop": ("computing", ("laptop", "notebook")), "desktop": ("computing", ("desktop", "desktop pc")),
    "monitor": ("computing", ("monitor", "screen")), "phone": ("mobile", ("phone", "smartphone")),
    "tablet": ("mobile", ("tablet", "ipad-style tablet")), "smartwatch": ("mobile", ("smartwatch", "fitness watch")),
    "headphones": ("audio", ("headphones", "earbuds")), "speaker": ("audio", ("speaker", "bluetooth speaker")),
    "printer": ("print", ("printer", "inkjet")), "scanner": ("print", ("scanner", "document scanner")),
}
# the old products in words the old data never used
NEW_WORDS = {
    "laptop": ("lappy", "ultrabook"), "desktop": ("tower", "gaming rig"), "monitor": ("display panel", "ultrawide"),
    "phone": ("mobile handset", "flip phone"), "tablet": ("slate", "e-reader"), "smartwatch": ("wrist tracker", "smart band"),
    "headphones": ("cans", "noise cancellers"), "speaker": ("boombox", "party speaker"),
    "printer": ("laser printer", "all-in-one"), "scanner": ("photo scanner", "flatbed"),
}
NEW_PRODUCTS = {
    "robot vacuum": ("home", ("robot vacuum", "robovac")), "smart bulb": ("home", ("smart bulb", "wifi bulb")),
    "e-bike": ("mobility", ("e-bike", "electric bike")), "e-scooter": ("mobility", ("e-scooter", "electric scooter")),
    "soundbar": ("audio", ("soundbar", "tv soundbar")), "mini pc": ("computing", ("mini pc", "nuc")),
}
PROBLEMS = (
    "My {p} stopped working yesterday.", "the {p} won't charge anymore", "I need help setting up my new {p}.",
    "My {p} keeps freezing.", "Can you repair the {p}? It was dropped.", "the {p} arrived with a crack",
    "How do I update the software on my {p}?", "my {p} makes a strange noise", "The {p} does not connect to anything.",
    "I want to exchange my {p} for another model.",
)
OPENERS = ("", "", "Hi, ", "Hello, ", "Hey - ", "Good morning. ")
CLOSERS = ("", "", " Thanks.", " Thank you!", " Please help.", " Regards, Sam")
SIZES = {"train": 400, "valid": 50, "test": 100}
NEW_SIZE = 240


def _ticket(rng: random.Random, words: tuple[str, ...]) -> str:
    text = rng.choice(OPENERS) + rng.choice(PROBLEMS).format(p=rng.choice(words)) + rng.choice(CLOSERS)
    return text.lower() if rng.random() < 0.15 else text


def _record(text: str, department: str) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text},
                         {"role": "assistant", "content": department}]}


def generate(seed: int = 0) -> dict[str, list[tuple[str, dict]]]:
    """{file: [(slice, record)]}; no message text occurs twice across all files."""
    rng = random.Random(seed)
    seen: set[str] = set()

    def draw(slice_name: str) -> tuple[str, dict]:
        while True:
            if slice_name == "new_product":
                department, words = NEW_PRODUCTS[rng.choice(sorted(NEW_PRODUCTS))]
            else:
                product = rng.choice(sorted(OLD_PRODUCTS))
                department, words = OLD_PRODUCTS[product]
                words = NEW_WORDS[product] if slice_name == "new_wording" else words
            text = _ticket(rng, words)
            if text.lower() not in seen:
                seen.add(text.lower())
                return slice_name, _record(text, department)

    files = {name: [draw("old") for _ in range(size)] for name, size in SIZES.items()}
    new = [draw("new_product") for _ in range(NEW_SIZE // 2)] + [draw("new_wording") for _ in range(NEW_SIZE // 2)]
    rng.shuffle(new)
    files["new"] = new
    return files


def write_files(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    files = generate(seed)
    for name, rows in files.items():
        written[name] = out_dir / f"{name}.jsonl"
        written[name].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for _, r in rows), encoding="utf-8")
    slices = out_dir / "new.slices.jsonl"
    slices.write_text("".join(json.dumps({"line": i, "slice": s}) + "\n" for i, (s, _) in enumerate(files["new"], start=1)),
                      encoding="utf-8")
    written["new.slices"] = slices
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name, path in write_files(args.out, args.seed).items():
        print(f"{name:<11} {sum(1 for _ in path.open(encoding='utf-8')):>5} lines  {path}")


if __name__ == "__main__":
    main()

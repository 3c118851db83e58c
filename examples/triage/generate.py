"""The demo task: support-ticket triage, generated from a seed (nothing is downloaded).

Writes OpenAI chat JSONL to examples/triage/data/ (or --out): train.jsonl (800), valid.jsonl (100),
test.jsonl (200), and test.slices.jsonl (one {"line", "slice", "template", "combo"} per test line,
so a report can tell learning from memorising). Re-running with the same seed reproduces every
file byte for byte (tests/test_examples.py checks the committed files).

Each example is a short, noisy customer message -> one line of compact JSON, keys in this order:

    {"category":C,"urgency":U,"order_id":"12345" or null,"product":P or null}

    category  billing | delivery | return | technical | account
    urgency   high (explicit urgency or anger) | low (explicitly not urgent) | medium (otherwise)
    order_id  the 5 digits of the order number however it is written (#48213, ORD-48213, order no.
              48213), as a string; null when the message has no order number
    product   laptop | phone | tablet | headphones | smartwatch | router | printer | camera: the
              product the problem is about (not another product mentioned in passing, not an email
              signature such as "Sent from my phone"); null when no product is concerned

Held out from train and valid, so the test set measures generalisation rather than recall:
  - one phrasing ("template") per category appears only in test (slice "new_template");
  - four (category, product) combinations appear only in test (slice "new_combo");
  - the rest of test uses seen templates and combinations with new slot values (slice "seen").
Test lines are shuffled so that any prefix (eval.limit) mixes the three slices.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

CATEGORIES = ("billing", "delivery", "return", "technical", "account")
URGENCIES = ("low", "medium", "high")
PRODUCTS = ("laptop", "phone", "tablet", "headphones", "smartwatch", "router", "printer", "camera")
KEYS = ("category", "urgency", "order_id", "product")
SYSTEM_PROMPT = "Triage the ticket. Reply with JSON only."
SPLIT_SIZES = {"train": 800, "valid": 100, "test": 200}
TEST_SLICE_SIZES = {"seen": 100, "new_combo": 50, "new_template": 50}
HELD_OUT_COMBOS = (("billing", "camera"), ("delivery", "printer"), ("return", "router"), ("technical", "headphones"))

# How customers name each product (the label is always the canonical name).
PRODUCT_WORDS = {
    "laptop": ("laptop", "notebook", "laptop"),
    "phone": ("phone", "smartphone", "mobile"),
    "tablet": ("tablet", "tablet", "tab"),
    "headphones": ("headphones", "earbuds", "headset"),
    "smartwatch": ("smartwatch", "smart watch", "watch"),
    "router": ("router", "wifi router", "router"),
    "printer": ("printer", "inkjet printer", "printer"),
    "camera": ("camera", "digital camera", "camera"),
}

# Problem sentences per category; {p} is the product concerned, {p2} another product that is not.
# The last template of each category is held out (test only). A template without {p} has product null.
TEMPLATES = {
    "billing": (
        "I was charged twice for my {p}.",
        "the invoice for the {p} shows the wrong amount",
        "My card was billed but the payment shows as failed.",
        "The discount code didn't apply when I bought the {p}.",
        "can I get a copy of the invoice for my {p}?",
        "why does my bank statement show two payments for the {p}??",
    ),
    "delivery": (
        "My {p} still hasn't arrived.",
        "tracking for the {p} has been stuck for a week",
        "The courier says the {p} was delivered but I never got it.",
        "I need to change the delivery address for my {p}.",
        "I ordered a {p} and a {p2} but only the {p2} came.",
        "where is my {p}? it was supposed to be here days ago",
    ),
    "return": (
        "I want to return the {p}, it doesn't suit me.",
        "how do I send back the {p}?",
        "The {p} arrived damaged and I want a refund.",
        "I returned the {p} two weeks ago and still no refund.",
        "Can I exchange the {p} for a different colour?",
        "the {p} is not what I expected, can I get my money back?",
    ),
    "technical": (
        "My {p} won't turn on.",
        "the {p} keeps disconnecting from the wifi",
        "Battery on the {p} drains in an hour.",
        "After the update my {p} keeps restarting.",
        "The screen of the {p} flickers, my {p2} works fine though.",
        "the {p} makes a buzzing noise and then shuts off",
    ),
    "account": (
        "I can't log in to my account.",
        "Please reset my password, the reset email never arrives.",
        "How do I change the email address on my account?",
        "Please delete my account and all my data.",
        "I'm not getting the two-factor codes anymore.",
        "my account got locked after I typed the wrong password",
    ),
}

# Templates that only make sense for some products ("the screen of the headphones" does not).
TEMPLATE_PRODUCTS = {
    ("technical", 1): ("laptop", "phone", "tablet", "smartwatch", "router", "printer", "camera"),
    ("technical", 2): ("laptop", "phone", "tablet", "headphones", "smartwatch", "camera"),
    ("technical", 4): ("laptop", "phone", "tablet", "smartwatch", "camera"),
}

DETAILS = {
    "billing": ("My bank shows both payments.", "I paid by credit card.", "It was a gift."),
    "delivery": ("I paid for express shipping.", "The tracking page shows no updates.", "I was home all day."),
    "return": ("It's still in the original box.", "I have the receipt.", "I used it only once."),
    "technical": ("I already tried restarting it.", "It's only two months old.", "I updated it yesterday."),
    "account": ("I've tried three times.", "I use the same email as always.", "It worked last week."),
}
# Mentions another product that is not the one concerned (the label must ignore it).
OTHER_PRODUCT_DETAILS = ("I also got a {p2} from you and it's great.", "(the {p2} from that order is fine)")
GREETINGS = ("Hi,", "Hello,", "Hey", "Dear support,", "Good morning,", "hi there")
CLOSINGS = ("Thanks.", "Thank you!", "thx", "Regards, Sam", "Cheers", "Best, Alex")
# Account tickets name the account instead of an order (and so differ from one another).
ACCOUNT_IDS = ("My username is {name}{n}.", "Email: {name}.{n}@example.com", "(account {name}_{n})")
NAMES = ("sam", "alex", "maria", "jo", "li", "priya", "tom", "nina", "omar", "kate")
SIGNATURES = ("Sent from my phone", "Sent from my tablet")
URGENCY_CUES = {
    "high": (
        "This is urgent!", "I need this fixed today.", "ASAP please!!",
        "I need it for work tomorrow, please hurry.", "Third time I'm writing about this!",
        "Completely unacceptable, sort it out now.",
    ),
    "medium": ("", "", "Could you look into it this week?", "Please get back to me soon.", "Let me know what to do."),
    "low": ("No rush.", "Whenever you get a chance.", "Not urgent at all.", "Just wanted to let you know.",
            "It's a minor thing."),
}
ORDER_PREFIXES = ("Order #{id}: ", "Re order {id} - ", "ORD-{id}: ", "order no. {id}. ")
ORDER_SUFFIXES = (" Order #{id}.", " (order {id})", " My order number is {id}.", " Ref ORD-{id}.", " order {id}")
ORDER_ID_PROBABILITY = {"billing": 0.7, "delivery": 0.85, "return": 0.85, "technical": 0.5, "account": 0.1}


@dataclass(frozen=True)
class Example:
    text: str
    answer: dict
    template: str  # "<category>/<index>"
    held_out_template: bool
    held_out_combo: bool

    def record(self) -> dict:
        return {"messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": self.text},
            {"role": "assistant", "content": answer_json(self.answer)},
        ]}


def answer_json(answer: dict) -> str:
    """Compact JSON with the fixed key order: the exact string the model must produce."""
    return json.dumps({key: answer[key] for key in KEYS}, separators=(",", ":"))


def _typo(word: str, rng: random.Random) -> str:
    if len(word) < 4 or not word.isalpha():
        return word
    i = rng.randrange(1, len(word) - 2)
    if rng.random() < 0.5:  # swap two neighbours
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    return word[:i] + word[i + 1 :]  # drop one letter


def _add_noise(text: str, rng: random.Random) -> str:
    if rng.random() < 0.35:
        words = text.split(" ")
        text = " ".join(_typo(w, rng) if rng.random() < 0.12 else w for w in words)
    if rng.random() < 0.15:
        text = text.lower()
    if rng.random() < 0.05:
        text = text.replace(".", "").replace(",", "")
    return text


def make_example(rng: random.Random, category: str, template_index: int, product: str | None) -> Example:
    """One ticket of `category` written with template `template_index` about `product`."""
    template = TEMPLATES[category][template_index]
    if "{p}" not in template:
        product = None
    others = [p for p in PRODUCTS if p != product]
    second = rng.choice(others)
    sentence = template.format(p=rng.choice(PRODUCT_WORDS[product]) if product else "",
                               p2=rng.choice(PRODUCT_WORDS[second]))
    urgency = rng.choice(URGENCIES)
    order_id = str(rng.randrange(10000, 100000)) if rng.random() < ORDER_ID_PROBABILITY[category] else None

    parts = []
    has_greeting = rng.random() < 0.3
    if has_greeting:
        parts.append(rng.choice(GREETINGS))
    if order_id and rng.random() < 0.4:
        sentence = rng.choice(ORDER_PREFIXES).format(id=order_id) + sentence
    elif order_id:
        sentence = sentence + rng.choice(ORDER_SUFFIXES).format(id=order_id)
    parts.append(sentence)
    if product and "{p2}" not in template and rng.random() < 0.15:
        parts.append(rng.choice(OTHER_PRODUCT_DETAILS).format(p2=rng.choice(PRODUCT_WORDS[second])))
    elif rng.random() < 0.3:
        parts.append(rng.choice(DETAILS[category]))
    if category == "account" and rng.random() < 0.7:
        parts.append(rng.choice(ACCOUNT_IDS).format(name=rng.choice(NAMES), n=rng.randrange(1, 100)))
    cue = rng.choice(URGENCY_CUES[urgency])
    if cue:  # after the greeting, if any
        parts.insert(len(parts) if rng.random() < 0.7 else int(has_greeting), cue)
    if rng.random() < 0.25:
        parts.append(rng.choice(CLOSINGS))
    text = _add_noise(" ".join(parts), rng)
    if rng.random() < 0.06:
        text += "\n" + rng.choice(SIGNATURES)
    answer = {"category": category, "urgency": urgency, "order_id": order_id, "product": product}
    held_out_template = template_index == len(TEMPLATES[category]) - 1
    return Example(text, answer, f"{category}/{template_index}", held_out_template,
                   (category, product) in HELD_OUT_COMBOS)


def _draw(rng: random.Random, slice_name: str) -> Example:
    """An example of a slice: 'seen' (what train/valid are made of), 'new_combo' or 'new_template'."""
    if slice_name == "new_combo":
        category, product = rng.choice(HELD_OUT_COMBOS)
        indexes = [i for i, t in enumerate(TEMPLATES[category][:-1])
                   if "{p}" in t and product in TEMPLATE_PRODUCTS.get((category, i), PRODUCTS)]
        return make_example(rng, category, rng.choice(indexes), product)
    category = rng.choice(CATEGORIES)
    last = len(TEMPLATES[category]) - 1
    index = last if slice_name == "new_template" else rng.randrange(last)
    allowed = [p for p in TEMPLATE_PRODUCTS.get((category, index), PRODUCTS) if (category, p) not in HELD_OUT_COMBOS]
    return make_example(rng, category, index, rng.choice(allowed))


def generate_splits(seed: int = 0) -> dict[str, list[tuple[str, Example]]]:
    """{split: [(slice, example)]}; no message text occurs twice across all splits."""
    rng = random.Random(seed)
    seen_texts: set[str] = set()
    plan = {"train": [("seen", SPLIT_SIZES["train"])], "valid": [("seen", SPLIT_SIZES["valid"])],
            "test": list(TEST_SLICE_SIZES.items())}
    splits: dict[str, list[tuple[str, Example]]] = {}
    for split, parts in plan.items():
        rows = []
        for slice_name, count in parts:
            made = 0
            while made < count:
                example = _draw(rng, slice_name)
                if example.text.lower() in seen_texts:
                    continue
                seen_texts.add(example.text.lower())
                rows.append((slice_name, example))
                made += 1
        rng.shuffle(rows)
        splits[split] = rows
    return splits


def write_splits(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    splits = generate_splits(seed)
    for split, rows in splits.items():
        path = out_dir / f"{split}.jsonl"
        with path.open("w", encoding="utf-8", newline="\n") as f:
            for _, example in rows:
                f.write(json.dumps(example.record(), ensure_ascii=False) + "\n")
        written[split] = path
    slices = out_dir / "test.slices.jsonl"
    with slices.open("w", encoding="utf-8", newline="\n") as f:
        for line, (slice_name, example) in enumerate(splits["test"], start=1):
            combo = f"{example.answer['category']}/{example.answer['product']}"
            f.write(json.dumps({"line": line, "slice": slice_name, "template": example.template,
                                "combo": combo}) + "\n")
    written["test.slices"] = slices
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name, path in write_splits(args.out, args.seed).items():
        print(f"{name:<12} {sum(1 for _ in path.open(encoding='utf-8')):>5} lines  {path}")


if __name__ == "__main__":
    main()

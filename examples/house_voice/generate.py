"""A free-text task scored by a grader: support replies that must follow a house voice.

Writes OpenAI chat JSONL to examples/house_voice/data/ (or --out): train.jsonl (480), valid.jsonl
(60), test.jsonl (120). Re-running with the same seed reproduces every file byte for byte.

Each example is a customer message (one of six topics, a signature, an order number written in
several ways, sometimes a Club membership or frustration, some noise) -> a short reply (25-55 words)
in the house voice. Eight rules, three of them conditional on details of the message:

    1. greeting   "Dear <first> <last>," when the customer signs with their full name, else
                  "Hi <first>," (the first line, exactly)
    2. patience   a frustrated customer (an exclamation mark, "frustrating", "again", ...) gets
                  "Thank you for your patience." to open the second line; nobody else gets it
    3. club       a Club member (the message says so) is told "Club members get free express
                  shipping."; nobody else hears of the Club
    4. reference  the reply quotes the case reference "HV-<the order's 5 digits>"
    5. next step  the topic's next step is named: tracking (late), refund, replacement (damaged),
                  reset link (login), invoice (billing), cancelled (cancel)
    6. words      none of: sorry, apologise/apologize, unfortunately, inconvenience, ASAP; no "!"
    7. length     at most 60 words
    8. sign-off   the last line is exactly "Warm regards, Brightside Support"

Every record carries the facts a grader needs as extra keys beside its messages (kept by `tunelab
data prepare`, read by graders as item.<key>): greeting, ref, topic, must_mention, frustrated, club.
The recipe's python grader gives an eighth of a point per rule. Replies are free text: several
phrasings per topic, so word overlap with the reference is a poor measure of the voice. The
conditional rules hang on details that do not make two messages look alike (a signature, a clause),
so the most similar training examples (what retrieval shows a prompt) often follow the other branch.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SYSTEM_PROMPT = "You are Brightside Support. Reply to the customer."
SIGN_OFF = "Warm regards, Brightside Support"
PATIENCE = "Thank you for your patience."
CLUB_PERK = "Club members get free express shipping."
SPLIT_SIZES = {"train": 480, "valid": 60, "test": 120}
FIRST_NAMES = ("Anna", "Ben", "Carla", "Dmitri", "Elif", "Farah", "Goran", "Hana", "Ivo", "Jonas", "Keiko", "Luis",
               "Mira", "Nils", "Olga", "Priya", "Rafael", "Sofia", "Tomas", "Una", "Victor", "Wen", "Yusuf", "Zoe")
LAST_NAMES = ("Berg", "Costa", "Diaz", "Eriksen", "Fischer", "Horvat", "Ivanova", "Kim", "Laine", "Moreau", "Novak",
              "Okafor", "Petrov", "Rossi", "Silva", "Tanaka")
ITEMS = ("blender", "desk lamp", "backpack", "kettle", "rain jacket", "coffee grinder", "yoga mat", "headphones",
         "phone case", "toaster")
MUST_MENTION = {"late": "tracking", "refund": "refund", "damaged": "replacement", "login": "reset link",
                "billing": "invoice", "cancel": "cancelled"}

# {item} {order} are filled in; openers/closers add the noise customers write
COMPLAINTS = {
    "late": ["My {item} ({order}) was supposed to arrive last week and it still isn't here.",
             "Where is my {item}? {order} shows no movement for days.",
             "Still waiting on {order}, the {item}. It is taking long."],
    "refund": ["I sent the {item} back two weeks ago ({order}) and have not seen my money.",
               "Can I get my money back for the {item}? It's {order}.",
               "Returned {order} ({item}) and still no refund."],
    "damaged": ["The {item} from {order} arrived with a cracked base.",
                "My {item} came broken, {order}. The box was crushed.",
                "Opened {order} today and the {item} is damaged."],
    "login": ["I can't log in to check {order}, the password doesn't work.",
              "Locked out of my account, need to see my {item} order {order}.",
              "Password reset email never came. I want to check {order}."],
    "billing": ["I was charged twice for the {item} ({order}).",
                "The amount on my card for {order} is wrong, the {item} was on sale.",
                "Why did you bill me for {order} twice? I only bought one {item}."],
    "cancel": ["Please cancel {order}, I ordered the wrong {item}.",
               "I don't need the {item} anymore, cancel {order} please.",
               "Cancel my order {order} for the {item} before it ships."],
}
OPENERS = ("", "Hello, ", "Hi there. ", "Good morning. ", "Hey, ", "Sorry to bother you, ", "Quick question. ")
CLOSERS = ("", " Thanks.", " Please help.", " Any update?", " Thank you in advance.")
FRUSTRATION = (" This is frustrating.", " I am writing again about this!", " Really annoyed now.",
               " Second time I ask!!", " Not happy at all!")
CLUB = (" I'm a Brightside Club member.", " (Club member)", " I have a Brightside Club card.",
        " Club member here.")
FULL_NAME_SIGNATURES = ("\n\n- {first} {last}", "\n\n{first} {last}", " Regards, {first} {last}")
FIRST_NAME_SIGNATURES = ("\n\nThanks, {first}", "\n\nBest, {first}", "\n\n{first}")
ORDER_FORMS = ("order #{d}", "order {d}", "ORD-{d}", "order no. {d}", "#{d}")

# the body between greeting and sign-off: two sentences, the reference in one of them
REPLIES = {
    "late": ["Your {item} is on its way and the new tracking link is in your inbox. Your case reference is {ref}.",
             "I checked {ref}: the {item} left our warehouse yesterday. You can follow it with the tracking link "
             "we just emailed.",
             "Thanks for waiting for the {item}. We sent fresh tracking details for {ref}, and it should "
             "reach you within three days."],
    "refund": ["We received the {item} and your refund is on its way. It reaches your card within five working "
               "days, case {ref}.",
               "Your refund for the {item} is approved under {ref}. Expect it on your statement within five days.",
               "Good news: the {item} is back with us and we issued your refund today. Your reference is {ref}."],
    "damaged": ["Thanks for telling us about the {item}. A replacement ships today at no cost, case {ref}.",
                "We are sending a replacement {item} right away under {ref}. Keep the damaged one, no need to "
                "return it.",
                "A new {item} is on the way as a replacement. Your case reference is {ref}."],
    "login": ["We sent a reset link to the email on your account. After you sign in you can check your {item} "
              "order, case {ref}.",
              "A fresh reset link is in your inbox now, valid for one hour. Your reference is {ref}.",
              "Please use the reset link we just emailed to set a new password. Your order is safe under {ref}."],
    "billing": ["You were charged once for the {item}; the second charge is reversed and a corrected invoice is in "
                "your inbox, case {ref}.",
                "We corrected the price of the {item} and emailed a new invoice. The difference returns to your "
                "card, reference {ref}.",
                "The extra charge is reversed. You will find the updated invoice for {ref} in your email."],
    "cancel": ["Your order for the {item} is cancelled and you will not be charged. Your reference is {ref}.",
               "Done: {ref} is cancelled before shipping. The payment hold on your card is released.",
               "We cancelled the {item} order under {ref}. Nothing will ship and nothing is charged."],
}


def _noise(text: str, rng: random.Random) -> str:
    """A dropped letter or a lower-cased start now and then, as customers type."""
    if rng.random() < 0.3:
        words = text.split(" ")
        i = rng.randrange(len(words))
        if len(words[i]) > 4 and words[i].isalpha():
            j = rng.randrange(1, len(words[i]) - 1)
            words[i] = words[i][:j] + words[i][j + 1:]
        text = " ".join(words)
    if rng.random() < 0.2:
        text = text[0].lower() + text[1:]
    return text


def make_record(rng: random.Random) -> dict:
    topic = rng.choice(sorted(COMPLAINTS))
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    item = rng.choice(ITEMS)
    digits = f"{rng.randrange(10000, 100000)}"
    order = rng.choice(ORDER_FORMS).format(d=digits)
    frustrated, club, full_name = rng.random() < 0.4, rng.random() < 0.35, rng.random() < 0.5
    message = _noise(rng.choice(OPENERS) + rng.choice(COMPLAINTS[topic]).format(item=item, order=order), rng)
    clauses = [rng.choice(FRUSTRATION)] * frustrated + [rng.choice(CLUB)] * club + [rng.choice(CLOSERS)]
    rng.shuffle(clauses)
    message += "".join(clauses)
    message += rng.choice(FULL_NAME_SIGNATURES if full_name else FIRST_NAME_SIGNATURES).format(first=first, last=last)
    ref = f"HV-{digits}"
    greeting = f"Dear {first} {last}," if full_name else f"Hi {first},"
    body = rng.choice(REPLIES[topic]).format(item=item, ref=ref)
    body = " ".join([PATIENCE] * frustrated + [body] + [CLUB_PERK] * club)
    reply = f"{greeting}\n{body}\n{SIGN_OFF}"
    return {
        "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": message},
                     {"role": "assistant", "content": reply}],
        "greeting": greeting, "ref": ref, "topic": topic, "must_mention": MUST_MENTION[topic],
        "frustrated": frustrated, "club": club,
    }


def make_splits(seed: int = 0) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for split, size in SPLIT_SIZES.items():
        rows: list[dict] = []
        while len(rows) < size:
            record = make_record(rng)
            key = record["messages"][1]["content"]
            if key in seen:  # no message twice, across splits too: test measures generalisation
                continue
            seen.add(key)
            rows.append(record)
        splits[split] = rows
    return splits


def write_splits(out: Path, seed: int = 0) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in make_splits(seed).items():
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                            encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_splits(args.out, args.seed)
    print(f"wrote {', '.join(f'{s} {n}' for s, n in SPLIT_SIZES.items())} examples to {args.out}")


if __name__ == "__main__":
    main()

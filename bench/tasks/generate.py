"""Small held-out chat tasks like users' own, to check that default settings give an honest verdict.

    python bench/tasks/generate.py            # writes bench/tasks/<task>/{train,test}.jsonl + recipe.yaml
    tunelab run bench/tasks/dates/recipe.yaml # a recipe with model, data and eval only: every train key auto

Five shapes and sizes, none of which the base model can do zero-shot (each asks for a convention it
cannot guess): short normalised answers (dates, 600), nested JSON (orders, 300), labels with made-up
codes (routing, 150), longer messages to four priorities by a house rule with no system prompt
(priority, 300), and free text in a house voice with facts from a table (replies, 1000). Seeded;
nothing is downloaded. The data are not committed: run this script first.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
NAMES = ["Ana", "Ben", "Chloe", "Dev", "Elif", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kofi", "Lena", "Mateo",
         "Nora", "Omar", "Pia", "Quinn", "Rosa", "Sami", "Tara", "Uma", "Victor", "Wen", "Yara", "Zoe"]


def _ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def dates(rng: random.Random) -> dict:
    """A sentence with a date written in one of many styles -> the date as YYYY-MM-DD (day-first
    numerals, two-digit years in 2000-2039)."""
    frames = ["Let's meet on {d}.", "The invoice is due {d}, please pay on time.", "I was born on {d}.",
              "Delivery expected {d} according to the tracking page.", "Can we move the call to {d}?",
              "Our office closes for inventory on {d}.", "The contract started {d} and runs a year.",
              "Reminder: dentist appointment {d} at 9.", "Flight leaves {d}, gate B12.", "Payment received {d}, thanks!"]

    def example() -> tuple[str, str]:
        year, month, day = rng.randint(1990, 2039), rng.randint(1, 12), rng.randint(1, 28)
        styles = [
            f"{MONTHS[month - 1]} {_ordinal(day)}, {year}", f"the {_ordinal(day)} of {MONTHS[month - 1]} {year}",
            f"{day:02d}/{month:02d}/{year}", f"{day}.{month}.{year}", f"{MONTHS[month - 1][:3]} {day} {year}",
            f"{day} {MONTHS[month - 1]} '{year % 100:02d}" if year >= 2000 else f"{day} {MONTHS[month - 1]} {year}",
            f"{year}/{month}/{day}",
        ]
        return rng.choice(frames).format(d=rng.choice(styles)), f"{year:04d}-{month:02d}-{day:02d}"

    return {"system": "Normalise the date in the message.", "n_train": 600, "example": example,
            "instructions": "Reply with the date mentioned in the message as YYYY-MM-DD and nothing else. Numeric "
                            "dates like 03/04/2021 or 3.4.2021 are day first; two-digit years like '21 are 2021.",
            "max_new_tokens": 16}


def orders(rng: random.Random) -> dict:
    """A free-text order -> JSON with a list of items (product, size, colour, quantity)."""
    products = ["hoodie", "t-shirt", "cap", "jacket", "sock pack", "scarf"]
    sizes = {"small": "S", "medium": "M", "large": "L", "extra large": "XL"}
    colors = ["black", "white", "navy", "red", "green", "grey"]
    words = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
    openers = ["Hi, I'd like", "Please send me", "Order for our team:", "Could I get", "I want to buy", "Add to my order:"]

    def example() -> tuple[str, str]:
        items = []
        for _ in range(rng.choice([1, 1, 2, 2, 3])):
            qty, size, color, product = rng.randint(1, 5), rng.choice(list(sizes)), rng.choice(colors), rng.choice(products)
            items.append((qty, size, color, product))
        parts = [f"{rng.choice([str(q), words[q]])} {s} {c} {p}{'s' if q > 1 and not p.endswith('pack') else ''}"
                 for q, s, c, p in items]
        text = f"{rng.choice(openers)} {', '.join(parts[:-1]) + ' and ' + parts[-1] if len(parts) > 1 else parts[0]}."
        answer = {"items": [{"product": p, "size": sizes[s], "color": c, "qty": q} for q, s, c, p in items]}
        return text, json.dumps(answer, separators=(",", ":"))

    return {"system": "Extract the order.", "n_train": 300, "example": example,
            "instructions": 'Reply with one line of JSON: {"items":[{"product":...,"size":"S|M|L|XL","color":...,"qty":N}]}, '
                            "one entry per product in the order they are written, quantities as numbers.",
            "max_new_tokens": 96}


def routing(rng: random.Random) -> dict:
    """A support message -> one of five made-up team codes."""
    teams = {
        "Q7-NET": ["my wifi keeps dropping", "the router light is red", "no internet since this morning",
                   "the connection is very slow at night", "I can't connect my laptop to the network"],
        "Q7-PAY": ["I was charged twice", "my card was declined", "the invoice amount is wrong",
                   "please refund the duplicate payment", "I need a receipt for my last payment"],
        "Q7-HW": ["the screen is cracked", "the battery dies in an hour", "it makes a clicking noise",
                  "the power button is stuck", "the charger got very hot"],
        "Q7-ACC": ["I forgot my password", "please change my email address", "my account is locked",
                   "I never got the two-factor code", "delete my account please"],
        "Q7-SHIP": ["my parcel is late", "the tracking has not moved in days", "it was delivered to the wrong address",
                    "can I change the delivery date", "the box arrived empty"],
    }
    starts = ["Hello,", "Hi team,", "Good morning.", "Hey!", "Dear support,", ""]
    ends = ["Thanks.", "Please help.", "Regards, {n}", "Any update?", "", "Cheers"]

    def example() -> tuple[str, str]:
        code = rng.choice(list(teams))
        text = " ".join(p for p in (rng.choice(starts), rng.choice(teams[code]).capitalize() + ".",
                                    rng.choice(ends).format(n=rng.choice(NAMES))) if p)
        return text, code

    return {"system": "Route the message.", "n_train": 150, "example": example,
            "instructions": "Reply with the team code only: Q7-NET (internet, wifi, router), Q7-PAY (charges, "
                            "payments, invoices, refunds), Q7-HW (broken or faulty devices), Q7-ACC (login, "
                            "password, email, account), Q7-SHIP (parcels, delivery, tracking).",
            "max_new_tokens": 8}


def replies(rng: random.Random) -> dict:
    """A customer question -> a reply in the house voice with the fact from a table: 'Hi NAME!',
    one sentence with the answer, 'Cheers, the Kite team'."""
    hours = {"Lisbon": "9am to 6pm", "Oslo": "10am to 5pm", "Denver": "8am to 8pm", "Kyoto": "11am to 7pm",
             "Nairobi": "8am to 4pm", "Quito": "9am to 9pm"}
    returns = {"shoes": 30, "jackets": 60, "bags": 14, "watches": 90, "hats": 7, "gloves": 21}
    asks_hours = ["When is the {c} store open?", "what are your opening hours in {c}", "Is the {c} shop open now? What hours?",
                  "hours for {c} please", "Until when can I visit you in {c}?"]
    asks_returns = ["How long do I have to return {p}?", "can i still send back {p} i bought last week",
                    "What's the return window for {p}?", "return policy for {p}?", "Do you take back {p}?"]

    def example() -> tuple[str, str]:
        name = rng.choice(NAMES)
        sign = rng.choice(["", f" - {name}", f" Thanks, {name}", f" ({name})"])
        if rng.random() < 0.5:
            city = rng.choice(list(hours))
            question = rng.choice(asks_hours).format(c=city) + sign
            fact = f"our {city} store is open {hours[city]}, every day of the week."
        else:
            product = rng.choice(list(returns))
            question = rng.choice(asks_returns).format(p=product) + sign
            fact = f"you can return {product} within {returns[product]} days of delivery, free of charge."
        greeting = f"Hi {name}!" if sign else "Hi there!"
        return question, f"{greeting} Good news: {fact} Cheers, the Kite team"

    return {"system": "You answer customer questions for Kite.", "n_train": 1000, "example": example,
            "instructions": "Answer in the Kite house voice: start with 'Hi NAME!' (or 'Hi there!' when the customer "
                            "gives no name), then 'Good news:' and one sentence with the answer, then 'Cheers, the "
                            "Kite team'. Store hours: Lisbon 9am to 6pm, Oslo 10am to 5pm, Denver 8am to 8pm, Kyoto "
                            "11am to 7pm, Nairobi 8am to 4pm, Quito 9am to 9pm, every day of the week. Return "
                            "windows, free of charge: shoes 30 days, jackets 60, bags 14, watches 90, hats 7, "
                            "gloves 21 (days of delivery).",
            "max_new_tokens": 64}


def priority(rng: random.Random) -> dict:
    """A longer customer message (two to four sentences, no system prompt) -> a priority label P1..P4 by
    a house rule the base model cannot guess: P1 service down or security, P2 money, P3 how-to, P4 feedback."""
    issues = {
        "P1": ["nobody in our office can log in since nine", "the whole site shows an error page",
               "someone changed my password without me", "I got a login alert from a country I have never been to",
               "the app crashes for every user on our team", "all our data disappeared from the dashboard",
               "the service has been down for an hour", "there is a stranger's order in my account"],
        "P2": ["I was billed twice this month", "the refund you promised has not arrived",
               "my invoice shows the wrong plan", "the discount code was not applied at checkout",
               "you charged my old card after I changed it", "the price went up without any notice",
               "I paid for a year but see a monthly plan", "the VAT on my receipt looks wrong"],
        "P3": ["how do I export my contacts", "where can I change the language", "can I share a folder with my team",
               "how do I turn on dark mode", "is there a way to undo a deleted note", "how can I add a second user",
               "where do I find the keyboard shortcuts", "can I print a report as a PDF"],
        "P4": ["I love the new design", "your support person was very kind yesterday",
               "it would be nice to have more colours", "the last update made everything faster",
               "I have used you for five years and I am happy", "maybe add a calendar view one day",
               "the onboarding video was really clear", "just wanted to say thanks for the quick fix"],
    }
    openers = ["Hello.", "Hi there.", "Good afternoon.", "I hope you are well.", "Quick message.", "Sorry to bother you.",
               "I am writing from the accounts team.", "This is {n} again.", ""]
    context = ["I use the web version on a laptop.", "We are a small shop with six people.", "I am on the family plan.",
               "This is my first message to you.", "My colleague told me to write here.", "I checked the help pages.",
               "It is not the first time.", ""]
    closers = ["Thank you.", "Best, {n}", "Please let me know.", "Kind regards.", "Cheers, {n}", ""]

    def example() -> tuple[str, str]:
        label = rng.choice(list(issues))
        parts = [rng.choice(openers), rng.choice(context), rng.choice(issues[label]).capitalize() + ".",
                 rng.choice(closers)]
        return " ".join(p.format(n=rng.choice(NAMES)) for p in parts if p), label

    return {"system": None, "n_train": 300, "example": example,
            "instructions": "Reply with the priority only: P1 (service down for users, or account security), P2 "
                            "(charges, refunds, invoices, prices), P3 (how to do something), P4 (praise, ideas, "
                            "feedback).",
            "max_new_tokens": 6}


TASKS = {"dates": dates, "orders": orders, "routing": routing, "replies": replies, "priority": priority}
N_TEST = 100


def write_task(name: str, seed: int = 0) -> Path:
    rng = random.Random(f"{name}-{seed}")
    spec = TASKS[name](rng)
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < spec["n_train"] + N_TEST:
        prompt, answer = spec["example"]()
        if prompt in seen:
            continue
        seen.add(prompt)
        system = [{"role": "system", "content": spec["system"]}] if spec["system"] else []
        rows.append({"messages": [*system, {"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
    folder = HERE / name
    folder.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", rows[:spec["n_train"]]), ("test", rows[spec["n_train"]:])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    recipe = {
        "name": f"task-{name}",
        "model": {"name": "smollm2-135m-instruct"},
        "data": {"train": "train.jsonl", "test": "test.jsonl"},
        "eval": {"instructions": spec["instructions"], "max_new_tokens": spec["max_new_tokens"]},
    }
    import yaml

    header = f"# tunelab run bench/tasks/{name}/recipe.yaml  (data: python bench/tasks/generate.py)\n"
    (folder / "recipe.yaml").write_text(header + yaml.safe_dump(recipe, sort_keys=False, width=120), encoding="utf-8")
    return folder


if __name__ == "__main__":
    for task in TASKS:
        print(write_task(task))

"""Status lines for the user: one `tunelab: ...` line on stderr, so stdout stays for results."""

from __future__ import annotations

import sys


def say(message: str) -> None:
    print(f"tunelab: {message}", file=sys.stderr, flush=True)

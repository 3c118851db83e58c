"""Status lines for the user: one `tunelab: ...` line on stderr, so stdout stays for results, and
durations written as a person reads them."""

from __future__ import annotations

import sys


def say(message: str) -> None:
    print(f"tunelab: {message}", file=sys.stderr, flush=True)


def format_duration(seconds: float) -> str:
    """45 s, 9.1 min, 2.3 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"

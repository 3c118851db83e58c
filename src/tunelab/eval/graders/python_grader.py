"""Runs a python grader's grade(sample, item) in a child Python process, with a per-call deadline.

Sends the grader's source as the first line of the child's stdin (never on its command line, so no
size limit of the OS applies), then each call sends one JSON line {"sample", "item"} and reads back
{"score"} or {"error"}. Requests and answers travel on copies of the child's stdin and stdout made
before the user's code runs; the code's own fd 0 then reads /dev/null and its fd 1 goes to stderr,
so print(), os.system, sys.__stdout__ or input() cannot write a score or steal a request, and an
answer that is not a finite score or an error message fails that call in one line. A call past timeout_s kills the child (a new one starts for the next
call) and fails for that example; an exception in grade(), or a return value that is not a finite
number, fails for that example with its message. Nothing fails silently as a 0. The code runs with
the user's own rights, like the recipe that holds it; the child keeps it out of tunelab's process
(its imports, globals and crashes) and makes a runaway call stoppable.
"""

from __future__ import annotations

import json
import math
import queue
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Any

# The child: keep private copies of stdin and stdout, point fd 0 at /dev/null and fd 1 at stderr (the
# user's prints, subprocesses and sys.__stdout__ all land there), exec the source once, then answer
# one line per call on the private copy.
_CHILD = r"""
import json, math, os, sys
requests = os.fdopen(os.dup(0), "r", encoding="utf-8")
out = os.fdopen(os.dup(1), "w", encoding="utf-8")
null = os.open(os.devnull, os.O_RDONLY)
os.dup2(null, 0)
os.dup2(2, 1)
sys.stdin = open(os.devnull, encoding="utf-8")
sys.stdout = sys.stderr
namespace = {"__name__": "tunelab_grader"}
exec(compile(json.loads(requests.readline()), "<grader source>", "exec"), namespace)
grade = namespace["grade"]
for line in requests:
    request = json.loads(line)
    try:
        value = grade(request["sample"], request["item"])
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            answer = {"error": f"grade() returned {type(value).__name__}, expected a number"}
        elif not math.isfinite(value):
            answer = {"error": f"grade() returned {value}, expected a finite number"}
        else:
            answer = {"score": float(value)}
    except Exception as err:
        answer = {"error": f"{type(err).__name__}: {err}"[:500]}
    out.write(json.dumps(answer) + "\n")
    out.flush()
"""


class PythonGraderFailed(RuntimeError):
    """This call of grade() failed (exception, bad return value, timeout, or the child died)."""


def read_answer(line: str) -> float:
    """The score in the child's answer line; PythonGraderFailed with its message, or for an answer that is
    not {"score": finite number} or {"error": text}."""
    try:
        answer = json.loads(line)
    except (ValueError, RecursionError):
        answer = None
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        raise PythonGraderFailed(answer["error"])
    score = answer.get("score") if isinstance(answer, dict) else None
    if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
        raise PythonGraderFailed(f"the grader's process gave an unreadable answer: {line.strip()[:120]!r}")
    return float(score)


class PythonGraderProcess:
    """One child process per python grader, restarted after a timeout or a crash."""

    def __init__(self, source: str, timeout_s: float) -> None:
        self.source, self.timeout_s = source, timeout_s
        self._child: subprocess.Popen[str] | None = None
        self._answers: queue.Queue[str | None] = queue.Queue()
        self._errors: deque[str] = deque()

    def _start(self) -> subprocess.Popen[str]:
        child = subprocess.Popen(
            [sys.executable, "-I", "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, encoding="utf-8", bufsize=1,
        )
        assert child.stdin is not None
        try:
            child.stdin.write(json.dumps(self.source) + "\n")  # one line: the source, JSON-encoded
            child.stdin.flush()
        except OSError:
            pass  # the child died at once: the first call reports how
        answers: queue.Queue[str | None] = queue.Queue()
        errors: deque[str] = deque(maxlen=5)

        def read_answers() -> None:
            assert child.stdout is not None
            for line in child.stdout:
                answers.put(line)
            answers.put(None)  # the child exited

        def drain_errors() -> None:  # the user's prints and tracebacks; a full pipe would block the child
            assert child.stderr is not None
            for line in child.stderr:
                if line.strip():
                    errors.append(line.strip())

        threading.Thread(target=read_answers, daemon=True).start()
        threading.Thread(target=drain_errors, daemon=True).start()
        self._child, self._answers, self._errors = child, answers, errors
        return child

    def grade(self, sample: dict[str, Any], item: dict[str, Any]) -> float:
        child = self._child if self._child is not None and self._child.poll() is None else self._start()
        assert child.stdin is not None
        try:
            child.stdin.write(json.dumps({"sample": sample, "item": item}, ensure_ascii=False, default=str) + "\n")
            child.stdin.flush()
        except OSError:
            raise PythonGraderFailed(self._death(child)) from None
        try:
            line = self._answers.get(timeout=self.timeout_s)
        except queue.Empty:
            self.close()
            raise PythonGraderFailed(f"grade() did not return within timeout_s {self.timeout_s:g} s") from None
        if line is None:
            raise PythonGraderFailed(self._death(child))
        return read_answer(line)

    def _death(self, child: subprocess.Popen[str]) -> str:
        child.wait()
        self._child = None
        time.sleep(0.05)  # let the drain thread take the last stderr lines
        last = self._errors[-1] if self._errors else "no message"
        return f"the grader's Python process exited (code {child.returncode}): {last}"

    def close(self) -> None:
        child, self._child = self._child, None
        if child is not None:
            child.kill()
            child.wait()
            for stream in (child.stdin, child.stdout, child.stderr):
                if stream is not None:
                    stream.close()

"""Loaded by every Python process started with this folder on PYTHONPATH (tests/test_distributed.py
puts it there for runs asked to fail): the training run's faults, from the environment (tests/faults.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faults  # noqa: E402

if faults.asked():
    faults.patch()

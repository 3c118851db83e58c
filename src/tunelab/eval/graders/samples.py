"""OpenAI's grader namespaces for one evaluated example: `sample` (the output) and `item` (the test record).

Reads an output text or a test record; returns the dicts the templates of specs/templates.py render
against. Lives in eval (not beside the templates in specs/) because `sample.output_json` is the
lenient JSON parse of eval/metrics.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tunelab.eval.metrics import lenient_json


def make_sample(output_text: str) -> dict[str, Any]:
    """OpenAI's sample namespace for a plain completion: the text and, when it holds a JSON object,
    output_json (lenient: a fenced or embedded object counts; otherwise an empty object)."""
    parsed = lenient_json(output_text)
    return {"output_text": output_text, "output_json": parsed if isinstance(parsed, dict) else {}}


def make_item(row: Mapping[str, Any], example_id: str, reference: str) -> dict[str, Any]:
    """OpenAI's item namespace for a test record: all its keys (extra keys kept by data prepare
    included), its id, and `reference`: the record's own, else its final assistant message."""
    return {**row, "id": example_id, "reference": row.get("reference", reference)}

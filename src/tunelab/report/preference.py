"""The report's paragraph on what preference tuning (DPO) changed.

Reads eval/metrics.json's `preference` section (eval/preference.py) as a mapping; writes nothing.
`describe_preference` returns {"text", "examples"} for the templates, or None for a run without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _pct(value: Any) -> str:
    return f"{100 * value:.0f}%" if isinstance(value, int | float) else "—"


def describe_preference(section: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """One paragraph: preference accuracy of each arm on held-out pairs, the paired comparison with the
    supervised parent, and the examples where parent and tuned answered differently."""
    if not section:
        return None
    accuracy = section.get("accuracy") or {}
    name = {"orpo": "ORPO", "ipo": "IPO", "kto": "KTO"}.get(section.get("loss"), "DPO")
    n, split = section.get("n", 0), section.get("split", "held-out")
    if accuracy:
        others = ", ".join(f"{'the supervised parent' if arm == 'sft' else arm} {_pct(accuracy[arm])}"
                           for arm in ("sft", "base") if arm in accuracy)
        text = (f"Preference tuning ({name}): on {n} held-out pairs ({split} split), the tuned model gives the "
                f"preferred answer the higher likelihood (per token) in {_pct(accuracy.get('tuned'))} of them"
                + (f" ({others})." if others else "."))
    else:
        text = f"Preference tuning ({name}): no held-out pairs to measure preference accuracy on."
    if isinstance(section.get("reward_accuracy"), int | float):
        text += (f" Against its reference ({'the supervised parent' if section.get('reward_reference') == 'sft' else 'the base'}),"
                 f" {name} moved the likelihood toward the preferred answer in {_pct(section['reward_accuracy'])} of them.")
    if section.get("vs_sft"):
        text += f" {section['vs_sft']['text']}."
    examples = list(section.get("disagreements") or [])
    if examples:
        text += f" {len(examples)} test prompts where parent and tuned answered differently are shown below."
    return {"text": text, "examples": examples}

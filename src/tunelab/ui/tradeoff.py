"""The run page's trade-off plot: validation task score against retention of the general probes the base
model knew, one point per LoRA adapter scale the evaluation tried, the chosen scale ringed (the report's
plot, report/plots.py: scale_tradeoff). Reads eval/adapter_scale.json (eval/scale_search.py writes it);
writes nothing. No file, a damaged one or no candidates: no plot (the report says what is there)."""

from __future__ import annotations

from tunelab.contract import AdapterScale, ContractError
from tunelab.runs import RunPaths

PLOT_NAME = "run-plot-scales"


def scale_tradeoff_svg(paths: RunPaths) -> str | None:
    """The plot as inline SVG, or None when the run has no scale search to show."""
    if not paths.adapter_scale.is_file():
        return None
    try:
        record = AdapterScale.from_file(paths.adapter_scale)
    except ContractError:
        return None
    candidates = [c.model_dump() for c in record.candidates]
    if not any(c["retention"] is not None and c["task"] is not None for c in candidates):
        return None
    from tunelab.report import plots

    return plots.scale_tradeoff(candidates, record.scale, record.metric, record.threshold, PLOT_NAME)

"""The run page shows the task score against retention across the adapter scales the evaluation tried
(eval/adapter_scale.json), the chosen scale ringed; a run without a scale search, or with a damaged
file, shows no plot and still loads."""

from __future__ import annotations

from test_report import make_run
from test_scale_search import CURVE
from test_ui import client
from tunelab.contract import AdapterScale
from tunelab.runs import RunPaths
from tunelab.ui.tradeoff import scale_tradeoff_svg


def test_the_run_page_plots_the_scales_tried_with_the_chosen_one_ringed(tmp_path):
    runs = tmp_path / "runs"
    run = make_run(runs, name="alpha")
    assert 'id="tradeoff"' not in client(runs).get("/runs/alpha").text  # no scale search: no plot

    AdapterScale(scale=0.75, policy="balance", reason="r", metric="label_accuracy", split="valid", n_examples=12,
                 threshold=0.05, candidates=CURVE).write(RunPaths(run).adapter_scale)
    page = client(runs).get("/runs/alpha").text
    assert page.index('id="tradeoff"') < page.index('id="report"')
    section = page[page.index('id="tradeoff"'):page.index('id="report"')]
    assert "<svg" in section and "chosen: scale 0.75" in section and "retention within 5%" in section
    assert "validation label_accuracy (%)" in section
    for scale in ("1", "0.75", "0.5"):  # every scale tried is a labelled point
        assert f">{scale}<" in section


def test_a_damaged_scale_file_or_no_measured_point_shows_no_plot(tmp_path):
    runs = tmp_path / "runs"
    run = make_run(runs, name="alpha")
    paths = RunPaths(run)
    paths.adapter_scale.parent.mkdir(parents=True, exist_ok=True)
    paths.adapter_scale.write_text("{not json")
    assert scale_tradeoff_svg(paths) is None
    response = client(runs).get("/runs/alpha")
    assert response.status_code == 200 and 'id="tradeoff"' not in response.text
    unmeasured = [c.model_copy(update={"task": None}) for c in CURVE]
    AdapterScale(scale=1.0, policy="balance", reason="r", metric="label_accuracy", split="valid", n_examples=0,
                 threshold=0.05, candidates=unmeasured).write(paths.adapter_scale)
    assert scale_tradeoff_svg(paths) is None

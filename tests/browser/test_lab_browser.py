"""The notebooks in JupyterLab in a real browser (`make lab-test`): run all cells, move a control, see
the estimate the library computes; train a tiny run and see its loss plot; the BPB-vs-bytes figure.

Screenshots land in figures/ (git-ignored); docs/lab_*.png are copies of two of them for the README.
"""
from __future__ import annotations

import math

import pytest

from pgolf.lab import workbench
from pgolf.runs import RunDir

from labdriver import (REPO, browser_page, code_cells_run, copy_notebook, errors, expect_estimate, lab_server,
                  move_slider, notebook_parameters, open_and_run_all, slider_value)

pytestmark = pytest.mark.browser
FIGURES = REPO / "figures"
STEPS = 12  # the gate-width slider moves 12 -> 24
# Breaks the widget callback: after its first run (the initial display), a control change recomputes nothing.
FROZEN_CALLBACK = """\
import ipywidgets
_first_update = ipywidgets.interactive.update
def _frozen(self, *args):
    if not getattr(self, "_pgolf_seen", False):
        self._pgolf_seen = True
        _first_update(self, *args)
ipywidgets.interactive.update = _frozen
"""
TINY = ["model.num_layers=2", "model.model_dim=64", "model.num_heads=2", "model.num_kv_heads=1",
        "train.train_seq_len=64", "train.eval_seq_len=64", "train.train_batch_tokens=512",
        "train.micro_batch_tokens=256", "train.val_batch_tokens=4096", "data.val_max_tokens=4096",
        "train.log_every=1", 'train.export="none"', "train.iterations=30", "train.warmup_steps=0",
        "train.val_every=10"]


def expected_estimate(width: int) -> tuple[int, int]:
    """What pgolf.lab.workbench computes for the notebook's parameters with the gate width `width`."""
    params = notebook_parameters("architecture_tweaks.ipynb")
    values = {k: v for k, v in params.items() if k in workbench.TWEAKS}
    est = workbench.estimate(workbench.tweaked(params["preset"], params["overrides"],
                                               **{**values, "attn_gate_width": width}))
    return est["params"], est["est_artifact_bytes"]


@pytest.fixture
def lab(tmp_path):
    """(page, url, root): JupyterLab serving an empty folder, and a browser page."""
    root = tmp_path / "root"
    root.mkdir()
    with lab_server(root, tmp_path / "home") as url, browser_page(tmp_path / "profile") as page:
        yield page, url, root


def test_architecture_widgets_show_the_library_estimate(lab):
    page, url, root = lab
    copy_notebook("architecture_tweaks.ipynb", root)
    open_and_run_all(page, url, "architecture_tweaks.ipynb")
    assert errors(page) == [] and all(code_cells_run(page))
    width = notebook_parameters("architecture_tweaks.ipynb")["attn_gate_width"]
    before, after = expected_estimate(width), expected_estimate(width + STEPS)
    assert before != after  # the gate's input width changes its weights
    expect_estimate(page, *before)
    move_slider(page, "attn_gate_width", STEPS)
    assert slider_value(page, "attn_gate_width") == width + STEPS
    expect_estimate(page, *after)
    page.locator(".pgolf-control-attn_gate").first.scroll_into_view_if_needed()  # the controls, then the estimate
    page.screenshot(path=str(FIGURES / "lab_architecture_tweaks.png"))


def test_a_broken_widget_callback_is_caught(lab):
    """The same check, on a copy of the notebook whose widget callback no longer recomputes: it fails."""
    page, url, root = lab
    copy_notebook("architecture_tweaks.ipynb", root, prelude=FROZEN_CALLBACK)
    open_and_run_all(page, url, "architecture_tweaks.ipynb")
    width = notebook_parameters("architecture_tweaks.ipynb")["attn_gate_width"]
    move_slider(page, "attn_gate_width", STEPS)
    assert slider_value(page, "attn_gate_width") == width + STEPS  # the control moved...
    with pytest.raises(AssertionError, match="the estimate shows"):
        expect_estimate(page, *expected_estimate(width + STEPS), timeout_s=10)  # ...the estimate did not


def test_train_notebook_trains_and_plots_in_the_browser(lab, sp1024_data):
    page, url, root = lab
    copy_notebook("train.ipynb", root, parameters={
        "data": str(sp1024_data), "overrides": TINY, "max_seconds": 0.0, "nproc": 1, "seed": 3,
        "runs_root": str(root / "runs"), "figures_dir": str(root / "figures"), "run_name": "browser"})
    open_and_run_all(page, url, "train.ipynb")
    assert errors(page) == [] and all(code_cells_run(page))
    result = RunDir(root / "runs" / "browser").result()
    assert result["status"] == "finished" and result["steps"] == 30
    assert (root / "figures" / "loss_browser.png").is_file()
    plot = page.locator(".jp-OutputArea-output img").first  # the loss curves, shown inline
    plot.wait_for(state="visible")
    plot.scroll_into_view_if_needed()
    assert plot.evaluate("img => img.naturalWidth") > 200
    page.screenshot(path=str(FIGURES / "lab_train.png"))


def test_bpb_vs_artifact_figure_in_the_browser(lab):
    page, url, root = lab
    runs = root / "runs"
    for key, total, losses in (("ref", 15_500_000, [2.3300, 2.3320, 2.3340]),
                               ("new", 15_900_000, [2.3150, 2.3170, 2.3190])):
        for seed, loss in enumerate(losses):
            run = RunDir.create(runs / f"{key}_s{seed}")
            run.write_json("config.json", {"model": {"key": key}, "train": {"seed": seed}})
            bpb = loss / math.log(2) / 2.4
            run.finish({"preset": key, "seed": seed, "val_loss": loss, "val_bpb": bpb, "quant_val_bpb": bpb,
                        "val_bpb_prequant": bpb - 0.01, "total_bytes": total})
    copy_notebook("bpb_vs_artifact.ipynb", root, parameters={"runs_root": str(runs),
                                                             "figures_dir": str(root / "figures")})
    open_and_run_all(page, url, "bpb_vs_artifact.ipynb")
    assert errors(page) == [] and all(code_cells_run(page))
    assert (root / "figures" / "bpb_vs_artifact.png").is_file()
    plot = page.locator(".jp-OutputArea-output img").first
    plot.wait_for(state="visible")
    plot.scroll_into_view_if_needed()
    page.screenshot(path=str(FIGURES / "lab_bpb_vs_artifact.png"))

"""The DOM hooks the browser test (tests/browser) finds the workbench by, checked from Python."""
from __future__ import annotations

import re

from pgolf.lab import workbench


def test_tweak_widget_has_the_browser_hooks():
    w = workbench.tweak_widget("cpu-smoke")
    by_name = {c.description: c for c in w.kwargs_widgets}
    assert set(by_name) == set(workbench.TWEAKS)
    assert all(f"pgolf-control-{n}" in c._dom_classes for n, c in by_name.items())
    line = w.children[-1]

    def shown() -> tuple[int, int]:
        m = re.search(r'class="pgolf-params">(\d+)</span>.*class="pgolf-bytes">(\d+)</span>', line.value)
        return int(m.group(1)), int(m.group(2))

    assert 'class="pgolf-estimate"' in line.value
    before = (w.result["params"], w.result["est_artifact_bytes"])
    assert shown() == before
    est = workbench.set_widget_values(w, attn_gate="sparse", attn_gate_width=24)  # the callback refreshes it
    assert shown() == (est["params"], est["est_artifact_bytes"]) and shown() != before
    workbench.set_widget_values(w, num_loops=2, loop_start=3, loop_end=1)  # impossible: said, not raised
    assert "pgolf-invalid" in line.value and "pgolf-params" not in line.value

"""Following a training run while torchrun runs it: its phase from the log lines, its curves from its
`metrics.jsonl`, shown as a live figure (train.ipynb) or one progress line per run (comparisons).

`Follow` is the `watch` callback of `pgolf.lab.launch.stream`: it sees every log line, reads the rows
the run appended since the last look, and redraws at most every `interval` seconds (and at each new
phase). The phases are read from `pgolf.train`'s own log lines (`PHASES`), in order: the final
validation and the export / quantisation after it are labelled, not hidden behind a full progress bar.
In a Jupyter kernel the figure / line is one display that is updated in place; elsewhere nothing is
shown and `figure()` / `status()` give the same picture and text.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Callable

from pgolf.lab import plots

# (phase, the pgolf.train log line that starts it). A phase is entered only from the one before it, so
# the periodic validations during training (same log line as the final one) do not end the training.
PHASES = (("starting", None),
          ("training", re.compile(r"\btraining: [\d,]+ params")),
          ("validation", re.compile(r"\bstopped at step \d+")),
          ("export / quantisation", re.compile(r"\bstep \d+ val_loss \S+ val_bpb")),
          ("finished", re.compile(r"\bfinished: val_bpb")))
NAMES = [name for name, _ in PHASES]
COLORS = {"starting": "0.75", "training": "C0", "validation": "C1", "export / quantisation": "C2",
          "finished": "C7", "failed": "C3"}


class MetricsTail:
    """The rows of a growing `metrics.jsonl`, read incrementally (a line cut short waits for its end)."""

    def __init__(self, path: str | Path):
        self.path, self.offset, self.rest = Path(path), 0, ""
        self.rows: list[dict[str, Any]] = []

    def read(self) -> list[dict[str, Any]]:
        if self.path.exists():
            with open(self.path) as f:
                f.seek(self.offset)
                chunk = self.rest + f.read()
                self.offset = f.tell()
            *lines, self.rest = chunk.split("\n")
            for line in lines:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict):
                    self.rows.append(row)
        return self.rows


class Follow:
    """A live view of one training run (see the module notes). `figure=True`: the loss figure with a
    phase timeline; `line=True`: one status line. Call it with each log line, then `finish(...)`."""

    def __init__(self, run_dir: str | Path, *, label: str = "", budget_seconds: float | None = None,
                 figure: bool = True, line: bool = False, interval: float = 0.5, show: bool | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.run_dir, self.label = Path(run_dir), label or Path(run_dir).name
        self.budget, self.want_figure, self.want_line = budget_seconds, figure, line
        self.interval, self.clock = interval, clock
        self.show = plots.in_kernel() if show is None else show
        self.metrics = MetricsTail(self.run_dir / "metrics.jsonl")
        self.t0 = clock()
        self.phases: list[tuple[str, float]] = [("starting", 0.0)]  # (phase, seconds since start)
        self.result: dict[str, Any] | None = None
        self.error = ""
        self.draws = 0
        self._last_draw = -float("inf")
        self._handles: dict[str, Any] = {}

    @property
    def phase(self) -> str:
        return self.phases[-1][0]

    def __call__(self, line: str) -> None:
        changed = self._advance(line)
        if changed or self.clock() - self._last_draw >= self.interval:
            self.update()

    def _advance(self, line: str) -> bool:
        i = NAMES.index(self.phase) if self.phase in NAMES else len(NAMES) - 1
        for j in sorted({i + 1, len(NAMES) - 1}):  # the next phase, or the end from anywhere
            pattern = PHASES[j][1] if i < j < len(NAMES) else None
            if pattern is not None and pattern.search(line):
                self.phases.append((NAMES[j], self.clock() - self.t0))
                return True
        return False

    def finish(self, result: dict[str, Any] | None = None, error: str = "") -> None:
        """The run ended: with its final JSON, or failed with `error` (its first line is shown)."""
        self.result, self.error = result, error.splitlines()[0] if error else ""
        end = "failed" if error else "finished"
        if self.phase != end:
            self.phases.append((end, self.clock() - self.t0))
        self.update()
        if self.show and self.want_figure:
            print(f"{self.label}: {end}; {self.timeline()}")

    def timeline(self) -> str:
        """The phases and how long each took: "training 12.1 s · validation 0.8 s · ..."."""
        return " · ".join(f"{name} {width:.1f} s" for name, _, width in self._spans())

    # ---- what is shown
    def rows(self) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
        """(train loss points, val loss points) as (step, loss), from the rows written so far."""
        rows = self.metrics.read()
        train = [(r["step"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
        val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        return train, val

    def status(self) -> str:
        """One line: the phase, step, time against the budget, latest loss; the result once finished."""
        train, val = self.rows()
        parts = [self.label, self.phase]
        if self.error:
            parts.append(self.error)
        elif self.result is not None:
            r = self.result
            parts += [f"{r.get('steps')} steps", f"val BPB {r['val_bpb']:.4f}" if r.get("val_bpb") is not None else "",
                      f"artifact {r['total_bytes']:,} B" if r.get("total_bytes") else ""]
        else:
            rows = self.metrics.rows
            t = next((r["time_s"] for r in reversed(rows) if r.get("time_s") is not None), None)
            if train:
                parts.append(f"step {train[-1][0]}")
            if t is not None:
                parts.append(f"{t:.0f}/{self.budget:.0f} s of training" if self.budget else f"{t:.0f} s of training")
            if train:
                parts.append(f"loss {train[-1][1]:.4f}")
            if val:
                parts.append(f"val loss {val[-1][1]:.4f}")
        return " · ".join(p for p in parts if p)

    def figure(self) -> Any:
        """The loss so far (markers while there are few points) above a timeline of the phases."""
        train, val = self.rows()
        fig = plots.new_figure(8.5, 4.2)
        ax, tl = fig.subplots(2, 1, gridspec_kw={"height_ratios": [5, 1]})
        if train:
            plots.curve(ax, *zip(*train), color="C0", label="train loss")
        if val:
            ax.plot(*zip(*val), "s", ms=5, color="C1", label="val loss")
        if not (train or val):
            ax.text(0.5, 0.5, "waiting for the first logged step", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.legend(fontsize=8, loc="upper right")
        ax.set(xlabel="step", ylabel="loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.set_title(self.status(), fontsize=9)
        self._timeline(tl)
        fig.tight_layout()
        return fig

    def _spans(self) -> list[tuple[str, float, float]]:
        """(phase, start, seconds) of every phase so far (the last one until now, or until the run ended)."""
        ends = [t for _, t in self.phases[1:]] + [self.clock() - self.t0]
        return [(name, start, end - start) for (name, start), end in zip(self.phases, ends)
                if name not in ("finished", "failed")]

    def _timeline(self, ax: Any) -> None:
        spans = self._spans()
        total = max(sum(w for _, _, w in spans), 1e-3)
        for name, start, width in spans:
            ax.barh(0, max(width, 1e-3), left=start, color=COLORS[name], height=0.8)
            if width > 0.12 * total:  # narrow phases are named in the title only
                ax.text(start + width / 2, 0, name, ha="center", va="center", fontsize=7)
        ax.set(yticks=[], xlabel="wall-clock seconds since launch", xlim=(0, total))
        ax.set_title(self.timeline(), fontsize=8)

    def update(self) -> None:
        """Redraw now (in a kernel: update the displayed figure / line in place)."""
        self._last_draw = self.clock()
        self.draws += 1
        if not self.show:
            return
        from IPython.display import Image, display

        if self.want_line:
            self._put("line", {"text/plain": self.status()}, display, raw=True)
        if self.want_figure:
            fig = self.figure()
            self._put("figure", Image(data=plots.png_bytes(fig)), display)

    def _put(self, key: str, obj: Any, display: Callable[..., Any], raw: bool = False) -> None:
        if key in self._handles:
            self._handles[key].update(obj, raw=raw)
        else:
            self._handles[key] = display(obj, display_id=True, raw=raw)


def train(run_dir: str | Path, *, budget_seconds: float | None = None, label: str = "", figure: bool = True,
          line: bool = False, **launch_kw: Any) -> dict[str, Any]:
    """`pgolf.lab.launch.train(out=run_dir, ...)` with a live view of the run; returns its final JSON."""
    from pgolf.lab import launch

    follow = Follow(run_dir, label=label, budget_seconds=budget_seconds, figure=figure, line=line)
    try:
        result = launch.train(out=str(run_dir), watch=follow, **launch_kw)
    except BaseException as e:
        follow.finish(error=str(e) or type(e).__name__)
        raise
    follow.finish(result)
    return result

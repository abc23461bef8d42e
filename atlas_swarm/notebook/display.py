"""What ``Run.watch()`` draws: in Jupyter, a tqdm.notebook bar over epochs and a matplotlib loss plot updated in
place; anywhere else (a terminal, a headless kernel without ipywidgets or matplotlib) one text line per change."""

from __future__ import annotations

import math
import sys
from typing import Optional

SPARK = "▁▂▃▄▅▆▇█"


def in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def sparkline(values: list[float], width: int = 24) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)][-width:]  # NaN/inf: not drawable
    if len(values) < 2:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(SPARK[int((v - lo) / span * (len(SPARK) - 1))] for v in values)


def line(view: dict, target_epoch: Optional[int]) -> str:
    epoch = f"epoch {view['epoch']}" + (f"/{target_epoch}" if target_epoch else "")
    loss = "loss -" if view.get("loss") is None else f"loss {view['loss']:.4f}"  # a NaN loss prints as nan
    trend = sparkline([p.get("loss") for p in view.get("history", [])])
    return (f"{epoch} | {len(view['peers'])} peers | {view['samples_per_second']:.1f} samples/s | "
            f"{view['samples']}/{view['target']} samples this epoch | {loss} {trend}").rstrip()  # fmt: skip


class Display:
    """``update(view)`` with the run's summary (monitor.state.RunView.summary()); ``close()`` when done."""

    def __init__(self, target_epoch: Optional[int], out=None):
        self.target_epoch, self.out = target_epoch, out or sys.stdout
        self.bar = self.figure = self.handle = None
        self._last = ""
        if in_notebook():
            self._open_widgets()

    def _open_widgets(self) -> None:
        try:
            from tqdm.notebook import tqdm

            self.bar = tqdm(total=self.target_epoch, desc="epochs", unit="epoch")
        except ImportError:  # tqdm.notebook needs ipywidgets
            self.bar = None
        try:
            from IPython.display import display
            from matplotlib.figure import Figure  # no pyplot: works whatever backend the kernel has

            self.figure = Figure(figsize=(6, 2.5))
            self.axes = self.figure.subplots()
            self.handle = display(self._png(), display_id=True)
        except ImportError:
            self.figure = None

    def update(self, view: Optional[dict]) -> None:
        if view is None:
            text = "waiting for the run's first peer..."
        else:
            text = line(view, self.target_epoch)
            if self.bar is not None:
                self.bar.n = view["epoch"]
                self.bar.set_postfix(peers=len(view["peers"]), loss=view.get("loss"), refresh=False)
                self.bar.refresh()
            if self.figure is not None:
                self._plot(view)
        if self.bar is None and text != self._last:
            print(text, file=self.out, flush=True)
        self._last = text

    def _plot(self, view: dict) -> None:
        points = [p for p in view.get("history", []) if p.get("loss") is not None]
        self.axes.clear()
        self.axes.plot([p["t"] - points[0]["t"] for p in points], [p["loss"] for p in points], marker=".")
        self.axes.set_xlabel("seconds")
        self.axes.set_ylabel("mean peer loss")
        self.axes.set_title(f"{view['run_id']}: epoch {view['epoch']}")
        self.handle.update(self._png())

    def _png(self):
        import io

        from IPython.display import Image

        buf = io.BytesIO()
        self.figure.savefig(buf, format="png", dpi=80, bbox_inches="tight")
        return Image(data=buf.getvalue(), format="png")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

"""The report's pictures: the loss curve (matplotlib, Agg backend, no display needed) and the grid of samples."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

SMOOTHING = 0.9  # exponential moving average weight, debiased like TensorBoard's smoothing


def smoothed(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Debiased exponential moving average: the first value is the first loss, not a fraction of it."""
    out, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**count))
    return out


def loss_figure(steps: list[int], losses: list[float], lrs: list[float]):
    """The figure: raw and smoothed loss on the left axis, the learning rate on the right one."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    figure = Figure(figsize=(7, 4), dpi=100, layout="constrained")
    loss_axis = figure.add_subplot()
    loss_axis.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="loss")
    loss_axis.plot(steps, smoothed(losses), color="tab:blue", linewidth=2, label=f"loss (EMA {SMOOTHING})")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("masked denoising loss")
    lr_axis = loss_axis.twinx()
    lr_axis.plot(steps, lrs, color="tab:orange", linewidth=1.5, label="learning rate")
    lr_axis.set_ylabel("learning rate (UNet / LoRA)")
    lines = loss_axis.get_lines() + lr_axis.get_lines()
    loss_axis.legend(lines, [line.get_label() for line in lines], loc="upper right")
    loss_axis.set_title("training loss")
    return figure


def plotted_series(figure) -> dict[str, list[float]]:
    """What the figure's lines actually hold, read back from matplotlib (label -> y values)."""
    return {line.get_label(): [float(y) for y in line.get_ydata()] for ax in figure.axes for line in ax.get_lines()}


def save_figure(figure, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    figure.savefig(path, format="png")


def grid(columns: list[list[Image.Image]]) -> Image.Image:
    """Columns (one per sampled step) of equal-sized tiles (one per prompt), placed edge to edge, so a tile can be
    cut back out exactly: tile (row r, column c) is at (c * side, r * side)."""
    side = columns[0][0].width
    rows = len(columns[0])
    sheet = Image.new("RGB", (side * len(columns), side * rows))
    for c, column in enumerate(columns):
        for r, tile in enumerate(column):
            sheet.paste(tile.convert("RGB"), (c * side, r * side))
    return sheet

"""The benchmarks' plots, with matplotlib (``pip install 'lora_kernels[bench]'``).

Every plot has labelled axes with units, a legend where there is more than one series, error
bars from the 20th to the 80th percentile where the timings have them, and a footer with the
machine and commit the numbers came from (``lora_kernels.bench.environment``), so a PNG read
away from its JSON still says where it was measured.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from lora_kernels.bench import environment

__all__ = ["available", "bars", "figure", "lines", "save"]


def available() -> bool:
    """Whether matplotlib is installed (a script without it writes its JSON and says so)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def figure(ncols: int = 1, *, width: float = 5.5, height: float = 4.0):
    """``(fig, axes)``: one row of ``ncols`` axes, drawn off-screen (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def bars(ax, labels, values, *, xlabel: str, spread=None, highlight=(), log: bool = False):
    """Horizontal bars, first label on top, each annotated with its value; ``spread``: one
    ``(low, high)`` per bar drawn as an error bar; labels in ``highlight`` in another colour."""
    labels, values = list(labels)[::-1], list(values)[::-1]
    colors = ["tab:red" if label in highlight else "tab:blue" for label in labels]
    xerr = None
    if spread is not None:
        spread = list(spread)[::-1]
        xerr = [
            [v - lo for v, (lo, _) in zip(values, spread, strict=True)],
            [hi - v for v, (_, hi) in zip(values, spread, strict=True)],
        ]
    ax.barh(labels, values, color=colors, xerr=xerr, capsize=3 if xerr else 0)
    ends = (
        values
        if spread is None
        else [max(v, hi) for v, (_, hi) in zip(values, spread, strict=True)]
    )
    for y, (v, end) in enumerate(zip(values, ends, strict=True)):
        ax.annotate(f"{v:.4g}", (end, y), xytext=(4, 0), textcoords="offset points", va="center",
                    fontsize=7)  # fmt: skip
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)


def lines(ax, x, series: dict, *, xlabel: str, ylabel: str, logx=False, logy=False, title=None):
    """One line with markers per ``series`` item (``label -> y values``, None where missing)."""
    for label, ys in series.items():
        pts = [(xi, yi) for xi, yi in zip(x, ys, strict=True) if yi is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=7)


def save(fig, path: str | Path, title: str, *, device="cpu", footer: str | None = None) -> Path:
    """Title, the machine/commit footer (or ``footer``: where a replotted result came from),
    tight layout; write ``path`` (PNG) and close."""
    import matplotlib.pyplot as plt

    env = environment(device)
    fig.suptitle("\n".join(textwrap.wrap(title, int(fig.get_figwidth() * 13))), fontsize=9)
    footer = footer or f"{env['machine']} | commit {env['commit'][:12]} | {env['date']}"
    fig.text(0.01, 0.005, footer, fontsize=6, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

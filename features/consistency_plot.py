"""A PNG of a consistency report: one stacked horizontal bar per feature.

Each bar splits the feature's compared rows into matched / late_data / missing_blocks /
other shares. Needs matplotlib (the ``plots`` extra); it draws on an Agg canvas of its own,
so the process-wide matplotlib backend is left alone and no display is needed.
"""

from __future__ import annotations

from pathlib import Path

from features.consistency import CAUSES, ConsistencyReport
from features.errors import TesseraError

__all__ = ["PlotDependencyError", "plot_consistency"]

_COLORS = {
    "matched": "#4c9f70",
    "late_data": "#f2a541",
    "missing_blocks": "#d1495b",
    "other": "#7d7d7d",
}


class PlotDependencyError(TesseraError, ImportError):
    """matplotlib, needed to draw plots, is not installed."""

    def __init__(self) -> None:
        super().__init__(
            "writing the consistency plot needs matplotlib, which is not installed; "
            "install it with: pip install 'tessera[plots]'"
        )


def plot_consistency(report: ConsistencyReport, path: str | Path) -> Path:
    """Write ``report`` as a PNG to ``path`` (parent directories are created) and return it.

    Raises:
        PlotDependencyError: matplotlib is missing.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PlotDependencyError() from exc

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    feats = list(reversed(report.features))  # first feature on top
    height = max(2.8, 1.4 + 0.38 * len(feats))
    fig = Figure(figsize=(10, height), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(
        f"Online/offline consistency {report.range_text()}\n"
        f"{report.sampled:,} of {report.impressions:,} impressions sampled, "
        f"{report.matched_share:.1%} of {report.rows:,} values match",
        fontsize=10,
    )
    if not feats:
        ax.text(0.5, 0.5, "no logged feature to check", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
    else:
        y = list(range(len(feats)))
        left = [0.0] * len(feats)
        for part in ("matched", *CAUSES):
            shares = [f.matched_share if part == "matched" else f.share(part) for f in feats]
            ax.barh(y, shares, left=left, color=_COLORS[part], label=part.replace("_", " "),
                    height=0.7, edgecolor="white", linewidth=0.5)
            left = [a + b for a, b in zip(left, shares, strict=True)]
        ax.set_yticks(y, [f"{f.name} ({f.rows:,})" for f in feats], fontsize=8)
        for yi, f in zip(y, feats, strict=True):
            ax.text(1.01, yi, f"{f.matched_share:.1%}", va="center", fontsize=8)
        ax.set_xlim(0, 1.08)
        ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0], ["0%", "25%", "50%", "75%", "100%"])
        ax.set_xlabel("share of logged values")
        fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=4, frameon=False,
                   fontsize=8)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    fig.tight_layout(rect=(0, 0.35 / height, 1, 1))  # leave the bottom strip to the legend
    fig.savefig(path, format="png")
    return path

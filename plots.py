"""Plots, written as files anyone can open: loss curves of runs (`minigpt plot`, and loss.png when a run ends).
matplotlib is imported only when a plot is drawn, on its Agg backend (no display), so nothing else pays for it.
"""

from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the Agg backend: files only, no window, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt

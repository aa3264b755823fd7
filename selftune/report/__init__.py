"""Plots and reports built from a run's records."""

from .plots import plot_losses, plot_trajectory

__all__ = ["plot_losses", "plot_trajectory"]

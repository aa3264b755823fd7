"""Matplotlib figures of a run: the hyperparameter schedule and the losses."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: works without a display
import matplotlib.pyplot as plt


def plot_trajectory(trajectory: list[dict[str, float]], names: list[str], path: str | Path,
                    title: str = "hyperparameters") -> None:
    """One panel per hyperparameter: its value against the training step."""
    n = len(names)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    steps = [r["step"] for r in trajectory]
    for ax, name in zip(axes.flat, names, strict=False):
        ax.plot(steps, [r[name] for r in trajectory], color="tab:blue")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def loss_scale(ax: plt.Axes, values: list[float]) -> None:
    """A log axis for losses that are all positive (cross-entropy, squared error); a linear one where a loss
    of the user's is 0 or below (a Gaussian NLL, a hinge), whose points a log axis silently drops."""
    finite = [v for v in values if math.isfinite(v)]
    ax.set_yscale("log" if finite and min(finite) > 0 else "linear")


def plot_losses(trajectory: list[dict[str, float]], history: list[dict[str, float]], path: str | Path,
                title: str = "losses") -> None:
    """Training loss and hyper-step validation loss per logged step, full validation loss per epoch."""
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in trajectory]
    ax.plot(steps, [r["train_loss"] for r in trajectory], label="train (perturbed, regularised)", alpha=0.7)
    val = [(r["step"], r["val_loss"]) for r in trajectory if not math.isnan(r["val_loss"])]
    if val:
        ax.plot(*zip(*val, strict=True), label="val batches (hyper steps)", alpha=0.7)
    if history:
        ax.plot([h["step"] for h in history], [h["val_loss"] for h in history], "o-", label="val (full, per epoch)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    loss_scale(ax, [r["train_loss"] for r in trajectory] + [v for _, v in val] + [h["val_loss"] for h in history])
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_schedules(schedules: dict[str, list[dict[str, float]]], names: list[str], path: str | Path,
                   title: str = "schedules", log: frozenset[str] | set[str] = frozenset()) -> None:
    """One panel per hyperparameter, one line per method: how each method moved it over its run.

    ``schedules`` maps a method to its trajectory rows; the x axis is the fraction of the run's steps,
    so methods with different step counts line up. Names in ``log`` get a logarithmic axis.
    """
    n = len(names)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for i, (method, trajectory) in enumerate(schedules.items()):
        if not trajectory:
            continue
        last = max(r["step"] for r in trajectory) or 1
        for ax, name in zip(axes.flat, names, strict=False):
            ax.plot([r["step"] / last for r in trajectory], [r[name] for r in trajectory], color=f"C{i}",
                    label=method)
    for ax, name in zip(axes.flat, names, strict=False):
        ax.set_title(name)
        if name in log:
            ax.set_yscale("log")
        ax.set_xlabel("fraction of the run")
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""Small tasks, tuners and fault injectors for tests: selftune's own and those of users and plug-ins.

Like ``optuna.testing``, this module is part of the package so that third parties testing a new
algorithm, method or store can reuse the same building blocks: a digits task that trains in
seconds, a tuner built from it, callbacks that poison the weights or stop a run at a chosen step,
a TCP server that accepts and never answers (a hung database), a torn file, and the command line
as a subprocess.
"""

from __future__ import annotations

import math
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .tuner import Callback, SelfTuner

__all__ = ["DIGITS_CONFIG", "PoisonAt", "StopAt", "cli", "digits_config", "digits_tuner", "silent_server",
           "tear"]

#: The digits MLP example every quick test trains (scikit-learn's bundled digits: no download).
DIGITS_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "digits_mlp.toml"

#: Overrides that make the digits example train in a few seconds on 2 cores.
SMALL = ("epochs=4", "model.hidden=[32, 32]", "tuner.log_every=4")


def digits_config(*overrides: str, small: bool = True):
    """The digits example config with ``overrides`` (``key.path=value``), small by default.

    Raises:
        ConfigError: a bad override.
    """
    from .config import load_config

    return load_config(_example(), [*(SMALL if small else ()), *overrides])


def _example() -> Path:
    if DIGITS_CONFIG.exists():
        return DIGITS_CONFIG
    raise FileNotFoundError(f"{DIGITS_CONFIG} is missing: selftune.testing needs a source checkout")


def digits_tuner(*overrides: str, method: str | None = None, seed: int | None = None) -> SelfTuner:
    """A ready :class:`SelfTuner` on the small digits task."""
    from .runner import prepare

    config = digits_config(*overrides)
    if method is not None or seed is not None:
        config = config.derive(method=method, seed=seed)
    return prepare(config).tuner


class PoisonAt(Callback):
    """Fill the weights (or the hyperparameters) with NaN after step ``at``, ``times`` times: a divergence."""

    def __init__(self, at: int, target: str = "weights", times: int = 1) -> None:
        self.at, self.target, self.left = at, target, times
        self.events: list[dict[str, Any]] = []

    def on_step(self, tuner: SelfTuner, row: dict[str, float] | None) -> None:
        if tuner.counters.steps == self.at and self.left:
            self.left -= 1
            with torch.no_grad():
                if self.target == "weights":
                    tuner.net.general_parameters()[0].fill_(math.nan)
                else:
                    tuner.net.hparams.fill_(math.nan)

    def on_divergence(self, tuner: SelfTuner, info: dict[str, Any]) -> None:
        self.events.append(info)


class StopAt(Callback):
    """Ask the tuner to stop after step ``at``: an interruption at an exact, repeatable point."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step(self, tuner: SelfTuner, row: dict[str, float] | None) -> None:
        if tuner.counters.steps >= self.at:
            tuner.request_stop()


def tear(path: str | Path, keep: float = 0.5) -> None:
    """Truncate ``path`` to ``keep`` of its size, as a crash in the middle of a write leaves it."""
    p = Path(path)
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * keep)])


@contextmanager
def silent_server() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that accepts connections and never answers (a hung database);
    yields its port. Connections are held open until the block ends."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    held: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            try:
                conn, _ = server.accept()
                held.append(conn)
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        done.set()
        thread.join(timeout=2)
        for conn in held:
            conn.close()
        server.close()


def cli(args: Sequence[str], *, cwd: str | Path, store: str | None = None, timeout: float = 600,
        check: bool = False) -> subprocess.CompletedProcess:
    """Run ``selftune ARGS`` in a subprocess (in ``cwd``, with ``--store`` when given)."""
    cmd = [sys.executable, "-m", "selftune.cli", *args, *(["--store", store] if store else [])]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr}")
    return proc

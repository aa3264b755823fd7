"""A run's result and its output folder: one typed result, one writer, and a folder rule that never
destroys a user's files.

Rules (DESIGN.md section 4b):

* A folder is *claimed* before a run starts: it may be missing, empty, or a previous output of the
  same run (its ``.selftune-run.json`` marker names the run's UUID). Anything else is refused with
  one line unless ``overwrite`` is given, and even then only the files selftune writes
  (:data:`OUTPUT_FILES`) are replaced; nothing else in the folder is touched.
* A new folder appears whole: written in a temporary sibling and renamed into place. In an existing
  folder each file is written to a temporary name and renamed over its old version, so a reader
  sees the old file or the new one, never a part.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import OutputError

if TYPE_CHECKING:
    from .tuner import FitResult

__all__ = ["MARKER", "OUTPUT_FILES", "RunResult", "claim_folder", "mark_folder", "read_marker", "write_csv",
           "write_outputs"]

#: The marker naming the run a folder belongs to.
MARKER = ".selftune-run.json"
#: Every file a run writes into its folder (besides the marker, written last).
OUTPUT_FILES = ("result.json", "model.pt", "trajectory.csv", "epochs.csv", "schedule.csv", "trajectory.png",
                "losses.png")


@dataclass
class RunResult:
    """What one recorded run produced: the content of ``result.json``.

    Attributes:
        method: how it was tuned (``fixed``, ``stn``, ``delta-stn``, ``pbt``, ...).
        seed: the training seed.
        hparams: final hyperparameters (integers rounded).
        test, val: ``loss`` and ``accuracy`` (and ``perplexity`` for language models) of the returned model.
        compute: ``examples``, ``eval_examples``, ``seconds``, ``steps``, ``hyper_steps`` (and, for
            population methods, what the whole population cost).
        epochs: the epoch budget.
        data: dataset name and split sizes.
        config: the full config the run was trained with.
        versions: selftune, torch and Python versions.
        run_id, run_uuid: the run in its store (the UUID is unique across stores).
        explanation: what the run did to its hyperparameters, in sentences (:func:`selftune.explain.explain`).
        extra: method-specific records (e.g. the Ray experiment of a PBT run).
    """

    method: str
    seed: int
    hparams: dict[str, Any]
    test: dict[str, float]
    val: dict[str, float]
    compute: dict[str, Any]
    epochs: int
    data: dict[str, Any]
    config: dict[str, Any]
    versions: dict[str, str]
    run_id: int | None = None
    run_uuid: str | None = None
    explanation: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The ``result.json`` payload (``extra``'s keys at the top level)."""
        payload = asdict(self)
        payload.update(payload.pop("extra"))
        return payload


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of ``folder`` (which run's outputs it holds), or ``None`` when it has none readable."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


#: what a refusal of a folder with other files asks a ``--out`` to do
_NEW_FOLDER = "choose a new folder, or pass --overwrite to replace only selftune's own files in it"


def claim_folder(out: str | Path, run_uuid: str, *, overwrite: bool = False, option: str = "--out",
                 fix: str = _NEW_FOLDER) -> Path:
    """Check that ``out`` may receive run ``run_uuid``'s outputs; nothing is written. ``fix``: what the
    refusal of a folder holding other files tells the user to do (a resume has no ``--out`` to change).

    Raises:
        OutputError: ``out`` is a file, or a folder with files not written for this run (and
            ``overwrite`` is false).
    """
    path = Path(out)
    try:
        exists = path.exists()
    except OSError as err:  # a name the file system cannot hold (too long, a bad character)
        shown = repr(str(path)) if len(str(path)) <= 60 else f"{str(path)[:60]!r}..."
        raise OutputError(f"{option}: {shown}: {err.strerror or err}; choose a shorter or plainer path") from None
    if not exists and path.is_symlink():  # a dangling link: writing there would create its target
        raise OutputError(f"{option}: {str(path)!r} is a link to {str(path.readlink())!r}, which does not exist; "
                          "choose another folder, or create its target")
    if exists and not path.is_dir():
        raise OutputError(f"{option}: {str(path)!r} is a file, not a folder; choose a folder path")
    if not exists:
        return path
    marker = read_marker(path)
    if marker is not None and marker.get("run_uuid") == run_uuid:
        return path
    others = sorted(p.name for p in path.iterdir())
    folders = [name for name in OUTPUT_FILES if (path / name).is_dir() and not (path / name).is_symlink()]
    if folders:  # replacing a folder by a file would delete what is in it, and fails after the whole run
        raise OutputError(f"{option}: {str(path / folders[0])!r} is a folder where selftune writes a file; "
                          "move it elsewhere or choose another folder")
    if not others or overwrite:
        return path
    owner = f" (outputs of run {marker.get('run_id')} of {marker.get('store')})" if marker else ""
    shown = ", ".join(others[:4]) + (", ..." if len(others) > 4 else "")
    raise OutputError(f"{option}: folder {str(path)!r} is not empty ({shown}){owner}; {fix}")


def mark_folder(out: Path, run_uuid: str, run_id: int | None, store: str) -> None:
    """Write the marker that says ``out`` holds run ``run_uuid``'s files (so the run may later write there)."""
    marker = {"run_uuid": run_uuid, "run_id": run_id, "store": store, "files": list(OUTPUT_FILES)}
    write_atomic(out / MARKER, lambda p: p.write_text(json.dumps(marker) + "\n"))  # a link there: replaced


def _umask() -> int:
    """The process's umask (Python reads it only by setting it: set and put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Write ``path`` through ``write(temporary path)`` and an atomic rename: a link the user left at
    ``path`` is replaced, never written through (its target is not ours), and a reader never sees half a
    file. The temporary file keeps ``path``'s suffix (matplotlib picks the format by it)."""
    # (the name's first 40 characters: a temporary name past the file system's 255 bytes failed after a whole run)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem[:40]}.", suffix=f".selftune-tmp{path.suffix[:16]}",
                                dir=path.parent)
    os.close(fd)  # a fresh name no other writer (thread, process, host) has: the writer opens it again
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make a shared report private
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_csv(path: Path, rows: list[dict[str, float]], columns: list[str] | None = None) -> None:
    """Rows as CSV (NaN as an empty cell). With no rows, ``columns`` alone as the header, so a reader
    (pandas, a plot script) still finds the columns; an empty file when neither is known."""
    if not rows and not columns:
        path.write_text("")
        return
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})


def _trajectory_columns(history: list[dict[str, float]]) -> list[str] | None:
    """The trajectory's columns, for a run shorter than ``log_every`` (no trajectory row): an epoch row
    holds the same values after its ``seconds`` column (see ``RunLog.log_row`` and ``epoch_row``)."""
    if not history or "seconds" not in history[0]:
        return None
    keys = list(history[0])
    return ["step", "epoch", *keys[keys.index("seconds") + 1:], "train_loss", "val_loss"]


def _render(folder: Path, fit: FitResult, result: RunResult) -> None:

    from .report.plots import plot_losses, plot_trajectory
    from .store._recorder import torch_save

    (folder / "result.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
    torch_save(fit.net.state_dict(), folder / "model.pt", folder / "model.pt")  # a full disk: an OSError
    write_csv(folder / "trajectory.csv", fit.trajectory, _trajectory_columns(fit.history))
    write_csv(folder / "epochs.csv", fit.history)
    if fit.schedule is not None:  # what a plain loop or `[tuner] follow` can replay (selftune.schedules)
        fit.schedule.to_csv(folder / "schedule.csv")
    names = fit.net.space.names
    plot_trajectory(fit.trajectory, names, folder / "trajectory.png", title=f"{result.method} hyperparameters")
    plot_losses(fit.trajectory, fit.history, folder / "losses.png", title=f"{result.method} losses")


def write_outputs(out: str | Path, fit: FitResult, result: RunResult, *, store: str = "",
                  overwrite: bool = False) -> Path:
    """Write :data:`OUTPUT_FILES` and the marker into ``out`` under the rules of this module.

    Raises:
        OutputError: the folder was claimed by something else since the run started.
    """
    assert result.run_uuid, "a recorded run has a UUID"
    out = claim_folder(out, result.run_uuid, overwrite=overwrite, option=f"run {result.run_id}'s output folder",
                       fix="another run took it while this one trained (--overwrite); move its files elsewhere")
    out.parent.mkdir(parents=True, exist_ok=True)
    fresh = not out.exists()
    # a short prefix: a folder name near the 255-byte limit passed every check, and its longer temporary
    # sibling failed after the whole run had trained ("File name too long"), for good, at every resume
    tmp = Path(tempfile.mkdtemp(prefix=f".{(out.name or 'out')[:40]}.selftune-", dir=out.parent if fresh else out))
    try:
        if fresh:  # it becomes the output folder: as a mkdir would make it, not mkdtemp's 0700
            os.chmod(tmp, 0o777 & ~_umask())
        _render(tmp, fit, result)
        mark_folder(tmp, result.run_uuid, result.run_id, store)
        if fresh:
            os.replace(tmp, out)
            return out
        for name in (*OUTPUT_FILES, MARKER):
            if (tmp / name).exists():  # a population run's result has no schedule of its own
                os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

"""Run configuration: a TOML file validated by pydantic, with one-line errors that name the field.

Loading is split from running so that every check (types, bounds, references between sections,
model arguments) happens before anything is written. The format is documented in docs/config.md.
"""

from __future__ import annotations

import copy
import math
import re
import tomllib
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .algorithms import ALGORITHMS, DEFAULT_ALGORITHM
from .augment import Augment, Cutout, Flip, Noise, Shift
from .errors import ConfigError, from_validation
from .objective import Objective
from .settings import TunerSettings
from .space import Float, Int, Space

__all__ = ["ConfigError", "RunConfig", "apply_overrides", "load_config"]


_STRICT = ConfigDict(extra="forbid", frozen=True, strict=True)  # TOML has real types: no "5" for 5


class DataConfig(BaseModel):
    model_config = _STRICT
    name: str
    val_fraction: float = Field(0.2, gt=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    train_subset: int = Field(0, ge=0)
    test_subset: int = Field(0, ge=0)
    val_subset: int = Field(0, ge=0, description="keep only this many validation examples (0: all)")
    split_seed: int = 0
    seq_len: int = Field(35, ge=2, description="tokens per example, for text corpora (ptb)")


class ModelConfig(BaseModel):
    """``name`` picks a reference model; every other key is passed to its constructor."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)
    name: str

    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TaskConfig(BaseModel):
    """``[task]``: a user's own model and data, built by a Python function (:mod:`selftune.task`)."""

    model_config = _STRICT
    source: str = Field(description="'path/to/file.py:function' (relative to the config file) or "
                                    "'package.module:function'; it returns a selftune.Task")
    args: dict[str, Any] = Field({}, description="keyword arguments of the function")


class HyperparameterConfig(BaseModel):
    model_config = _STRICT
    type: Literal["float", "int"] = "float"
    low: float
    high: float
    init: float
    log: bool = False


class ObjectiveConfig(BaseModel):
    model_config = _STRICT
    weight_decay: str | float | dict[str, str | float] | None = Field(
        None, description="a hyperparameter's name or a constant for every weight matrix and kernel, or a table "
                          "from layer patterns (module names as model.named_modules() gives them, fnmatch patterns, "
                          "a block's name covering its layers; the first match wins) to names or constants: one decay "
                          "per layer group; layers no pattern names are not decayed")
    label_smoothing: str | float | None = None


_Strength = str | float


def _constant_strengths(op: BaseModel) -> BaseModel:
    """A constant strength is >= 0 (a negative one was accepted and acted as its size), a flip's p <= 1."""
    for name, value in op:
        if isinstance(value, float) and not 0.0 <= value <= (1.0 if name == "p" else math.inf):
            raise ValueError(f"{name} = {value:g} is outside {'[0, 1]' if name == 'p' else '[0, inf)'}; give a "
                             "strength in it or a hyperparameter's name")
    return op


class CutoutConfig(BaseModel):
    model_config = _STRICT
    _strengths = model_validator(mode="after")(_constant_strengths)
    op: Literal["cutout"]
    length: _Strength
    holes: _Strength = 1.0


class NoiseConfig(BaseModel):
    model_config = _STRICT
    _strengths = model_validator(mode="after")(_constant_strengths)
    op: Literal["noise"]
    std: _Strength


class ShiftConfig(BaseModel):
    model_config = _STRICT
    _strengths = model_validator(mode="after")(_constant_strengths)
    op: Literal["shift"]
    max_shift: _Strength


class FlipConfig(BaseModel):
    model_config = _STRICT
    _strengths = model_validator(mode="after")(_constant_strengths)
    op: Literal["flip"]
    p: _Strength


AugmentConfig = Annotated[CutoutConfig | NoiseConfig | ShiftConfig | FlipConfig, Field(discriminator="op")]


class BenchConfig(BaseModel):
    """How ``selftune bench`` measures this config (``selftune run`` ignores the table).

    ``starts`` names initial hyperparameter values to run every single-run method from, e.g.
    ``overfit`` (little regularisation), ``default`` and ``overreg`` (too much): a tuner must find the
    right direction from each. Names missing from a start keep the space's ``init``. Without starts
    the space's ``init`` is the one start. Searches and PBT sample the whole space, so they run once
    per seed whatever the starts.
    """

    model_config = _STRICT
    starts: dict[str, dict[str, float | int]] = {}
    #: the hyperparameters the ``grid`` method varies (default: every one); the others stay at their init
    grid: list[str] = []


class RunConfig(BaseModel):
    """A whole run: what to train, what to tune, and how."""

    model_config = _STRICT
    method: str = Field(DEFAULT_ALGORITHM, description="an in-loop algorithm of selftune.algorithms.ALGORITHMS")
    seed: int = Field(0, ge=-(2**31), le=2**31 - 1, description="seeds the model's initialisation and the "
                                                               "tuner's generator; a 32-bit integer, which every "
                                                               "store (PostgreSQL's integer column) can record")
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    epochs: int = Field(ge=1)
    task: TaskConfig | None = None
    data: DataConfig | None = None
    model: ModelConfig | None = None
    space: dict[str, HyperparameterConfig] = {}
    tuner: TunerSettings = TunerSettings()
    objective: ObjectiveConfig = ObjectiveConfig()
    augment: list[AugmentConfig] = []
    bench: BenchConfig = BenchConfig()

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in ALGORITHMS:
            raise ValueError(f"unknown method {v!r}; choose one of {list(ALGORITHMS)}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _task_or_data(cls, raw: Any) -> Any:
        """A ``[task]`` with keys of ``[data]``/``[model]`` (``--set data.train_subset=10``) is refused before
        those tables are validated: their own check said ``data.name: is required``, a fix the next run
        refused as "a [task] builds its own model and data"."""
        if isinstance(raw, Mapping) and raw.get("task") is not None:
            for other in ("data", "model"):
                table = raw.get(other)
                if table is not None:
                    key = f"{other}.{next(iter(table))}" if isinstance(table, Mapping) and table else other
                    raise ConfigError(key, "does not apply to a [task] config, whose function builds its own model "
                                           "and data; remove it (or the [task] table)")
        return raw

    @model_validator(mode="after")
    def _one_task(self) -> RunConfig:
        """A run trains either a user's ``[task]`` or a built-in ``[data]`` + ``[model]``."""
        if self.task is not None:
            for other in ("data", "model"):
                if getattr(self, other) is not None:
                    raise ConfigError(other, "a [task] builds its own model and data; remove the "
                                             f"[{other}] table (or the [task] table)")
            return self
        for needed in ("data", "model"):
            if getattr(self, needed) is None:
                raise ConfigError(needed, f"is required: add a [{needed}] table for a built-in {needed}, or a "
                                          "[task] table naming your own function (source = \"file.py:function\")")
        if not self.space:
            raise ConfigError("space", "declare at least one hyperparameter as a [space.NAME] table")
        return self

    @property
    def data_name(self) -> str:
        """How tables and listings name the data: the built-in dataset, or the task's function."""
        if self.task is not None:
            return self.task.source.rpartition(":")[2]
        assert self.data is not None
        return self.data.name

    @property
    def model_name(self) -> str:
        if self.task is not None:
            return "own model"
        assert self.model is not None
        return self.model.name

    @model_validator(mode="after")
    def _starts_in_space(self) -> RunConfig:
        if self.task is not None and not self.space:
            return self  # the task's space is read next (parse_config), and this check runs again then
        for start, values in self.bench.starts.items():
            for name, value in values.items():
                if name not in self.space:
                    raise ConfigError(f"bench.starts.{start}.{name}", f"is not declared in the space (it has "
                                                                      f"{list(self.space)})")
                h = self.space[name]
                if not h.low <= value <= h.high:
                    raise ConfigError(f"bench.starts.{start}.{name}", f"{value} is outside the range "
                                                                      f"[{h.low}, {h.high}] of space.{name}")
        if len(set(self.bench.grid)) < len(self.bench.grid):
            raise ConfigError("bench.grid", f"names a hyperparameter twice ({self.bench.grid}); list each once")
        for name in self.bench.grid:
            if name not in self.space:
                raise ConfigError("bench.grid", f"{name!r} is not declared in the space (it has {list(self.space)})")
        return self

    def starts(self) -> dict[str, RunConfig]:
        """The config at each of its benchmark starts (``{"init": self}`` when it declares none)."""
        if not self.bench.starts:
            return {"init": self}
        return {name: self.derive(values=values) for name, values in self.bench.starts.items()}

    # -- derived configs: typed edits, validated like a file --------------------------------------
    def derive(self, *, method: str | None = None, seed: int | None = None,
               values: dict[str, float | int] | None = None, epochs: int | None = None,
               device: str | None = None, train_subset: int | None = None) -> RunConfig:
        """A copy with another method, seed, epochs, device, training subset, or hyperparameter init ``values``
        (what searches, PBT and the harness train), validated exactly as a config file is.

        Raises:
            ConfigError: a value the schema refuses (unknown method, a value outside its bounds,
                a name not in the space).
        """
        raw = self.model_dump(mode="python")
        for key, value in (("method", method), ("seed", seed), ("epochs", epochs), ("device", device)):
            if value is not None:
                raw[key] = value
        if train_subset is not None:
            if raw.get("data") is None:
                raise ConfigError("data.train_subset", "a [task] builds its own data; pass a smaller data set "
                                                       "through [task.args]")
            raw["data"]["train_subset"] = train_subset
        for name, value in (values or {}).items():
            if name not in raw["space"]:
                raise ConfigError(f"space.{name}", f"is not declared; the space has {list(raw['space'])}")
            h = raw["space"][name]
            h["init"] = int(value) if h["type"] == "int" else float(value)
        return parse_config(raw)

    # -- the objects the config describes --------------------------------------------------------
    def resolve_device(self) -> str:
        """``"cpu"`` or ``"cuda"``; ``"auto"`` takes the GPU when one is visible.

        Raises:
            ConfigError: ``device = "cuda"`` on a machine without a visible CUDA device.
        """
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device", 'no CUDA device is visible here; use device = "cpu" or "auto", or run '
                                        "on a machine with a GPU")
        return self.device

    def build_space(self) -> Space:
        params: list[Float | Int] = []
        for name, h in self.space.items():
            try:
                if h.type == "int":
                    for f in ("low", "high", "init"):
                        if float(getattr(h, f)) != int(getattr(h, f)):
                            raise ValueError(f"{name}.{f} must be an integer for type = \"int\"")
                    if h.log:
                        raise ValueError(f"{name}.log is only supported for type = \"float\"")
                    params.append(Int(name, int(h.low), int(h.high), int(h.init)))
                else:
                    params.append(Float(name, h.low, h.high, h.init, log=h.log))
            except ValueError as err:
                message = str(err).removeprefix(f"{name}.").removeprefix(f"{name}: ")
                raise ConfigError(f"space.{name}", message) from None
        try:
            return Space(params)
        except ValueError as err:  # a name the run's records reserve
            bad = next((p.name for p in params if f"{p.name!r}" in str(err)), None)
            message = str(err).removeprefix(f"hyperparameter {bad!r}: ") if bad else str(err)
            raise ConfigError(f"space.{bad}" if bad else "space", message) from None

    def build_objective(self) -> Objective:
        return Objective(weight_decay=self.objective.weight_decay, label_smoothing=self.objective.label_smoothing)

    def build_augment(self) -> Augment | None:
        if not self.augment:
            return None
        kinds = {"cutout": Cutout, "noise": Noise, "shift": Shift, "flip": Flip}
        return Augment([kinds[a.op](**a.model_dump(exclude={"op"})) for a in self.augment])

    def check_references(self, space: Space, task_names: Callable[[], Collection[str]] | None = None) -> None:
        """Every hyperparameter named by the objective, an augmentation, the rate or the momentum must be
        declared (checked before a run creates anything). ``task_names``: the names of the space a ``[task]``
        returns, which this config's whole ``[space.*]`` tables replaced (asked for only to explain an error)."""
        refs = [(f"objective.{k}", v) for k, v in self.objective.model_dump().items() if not isinstance(v, dict)]
        if isinstance(self.objective.weight_decay, dict):
            refs += [(f"objective.weight_decay[\"{k}\"]", v) for k, v in self.objective.weight_decay.items()]
        refs.append(("tuner.lr", self.tuner.lr))
        refs.append(("tuner.momentum", self.tuner.momentum))
        for i, a in enumerate(self.augment):
            refs += [(f"augment[{i}].{k}", v) for k, v in a.model_dump(exclude={"op"}).items()]
        for where, value in refs:
            if isinstance(value, str) and value not in space:
                table = value if value.isprintable() and value.strip() == value and value else "NAME"  # one line
                names = list(task_names()) if task_names is not None else []
                why = (f" (the task's space declares it, but this config's whole [space.*] tables replace the task's "
                       f"space: declare each of {names} you keep)") if value in names else ""
                raise ConfigError(where, f"{value!r} is not declared{why}; add a [space.{table}] table or use a "
                                         "number")


def comparable(dumped: dict[str, Any]) -> dict[str, Any]:
    """A dumped config (``RunConfig.model_dump(mode="json")``) as what compares equal for what it trains:
    the tables whose order decides (``tuner.lr_scales`` and a table of ``objective.weight_decay``: the first
    pattern that names a layer wins) become lists of pairs when their order is not sorted (a dict compares,
    and ``json.dumps(sort_keys=True)`` hashes, without order), and an empty ``lr_scales`` is left out, as
    configs recorded before the setting existed lack it (their kept runs and studies go on)."""
    out = copy.deepcopy(dumped)
    tuner, objective = out.get("tuner") or {}, out.get("objective") or {}
    if tuner.get("lr_scales") == {}:
        del tuner["lr_scales"]
    for table, key in ((tuner, "lr_scales"), (objective, "weight_decay")):
        value = table.get(key)
        if isinstance(value, dict) and list(value) != sorted(value):
            table[key] = [[k, v] for k, v in value.items()]
    return out


def parse_config(raw: dict[str, Any]) -> RunConfig:
    """Validate a config mapping (as read from TOML).

    Raises:
        ConfigError: the first problem, naming its field.
    """
    if _partial_tables(raw):
        raw = {**raw, "space": _laid_over_task_space(raw)}
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as err:
        error = from_validation(err)
        if raw.get("task") and error.field.startswith("space.") and error.message == "is required":
            name = error.field.split(".")[1]
            raise ConfigError(error.field, f"is required: the task's space does not declare {name!r}, so declare "
                                           "it whole (low, high, init)") from None
        raise error from None
    if config.task is not None:
        from .task import resolve_source

        source = resolve_source(config.task.source)
        if source != config.task.source or not config.space:
            raw = config.model_dump(mode="python")
            raw["task"]["source"] = source
            if not config.space:
                raw["space"] = _task_space(raw)
            return parse_config(raw)
    replaced = None
    if config.task is not None and config.space:
        def replaced() -> list[str]:  # the task's own names, read only to explain an undeclared one
            try:
                return list(_task_space(config.model_dump(mode="python")))
            except Exception:  # (the error being explained is the one to raise)
                return []
    config.check_references(config.build_space(), replaced)
    return config


def _partial_tables(raw: dict[str, Any]) -> list[str]:
    """The ``[space.NAME]`` tables of a ``[task]`` config that leave out ``low``, ``high`` or ``init``."""
    space = raw.get("space")
    if not isinstance(raw.get("task"), dict) or not isinstance(space, dict):
        return []
    return [name for name, table in space.items()
            if isinstance(table, dict) and not {"low", "high", "init"} <= table.keys()]


def _laid_over_task_space(raw: dict[str, Any]) -> dict[str, Any]:
    """The task's own space with the config's ``[space]`` tables laid over it, field by field.

    Why: ``--set space.dropout1.init=0.5`` (or a ``[space.dropout1]`` table giving only ``init``) means
    "start this one elsewhere"; replacing the task's whole space with a table of one key refused it, and
    the user had to copy every hyperparameter out of the task's code. Whole tables alone still replace the
    task's space (a config that declares its own space entirely)."""
    try:
        task = TaskConfig.model_validate(raw["task"])
    except ValidationError as err:
        raise from_validation(err, prefix="task") from None
    from .task import resolve_source

    try:
        own = _task_space({"task": {"source": resolve_source(task.source), "args": task.args}})
    except ConfigError as err:
        if err.field != "space":
            raise
        name = _partial_tables(raw)[0]
        raise ConfigError(f"space.{name}", "gives only some of low, high and init, but the task returns no space "
                                           "(Task.space) to take the others from; declare it whole") from None
    merged = {name: dict(table) for name, table in own.items()}
    for name, table in raw["space"].items():
        merged[name] = {**merged.get(name, {}), **table} if isinstance(table, dict) else table
    return merged


def _task_space(raw: dict[str, Any]) -> dict[str, Any]:
    """The ``[space]`` tables of the space a task function returns (a config without ``[space]``).

    Raises:
        ConfigError: the task returns no space either.
    """
    from .task import call_task

    task = call_task(raw["task"]["source"], raw["task"]["args"])
    if task.space is None:
        raise ConfigError("space", "the task returns no space (Task.space) and the config declares none; add "
                                   "[space.NAME] tables or return a selftune.Space from the task")
    return {p.name: {"type": "int" if p.is_int else "float", "low": p.low, "high": p.high, "init": p.init,
                     "log": bool(p.log)} for p in task.space}


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file; unreadable or malformed files raise :class:`ConfigError`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")  # an editor's byte-order mark is no TOML statement
    except FileNotFoundError:
        raise ConfigError("CONFIG", f"file {str(p)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError("CONFIG", f"cannot read {str(p)!r}: {err.__class__.__name__}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError("CONFIG", f"{str(p)!r} is not valid TOML: {err}") from None


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    if re.fullmatch(r"[+-]?(\d*\.\d+|\d+\.)([eE][+-]?\d+)?", text.strip()):
        return float(text)  # .5 and 1. are numbers on a command line, though TOML wants 0.5 and 1.0
    return text  # bare words are strings: --set data.name=mnist


def _split_override(item: str) -> tuple[str, str, str]:
    """``key=value`` at the first ``=`` outside a quoted part of the key (a layer pattern may hold one)."""
    quote = None
    for i, char in enumerate(item):
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == "=":
            return item[:i], "=", item[i + 1:]
    return item, "", ""


def _key_path(key: str) -> list[str]:
    """The parts of ``--set``'s key as TOML reads a dotted key, so a quoted part keeps its dots
    (``objective.weight_decay."encoder.0"``: a per-layer decay pattern names a nested layer); a key TOML
    cannot read is split on its dots."""
    try:
        node: Any = tomllib.loads(f"{key} = 0")
    except tomllib.TOMLDecodeError:
        return key.split(".")
    parts = []
    while isinstance(node, dict) and len(node) == 1:
        (part, node), = node.items()
        parts.append(part)
    return parts


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as TOML, else taken as strings).

    Raises:
        ConfigError: on a malformed override or a path through a non-table.
    """
    for item in overrides:
        key, sep, value = _split_override(item)
        if not sep or not key.strip():
            raise ConfigError("--set", f"{item!r} must look like key.path=value")
        parts = _key_path(key.strip())
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError("--set", f"{'.'.join(parts[: i + 1])} is not a table, cannot set {key}")
            node = child
        node[parts[-1]] = _parse_value(value.strip())
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a run config; a file path in ``[task] source`` or ``tuner.optimizer``
    is taken relative to the config file's folder and recorded absolute."""
    raw = apply_overrides(read_toml(path), overrides or [])
    task = raw.get("task")
    if isinstance(task, dict) and isinstance(task.get("source"), str):
        from .task import resolve_source

        task["source"] = resolve_source(task["source"], Path(path).resolve().parent)
    tuner = raw.get("tuner")
    if isinstance(tuner, dict) and isinstance(tuner.get("optimizer"), str) and ":" in tuner["optimizer"]:
        from .task import resolve_source

        tuner["optimizer"] = resolve_source(tuner["optimizer"], Path(path).resolve().parent, field="tuner.optimizer",
                                            what="class")
    if isinstance(tuner, dict) and isinstance(tuner.get("follow"), str):
        tuner["follow"] = _read_schedule(tuner["follow"], Path(path).resolve().parent)
    return parse_config(raw)


def _read_schedule(file: str, folder: Path) -> dict[str, Any]:
    """``[tuner] follow = "schedule.csv"``: the file's schedule, stored in the config itself so that a
    resumed run follows the same values even if the file changed or moved."""
    from .schedules import HyperSchedule

    path = Path(file).expanduser()
    try:
        return HyperSchedule.load(path if path.is_absolute() else folder / path).model_dump(mode="python")
    except ValueError as err:
        raise ConfigError("tuner.follow", f"{err}; give a schedule.csv or .json written by a run (see "
                                          "docs/config.md)") from None

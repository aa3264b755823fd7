"""A task is a user's Python callable that returns the model, the data and (optionally) the space and loss.

``selftune run``, ``resume``, ``bench``, the searches and PBT reach a user's own problem through one
contract: a config's ``[task] source = "path/to/file.py:function"`` (or ``"package.module:function"``)
names a function that returns a :class:`Task`. Every run calls it afresh, after seeding PyTorch with
the run's seed, so the model's initialisation follows the seed and a resumed run rebuilds the same
model; keep the data split independent of that seed, so that every method and seed sees the same split.

A file path is resolved against the config file's folder and recorded absolute, so a recorded run
resumes from any working directory. Importing runs the file as a module named after its path, once
per process.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["Task", "call_task", "load_callable", "resolve_source", "source_digest"]


@dataclass
class Task:
    """What a task callable returns.

    Attributes:
        model: a plain ``nn.Module`` (its regularisers are :class:`selftune.Dropout` and friends, named
            after hyperparameters); selftune converts its layers (:func:`selftune.hypernetize`).
        train, val: training data and the validation data the hyperparameters are tuned on: a pair
            of tensors, a map-style Dataset (of pairs or dicts) or a DataLoader over one.
        test: held-out data every method is scored on at the end (same forms). Required by every command
            (``prepare`` refuses a task without it); ``None`` only where a caller scores nothing.
        space: the hyperparameters (a :class:`selftune.Space`), used when the config declares no
            ``[space]`` (a config's ``[space]`` replaces it, so ranges and starts change without code).
        loss: ``loss(outputs, targets) -> scalar`` mean loss; ``None``: cross-entropy.
        metrics: ``{name: metric(outputs, targets)}`` batch means, reported beside the loss.
        input_key, target_key: which keys of dict examples are the input(s) and the target.
        name: how tables and listings name the data (default: the function's name).
        batch_dim: 1 for a sequence-first model (``(T, B, ...)`` inputs), see :func:`selftune.hypernetize`.
    """

    model: Any
    train: Any
    val: Any
    test: Any = None
    space: Any = None
    loss: Callable[[Any, Any], Any] | None = None
    metrics: Mapping[str, Callable[[Any, Any], Any]] = field(default_factory=dict)
    input_key: str | Sequence[str] | None = None
    target_key: str | None = None
    name: str = ""
    batch_dim: int = 0


def resolve_source(source: str, base: Path | None = None, *, field: str = "task.source",
                   what: str = "function") -> str:
    """``source`` with a relative file path made absolute against ``base`` (default: the working folder).

    ``field`` and ``what`` name the setting in errors: the same syntax names a task's function and a
    user's optimizer class (``tuner.optimizer``).

    Raises:
        ConfigError: not of the form ``file.py:function`` or ``module:function``.
    """
    path, sep, func = source.rpartition(":")
    if not sep or not path or not func.isidentifier():
        raise ConfigError(field, f"{source!r} must look like 'path/to/file.py:{what}' or 'package.module:{what}'")
    if path.endswith(".py"):
        p = Path(path).expanduser()
        if not p.is_absolute():
            p = (base or Path.cwd()) / p
        return f"{p.resolve()}:{func}"
    return source


def source_digest(source: str) -> str | None:
    """SHA-256 of the task's file (``None`` for a module path): a result records which code it ran."""
    path = source.rpartition(":")[0]
    if not path.endswith(".py"):
        return None
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def code_digest(source: str) -> str:
    """``"file.py:name"`` as the contents of the file and of the modules beside it that it can import, not its
    path: what a search's study name and a benchmark's kept runs compare (an edited helper module trains
    something else). A module path (``"package.module:name"``) stays as given (studies are named so);
    :func:`module_digest` reads its own file for kept runs."""
    path, _, name = source.rpartition(":")
    file = Path(path)
    if not (path.endswith(".py") and file.is_file()):
        return source
    folder = file.resolve().parent
    contents = hashlib.sha1()
    for module in _importable(folder):
        try:
            text = module.read_bytes()
        except OSError:  # unreadable (permissions, gone since the listing): Python could not import it either
            continue
        contents.update(module.relative_to(folder).as_posix().encode() + b"\0" + text + b"\0")
    return f"{contents.hexdigest()}:{file.name}:{name}"


def _importable(folder: Path) -> list[Path]:
    """The modules a file in ``folder`` can import from it: the ``.py`` files there and, through every
    package (a folder with ``__init__.py``, not hidden), theirs, sorted. A virtual environment or data
    folder beside the task (no ``__init__.py``) is not read."""
    # regular files only, not hidden: an editor's lock file (Emacs' dangling link ".#task.py") or a folder
    # named *.py is no module Python imports, and reading it failed the whole search
    found = sorted(f for f in folder.glob("*.py") if f.is_file() and not f.name.startswith("."))
    for sub in sorted(folder.iterdir()):
        if sub.is_dir() and not sub.name.startswith((".", "__")) and (sub / "__init__.py").is_file():
            found += _importable(sub)
    return found


def module_digest(source: str) -> str:
    """``"package.module:name"`` as the contents of the file the module imports from (its own file only: a
    module installed in ``site-packages`` has thousands beside it), or as given where none is found; a
    ``"file.py:name"`` as :func:`code_digest`."""
    path, _, name = source.rpartition(":")
    if path.endswith(".py"):
        return code_digest(source)
    file = _module_file(path)
    try:
        return f"{hashlib.sha1(file.read_bytes()).hexdigest()}:{name}" if file is not None else source
    except OSError:
        return source


def _module_file(dotted: str) -> Path | None:
    """The file a module path imports from, without importing it (``None``: none found)."""
    try:
        spec = importlib.util.find_spec(dotted)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec is not None and spec.origin and spec.origin.endswith(".py") else None


@contextmanager
def seeded_import() -> Iterator[None]:
    """Import a task's module with PyTorch's, NumPy's and Python's global generators seeded from 0, and put
    the caller's back after. A quick task often draws its data at module level (``X = torch.randn(300, 5)``
    beside the function); imported unseeded, the same config and seed trained on other data in every
    process, and a resumed run went on with data its checkpoint never saw. A module is imported once per
    process, so its draws cannot follow a run's seed (a bench runs many): they follow this fixed one, and
    the task function itself runs after PyTorch is seeded from the run's seed."""
    import random

    import numpy as np
    import torch

    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):  # the CPU generator only: a GPU's are neither seeded nor touched
        torch.random.default_generator.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


def seed_task_generators(seed: int) -> None:
    """Seed PyTorch's (CPU), NumPy's and Python's global generators from a run's seed before its task
    function runs: the "seed everything" a task's own draws (a split by ``np.random.permutation``,
    ``train_test_split`` without a ``random_state``, ``random.shuffle``) need to give one split per seed, in
    every process, and the same one when the run is resumed."""
    import random

    import numpy as np
    import torch

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def load_callable(source: str, *, field: str = "task.source", what: str = "function") -> Callable[..., Any]:
    """Import the function (or class: ``what``) ``source`` names; errors name ``field``.

    Raises:
        ConfigError: a missing file or module, an import that fails (with its first line), or a name
            that is not a callable of it.
    """
    path, _, func = source.rpartition(":")
    if path.endswith(".py"):
        file = Path(path)
        if not file.is_file():
            raise ConfigError(field, f"file {path!r} does not exist")
        name = "selftune_task_" + hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:12]
        module = sys.modules.get(name)
        if module is None:
            # its own folder is importable, so a task split over several files (``from helpers import
            # ...``) loads. Appended (a script's folder would come first): an installed package of the
            # same name wins, so a task cannot shadow one for the rest of the process; name helpers apart.
            folder = str(file.resolve().parent)
            if folder not in sys.path:
                sys.path.append(folder)
            spec = importlib.util.spec_from_file_location(name, file)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                with seeded_import():
                    spec.loader.exec_module(module)
            except ImportError as err:
                del sys.modules[name]
                if "no known parent package" not in str(err):
                    raise ConfigError(field, f"importing {path!r} failed: {_first_line(err)}") from err
                with seeded_import():
                    module = _import_in_package(file, path, field)  # ``from .models import Net``
            except Exception as err:
                del sys.modules[name]
                raise ConfigError(field, f"importing {path!r} failed: {_first_line(err)}") from err
    else:
        try:
            with seeded_import():
                module = importlib.import_module(path)
        except ModuleNotFoundError as err:
            raise ConfigError(field, f"no module named {err.name!r}; install it or give a file path "
                                     f"'path/to/file.py:{what}'") from None
        except Exception as err:
            raise ConfigError(field, f"importing {path!r} failed: {_first_line(err)}") from err
    fn = getattr(module, func, None)
    if not callable(fn):
        raise ConfigError(field, f"{path!r} has no {what} {func!r}")
    return fn


def _import_in_package(file: Path, path: str, field: str) -> Any:
    """Import ``file`` as the module of its package (folders with ``__init__.py`` above it), so its relative
    imports resolve: the outermost package's parent joins ``sys.path`` (appended, as the file's own folder)."""
    parts, folder = [file.stem], file.resolve().parent
    while (folder / "__init__.py").is_file():
        parts.insert(0, folder.name)
        folder = folder.parent
    if len(parts) == 1:
        raise ConfigError(field, f"importing {path!r} failed: it uses a relative import, but its folder is no "
                                 "package; add an __init__.py beside it, or import its helpers by their names")
    dotted = ".".join(parts)
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
    try:
        module = importlib.import_module(dotted)
    except Exception as err:
        raise ConfigError(field, f"importing {path!r} as {dotted!r} failed: {_first_line(err)}") from err
    if Path(getattr(module, "__file__", "") or "").resolve() != file.resolve():
        raise ConfigError(field, f"{dotted!r} is another module ({module.__file__}) than {path!r}: a package named "
                                 f"{parts[0]!r} is installed; rename yours or install it (pip install -e)")
    return module


def call_task(source: str, args: Mapping[str, Any]) -> Task:
    """Call the task function with ``args`` and check what it returns.

    Raises:
        ConfigError: arguments the function does not take, an exception inside it, or a return
            value that is not a :class:`Task` with a module and data.
    """
    fn = load_callable(source)
    try:
        signature = inspect.signature(fn)
        signature.bind(**args)
    except TypeError as err:
        takes = ", ".join(signature.parameters) or "no arguments"
        raise ConfigError("task.args", f"{err}; {fn.__name__} takes {takes}") from None
    except ValueError:  # no signature (a builtin): let the call say what is wrong
        pass
    try:
        task = fn(**args)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError("task.source", f"{fn.__name__}(...) raised {_first_line(err)}") from err
    import torch

    if not isinstance(task, Task):
        raise ConfigError("task.source", f"{fn.__name__} returned a {type(task).__name__}; return "
                                         "selftune.Task(model=..., train=..., val=..., test=...)")
    if not isinstance(task.model, torch.nn.Module):
        raise ConfigError("task.source", f"{fn.__name__}: Task.model is a {type(task.model).__name__}, not an "
                                         "nn.Module")
    task.name = task.name or fn.__name__
    return task


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


#: Examples of a dataset that is not made of tensors read for its digest (spread over it): reading all of them
#: would cost an epoch of loading at every start.
SAMPLED_EXAMPLES = 64


def data_digest(splits: Mapping[str, Any]) -> str:
    """SHA-1 of the values a task's splits hold: what a benchmark compares before it keeps an earlier run, and
    a resume before it says nothing changed. A task that reads a file beside it (``data.csv``) builds the same
    code and split sizes from other values once the file is edited; only the values tell.

    Tensors (pairs, ``TensorDataset``s, a loader over one) are hashed whole, in slices (no copy of the data);
    another dataset by :data:`SAMPLED_EXAMPLES` examples spread over it, fetched with PyTorch's, Python's and
    NumPy's generators seeded (a random transform gives the same values every time) and put back after. Only
    values that read the same in every process are hashed: tensors, arrays, numbers, strings, images (their
    pixels), containers of them; another object counts by its type alone (its ``repr`` names an address)."""
    import random

    import numpy as np
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from .batches import loader_dataset

    digest = hashlib.sha1()
    slice_bytes = 1 << 26

    def add_array(a: np.ndarray) -> None:
        if a.dtype == object:
            add(a.tolist())
            return
        digest.update(f"{a.dtype}{a.shape}".encode())
        flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        for at in range(0, len(flat), slice_bytes):
            digest.update(memoryview(flat[at:at + slice_bytes]))

    def add(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            if t.layout != torch.strided or t.is_meta or not t.numel():
                return
            t = t.resolve_conj().resolve_neg().reshape(-1)
            step = max(1, slice_bytes // t.element_size())
            for at in range(0, len(t), step):  # (a slice at a time: a GPU tensor is not copied to the host whole)
                digest.update(memoryview(t[at:at + step].cpu().contiguous().view(torch.uint8).numpy()))
        elif isinstance(value, np.ndarray):
            add_array(value)
        elif isinstance(value, np.generic | bool | int | float | complex | str | bytes) or value is None:
            digest.update(f"{type(value).__name__}:{value!r}".encode())
        elif isinstance(value, Mapping):
            for key in sorted(value, key=repr):
                digest.update(repr(key).encode())
                add(value[key])
        elif isinstance(value, tuple | list):
            digest.update(b"[")
            for item in value:
                add(item)
            digest.update(b"]")
        elif isinstance(value, set | frozenset):
            digest.update(b"{" + "\0".join(sorted(repr(v) for v in value)).encode() + b"}")
        elif hasattr(value, "__array_interface__") or hasattr(value, "getdata"):  # a PIL image: its pixels
            try:
                add_array(np.asarray(value))
            except Exception:
                digest.update(type(value).__qualname__.encode())
        else:
            digest.update(type(value).__qualname__.encode())

    for name in sorted(splits):
        data = splits[name]
        digest.update(name.encode())
        state = (random.getstate(), np.random.get_state())
        try:
            if isinstance(data, DataLoader):
                data = loader_dataset(data)
            if isinstance(data, TensorDataset):
                data = data.tensors
            if isinstance(data, tuple | list) and all(isinstance(t, torch.Tensor) for t in data):
                add(list(data))
                continue
            n = len(data)
            picks = sorted({round(k * (n - 1) / max(1, SAMPLED_EXAMPLES - 1)) for k in range(min(n, SAMPLED_EXAMPLES))})
            with torch.random.fork_rng(devices=[]):
                for i in picks:
                    torch.manual_seed(i)
                    random.seed(i)
                    np.random.seed(i)
                    add(data[i])
        except Exception:  # no map-style dataset, one that fails to fetch: the checks before training say why
            digest.update(b"unreadable")
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])
    return digest.hexdigest()

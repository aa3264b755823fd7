"""How a user's examples become ``(inputs, targets)`` batches: tensors, tuples or dicts, with any collate.

The tuner draws its examples by index (its order is part of every checkpoint, which is what makes a
resumed run equal an uninterrupted one), so it needs an indexable dataset, not an iterator. A
``DataLoader`` is accepted for what it knows about the data: its ``dataset``, its ``collate_fn``
(padding, tokenising), its workers and what its sampler says about which examples to draw: a
``SubsetRandomSampler`` (one dataset split into training and validation by index, a common PyTorch
pattern) makes the split the data, and a ``WeightedRandomSampler`` on the training data (class
balancing) draws each epoch's examples by its weights from the tuner's own seeded, checkpointed
generator. Its batch size is not used, and the tuner says so once when it differs; any other sampler is
a warning (its draw cannot be checkpointed).

``num_workers`` is honoured by :class:`Workers`: each batch the tuner asks for is fetched by the workers
in parallel, a share each (the loader's ``worker_init_fn`` and ``multiprocessing_context`` included), and
collated in the main process, and the next training batch is fetched while a step trains
(:meth:`Source.prefetch`). Each example is fetched with PyTorch's, Python's and NumPy's generators seeded
for it from the run's seed and the batch's place in the run (:func:`batch_seed`), drawing nothing from the
run's own generator, so a dataset's random transforms give the same examples whatever the number of
workers, a run whose dataset draws nothing is the same with workers as without, a run reproduces from its
seed and a resumed run fetches what the uninterrupted one fetched.

A collated batch is split into inputs and targets by :class:`Fields`:

* a 2-item tuple/list is ``(inputs, targets)``;
* a dict is split by key: ``target`` names the target, ``input`` the input (one key), or a list of
  keys, which the model then receives as keyword arguments (``model(**inputs)``, as a Hugging Face
  model takes ``input_ids`` and ``attention_mask``).

Inputs may be any nesting of tensors (dicts, tuples); :func:`batch_size`, :func:`head` and
:func:`to_device` work on them all. This is core code: it imports torch and :mod:`selftune.errors` only.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import pickle
import random
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
    default_collate,
    default_convert,
)

from .errors import ConfigTypeError, DataError, SelftuneWarning

__all__ = ["Fields", "Kwargs", "Source", "Workers", "batch_size", "early_workers", "example_seed", "head",
           "loader_dataset", "loader_sampler", "subset_origin", "to_device"]

Collate = Callable[[list[Any]], Any]


class Kwargs(dict):
    """Inputs the model takes as keyword arguments (``model(**inputs)``): several keys of a dict batch."""


@dataclass(frozen=True)
class Fields:
    """Which part of a batch is the input and which the target.

    Args:
        input: for dict examples: the key of the input, or a sequence of keys passed to the model as
            keyword arguments. ``None``: every key but the target's, as keyword arguments when more
            than one is left.
        target: for dict examples: the key of the target. ``None`` is refused for dicts (the message
            lists the keys).
    """

    input: str | Sequence[str] | None = None
    target: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target, list | tuple | set | dict):  # (an unhashable key failed inside the split)
            raise ConfigTypeError("target_key", f"must be one key of the examples (got a "
                                                f"{type(self.target).__name__}); several targets travel together: "
                                                "return them under one key (a dict or tuple) and pass a loss that "
                                                "unpacks them")
        if self.input is not None and not isinstance(self.input, str) and (
                not isinstance(self.input, Sequence) or not all(isinstance(k, str) for k in self.input)):
            raise ConfigTypeError("input_key", f"must be a key of the examples or a list of keys (got "
                                               f"{self.input!r:.60})")

    def split(self, batch: Any, what: str) -> tuple[Any, Any]:
        """``(inputs, targets)`` of a collated batch.

        Raises:
            DataError: a batch that is neither a pair nor a dict, or a dict without the named keys.
        """
        if isinstance(batch, Mapping):
            keys = list(batch)
            if self.target is None:
                raise DataError(f"{what}: examples are dicts with keys {keys}; say which key is the target "
                                "(and which the input), e.g. target_key='label', input_key='image'")
            if self.target not in batch:
                raise DataError(f"{what}: target_key {self.target!r} is not a key of the examples ({keys})")
            names = [k for k in keys if k != self.target] if self.input is None else self.input
            if isinstance(names, str):
                names = [names]
            missing = [k for k in names if k not in batch]
            if missing:
                raise DataError(f"{what}: input_key {missing[0]!r} is not a key of the examples ({keys})")
            if not names:
                raise DataError(f"{what}: examples hold only the target {self.target!r}; add an input")
            single = isinstance(self.input, str) or (self.input is None and len(names) == 1)
            inputs = batch[names[0]] if single else Kwargs({k: batch[k] for k in names})
            return inputs, batch[self.target]
        if isinstance(batch, tuple | list) and len(batch) == 2:
            return batch[0], batch[1]
        got = f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, tuple | list) else \
            f"a {type(batch).__name__}"
        raise DataError(f"{what}: a batch is {got}; each example must be an (input, target) pair or a dict "
                        "(with target_key naming its target)")


def loader_sampler(loader: DataLoader) -> Any:
    """The sampler that says which examples a loader draws: its ``sampler``, or, when it was built with a
    ``batch_sampler=BatchSampler(sampler, ...)``, that one's (the loader's own ``sampler`` is then PyTorch's
    default ``SequentialSampler`` over the whole dataset, which a ``SubsetRandomSampler`` split inside the
    batch sampler does not draw from: reading it trained on the validation and test rows too)."""
    batches = loader.batch_sampler
    if type(batches) is BatchSampler and batches.sampler is not loader.sampler:
        return batches.sampler
    return loader.sampler


def loader_batching(loader: DataLoader) -> tuple[int | None, bool]:
    """A loader's batch size and ``drop_last``, also when a ``batch_sampler=BatchSampler(...)`` holds them
    (the loader's own are then ``None`` and ``False``)."""
    batches = loader.batch_sampler
    if loader.batch_size is None and isinstance(batches, BatchSampler):
        return batches.batch_size, bool(batches.drop_last)
    return loader.batch_size, bool(loader.drop_last)


def loader_collate(loader: DataLoader) -> Collate:
    """How the tuner's batches of a loader's examples are collated: its ``collate_fn``, or, for a loader built
    without automatic batching (``batch_size=None``: its ``collate_fn`` converts one example at a time),
    that function on each example and PyTorch's ``default_collate`` over them (the tuner batches itself)."""
    collate = loader.collate_fn
    if loader.batch_size is not None or loader.batch_sampler is not None:
        return collate
    if collate is default_convert:
        return default_collate
    return lambda examples: default_collate([collate(example) for example in examples])


def subset_origin(loader: DataLoader) -> torch.Tensor | None:
    """The indices of a loader's ``SubsetRandomSampler`` into its dataset (``None`` for any other sampler):
    where each example of :func:`loader_dataset` sits in the user's dataset, which messages name."""
    sampler = loader_sampler(loader)
    if type(sampler) is not SubsetRandomSampler:
        return None
    try:
        return torch.as_tensor(sampler.indices, dtype=torch.long).reshape(-1)  # a tensor, list, range, array
    except (TypeError, ValueError, RuntimeError):
        return torch.as_tensor(list(sampler.indices), dtype=torch.long)


def loader_dataset(loader: DataLoader) -> Dataset:
    """The examples a loader draws from: its dataset, or the part of it a ``SubsetRandomSampler`` names.

    Why: ``DataLoader(ds, sampler=SubsetRandomSampler(train_idx))`` and the same with ``val_idx`` is how
    many PyTorch users split one dataset; reading ``loader.dataset`` alone would train on the validation
    examples too. A ``TensorDataset`` stays one (its rows taken), so batches keep their fast path."""
    data, index = loader.dataset, subset_origin(loader)
    if index is None:
        return data
    if isinstance(data, TensorDataset):
        return TensorDataset(*(t[index.to(t.device)] for t in data.tensors))
    return Subset(data, index.tolist())


def _checked_weights(sampler: WeightedRandomSampler, n: int, what: str) -> tuple[torch.Tensor, int, bool]:
    """A ``WeightedRandomSampler``'s draw ``(weights, num_samples, replacement)``, refused in one line where
    it could not draw an epoch from ``n`` examples (PyTorch would fail at the first batch, or index past
    the data)."""
    weights = torch.as_tensor(sampler.weights, dtype=torch.double).reshape(-1)
    draws, replacement = int(sampler.num_samples), bool(sampler.replacement)
    fix = "; give one weight per example of the dataset"
    if len(weights) > n:
        raise DataError(f"{what}: the WeightedRandomSampler has {len(weights)} weights for {n} examples{fix}")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or not float(weights.sum()) > 0:
        raise DataError(f"{what}: the WeightedRandomSampler's weights must be finite, non-negative and not all 0{fix}")
    positive = int((weights > 0).sum())
    if not replacement and draws > positive:
        raise DataError(f"{what}: the WeightedRandomSampler draws {draws} examples without replacement but only "
                        f"{positive} have a weight above 0; lower num_samples or pass replacement=True")
    return weights, draws, replacement


_MASK = (1 << 64) - 1


def example_seed(batch_seed: int, k: int) -> int:
    """A 63-bit seed for the ``k``-th example of a batch drawn with ``batch_seed`` (SplitMix64's mix:
    neighbouring ``k`` give unrelated seeds, cheaply and without NumPy)."""
    z = (batch_seed + (k + 1) * 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return (z ^ (z >> 31)) >> 1


def batch_seed(*parts: int) -> int:
    """A 63-bit seed for a batch from the run's seed and its place in the run (which split, epoch, batch):
    known before the batch is drawn, so workers can fetch it ahead, and drawn from no generator, so the run
    draws the same numbers with workers as without."""
    seed = 0
    for part in parts:
        seed = example_seed(seed ^ (part & _MASK), 0)
    return seed


def _seed_generators(seed: int) -> None:
    """Seed what a dataset's random transforms draw from: PyTorch's, Python's and (when the dataset's
    code imported it) NumPy's global generators. (The CPU generator alone: a dataset's transforms run on
    the CPU, and seeding every device's costs 100x more, per example.)"""
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(seed % (1 << 32))


_WORKER_DATA: Dataset | None = None  # (in a worker process: the dataset it fetches from)


class _Modules:
    """Stands before the dataset in a spawned worker's start-up arguments: unpickling it imports the
    ``[task]`` files the dataset's classes come from (imported under selftune's own module names, which a
    new process cannot find), as :func:`~selftune.task.load_callable` imports them, generators seeded."""

    def __init__(self, modules: list[tuple[str, str]]) -> None:
        self.modules = modules

    def __reduce__(self) -> tuple[Any, ...]:
        return (_import_modules, (self.modules,))


def _import_modules(modules: list[tuple[str, str]]) -> None:
    import importlib.util

    from .task import seeded_import  # (in a worker process only)

    for name, file in modules:
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, file)
            if spec is not None and spec.loader is not None:
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                with seeded_import():  # module-level draws as the main process made them
                    spec.loader.exec_module(module)


def _start_worker(modules: Any, data: Dataset, ids: Any, worker_init_fn: Callable[[int], None] | None,
                  parent: int) -> None:
    """A worker's start: keep the dataset (``modules``, a :class:`_Modules` under spawn or a fork server,
    has imported what it needs), and take the worker's id (0 to num_workers - 1, as a DataLoader numbers
    them) for the loader's ``worker_init_fn``, which runs with the first task (:func:`_init_once`).

    Ctrl-C and SIGTERM are the main process's to handle (it checkpoints and stops; a worker killed by the
    same signal, sent to the process group, would fail the step first), and a worker whose main process is
    gone (killed with SIGKILL: the crash a resume is for) exits instead of waiting for work forever, as a
    DataLoader's watchdog makes its own."""
    global _WORKER_DATA
    for stop in (signal.SIGINT, signal.SIGTERM):  # (a scheduler's SIGTERM reaches the whole process group)
        signal.signal(stop, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(parent, os.getppid()), daemon=True,
                     name="selftune-worker-watchdog").start()
    torch.set_num_threads(1)  # as a DataLoader's workers: N of them must not each take every core
    _WORKER_DATA = data
    _WORKER_INIT.clear()
    if worker_init_fn is not None:  # run with this worker's first task, so its error travels back as the task's
        _WORKER_INIT.append((worker_init_fn, ids.get()))


_WORKER_INIT: list[tuple[Callable[[int], None], int]] = []  # (in a worker: its init function, not run yet)


def _init_once() -> None:
    """Run the loader's ``worker_init_fn`` in this worker, once (an error in it reaches the main process with
    its own type and message, as a DataLoader re-raises it; run as the pool's initializer, it only broke the
    pool: "a worker died")."""
    if _WORKER_INIT:
        fn, worker_id = _WORKER_INIT.pop()
        try:
            fn(worker_id)
        except Exception as err:
            portable = _portable(err)
            if portable is err:
                raise
            raise portable from None


def _ready() -> int:
    """A worker's first task when the pool starts (see :meth:`Workers.start`)."""
    _init_once()
    return os.getpid()


def _portable(err: BaseException) -> BaseException:
    """``err`` as it can travel back to the main process: itself where it survives pickling, else a
    ``RuntimeError`` with its type and message (an exception class whose ``__init__`` takes other arguments
    than its message pickles but cannot be rebuilt, which broke the whole pool: "a worker died")."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RuntimeError(f"{type(err).__module__}.{type(err).__qualname__} in a worker: {err}")


def _exit_with(main: int, parent: int) -> None:
    """End this worker process once its main process is gone (checked every second): its parent changed
    (the main process under fork and spawn; the fork server, which ends with the main process, under
    forkserver) or the main process ``main`` no longer exists."""
    while os.getppid() == parent:
        if sys.platform != "win32":  # (there, signal 0 is CTRL_C_EVENT: it would interrupt the main process)
            try:
                os.kill(main, 0)
            except ProcessLookupError:
                break
            except OSError:  # (alive, but another user's: a recycled pid; keep watching the parent)
                pass
        time.sleep(1.0)
    os._exit(0)


class _Packer(pickle.Pickler):
    """Pickles a share of examples with each plain CPU tensor's bytes set apart (:func:`_pack`)."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.buffers: list[bytes] = []

    def persistent_id(self, obj: Any) -> Any:
        if (type(obj) is torch.Tensor and obj.layout is torch.strided and obj.device.type == "cpu"
                and not obj.is_quantized and not obj.is_conj() and not obj.is_neg() and obj.numel() > 0):
            self.buffers.append(obj.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            return (str(obj.dtype).removeprefix("torch."), tuple(obj.shape), obj.requires_grad)
        return None


class _Unpacker(pickle.Unpickler):
    def __init__(self, structure: bytes, buffers: list[bytes]) -> None:
        super().__init__(io.BytesIO(structure))
        self.buffers = iter(buffers)

    def persistent_load(self, pid: Any) -> torch.Tensor:
        dtype, shape, requires_grad = pid
        raw = torch.frombuffer(bytearray(next(self.buffers)), dtype=torch.uint8)
        return raw.view(getattr(torch, dtype)).reshape(shape).requires_grad_(requires_grad)


def _pack(examples: list[Any]) -> tuple[bytes, list[bytes]]:
    """Examples as a pickled structure and the raw bytes of their tensors. Why: pickled as they are, a
    tensor goes through ``torch.save`` (about 0.2 ms each way), and sent through a process queue it gets a
    shared-memory segment of its own; a share of small examples would cost more to move than to make."""
    file = io.BytesIO()
    packer = _Packer(file)
    packer.dump(examples)
    return file.getvalue(), packer.buffers


def _unpack(packed: tuple[bytes, list[bytes]]) -> list[Any]:
    return _Unpacker(*packed).load()


def _fetch_share(items: list[tuple[int, int]]) -> tuple[bytes, list[bytes]]:
    """A worker's share of a batch: each example fetched with its own seed, packed (:func:`_pack`)."""
    assert _WORKER_DATA is not None
    _init_once()
    examples = []
    try:
        for seed, index in items:
            _seed_generators(seed)
            examples.append(_WORKER_DATA[index])
    except Exception as err:
        portable = _portable(err)
        if portable is err:
            raise
        raise portable from None
    return _pack(examples)


class Workers:
    """A dataset's examples fetched by worker processes: a batch is cut into one share per worker.

    Why a share per worker and not a batch per worker, as a ``DataLoader`` does: the tuner decides each
    batch when it needs it (the data order is part of every checkpoint; Delta-STN's hyper steps, the
    adaptive batch and roll-backs change what comes next), so there is no long queue of future batches
    to hand out, only the next training batch (:meth:`submit` it ahead, :meth:`collect` it when asked);
    every batch is fetched in ``num_workers`` parallel parts. The processes (a
    ``concurrent.futures.ProcessPoolExecutor``) start with :meth:`start` (the tuner calls it before it
    reads a first example itself: a dataset that opens its file in ``__getitem__`` would otherwise hand
    every forked worker the main process's open file, one shared offset) and stop with :meth:`close`,
    when this object is collected, or at exit; pickling drops them (a copy starts its own).

    Args:
        data: the examples (the part of the dataset a ``SubsetRandomSampler`` names).
        num_workers: worker processes.
        loader: the user's ``DataLoader``, whose ``worker_init_fn``, ``multiprocessing_context`` and
            ``timeout`` the workers take.
        what: how messages name the data.
    """

    def __init__(self, data: Dataset, num_workers: int, loader: DataLoader | None = None, what: str = "data") -> None:
        self.data, self.num_workers, self.what = data, num_workers, what
        self.worker_init_fn = getattr(loader, "worker_init_fn", None)
        self.context = getattr(loader, "multiprocessing_context", None)
        self.timeout = float(getattr(loader, "timeout", 0) or 0) or None
        self._pool: ProcessPoolExecutor | None = None
        self._ids: Any = None
        #: how many times the workers were stopped: a fetch submitted to earlier ones is not taken
        self.generation = 0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pool": None, "_ids": None}

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # (at interpreter exit the executor's machinery may be gone already)
            pass

    def start(self) -> ProcessPoolExecutor:
        """Start the workers now (nothing if they run), each holding the dataset as it is at this moment
        (forked, or sent to spawned ones).

        Raises:
            DataError: a dataset that spawned workers cannot receive (it does not pickle).
        """
        if self._pool is not None:
            return self._pool
        context = self.context
        if context is None or isinstance(context, str):
            context = multiprocessing.get_context(context)
        method = context.get_start_method()
        modules = _Modules([] if method == "fork" else [
            (name, str(module.__file__)) for name, module in list(sys.modules.items())
            if name.startswith("selftune_task_") and getattr(module, "__file__", None)])
        ids = context.Queue()  # (kept: a worker spawned later rebuilds its lock, gone once collected here)
        for k in range(self.num_workers):
            ids.put(k)
        self._ids = ids
        self._pool = ProcessPoolExecutor(self.num_workers, mp_context=context, initializer=_start_worker,
                                         initargs=(modules, self.data, ids, self.worker_init_fn, os.getpid()))
        try:  # every worker started now: forked from this state; spawned ones sent it (tensors in shared memory)
            try:
                pending = [self._pool.submit(_ready) for _ in range(self.num_workers)]
            except (pickle.PicklingError, TypeError, AttributeError) as err:  # (spawning pickles the dataset)
                self.close(kill=True)
                raise DataError(f"{self.what}: the dataset cannot be sent to {method} worker processes "
                                f"({type(err).__name__}: {err}); make it picklable (open files in __getitem__, "
                                "define its classes at a module's top level) or use workers = 0") from None
            for started in pending:
                started.result(timeout=self.timeout)
        except BrokenProcessPool:
            self.close(kill=True)
            raise DataError(f"{self.what}: the worker processes could not start (importing the dataset's classes "
                            "failed in them: their traceback is printed above); set tuner.workers = 0 (or the "
                            "DataLoader's num_workers) to load in this process") from None
        except BaseException:  # the loader's worker_init_fn raised (its own error), or a timeout
            self.close(kill=True)
            raise
        return self._pool

    def fetch(self, index: list[int], batch_seed: int) -> list[Any]:
        """The examples ``index``, in that order, each fetched with its :func:`example_seed`.

        Raises:
            whatever the dataset raised in a worker (its own type); ``BrokenProcessPool`` where a worker
            died (the next batch starts new ones).
        """
        return self.collect(self.submit(index, batch_seed))

    def submit(self, index: list[int], batch_seed: int) -> list[Future]:
        """Hand the examples ``index`` to the workers, a share each, without waiting: :meth:`collect` them."""
        items = [(example_seed(batch_seed, k), i) for k, i in enumerate(index)]
        if not items:
            return []
        size = -(-len(items) // self.num_workers)
        pool = self.start()
        try:
            return [pool.submit(_fetch_share, items[start:start + size]) for start in range(0, len(items), size)]
        except BrokenProcessPool:
            self.close(kill=True)
            raise

    def collect(self, shares: list[Future]) -> list[Any]:
        """The examples of :meth:`submit`'s shares, in order, once every share is fetched (within the
        loader's ``timeout`` from now, for the whole batch).

        Raises:
            as :meth:`fetch`.
        """
        end = None if self.timeout is None else time.monotonic() + self.timeout
        try:
            return [example for share in shares for example in _unpack(
                share.result(timeout=None if end is None else max(0.0, end - time.monotonic())))]
        except BrokenProcessPool:
            self.close(kill=True)
            raise
        except (TimeoutError, KeyboardInterrupt):  # a worker stuck in the dataset's code: not waited for
            self.close(kill=True)
            raise

    def close(self, *, kill: bool = False) -> None:
        """Stop the worker processes (the next batch starts new ones), waiting for them to end (a spawned
        worker still starting would otherwise read locks this process already removed); ``kill``: at once,
        for workers stuck in a fetch (a loader's ``timeout`` passed, Ctrl-C)."""
        pool, self._pool = getattr(self, "_pool", None), None
        if pool is None:
            return
        self.generation += 1
        if kill:
            for process in list((getattr(pool, "_processes", None) or {}).values()):  # (the executor's own)
                process.kill()
        pool.shutdown(wait=not kill, cancel_futures=True)


def early_workers(data: Any, what: str, workers: int | None = None) -> Workers | None:
    """Start the worker processes for ``data`` (a loader's ``num_workers``, or ``workers``) before anything
    reads an example in this process, or ``None`` where none are wanted (0 workers, tensors indexed in place).

    Why before: the checks before training read the first examples here; a dataset that opens its file in
    ``__getitem__`` (PyTorch's advice for workers) then holds an open file, which forked workers would
    share, one offset for all, and read each other's records."""
    loader = data if isinstance(data, DataLoader) else None
    n = (loader.num_workers if loader is not None else 0) if workers is None else workers
    if n <= 0 or isinstance(data, tuple):
        return None
    raw = loader_dataset(loader) if loader is not None else data
    custom = loader is not None and loader_collate(loader) is not default_collate
    if (isinstance(raw, TensorDataset) and not custom) or isinstance(raw, IterableDataset) or \
            not (hasattr(raw, "__getitem__") and hasattr(raw, "__len__")):
        return None  # (indexed in place; or no map-style dataset at all, which the checks refuse)
    if isinstance(raw, TensorDataset) and any(t.requires_grad for t in raw.tensors):
        raw = TensorDataset(*(t.detach() for t in raw.tensors))  # (as the checks detach it)
    pool = Workers(raw, n, loader, what)
    pool.start()
    return pool


class Source:
    """An indexable dataset with the collate that turns its examples into a batch.

    Args:
        data: a ``Dataset`` (map-style, with ``__len__``), or a ``DataLoader`` whose dataset (the part a
            ``SubsetRandomSampler`` names), ``collate_fn`` and ``WeightedRandomSampler`` are used.
        what: how messages name the data.
        batch_size: the batch size the tuner draws (only to warn when a loader's differs).
        batch_dim: 1 for a sequence-first model: batches that selftune stacks itself (tensor pairs,
            datasets without a ``collate_fn`` of their own) get their examples in dimension 1 of every
            tensor of 2 or more dimensions, as ``pad_sequence(batch_first=False)`` lays them out; a
            loader's own ``collate_fn`` is trusted to produce the model's layout.
        weighted: whether a ``WeightedRandomSampler`` is honoured (the training data's); elsewhere it is a
            warning, since losses there are over every example once.
        dataset: the loader's examples as :func:`~selftune.validation.as_dataset` checked them (the part a
            ``SubsetRandomSampler`` names, tensors detached), so they are taken once.
        workers: worker processes that fetch each batch's examples (:class:`Workers`, or one already
            started: :func:`early_workers`); ``None``: a loader's ``num_workers``, none for a dataset. A
            ``TensorDataset`` without a collate of its own is always indexed in place (faster than any
            worker).
    """

    def __init__(self, data: Dataset | DataLoader, what: str, batch_size: int | None = None,
                 batch_dim: int = 0, *, weighted: bool = False, dataset: Dataset | None = None,
                 workers: int | Workers | None = None) -> None:
        collate: Collate | None = None
        loader = data if isinstance(data, DataLoader) else None
        #: where each example sits in the user's dataset when a ``SubsetRandomSampler`` chose them (messages)
        self.origin: torch.Tensor | None = None
        #: a training loader's ``WeightedRandomSampler``: ``(weights, num_samples, replacement)``
        self.weights: tuple[torch.Tensor, int, bool] | None = None
        if isinstance(data, DataLoader):
            loader_batch = loader_batching(data)[0]
            if batch_size is not None and loader_batch not in (None, batch_size):
                warnings.warn(SelftuneWarning(
                    f"{what}: the DataLoader's batch_size {loader_batch} is not used: the tuner draws batches of "
                    f"tuner.batch_size = {batch_size} from its dataset, in its own checkpointed order, with its "
                    "collate_fn"), stacklevel=3)
            sampler = loader_sampler(data)
            if weighted and type(sampler) is WeightedRandomSampler:
                self.weights = _checked_weights(sampler, len(dataset if dataset is not None else data.dataset), what)
            honoured = (SequentialSampler, RandomSampler, SubsetRandomSampler) + (
                (WeightedRandomSampler,) if weighted else ())
            custom = [type(s).__name__ for s, plain in (
                (sampler, honoured), (data.batch_sampler, (BatchSampler, type(None))))
                if type(s) not in plain and not type(s).__name__.startswith("_")]  # (an iterable's)
            if type(sampler) is RandomSampler and (sampler.replacement
                                                   or sampler.num_samples != len(sampler.data_source)):
                custom.append("RandomSampler(replacement=True or num_samples=...)")  # another epoch than all once
            if custom:  # a weighted or stratified draw would silently become a uniform one
                how = ("the tuner's losses there are over every example once" if type(sampler) is WeightedRandomSampler
                       else "the tuner draws every example once an epoch, in its own checkpointed order (it honours "
                            "a training loader's WeightedRandomSampler and any loader's SubsetRandomSampler)")
                warnings.warn(SelftuneWarning(
                    f"{what}: the DataLoader's {' and '.join(custom)} is not used: {how}; weight the loss "
                    "(e.g. CrossEntropyLoss(weight=...)) or resample the dataset itself to keep that balance"),
                    stacklevel=3)
            collate = loader_collate(data)
            self.origin = subset_origin(data)
            data = loader_dataset(data) if dataset is None else dataset  # (the checked one: as_dataset's)
        self.dataset = data
        self.what = what
        self.collate: Collate = collate or default_collate
        self.sequence_first = batch_dim == 1 and self.collate is default_collate
        #: whether every example was checked before training (a tensor dataset's inputs and labels, in full);
        #: other datasets have each batch checked as it is drawn
        self.checked_whole = isinstance(data, TensorDataset) and self.collate is default_collate
        fast = isinstance(data, TensorDataset) and len(data.tensors) == 2 and self.collate is default_collate
        #: the worker processes that fetch this source's examples (``None``: the main process does)
        self.workers: Workers | None = None
        if isinstance(workers, Workers):  # started before the examples were first read (:func:`early_workers`)
            self.workers = None if fast else workers
        else:
            n_workers = (loader.num_workers if loader is not None else 0) if workers is None else workers
            self.workers = Workers(data, n_workers, loader, what) if n_workers > 0 and not fast else None
        #: a batch handed to the workers ahead of time: (its indices, its seed, the workers' generation, shares)
        self._ahead: tuple[list[int], int, int, list[Future]] | None = None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def prefetch(self, index: torch.Tensor, seed: int) -> None:
        """Start fetching the batch ``index`` (with ``seed``, as :meth:`take` will be asked for it) in the
        workers now, so that it is ready when the step that trains on it comes: the tuner hands over the
        next training batch while a step trains on this one, as a ``DataLoader`` loads ahead of its loop.
        Nothing without workers. A batch fetched ahead that is then not asked for (the batch grew, a
        roll-back) is dropped, its error with it."""
        if self.workers is None:
            return
        self.drop_ahead()
        ids = index.tolist()
        try:
            shares = self.workers.submit(ids, seed)
        except BrokenProcessPool:  # (the workers were stopped: :meth:`take` starts new ones and says why)
            return
        self._ahead = (ids, seed, self.workers.generation, shares)

    def drop_ahead(self) -> None:
        """Forget the batch fetched ahead (the shares not started are cancelled; one already running finishes
        in its worker, unread)."""
        if self._ahead is not None:
            for share in self._ahead[3]:
                share.cancel()
            self._ahead = None

    def close(self) -> None:
        """Stop the workers: at once where a batch fetched ahead is still being fetched (nothing waits for a
        share nobody will read: a slow or stuck dataset hung the close)."""
        pending = self._ahead is not None and not all(share.done() for share in self._ahead[3])
        self.drop_ahead()
        if self.workers is not None:
            self.workers.close(kill=pending)

    def _fetch(self, ids: list[int], seed: int) -> list[Any]:
        assert self.workers is not None
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            if ahead[:3] == (ids, seed, self.workers.generation) and not any(f.cancelled() for f in ahead[3]):
                return self.workers.collect(ahead[3])
            self._ahead = ahead
            self.drop_ahead()
        return self.workers.fetch(ids, seed)

    def take(self, index: torch.Tensor, fields: Fields, *, seed: int | None = None) -> tuple[Any, Any]:
        """The batch of examples ``index`` as ``(inputs, targets)``.

        ``seed``: what the workers' per-example generators are seeded from (:func:`batch_seed`: the training
        loop's batches, whose random transforms differ from epoch to epoch); ``None``: from the batch's
        indices (scoring, the checks before training), which gives one batch the same examples every time.
        Neither draws from the caller's generators."""
        data = self.dataset
        if isinstance(data, TensorDataset) and len(data.tensors) == 2 and self.collate is default_collate:
            # fast path: what default_collate would stack (a loader's own collate_fn may change the batch)
            x, y = data.tensors[0][index], data.tensors[1][index]
        else:
            if self.workers is None:
                examples = [data[i] for i in index.tolist()]
            else:
                ids = index.tolist()
                if seed is None:
                    seed = example_seed(len(ids), ids[0] if ids else 0)
                try:
                    examples = self._fetch(ids, seed)
                except BrokenProcessPool:
                    raise DataError(f"{self.what}: a worker process fetching its examples died (killed, out of "
                                    "memory, or a crash in the dataset's code); set tuner.workers = 0 (or the "
                                    "DataLoader's num_workers) to fetch them in this process and see the error"
                                    ) from None
                except TimeoutError:
                    raise DataError(f"{self.what}: the workers took longer than the DataLoader's timeout "
                                    f"({self.workers.timeout:g} s) to fetch a batch; raise the timeout, or find the "
                                    "slow examples with tuner.workers = 0") from None
            x, y = fields.split(self.collate(examples), self.what)
        return (_sequence_first(x), _sequence_first(y)) if self.sequence_first else (x, y)


def _sequence_first(x: Any) -> Any:
    """A stacked batch with its examples moved from dimension 0 to 1 in every tensor of 2+ dimensions."""
    if isinstance(x, torch.Tensor):
        return x.transpose(0, 1) if x.dim() >= 2 else x
    if isinstance(x, Mapping):
        return _like(x, {key: _sequence_first(v) for key, v in x.items()})
    if isinstance(x, tuple | list):
        return type(x)(_sequence_first(v) for v in x)
    return x


def _first_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    values = x.values() if isinstance(x, Mapping) else x if isinstance(x, tuple | list) else ()
    for v in values:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


def batch_size(x: Any, batch_dim: int = 0) -> int:
    """Examples in a batch: dimension ``batch_dim`` of its first tensor (inputs may be nested), or its
    first dimension where that tensor has no dimension ``batch_dim`` (see :func:`batch_axis`).

    Raises:
        DataError: a batch with no tensor in it.
    """
    t = _first_tensor(x)
    if t is None or t.dim() == 0:
        where = "first dimension" if batch_dim == 0 else f"dimension {batch_dim} (batch_dim)"
        raise DataError(f"a batch's inputs hold no batched tensor (got {type(x).__name__}); collate examples into "
                        f"tensors whose {where} is the batch")
    return int(t.shape[batch_dim] if t.dim() > batch_dim else t.shape[0])


def batch_axis(t: torch.Tensor, n: int, batch_dim: int) -> int:
    """The dimension of ``t`` that holds a batch's ``n`` examples.

    ``batch_dim`` 0 is PyTorch's batch-first layout. With ``batch_dim = 1`` (sequence-first models:
    ``(T, B, ...)`` activations, as ``nn.LSTM(batch_first=False)`` takes) dimension 1 is the batch where
    it has ``n`` entries and the tensor has 3 or more dimensions, or where dimension 0 does not fit: a
    ``(B, H)`` activation after pooling, or ``(B,)`` labels, keep the batch first. With ``batch_dim = 0``
    a tensor whose dimension 0 does not fit but dimension 1 does is read sequence-first too (a
    batch-first model that runs a sequence-first Transformer inside); where ``T`` may equal ``B``
    such a model must say ``batch_dim = 1`` or stay batch-first inside.

    Raises:
        ValueError: no such dimension (the message names the shape and ``batch_dim``).
    """
    fits_first = t.dim() > 0 and t.shape[0] == n
    fits_second = t.dim() > 1 and t.shape[1] == n
    if batch_dim == 1 and fits_second and (t.dim() >= 3 or not fits_first):
        return 1
    if fits_first:
        return 0
    if fits_second:  # a sequence-first activation inside a batch-first model ((T, B, H) with T != B)
        return 1
    raise ValueError(f"no dimension of a tensor of shape {tuple(t.shape)} holds the batch's {n} examples "
                     f"(batch_dim={batch_dim}); put the batch in dimension "
                     f"{'0' if batch_dim == 0 else f'{batch_dim} or 0'}")


def data_axis(t: torch.Tensor, n: int, batch_dim: int) -> int:
    """The dimension of a tensor of a *data* batch (inputs, targets) that holds its ``n`` examples.

    Unlike an activation inside a model, a data batch of a sequence-first model has a known layout:
    selftune stacks such batches with the examples in dimension 1 of every tensor of two or more
    dimensions (and a user's ``collate_fn`` for such a model does the same), so a ``(T, B)`` batch whose
    ``T`` equals ``B`` is cut along dimension 1, where :func:`batch_axis` could not tell.
    """
    if batch_dim == 1 and t.dim() >= 2 and t.shape[1] == n:
        return 1
    return batch_axis(t, n, batch_dim)


def head(x: Any, k: int, batch_dim: int = 0, n: int | None = None) -> Any:
    """The first ``k`` examples of a (possibly nested) batch of ``n`` (see :func:`rows`)."""
    return rows(x, 0, k, batch_dim, n)


def rows(x: Any, start: int, stop: int, batch_dim: int = 0, n: int | None = None) -> Any:
    """Examples ``start:stop`` of a (possibly nested) batch of ``n`` examples (a micro-batch of gradient
    accumulation); each tensor is cut along its :func:`batch_axis`."""
    if isinstance(x, torch.Tensor):
        if x.dim() == 0:  # a scalar every example shares (a flag among keyword inputs)
            return x
        if batch_dim == 0 or n is None:
            return x[start:stop]
        axis = data_axis(x, n, batch_dim)
        return x.narrow(axis, start, max(min(stop, x.shape[axis]) - start, 0))
    if isinstance(x, Mapping):
        return _like(x, {key: rows(v, start, stop, batch_dim, n) for key, v in x.items()})
    if isinstance(x, tuple | list):
        if n is not None and len(x) == n and x and not any(_batched(v, n) for v in x):
            return x[start:stop]  # one entry per example (labels as strings, a detection's target dicts)
        return type(x)(rows(v, start, stop, batch_dim, n) for v in x)
    return x


def _batched(x: Any, n: int) -> bool:
    """Whether ``x`` holds the batch's ``n`` examples somewhere (a field of the batch, or a structure of
    fields), rather than being one example's entry of a per-example list (whose entries hold none)."""
    if isinstance(x, torch.Tensor):
        return x.dim() > 0 and (x.shape[0] == n or (x.dim() > 1 and x.shape[1] == n))
    if isinstance(x, Mapping):
        return any(_batched(v, n) for v in x.values())
    if isinstance(x, tuple | list):
        return any(_batched(v, n) for v in x)
    return False


def to_device(x: Any, device: torch.device | str) -> Any:
    """A (possibly nested) batch with every tensor on ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return _like(x, {key: to_device(v, device) for key, v in x.items()})
    if isinstance(x, tuple | list):
        return type(x)(to_device(v, device) for v in x)
    return x


def _like(original: Mapping, values: dict) -> dict:
    return Kwargs(values) if isinstance(original, Kwargs) else values

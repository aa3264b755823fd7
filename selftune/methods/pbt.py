"""Population Based Training through Ray Tune (Jaderberg et al. 2017), the baseline that also yields a schedule.

A population of ``fixed`` runs trains on a local Ray instance. Every ``interval`` epochs each member
reports its validation loss and a checkpoint (the whole :class:`~selftune.tuner.SelfTuner` state);
Ray Tune's :class:`~ray.tune.schedulers.PopulationBasedTraining` copies the checkpoint of a top
member into a bottom one and perturbs its hyperparameters (Ray's defaults: quantile 0.25, resample
probability 0.25, factors 1.2/0.8). Checkpoints move through Ray's own API, never through our files.

The tuner's history travels inside its checkpoint, so the member that finishes best carries the exact
schedule of its lineage (every exploit included): that is the trajectory recorded in the store.

Compute: every epoch any member trains is counted, copied-over members included, so the population
costs ``P`` plain runs; ``seconds`` is the population's wall clock on this machine, with
``concurrency`` members training at once on one thread each (a plain run uses every core).
"""

from __future__ import annotations

import logging
import math
import os
import random
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ..algorithms import Fixed
from ..callbacks import StopAtEpoch
from ..config import RunConfig, parse_config
from ..errors import DivergenceError, SelftuneWarning
from ..extras import install_hint, missing
from ..runner import RecordedRun, evaluate_run, prepare
from ..store import RunStore
from ._base import Context, Method, MethodResult, own_metrics

_STATE = "tuner.pt"
_DIVERGED = "diverged"  # in a member's checkpoint: the epoch it reported when it diverged
_NAME = "pbt"  # the registry key (selftune.methods.METHODS)


class PBT(Method):
    """Population Based Training of ``fixed`` members (Ray Tune); the best member's lineage is the schedule."""

    def __init__(self, name: str = _NAME) -> None:
        super().__init__(name, schedule=True)

    def unusable(self, config: RunConfig) -> str | None:
        if missing("ray"):
            return f"{self.name} runs on Ray Tune, which is not installed: {install_hint('pbt')}"
        return None

    def budget(self, ctx: Context) -> str:
        return f" (population {ctx.population})"

    def trials(self, ctx: Context) -> int:
        return ctx.population

    def run(self, config: RunConfig, seed: int, ctx: Context) -> MethodResult:
        return run_pbt(config, seed, ctx.population, ctx.store, ctx.run_folder(self.name, seed),
                       ray_dir=ctx.folder / "ray", checkpoint_root=ctx.folder / "checkpoints",
                       name=f"{ctx.label}-seed{seed}", method=self.name, overwrite=True)


def _fixed_config(base: dict[str, Any], seed: int, values: dict[str, Any]) -> RunConfig:
    return parse_config(base).derive(method=Fixed.name, seed=seed, values=values)


def clip_to_space(config: RunConfig, values: dict[str, Any]) -> dict[str, Any]:
    """Bring perturbed values back into the space: Ray multiplies by 1.2/0.8 without looking at bounds."""
    out = dict(values)
    for name, h in config.space.items():
        v = min(max(float(values[name]), h.low), h.high)
        out[name] = round(v) if h.type == "int" else v
    return out


def _member(hp: dict[str, Any], *, base: dict[str, Any], seed: int, interval: int) -> None:
    """One population member: a fixed run that reports every ``interval`` epochs (a Ray Tune trainable)."""
    from ray import tune

    torch.set_num_threads(1)  # members run side by side, one core each (the GPU's share where there is one)
    config = _fixed_config(base, seed, clip_to_space(parse_config(base), hp))
    prepared = prepare(config)
    tuner = prepared.tuner
    checkpoint = tune.get_checkpoint()
    epoch, diverged = tuner.epoch, False
    if checkpoint is not None:  # resumed after a pause, or exploited: continue from that state
        with checkpoint.as_directory() as folder:
            tuner.load_state_dict(torch.load(Path(folder) / _STATE, weights_only=True))
            marker = Path(folder) / _DIVERGED
            if marker.exists():  # a diverged member paused by PBT stays diverged (an exploit brings another's)
                diverged, epoch = True, int(marker.read_text())
        tuner.net.set_values(clip_to_space(config, hp))
        epoch = epoch if diverged else tuner.epoch
    while epoch < config.epochs:
        examples, started = tuner.counters.examples, time.perf_counter()
        target = min(epoch + interval, config.epochs)
        if not diverged:
            try:
                tuner.fit(config.epochs, callbacks=[StopAtEpoch(target)])  # planned over the whole run
            except DivergenceError:
                # Sampled or perturbed values can break a member (a rate far too large). It reports an
                # infinite loss from here on, training no more, so PBT's next exploit step replaces it
                # with a copy of a better member (Ray restarts this function from that checkpoint);
                # before, the error failed the whole population.
                diverged = True
        epoch = target if diverged else tuner.epoch
        last = tuner.history[-1] if tuner.history and not diverged else {}
        metrics = {"val_loss": last.get("val_loss", math.inf), "val_accuracy": last.get("val_accuracy", math.nan),
                   "epoch": epoch, "diverged": diverged,
                   "examples": tuner.counters.examples - examples, "seconds": time.perf_counter() - started}
        if epoch >= config.epochs and not diverged:  # reported for the record; selection uses val_loss only
            test = prepared.score("test", tuner.kept()[0])
            metrics["test_loss"], metrics["test_accuracy"] = test["loss"], test.get("accuracy", math.nan)
        with tempfile.TemporaryDirectory() as folder:
            torch.save(tuner.state_dict(), Path(folder) / _STATE)
            if diverged:
                (Path(folder) / _DIVERGED).write_text(str(epoch))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def _domains(config: RunConfig) -> dict[str, Any]:
    from ray import tune

    domains: dict[str, Any] = {}
    for name, h in config.space.items():
        if h.type == "int":
            domains[name] = tune.randint(int(h.low), int(h.high) + 1)
        elif h.log:
            domains[name] = tune.loguniform(h.low, h.high)
        else:
            domains[name] = tune.uniform(h.low, h.high)
    return domains


def run_pbt(config: RunConfig, seed: int, population: int, store: RunStore, out: str | Path, *,
            ray_dir: str | Path = "ray", checkpoint_root: str | Path = "checkpoints", interval: int | None = None,
            concurrency: int | None = None, name: str = _NAME, method: str = _NAME,
            overwrite: bool = False) -> MethodResult:
    """Train a population of ``population`` fixed runs with Ray Tune's PBT.

    Args:
        config: the task; its space gives the sampling ranges and bounds of the perturbations.
        seed: seeds the members' training, the initial sampling and PBT's explore steps.
        population: members trained (``P``).
        store: the run store; the best member's lineage is recorded there as a run of method ``pbt``.
        out: folder of the best member's outputs (as ``selftune run`` writes them).
        ray_dir: where Ray Tune keeps the experiment (members' checkpoints, PBT's policy logs).
        checkpoint_root: folder under which the recorded run's final checkpoint goes.
        interval: epochs between exploit/explore steps (default: a tenth of the epochs, at least 1).
        concurrency: members training at once (default: the machine's cores).
        name: Ray experiment name.
        method: the method name the run is recorded under.
        overwrite: allow a non-empty ``out`` that is not this run's (only selftune's own files are replaced).

    Returns:
        The best member's (lowest final validation loss) result, with the whole population's compute.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network at run time
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no progress tables of Ray's own
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # A member that diverges reports an infinite loss (the trainable above); Ray's TensorBoard logger
    # warns once per such report (202 lines for one breast-cancer benchmark), which says nothing the
    # table does not: keep that one warning quiet.
    logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
    import ray
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if population < 2:
        raise ValueError(f"population must be >= 2 (got {population})")
    out, ray_dir = Path(out).resolve(), Path(ray_dir).resolve()
    interval = interval or max(1, config.epochs // 10)
    concurrency = min(concurrency or os.cpu_count() or 1, population)
    base = config.model_dump(mode="json")
    domains = _domains(config)
    random.seed(seed)  # PBT's explore draws from Python's random module
    scheduler = PopulationBasedTraining(
        time_attr="epoch", perturbation_interval=interval, hyperparam_mutations=domains,
        quantile_fraction=0.25, resample_probability=0.25, perturbation_factors=(1.2, 0.8),
        custom_explore_fn=lambda values: clip_to_space(config, values))
    tally = _tally()
    resources: dict[str, float] = {"cpu": 1.0}
    if config.resolve_device() == "cuda":  # members share the GPU
        resources["gpu"] = 1 / concurrency
    trainable = tune.with_resources(tune.with_parameters(_member, base=base, seed=seed, interval=interval),
                                    resources)
    started = time.perf_counter()
    # Ray's own chatter (per-trial warnings, missing-file notices while trials are paused) is not ours to show.
    ray_logger = logging.getLogger("ray")
    level = ray_logger.level
    ray_logger.setLevel(logging.ERROR)
    ray.init(num_cpus=concurrency, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        # Resources bound the concurrency: Ray has `concurrency` CPUs and each member takes one. Every
        # checkpoint is kept: an exploit can copy a checkpoint its source has since moved past (members
        # wait their turn for a core), and with num_to_keep=4 those were deleted under it: failed restores
        # ("Error handling checkpoint ... Path not found") and members re-trained from older states, 2.7x
        # a plain run's examples for 2 members where 1.9x after (ray-project/ray#9036 describes the same).
        grid = tune.Tuner(
            trainable, param_space=domains,
            tune_config=tune.TuneConfig(metric="val_loss", mode="min", scheduler=scheduler,
                                        num_samples=population, reuse_actors=True,
                                        search_alg=BasicVariantGenerator(random_state=seed)),
            run_config=tune.RunConfig(name=name, storage_path=str(ray_dir), verbose=0, callbacks=[tally],
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=None)),
        ).fit()
    finally:
        ray.shutdown()
        ray_logger.setLevel(level)
    seconds = time.perf_counter() - started
    errors = [str(e).splitlines()[0] for e in grid.errors]
    if errors:
        raise RuntimeError(f"{len(errors)} PBT member(s) failed; first: {errors[0]}")
    if not any(r.metrics and not r.metrics.get("diverged") for r in grid):
        raise DivergenceError(f"every one of the {population} PBT members diverged; narrow the space's ranges "
                              "(a learning rate far too large breaks every run)")
    if tally.diverged:
        warnings.warn(SelftuneWarning(f"pbt: {len(tally.diverged)} of {population} members diverged at their values "
                                      "and trained no further unless PBT replaced them with a copy of a better "
                                      "member"), stacklevel=2)
    best = grid.get_best_result(metric="val_loss", mode="min", scope="last")  # infinite losses are left out
    assert best.checkpoint is not None
    values = clip_to_space(config, {k: best.config[k] for k in domains})
    return _record(config, seed, values, best, store, out, Path(checkpoint_root), tally, seconds, population,
                   method, overwrite)


def _tally() -> Any:
    """A Ray Tune callback summing every member's reported compute and noting the members that diverged
    (built here: Ray imports lazily)."""
    from ray import tune

    class Tally(tune.Callback):
        def __init__(self) -> None:
            self.examples = 0
            self.member_seconds = 0.0
            self.diverged: set[str] = set()  # members that ever reported a divergence (an exploit erases it)

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict[str, Any],
                            **info: Any) -> None:
            self.examples += int(result.get("examples", 0))
            self.member_seconds += float(result.get("seconds", 0.0))
            if result.get("diverged"):
                self.diverged.add(str(trial.trial_id))

    return Tally()


def _record(config: RunConfig, seed: int, values: dict[str, Any], best: Any, store: RunStore, out: Path,
            checkpoint_root: Path, tally: Any, seconds: float, population: int, method: str,
            overwrite: bool) -> MethodResult:
    """Rebuild the best member from its last checkpoint and record it as a run of ``method``, through
    the same recorder and writer as every run."""
    prepared = prepare(_fixed_config(config.model_dump(mode="json"), seed, values))
    with best.checkpoint.as_directory() as folder:
        prepared.tuner.load_state_dict(torch.load(Path(folder) / _STATE, weights_only=True))
    fit = prepared.tuner.result()
    result = evaluate_run(prepared, fit, method=method)
    result.compute = {"examples": tally.examples, "eval_examples": fit.compute["eval_examples"], "seconds": seconds,
                      "steps": fit.compute["steps"], "hyper_steps": 0, "member_seconds": tally.member_seconds,
                      "population": population}
    result.extra = {**result.extra, "ray": {"experiment": str(Path(best.path).parent)}}
    run = RecordedRun.start(store, prepared.config, out=out, checkpoint_root=checkpoint_root, overwrite=overwrite,
                            method=method)
    run.save(prepared.tuner)
    run.complete(fit, result)
    return MethodResult(method=method, seed=seed, test_loss=result.test["loss"],
                        test_accuracy=result.test.get("accuracy", math.nan), val_loss=result.val["loss"],
                        hparams=fit.hparams, examples=tally.examples, seconds=seconds,
                        trials=population, run_id=run.run_id, curve=[(tally.examples, result.test["loss"])],
                        test_metrics=own_metrics(result.test))

"""Settings of the self-tuning loop, validated by pydantic.

One model serves the Python API (``TunerSettings(lr=0.05)``) and the ``[tuner]`` table of a config
file, so defaults and error messages are the same in both places.
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from .batch_size import AdaptiveBatchSettings
from .errors import ConfigError, from_validation
from .schedules import HyperSchedule, ScheduleSettings

#: SGD's momentum when none is given (the usual choice; also Adam's own beta1, so the default never
#: conflicts with another optimizer's momentum)
DEFAULT_MOMENTUM = 0.9


class TunerSettings(BaseModel):
    """How weights and hyperparameters are trained (DESIGN.md section 3).

    ``None`` for ``hyper_optimizer``/``hyper_lr`` picks the official default of the algorithm
    (:mod:`selftune.algorithms`): Adam at 3e-3 for STN, RMSprop at 1e-2 for Delta-STN.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def __init__(self, **data: Any) -> None:
        """Built in Python, a bad setting is a one-line :class:`ConfigError` naming ``tuner.<field>``, as
        from a config file (pydantic's own error is several lines and names no config field)."""
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise from_validation(err, prefix="tuner") from None

    batch_size: PositiveInt = 128
    val_batch_size: PositiveInt | None = Field(
        None, description="examples per hyper step's validation batch; default: batch_size, at most the validation "
                          "set (a small validation set is then one batch, seen whole at every hyper step)")
    optimizer: str = Field(
        "sgd", description="the weights' optimizer: any torch.optim class by name, any case (sgd, adam, adamw, "
                           "rmsprop, nadam, ...), or a subclass of torch.optim.Optimizer of your own as "
                           "'path/to/file.py:Class' or 'package.module:Class' (in Python, the class itself); lr, "
                           "weight_decay and, for SGD, momentum come from their own settings, every other "
                           "argument from optimizer_args")
    optimizer_args: dict[str, Any] = Field(
        {}, description="further keyword arguments of the optimizer class, e.g. {nesterov = true} for SGD or "
                        "{betas = [0.9, 0.99]} for Adam/AdamW")
    lr: PositiveFloat | str = Field(
        0.01, description="learning rate of the weights, or the name of a hyperparameter of the space that holds it "
                          "(declare it log-scaled, e.g. [space.lr] low = 1e-4, high = 1, log = true): fixed trains at "
                          "its init, searches sample it, and hd, stn, delta-stn, ift and delta-ift tune it in the run "
                          "by hypergradient descent (selftune.hd; one-pass by its implicit hypergradient)")
    lr_scales: dict[str, float] = Field(
        {}, description="a rate per layer: layer pattern (objective.weight_decay's syntax: a module's name from "
                        "model.named_modules(), or a block that holds it, with * and ?) -> multiple of the weights' "
                        "rate for that layer's parameters, e.g. {backbone = 0.1} fine-tunes a pretrained backbone at "
                        "a tenth of the head's rate. Every parameter no pattern names trains at the rate itself "
                        "(fixed, scheduled, tuned or replayed: the scales multiply it at every step); the first "
                        "pattern that names a layer decides its scale. Freeze a layer with requires_grad=False, "
                        "not a scale of 0")
    momentum: float | str = Field(
        DEFAULT_MOMENTUM,
        description="SGD's momentum (0 <= m < 1; another optimizer refuses a number it would ignore), or the "
                    "name of a hyperparameter that holds SGD's momentum or Adam's/AdamW's beta1 (declare "
                    "[space.momentum] low = 0.0, high = 0.99): fixed trains at its init, searches sample it, "
                    "and hd, stn, delta-stn and ift tune it in the run by a hypergradient of the next step's "
                    "training loss (selftune.hd), as they tune a bound lr")
    response_lr: PositiveFloat | None = Field(
        None, description="learning rate of the response weights (W_r, b_r, V); None: min(lr, 0.01), the official "
                          "code's rate: a response is the product of two trained factors (gates and response "
                          "weights), which blows up at rates the plain weights take well")
    weight_decay: float = Field(0.0, ge=0.0, description="fixed (untuned) decay of the weight optimizer")
    accumulate: PositiveInt = Field(
        1, description="gradient accumulation: micro-batches per weight step. Each step draws accumulate x batch_size "
                       "training examples, forwards and backwards them batch_size at a time, sums the gradients and "
                       "steps once: the step of a batch accumulate times larger in the memory of batch_size. Steps, "
                       "train_steps and schedules count weight steps")
    drop_last: bool = Field(
        False, description="drop each epoch's last training batch when it holds fewer than batch_size x accumulate "
                           "examples, as DataLoader(drop_last=True) does (a training DataLoader with drop_last=True "
                           "sets it too): a model with BatchNorm cannot train on a batch of one example")
    workers: int | None = Field(
        None, ge=0, description="worker processes that fetch the examples of each training and validation batch in "
                                "parallel, a share each, from a Dataset of your own (one with per-example work: "
                                "decoding, random transforms); None: the DataLoader's num_workers, 0 for a Dataset. "
                                "Each example's random transforms are seeded from the run's seed, so a run gives "
                                "the same examples whatever the number of workers above 0 and resumes exactly; "
                                "tensors (a TensorDataset) are indexed in place, without workers")
    adaptive_batch: AdaptiveBatchSettings | None = Field(
        None, description="[tuner.adaptive_batch]: grow the batch during the run when the per-example gradient "
                          "noise asks for it (AdAdaGrad's norm or inner-product test, selftune.batch_size); the run "
                          "records the batch in a batch_size column, counts the test's examples, and keeps its "
                          "length in epochs (a grown batch takes fewer steps per epoch). A grown batch is still "
                          "forwarded batch_size examples at a time")
    lr_batch_scaling: Literal["none", "auto", "linear", "sqrt"] = Field(
        "none", description="scale the weights' rate with the batch: lr is the rate at reference_batch_size "
                            "examples per step and trains at lr x (batch / reference) (linear, SGD) or lr x "
                            "sqrt(batch / reference) (sqrt, Adam-like); auto picks from the optimizer "
                            "(Granziol et al. 2022). The batch is batch_size x accumulate, or the adaptive one")
    reference_batch_size: PositiveInt | None = Field(
        None, description="lr_batch_scaling: the batch the rate was chosen for; None: the run's starting batch "
                          "(batch_size x accumulate), so only a growing batch rescales it")
    lr_scheduler: str | None = Field(
        None, description="a torch.optim.lr_scheduler class by name, any case (OneCycleLR, CosineAnnealingLR, StepLR, "
                          "ReduceLROnPlateau, ...) that shapes the weights' rate instead of [tuner.schedule]. It runs "
                          "on the run's starting rate; each step the weights train at base x (its rate / the starting "
                          "rate), so a tuned rate or a roll-back's halving keep applying. total_steps (OneCycleLR) and "
                          "T_max (CosineAnnealingLR) default to the run's length in lr_scheduler_interval units")
    lr_scheduler_args: dict[str, Any] = Field(
        {}, description="keyword arguments of the lr_scheduler class, e.g. {step_size = 30, gamma = 0.1} for StepLR "
                        "or {max_lr = 0.1} for OneCycleLR")
    lr_scheduler_interval: Literal["epoch", "step"] = Field(
        "epoch", description="when the lr_scheduler steps: after every epoch (ReduceLROnPlateau on the validation "
                             "loss) or after every weight step (OneCycleLR, CyclicLR are per step)")
    grad_clip: PositiveFloat | None = Field(None, description="clip each weight step's gradient to this norm "
                                                                "(recurrent networks need it); None: no clipping")
    hyper_optimizer: Literal["adam", "rmsprop"] | None = None
    hyper_lr: PositiveFloat | None = Field(
        None, description="learning rate of the hyperparameters; None: the algorithm's official default, raised "
                          "when needed so that the run can move a hyperparameter hyper_travel units (see below)")
    hyper_travel: float = Field(
        8.0, ge=0.0,
        description="with hyper_lr unset and an Adam hyper optimizer (STN's): the distance (unconstrained units; "
                    "7.8 spans 2%..98% of a range) that a hyperparameter pushed the same way at every hyper step "
                    "must be able to cover in the run. The hyper learning rate becomes max(default, hyper_travel "
                    "/ planned hyper steps), so a small data set or a short run (few hyper steps) still lets the "
                    "rates cross their range; 0 keeps the default")
    scale_lr: PositiveFloat | None = Field(None, description="defaults to hyper_lr")
    init_scale: PositiveFloat = Field(0.5, description="initial perturbation std (unconstrained space)")
    encoding: Literal["logit", "mip"] = Field(
        "logit", description="what the best-response gates see of the hyperparameters: the unconstrained value "
                             "(logit, as the official STN code) or MIP's bounded cos/sin map, whose slope near a "
                             "bound is ~100x smaller and keeps small rates from rising")
    tune_scales: bool = True
    entropy_weight: float = Field(1e-3, ge=0.0)
    warmup_epochs: int = Field(1, ge=0)
    train_steps: PositiveInt = 5
    response_fraction: float = Field(
        0.25, gt=0.0, le=1.0,
        description="Delta-STN: share of each batch used by the response-weight step (the general weights always "
                    "see the whole batch). 0.25: what every benchmark in docs/benchmarks measured; the paper's 1.0 "
                    "costs 2.2 plain runs' examples, over delta-ift's budget of 2 (docs/algorithms.md)")
    val_steps: PositiveInt = 1
    linearize: bool = Field(False, description="delta-stn: train the response on its first-order "
                                               "(Jacobian-vector product) form; ignored by other methods")
    schedule: ScheduleSettings = Field(
        default_factory=ScheduleSettings,
        description="[tuner.schedule]: the shape of the weights' rate over the run (constant, cosine, cosine_power, "
                    "step, with an optional linear warm-up); it multiplies the base rate, tuned or not")
    follow: HyperSchedule | None = Field(
        None, description="train on a recorded schedule instead of tuning (method fixed): each hyperparameter it names "
                          "(and the weights' rate, if it has an lr column) takes the schedule's value at every weight "
                          "step. In a config file: a path to a schedule.csv or .json (relative to the config), read "
                          "once and stored in the run's config, so resume needs no file; selftune replay RUN sets it")
    keep: Literal["last", "best"] = Field(
        "last",
        description="the weights a run returns, is scored with and exports: the last step's (last), or those of "
                    "the epoch with the lowest validation loss, with that epoch's hyperparameters (best: the run "
                    "length chosen on the validation data every method already uses; it applies to every method, "
                    "fixed and search trials included, so comparisons stay fair). Training itself is unchanged")
    lr_travel: float = Field(
        8.0, ge=0.0,
        description="with a tuned learning rate (tuner.lr names a hyperparameter): the distance (unconstrained "
                    "units) it can cover in the run if every step pushes it the same way, as hyper_travel; each "
                    "weight step (each round of hyper steps on lr_signal = \"val\") moves it by at most lr_travel "
                    "/ planned steps, and by at most 2x (selftune.hd; one-pass tunes the rate through its own "
                    "hypergradient and ignores it)")
    lr_signal: Literal["train", "val"] = Field(
        "train",
        description="with a tuned learning rate: the loss its hypergradient differentiates. train: the next training "
                    "batch's, at every weight step (Baydin et al.'s hypergradient descent); val: a validation "
                    "batch's at each hyper step, along the weights' travel since the previous one (one more "
                    "validation pass per hyper step; hd then draws a validation batch every train_steps). Measured "
                    "worse than train on aggregate (11 of 18 learning-rate cases beat fixed, against 13), better "
                    "only from a rate far too large (docs/algorithms.md); one-pass ignores it")
    lr_fall: float = Field(
        1.0, ge=1.0, le=100.0,
        description="with a tuned learning rate: how many times faster it may fall than rise per weight step. A "
                    "rate far too large breaks the network in the first epoch, before a rate that crosses lr_travel "
                    "once per run has come down; 3 rescued digits from 10x too large (test loss 2.15 -> 0.66 for hd) "
                    "but lets mini-batch noise ratchet a good rate down (docs/algorithms.md). Hypergradient "
                    "descent only: one-pass ignores it")
    neumann_terms: int = Field(
        5, ge=0, le=100, description="ift: terms of the Neumann series that approximates the inverse Hessian "
                                     "(0: the one-step greedy hypergradient; more: a longer horizon, one "
                                     "Hessian-vector product each)")
    neumann_lr: PositiveFloat | None = Field(
        None, description="ift: step size of the Neumann series; None: 1 / the largest curvature of the training "
                          "loss, estimated by power iteration at the first hyper step. Halved whenever the series "
                          "grows (a step size past 2 / curvature diverges). one-pass: None is 1 (the update it "
                          "differentiates already carries the rate), never halved (Clarke et al.'s series)")
    compute_budget: float | None = Field(
        None, gt=1.0,
        description="ift, one-pass, delta-ift: the most examples a run may use, as a multiple of one plain run's "
                    "(epochs x training set). An implicit hyper step costs a validation batch and neumann_terms + 2 "
                    "passes over a training batch; when the implicit steps start, the run takes the most Neumann "
                    "terms (down to 1) that fit one hyper step every train_steps weight steps into what is left, and "
                    "only then spaces them further apart (recorded as neumann_terms and hyper_interval). None: the "
                    "method's own, 2 for delta-ift (the default method costs at most two plain runs) and 3 for ift "
                    "and one-pass (the implicit-differentiation methods' cost in Clarke et al. 2022)")
    handover_patience: float = Field(
        0.1, gt=0.0, le=1.0,
        description="delta-ift: hand over from Delta-STN to implicit hypergradients once the epoch's validation loss "
                    "has not improved on its best for as many epochs as it took to reach it, and for at least "
                    "this share of the run's epochs (2 at the least): the early-stopping signal that the weights "
                    "are near a training optimum, which implicit differentiation assumes")
    handover_rise: float = Field(
        0.1, ge=0.0,
        description="delta-ift: and only once the validation loss has stood on average this share above its best "
                    "since it was reached (a model that over-fits, not one whose loss merely stalls)")
    relax_temperature: PositiveFloat = Field(
        0.1, description="ift: temperature of the concrete (relaxed Bernoulli) dropout masks through which a dropout "
                         "rate gets its mixed derivative (Gal et al. 2017's concrete dropout; lower is closer to "
                         "Bernoulli and noisier)")
    log_every: PositiveInt = 10
    max_divergences: int = Field(
        3, ge=0, description="roll-backs allowed in a row before a diverging run fails: in a row until the run gets "
                             "past the furthest step where they diverged, so a run that recovers each time goes on")
    divergence_lr_factor: float = Field(0.5, gt=0.0, lt=1.0,
                                        description="factor applied to the offending learning rate on a roll-back")
    rollback_val_ratio: float | None = Field(
        None, ge=0.0,
        description="a validation loss above this multiple of the untrained network's (scored once before the first "
                    "step; with the default cross-entropy at least log C) rolls the run back like a "
                    "non-finite loss, and a state whose validation loss is above half this multiple is not a "
                    "roll-back point: it catches a model that has become confidently wrong while every value stays "
                    "finite. Unset: 8 with the default cross-entropy, off with a loss of your own "
                    "(whose zero point a ratio cannot judge); 0 turns it off; otherwise at least 2. After "
                    "max_divergences such roll-backs in a row it stops acting rather than fail the run "
                    "(docs/store.md)")
    rollback_loss_ratio: float = Field(
        2.0, gt=1.0,
        description="a state is not a roll-back point if the mean training loss since the previous point is above "
                    "this multiple of the lowest of the previous four while the weights' norm grew past 1.5x its "
                    "low: a run that blows up over several epochs while its values stay finite rolls back to "
                    "before the blow-up, not to the last finite state (docs/store.md)")

    @field_validator("lr", "response_lr", "hyper_lr", "scale_lr", "weight_decay", "grad_clip", "rollback_val_ratio",
                     "init_scale", "entropy_weight", "relax_temperature")
    @classmethod
    def _finite(cls, v: Any) -> Any:
        """A rate, decay or clip of inf (pydantic lets inf through where it refuses nan) would train on
        non-finite steps from the first one."""
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError("must be finite")
        return v

    @field_validator("lr_scales", mode="before")
    @classmethod
    def _positive_scales(cls, v: Any) -> Any:
        """Every error names ``tuner.lr_scales["pattern"]`` (pydantic's own spelling, ``lr_scales.fc.0``, reads
        as a nested key where a pattern holds a dot)."""
        if not isinstance(v, Mapping):
            return v  # pydantic's own error: a table is expected
        for pattern, scale in v.items():
            where = f"tuner.lr_scales[\"{pattern}\"]"
            if not isinstance(pattern, str):
                raise ConfigError(where, f"a layer pattern is text, not a {type(pattern).__name__}; quote it")
            if not pattern.strip():
                raise ConfigError(where, "an empty layer pattern names no layer; use \"*\" for every layer")
            if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) or scale <= 0:
                raise ConfigError(where, f"must be a positive number (got {scale!r}); freeze a layer with "
                                         "requires_grad=False instead of a scale of 0")
        return {k: float(s) for k, s in v.items()}

    @field_validator("momentum")
    @classmethod
    def _momentum_range(cls, v: float | str) -> float | str:
        if isinstance(v, float) and not 0.0 <= v < 1.0:
            raise ConfigError("tuner.momentum", f"must be in [0, 1) (got {v}); 0.9 is the usual choice")
        return v

    @field_validator("optimizer", mode="before")
    @classmethod
    def _known_optimizer(cls, v: Any) -> Any:
        if isinstance(v, torch.optim.Optimizer):  # built over the user's parameters, not the tuner's groups
            raise ValueError(f"an optimizer already built over parameters; pass the class or its name "
                             f"(optimizer=\"{type(v).__name__.lower()}\" or torch.optim.{type(v).__name__}) and its "
                             "arguments in optimizer_args: selftune builds it over its own parameter groups")
        if isinstance(v, type):  # the Python API's optimizer=MyOptimizer: recorded by its import name
            v = optimizer_source(v)
        if isinstance(v, str):
            if ":" in v:
                from .task import resolve_source

                v = resolve_source(v, field="tuner.optimizer", what="class")
            optimizer_class(v)  # raises ValueError naming the choices
        return v

    @model_validator(mode="after")
    def _arguments_taken(self) -> TunerSettings:
        cls = optimizer_class(self.optimizer)
        takes, anything = set(_init_parameters(cls)), _takes_any_keyword(cls)
        if "weight_decay" not in takes and not anything and self.weight_decay:
            raise ConfigError("tuner.weight_decay", f"{optimizer_label(cls)} takes no weight_decay; remove it, or "
                                                    "tune a decay through [objective] weight_decay")
        for key in self.optimizer_args:
            if key == "lr":
                raise ConfigError("tuner.optimizer_args.lr", "set tuner.lr instead (a number, or a hyperparameter's "
                                                             "name)")
            if key == "weight_decay":  # it would silently replace tuner.weight_decay
                raise ConfigError("tuner.optimizer_args.weight_decay", "set tuner.weight_decay instead (or tune a "
                                                                       "decay through [objective] weight_decay)")
            if key == "momentum" and takes_sgd_momentum(cls):  # SGD takes tuner.momentum, which it would replace
                raise ConfigError("tuner.optimizer_args.momentum", "SGD takes its momentum from tuner.momentum (a "
                                                                   "number, or a hyperparameter's name); set it there")
            if key not in takes and not anything:
                others = ", ".join(sorted(takes - {"lr"})) or "no other argument"
                raise ConfigError(f"tuner.optimizer_args.{key}", f"not an argument of {optimizer_label(cls)}; it "
                                                                 f"takes {others}")
        if isinstance(self.momentum, float) and not takes_sgd_momentum(cls):
            self._check_numeric_momentum(cls, takes)
        if self.rollback_val_ratio is not None and 0 < self.rollback_val_ratio < 2:
            raise ConfigError("tuner.rollback_val_ratio",
                              f"must be 0 (off) or at least 2 (got {self.rollback_val_ratio:g}): a state at half of it "
                              "is still a roll-back point, and an untrained network's loss must be one")
        if self.lr_scheduler is not None:
            self._check_lr_scheduler()
        elif self.lr_scheduler_args:
            raise ConfigError("tuner.lr_scheduler_args", "given without tuner.lr_scheduler; name the scheduler class")
        if self.adaptive_batch is not None:
            if self.follow is not None:
                raise ConfigError("tuner.adaptive_batch", "a followed schedule (tuner.follow) replays a run step by "
                                                          "step, which a batch that grows changes; remove one of them")
            if self.lr_scheduler is not None and self.lr_scheduler_interval == "step":
                raise ConfigError("tuner.adaptive_batch", "a growing batch takes fewer steps than planned, so a "
                                                          "per-step lr_scheduler would stop mid-curve; use "
                                                          "lr_scheduler_interval = \"epoch\" or [tuner.schedule] "
                                                          "(which follows the examples seen)")
            limit = self.adaptive_batch.max_batch_size
            if limit is not None and limit < self.batch_size * self.accumulate:
                raise ConfigError("tuner.adaptive_batch.max_batch_size", f"{limit} is below the starting batch "
                                  f"(batch_size x accumulate = {self.batch_size * self.accumulate}); raise it")
        if self.reference_batch_size is not None and self.lr_batch_scaling == "none":
            raise ConfigError("tuner.reference_batch_size", "given without tuner.lr_batch_scaling; set it to "
                                                            "\"auto\", \"linear\" or \"sqrt\"")
        return self

    def _check_numeric_momentum(self, cls: type, takes: set[str]) -> None:
        """A number in ``tuner.momentum`` reaches SGD only: refuse one another optimizer would silently
        ignore (the default, which cannot be told from an explicit 0.9, and the optimizer's own default
        pass)."""
        m = float(self.momentum)  # type: ignore[arg-type]
        defaults = inspect.signature(cls.__init__).parameters

        def default(name: str, index: int | None = None) -> float | None:
            value = defaults[name].default  # a user's class may have none, or not a number
            try:
                return float(value if index is None else value[index])
            except (TypeError, ValueError, IndexError):
                return None

        if "betas" in takes:  # Adam, AdamW, NAdam, RAdam, Adamax, ...: the momentum is beta1
            own, how = default("betas", 0), "its momentum as optimizer_args.betas = [m, 0.999]"
        elif "momentum" in takes:
            own, how = default("momentum"), "its momentum as optimizer_args.momentum"
        else:
            own, how = 0.0, "no momentum: remove tuner.momentum"
        if m not in (DEFAULT_MOMENTUM, own):
            raise ConfigError("tuner.momentum", f"{m:g} is SGD's momentum, which {optimizer_label(cls)} would "
                                                f"ignore; {cls.__name__} takes {how}")

    def _check_lr_scheduler(self) -> None:
        """Refuse a scheduler that cannot run here now, not at the first step of a long run: an unknown
        class or argument, a combination with another source of the rate, and whatever its own
        constructor rejects (tried on a stand-in optimizer)."""
        from .schedules import TorchSchedule, lr_scheduler_class

        try:
            cls = lr_scheduler_class(self.lr_scheduler)
        except ValueError as err:
            raise ConfigError("tuner.lr_scheduler", str(err)) from None
        if self.schedule != ScheduleSettings():
            raise ConfigError("tuner.lr_scheduler", "set either tuner.lr_scheduler or [tuner.schedule], not both: "
                                                    "both shape the weights' rate")
        if self.follow is not None and self.follow.lr is not None:
            raise ConfigError("tuner.lr_scheduler", "a followed schedule (tuner.follow) with a weights_lr column "
                                                    "already sets the weights' rate at every step; remove one of "
                                                    "them")
        if cls.__name__ == "ReduceLROnPlateau" and self.lr_scheduler_interval == "step":
            raise ConfigError("tuner.lr_scheduler_interval", "ReduceLROnPlateau steps on the validation loss, which "
                                                             "is measured once per epoch; use \"epoch\"")
        takes = set(inspect.signature(cls.__init__).parameters) - {"self", "optimizer"}
        for key, value in self.lr_scheduler_args.items():
            if key not in takes:
                raise ConfigError(f"tuner.lr_scheduler_args.{key}",
                                  f"not an argument of torch.optim.lr_scheduler.{cls.__name__}; it takes "
                                  f"{', '.join(sorted(takes))}")
            if key == "cycle_momentum" and value:
                raise ConfigError("tuner.lr_scheduler_args.cycle_momentum", "the scheduler shapes the learning rate "
                                                                            "only; set it to false")
        try:
            TorchSchedule(self.lr_scheduler, self.lr_scheduler_args, initial_lr=0.01, total=100)
        except (TypeError, ValueError, KeyError) as err:
            raise ConfigError("tuner.lr_scheduler_args", f"torch.optim.lr_scheduler.{cls.__name__} refused them: "
                                                         f"{' '.join(str(err).split())}") from None


#: Settings that only tuning reads: a ``fixed`` run (a search trial, a PBT member's training) trains the same
#: whatever they are, so a search study's name leaves them out (``selftune.methods.search``).
TUNING_ONLY: frozenset[str] = frozenset({
    "response_lr", "hyper_optimizer", "hyper_lr", "hyper_travel", "scale_lr", "init_scale", "encoding",
    "tune_scales", "entropy_weight", "warmup_epochs", "train_steps", "response_fraction", "val_steps",
    "linearize", "lr_travel", "lr_signal", "lr_fall", "neumann_terms", "neumann_lr", "compute_budget",
    "handover_patience", "handover_rise", "relax_temperature", "log_every"})


def optimizer_class(name: str) -> type:
    """The optimizer class ``name`` names: a ``torch.optim`` class in any case (``"adamw"`` is
    ``AdamW``), or a user's own subclass of ``torch.optim.Optimizer`` as ``"package.module:Class"`` or
    ``"path/to/file.py:Class"`` (the syntax of ``[task] source``).

    Raises:
        ValueError: no such optimizer (the message lists them), or a class that is no optimizer.
    """
    if ":" in name:
        from .task import load_callable

        cls = load_callable(name, field="tuner.optimizer", what="class")
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            raise ConfigError("tuner.optimizer", f"{name!r} is a {type(cls).__name__}, not a subclass of "
                                                 "torch.optim.Optimizer")
        if "lr" not in _init_parameters(cls) and not _takes_any_keyword(cls):
            raise ConfigError("tuner.optimizer", f"{cls.__name__} takes no lr argument; selftune sets the "
                                                 "weights' rate through it (tuner.lr)")
        return cls
    classes = {n.lower(): c for n, c in vars(torch.optim).items()
               if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer}
    if name.lower() == "lbfgs":  # its step needs a closure re-evaluating the loss, which a tuner step is not
        raise ValueError("LBFGS needs a closure at every step and cannot train inside the tuner; use sgd, adam, "
                         "adamw, ...")
    if name.lower() == "sparseadam":  # dense gradients are all the tuner's layers give
        raise ValueError("SparseAdam takes sparse gradients only (nn.Embedding(sparse=True)), and the tuner's "
                         "layers give dense ones; use adam or adamw")
    classes.pop("lbfgs", None)
    classes.pop("sparseadam", None)
    try:
        return classes[name.lower()]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; choose a torch.optim class ({', '.join(sorted(classes))}) "
                         "or your own as 'package.module:Class' or 'path/to/file.py:Class'") from None


def takes_sgd_momentum(cls: type) -> bool:
    """Whether ``tuner.momentum`` (a number) reaches ``cls``: SGD, and a user's subclass of it that still
    takes a ``momentum`` argument."""
    return issubclass(cls, torch.optim.SGD) and "momentum" in _init_parameters(cls)


def optimizer_label(cls: type) -> str:
    """How errors name an optimizer class: ``torch.optim.AdamW``, or a user's ``module.Class``."""
    module = cls.__module__
    if module.startswith("torch.optim"):
        return f"torch.optim.{cls.__name__}"
    file = getattr(sys.modules.get(module), "__file__", None)
    if module.startswith("selftune_task_") and file:  # imported from a file path (selftune.task)
        return f"{Path(file).name}:{cls.__qualname__}"
    return f"{module}.{cls.__qualname__}"


def _init_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The named arguments of ``cls(params, ...)``."""
    return {k: p for k, p in inspect.signature(cls.__init__).parameters.items()
            if k not in ("self", "params") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _takes_any_keyword(cls: type) -> bool:
    """Whether ``cls.__init__`` has a ``**kwargs`` (which then takes any name)."""
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values())


def optimizer_source(cls: type) -> str:
    """``"module:Class"`` for a user's optimizer class passed to :class:`TunerSettings` as a class: the
    setting is recorded as text (the store, a resumed run), so the class must be importable by that name.

    Raises:
        ConfigError: a class that is no optimizer, or one defined where its name cannot import it
            (inside a function or class).
    """
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError("tuner.optimizer", f"{cls!r} is not a subclass of torch.optim.Optimizer")
    if cls.__module__.startswith("torch.optim") and getattr(torch.optim, cls.__name__, None) is cls:
        return cls.__name__.lower()
    module = sys.modules.get(cls.__module__)
    if "." in cls.__qualname__ or module is None or getattr(module, cls.__qualname__, None) is not cls:
        raise ConfigError("tuner.optimizer", f"{cls.__qualname__} must be defined at the top level of a module "
                                             "(a run records it by name, 'module:Class', to resume); or pass "
                                             "'path/to/file.py:Class'")
    file = getattr(module, "__file__", None)
    if cls.__module__.startswith("selftune_task_") and file:  # loaded from a file path: recorded as that path
        return f"{Path(file).resolve()}:{cls.__qualname__}"
    return f"{cls.__module__}:{cls.__qualname__}"

"""Settings of the self-tuning loop, validated by pydantic.

One model serves the Python API (``TunerSettings(lr=0.05)``) and the ``[tuner]`` table of a config
file, so defaults and error messages are the same in both places.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

from .schedules import ScheduleSettings


class TunerSettings(BaseModel):
    """How weights and hyperparameters are trained (DESIGN.md section 3).

    ``None`` for ``hyper_optimizer``/``hyper_lr`` picks the official default of the algorithm
    (:mod:`selftune.algorithms`): Adam at 3e-3 for STN, RMSprop at 1e-2 for Delta-STN.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    batch_size: PositiveInt = 128
    val_batch_size: PositiveInt | None = Field(None, description="defaults to batch_size")
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: PositiveFloat | str = Field(
        0.01, description="learning rate of the weights, or the name of a hyperparameter of the space that holds it "
                          "(declare it log-scaled, e.g. [space.lr] low = 1e-4, high = 1, log = true): fixed trains at "
                          "its init, searches sample it, and hd, stn and delta-stn tune it in the run by hypergradient "
                          "descent (selftune.hd)")
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    response_lr: PositiveFloat | None = Field(
        None, description="learning rate of the response weights (W_r, b_r, V); None: min(lr, 0.01), the official "
                          "code's rate: a response is the product of two trained factors (gates and response "
                          "weights), which blows up at rates the plain weights take well")
    weight_decay: float = Field(0.0, ge=0.0, description="fixed (untuned) decay of the weight optimizer")
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
        1.0, gt=0.0, le=1.0,
        description="Delta-STN: share of each batch used by the response-weight step (1.0 as in the paper; "
                    "lower trades response-data for speed, the general weights always see the whole batch)")
    val_steps: PositiveInt = 1
    linearize: bool = Field(False, description="delta-stn: train the response on its first-order "
                                               "(Jacobian-vector product) form; ignored by other methods")
    schedule: ScheduleSettings = Field(
        default_factory=ScheduleSettings,
        description="[tuner.schedule]: the shape of the weights' rate over the run (constant, cosine, cosine_power, "
                    "step, with an optional linear warm-up); it multiplies the base rate, tuned or not")
    lr_travel: float = Field(
        8.0, ge=0.0,
        description="with a tuned learning rate (tuner.lr names a hyperparameter): the distance (unconstrained "
                    "units) it can cover in the run if every step pushes it the same way, as hyper_travel; each "
                    "weight step moves it by at most lr_travel / planned weight steps (selftune.hd)")
    log_every: PositiveInt = 10
    max_divergences: int = Field(3, ge=0, description="roll-backs allowed before a diverging run fails")
    divergence_lr_factor: float = Field(0.5, gt=0.0, lt=1.0,
                                        description="factor applied to the offending learning rate on a roll-back")

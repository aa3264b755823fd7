"""In-loop tuning algorithms: what one weight step is, which optimizers exist, and their defaults.

Like ``torch.optim`` has one class per algorithm, each way of training inside
:class:`~selftune.tuner.SelfTuner` is one class here, registered under its name in
:data:`ALGORITHMS` — the one place an in-loop method name is spelled. The tuner owns the loop (data
order, hyper steps, roll-backs, records); an algorithm owns

* the net form it needs (``"stn"`` or ``"delta"`` best-response layers, or any),
* its weight optimizers (which parameters move together, at which rate),
* its hyper optimizer and that optimizer's official default rate,
* its weight step.

A new single-run method (a learning-rate hypergradient, a data-selection rule) is a subclass
decorated with :func:`register`; the CLI, the config schema, the benchmark harness and the searches
pick it up from the registry without another edit.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .batches import batch_size, head
from .errors import ConfigError
from .layer_rates import rate_groups

if TYPE_CHECKING:
    from .nn.hypernet import HyperNet
    from .settings import TunerSettings
    from .tuner import SelfTuner

__all__ = ["ALGORITHMS", "DEFAULT_ALGORITHM", "STN", "Algorithm", "DeltaSTN", "Fixed", "get_algorithm", "register"]

#: Every in-loop algorithm by name, in registration order.
ALGORITHMS: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: make ``cls`` available under ``cls.name`` everywhere (API, config, CLI, bench)."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} needs a class attribute `name`")
    if cls.name in ALGORITHMS and ALGORITHMS[cls.name] is not cls:
        raise ValueError(f"an algorithm named {cls.name!r} is already registered ({ALGORITHMS[cls.name].__name__})")
    ALGORITHMS[cls.name] = cls
    return cls


def get_algorithm(name: str) -> type[Algorithm]:
    """The algorithm registered as ``name``.

    Raises:
        ConfigError: an unknown name (the message lists the known ones).
    """
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ConfigError("method", f"unknown method {name!r}; choose one of {list(ALGORITHMS)}") from None


#: With ``response_lr`` unset, the response weights train at the weights' rate capped here: the
#: official code trains its response at 0.01, and a response is the product of two trained factors
#: (gates and response weights), which blew up at rates the plain weights take well (digits MLP, SGD
#: 0.05: delta-stn from dropout 0.8 after 250 steps, stn in a 4-epoch run).
RESPONSE_LR_CAP = 0.01


def response_lr(settings: TunerSettings, lr: float) -> float:
    """Learning rate of the response weights: ``settings.response_lr``, else ``min(lr, RESPONSE_LR_CAP)``
    (``lr``: the weights' rate, the bound hyperparameter's initial value when the rate is tuned)."""
    return settings.response_lr if settings.response_lr is not None else min(lr, RESPONSE_LR_CAP)


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:300]


class Algorithm:
    """Base class of in-loop algorithms. Subclasses set the class attributes and :meth:`step`.

    Attributes:
        name: registry key (the ``method`` of a config).
        form: best-response form the net must have (``None``: any; the response path is unused).
        tunes: whether the loop takes hyper steps at all.
        tunes_lr: whether a learning rate bound to a hyperparameter (``[tuner] lr = "name"``) is tuned
            by hypergradient descent (:mod:`selftune.hd`); ``False`` trains at its initial value.
        needs_lr: the algorithm tunes nothing but the learning rate, so it needs that binding.
        lr_group: the weight optimizer holding the network's own weights (the rate a binding drives).
        default_hyper_optimizer, default_hyper_lr: the official implementation's choice, used when
            the settings leave ``hyper_optimizer``/``hyper_lr`` unset.
        description: one line for ``--help`` and docs.
    """

    name: ClassVar[str] = ""
    form: ClassVar[str | None] = None
    tunes: ClassVar[bool] = True
    tunes_lr: ClassVar[bool] = True
    needs_lr: ClassVar[bool] = False
    lr_group: ClassVar[str] = "weights"
    default_hyper_optimizer: ClassVar[str] = "rmsprop"
    default_hyper_lr: ClassVar[float] = 1e-2
    description: ClassVar[str] = ""
    #: the algorithm computes its own hypergradient (:meth:`hypergradient`) instead of the tuner's
    #: best-response one
    implicit: ClassVar[bool] = False
    #: its hypergradient reaches a bound learning rate and momentum (through the weights' update), so
    #: hypergradient descent leaves them alone (``one-pass``)
    differentiates_update: ClassVar[bool] = False

    def __init__(self, settings: TunerSettings, lr: float | None = None) -> None:
        """``lr``: the weights' initial learning rate when ``settings.lr`` names a hyperparameter."""
        self.settings = settings
        if lr is None:
            if isinstance(settings.lr, str):
                raise ValueError(f"tuner.lr names the hyperparameter {settings.lr!r}: pass its initial value as lr")
            lr = settings.lr
        self.lr = float(lr)
        #: what each weight optimizer was built from (:meth:`rehearse_optimizers`), by ``id``
        self._built: dict[int, tuple[type[torch.optim.Optimizer], dict, str]] = {}

    # -- construction ----------------------------------------------------------------------------
    def check_net(self, net: HyperNet) -> None:
        """Raises ConfigError (a ValueError) when ``net``'s layers do not have the form this algorithm trains,
        or it trains through best-response layers and ``net`` has none."""
        if self.form is not None and net.form != self.form:
            raise ConfigError("method", f"{self.name!r} needs a net built with form={self.form!r} (got {net.form!r}); "
                                        f"build it with selftune.hypernetize(model, space, form={self.form!r})")
        if self.form is not None and not net.best_response_layers():
            # its hypergradient flows through the response layers only: with none it would crash at the
            # first response step (delta) or never move a hyperparameter (stn)
            others = ", ".join(repr(n) for n, c in ALGORITHMS.items() if c.form is None and c.tunes)
            raise ConfigError("method", f"{self.name!r} tunes through best-response layers, but hypernetize "
                                        "converted none of this model's layers (it converts nn.Linear, nn.Conv1d/2d, "
                                        "nn.Embedding, nn.LSTM/GRU and nn.MultiheadAttention; net.summary() says "
                                        f"what stayed plain); use a method that needs none ({others}) or build the "
                                        "model from layers it converts")

    def _weight_optimizer(self, groups: list) -> torch.optim.Optimizer:
        """The user's optimizer class over ``groups``: ``tuner.momentum`` reaches SGD only (as before
        any optimizer could be named), ``optimizer_args`` override the rest."""
        from .settings import optimizer_class, optimizer_label, takes_sgd_momentum

        s = self.settings
        cls = optimizer_class(s.optimizer)
        kwargs: dict = {"lr": self.lr}
        if s.weight_decay or "weight_decay" in inspect.signature(cls.__init__).parameters:
            kwargs["weight_decay"] = s.weight_decay  # a user's class without one is refused a nonzero decay
        if takes_sgd_momentum(cls):
            # a momentum bound to a hyperparameter is written into the group by the tuner before every step
            kwargs["momentum"] = s.momentum if isinstance(s.momentum, float) else 0.9
        kwargs.update(s.optimizer_args)
        field = "tuner.optimizer_args" if s.optimizer_args else "tuner.optimizer"
        try:
            optimizer = cls(groups, **kwargs)
        except Exception as err:  # PyTorch's own checks raise IndexError, RuntimeError, ... as well
            raise ConfigError(field, f"{optimizer_label(cls)} refused them: {_one_line(err)}") from None
        self._built[id(optimizer)] = (cls, kwargs, field)
        return optimizer

    def rehearse_optimizers(self, optimizers: Mapping[str, torch.optim.Optimizer], device: torch.device) -> None:
        """One step of each weight optimizer's class and arguments on a stand-in weight shaped as its first
        weight (at most 4 wide in each dimension: Muon takes matrices only) with its dtype, on the training
        ``device`` (the net moves there when it trains): some arguments are checked only at the first step
        (Adam's ``betas`` of three values, ``capturable`` off a GPU), which would fail the run after it was
        recorded, with PyTorch's traceback.

        Raises:
            ConfigError: naming ``tuner.optimizer_args`` (``tuner.optimizer`` without any).
        """
        from .settings import optimizer_label

        for optimizer in optimizers.values():
            built = self._built.get(id(optimizer))
            first = next((p for g in optimizer.param_groups for p in g["params"]), None)
            if built is None or first is None:
                continue
            cls, kwargs, field = built
            # at each group's own rate too: a layer's scale (tuner.lr_scales) can take it where the class fails
            rates = [(None, kwargs["lr"])] + [(g, g["lr"]) for g in optimizer.param_groups
                                              if "lr_scale" in g and g["lr"] != kwargs["lr"]]
            for group, lr in rates:
                stand_in = torch.zeros(tuple(min(n, 4) for n in first.shape), dtype=first.dtype, device=device,
                                       requires_grad=True)
                stand_in.grad = torch.ones_like(stand_in)
                try:
                    cls([stand_in], **{**kwargs, "lr": lr}).step()
                except Exception as err:
                    if group is None:
                        raise ConfigError(field, f"{optimizer_label(cls)} failed its first step with them: "
                                                 f"{_one_line(err)}") from None
                    raise ConfigError(f"tuner.lr_scales[\"{group['lr_pattern']}\"]",
                                      f"{optimizer_label(cls)} failed its first step at the rate it gives ({lr:g}): "
                                      f"{_one_line(err)}") from None

    def _response_group(self, net: HyperNet) -> dict:
        return {"params": net.response_parameters(), "lr": response_lr(self.settings, self.lr)}

    def _general_groups(self, net: HyperNet) -> list[dict[str, Any]]:
        """The network's own weights as optimizer groups: one, or one more per layer pattern of
        ``tuner.lr_scales`` (:func:`~selftune.layer_rates.rate_groups`)."""
        if not self.settings.lr_scales:
            return [{"params": net.general_parameters()}]
        return rate_groups(net.model, net.general_parameters(), self.settings.lr_scales, self.lr)

    def weight_optimizers(self, net: HyperNet) -> dict[str, torch.optim.Optimizer]:
        """Optimizers of the weights by group name; :meth:`step` passes those names to the tuner."""
        return {"weights": self._weight_optimizer(self._general_groups(net))}

    def hyper_settings(self) -> tuple[str, float, float]:
        """``(optimizer, lr, scale_lr)`` of the hyperparameters, defaults filled in."""
        s = self.settings
        lr = s.hyper_lr or self.default_hyper_lr
        return s.hyper_optimizer or self.default_hyper_optimizer, lr, s.scale_lr or lr

    def hyper_optimizer(self, net: HyperNet) -> torch.optim.Optimizer | None:
        """The optimizer of the hyperparameters (and perturbation scales), or ``None`` if not tuning."""
        if not self.tunes:
            return None
        opt, lr, scale_lr = self.hyper_settings()
        groups = [{"params": [net.hparams], "lr": lr}]
        if self.settings.tune_scales:
            groups.append({"params": [net.scale_raw], "lr": scale_lr})
        cls = torch.optim.Adam if opt == "adam" else torch.optim.RMSprop
        return cls(groups)

    # -- the loop ----------------------------------------------------------------------------------
    def uses_implicit(self, tuner: SelfTuner) -> bool:
        """Whether the next hyper step takes :meth:`hypergradient` (``implicit``; an algorithm that hands
        over mid-run decides from its recorded state)."""
        return self.implicit

    def hyper_interval(self, tuner: SelfTuner) -> int:
        """Weight steps between two rounds of ``val_steps`` hyper steps: ``tuner.train_steps``, or more
        where an algorithm's hyper steps are expensive enough to need spacing (``tuner.compute_budget``)."""
        return self.settings.train_steps

    def on_epoch_end(self, tuner: SelfTuner, row: dict[str, float]) -> None:
        """Called with each epoch's row (full validation loss included) before the epoch's snapshot, so
        what it records in ``tuner.log.algorithm`` is checkpointed with the epoch."""

    def hypergradient(self, tuner: SelfTuner, x: Any, y: Any) -> torch.Tensor:  # pragma: no cover - abstract
        """With :attr:`implicit`: fill ``tuner.net.hparams.grad`` from the validation batch ``(x, y)``,
        count the examples it used, and return the validation loss."""
        raise NotImplementedError

    def step(self, tuner: SelfTuner, x: Any, y: Any) -> float:  # pragma: no cover - abstract
        """One weight step on the training batch ``(x, y)``; returns its training loss."""
        raise NotImplementedError


@register
class Fixed(Algorithm):
    """Plain training at the current hyperparameters: the baseline every tuner is compared with."""

    name = "fixed"
    tunes = False
    tunes_lr = False
    description = "plain training at the space's init values (the baseline)"

    def step(self, tuner: SelfTuner, x: Any, y: Any) -> float:
        return tuner.weight_step(x, y, None, "weights", respond=False)


@register
class HD(Fixed):
    """Hypergradient descent on the learning rate alone (Baydin et al. 2018), every other
    hyperparameter fixed: plain training whose rate follows ``g_t . delta_{t-1}`` (:mod:`selftune.hd`).
    Needs ``[tuner] lr = "name"``; stn and delta-stn tune such a rate the same way, beside the rest."""

    name = "hd"
    tunes_lr = True
    needs_lr = True
    description = "hypergradient descent on the learning rate only (Baydin et al. 2018)"


@register
class STN(Algorithm):
    """Self-Tuning Networks (MacKay et al. 2019): every weight, response included, at perturbed
    per-example hyperparameters; Adam at 3e-3 on the hyperparameters (official code)."""

    name = "stn"
    form = "stn"
    default_hyper_optimizer = "adam"
    default_hyper_lr = 3e-3
    description = "Self-Tuning Networks (MacKay et al. 2019)"

    def weight_optimizers(self, net: HyperNet) -> dict[str, torch.optim.Optimizer]:
        return {"weights": self._weight_optimizer([*self._general_groups(net), self._response_group(net)])}

    def step(self, tuner: SelfTuner, x: Any, y: Any) -> float:
        u = tuner.net.perturb(batch_size(x, tuner.net.batch_dim), tuner.generator).detach()
        return tuner.weight_step(x, y, u, "weights")


@register
class DeltaSTN(Algorithm):
    """Delta-STN (Bae & Grosse 2020): general weights at the unperturbed hyperparameters (no bias
    from perturbed data), then the response weights at perturbed ones; RMSprop at 1e-2."""

    name = "delta-stn"
    form = "delta"
    lr_group = "general"
    description = "Delta-STN (Bae & Grosse 2020)"

    def weight_optimizers(self, net: HyperNet) -> dict[str, torch.optim.Optimizer]:
        return {"general": self._weight_optimizer(self._general_groups(net)),
                "response": self._weight_optimizer([self._response_group(net)])}

    def step(self, tuner: SelfTuner, x: Any, y: Any) -> float:
        loss = tuner.weight_step(x, y, None, "general")
        # The response weights are few functions of few hyperparameters, so a share of the batch can do.
        dim = tuner.net.batch_dim
        n = batch_size(x, dim)
        keep = max(1, math.ceil(self.settings.response_fraction * n))
        if tuner.needs_two and keep == 1 and n > 1:  # BatchNorm cannot train on one example
            keep = 2
        x, y = head(x, keep, dim, n), head(y, keep, dim, n)
        u = tuner.net.perturb(keep, tuner.generator).detach()
        with tuner.frozen(tuner.general_params), tuner.kept_statistics():
            tuner.weight_step(x, y, u, "response", linearize=self.settings.linearize)
        return loss


#: The algorithm a config or a tuner uses when it names none: Delta-STN that hands over to implicit
#: hypergradients once the model clearly over-fits (:mod:`selftune.handover`, registered below). It is
#: Delta-STN step for step until then, and measured better or equal on 13 of 15 suite cells.
DEFAULT_ALGORITHM: str = "delta-ift"


# registers ift, and through it delta-ift and one-pass, which build on it: one entry point, so importing any
# of these modules first (selftune.implicit on its own) completes the registry without an import cycle
from . import implicit as _implicit  # noqa: E402,F401

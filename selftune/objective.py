"""The loss, and the loss-side hyperparameters: weight decay and label smoothing, per example.

The loss is cross-entropy unless the user gives their own (``loss(outputs, targets) -> scalar``:
regression, multi-label, sequence or anything else). The hyperparameters enter only the *training*
loss: the hyper step scores the plain loss on validation data, so they, like dropout rates, are
tuned through the best-response path (how the weights respond to them decides the validation loss).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from .batches import batch_axis
from .errors import ConfigError, ConfigTypeError, DataError

Lookup = Callable[[str], torch.Tensor]
#: A user's loss: ``loss(outputs, targets)`` returns the batch's mean loss as a scalar tensor.
LossFn = Callable[[Any, Any], torch.Tensor]
#: A loss-side hyperparameter: the name of one in the space, or a constant.
Spec = str | float
#: ``objective.weight_decay``: one decay for every weight matrix and kernel, or one per layer pattern.
DecaySpec = Spec | Mapping[str, Spec]


def matches(pattern: str, module: str) -> bool:
    """Whether a layer pattern (``fnmatch`` syntax) names ``module`` (a qualified name from
    ``model.named_modules()``) or one of the blocks that hold it: ``"encoder"`` covers
    ``encoder.0.conv``, ``"fc*"`` covers ``fc1`` and ``fc2``, ``"*"`` covers every layer."""
    parts = module.split(".")
    return any(fnmatchcase(".".join(parts[:k]), pattern) for k in range(1, len(parts) + 1))


def holders(model: torch.nn.Module, params: Sequence[torch.Tensor]) -> list[tuple[str, list[torch.Tensor]]]:
    """Each layer of ``model`` (its qualified name) with those of ``params`` it holds itself, in
    ``named_modules()`` order; a parameter shared by two layers (tied embeddings) answers to the first."""
    keep, seen = {id(p) for p in params}, set()
    found: list[tuple[str, list[torch.Tensor]]] = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if id(p) in keep and id(p) not in seen]
        if own:
            seen.update(id(p) for p in own)
            found.append((name, own))
    return found


def check_pattern(where: str, pattern: str, model: torch.nn.Module, owned: list[tuple[str, list[torch.Tensor]]],
                  took: bool, what: str, tied_rule: str) -> None:
    """Refuse a layer pattern that reaches none of the parameters ``owned`` (:func:`holders`), saying why:
    it names only frozen layers, only layers whose weights are tied to an earlier holder, no layer at all
    (the message lists the layers), or (``took`` False) only layers an earlier pattern took. A typo would
    otherwise leave ``what`` (a decay, a rate scale) that drives nothing."""
    names = [name for name, _ in owned]
    if any(matches(pattern, name) for name in names):
        if not took:
            raise ConfigError(where, "every layer it names is taken by an earlier pattern (the first match "
                                     "wins); move it before the broader one")
        return
    frozen = [name for name, module in model.named_modules() if matches(pattern, name)
              and any(not p.requires_grad for p in module.parameters(recurse=False))]
    if frozen:  # it names layers, whose weights do not train
        raise ConfigError(where, f"names only frozen layers ({', '.join(repr(n) for n in frozen[:4])}"
                                 f"{', ...' if len(frozen) > 4 else ''}: requires_grad=False), whose weights do not "
                                 f"train, so {what} there would drive nothing; remove the pattern, or unfreeze "
                                 "those layers")
    parametrized = [name for name, module in model.named_modules() if matches(pattern, name)
                    and parametrize.is_parametrized(module)]
    if parametrized:  # (the decay leaves their tensors alone: they are not the weight the layer applies)
        shown = ", ".join(repr(n) for n in parametrized[:4]) + (", ..." if len(parametrized) > 4 else "")
        raise ConfigError(where, f"names only layers with a parametrization ({shown}: "
                                 "torch.nn.utils.parametrizations), whose "
                                 f"tensors are not the weight they apply, so {what} does not apply to them; remove "
                                 "the pattern")
    owner = {id(p): name for name, own in owned for p in own}
    tied = sorted({owner[id(p)] for name, module in model.named_modules() if matches(pattern, name)
                   for p in module.parameters(recurse=False) if id(p) in owner})
    if tied:  # a decoder whose weight is its embedding's: the matrix belongs to its first holder
        raise ConfigError(where, f"names only layers whose weights are tied to {', '.join(repr(n) for n in tied)}, "
                                 f"which holds them first: {tied_rule}, its first holder's; set it on {tied[0]!r} "
                                 "(or a pattern matching it), or untie the weights")
    for name, module in model.named_modules():  # a parameter's name: patterns name its layer
        for pname, _ in module.named_parameters(recurse=False):
            if fnmatchcase(f"{name}.{pname}" if name else pname, pattern):
                use = f"use {name!r}" if name else "only \"*\" reaches the model's own parameters"
                raise ConfigError(where, f"names a parameter; patterns name layers (model.named_modules()), not "
                                         f"parameters: {use}")
    shown = [repr(n) if n else "the model itself (\"*\")" for n in names]
    layers = ", ".join(shown[:12]) + (", ..." if len(names) > 12 else "")
    raise ConfigError(where, f"names no layer with weights; the model's are {layers}")


def _is_spec(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, str | int | float)


def classes_in_dim_1(logits: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether outputs hold their classes in dimension 1, PyTorch's ``F.cross_entropy`` layout: ``(B, C,
    d1, ...)`` (a tagger's ``(B, C, L)``, a segmentation's ``(B, C, H, W)``) with integer targets ``(B, d1,
    ...)``. Where the targets fit both that and the classes-last layout (``(B, T, C)``, a language model's,
    selftune's reading), classes last it is: that is when ``C`` equals ``d1`` (``check_targets`` warns)."""
    return (logits.dim() > 2 and isinstance(target, torch.Tensor) and not target.is_floating_point()
            and tuple(target.shape) != tuple(logits.shape[:-1])
            and tuple(target.shape) == (logits.shape[0], *logits.shape[2:]))


def layout_of(logits: torch.Tensor, target: torch.Tensor) -> int | None:
    """Where a batch's outputs hold their classes, where its shapes say so: 1 (:func:`classes_in_dim_1`),
    -1 (classes last, the targets the outputs' shape without it), ``None`` where both or neither fit (a
    batch whose padded length equals the number of classes, or a classifier's ``(B, C)``)."""
    if logits.dim() <= 2 or not isinstance(target, torch.Tensor):
        return None
    last = tuple(target.shape) == tuple(logits.shape[:-1]) or target.shape == logits.shape
    if classes_in_dim_1(logits, target):
        return 1
    first = tuple(target.shape) == (logits.shape[0], *logits.shape[2:])
    return -1 if last and not first else None


def classes_last(logits: torch.Tensor, target: torch.Tensor, classes_dim: int | None = None) -> torch.Tensor:
    """The outputs with their classes in the last dimension: moved from dimension 1 where ``classes_dim`` is
    1 (a run's layout, read once from its first examples: a batch padded to a length equal to the number of
    classes fits both readings), or, without one, where this batch's shapes say so (:func:`classes_in_dim_1`)."""
    if logits.dim() <= 2 or classes_dim == -1:
        return logits
    if classes_dim == 1:
        return logits.movedim(1, -1)
    return logits.movedim(1, -1) if classes_in_dim_1(logits, target) else logits


def flatten_tokens(logits: torch.Tensor, target: torch.Tensor,
                   classes_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence outputs ``(B, T, C)`` with targets ``(B, T)`` become ``(B*T, C)`` and ``(B*T,)``:
    a language model's loss is the mean over every predicted token. Outputs with their classes in
    dimension 1 (PyTorch's ``(B, C, d1, ...)``) are read as ``F.cross_entropy`` reads them
    (:func:`classes_last`; probability targets of the outputs' shape then have theirs there too).
    Classifier outputs pass unchanged."""
    moved = classes_last(logits, target, classes_dim)
    if moved is not logits and target.is_floating_point() and target.shape == logits.shape:
        target = target.movedim(1, -1)
    logits = moved
    if logits.dim() > 2:
        classes = logits.shape[-1]
        soft = target.shape == logits.shape  # class probabilities per token
        return logits.reshape(-1, classes), target.reshape(-1, classes) if soft else target.reshape(-1)
    return logits, target


def per_prediction(values: torch.Tensor, logits: torch.Tensor, batch_dim: int = 0) -> torch.Tensor:
    """Per-example values ``(B,)`` (or one value) spread over the predictions of ``logits`` in the order
    :func:`flatten_tokens` flattens them: each token takes its example's value, whether the examples lie
    in dimension 0 (``(B, T, C)``) or, for a sequence-first model, in dimension 1 (``(T, B, C)``)."""
    lead = logits.shape[:-1]
    if values.numel() == 1 or len(lead) <= 1:
        return values.reshape(-1).expand(lead.numel()) if values.numel() == 1 else values
    shape = [1] * len(lead)
    shape[batch_axis(logits, values.numel(), batch_dim)] = values.numel()
    return values.reshape(shape).expand(lead).reshape(-1)


def smoothed_cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing: torch.Tensor, *,
                           differentiable: bool = False) -> torch.Tensor:
    """Mean cross-entropy with a per-example label-smoothing rate ``smoothing`` ``(B,)``.

    Example ``i`` scores ``(1 - s_i) * nll_i + s_i * mean_k(-log p_ik)``, which equals
    ``F.cross_entropy(..., label_smoothing=s)`` when every ``s_i = s``; with class-probability targets
    (floating point, the logits' shape) ``nll_i = -sum_k t_ik log p_ik``, as PyTorch smooths them. Labels of
    :data:`IGNORE_INDEX` are left out of the mean, as PyTorch leaves them out.
    """
    logp = F.log_softmax(logits, dim=-1)
    scored = None  # integer labels: those not IGNORE_INDEX (padding), as F.cross_entropy skips them
    if target.is_floating_point() and target.shape == logits.shape:
        nll = -(target.to(logp.dtype) * logp).sum(dim=-1)
    else:
        ignored = target == IGNORE_INDEX
        if bool(ignored.any()):
            scored = ~ignored
            target = target.clamp_min(0)
        nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    uniform = -logp.mean(dim=-1)
    s = (smoothing if differentiable else smoothing.detach()).to(logits.dtype)
    per = (1 - s) * nll + s * uniform
    if scored is None:
        return per.mean()
    return (per * scored).sum() / scored.sum().clamp_min(1)  # (a batch of padding only: 0, not 0/0)


#: PyTorch's default ``ignore_index``: a label the default cross-entropy does not score (a padding token of a
#: sequence, as Hugging Face's collators mark it), in the loss, the accuracy and the checks alike
IGNORE_INDEX = -100


def cross_entropy(outputs: torch.Tensor, target: torch.Tensor, classes_dim: int | None = None) -> torch.Tensor:
    """The default loss: mean cross-entropy, per predicted token for sequence outputs (the classes where
    ``classes_dim`` says, :func:`classes_last`); labels of :data:`IGNORE_INDEX` are not scored (PyTorch's
    ``F.cross_entropy`` default), and a batch of nothing else (padding only) scores 0, not PyTorch's 0/0 =
    NaN, which would read as a divergence."""
    logits, flat = flatten_tokens(outputs, target, classes_dim)
    loss = F.cross_entropy(logits, flat)
    if flat.is_floating_point():
        return loss
    return torch.where((flat != IGNORE_INDEX).any(), loss, torch.zeros_like(loss))


@dataclass(frozen=True)
class Objective:
    """The training and validation loss, with optional loss-side hyperparameters.

    Args:
        weight_decay: hyperparameter name (or constant) multiplying ``0.5 * sum ||W||^2`` over the
            weight matrices and kernels of the network (biases excluded); or a mapping from layer
            patterns to names or constants, one decay per layer group (:meth:`decay_group`), so that
            e.g. an embedding and a classifier head are regularised apart, each tuned on its own.
        label_smoothing: hyperparameter name (or constant) for the label-smoothing rate (only with
            the default cross-entropy: a custom loss has no labels to smooth).
        loss: ``loss(outputs, targets) -> scalar`` mean loss of a batch; ``None``: cross-entropy.
            It is both the training loss (plus the decay) and what the hyper steps minimise on
            validation data, so it must be differentiable in the outputs.

    Raises:
        ValueError: label smoothing together with a custom loss.
    """

    weight_decay: DecaySpec | None = None
    label_smoothing: Spec | None = None
    loss: LossFn | None = None
    #: where the default cross-entropy finds the classes in outputs of 3+ dimensions: 1 (PyTorch's
    #: ``(B, C, d1, ...)``) or -1 (``(B, T, C)``); ``None``: read from each batch's shapes until the tuner
    #: fixes it for the run from its first examples (a batch padded to a length equal to the number of
    #: classes fits both)
    classes_dim: int | None = None

    def __post_init__(self) -> None:
        if self.classes_dim not in (None, 1, -1):
            raise ConfigError("objective.classes_dim", f"must be 1, -1 or None (got {self.classes_dim!r})")
        if self.label_smoothing is not None and not _is_spec(self.label_smoothing):
            raise ConfigTypeError("objective.label_smoothing", f"must be a hyperparameter's name or a number (got "
                                                               f"{type(self.label_smoothing).__name__})")
        decay = self.weight_decay
        if isinstance(decay, Mapping):
            if not decay:
                raise ConfigError("objective.weight_decay", "an empty table decays nothing; name a layer pattern "
                                                            "(\"*\" for every layer) or remove it")
            for pattern, value in decay.items():
                if not isinstance(pattern, str) or not pattern:
                    raise ConfigError("objective.weight_decay", f"layer patterns are module names or fnmatch "
                                                                f"patterns (got {pattern!r})")
                if not _is_spec(value):
                    raise ConfigTypeError(f"objective.weight_decay[\"{pattern}\"]",
                                          f"must be a hyperparameter's name or a number (got {type(value).__name__})")
        elif decay is not None and not _is_spec(decay):
            raise ConfigTypeError("objective.weight_decay", f"must be a hyperparameter's name, a number, or a table "
                                                            f"from layer patterns to those (got "
                                                            f"{type(decay).__name__})")
        if self.loss is not None and self.label_smoothing is not None:
            raise ConfigError("objective.label_smoothing", "applies to the default cross-entropy only; remove it, or "
                                                           "smooth the targets inside your own loss")
        if self.loss is not None and not callable(self.loss):
            raise ConfigTypeError("loss", f"must be a callable loss(outputs, targets) -> scalar tensor (got "
                                          f"{type(self.loss).__name__})")
        if self.loss is not None and getattr(self.loss, "reduction", "mean") == "sum":
            # a summed loss scales with the batch: validation losses over batches of other sizes, the hyper
            # steps' scale and a growing batch's steps would all silently depend on the batch size
            raise ConfigTypeError("loss", f"{type(self.loss).__name__}(reduction='sum') grows with the batch size, "
                                          "and selftune needs the batch's mean loss (it compares losses over batches "
                                          "of other sizes); use reduction='mean', and a larger learning rate where "
                                          "the sum set its scale")

    def decays(self) -> list[Spec]:
        """The decay of each layer group, in the order of :meth:`decay_group`'s indices (one group, every
        layer, for a single decay; none without one)."""
        if self.weight_decay is None:
            return []
        if isinstance(self.weight_decay, Mapping):
            return list(self.weight_decay.values())
        return [self.weight_decay]

    def decay_group(self, module: str) -> int | None:
        """Which decay applies to the weights of layer ``module`` (a qualified module name): the first
        pattern, in the order given, that names it or a block holding it; ``None``: not decayed (no
        pattern names it; end the table with ``"*"`` to decay the rest)."""
        if self.weight_decay is None:
            return None
        if not isinstance(self.weight_decay, Mapping):
            return 0
        return next((i for i, p in enumerate(self.weight_decay) if matches(p, module)), None)

    def weight_groups(self, model: torch.nn.Module, weights: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
        """The weights each decay of :meth:`decays` applies to: every one of ``weights`` (the model's
        trainable weight matrices and kernels) under the layer that holds it, grouped by
        :meth:`decay_group`. A weight shared by two layers (tied embeddings) answers to the first.

        Raises:
            ConfigError: a layer pattern that names no layer holding one of ``weights`` (a typo would
                otherwise leave a decay that drives nothing); the message lists the layers.
        """
        groups: list[list[torch.Tensor]] = [[] for _ in self.decays()]
        owned = holders(model, weights)
        for name, own in owned:
            g = self.decay_group(name)
            if g is not None:
                groups[g].extend(own)
        if isinstance(self.weight_decay, Mapping):
            for pattern, group in zip(self.weight_decay, groups, strict=True):
                check_pattern(f"objective.weight_decay[\"{pattern}\"]", pattern, model, owned, bool(group),
                              "a decay", "a tied matrix has one decay")
        return groups

    def hyperparameters(self) -> set[str]:
        return {v for v in (*self.decays(), self.label_smoothing) if isinstance(v, str)}

    @staticmethod
    def _per_example(spec: str | float, lookup: Lookup, batch: int, like: torch.Tensor) -> torch.Tensor:
        if isinstance(spec, str):
            return lookup(spec)
        return torch.full((batch,), float(spec), device=like.device, dtype=like.dtype)

    def train_loss(self, logits: torch.Tensor, target: torch.Tensor, lookup: Lookup,
                   decayed: Sequence[Sequence[torch.Tensor]] = (), *, norms: torch.Tensor | None = None,
                   differentiable: bool = False, batch_dim: int = 0) -> torch.Tensor:
        """Training loss at per-example hyperparameters ``lookup(name) -> (B,)``; sequence outputs
        ``(B, T, C)`` (``(T, B, C)`` for a sequence-first model, ``batch_dim = 1``) average over tokens,
        each token at its example's hyperparameters.

        Weight decay penalises ``0.5 * sum_g mean_i(wd_gi * norms_gi)`` over the layer groups ``g`` of
        :meth:`decays` when ``norms`` (``(G, B)``: the squared norms of each example's effective weights
        per group, from :meth:`~selftune.nn.HyperNet.recording_norms`) is given, else ``0.5 * sum_g
        mean(wd_g) * sum ||p||^2`` over the parameters of ``decayed[g]``.

        ``differentiable``: keep the loss's dependence on the decay and smoothing rates (implicit
        differentiation takes the mixed derivative in weights and hyperparameters); otherwise they
        are constants of the weight step."""
        if self.loss is None and not isinstance(logits, torch.Tensor):
            # the checks before training read the model in evaluation mode; one that returns more while training
            # (Inception's (logits, aux)) failed here with "'tuple' object has no attribute 'dim'"
            raise DataError(f"train: in training mode the model returns a {type(logits).__name__}, and the default "
                            "loss (cross-entropy) needs a tensor of logits; pass a loss that takes it, e.g. loss="
                            "lambda out, y: F.cross_entropy(out[0] if isinstance(out, tuple) else out, y)")
        if self.loss is not None:
            loss = self.eval_loss(logits, target)
        elif self.label_smoothing is None:
            loss = cross_entropy(logits, target, self.classes_dim)
        else:
            moved = classes_last(logits, target, self.classes_dim)
            flat_logits, flat_target = flatten_tokens(logits, target, self.classes_dim)
            logits = moved
            smoothing = self._per_example(self.label_smoothing, lookup, 1, logits)
            loss = smoothed_cross_entropy(flat_logits, flat_target, per_prediction(smoothing, logits, batch_dim),
                                          differentiable=differentiable)
        if decayed and isinstance(decayed[0], torch.Tensor):
            raise TypeError("decayed must hold one list of weights per decay (Objective.weight_groups), not the "
                            "weights themselves: pass [weights]")
        for g, spec in enumerate(self.decays()):
            # A constant decay is one value for every example; a named one is read per example.
            wd = self._per_example(spec, lookup, 1, loss)
            wd = wd if differentiable else wd.detach()
            if norms is not None:
                loss = loss + 0.5 * (wd * norms[g]).mean()
            elif g < len(decayed) and decayed[g]:
                loss = loss + 0.5 * wd.mean() * sum((p * p).sum() for p in decayed[g])
        return loss

    def eval_loss(self, outputs: Any, target: Any) -> torch.Tensor:
        """Validation/test loss: the plain loss (cross-entropy per token for sequences, or the user's),
        whatever the hyperparameters.

        Raises:
            TypeError: a custom loss that returns something other than a scalar tensor.
        """
        if self.loss is None:
            return cross_entropy(outputs, target, self.classes_dim)
        value = self.loss(outputs, target)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise TypeError(f"loss must return the batch's mean loss as a scalar tensor (got {shape}); reduce it "
                            "with .mean()")
        return value.reshape(())

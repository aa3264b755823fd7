"""``hypernetize``: turn an existing model into a best-response network in one call.

The wrapper :class:`HyperNet` owns the hyperparameters (as unconstrained parameters) and their
perturbation scales, so the trained model that ``fit`` returns is self-contained: ``net(x)``
evaluates at the tuned hyperparameters and ``net.state_dict()`` carries them.
"""

from __future__ import annotations

import collections
import copy
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.utils import _pytree as pytree

from ..batches import Kwargs, batch_size
from ..errors import ConfigError
from ..space import ENCODINGS, Encoding, Space
from .layers import (
    FORMS,
    BestResponseConv1d,
    BestResponseConv2d,
    BestResponseEmbedding,
    BestResponseGRU,
    BestResponseLinear,
    BestResponseLSTM,
    BestResponseModule,
    BestResponseMultiheadAttention,
    BestResponseRecurrent,
    Form,
)
from .state import HyperModule, HyperState


def _inverse_softplus(x: float) -> float:
    return float(torch.log(torch.expm1(torch.tensor(x, dtype=torch.float64))))


class HyperNet(nn.Module):
    """A model whose layers respond to hyperparameters, plus those hyperparameters.

    Build it with :func:`hypernetize`. Call it as ``net(x)`` to evaluate at the current
    hyperparameters, or ``net(x, u)`` with ``(B, H)`` unconstrained per-example hyperparameters.

    Attributes:
        model: the wrapped user model (its layers replaced in place).
        space: the hyperparameter space.
        form: ``"stn"`` or ``"delta"``.
        hparams: ``(H,)`` unconstrained hyperparameters (``lambda``).
        scale_raw: ``(H,)`` perturbation scales before softplus (``sigma = softplus(scale_raw)``).
        encoding: what the gates see of the hyperparameters (:data:`selftune.space.ENCODINGS`).
        batch_dim: the dimension of the model's inputs and activations that holds the examples (0,
            PyTorch's batch-first default; 1 for sequence-first models), see :func:`hypernetize`.
    """

    def __init__(self, model: nn.Module, space: Space, form: Form = "delta", init_scale: float = 0.5,
                 encoding: Encoding = "logit", batch_dim: int = 0) -> None:
        super().__init__()
        if batch_dim not in (0, 1):
            raise ValueError(f"batch_dim must be 0 (batch first) or 1 (sequence first) (got {batch_dim!r})")
        self.batch_dim = batch_dim
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS} (got {form!r})")
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS} (got {encoding!r})")
        self.encoding: Encoding = encoding
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0 (got {init_scale})")
        #: the perturbation scale it started at (a SelfTuner checks that its settings agree)
        self.init_scale = float(init_scale)
        self.model = model
        self.space = space
        self.form = form
        # float64 for a float64 model (its layers multiply these into their weights); a half-precision model
        # keeps float32 values, which autocast or its layers cast, so an init of 0.3 stays 0.3
        half = next((p.dtype for p in model.parameters() if p.dtype in (torch.float16, torch.bfloat16)), None)
        if half is not None:  # the hyperparameters, gates and perturbations stay float32: layers would mix dtypes
            raise ConfigError("model", f"its weights are {str(half).removeprefix('torch.')}; keep them float32 and "
                                       "train in half precision under torch.autocast instead")
        double = any(p.dtype == torch.float64 for p in model.parameters())
        dtype = torch.float64 if double else torch.get_default_dtype()
        self.hparams = nn.Parameter(space.init_unconstrained().to(dtype))
        self.scale_raw = nn.Parameter(torch.full((len(space),), _inverse_softplus(init_scale), dtype=dtype))
        self._state = HyperState(space, batch_dim=batch_dim)
        #: what :func:`hypernetize` did: converted layers by name, and layers with weights left plain (why)
        self.converted: dict[str, str] = {}
        self.left_plain: dict[str, str] = {}
        #: the model's own dropouts, which train at their fixed rates (:func:`own_dropouts`)
        self.untuned: dict[str, str] = {}
        #: one of the model's modules that read this net's state (a later hypernetize of the same model takes
        #: them over: this net then says so, instead of failing inside the model)
        bound: HyperModule | None = None
        for qualname, module in model.named_modules():
            if isinstance(module, HyperModule):
                _check_name(qualname, module, space)
                module.bind_state(self._state)
                bound = bound or module
        object.__setattr__(self, "_bound", bound)  # (a plain attribute: not a second registration of the module)

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: Any, u: torch.Tensor | None = None, *, respond: bool = True,
                generator: torch.Generator | None = None) -> Any:
        """Run the model at per-example hyperparameters.

        Args:
            x: a batch: a tensor whose first dimension is the batch size ``B``, any nesting of such
                tensors (passed as the model's one argument), or :class:`~selftune.batches.Kwargs`
                (passed as keyword arguments).
            u: ``(B, H)`` unconstrained hyperparameters; ``None`` means the current ``hparams``.
            respond: ``False`` switches the response path off (plain training at fixed values).
            generator: random source for dropout masks.
        """
        batch = batch_size(x, self.batch_dim)
        centre = self.hparams.unsqueeze(0).expand(batch, -1)
        at_centre = u is None
        if u is None:
            u = centre
        values = self.space.discretize(self.space.to_constrained(u))
        cond: torch.Tensor | None = None
        if respond:
            if self.form == "stn":
                cond = self.encode(u)
            elif not at_centre:
                # Delta-STN is centred: at the current hyperparameters the response is exactly 0,
                # so the response path is skipped there and such a step costs a plain step.
                cond = self.encode(u) - self.encode(centre.detach())
        bound = getattr(self, "_bound", None)  # (absent in a net pickled before stop 35)
        if bound is not None and bound._hyper_state is not self._state:
            raise RuntimeError("this HyperNet's model was given to hypernetize again (a notebook cell run twice?): "
                               "its layers now answer to the newer HyperNet; use that one, or hypernetize a fresh "
                               "model")
        with self._state.bind(values, cond, generator):
            return self._call(x)

    def _call(self, x: Any) -> Any:
        # PyTorch's fused Transformer/attention fast path (eval mode, no grad) reads linear1.weight and
        # friends directly and would skip the response of a converted layer: it is off inside the net.
        fast = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            return self.model(**x) if isinstance(x, Kwargs) else self.model(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)

    def find_shared_layers(self, few: Any, more: Any) -> list[str]:
        """Mark the converted layers whose output does not grow with the batch, and return their names.

        ``few`` and ``more`` are batches of the same examples, the second larger (``SelfTuner``: examples 0
        and 1, then 0, 1, 1, 0, 1). A layer whose input is
        shared by every example, as a learned positional embedding called on ``torch.arange(T)``, has no
        batch dimension in its output, so no per-example response can be applied to it: the batch axis was
        guessed from sizes, which failed the run at the first response step, or, where ``T`` equalled the
        batch, silently gave position ``t`` example ``t``'s perturbation. A layer is marked when every call
        of it gave the same non-empty output, shape and values, in both passes (a model that pads its batch
        to a multiple of 8 gives both the same shape, but other rows). A marked layer responds to the
        batch's mean perturbation (:func:`~selftune.nn.layers._batch_view`). Runs in eval mode without
        gradients and restores the global RNG; a model that fails on such batches is left as it is (the
        checks of the data say why elsewhere)."""
        layers = {name: m for name, m in self.model.named_modules() if isinstance(m, BestResponseModule)}
        for name, m in layers.items():  # unmarked until the probe says otherwise (a failed probe marks none)
            m.unbatched, m.qualified_name = False, name
        calls: dict[str, list[Any]] = {name: [] for name in layers}

        def tensors(out: Any) -> list[torch.Tensor]:
            if isinstance(out, torch.Tensor):
                return [out.detach().clone()]
            if isinstance(out, tuple | list):
                return [t for o in out for t in tensors(o)]
            return []

        hooks = [m.register_forward_hook(lambda _m, _i, out, n=name: calls[n].append(tensors(out)))
                 for name, m in layers.items()]
        was_training = self.training
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                self.eval()
                self(few, respond=False)
                first = {name: list(c) for name, c in calls.items()}
                for c in calls.values():
                    c.clear()
                self(more, respond=False)
        except Exception:  # a probe: the model's own checks report what fails
            return []
        finally:
            self.train(was_training)
            for h in hooks:
                h.remove()
        def same(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> bool:
            pairs = [(x, y) for ca, cb in zip(a, b, strict=True) for x, y in zip(ca, cb, strict=True)] \
                if len(a) == len(b) and all(len(ca) == len(cb) for ca, cb in zip(a, b, strict=True)) else []
            return bool(pairs) and all(x.shape == y.shape and x.numel() > 0 and torch.allclose(x, y)
                                       for x, y in pairs)

        def grown(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> int | None:
            """The one dimension of a layer's first output that went from the few examples to the more."""
            if not (a and b and a[0] and b[0]) or a[0][0].dim() != b[0][0].dim():
                return None
            changed = [d for d, (x, y) in enumerate(zip(a[0][0].shape, b[0][0].shape, strict=True)) if x != y]
            return changed[0] if len(changed) == 1 else None

        shared = [name for name in layers if same(first[name], calls[name])]
        for name, m in layers.items():
            m.unbatched = name in shared
            # where the examples lie in its output, seen as the dimension that grew with them: a sequence-first
            # Transformer inside a batch-first model gives (T, B, H), which sizes alone cannot tell from a
            # batch-first (B, T, H) when T equals the batch (each example took another's perturbation)
            m.batch_axis_hint = grown(first[name], calls[name])
        return shared

    def forward_linearized(self, x: torch.Tensor, u: torch.Tensor, *,
                           generator: torch.Generator | None = None) -> torch.Tensor:
        """Delta-STN's first-order response ``f(x; lam) + J (enc(u) - enc(lam))``.

        The Jacobian-vector product comes from forward-mode autodiff (one dual forward pass), and
        it stays differentiable, so the response weights train through it. Dropout and other
        regularisers run at ``u``, as in the exact forward.

        The model may return a tensor or a tuple, list or dict of them (each linearized); PyTorch cannot
        reach the tensors of another object (a dataclass), which :func:`linearizable` tells before a run.

        Raises:
            ValueError: for an STN-form net (its response is not centred).
        """
        if self.form != "delta":
            raise ValueError("linearisation needs a net built with form='delta'")
        import torch.autograd.forward_ad as fwad

        values = self.space.discretize(self.space.to_constrained(u))
        delta = self.encode(u) - self.encode(self.hparams.detach().unsqueeze(0))
        with fwad.dual_level():
            cond = fwad.make_dual(torch.zeros_like(delta), delta)
            with self._state.bind(values, cond, generator):
                out = self._call(x)

            def first_order(value: Any) -> Any:
                if not isinstance(value, torch.Tensor):
                    return value
                primal, tangent = fwad.unpack_dual(value)
                return primal if tangent is None else primal + tangent

            # a model's outputs may be a tuple, list or dict of tensors (logits and an auxiliary output)
            return pytree.tree_map(first_order, out)

    @contextmanager
    def relaxed(self, temperature: float) -> Iterator[None]:
        """Inside the block, dropout masks are concrete relaxations at ``temperature`` (see
        :func:`~selftune.nn.dropout.dropout`), so a loss is differentiable in the dropout rates."""
        state = self._state
        state.relax = float(temperature)
        try:
            yield
        finally:
            state.relax = None

    @contextmanager
    def recording_norms(self, groups: Sequence[Sequence[nn.Parameter]] | None = None
                        ) -> Iterator[Callable[[], torch.Tensor]]:
        """Record, for the forward passes inside the block, the per-example squared norm of the weights
        that weight decay penalises; yields a function returning that norm for the last pass: ``(B,)``
        over every weight matrix and kernel, or ``(G, B)`` per group of ``groups`` (one list of weights
        per decay, :meth:`~selftune.objective.Objective.weight_groups`; weights in no group are left out).

        Best-response layers report the norm of their *effective* weights at each example's
        hyperparameters (general plus response path), so weight decay acts on what the layer applies
        and a decay rate reaches the validation loss through the response. Every other weight matrix
        or kernel (biases and other vectors excluded) adds its plain squared norm.
        """
        single = groups is None
        groups = [[p for p in self.general_parameters() if p.dim() > 1]] if groups is None else groups
        group_of = {id(p): g for g, params in enumerate(groups) for p in params}
        state = self._state
        state.norms = {}
        recorded = state.norms

        def norms() -> torch.Tensor:
            covered = {id(p) for params, _ in recorded.values() for p in params}
            zero = torch.zeros((), device=self.hparams.device)
            rows = []
            for g, params in enumerate(groups):
                plain = sum(((p * p).sum() for p in params if id(p) not in covered), zero)
                # a layer's weights all answer to the decay of its name, so its first weight's group is its own
                per_example = [n for ps, n in recorded.values() if ps and group_of.get(id(ps[0])) == g]
                rows.append(plain + (torch.stack(per_example).sum(0) if per_example else plain.new_zeros(1)))
            if single:
                return rows[0]
            return torch.stack(torch.broadcast_tensors(*rows)) if rows else zero.new_zeros(0, 1)

        try:
            yield norms
        finally:
            state.norms = None

    def summary(self) -> str:
        """One line: which layers respond to the hyperparameters and which were left plain, and why."""
        kinds: dict[str, int] = {}
        for kind in self.converted.values():
            kinds[kind] = kinds.get(kind, 0) + 1
        text = "converted " + (", ".join(f"{n} {k}" for k, n in kinds.items()) or "no layer")
        if self.left_plain:
            text += "; left plain: " + "; ".join(f"{name or 'the model'} ({why})"  # its own nn.Parameter
                                                 for name, why in self.left_plain.items())
        if self.untuned:
            shown = ", ".join(f"{name} ({what})" for name, what in list(self.untuned.items())[:4])
            more = f" and {len(self.untuned) - 4} more" if len(self.untuned) > 4 else ""
            text += (f"; kept at their own rates (untuned): {shown}{more}; a selftune Dropout in a dropout's place "
                     "tunes it")
        return text

    # -- hyperparameters ------------------------------------------------------------------------
    def encode(self, u: torch.Tensor) -> torch.Tensor:
        """What the gates see of unconstrained hyperparameters ``u`` (this net's encoding)."""
        return self.space.encode(u, self.encoding)

    @property
    def scale(self) -> torch.Tensor:
        """``(H,)`` perturbation standard deviations in unconstrained space."""
        return F.softplus(self.scale_raw)

    def perturb(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample ``(B, H)`` hyperparameters ``lambda + sigma * eps``, one draw per example."""
        eps = torch.randn(batch_size, len(self.space), generator=generator, device=self.hparams.device)
        return self.hparams + self.scale * eps

    def entropy(self) -> torch.Tensor:
        """Entropy of the perturbation distribution, ``sum(log(sigma * sqrt(2 pi e)))``."""
        return torch.log(self.scale * (2 * torch.pi * torch.e) ** 0.5).sum()

    @property
    def hyperparameters_read(self) -> set[str]:
        """Names some module of the model has read in a forward pass so far (dropout rates, ...)."""
        return set(self._state.read)

    def values(self) -> dict[str, float | int]:
        """Current hyperparameters as readable constrained values."""
        return self.space.values_dict(self.hparams)

    def set_values(self, values: dict[str, float]) -> None:
        """Set the hyperparameters ``values`` names, from constrained values; the others keep theirs (as
        ``dict.update``: a partial dict reset the others to their init, a tuned decay among them)."""
        given = self.space.from_dict(values)
        keep = torch.tensor([name not in values for name in self.space.names], device=self.hparams.device)
        with torch.no_grad():
            self.hparams.copy_(torch.where(keep, self.hparams, given.to(self.hparams)))

    # -- parameter groups -----------------------------------------------------------------------
    def best_response_layers(self) -> list[BestResponseModule]:
        return [m for m in self.model.modules() if isinstance(m, BestResponseModule)]

    def response_parameters(self) -> list[nn.Parameter]:
        """Parameters of the response paths (``W_r``, ``b_r``, ``V``) of every best-response layer."""
        return [p for layer in self.best_response_layers() for p in layer.response_parameters()]

    def reset_response(self) -> None:
        """Restart the response paths of a Delta-STN net from a small, balanced state: gate maps to zero,
        each response weight shrunk to at most the norm of the plain weight it pairs with.

        Why: a response is the product of two trained factors (gates and response weights), and such a
        product can grow until a perturbed forward overflows while the net at its own hyperparameters is
        still fine (breast-cancer MLP, SGD 0.01: response weights 1e3 -> 1e8 in 30 steps near the end of
        a run). A roll-back to a state saved during that growth fails again at the same step. In the delta
        form the response adds nothing at the current hyperparameters, so a reset keeps the trained net and
        only forgets the local slope, which the next response steps relearn. The STN form's response is
        part of the net at every value, so it is left alone there.
        """
        if self.form != "delta":
            return
        with torch.no_grad():
            for layer in self.best_response_layers():
                for name, p in layer.named_parameters(recurse=False):
                    if name.startswith("gate"):
                        p.zero_()
                    elif name.startswith("response_"):
                        base = name[len("response_"):]
                        plain = getattr(layer, base, None)
                        if plain is None and base.startswith("bias"):  # recurrent: one response bias, two plain
                            plain = getattr(layer, base.replace("bias", "bias_ih", 1), None)
                        if isinstance(plain, torch.Tensor) and plain.shape == p.shape:
                            norm, cap = p.norm(), plain.norm()
                            if norm > cap:
                                p.mul_(cap / norm)

    def general_parameters(self) -> list[nn.Parameter]:
        """Every model weight that trains and is not a response parameter (the plain network); weights
        the user froze (``requires_grad=False``) are left out, so no optimizer or hypergradient sees them."""
        response = {id(p) for p in self.response_parameters()}
        return [p for p in self.model.parameters() if id(p) not in response and p.requires_grad]

    def weight_parameters(self) -> list[nn.Parameter]:
        """All model weights that train (general and response), excluding hyperparameters and scales."""
        return [p for p in self.model.parameters() if p.requires_grad]


CONVERTIBLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.LSTM, nn.GRU,
                                            nn.MultiheadAttention)


def _hooks(module: nn.Module) -> list[str]:
    """The kinds of hooks registered on ``module`` itself."""
    return [kind for kind in ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks",
                              "_state_dict_hooks", "_load_state_dict_pre_hooks") if getattr(module, kind, None)]


def _variant_plain_reason(module: nn.Module) -> str | None:
    """Why a layer of a convertible kind cannot become a best-response layer in the variant it is
    (``None``: it can): such a layer is left plain when every layer is converted, and refused by name when
    ``modules=`` names it."""
    if parametrize.is_parametrized(module):
        kinds = sorted({type(f).__name__.lstrip("_") for plist in module.parametrizations.values() for f in plist})
        return (f"it has a parametrization ({', '.join(kinds)}: torch.nn.utils.parametrizations or one you "
                "registered) that a best-response layer would drop")
    hooks = _hooks(module)
    if hooks:  # torch.nn.utils.spectral_norm / weight_norm are hooks: converted, their constraint was dropped
        return (f"it has hooks ({', '.join(h.strip('_') for h in hooks)}: torch.nn.utils.spectral_norm or weight_norm, "
                "or one you registered) that a best-response layer would drop; torch.nn.utils.parametrizations' "
                "forms are kept plain too")
    if isinstance(module, nn.MultiheadAttention):
        return _attention_plain_reason(module)
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.sparse):
        return "max_norm or sparse gradients have no best-response form"
    if isinstance(module, nn.Conv1d | nn.Conv2d) and module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r} has no best-response form (only 'zeros')"
    if isinstance(module, nn.LSTM) and module.proj_size:
        return "proj_size has no best-response form"
    return None


def _attention_plain_reason(module: nn.MultiheadAttention) -> str | None:
    """Why an attention cannot become a best-response layer (``None``: it can)."""
    if not module._qkv_same_embed_dim:
        return "kdim/vdim differ from embed_dim: separate projections have no best-response form"
    if module.bias_k is not None or module.add_zero_attn:
        return "add_bias_kv/add_zero_attn have no best-response form"
    return None


def _convert_recurrent(module: nn.LSTM | nn.GRU, encoding_size: int, form: Form) -> BestResponseRecurrent:
    kind = type(module).__name__
    if getattr(module, "proj_size", 0):
        raise TypeError(f"{kind} with proj_size cannot become a best-response layer; use proj_size=0")
    cls = BestResponseLSTM if isinstance(module, nn.LSTM) else BestResponseGRU
    new = cls(module.input_size, module.hidden_size, encoding_size, num_layers=module.num_layers, bias=module.bias,
              batch_first=module.batch_first, bidirectional=module.bidirectional, dropout=module.dropout, form=form)
    new.load_state_dict(module.state_dict(), strict=False)  # general weights share PyTorch's names
    first = next(module.parameters())
    return new.to(device=first.device, dtype=first.dtype)


def _convert_attention(module: nn.MultiheadAttention, encoding_size: int, form: Form) -> nn.Module:
    why = _attention_plain_reason(module)
    if why is not None:
        raise TypeError(f"MultiheadAttention cannot become a best-response layer: {why}")
    new = BestResponseMultiheadAttention(module.embed_dim, module.num_heads, encoding_size, dropout=module.dropout,
                                         bias=module.in_proj_bias is not None, batch_first=module.batch_first,
                                         form=form)
    with torch.no_grad():
        new.in_proj.weight.copy_(module.in_proj_weight)
        new.out_proj.weight.copy_(module.out_proj.weight)
        if module.in_proj_bias is not None:
            new.in_proj.bias.copy_(module.in_proj_bias)
            new.out_proj.bias.copy_(module.out_proj.bias)
    return new.to(device=module.out_proj.weight.device, dtype=module.out_proj.weight.dtype)


#: A parameter's name in a plain attention and in its best-response form (which holds nn.Linear projections).
_RENAMED = {"in_proj_weight": "in_proj.weight", "in_proj_bias": "in_proj.bias"}


def keep_frozen(old: nn.Module, new: nn.Module) -> None:
    """Freeze in ``new`` every weight frozen in ``old`` (``requires_grad=False``), matched by name: a
    converted or exported layer is a fresh module whose parameters would otherwise all train, silently
    un-freezing a backbone the user froze. New parameters (a response path) keep training."""
    params = dict(new.named_parameters())
    inverse = {v: k for k, v in _RENAMED.items()}
    for name, p in old.named_parameters():
        if not p.requires_grad:
            target = next((params[n] for n in (name, _RENAMED.get(name), inverse.get(name)) if n in params), None)
            if target is not None:
                target.requires_grad_(False)


def _convert(module: nn.Module, encoding_size: int, form: Form) -> nn.Module:
    new = _converted(module, encoding_size, form)
    keep_frozen(module, new)
    return new


def _converted(module: nn.Module, encoding_size: int, form: Form) -> nn.Module:
    if _hooks(module) or parametrize.is_parametrized(module):
        kind = type(module).__name__.removeprefix("Parametrized")
        raise TypeError(f"{kind} cannot become a best-response layer: {_variant_plain_reason(module)}")
    if isinstance(module, nn.LSTM | nn.GRU):
        return _convert_recurrent(module, encoding_size, form)
    if isinstance(module, nn.MultiheadAttention):
        return _convert_attention(module, encoding_size, form)
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None or module.sparse:
            raise TypeError("Embedding with max_norm or sparse gradients cannot become a best-response layer")
        new: BestResponseModule = BestResponseEmbedding(module.num_embeddings, module.embedding_dim, encoding_size,
                                                        padding_idx=module.padding_idx,
                                                        scale_grad_by_freq=module.scale_grad_by_freq, form=form)
    elif isinstance(module, nn.Linear):
        new = BestResponseLinear(module.in_features, module.out_features, encoding_size,
                                 bias=module.bias is not None, form=form)
    elif isinstance(module, nn.Conv1d | nn.Conv2d):
        if module.padding_mode != "zeros":
            raise TypeError(f"{type(module).__name__} with padding_mode={module.padding_mode!r} is not supported; "
                            "use 'zeros'")
        cls = BestResponseConv1d if isinstance(module, nn.Conv1d) else BestResponseConv2d
        new = cls(module.in_channels, module.out_channels, module.kernel_size, encoding_size,
                  stride=module.stride, padding=module.padding, dilation=module.dilation,
                  groups=module.groups, bias=module.bias is not None, form=form)
    else:
        raise TypeError(f"cannot make {type(module).__name__} a best-response layer "
                        "(Linear, Conv1d, Conv2d, Embedding, LSTM and GRU only)")
    weight, bias = module.weight, getattr(module, "bias", None)
    assert isinstance(weight, torch.Tensor)
    with torch.no_grad():
        new.weight.copy_(weight)
        if isinstance(bias, torch.Tensor) and new.bias is not None:
            new.bias.copy_(bias)
    return new.to(device=weight.device, dtype=weight.dtype)


def hypernetize(model: nn.Module, space: Space, *, form: Form = "delta",
                modules: Iterable[str] | None = None, init_scale: float = 0.5,
                encoding: Encoding = "logit", batch_dim: int = 0) -> HyperNet:
    """Make ``model`` a best-response network for ``space``.

    Every ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Embedding``, ``nn.LSTM``, ``nn.GRU`` (any
    number of layers, either direction) and ``nn.MultiheadAttention`` (the attention of Transformer
    layers; exact classes, not subclasses), or only those named in
    ``modules``, is replaced in place by its best-response counterpart with the same weights; every
    selftune regulariser in the model (:class:`~selftune.nn.Dropout`, ...) is attached to the returned
    wrapper. ``net.summary()`` says what was converted and what was left plain (normalisation layers,
    attentions with unequal key/value sizes, other modules with weights), and why.

    Args:
        model: any ``nn.Module``; its ``forward`` keeps working unchanged.
        space: the hyperparameters the layers respond to.
        form: ``"delta"`` (Delta-STN, centred, recommended) or ``"stn"``.
        modules: qualified names (as in ``model.named_modules()``) of the layers to convert;
            ``None`` converts every layer of the kinds above.
        init_scale: initial perturbation scale ``sigma`` (unconstrained space).
        encoding: what the gates see of the hyperparameters: ``"logit"`` (the unconstrained value,
            as the official code; default) or ``"mip"`` (a bounded cos/sin map whose slope vanishes
            near a bound); see :mod:`selftune.space`.
        batch_dim: where the examples are in the model's inputs, targets and activations: 0 (batch
            first, PyTorch's default) or 1 for sequence-first models that take ``(T, B, ...)`` tensors
            (``nn.LSTM(batch_first=False)``, ``nn.Transformer*`` without ``batch_first``). With 1, a
            tensor of 3 or more dimensions holds the batch in dimension 1, and so does a 2-D one whose
            dimension 0 does not match the batch (``(T, B)`` token ids); ``(B, H)`` features after
            pooling and ``(B,)`` labels keep it first (:func:`selftune.batches.batch_axis`).

    Returns:
        The :class:`HyperNet` wrapping ``model``.

    Raises:
        LookupError: a name in ``modules`` that the model does not have.
        TypeError: a named module that cannot respond (not one of the kinds above, an LSTM with a
            projection, a layer with hooks or a parametrization).
    """
    if isinstance(model, HyperNet):
        raise TypeError("model is already a HyperNet (from selftune.hypernetize); use it as it is, or pass its "
                        ".model to hypernetize it for another space (a [task] returns the plain model, which "
                        "selftune converts)")
    named = dict(model.named_modules())
    # Layers an earlier call converted (a notebook cell run twice on one model): kept as they are when they
    # respond to this space's encoding in this form, and reported as converted (they read as "no
    # best-response form" before); otherwise their gates cannot take this space, which is said now.
    earlier = {n: m for n, m in named.items() if isinstance(m, BestResponseModule)
               and not any(n.startswith(f"{o}.") for o in named if o and isinstance(named[o], BestResponseModule))}
    width = space.encoding_width(encoding) if encoding in ENCODINGS else None
    for name, module in named.items():  # nested ones too: an attention's projections hold its gates
        if not isinstance(module, BestResponseModule):
            continue
        if getattr(module, "form", form) != form or getattr(module, "encoding_size", width) != width:
            raise TypeError(f"model.{name} is already a best-response layer (form={getattr(module, 'form', '?')!r}, "
                            f"{getattr(module, 'encoding_size', '?')} encoding inputs) from an earlier hypernetize of "
                            f"this model, which cannot respond to this space (form={form!r}, {width}); build the "
                            "model afresh before hypernetize")
    if modules is None:
        targets = [n for n, m in named.items() if type(m) in CONVERTIBLE and not _frozen(m, form)
                   and _variant_plain_reason(m) is None]
    else:
        targets = list(modules)
        for name in targets:
            if name not in named:
                raise LookupError(f"model has no module named {name!r}")
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS} (got {encoding!r})")
    converted: dict[str, str] = {}
    ties = tied_parameters(model)
    for name in targets:
        if not name:
            raise TypeError("the model itself cannot be replaced; pass a model that contains layers")
        _check_called(named, name)
        aliases = registrations(model, named[name])  # one module registered under several names (shared blocks)
        converted[name] = type(named[name]).__name__ + (
            f" (also registered as {', '.join(a for a in aliases if a != name)})" if len(aliases) > 1 else "")
        try:
            new = _convert(named[name], space.encoding_width(encoding), form)
        except TypeError as err:  # a layer with no best-response form: say which, and how to keep it plain
            fix = "; leave it out of modules= to keep it plain" if modules is not None else ""
            raise TypeError(f"model.{name}: {err}{fix}") from None
        replace_everywhere(model, aliases, new)
    retie(model, ties)
    net = HyperNet(model, space, form=form, init_scale=init_scale, encoding=encoding, batch_dim=batch_dim)
    net.converted = {**{n: f"{type(m).__name__} (an earlier hypernetize's)" for n, m in earlier.items()},
                     **converted}
    net.left_plain = _left_plain(named, set(targets) | set(earlier), form)
    net.untuned = own_dropouts(model)
    return net


def own_dropouts(model: nn.Module) -> dict[str, str]:
    """The model's own dropouts, which train at their fixed rates (PyTorch's ``nn.Dropout`` family, a
    recurrent module's dropout between its layers, an attention's): a user who replaced some of them by
    selftune's :class:`~selftune.nn.Dropout` learns of the ones left. A functional ``F.dropout`` in a
    ``forward`` cannot be seen."""
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            found[name] = f"{type(module).__name__} p={module.p:g}"
        elif isinstance(module, nn.LSTM | nn.GRU | BestResponseRecurrent) and module.dropout and module.num_layers > 1:
            found[name] = f"dropout={module.dropout:g} between layers"
        elif isinstance(module, nn.MultiheadAttention | BestResponseMultiheadAttention) and module.dropout:
            found[name] = f"attention dropout={module.dropout:g}"
    return found


def _check_name(qualname: str, module: nn.Module, space: Space) -> None:
    """A regulariser's hyperparameter must be declared: a misspelt name passed every check before training
    (an eval-mode pass never reads a dropout rate) and failed at the first training step, deep inside."""
    name = getattr(module, "name", None)
    if isinstance(name, str) and name not in space.names:
        raise ConfigError(f"model.{qualname}" if qualname else "model",
                          f"{type(module).__name__}({name!r}) reads a hyperparameter the space does not declare "
                          f"(it has {space.names}); fix the name or declare it in the space")


def _frozen(module: nn.Module, form: Form = "delta") -> bool:
    """Whether ``module`` must stay plain because the user froze it: every weight frozen (a layer that does
    not train needs no response), or, in the STN form, any weight (an STN layer's response is part of its
    output at every value, so it would change the function of a weight the user froze; a Delta-STN layer
    computes its plain weights at its own values, so a partly frozen one keeps them)."""
    flags = [p.requires_grad for p in module.parameters()]
    return bool(flags) and (not any(flags) or (form == "stn" and not all(flags)))


def registrations(model: nn.Module, module: nn.Module) -> list[str]:
    """Every qualified name under which ``module`` is registered in ``model``: a block shared by several
    positions (``nn.ModuleList([block] * 3)``, ALBERT's layers) is one module under several names."""
    return [n for n, m in model.named_modules(remove_duplicate=False) if m is module]


def replace_everywhere(model: nn.Module, names: Iterable[str], new: nn.Module) -> None:
    """Put ``new`` at each of ``names`` (the registrations of one module), so a shared block stays one
    module, converted (or folded) at every position it is applied at."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _check_called(named: dict[str, nn.Module], name: str) -> None:
    """Refuse to convert a layer its parent does not call: ``nn.MultiheadAttention`` reads its ``out_proj``'s
    weight directly (``F.multi_head_attention_forward``), so a response there would never take effect."""
    parent_name = name.rpartition(".")[0]
    parent = named.get(parent_name) if parent_name else None
    if type(parent) is nn.MultiheadAttention:
        raise TypeError(f"model.{name}: its MultiheadAttention reads its weight directly, never calling it, so a "
                        f"response there would never take effect; name the attention ({parent_name!r}) in modules= "
                        "instead")


def tied_parameters(model: nn.Module) -> list[list[tuple[str, str]]]:
    """Groups of ``(module name, parameter name)`` that hold one and the same parameter: tied weights, as a
    language model's decoder sharing its embedding's matrix (``dec.weight = emb.weight``)."""
    owners: dict[int, dict[int, tuple[str, str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, param in module.named_parameters(recurse=False):
            # one entry per module: a module registered under several names (a shared block) is one owner
            owners.setdefault(id(param), {}).setdefault(id(module), (module_name, name))
    return [list(group.values()) for group in owners.values() if len(group) > 1]


def retie(model: nn.Module, ties: list[list[tuple[str, str]]], *, only_equal: bool = False) -> None:
    """Make each group of :func:`tied_parameters` one parameter again, the first's, after layers were replaced
    by copies (converting a layer copies its weights, which would silently untie them: two matrices that
    train apart). ``only_equal``: leave a group untied where its weights now differ (an exported STN layer
    folds its own response into its copy)."""
    for (first_module, first_name), *rest in ties:
        param = getattr(model.get_submodule(first_module), first_name)
        for module_name, name in rest:
            module = model.get_submodule(module_name)
            other = getattr(module, name)
            if other is param:
                continue
            if other.shape != param.shape:
                raise TypeError(f"{first_module}.{first_name} and {module_name}.{name} are tied, but their layers "
                                f"no longer hold weights of one shape ({tuple(param.shape)}, {tuple(other.shape)})")
            if only_equal and not torch.equal(other, param):
                continue
            setattr(module, name, param)


#: Why a kind of layer with weights stays plain (the summary says it to the user).
_PLAIN_REASONS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.modules.batchnorm._NormBase, "normalisation layers stay plain"),
    (nn.LayerNorm, "normalisation layers stay plain"),
    (nn.GroupNorm, "normalisation layers stay plain"),
)


def _left_plain(named: dict[str, nn.Module], converted: set[str], form: Form = "delta") -> dict[str, str]:
    """Modules that hold weights of their own and were not converted, with the reason."""
    plain: dict[str, str] = {}
    inside = tuple(f"{n}." for n, m in named.items()
                   if isinstance(m, nn.MultiheadAttention) or (n in converted and isinstance(m, BestResponseModule)))
    # a parametrized layer's weights live in its parametrizations: reported with the layer
    inside += tuple(f"{n}.parametrizations." for n, m in named.items() if parametrize.is_parametrized(m))
    for name, module in named.items():
        if name in converted or not (any(True for _ in module.parameters(recurse=False))
                                     or parametrize.is_parametrized(module)):  # (its weight in its parametrization)
            continue
        if name.startswith(inside):
            continue  # an attention's out_proj: reported with the attention
        reason = next((why for kind, why in _PLAIN_REASONS if isinstance(module, kind)), None)
        if type(module) in CONVERTIBLE or (isinstance(module, CONVERTIBLE) and parametrize.is_parametrized(module)):
            reason = _variant_plain_reason(module)
        if reason is None and type(module) in CONVERTIBLE and _frozen(module, form):
            reason = ("frozen (requires_grad=False): it does not train, so it needs no response" if _frozen(module)
                      else "partly frozen (requires_grad=False): an STN response would change its frozen weights")
        if reason is None and type(module) in CONVERTIBLE:
            reason = "not in modules="
        if reason is None:
            # a container's own nn.Parameter (a learned positional table): the layers inside it are converted
            own = [n for n, _ in module.named_parameters(recurse=False)]
            reason = (f"{type(module).__name__}'s own parameter{'s' if len(own) > 1 else ''} {', '.join(own)} "
                      f"{'stay' if len(own) > 1 else 'stays'} plain: only the layer kinds hypernetize converts respond")
        plain[name] = reason
    return plain


def linearizable(outputs: Any) -> bool:
    """Whether :meth:`HyperNet.forward_linearized` reaches every tensor of a model's ``outputs``: a tensor, or
    tuples, lists and dicts of them (PyTorch's pytrees); a dataclass or another object holding tensors
    would be returned without its first-order response."""
    return all(not _holds_tensors(leaf) or isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(outputs))


def _holds_tensors(value: Any) -> bool:
    return isinstance(value, torch.Tensor) or (hasattr(value, "__dict__") and any(
        isinstance(v, torch.Tensor) for v in vars(value).values()))


def copy_module(module: nn.Module) -> nn.Module:
    """A deep copy of ``module``. A model that keeps an activation of its last forward pass as an attribute
    (``self.features = h``, or inside a dict, list or object it holds) holds a tensor of the autograd graph,
    which ``copy.deepcopy`` refuses: such tensors are copied detached (they are caches, overwritten at the
    next forward pass)."""
    memo: dict[int, Any] = {}
    seen: set[int] = set()

    def walk(value: Any, depth: int) -> None:
        if id(value) in seen or depth > 8:
            return
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            if not value.is_leaf:
                memo[id(value)] = value.detach()
        elif isinstance(value, nn.Module | types.ModuleType):
            return  # a module's own tensors are walked as a module below; a Python module holds no cache
        elif isinstance(value, dict):
            for v in value.values():
                walk(v, depth + 1)
        elif isinstance(value, list | tuple | set | frozenset | collections.deque):
            for v in value:
                walk(v, depth + 1)
        elif hasattr(value, "__dict__") and not isinstance(value, type) and not callable(value):
            for v in vars(value).values():
                walk(v, depth + 1)

    for m in module.modules():
        for key, value in vars(m).items():
            if key not in ("_parameters", "_buffers", "_modules"):
                walk(value, 0)
    return copy.deepcopy(module, memo)

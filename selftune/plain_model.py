"""``export``: the user's own model back, plain, at the tuned hyperparameters.

A :class:`~selftune.nn.HyperNet` is the user's model with its layers swapped for best-response layers
and its regularisers reading a shared state. Deploying it, or loading its weights into the user's
own class, needs neither: at fixed hyperparameters every best-response layer computes a plain layer
(``s W + diag(g) W_r``, which is just ``W`` for Delta-STN at its own hyperparameters), and every
regulariser applies a constant rate. :func:`export` folds them, so the result is an ordinary
``nn.Module`` whose ``state_dict`` has exactly the keys of the model the user passed to
:func:`~selftune.hypernetize`.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .errors import SelftuneWarning
from .nn import HyperNet
from .nn.dropout import Dropout, EmbeddingDropout
from .nn.hypernet import copy_module, keep_frozen, registrations, replace_everywhere, retie, tied_parameters
from .nn.layers import BestResponseModule
from .nn.state import HyperModule

__all__ = ["export"]


def export(net: HyperNet) -> nn.Module:
    """A plain copy of the wrapped model at ``net``'s current (tuned) hyperparameters.

    Every best-response layer becomes the ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` /
    ``nn.Embedding`` / ``nn.LSTM`` / ``nn.GRU`` / ``nn.MultiheadAttention`` it computes at those values;
    every selftune dropout keeps its class (so the copy still loads into the user's own model) with the
    tuned rate fixed, so it trains and evaluates without a HyperNet. ``net`` itself is not changed. The copy's outputs
    equal ``net(x)`` in eval mode (a ``TransformerEncoder``'s nested-tensor fast path is switched off in the copy,
    as the tuned net runs: it returns 0 at padded positions, which the net computes).

    Raises:
        TypeError: ``net`` is not a HyperNet.
    """
    if not isinstance(net, HyperNet):
        raise TypeError(f"export takes the HyperNet from selftune.hypernetize (got {type(net).__name__})")
    # the plain layers it builds initialise their weights (overwritten) from PyTorch's global generator: a
    # caller's random stream must not depend on whether it exported (fuzz round 46)
    with torch.random.fork_rng(devices=[net.hparams.device] if net.hparams.device.type == "cuda" else []):
        return _export(net)


def _export(net: HyperNet) -> nn.Module:
    with torch.no_grad():
        u = net.hparams.detach()
        # Delta-STN is centred: at its own hyperparameters the response is exactly zero.
        cond = net.encode(u.unsqueeze(0))[0] if net.form == "stn" else None
        values = net.values()
    # deepcopy keeps tied weights tied; an activation the model keeps (a cache of its last pass) is copied detached
    model = copy_module(net.model)
    ties = tied_parameters(model)
    replaced: tuple[str, ...] = ()
    for name, module in list(model.named_modules()):
        if name.startswith(replaced):
            continue  # inside a layer already folded (an attention's projections)
        if isinstance(module, BestResponseModule):
            aliases = registrations(model, module)  # a shared block: one plain module at each of its positions
            replaced = (*replaced, *(f"{a}." for a in aliases))
            plain = module.plain(cond)
            keep_frozen(module, plain)
            plain.train(module.training)
            replace_everywhere(model, aliases, plain)
        elif isinstance(module, Dropout | EmbeddingDropout):
            module.fixed = float(values[module.name])
            module.batch_dim = net.batch_dim  # (a sequence-first model's masks stay per sequence)
        if isinstance(module, HyperModule):
            object.__setattr__(module, "_hyper_state", None)  # the copy answers to no HyperNet
        if isinstance(module, nn.TransformerEncoder):
            # PyTorch's fast path packs a padded batch into nested tensors in eval mode and returns 0 at the
            # padded positions; the tuned net runs without it (it would skip the responses), so with it a
            # model that pools over padding scored 0.639 where the tuned net validated at 0.626
            module.enable_nested_tensor = False
            if hasattr(module, "use_nested_tensor"):
                module.use_nested_tensor = False
    retie(model, ties, only_equal=True)
    untied = [group for group in ties
              if len({id(getattr(model.get_submodule(m), n)) for m, n in group}) > 1]
    if untied:
        names = " and ".join(f"{m}.{n}" for m, n in untied[0])
        warnings.warn(SelftuneWarning(
            f"export: {names} are tied in the model, but in the STN form each layer adds its own response at the "
            "tuned values, so the copy holds one matrix for each (its outputs equal the tuned net's); its state_dict "
            "does not load into your tied class without changing the model (one matrix would overwrite the other): "
            "load it into a copy whose weights are not tied, or tune with form='delta', whose export keeps the tie"),
            stacklevel=2)
    return model

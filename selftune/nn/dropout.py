"""Dropout whose rate is a hyperparameter, one rate per example.

Per-example rates are what STN's perturbation needs: every example of a training batch is trained
at its own sampled hyperparameters, which is how the best-response layers learn how the weights
should change with the rate.
"""

from __future__ import annotations

import torch

from .state import HyperModule


def dropout(x: torch.Tensor, p: torch.Tensor, *, training: bool = True, channelwise: bool = False,
            locked: bool = False, generator: torch.Generator | None = None,
            relax: float | None = None, batch_axis: int = 0) -> torch.Tensor:
    """Inverted dropout with a per-example rate.

    Args:
        x: ``(B, ...)`` activations.
        p: ``(B,)`` drop probabilities in ``[0, 1)``; not differentiated (STN tunes rates through the
            best-response path, not through the mask), unless ``relax`` is given.
        training: identity when ``False``.
        channelwise: drop whole channels (dimension 1) as ``nn.Dropout2d`` does, instead of
            single elements.
        locked: for ``(B, T, ...)`` sequences, one mask per example shared by every time step
            (variational dropout, Gal & Ghahramani 2016; AWD-LSTM's ``LockedDropout``).
        generator: random source, for reproducible masks.
        relax: a temperature: the mask is then the concrete relaxation of the Bernoulli draw (Gal et
            al. 2017's concrete dropout, ``1 - sigmoid((logit p + logit U) / relax)``), a smooth function
            of ``p``, so the loss has a gradient in the rate (implicit differentiation needs one).
        batch_axis: the dimension of ``x`` that holds the examples (1 for ``(T, B, ...)`` sequences);
            ``locked`` then shares the mask along dimension 0, the steps.

    Returns:
        ``x`` with dropped entries zeroed and kept ones scaled by ``1 / (1 - p)``.
    """
    if not training:
        return x
    if batch_axis != 0:  # sequence-first: the same dropout on a batch-first view
        first = x.movedim(batch_axis, 0)  # (B, T, ...): locked masks then share dimension 1, the steps
        out = dropout(first, p, training=training, channelwise=channelwise, locked=locked, generator=generator,
                      relax=relax)
        return out.movedim(0, batch_axis)
    if p.dim() != 1 or p.shape[0] != x.shape[0]:
        raise ValueError(f"p must have shape ({x.shape[0]},), got {tuple(p.shape)}")
    if channelwise and locked:
        raise ValueError("dropout is either channelwise or locked, not both")
    if relax is not None:
        keep = (1.0 - p).clamp_min(1e-6).to(x.dtype)
    else:
        keep = (1.0 - p.detach()).clamp_min(1e-6).to(x.dtype)
    if channelwise:
        mask_shape: tuple[int, ...] = (*x.shape[:2], *([1] * (x.dim() - 2)))
    elif locked:
        mask_shape = (x.shape[0], 1, *x.shape[2:])
    else:
        mask_shape = tuple(x.shape)
    keep = keep.view(-1, *([1] * (x.dim() - 1)))
    draw = torch.rand(mask_shape, generator=generator, device=x.device, dtype=x.dtype)
    if relax is not None:
        tiny = 1e-6
        drop = keep.new_tensor(1.0) - keep
        logits = (torch.log(drop + tiny) - torch.log(keep + tiny) + torch.log(draw + tiny)
                  - torch.log(1 - draw + tiny))
        return x * (1 - torch.sigmoid(logits / relax)) / keep
    mask = draw < keep
    return x * mask / keep


class Dropout(HyperModule):
    """Drop-in replacement for ``nn.Dropout`` (or ``nn.Dropout2d`` with ``channelwise=True``) whose
    rate is the hyperparameter ``name``, looked up on every forward pass.

    Put one on the input to get input dropout. Inactive in ``eval()`` mode, as ``nn.Dropout`` is.

    Args:
        name: the hyperparameter holding the rate (declare it with bounds inside ``[0, 1)``).
        channelwise: drop whole feature maps instead of elements.
        locked: on ``(B, T, ...)`` sequences, drop the same units at every time step.
    """

    #: with ``fixed``: 1 for a sequence-first model (``(T, B, ...)`` activations; set by export from the
    #: HyperNet's ``batch_dim``), so a locked mask is still one per sequence shared over its steps (a class
    #: default too: a module pickled before this attribute existed loads with it)
    batch_dim = 0

    def __init__(self, name: str, *, channelwise: bool = False, locked: bool = False) -> None:
        super().__init__()
        if channelwise and locked:
            raise ValueError("Dropout is either channelwise or locked, not both")
        self.name = name
        self.channelwise = channelwise
        self.locked = locked
        #: a constant rate (set by :func:`selftune.export`): the module then needs no HyperNet
        self.fixed: float | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if self.fixed is not None:
            axis = 1 if self.batch_dim == 1 and x.dim() >= 3 else 0  # ((B, H) features after pooling: first)
            return dropout(x, x.new_full((x.shape[axis],), self.fixed), channelwise=self.channelwise,
                           locked=self.locked, batch_axis=axis)
        state = self.hyper_state
        return dropout(x, state.value(self.name), channelwise=self.channelwise, locked=self.locked,
                       generator=state.generator, relax=state.relax, batch_axis=state.batch_axis(x))

    def extra_repr(self) -> str:
        fixed = "" if self.fixed is None else f", fixed={self.fixed:.4g}"
        return f"name={self.name!r}, channelwise={self.channelwise}, locked={self.locked}{fixed}"


class EmbeddingDropout(HyperModule):
    """Drops whole word types from the embedding, one draw per example (AWD-LSTM's embedding dropout,
    the STN paper's ``dropoute``): every occurrence of a dropped word in the example is zeroed, and kept
    words are scaled by ``1 / (1 - p)``.

    Call the module on ``(ids, embedded)``, ``ids`` ``(B, T)`` and ``embedded`` ``(B, T, D)``:
    ``self.drop_words(ids, self.embedding(ids))``.
    Inactive in ``eval()`` mode.

    Args:
        name: the hyperparameter holding the rate.
        num_embeddings: vocabulary size.
    """

    #: with ``fixed``: 1 for a sequence-first model, whose ids are ``(T, B)`` (set by export; a class default,
    #: as Dropout's)
    batch_dim = 0

    def __init__(self, name: str, num_embeddings: int) -> None:
        super().__init__()
        self.name = name
        self.num_embeddings = num_embeddings
        #: a constant rate (set by :func:`selftune.export`): the module then needs no HyperNet
        self.fixed: float | None = None

    def forward(self, ids: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return embedded
        sequence_first = (self.batch_dim == 1 and ids.dim() >= 2) if self.fixed is not None \
            else self.hyper_state.data_axis(ids) != 0
        if sequence_first:  # (T, B) ids: one draw of word types per sequence, as batch-first
            return self._drop_words(ids.t(), embedded.transpose(0, 1)).transpose(0, 1)
        return self._drop_words(ids, embedded)

    def _drop_words(self, ids: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """Batch-first ``ids`` ``(B, T)`` and ``embedded`` ``(B, T, D)`` with each example's dropped words zeroed."""
        relax = None
        if self.fixed is not None:
            rate, generator = embedded.new_full((ids.shape[0],), self.fixed), None
        else:
            state = self.hyper_state
            relax = state.relax
            rate, generator = state.value(self.name), state.generator
            rate = rate if relax is not None else rate.detach()
        keep = (1.0 - rate).clamp_min(1e-6).to(embedded.dtype)  # (B,)
        draws = torch.rand(ids.shape[0], self.num_embeddings, generator=generator, device=ids.device)
        if relax is None:
            kept = (draws < keep[:, None]).to(embedded.dtype) / keep[:, None]  # (B, V): one decision per word type
        else:  # the concrete relaxation of that draw (as dropout's): implicit hypergradients reach the rate
            tiny = 1e-6
            draws = draws.to(embedded.dtype)
            logits = (torch.log(1 - keep + tiny) - torch.log(keep + tiny))[:, None] + torch.log(draws + tiny) \
                - torch.log(1 - draws + tiny)
            kept = (1 - torch.sigmoid(logits / relax)) / keep[:, None]
        return embedded * kept.gather(1, ids.flatten(1)).view(*ids.shape, *([1] * (embedded.dim() - ids.dim())))

    def extra_repr(self) -> str:
        fixed = "" if self.fixed is None else f", fixed={self.fixed:.4g}"
        return f"name={self.name!r}, num_embeddings={self.num_embeddings}{fixed}"

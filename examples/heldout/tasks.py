"""Three tasks built the way a new user would build theirs, to try selftune outside its own suite.

They were written for stop 22 and run through the public API and CLI only (``selftune bench
examples/heldout/wine.toml ...``); none of selftune's defaults was tuned on them. Results:
docs/benchmarks/README.md, "Three held-out tasks". Each function returns a :class:`selftune.Task`: a wide
MLP with an input and two hidden dropouts and a weight decay, on few training rows, so that it over-fits
without regularisation.

* ``wine``: scikit-learn's wine table (178 rows, 13 features, 3 classes), 60 training and 40 validation rows.
* ``noisy``: a generated 4-class problem (40 features, 8 informative, 5% flipped labels), 250 training rows.
* ``friedman``: Friedman's regression problem #1 (10 features, noise 1.0), 120 training rows, squared error.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import selftune as st


def _split(x, y, n_train, n_val, seed):
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    tr, va, te = order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]
    mean, std = x[tr].mean(0), x[tr].std(0).clamp_min(1e-6)
    x = (x - mean) / std
    return (x[tr], y[tr]), (x[va], y[va]), (x[te], y[te])


def _mlp(d_in, d_out, hidden):
    return nn.Sequential(st.Dropout("dropout_in"), nn.Linear(d_in, hidden), nn.ReLU(),
                         st.Dropout("dropout1"), nn.Linear(hidden, hidden), nn.ReLU(),
                         st.Dropout("dropout2"), nn.Linear(hidden, d_out))


def _space():
    return st.Space([st.Float("dropout_in", 0.0, 0.9, 0.1), st.Float("dropout1", 0.0, 0.9, 0.3),
                     st.Float("dropout2", 0.0, 0.9, 0.3),
                     st.Float("weight_decay", 1e-6, 1e-1, 1e-4, log=True)])


def acc(out, y):
    """Accuracy of class scores against integer labels."""
    return (out.argmax(-1) == y).float().mean()


def wine(hidden: int = 256, split_seed: int = 0) -> st.Task:
    """Few rows of a small, easy table: over-fits quickly, cross-entropy near zero."""
    from sklearn.datasets import load_wine
    x, y = load_wine(return_X_y=True)
    tr, va, te = _split(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y), 60, 40, split_seed)
    return st.Task(model=_mlp(13, 3, hidden), space=_space(), loss=F.cross_entropy, metrics={"accuracy": acc},
                   train=tr, val=va, test=te)


def noisy(hidden: int = 512, split_seed: int = 0) -> st.Task:
    """Label noise and uninformative features: memorising them is what regularisation must prevent."""
    from sklearn.datasets import make_classification
    x, y = make_classification(n_samples=1000, n_features=40, n_informative=8, n_redundant=4, n_classes=4,
                               flip_y=0.05, class_sep=1.0, random_state=3)
    tr, va, te = _split(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y), 250, 150, split_seed)
    return st.Task(model=_mlp(40, 4, hidden), space=_space(), loss=F.cross_entropy, metrics={"accuracy": acc},
                   train=tr, val=va, test=te)


def friedman(hidden: int = 256, split_seed: int = 0) -> st.Task:
    """A regression with a smooth target: dropout noise hurts it, so little regularisation is right."""
    from sklearn.datasets import make_friedman1
    x, y = make_friedman1(n_samples=800, n_features=10, noise=1.0, random_state=5)
    y = (y - y.mean()) / y.std()
    tr, va, te = _split(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32),
                        120, 80, split_seed)

    def mse(o, t):
        return F.mse_loss(o.squeeze(-1), t)
    return st.Task(model=_mlp(10, 1, hidden), space=_space(), loss=mse, train=tr, val=va, test=te)

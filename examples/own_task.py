"""Your own task for selftune: a regression MLP on scikit-learn's diabetes table (442 patients, 10 features).

Nothing here is built into selftune: the model, the split, the loss (mean squared error) and the metric
(mean absolute error) are ordinary PyTorch. ``examples/own_task.toml`` names this file's ``diabetes``
function as its ``[task]``, so every command works on it:

    selftune run examples/own_task.toml --compare fixed
    selftune bench examples/own_task.toml --methods fixed delta-stn random tpe pbt --trials 20 --seeds 3

The function is called once per run, after ``torch.manual_seed(run seed)``: the network's
initialisation follows the run's seed, while the split below depends on ``split_seed`` alone, so every
method and seed is compared on the same patients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import selftune as st


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss: mean squared error of the (standardised) disease progression."""
    return F.mse_loss(outputs.squeeze(-1), targets)


def mae(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A metric reported beside the loss (in standard deviations of the target)."""
    return (outputs.squeeze(-1) - targets).abs().mean()


def diabetes(hidden: int = 256, n_train: int = 150, n_val: int = 100, split_seed: int = 0) -> st.Task:
    """A wide two-layer MLP on few patients: it over-fits without regularisation, which is where tuning
    the dropouts and the weight decay matters."""
    from sklearn.datasets import load_diabetes  # ships inside scikit-learn: no download

    x_all, y_all = load_diabetes(return_X_y=True)
    x_all = torch.as_tensor(x_all, dtype=torch.float32)
    y_all = torch.as_tensor(y_all, dtype=torch.float32)
    order = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(split_seed))
    train, val, test = order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]
    # Standardise with the training rows' statistics only.
    mean, std = x_all[train].mean(0), x_all[train].std(0)
    y_mean, y_std = y_all[train].mean(), y_all[train].std()
    x_all, y_all = (x_all - mean) / std, (y_all - y_mean) / y_std

    model = nn.Sequential(
        st.Dropout("dropout_in"), nn.Linear(10, hidden), nn.ReLU(),
        st.Dropout("dropout1"), nn.Linear(hidden, hidden), nn.ReLU(),
        st.Dropout("dropout2"), nn.Linear(hidden, 1),
    )
    space = st.Space([
        st.Float("dropout_in", 0.0, 0.9, 0.1),
        st.Float("dropout1", 0.0, 0.9, 0.3),
        st.Float("dropout2", 0.0, 0.9, 0.3),
        st.Float("weight_decay", 1e-6, 1e-1, 1e-4, log=True),
    ])
    return st.Task(model=model, space=space, loss=mse, metrics={"mae": mae},
                   train=(x_all[train], y_all[train]), val=(x_all[val], y_all[val]),
                   test=(x_all[test], y_all[test]))

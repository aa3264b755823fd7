"""Five more held-out tasks (stop 34): kinds of task the suite does not have, each written as a user would.

Run through the CLI only (``selftune bench examples/heldout/kinds/multilabel.toml --methods fixed delta-ift
--seeds 3``); no default was tuned on them. Results: docs/benchmarks/README.md, "Five more kinds of task".

* ``multilabel``: 8 labels per example from 40 features (``make_multilabel_classification``), a wide MLP,
  ``BCEWithLogits``, label accuracy and micro-F1 as metrics; 200 training rows.
* ``transformer``: a two-layer Transformer encoder (its own dropout off, selftune's dropouts on the embedding
  and before the head, a learned positional table) on 12-token sequences; the label is whether a 3 comes
  before the first 7, 5% flipped; 300 training sequences.
* ``digits_bn``: a CNN with BatchNorm on 300 8x8 digits, with noise and shift augmentation tuned.
* ``friedman2_huber``: Friedman's regression #2 with 10% heavy outliers in the training and validation
  targets (the test targets are clean), a Huber loss, one weight decay for the first layer and one for the
  rest; 100 training rows.
* ``imbalanced``: a 90/10 classification with a class-weighted cross-entropy passed as the loss, balanced
  accuracy and minority recall as metrics; 300 training rows.
* ``finetune`` (stop 35): transfer learning. An MLP body pretrained on the digits 0-4 (every such image), a
  new head for the digits 5-9 from 100 training images; the body trains at 0.3x the head's rate
  (``tuner.lr_scales``), a dropout in the body and one before the head and a weight decay are tuned.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import selftune as st


def _order(n, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _std(x, tr):
    mean, std = x[tr].mean(0), x[tr].std(0).clamp_min(1e-6)
    return (x - mean) / std


# 1. multi-label ---------------------------------------------------------------------------------
def bce(out, y):
    return F.binary_cross_entropy_with_logits(out, y)


def label_acc(out, y):
    """Per-label (Hamming) accuracy."""
    return ((out > 0).float() == y).float().mean()


def micro_f1(out, y):
    p = (out > 0).float()
    tp = (p * y).sum()
    return 2 * tp / (p.sum() + y.sum()).clamp_min(1.0)


def multilabel(hidden: int = 256, n_train: int = 200, split_seed: int = 0) -> st.Task:
    from sklearn.datasets import make_multilabel_classification
    x, y = make_multilabel_classification(n_samples=1200, n_features=40, n_classes=8, n_labels=3,
                                          random_state=4)
    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(y, dtype=torch.float32)
    o = _order(len(x), split_seed)
    tr, va, te = o[:n_train], o[n_train:n_train + 150], o[n_train + 150:]
    x = _std(x, tr)
    model = nn.Sequential(st.Dropout("dropout_in"), nn.Linear(40, hidden), nn.ReLU(),
                          st.Dropout("dropout1"), nn.Linear(hidden, hidden), nn.ReLU(),
                          st.Dropout("dropout2"), nn.Linear(hidden, 8))
    space = st.Space([st.Float("dropout_in", 0.0, 0.9, 0.1), st.Float("dropout1", 0.0, 0.9, 0.3),
                      st.Float("dropout2", 0.0, 0.9, 0.3),
                      st.Float("weight_decay", 1e-6, 1e-1, 1e-4, log=True)])
    return st.Task(model=model, space=space, loss=bce, metrics={"label_acc": label_acc, "f1": micro_f1},
                   train=(x[tr], y[tr]), val=(x[va], y[va]), test=(x[te], y[te]))


# 2. tiny transformer ----------------------------------------------------------------------------
class TinyTransformer(nn.Module):
    def __init__(self, vocab=10, seq_len=12, d=32, layers=2, classes=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, seq_len, d) * 0.1)
        self.drop_emb = st.Dropout("drop_emb")
        layer = nn.TransformerEncoderLayer(d_model=d, nhead=4, dim_feedforward=64, dropout=0.0,
                                           batch_first=True)
        self.enc = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.drop_out = st.Dropout("drop_out")
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.drop_emb(self.emb(x) + self.pos)
        h = self.enc(h)
        return self.head(self.drop_out(h.mean(1)))


def acc(out, y):
    return (out.argmax(-1) == y).float().mean()


def transformer(n_train: int = 300, layers: int = 2, split_seed: int = 0) -> st.Task:
    """Label: does token 3 occur before the first token 7 (both present), i.e. an order-dependent rule,
    with 5% label noise."""
    g = torch.Generator().manual_seed(21)
    n, length = 1400, 12
    x = torch.randint(0, 10, (n, length), generator=g)
    big = torch.full((n, length), length)
    idx = torch.arange(length).expand(n, length)
    first3 = torch.where(x == 3, idx, big).min(1).values
    first7 = torch.where(x == 7, idx, big).min(1).values
    y = (first3 < first7).long()
    flip = torch.rand(n, generator=g) < 0.05
    y = torch.where(flip, 1 - y, y)
    o = _order(n, split_seed)
    tr, va, te = o[:n_train], o[n_train:n_train + 200], o[n_train + 200:]
    space = st.Space([st.Float("drop_emb", 0.0, 0.9, 0.1), st.Float("drop_out", 0.0, 0.9, 0.3),
                      st.Float("weight_decay", 1e-6, 1e-1, 1e-4, log=True)])
    return st.Task(model=TinyTransformer(layers=layers), space=space, loss=F.cross_entropy,
                   metrics={"accuracy": acc}, train=(x[tr], y[tr]), val=(x[va], y[va]), test=(x[te], y[te]))


# 3. BatchNorm CNN on digits with tuned augmentation -------------------------------------------------
def digits_bn(n_train: int = 300, split_seed: int = 0, flip: float = 0.0) -> st.Task:
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = torch.as_tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.as_tensor(y)
    if flip > 0:  # label noise (all splits): a harder variant, not used by the config
        g = torch.Generator().manual_seed(77)
        noisy = torch.rand(len(y), generator=g) < flip
        y = torch.where(noisy, torch.randint(0, 10, (len(y),), generator=g), y)
    o = _order(len(x), split_seed)
    tr, va, te = o[:n_train], o[n_train:n_train + 200], o[n_train + 200:]
    model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
                          st.Dropout("drop_conv", channelwise=True),
                          nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), st.Dropout("drop_fc"),
                          nn.Linear(128, 10))
    space = st.Space([st.Float("drop_conv", 0.0, 0.9, 0.1), st.Float("drop_fc", 0.0, 0.9, 0.3),
                      st.Float("noise_std", 0.0, 1.0, 0.1), st.Float("max_shift", 0.0, 3.0, 0.5),
                      st.Float("weight_decay", 1e-6, 1e-1, 1e-4, log=True)])
    return st.Task(model=model, space=space, loss=F.cross_entropy, metrics={"accuracy": acc},
                   train=(x[tr], y[tr]), val=(x[va], y[va]), test=(x[te], y[te]))


# 4. Huber regression with per-layer decay -----------------------------------------------------------
def huber(out, y):
    return F.huber_loss(out.squeeze(-1), y, delta=1.0)


def mae(out, y):
    return (out.squeeze(-1) - y).abs().mean()


def friedman2_huber(hidden: int = 256, n_train: int = 100, split_seed: int = 0) -> st.Task:
    from sklearn.datasets import make_friedman2
    x, y = make_friedman2(n_samples=900, noise=60.0, random_state=9)
    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(y, dtype=torch.float32)
    o = _order(len(x), split_seed)
    tr, va, te = o[:n_train], o[n_train:n_train + 100], o[n_train + 100:]
    x = _std(x, tr)
    y = (y - y[tr].mean()) / y[tr].std()
    # heavy-tailed label noise on train/val only: a reason for Huber
    g = torch.Generator().manual_seed(5)
    out_idx = torch.rand(len(y), generator=g) < 0.1
    y_noisy = torch.where(out_idx, y + 4 * torch.randn(len(y), generator=g), y)
    model = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), st.Dropout("drop1"),
                          nn.Linear(hidden, hidden), nn.ReLU(), st.Dropout("drop2"),
                          nn.Linear(hidden, 1))
    space = st.Space([st.Float("drop1", 0.0, 0.9, 0.1), st.Float("drop2", 0.0, 0.9, 0.3),
                      st.Float("wd_first", 1e-6, 1e-1, 1e-4, log=True),
                      st.Float("wd_rest", 1e-6, 1e-1, 1e-4, log=True)])
    return st.Task(model=model, space=space, loss=huber, metrics={"mae": mae},
                   train=(x[tr], y_noisy[tr]), val=(x[va], y_noisy[va]), test=(x[te], y[te]))


# 5. imbalanced classification with class-weighted CE ------------------------------------------------
class WeightedCE:
    def __init__(self, w):
        self.w = w

    def __call__(self, out, y):
        return F.cross_entropy(out, y, weight=self.w.to(out.device))


def minority_recall(out, y):
    m = y == 1
    return ((out.argmax(-1) == 1) & m).float().sum() / m.float().sum().clamp_min(1.0)


def balanced_acc(out, y):
    p = out.argmax(-1)
    r0 = ((p == 0) & (y == 0)).float().sum() / (y == 0).float().sum().clamp_min(1.0)
    r1 = ((p == 1) & (y == 1)).float().sum() / (y == 1).float().sum().clamp_min(1.0)
    return (r0 + r1) / 2


def imbalanced(hidden: int = 256, n_train: int = 300, split_seed: int = 0) -> st.Task:
    from sklearn.datasets import make_classification
    x, y = make_classification(n_samples=2000, n_features=30, n_informative=6, n_redundant=4,
                               weights=[0.9, 0.1], flip_y=0.03, class_sep=1.5, random_state=13)
    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(y)
    o = _order(len(x), split_seed)
    tr, va, te = o[:n_train], o[n_train:n_train + 300], o[n_train + 300:]
    x = _std(x, tr)
    frac = torch.bincount(y[tr], minlength=2).float() / len(tr)
    w = (1.0 / frac) / (1.0 / frac).sum() * 2
    model = nn.Sequential(st.Dropout("dropout_in"), nn.Linear(30, hidden), nn.ReLU(),
                          st.Dropout("dropout1"), nn.Linear(hidden, hidden), nn.ReLU(),
                          st.Dropout("dropout2"), nn.Linear(hidden, 2))
    space = st.Space([st.Float("dropout_in", 0.0, 0.9, 0.1), st.Float("dropout1", 0.0, 0.9, 0.3),
                      st.Float("dropout2", 0.0, 0.9, 0.3),
                      st.Float("weight_decay", 1e-6, 1e-1, 1e-4, log=True)])
    return st.Task(model=model, space=space, loss=WeightedCE(w),
                   metrics={"balanced_acc": balanced_acc, "minority_recall": minority_recall},
                   train=(x[tr], y[tr]), val=(x[va], y[va]), test=(x[te], y[te]))


# 6. fine-tuning a pretrained body (stop 35) -----------------------------------------------------------
class FineTune(nn.Module):
    def __init__(self, body: nn.Sequential, classes: int = 5) -> None:
        super().__init__()
        self.body = nn.Sequential(body[0], nn.ReLU(), st.Dropout("dropout_body"), body[2], nn.ReLU())
        self.head = nn.Sequential(st.Dropout("dropout_head"), nn.Linear(body[2].out_features, classes))

    def forward(self, x):
        return self.head(self.body(x))


def _pretrained_body(x: torch.Tensor, y: torch.Tensor, hidden: int) -> nn.Sequential:
    """An MLP body trained on the source classes, the same for every run (its own seed; the caller's
    generators are left as they were, so the new head's initialisation follows the run's seed)."""
    with torch.random.fork_rng():
        torch.manual_seed(7)
        body = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        head = nn.Linear(hidden, int(y.max()) + 1)
        opt = torch.optim.Adam([*body.parameters(), *head.parameters()], lr=1e-3)
        g = torch.Generator().manual_seed(7)
        for _ in range(30):
            for idx in torch.randperm(len(x), generator=g).split(64):
                opt.zero_grad()
                F.cross_entropy(head(body(x[idx])), y[idx]).backward()
                opt.step()
    return body


def finetune(n_train: int = 100, hidden: int = 256, split_seed: int = 0) -> st.Task:
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = torch.as_tensor(x, dtype=torch.float32) / 16.0
    y = torch.as_tensor(y)
    source = y < 5
    body = _pretrained_body(x[source], y[source], hidden)
    xt, yt = x[~source], y[~source] - 5
    o = _order(len(xt), split_seed)
    tr, va, te = o[:n_train], o[n_train:n_train + 150], o[n_train + 150:]
    space = st.Space([st.Float("dropout_body", 0.0, 0.9, 0.1), st.Float("dropout_head", 0.0, 0.9, 0.3),
                      st.Float("weight_decay", 1e-6, 1e-1, 1e-4, log=True)])
    return st.Task(model=FineTune(body), space=space, loss=F.cross_entropy, metrics={"accuracy": acc},
                   train=(xt[tr], yt[tr]), val=(xt[va], yt[va]), test=(xt[te], yt[te]))

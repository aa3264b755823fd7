"""Three more held-out tasks (stop 27): model families and a loss scale the suite does not have.

Written the way a new user would write them and run through the CLI only (``selftune bench
examples/heldout/seq_gru.toml ...``); no default was tuned on them. Results: docs/benchmarks/README.md,
"Three more held-out tasks". Each has an early and a late dropout and a weight decay:

* ``digits_cnn``: scikit-learn's 8x8 digits as images, a two-layer CNN, 200 training images.
* ``friedman_raw``: Friedman's regression #1 with its targets as they are (mean ~14, sd ~5), so squared
  errors are in the tens, and another draw of the data than ``tasks.friedman``.
* ``seq_gru``: token sequences through an embedding and a GRU; the label is whether a sequence holds more
  1s than 2s, with 10% of labels flipped; 300 training sequences.
* ``friedman_scaled``: ``tasks.friedman`` with its loss multiplied by ``k`` (a loss in other units).
* ``seq_gru_packed`` (stop 31): ``seq_gru``'s problem on sequences of 4 to 20 tokens, padded, which the
  model packs (``pack_padded_sequence``) into its GRU, as variable-length batches usually are.
* ``tagger_conv`` (stop 32): a tag per token from a convolution whose scores are ``(B, C, L)``
  (``F.cross_entropy``'s layout), padding labelled -100, the data a Dataset of dicts behind loaders with
  worker processes and a padding ``collate_fn``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import selftune as st


def _space():
    return st.Space([st.Float("drop_a", 0.0, 0.9, 0.1), st.Float("drop_b", 0.0, 0.9, 0.3),
                     st.Float("weight_decay", 1e-6, 1e-1, 1e-4, log=True)])


def acc(out, y):
    return (out.argmax(-1) == y).float().mean()


def _order(n, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def digits_cnn(n_train: int = 200, split_seed: int = 0) -> st.Task:
    """sklearn's 8x8 digits as images, a small CNN, 200 training images."""
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = torch.as_tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.as_tensor(y)
    o = _order(len(x), split_seed)
    tr, va, te = o[:n_train], o[n_train:n_train + 200], o[n_train + 200:]
    model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), st.Dropout("drop_a"),
                          nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          st.Dropout("drop_b"), nn.Linear(64 * 16, 10))
    return st.Task(model=model, space=_space(), loss=F.cross_entropy, metrics={"accuracy": acc},
                   train=(x[tr], y[tr]), val=(x[va], y[va]), test=(x[te], y[te]))


def friedman_raw(hidden: int = 256, split_seed: int = 0) -> st.Task:
    """Friedman #1 with its raw targets (mean ~14, sd ~5): squared errors in the tens."""
    from sklearn.datasets import make_friedman1
    x, y = make_friedman1(n_samples=800, n_features=10, noise=1.0, random_state=7)
    x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    o = _order(len(x), split_seed)
    tr, va, te = o[:120], o[120:200], o[200:]
    model = nn.Sequential(nn.Linear(10, hidden), nn.ReLU(), st.Dropout("drop_a"), nn.Linear(hidden, hidden),
                          nn.ReLU(), st.Dropout("drop_b"), nn.Linear(hidden, 1))

    def mse(o, t):
        return F.mse_loss(o.squeeze(-1), t)
    return st.Task(model=model, space=_space(), loss=mse, train=(x[tr], y[tr]), val=(x[va], y[va]),
                   test=(x[te], y[te]))


class GRUNet(nn.Module):
    def __init__(self, vocab=12, dim=64):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.drop_a = st.Dropout("drop_a")
        self.gru = nn.GRU(dim, dim, batch_first=True)
        self.drop_b = st.Dropout("drop_b")
        self.out = nn.Linear(dim, 2)

    def forward(self, x):
        h, _ = self.gru(self.drop_a(self.emb(x)))
        return self.out(self.drop_b(h[:, -1]))


def seq_gru(n_train: int = 300, split_seed: int = 0) -> st.Task:
    """Token sequences (length 20, 12 symbols); label: more 1s than 2s, 10% of labels flipped."""
    g = torch.Generator().manual_seed(11)
    x = torch.randint(0, 12, (1400, 20), generator=g)
    y = ((x == 1).sum(1) > (x == 2).sum(1)).long()
    flip = torch.rand(1400, generator=g) < 0.1
    y = torch.where(flip, 1 - y, y)
    o = _order(len(x), split_seed)
    tr, va, te = o[:n_train], o[n_train:n_train + 200], o[n_train + 200:]
    return st.Task(model=GRUNet(), space=_space(), loss=F.cross_entropy, metrics={"accuracy": acc},
                   train=(x[tr], y[tr]), val=(x[va], y[va]), test=(x[te], y[te]))


def friedman_scaled(k: float = 25.0, split_seed: int = 0) -> st.Task:
    """``tasks.friedman`` with its squared error multiplied by ``k``: the same problem in other units."""
    from tasks import friedman

    task = friedman(split_seed=split_seed)
    base = task.loss

    def scaled(o, t):
        return k * base(o, t)
    task.loss = scaled
    return task


PAD = 12


class PackedGRUNet(nn.Module):
    """``GRUNet`` over padded sequences that it packs, so the GRU stops at each sequence's own end."""

    def __init__(self, vocab=PAD + 1, dim=64):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.drop_a = st.Dropout("drop_a")
        self.gru = nn.GRU(dim, dim, batch_first=True)
        self.drop_b = st.Dropout("drop_b")
        self.out = nn.Linear(dim, 2)

    def forward(self, x):
        lengths = (x != PAD).sum(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.drop_a(self.emb(x)), lengths, batch_first=True,
                                                   enforce_sorted=False)
        _, h = self.gru(packed)
        return self.out(self.drop_b(h[-1]))


def seq_gru_packed(n_train: int = 300, split_seed: int = 0) -> st.Task:
    """``seq_gru``'s rule (more 1s than 2s, 10% of labels flipped) on sequences of 4-20 tokens, padded."""
    g = torch.Generator().manual_seed(13)
    x = torch.randint(0, 12, (1400, 20), generator=g)
    lengths = torch.randint(4, 21, (1400,), generator=g)
    x = torch.where(torch.arange(20)[None, :] < lengths[:, None], x, torch.full_like(x, PAD))
    y = ((x == 1).sum(1) > (x == 2).sum(1)).long()
    flip = torch.rand(1400, generator=g) < 0.1
    y = torch.where(flip, 1 - y, y)
    o = _order(len(x), split_seed)
    tr, va, te = o[:n_train], o[n_train:n_train + 200], o[n_train + 200:]
    return st.Task(model=PackedGRUNet(), space=_space(), loss=F.cross_entropy, metrics={"accuracy": acc},
                   train=(x[tr], y[tr]), val=(x[va], y[va]), test=(x[te], y[te]))


class Tokens(torch.utils.data.Dataset):
    """Variable-length token sequences with a tag per token, one dict per example (as a tokenised corpus
    on disk gives them); :func:`pad_tags` makes the batch."""

    def __init__(self, seqs: list[torch.Tensor], tags: list[torch.Tensor]) -> None:
        self.seqs, self.tags = seqs, tags

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"ids": self.seqs[i], "tags": self.tags[i]}


def pad_tags(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pads ids with ``PAD`` and tags with -100, PyTorch's ``ignore_index``: padding is not scored."""
    ids = nn.utils.rnn.pad_sequence([e["ids"] for e in examples], batch_first=True, padding_value=PAD)
    tags = nn.utils.rnn.pad_sequence([e["tags"] for e in examples], batch_first=True, padding_value=-100)
    return {"ids": ids, "tags": tags}


class ConvTagger(nn.Module):
    """Embedding and two 1-d convolutions; scores come out as ``(B, C, L)``, the layout ``F.cross_entropy``
    takes (classes in dimension 1)."""

    def __init__(self, vocab=PAD + 1, dim=32, hidden=256, tags=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=PAD)
        self.drop_a = st.Dropout("drop_a")
        self.conv = nn.Conv1d(dim, hidden, 3, padding=1)
        self.drop_b = st.Dropout("drop_b")
        self.out = nn.Conv1d(hidden, tags, 1)

    def forward(self, ids):
        h = self.drop_a(self.emb(ids)).transpose(1, 2)  # (B, dim, L)
        return self.out(self.drop_b(torch.relu(self.conv(h))))  # (B, tags, L)


def tagger_conv(n_train: int = 120, split_seed: int = 0, workers: int = 2) -> st.Task:
    """Tag each token with (previous token + this token) mod 3, 20% of tags flipped, on 4-20 token sequences:
    a per-token problem a wide convolution over-fits from 120 sequences. Uses the default cross-entropy on
    ``(B, C, L)`` scores with -100 padding, and loaders with worker processes (a tokenised dataset of dicts,
    padded by the loaders' ``collate_fn``)."""
    g = torch.Generator().manual_seed(17)
    seqs, tags = [], []
    for _ in range(1000):
        n = int(torch.randint(4, 21, (), generator=g))
        x = torch.randint(0, 12, (n,), generator=g)
        t = (torch.cat([torch.zeros(1, dtype=torch.long), x[:-1]]) + x) % 3
        flip = torch.rand(n, generator=g) < 0.2
        t = torch.where(flip, (t + torch.randint(1, 3, (n,), generator=g)) % 3, t)
        seqs.append(x)
        tags.append(t)
    o = _order(len(seqs), split_seed).tolist()

    def loader(rows):
        return torch.utils.data.DataLoader(Tokens([seqs[i] for i in rows], [tags[i] for i in rows]), batch_size=32,
                                           collate_fn=pad_tags, num_workers=workers)
    return st.Task(model=ConvTagger(), space=_space(), input_key="ids", target_key="tags",
                   train=loader(o[:n_train]), val=loader(o[n_train:n_train + 200]), test=loader(o[n_train + 200:]))

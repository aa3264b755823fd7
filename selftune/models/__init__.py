"""Reference models used by the examples and benchmarks, written with selftune regularisers.

Each takes the names of the hyperparameters that drive its dropout layers (``None`` for no dropout
there), so one architecture serves every space. ``build(name, ...)`` is the registry the config uses.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from ..nn import Dropout, EmbeddingDropout

__all__ = ["MLP", "MODELS", "AlexNetSmall", "LSTMLanguageModel", "SimpleCNN", "build"]


def _drop(name: str | None, channelwise: bool = False, locked: bool = False) -> nn.Module:
    return Dropout(name, channelwise=channelwise, locked=locked) if name else nn.Identity()


class MLP(nn.Module):
    """Fully connected ReLU network on flattened inputs.

    Args:
        in_features, num_classes: input width and output classes.
        hidden: widths of the hidden layers.
        dropout: ``len(hidden) + 1`` hyperparameter names: input dropout first, then one after each
            hidden layer (``None`` entries: no dropout there).
    """

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (256, 256),
                 dropout: Sequence[str | None] | None = None) -> None:
        super().__init__()
        if isinstance(hidden, str) or not all(isinstance(h, int) and h > 0 for h in hidden):
            raise ValueError(f"hidden must be a list of positive integers (got {hidden!r})")
        dropout = list(dropout) if dropout is not None else [None] * (len(hidden) + 1)
        if len(dropout) != len(hidden) + 1:
            raise ValueError(f"dropout needs {len(hidden) + 1} entries (input + one per hidden layer), "
                             f"got {len(dropout)}")
        layers: list[nn.Module] = [nn.Flatten(), _drop(dropout[0])]
        width = in_features
        for h, d in zip(hidden, dropout[1:], strict=True):
            layers += [nn.Linear(width, h), nn.ReLU(), _drop(d)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class SimpleCNN(nn.Module):
    """The Delta-STN paper's SimpleCNN: two 5x5 conv blocks and two fully connected layers.

    Args:
        in_channels, image_size, num_classes: input shape and classes (``image_size`` divisible by 4).
        channels: output channels of the two conv layers.
        fc: width of the hidden fully connected layer.
        dropout: four hyperparameter names: input, after conv1 block, after conv2 block (both
            channel-wise), after the hidden fully connected layer.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10,
                 channels: Sequence[int] = (16, 32), fc: int = 128,
                 dropout: Sequence[str | None] | None = None) -> None:
        super().__init__()
        d = list(dropout) if dropout is not None else [None] * 4
        if len(d) != 4:
            raise ValueError(f"dropout needs 4 entries (input, conv1, conv2, fc), got {len(d)}")
        c1, c2 = channels
        side = image_size // 4
        self.features = nn.Sequential(
            _drop(d[0]),
            nn.Conv2d(in_channels, c1, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), _drop(d[1], channelwise=True),
            nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), _drop(d[2], channelwise=True),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * side * side, fc), nn.ReLU(), _drop(d[3]), nn.Linear(fc, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class AlexNetSmall(nn.Module):
    """A small AlexNet for 28x28 (or 32x32) images: three conv blocks, two hidden FC layers.

    Args:
        in_channels, image_size, num_classes: input shape and classes (``image_size`` divisible by 8).
        width: channels of the first conv (later convs use 2x and 4x).
        fc: width of the two hidden fully connected layers.
        dropout: five hyperparameter names: input, after each of the three conv blocks (channel-wise),
            and one shared by the two hidden FC layers.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10, width: int = 32,
                 fc: int = 256, dropout: Sequence[str | None] | None = None) -> None:
        super().__init__()
        d = list(dropout) if dropout is not None else [None] * 5
        if len(d) != 5:
            raise ValueError(f"dropout needs 5 entries (input, conv1..3, fc), got {len(d)}")
        side = image_size // 8
        w = width
        self.features = nn.Sequential(
            _drop(d[0]),
            nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), _drop(d[1], True),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), _drop(d[2], True),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), _drop(d[3], True),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * w * side * side, fc), nn.ReLU(), _drop(d[4]),
            nn.Linear(fc, fc), nn.ReLU(), _drop(d[4]), nn.Linear(fc, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class LSTMLanguageModel(nn.Module):
    """Word-level LSTM language model with the STN paper's four dropouts (AWD-LSTM style, scaled down).

    Embedding -> stacked one-layer LSTMs -> linear decoder over the vocabulary. ``hypernetize`` makes
    the embedding, every LSTM's input and recurrent maps, and the decoder best-response layers.
    Input, hidden and output dropout are variational (one mask per sequence); embedding dropout drops
    whole word types. Every sequence starts from a zero state.

    Args:
        vocab_size: vocabulary size (from the data).
        embed: embedding width.
        hidden: LSTM width.
        layers: stacked LSTM layers.
        dropout: four hyperparameter names: embedding (word types), input (embeddings), hidden
            (between LSTM layers) and output (before the decoder); ``None`` entries: none there.
    """

    def __init__(self, vocab_size: int, embed: int = 200, hidden: int = 200, layers: int = 2,
                 dropout: Sequence[str | None] | None = None) -> None:
        super().__init__()
        if layers < 1 or embed < 1 or hidden < 1:
            raise ValueError(f"embed, hidden and layers must be positive (got {embed}, {hidden}, {layers})")
        d = list(dropout) if dropout is not None else [None] * 4
        if len(d) != 4:
            raise ValueError(f"dropout needs 4 entries (embedding, input, hidden, output), got {len(d)}")
        self.embedding = nn.Embedding(vocab_size, embed)
        self.drop_embedding = EmbeddingDropout(d[0], vocab_size) if d[0] else None
        self.drop_input = _drop(d[1], locked=True)
        self.lstms = nn.ModuleList(nn.LSTM(embed if i == 0 else hidden, hidden, batch_first=True)
                                   for i in range(layers))
        self.drop_hidden = _drop(d[2], locked=True)
        self.drop_output = _drop(d[3], locked=True)
        self.decoder = nn.Linear(hidden, vocab_size)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, ids):
        x = self.embedding(ids)
        if self.drop_embedding is not None:
            x = self.drop_embedding(ids, x)
        x = self.drop_input(x)
        for i, lstm in enumerate(self.lstms):
            x, _ = lstm(x)
            x = self.drop_hidden(x) if i < len(self.lstms) - 1 else self.drop_output(x)
        return self.decoder(x)


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "simple_cnn": SimpleCNN, "alexnet_small": AlexNetSmall,
                                               "lstm_lm": LSTMLanguageModel}


def model_arguments(name: str) -> set[str]:
    """Constructor keys a config may set for model ``name`` (input shape and classes come from the data)."""
    params = inspect.signature(MODELS[name]).parameters
    return set(params) - {"in_features", "in_channels", "image_size", "num_classes", "vocab_size"}


def build(name: str, *, input_shape: tuple[int, ...], num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a reference model for data of ``input_shape`` (without the batch dimension).

    Raises:
        LookupError: on an unknown model name.
    """
    if name not in MODELS:
        raise LookupError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if name == "mlp":
        in_features = 1
        for n in input_shape:
            in_features *= n
        return MLP(in_features, num_classes, **kwargs)
    if name == "lstm_lm":
        if len(input_shape) != 1:
            raise ValueError(f"model 'lstm_lm' needs token sequences (data.name = \"ptb\"), got input shape "
                             f"{input_shape}")
        return LSTMLanguageModel(num_classes, **kwargs)
    if len(input_shape) != 3:
        raise ValueError(f"model {name!r} needs image data (C, H, W), got input shape {input_shape}")
    return MODELS[name](in_channels=input_shape[0], image_size=input_shape[1], num_classes=num_classes, **kwargs)

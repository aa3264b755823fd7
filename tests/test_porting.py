"""What a user porting a PyTorch training script meets: their layers' hooks, a model that answers differently
while training, a loss of their own that sums, labels as names, a loader's own batching. Each case was found
by trying it (a fuzzing round) and failed with a raw error, or silently trained something else."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, TensorDataset

import selftune as st
from selftune.errors import ConfigError, ConfigTypeError, DataError, SelftuneWarning

SPACE = st.Space([st.Float("d1", 0.0, 0.9, 0.2)])


def data(n=240, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, 0] > 0).long()


def mlp(first=None):
    torch.manual_seed(0)
    return nn.Sequential(first or nn.Linear(8, 32), nn.ReLU(), st.Dropout("d1"), nn.Linear(32, 2))


def test_a_layer_with_hooks_stays_plain_so_spectral_norm_and_its_keys_survive():
    """``torch.nn.utils.spectral_norm`` (hook-based, common in GAN code) was converted like any Linear: the
    constraint was gone (largest singular value 4.9 after 3 epochs) and export's state_dict no longer loaded
    into the user's class; a forward hook of the user's stopped firing."""
    x, y = data()
    net = st.hypernetize(mlp(torch.nn.utils.spectral_norm(nn.Linear(8, 32))), SPACE)
    assert "0" in net.left_plain and "spectral_norm" in net.left_plain["0"]
    st.SelfTuner(net, (x[:160], y[:160]), (x[160:], y[160:]), method="delta-stn",
                 settings=st.TunerSettings(batch_size=32, lr=0.5)).fit(3)
    with torch.no_grad():
        net.eval()
        net(x[:4])  # (spectral_norm's hook recomputes the weight on a training-mode pass; eval reads it)
    assert torch.linalg.matrix_norm(net.model[0].weight.detach(), ord=2) == pytest.approx(1.0, abs=1e-3)
    mlp(torch.nn.utils.spectral_norm(nn.Linear(8, 32))).load_state_dict(st.export(net).state_dict())

    model, seen = mlp(), []
    model[0].register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    net = st.hypernetize(model, SPACE)
    net.eval()
    net(x[:4])
    assert seen == [(4, 32)] and "0" in net.left_plain
    with pytest.raises(TypeError, match=r"model\.0.*hooks"):
        st.hypernetize(mlp(torch.nn.utils.weight_norm(nn.Linear(8, 32))), SPACE, modules=["0"])


@pytest.mark.parametrize("form", ["orthogonal", "spectral_norm", "weight_norm"])
def test_a_parametrized_layer_stays_plain_and_keeps_its_constraint(form):
    """``torch.nn.utils.parametrizations`` (the modern forms): a layer named in ``modules=`` was converted into
    a copy of its current weight, silently dropping the constraint (an orthogonal layer drifted to
    max|W W^T - I| = 0.18) and the export's keys (fuzz round 44). It is refused by name and kept plain by
    default, reported once with its parametrization."""
    def model():
        layer = nn.Linear(8, 8)
        getattr(nn.utils.parametrizations, form)(layer)
        torch.manual_seed(0)
        return nn.Sequential(layer, nn.ReLU(), st.Dropout("d1"), nn.Linear(8, 2))

    kind = {"orthogonal": "Orthogonal", "spectral_norm": "SpectralNorm", "weight_norm": "WeightNorm"}[form]
    with pytest.raises(TypeError, match=rf"^model\.0: Linear cannot become a best-response layer: it has a "
                                        rf"parametrization \({kind}: .*leave it out of modules= to keep it plain$"):
        st.hypernetize(model(), SPACE, modules=["0", "3"])
    net = st.hypernetize(model(), SPACE)
    assert list(net.left_plain) == ["0"] and kind in net.left_plain["0"] and list(net.converted) == ["3"]
    x, y = data()
    st.SelfTuner(net, (x[:160], y[:160]), (x[160:], y[160:]), method="delta-stn",
                 settings=st.TunerSettings(batch_size=32, lr=0.5)).fit(2)
    weight = st.export(net)[0].weight.detach()
    if form == "orthogonal":
        assert torch.allclose(weight @ weight.T, torch.eye(8), atol=1e-5)
    model().load_state_dict(st.export(net).state_dict())


class Inception(nn.Module):
    """Auxiliary logits while training, the logits alone in evaluation (torchvision's Inception and GoogLeNet)."""

    def __init__(self):
        super().__init__()
        self.body, self.drop = nn.Linear(8, 32), st.Dropout("d1")
        self.head, self.aux = nn.Linear(32, 2), nn.Linear(32, 2)

    def forward(self, x):
        h = self.drop(torch.relu(self.body(x)))
        return (self.head(h), self.aux(h)) if self.training else self.head(h)


def test_a_model_that_returns_more_while_training_is_told_what_loss_to_pass():
    """The checks run the model in evaluation mode (a training-mode pass would change a model's own state); a
    model that returns more while training failed at the first step inside cross-entropy with "'tuple'
    object has no attribute 'dim'"."""
    x, y = data()
    net = st.hypernetize(Inception(), SPACE)
    with pytest.raises(DataError, match=r"^train: in training mode the model returns a tuple, and the default loss "
                                        r"\(cross-entropy\) needs a tensor of logits; pass a loss that takes it"):
        st.SelfTuner(net, (x[:160], y[:160]), (x[160:], y[160:]), settings=st.TunerSettings(batch_size=32)).fit(1)

    def main_and_aux(out, y):
        if isinstance(out, tuple):
            return F.cross_entropy(out[0], y) + 0.3 * F.cross_entropy(out[1], y)
        return F.cross_entropy(out, y)

    tuner = st.SelfTuner(net, (x[:160], y[:160]), (x[160:], y[160:]), loss=main_and_aux,
                         settings=st.TunerSettings(batch_size=32))
    assert tuner.fit(2).history[-1]["val_loss"] < 0.7


def test_a_loss_of_your_own_that_sums_over_the_batch_is_refused():
    """Only ``nn.CrossEntropyLoss(reduction='sum')`` was refused; the same written as a function trained, and the
    net then scored 2.03 with batches of 10 and 20.34 with batches of 100."""
    x, y = data()
    for summed in (lambda out, t: F.cross_entropy(out, t, reduction="sum"),
                   lambda out, t: ((out.softmax(-1)[:, 1] - t.float()) ** 2).sum()):
        with pytest.raises(ConfigTypeError, match=r"^loss: it sums over the batch"):
            st.SelfTuner(st.hypernetize(mlp(), SPACE), (x[:160], y[:160]), (x[160:], y[160:]), loss=summed)
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0]))  # a weighted mean is a mean
    st.SelfTuner(st.hypernetize(mlp(), SPACE), (x[:160], y[:160]), (x[160:], y[160:]), loss=weighted)
    head = nn.Linear(32, 2)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)  # uniform in-batch scores: log B, which doubles from B = 2 to B = 4

    def in_batch(out, t):  # an in-batch softmax (InfoNCE), a mean over anchors
        return F.cross_entropy(out @ out.T / 0.1, torch.arange(len(out)))
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), st.Dropout("d1"), head)
    st.SelfTuner(st.hypernetize(model, SPACE), (x[:160], y[:160]), (x[160:], y[160:]), loss=in_batch)


class Named(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def test_labels_as_names_and_targets_as_a_list_are_one_line_errors():
    x, y = data()
    names = ["cat" if v else "dog" for v in y.tolist()]

    class Strings(Named):
        def __getitem__(self, i):
            return self.x[i], names[i]

    with pytest.raises(DataError, match=r"^train: the targets are a tuple of str \('dog'\).*map the labels to "
                                        r"integers"):
        st.SelfTuner(st.hypernetize(mlp(), SPACE), Strings(x[:160], y[:160]), Strings(x[160:], y[160:]))
    with pytest.raises(ConfigTypeError, match=r"^target_key: must be one key of the examples \(got a list\)"):
        st.SelfTuner(st.hypernetize(mlp(), SPACE), Named(x[:160], y[:160]), Named(x[160:], y[160:]),
                     target_key=["cls", "reg"])


def test_a_bad_label_deep_in_validation_or_scored_data_names_the_split_and_the_example():
    """Training named the split and the example; validation and scoring said "data: label 7 is outside"."""
    x, y = data()
    bad = y.clone()
    bad[205] = 7
    tuner = st.SelfTuner(st.hypernetize(mlp(), SPACE), Named(x[:160], y[:160]), Named(x[160:], bad[160:]),
                         settings=st.TunerSettings(batch_size=32))
    with pytest.raises(DataError, match=r"^val: label 7 at example 45 of the dataset is outside the model's 2 outputs"):
        tuner.score()


def test_a_loaders_own_batching_is_read_where_a_batch_sampler_holds_it_or_none_is_done():
    """A ``batch_sampler=BatchSampler(..., 16, drop_last=True)`` trained at the default batch with drop_last off,
    silently; a loader with ``batch_size=None`` (no automatic batching) failed as "the model failed on the first
    examples ... its inputs are list"."""
    x, y = data(257 + 40)
    train = TensorDataset(x[:257], y[:257])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tuner = st.SelfTuner(st.hypernetize(mlp(), SPACE),
                             DataLoader(train, batch_sampler=BatchSampler(RandomSampler(train), 16, True)),
                             (x[257:], y[257:]), method="fixed")
    assert tuner.settings.drop_last
    assert any(isinstance(w.message, SelftuneWarning) and "batch_size 16 is not used" in str(w.message)
               for w in caught)
    unbatched = st.SelfTuner(st.hypernetize(mlp(), SPACE), DataLoader(Named(x[:200], y[:200]), batch_size=None),
                             (x[200:], y[200:]), method="fixed", settings=st.TunerSettings(batch_size=32))
    assert unbatched.fit(1).history[-1]["val_loss"] < 0.75


def test_export_of_a_transformer_over_padding_gives_the_tuned_nets_outputs():
    """PyTorch's nested-tensor fast path (eval mode, a padding mask) returns 0 at padded positions; the tuned
    net runs without it, so an exported model that pooled over padding scored 0.639 against 0.626."""
    torch.manual_seed(0)
    x = torch.randn(64, 6, 8)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(8, 16)
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2)
            self.drop, self.out = st.Dropout("d1"), nn.Linear(16, 2)

        def forward(self, x):
            mask = torch.zeros(x.shape[:2], dtype=torch.bool)
            mask[:, -1] = True
            return self.out(self.drop(self.enc(self.inp(x), src_key_padding_mask=mask).mean(1)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (PyTorch's note on norm_first and nested tensors)
        net = st.hypernetize(Encoder(), SPACE)
    plain = st.export(net)
    net.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.allclose(net(x), plain(x), atol=1e-5)


def test_the_summary_names_the_models_own_dropouts_that_stay_untuned():
    """A user who replaced some ``nn.Dropout`` by selftune's learns of the ones left, which train at their
    fixed rates (fuzz round 44: nothing said so)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.3), nn.ReLU(), st.Dropout("d1"), nn.AlphaDropout(0.0),
                          nn.Linear(16, 2))
    net = st.hypernetize(model, SPACE)
    assert net.untuned == {"1": "Dropout p=0.3"}  # a rate of 0 drops nothing: no news
    assert "kept at their own rates (untuned): 1 (Dropout p=0.3)" in net.summary()
    lstm = st.hypernetize(nn.Sequential(nn.LSTM(3, 4, num_layers=2, dropout=0.2)), SPACE)
    assert lstm.untuned == {"0": "dropout=0.2 between layers"}
    assert not st.hypernetize(mlp(), SPACE).untuned


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("method", ["fixed", "delta-stn"])
def test_gradient_checkpointing_around_selftune_layers_is_refused_before_the_run(reentrant, method):
    """``torch.utils.checkpoint`` recomputes its block in the backward pass, after the HyperNet forward pass
    has ended: a selftune Dropout there crashed inside autograd, a converted layer recomputed without its
    response (PyTorch's CheckpointError, or, reentrant, gradients of another function, silently). Refused in
    one line when the tuner is built (fuzz round 44)."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.block, self.head = nn.Linear(8, 16), nn.Sequential(nn.Linear(16, 16), nn.ReLU()), \
                nn.Linear(16, 2)
            self.drop = st.Dropout("d1")

        def forward(self, x):
            h = self.drop(torch.relu(self.first(x)))
            return self.head(checkpoint(self.block, h, use_reentrant=reentrant))

    x, y = data()
    net = st.hypernetize(Checkpointed(), SPACE)
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(ConfigError, match=r"^model: a selftune layer ran again during the backward pass "
                                          r"\(torch\.utils\.checkpoint recomputes its block there\).*remove it"):
        st.SelfTuner(net, (x[:160], y[:160]), (x[160:], y[160:]), method=method,
                     settings=st.TunerSettings(batch_size=32))
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("method", ["fixed", "delta-stn"])
def test_unfreezing_after_the_tuner_was_built_is_refused_and_a_new_tuner_trains_the_layer(method):
    """"Train the head, then unfreeze the backbone": the tuner's optimizers hold the weights that trained when
    it was built, so the unfrozen backbone's gradients were computed at every step and it never moved,
    silently (fuzz round 44). A later fit, or the next epoch end after a callback unfroze it, refuses in one
    line; a new SelfTuner over the same net trains it (as a plain layer)."""
    x, y = data()
    train, val = (x[:160], y[:160]), (x[160:], y[160:])
    model = mlp()
    model[0].requires_grad_(False)
    net = st.hypernetize(model, SPACE)
    assert "0" in net.left_plain
    tuner = st.SelfTuner(net, train, val, method=method, settings=st.TunerSettings(batch_size=32))
    tuner.fit(1)
    model[0].requires_grad_(True)
    with pytest.raises(ConfigError, match=r"^model: 0\.weight, 0\.bias train now \(requires_grad=True\) but no "
                                          r"optimizer holds them \(they were frozen, or not in the model, when this "
                                          r"SelfTuner was built\).*build a new SelfTuner"):
        tuner.fit(2)
    before = model[0].weight.detach().clone()
    st.SelfTuner(net, train, val, method=method, settings=st.TunerSettings(batch_size=32)).fit(1)
    assert not torch.equal(before, model[0].weight)

    class Unfreeze(st.Callback):
        def on_epoch_end(self, tuner, row):
            model[0].requires_grad_(True)

    model[0].requires_grad_(False)
    tuner = st.SelfTuner(net, train, val, method=method, settings=st.TunerSettings(batch_size=32))
    with pytest.raises(ConfigError, match=r"^model: 0\.weight, 0\.bias train now"):
        tuner.fit(3, callbacks=[Unfreeze()])
    assert tuner.order.epoch == 1


class _EvalGuard(torch.autograd.Function):
    """A backward that refuses evaluation mode, as cuDNN's RNNs do."""

    @staticmethod
    def forward(ctx, x, training):
        ctx.training = training
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        if not ctx.training:
            raise RuntimeError("cudnn RNN backward can only be called in training mode")
        return g, None


def test_the_checkpointing_probe_never_refuses_a_model_it_cannot_run():
    """The probe for gradient checkpointing (one backward pass in evaluation mode) refused a model whose
    backward needs training mode (cuDNN's LSTM on a GPU) and, cutting a batch to two examples, one whose
    targets are a list the cut did not reach (the review of stop 35): it probes for recomputation alone."""
    from torch.utils.data import Dataset

    class Guarded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.drop = nn.Linear(8, 2), st.Dropout("d1")

        def forward(self, x):
            return _EvalGuard.apply(self.fc(self.drop(x)), self.training)

    x, y = data()
    st.SelfTuner(st.hypernetize(Guarded(), SPACE), (x[:160], y[:160]), (x[160:], y[160:]),
                 settings=st.TunerSettings(batch_size=32)).fit(1)

    names = ["no", "yes"]

    class Named(Dataset):
        def __init__(self, rows):
            self.rows = rows

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return x[self.rows[i]], names[int(y[self.rows[i]])]

    def loss(out, labels):
        return F.cross_entropy(out, torch.tensor([names.index(s) for s in labels]))

    def accuracy(out, labels):
        return (out.argmax(-1) == torch.tensor([names.index(s) for s in labels])).float().mean()

    st.SelfTuner(st.hypernetize(mlp(), SPACE), Named(range(160)), Named(range(160, 240)), loss=loss,
                 metrics={"accuracy": accuracy}, settings=st.TunerSettings(batch_size=32)).fit(1)

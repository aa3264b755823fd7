"""Users' architectures beyond MLPs and CNNs: stacked and bidirectional LSTMs, GRUs, Conv1d and Transformer
encoders are converted, tuned (every declared hyperparameter gets a hypergradient), exported, and never
evaluated through a path that skips their response."""

import math

import pytest
import torch
from torch import nn

import selftune as st


def space():
    return st.Space([st.Float("p", 0.0, 0.9, 0.3), st.Float("q", 0.0, 0.9, 0.3)])


class Recurrent(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.inp, self.out = st.Dropout("p"), st.Dropout("q")
        options = {"num_layers": 2, "bidirectional": True} if kind is nn.LSTM else {}
        self.rnn = kind(4, 8, batch_first=True, **options)
        self.head = nn.Linear(16 if kind is nn.LSTM else 8, 3)

    def forward(self, x):
        y, _ = self.rnn(self.inp(x))
        return self.head(self.out(y[:, -1]))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.out = st.Dropout("p"), st.Dropout("q")
        self.embed = nn.Linear(4, 16)
        self.block = nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.out(self.block(self.embed(self.inp(x))).mean(1)))


class Temporal(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.out = st.Dropout("p"), st.Dropout("q")
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.out(torch.relu(self.conv(self.inp(x).transpose(1, 2))).mean(2)))


MODELS = {"lstm-2-layer-bidirectional": lambda: Recurrent(nn.LSTM), "gru": lambda: Recurrent(nn.GRU),
          "transformer-encoder": Encoder, "conv1d": Temporal}


def sequences(n=96):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 7, 4, generator=g)
    y = (x[:, :, 0].sum(1) > 0).long() + (x[:, :, 1].sum(1) > 1).long()
    return x, y


@pytest.mark.parametrize("name", MODELS)
def test_each_architecture_is_converted_and_every_hyperparameter_gets_a_hypergradient(name):
    torch.manual_seed(0)
    net = st.hypernetize(MODELS[name](), space())
    assert net.converted, net.summary()
    x, y = sequences()
    tuner = st.SelfTuner(net, (x[:64], y[:64]), (x[64:], y[64:]), settings=st.TunerSettings(
        batch_size=16, warmup_epochs=0, lr=0.05), seed=0)
    fit = tuner.fit(5)
    assert fit.compute["hyper_steps"] >= 3
    assert all(tuner.log.hypergrad_seen), f"{name}: {dict(zip(net.space.names, tuner.log.hypergrad_seen))}"


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("method", ["ift", "one-pass"])
def test_the_second_order_methods_differentiate_each_architecture_twice(name, method):
    """ift and one-pass differentiate the training gradient again: an attention must not run on a fused
    kernel without a double backward (PyTorch's flash attention on CPU has none)."""
    torch.manual_seed(0)
    net = st.hypernetize(MODELS[name](), space())
    x, y = sequences()
    tuner = st.SelfTuner(net, (x[:64], y[:64]), (x[64:], y[64:]), method=method, settings=st.TunerSettings(
        batch_size=16, warmup_epochs=0, lr=0.05), seed=0)
    fit = tuner.fit(3)
    assert fit.compute["hyper_steps"] >= 1 and torch.isfinite(net.hparams).all()


def test_the_summary_names_what_was_converted_and_what_was_left_plain():
    net = st.hypernetize(Encoder(), space())
    text = net.summary()
    assert text.startswith("converted 4 Linear, 1 MultiheadAttention")  # embed, linear1, linear2, head; self_attn
    assert "self_attn" not in text.partition("left plain")[2]
    assert "block.norm1 (normalisation layers stay plain)" in text


@pytest.mark.parametrize("name", MODELS)
def test_export_equals_the_net_with_a_material_response_and_no_fast_path_skips_it(name):
    """In the STN form with large gates every converted layer's response matters. The export computes it
    with plain layers; the net must agree in eval mode under no_grad, where PyTorch's fused Transformer
    fast path would otherwise read linear1.weight directly and skip the response."""
    torch.manual_seed(0)
    net = st.hypernetize(MODELS[name](), space(), form="stn")
    with torch.no_grad():
        for layer in net.best_response_layers():
            for p in layer.response_parameters():
                if p.dim() == 2 and p.shape[1] == net.space.encoding_width(net.encoding):
                    p.copy_(torch.randn_like(p))  # gates
    net.eval()
    x, _ = sequences(8)
    plain = st.export(net).eval()
    with torch.no_grad():
        want, got = plain(x), net(x)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


@pytest.mark.parametrize("batch_first", [True, False])
def test_a_converted_attention_computes_what_pytorchs_does(batch_first):
    """Delta form at its own hyperparameters: no response, so every output must be nn.MultiheadAttention's,
    for self- and cross-attention, both masks (boolean and float), with and without the weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.MultiheadAttention(16, 4, batch_first=batch_first))
    original = nn.MultiheadAttention(16, 4, batch_first=batch_first)
    original.load_state_dict(model[0].state_dict())
    net = st.hypernetize(model, space())
    attention = model[0]
    assert type(attention).__name__ == "BestResponseMultiheadAttention"
    n, t, s = 3, 5, 6
    q = torch.randn(n, t, 16) if batch_first else torch.randn(t, n, 16)
    kv = torch.randn(n, s, 16) if batch_first else torch.randn(s, n, 16)
    padding = torch.zeros(n, s, dtype=torch.bool)
    padding[0, -2:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(t)
    cases = [((q, q, q), {}), ((q, kv, kv), {"key_padding_mask": padding}),
             ((q, q, q), {"attn_mask": causal, "need_weights": False, "is_causal": True}),
             ((q, kv, kv), {"attn_mask": torch.rand(t, s) > 0.8, "average_attn_weights": False})]
    with net._state.bind(torch.zeros(n, 2), None, None):  # a forward pass's state, as HyperNet.forward binds it
        for args, kwargs in cases:
            want, want_w = original(*args, **kwargs)
            got, got_w = attention(*args, **kwargs)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
            if want_w is None:
                assert got_w is None
            else:
                torch.testing.assert_close(got_w, want_w, atol=1e-5, rtol=1e-4)


class SequenceFirst(nn.Module):
    """A model that takes (T, B, F) inputs, PyTorch's default layout for recurrent and Transformer layers."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = st.Dropout("p"), st.Dropout("q", locked=True)
        self.embed = nn.Linear(4, 16)
        self.block = nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32, dropout=0.0)
        self.rnn = nn.LSTM(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        assert x.shape[1] != 7, "the examples must come in dimension 1"
        h, _ = self.rnn(self.out(self.block(self.embed(self.inp(x)))))
        return self.head(h[-1])


def test_a_sequence_first_model_trains_tunes_and_exports_with_batch_dim_1():
    torch.manual_seed(0)
    net = st.hypernetize(SequenceFirst(), space(), batch_dim=1)
    x, y = sequences()  # (N, T, F) examples: selftune stacks them sequence-first
    tuner = st.SelfTuner(net, (x[:64], y[:64]), (x[64:], y[64:]), settings=st.TunerSettings(
        batch_size=16, warmup_epochs=0, lr=0.05, accumulate=2, response_fraction=0.5), seed=0)
    fit = tuner.fit(4)
    assert fit.compute["examples"] > 0 and all(tuner.log.hypergrad_seen), net.summary()
    assert st.score(net, (x[64:], y[64:]))["loss"] == pytest.approx(fit.history[-1]["val_loss"], rel=1e-5)
    net.eval()
    with torch.no_grad():
        batch = x[:8].transpose(0, 1)
        torch.testing.assert_close(st.export(net).eval()(batch), net(batch), atol=1e-5, rtol=1e-4)


def test_without_batch_dim_a_sequence_first_model_is_refused_in_one_line():
    class Unchecked(SequenceFirst):
        def forward(self, x):
            h, _ = self.rnn(self.out(self.block(self.embed(self.inp(x)))))
            return self.head(h[-1])

    torch.manual_seed(0)
    net = st.hypernetize(Unchecked(), space())
    x, y = sequences()  # stacked batch-first, (B, 7, 4): the model reads 7 examples of length B
    with pytest.raises(st.errors.DataError, match=r"7 output rows for 2 examples.*batch_dim=1"):
        st.SelfTuner(net, (x[:64], y[:64]), (x[64:], y[64:]), settings=st.TunerSettings(batch_size=16))


class SequenceFirstLM(nn.Module):
    def __init__(self, vocab=30):
        super().__init__()
        self.vocab = vocab
        self.embed, self.drop = nn.Embedding(vocab, 16), st.Dropout("p", locked=True)
        self.rnn, self.head = nn.LSTM(16, 16), nn.Linear(16, vocab)

    def forward(self, x):  # (T, B) ids -> (T, B, vocab)
        h, _ = self.rnn(self.drop(self.embed(x)))
        return self.head(self.drop(h))


def lm_batches(vocab=30, steps=6):
    g = torch.Generator().manual_seed(0)
    x, xv = torch.randint(0, vocab, (38, steps + 1), generator=g), torch.randint(0, vocab, (12, steps + 1), generator=g)
    return (x[:, :-1], x[:, 1:]), (xv[:, :-1], xv[:, 1:])


def lm_loss(out, y):
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def test_a_sequence_first_batch_as_long_as_it_is_wide_is_cut_along_its_batch():
    """(T, B) token batches with T == B (here every epoch's last batch: 38 = 4 x 8 + 6, T = 6): Delta-STN's
    response step cuts the examples, not the time steps."""
    torch.manual_seed(0)
    train, val = lm_batches()
    net = st.hypernetize(SequenceFirstLM(), st.Space([st.Float("p", 0.0, 0.9, 0.3)]), batch_dim=1)
    fit = st.SelfTuner(net, train, val, method="delta-stn", loss=lm_loss,
                       settings=st.TunerSettings(lr=0.1, batch_size=8, warmup_epochs=1), seed=0).fit(3)
    assert fit.compute["hyper_steps"] > 0 and torch.isfinite(net.hparams).all()


def test_accumulating_sequence_first_batches_as_long_as_they_are_wide_equals_the_large_batch():
    """Micro-batches of a (6, 6) batch are examples 0-2 and 3-5, not time steps: the accumulated run trains
    as the run on whole batches (no dropout, so the two draw nothing different)."""
    train, val = lm_batches()
    nets = []
    for batch, accumulate in ((6, 1), (3, 2)):
        torch.manual_seed(0)
        net = st.hypernetize(SequenceFirstLM(), st.Space([st.Float("p", 0.0, 0.9, 0.0)]), batch_dim=1)
        st.SelfTuner(net, train, val, method="fixed", loss=lm_loss, seed=0, settings=st.TunerSettings(
            lr=0.1, batch_size=batch, accumulate=accumulate)).fit(2)
        nets.append(net)
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


class RawWeights(nn.Module):
    """A user's own layer: a bare nn.Parameter, which hypernetize leaves plain."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 3) * 0.1)
        self.drop = st.Dropout("p")

    def forward(self, x):
        return self.drop(x) @ self.w


@pytest.mark.parametrize("method, form", [("delta-stn", "delta"), ("stn", "stn"), ("delta-ift", "delta")])
def test_a_response_method_on_a_net_with_no_converted_layer_is_refused_and_ift_tunes_it(method, form):
    """With no best-response layer, delta-stn crashed at its first response step and stn never moved a
    value: both are refused with a one-line error naming the methods that need none, which tune it."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    space = st.Space([st.Float("p", 0.0, 0.9, 0.3)])
    with pytest.raises(st.errors.ConfigError) as err:
        st.SelfTuner(st.hypernetize(RawWeights(), space, form=form), (x, y), (x, y), method=method)
    message = str(err.value)
    assert message.startswith(f"method: {method!r} tunes through best-response layers") and "'ift'" in message
    net = st.hypernetize(RawWeights(), space)
    fit = st.SelfTuner(net, (x, y), (x, y), method="ift", settings=st.TunerSettings(lr=0.05, batch_size=16),
                       seed=0).fit(3)
    assert fit.hparams["p"] != pytest.approx(0.3, abs=1e-3)


class _Positional(nn.Module):
    """Tokens plus a learned positional embedding called on ``arange(T)`` (GPT/BERT style): an input shared by
    every example, with no batch dimension."""

    def __init__(self, vocab: int = 20, length: int = 12, width: int = 16) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(length, width)
        self.drop, self.head = st.Dropout("d"), nn.Linear(width, 2)

    def forward(self, x):
        h = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        return self.head(self.drop(h).mean(1))


def test_a_positional_embedding_shared_by_every_example_responds_to_their_mean_perturbation():
    """The response of such a layer was applied along a batch axis guessed from sizes: a batch of 16 over 12
    positions failed at the first response step ("no dimension ... holds the batch's examples"), and a
    batch of exactly 12 gave position t example t's perturbation, silently."""
    torch.manual_seed(0)
    x = torch.randint(0, 20, (240, 12), generator=torch.Generator().manual_seed(0))
    y = ((x == 3).sum(1) > (x == 5).sum(1)).long()
    space = st.Space([st.Float("d", 0.0, 0.8, 0.2)])
    for batch in (16, 12):
        net = st.hypernetize(_Positional(), space)
        tuner = st.SelfTuner(net, (x[:160], y[:160]), (x[160:200], y[160:200]), method="delta-stn",
                             settings=st.TunerSettings(batch_size=batch, lr=0.05), seed=0)
        assert net.model.pos.unbatched and not net.model.tok.unbatched
        tuner.fit(1)
        assert math.isfinite(tuner.score((x[200:], y[200:]))["loss"])
    # at a batch of 12 = T: every position gets the batch's mean gate
    seen = []
    net.model.pos.register_forward_hook(lambda _m, _i, out: seen.append(out))
    u = net.hparams.detach() + torch.linspace(-1, 1, 12)[:, None]
    with torch.no_grad():
        net(x[:12], u)
        pos = net.model.pos
        gates = torch.nn.functional.linear(net.encode(u) - net.encode(net.hparams.detach()[None]), pos.gate)[:, :16]
        expected = pos.weight + gates.mean(0) * pos.response_weight
    torch.testing.assert_close(seen[-1], expected)



def test_a_sequence_first_layer_inside_a_batch_first_model_responds_per_example_when_steps_equal_the_batch():
    """A sequence-first Transformer inside a batch-first model gives (T, B, H) activations; where T equalled
    the batch, sizes alone read them batch-first and example t took time step t's gate, silently (found by a
    fuzz round). The probe before training sees which dimension grew with the examples."""
    torch.manual_seed(0)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0)
            self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
            self.drop, self.fc = st.Dropout("p"), nn.Linear(16, 2)

        def forward(self, x):  # (B, T, E), batch-first outside
            return self.fc(self.drop(self.enc(x.transpose(0, 1)).mean(0)))

    net = st.hypernetize(Encoder(), st.Space([st.Float("p", 0.0, 0.8, init=0.2)]))
    x = torch.randn(8, 8, 16)  # T == B
    y = torch.randint(0, 2, (8,))
    st.SelfTuner(net, (x, y), (x, y), settings=st.TunerSettings(batch_size=8))  # runs the probe
    with torch.no_grad():
        for layer in net.best_response_layers():
            for name, p in layer.named_parameters(recurse=False):
                if name.startswith("gate"):
                    p.normal_(0, 0.5)
    net.eval()
    u = net.perturb(8, torch.Generator().manual_seed(0))
    with torch.no_grad():
        batched = net(x, u)
        single = torch.cat([net(x[i:i + 1], u[i:i + 1]) for i in range(8)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_hypernetize_twice_on_one_model_reports_its_layers_converted_or_refuses_another_space():
    """A notebook cell run twice: the second call's summary said every layer was left plain ("BestResponseLinear
    has no best-response form") while they responded; a space or form the earlier layers cannot take is refused."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), st.Dropout("d"), nn.Linear(16, 2))
    space = st.Space([st.Float("d", 0.0, 0.9, 0.3)])
    st.hypernetize(model, space)
    again = st.hypernetize(model, space)
    assert again.summary() == "converted 2 BestResponseLinear (an earlier hypernetize's)" and not again.left_plain
    with pytest.raises(TypeError, match=r"model\.0 is already a best-response layer \(form='delta', 1 encoding "
                                        r"inputs\).*build the model afresh"):
        st.hypernetize(model, st.Space([st.Float("d", 0.0, 0.9, 0.3), st.Float("e", 0.0, 0.9, 0.3)]))
    with pytest.raises(TypeError, match="cannot respond to this space \\(form='stn'"):
        st.hypernetize(model, space, form="stn")
    attention = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), nn.Flatten(),
                              st.Dropout("d"), nn.Linear(32, 2))
    st.hypernetize(attention, space, modules=["0.self_attn"])
    with pytest.raises(TypeError, match=r"model\.0\.self_attn\.in_proj is already a best-response layer"):
        st.hypernetize(attention, st.Space([st.Float("d", 0.0, 0.9, 0.3), st.Float("e", 0.0, 0.9, 0.3)]))


def test_an_instance_norm_that_tracks_statistics_keeps_them_across_the_extra_passes():
    """Only BatchNorm's were kept: the response step and ift's second pass moved a tracking InstanceNorm's."""
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.InstanceNorm1d(4, track_running_stats=True), nn.Flatten(),
                          st.Dropout("d"), nn.Linear(24, 2))
    net = st.hypernetize(model, st.Space([st.Float("d", 0.0, 0.9, 0.2)]))
    x, y = torch.randn(40, 2, 8), torch.randint(0, 2, (40,))
    tuner = st.SelfTuner(net, (x[:30], y[:30]), (x[30:], y[30:]), settings=st.TunerSettings(batch_size=10))
    norm = model[1]
    before = norm.running_mean.clone()
    net.train()
    with tuner.kept_statistics():
        net(x[:10] * 5 + 3)
    assert torch.equal(norm.running_mean, before)
    net(x[:10] * 5 + 3)
    assert not torch.equal(norm.running_mean, before)


def test_a_models_own_parameter_is_named_as_what_stays_plain():
    """A learned table the model holds itself (a positional embedding as an ``nn.Parameter``) stays plain; the
    summary named "the model itself" as having no best-response form while its layers were converted."""
    class Positional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(4))
            self.drop = st.Dropout("p")
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.drop(x + self.pos))

    net = st.hypernetize(Positional(), st.Space([st.Float("p", 0.0, 0.9, 0.1)]))
    assert net.converted == {"head": "Linear"}
    assert net.left_plain == {"": "Positional's own parameter pos stays plain: only the layer kinds hypernetize "
                                  "converts respond"}
    assert "left plain: the model (Positional's own parameter pos" in net.summary()

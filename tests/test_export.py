"""`selftune.export`: the user's own model back, plain, at the tuned hyperparameters."""

import pytest
import torch
from torch import nn

import selftune as st


class Small(nn.Module):
    """A user's model: every convertible layer kind, and selftune's regularisers."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 6)
        self.lstm = nn.LSTM(6, 5, batch_first=True)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.drop = st.Dropout("p")
        self.edrop = st.EmbeddingDropout("pe", 20)
        self.head = nn.Linear(5 + 3 * 16, 4)

    def forward(self, x):
        ids, image = x[:, :5].long(), x[:, 5:].view(-1, 1, 4, 4)
        seq, _ = self.lstm(self.edrop(ids, self.embed(ids)))
        feats = torch.cat([seq[:, -1], self.conv(image).flatten(1)], dim=1)
        return self.head(self.drop(feats))


def _trained(form):
    torch.manual_seed(0)
    space = st.Space([st.Float("p", 0.0, 0.9, init=0.3), st.Float("pe", 0.0, 0.9, init=0.2)])
    net = st.hypernetize(Small(), space, form=form)
    with torch.no_grad():  # a trained response: gates, response weights and STN's scale away from init
        for layer in net.best_response_layers():
            for p in layer.response_parameters():
                p.add_(torch.randn_like(p) * 0.3)
        net.hparams.add_(torch.tensor([0.4, -0.3]))
    return net


def _batch():
    gen = torch.Generator().manual_seed(1)
    return torch.cat([torch.randint(0, 20, (8, 5), generator=gen).float(), torch.randn(8, 16, generator=gen)], 1)


@pytest.mark.parametrize("form", ["stn", "delta"])
def test_export_gives_a_plain_model_with_the_wrappers_outputs(form):
    net = _trained(form)
    x = _batch()
    net.eval()
    with torch.no_grad():
        expected = net(x)
    plain = st.export(net).eval()
    assert not any(isinstance(m, st.nn.layers.BestResponseModule) for m in plain.modules())
    assert {type(m) for m in plain.modules()} >= {nn.Linear, nn.Conv2d, nn.Embedding, nn.LSTM}
    with torch.no_grad():
        assert torch.allclose(plain(x), expected, atol=1e-5)
    # The user's own class loads it, key for key, and computes the same.
    mine = Small()
    mine.load_state_dict(plain.state_dict())
    assert mine.state_dict().keys() == plain.state_dict().keys()
    mine.eval()
    with torch.no_grad():
        assert torch.allclose(mine(x), expected, atol=1e-5)  # eval: its dropouts need no HyperNet
    # The wrapper is untouched, and the copy trains on its own at the tuned rates.
    assert any(isinstance(m, st.nn.layers.BestResponseModule) for m in net.modules())
    plain.train()
    values = net.values()
    assert plain.drop.fixed == pytest.approx(values["p"]) and plain.edrop.fixed == pytest.approx(values["pe"])
    loss = plain(x).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in plain.parameters())


def test_the_exported_model_is_scored_as_the_tuned_one():
    """`st.score` and `st.evaluate` take the plain model `export` returns (they crashed on it: no hparams)."""
    net = _trained("delta")
    x, y = _batch(), torch.arange(8) % 4
    plain = st.export(net)
    assert st.score(plain, (x, y)) == pytest.approx(st.score(net, (x, y)), rel=1e-5)
    assert st.evaluate(plain, (x, y)) == pytest.approx(st.evaluate(net, (x, y)), rel=1e-5)
    mae = {"mae": lambda out, target: (out.argmax(-1) - target).abs().float().mean()}
    assert st.score(plain, (x, y), metrics=mae, device="cpu")["mae"] == pytest.approx(
        st.score(net, (x, y), metrics=mae)["mae"])
    with pytest.raises(TypeError, match=r"score needs a torch\.nn\.Module"):
        st.score(lambda v: v, (x, y))


class SeqFirst(nn.Module):
    """(T, B, F) inputs, one label per sequence: the batch is dimension 1."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6)
        self.drop = st.Dropout("p")
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.drop(self.lstm(x)[0][-1]))


def test_an_exported_sequence_first_model_is_scored_on_its_batch_dimension():
    """A plain module has no batch_dim: the HyperNet's is passed, and batches reach it sequence-first as they
    reach the HyperNet (7 sequences of 20 steps, stored one example per row as every dataset is)."""
    torch.manual_seed(0)
    net = st.hypernetize(SeqFirst(), st.Space([st.Float("p", 0.0, 0.9, init=0.3)]), batch_dim=1)
    x, y = torch.randn(7, 20, 4), torch.arange(7) % 3
    plain = st.export(net)
    assert st.score(plain, (x, y), batch_dim=1) == pytest.approx(st.score(net, (x, y)), rel=1e-5)
    assert st.evaluate(plain, (x, y), batch_dim=1) == pytest.approx(st.evaluate(net, (x, y)), rel=1e-5)
    with pytest.raises(ValueError, match="batch_size"):  # without it, the plain model reads 7 steps of 20 sequences
        st.score(plain, (x, y))


def test_your_class_loaded_from_an_exported_state_dict_says_how_to_give_its_dropouts_their_rates():
    """The rates are not weights (the state_dict keeps your model's keys): a fresh model loaded from it runs
    in eval mode, and in train mode names the fix; the exported copy shows its rates."""
    plain = st.export(_trained("delta"))
    assert "fixed=" in repr(plain.drop) and "fixed=" in repr(plain.edrop)
    mine = Small()
    mine.load_state_dict(plain.state_dict())
    mine.eval()
    assert torch.allclose(mine(_batch()), plain.eval()(_batch()))
    mine.train()
    with pytest.raises(RuntimeError, match=r"module.fixed = p \(result.hparams\['(p|pe)'\]\)"):
        mine(_batch())
    mine.drop.fixed, mine.edrop.fixed = plain.drop.fixed, plain.edrop.fixed
    assert mine(_batch()).shape == (8, 4)


def test_export_refuses_what_is_not_a_hypernet():
    with pytest.raises(TypeError, match="export takes the HyperNet"):
        st.export(nn.Linear(2, 2))


class TiedLM(nn.Module):
    """A language model whose decoder shares its embedding's matrix (weight tying)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.drop = st.Dropout("d")
        self.dec = nn.Linear(16, 20)
        self.dec.weight = self.emb.weight

    def forward(self, x):
        return self.dec(self.drop(self.emb(x)))


@pytest.mark.parametrize("method", ["fixed", "delta-stn"])
def test_tied_weights_stay_tied_through_hypernetize_training_and_export(method):
    torch.manual_seed(0)
    model = TiedLM()
    count = sum(p.numel() for p in model.parameters())
    net = st.hypernetize(model, st.Space([st.Float("d", 0.0, 0.9, 0.2)]))
    assert net.model.dec.weight is net.model.emb.weight
    assert sum(p.numel() for p in net.general_parameters()) == count  # one matrix, not two
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 20, (240,), generator=g)
    y = (x + 1) % 20
    tuner = st.SelfTuner(net, (x[:160], y[:160]), (x[160:], y[160:]), method=method,
                         settings=st.TunerSettings(batch_size=16, lr=0.1, warmup_epochs=0), seed=0)
    tuner.fit(2)
    assert net.model.dec.weight is net.model.emb.weight
    plain = st.export(net)
    assert plain.dec.weight is plain.emb.weight
    net.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.allclose(plain(x[160:]), net(x[160:]), atol=1e-6)


def test_an_stn_export_that_cannot_keep_a_tie_says_so():
    """In the STN form the embedding and the decoder each add their own response at the tuned values, so the
    copy holds two matrices; loaded into the user's tied class, one overwrote the other silently (found by a
    fuzz round). The copy equals the tuned net, and export warns."""
    from selftune.errors import SelftuneWarning

    torch.manual_seed(0)
    net = st.hypernetize(TiedLM(), st.Space([st.Float("d", 0.0, 0.9, 0.2)]), form="stn")
    x = torch.randint(0, 20, (240,), generator=torch.Generator().manual_seed(0))
    st.SelfTuner(net, (x[:160], (x[:160] + 1) % 20), (x[160:], (x[160:] + 1) % 20), method="stn",
                 settings=st.TunerSettings(batch_size=16, lr=0.1)).fit(1)
    with pytest.warns(SelftuneWarning, match=r"export: emb.weight and dec.weight are tied in the model, but in the STN "
                                             r"form .* tune with form='delta', whose export keeps the tie"):
        plain = st.export(net)
    net.eval()
    with torch.no_grad():
        assert torch.allclose(plain.eval()(x[160:]), net(x[160:]), atol=1e-5)


def test_the_exported_copy_of_a_keyword_input_model_scores_as_the_tuned_one():
    """Dict examples with a list input_key reach the model as keyword arguments: score() passed them to the
    exported plain module as one positional argument (only the HyperNet unpacked them)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 8, generator=g)
    y = (x @ torch.randn(8, 3, generator=g)).argmax(1)

    class Pairs(torch.utils.data.Dataset):
        def __init__(self, x, y):
            self.x, self.y = x, y

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"a": self.x[i, :4], "b": self.x[i, 4:], "label": self.y[i]}

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.la, self.lb, self.drop, self.out = nn.Linear(4, 8), nn.Linear(4, 8), st.Dropout("d"), nn.Linear(16, 3)

        def forward(self, a, b):
            return self.out(self.drop(torch.cat([self.la(a), self.lb(b)], -1).relu()))

    torch.manual_seed(0)
    net = st.hypernetize(TwoInputs(), st.Space([st.Float("d", 0.0, 0.9, 0.2)]))
    val = Pairs(x[80:], y[80:])
    st.SelfTuner(net, Pairs(x[:80], y[:80]), val, method="delta-stn", input_key=["a", "b"], target_key="label",
                 settings=st.TunerSettings(lr=0.05, batch_size=16), seed=0).fit(1)
    keys = {"input_key": ["a", "b"], "target_key": "label"}
    assert st.score(st.export(net), val, **keys) == pytest.approx(st.score(net, val, **keys))


def test_an_exported_sequence_first_models_dropouts_draw_per_sequence_as_the_tuned_ones():
    """Exported with fixed rates, a sequence-first model's locked dropout drew one mask per time step shared
    by every sequence, and its word dropout a new draw of word types per time step: the batch was read
    from dimension 0 (found by a fuzz round). The copy now keeps the HyperNet's batch_dim."""
    from torch import nn

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.words = nn.Embedding(30, 6), st.EmbeddingDropout("pe", 30)
            self.drop, self.out = st.Dropout("p", locked=True), nn.Linear(6, 3)

        def forward(self, x):
            return self.out(self.drop(self.words(x, self.emb(x))))

    torch.manual_seed(0)
    space = st.Space([st.Float("p", 0.0, 0.9, 0.5), st.Float("pe", 0.0, 0.9, 0.5)])
    plain = st.export(st.hypernetize(LM(), space, batch_dim=1))
    assert plain.drop.batch_dim == 1 and plain.words.batch_dim == 1
    plain.train()
    masks = plain.drop(torch.ones(7, 40, 6))  # (T, B, H)
    assert torch.equal(masks, masks[:1].expand_as(masks)), "one mask per sequence, shared over its steps"
    assert not torch.equal(masks, masks[:, :1].expand_as(masks)), "sequences draw their own masks"
    words = plain.words(torch.full((7, 40), 3), torch.ones(7, 40, 6))  # one word at every step
    assert torch.equal(words, words[:1].expand_as(words)), "a word is kept or dropped for a whole sequence"
    assert 0 < int((words[0, :, 0] == 0).sum()) < 40


@pytest.mark.parametrize("form", ["stn", "delta"])
def test_a_block_shared_by_several_positions_is_converted_and_exported_at_every_one(form):
    """A module registered under several names (``nn.ModuleList([block] * 3)``, ALBERT's sharing) was converted
    at its first name only: two of its three applications never responded, and an STN export loaded into the
    user's class differed from the tuned net (found by a fuzz round)."""
    from torch import nn

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            block = nn.Linear(16, 16)
            self.layers, self.drop, self.fc = nn.ModuleList([block] * 3), st.Dropout("p"), nn.Linear(16, 3)

        def forward(self, x):
            for layer in self.layers:
                x = torch.tanh(layer(x))
            return self.fc(self.drop(x))

    torch.manual_seed(0)
    x = torch.randn(200, 16)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    net = st.hypernetize(Shared(), st.Space([st.Float("p", 0.0, 0.9, init=0.3)]), form=form)
    layers = net.model.layers
    assert layers[0] is layers[1] is layers[2] and type(layers[0]).__name__ == "BestResponseLinear"
    assert "also registered as layers.1, layers.2" in net.summary()
    st.SelfTuner(net, (x[:150], y[:150]), (x[150:], y[150:]), method="stn" if form == "stn" else "delta-stn",
                 settings=st.TunerSettings(lr=0.05, batch_size=32)).fit(2)
    plain = st.export(net).eval()
    net.eval()
    assert plain.layers[0] is plain.layers[2] and type(plain.layers[0]) is nn.Linear
    mine = Shared()
    mine.load_state_dict(plain.state_dict())
    assert torch.allclose(mine.eval()(x), net(x), atol=1e-5)
    with pytest.raises(TypeError, match=r"model.0.out_proj: its MultiheadAttention reads its weight directly.*name "
                                        r"the attention \('0'\) in modules= instead"):
        st.hypernetize(nn.Sequential(nn.MultiheadAttention(8, 2)), st.Space([st.Float("p", 0.0, 0.9, init=0.3)]),
                       modules=["0.out_proj"])


def test_a_model_that_keeps_an_activation_exports_after_a_forward_with_gradients():
    """A model that keeps its last activation (``self.features = h``) holds a tensor of the autograd graph
    after a forward pass with gradients on (``net(x)`` outside ``torch.no_grad``): export copies it detached,
    as the tuner's own copies do, instead of PyTorch's deepcopy error (found by fuzz round 44)."""

    class Caching(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.drop, self.fc2 = nn.Linear(6, 16), st.Dropout("d1"), nn.Linear(16, 3)
            self.features = None

        def forward(self, x):
            h = torch.relu(self.fc1(x))
            self.features = h
            return self.fc2(self.drop(h))

    torch.manual_seed(0)
    net = st.hypernetize(Caching(), st.Space([st.Float("d1", 0.0, 0.9, init=0.3)]))
    x = torch.randn(4, 6)
    net.eval()
    expected = net(x)  # with gradients: the model now holds a non-leaf tensor
    assert net.model.features.grad_fn is not None
    plain = st.export(net)
    assert plain.features is not None and plain.features.grad_fn is None
    plain.eval()
    assert torch.allclose(plain(x), expected.detach(), atol=1e-6)

"""Sequence models: best-response LSTM and embedding, sequence dropouts, PTB, token-level losses."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import selftune as st
from selftune.data import load_dataset
from selftune.models import LSTMLanguageModel, build
from selftune.nn import BestResponseEmbedding, BestResponseLSTM, dropout
from selftune.objective import Objective


class Tagger(nn.Module):
    def __init__(self, vocab=50, dim=8, hidden=12):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, ids):
        return self.out(self.lstm(self.emb(ids))[0])


def space():
    return st.Space([st.Float("p", 0.0, 0.9, init=0.3), st.Float("q", 0.0, 0.9, init=0.5)])


def test_hypernetize_converts_embedding_and_lstm_keeping_the_function():
    plain = Tagger()
    ids = torch.randint(0, 50, (4, 7))
    for form in ("delta", "stn"):
        net = st.hypernetize(copy.deepcopy(plain), space(), form=form)
        assert isinstance(net.model.emb, BestResponseEmbedding) and isinstance(net.model.lstm, BestResponseLSTM)
        with torch.no_grad():
            for layer in net.best_response_layers():
                layer.gate.zero_()
        u = net.hparams.detach().expand(4, -1) + torch.randn(4, 2)  # any hyperparameters: gates are zero
        assert torch.allclose(net(ids, u), plain(ids), atol=1e-5), form


def test_lstm_response_path_moves_the_output_per_example_and_trains():
    plain = Tagger()
    net = st.hypernetize(copy.deepcopy(plain), space(), form="delta")
    with torch.no_grad():
        for layer in net.best_response_layers():
            layer.gate.normal_(std=0.5)
    ids = torch.randint(0, 50, (4, 7))
    centre = net.hparams.detach().expand(4, -1).clone()
    assert torch.allclose(net(ids, centre), plain(ids), atol=1e-5)  # Delta-STN: plain LSTM at lambda
    u = centre.clone()
    u[0] += 1.0  # only example 0 moves away from lambda
    out = net(ids, u)
    assert not torch.allclose(out[0], plain(ids)[0], atol=1e-4)
    assert torch.allclose(out[1:], plain(ids)[1:], atol=1e-5)
    out.sum().backward()
    lstm = net.model.lstm
    assert lstm.response_weight_hh.grad is not None and lstm.response_weight_hh.grad.abs().sum() > 0
    assert lstm.gate.grad is not None and lstm.gate.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("layers, bidirectional, batch_first", [(1, False, False), (2, True, True), (3, False, True)])
def test_converted_recurrent_layers_compute_the_plain_module_fused_and_unrolled(kind, layers, bidirectional,
                                                                               batch_first):
    """At Delta-STN's own hyperparameters the converted module is the user's module (fused kernel), and
    the Python unrolling (the path a response takes) computes the same thing."""
    torch.manual_seed(0)
    plain = kind(5, 6, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
    net = st.hypernetize(nn.Sequential(plain), space())
    layer = net.model[0]
    x = torch.randn(3, 9, 5) if batch_first else torch.randn(9, 3, 5)
    want, want_state = plain(x)
    got, _ = layer(x)
    assert torch.allclose(got, want, atol=1e-6)
    seq = x if batch_first else x.transpose(0, 1)
    zeros = torch.zeros(layers * (2 if bidirectional else 1), 3, 6)
    unrolled, state = layer._unrolled(seq, (zeros, zeros) if kind is nn.LSTM else zeros, None)
    assert torch.allclose(unrolled if batch_first else unrolled.transpose(0, 1), want, atol=1e-5)
    want_h = want_state[0] if kind is nn.LSTM else want_state
    assert torch.allclose(state[0], want_h, atol=1e-5)


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
def test_recurrent_dropout_between_layers_is_kept_untuned(kind):
    """``nn.LSTM(num_layers=2, dropout=0.3)`` was refused, with a reason (a resumed run would differ) that no
    longer held once runs seeded and checkpointed PyTorch's global generator (fuzz round 44). It is kept as
    it is, untuned, as an attention's own dropout: the converted layer computes the module in evaluation,
    drops between its layers (not after the last) in training, on the fused and the unrolled path, and
    exports with it."""
    torch.manual_seed(0)
    plain = kind(3, 5, num_layers=2, dropout=0.5, batch_first=True)
    reference = copy.deepcopy(plain)
    net = st.hypernetize(nn.Sequential(plain), space())
    layer = net.model[0]
    assert "0" in net.converted and layer.dropout == 0.5
    x = torch.randn(4, 6, 3)
    net.eval()
    reference.eval()
    assert torch.allclose(net(x)[0], reference(x)[0], atol=1e-5)
    layer.train()
    zeros = torch.zeros(2, 4, 5)
    hx = (zeros, zeros) if kind is nn.LSTM else zeros
    torch.manual_seed(1)
    dropped, _ = layer._unrolled(x, hx, None)
    torch.manual_seed(1)
    again, _ = layer._unrolled(x, hx, None)
    layer.dropout = 0.0
    undropped, _ = layer._unrolled(x, hx, None)
    assert torch.equal(dropped, again) and not torch.allclose(dropped, undropped)
    layer.dropout = 0.5
    torch.manual_seed(1)
    assert not torch.allclose(layer(x)[0], reference.train()(x)[0])  # the fused path drops too (its own masks)
    assert st.export(net)[0].dropout == 0.5


def test_variants_without_a_response_are_left_plain():
    """An Embedding with max_norm/sparse, a reflect-padded convolution or an LSTM with a projection stopped
    hypernetize for the whole model with a message naming no layer (found by a fuzz round): with every
    layer converted they are now left plain, with the reason in the summary; named in modules=, refused
    naming the layer."""
    model = nn.Sequential(nn.Embedding(10, 3, max_norm=1.0), nn.Conv1d(3, 3, 3, padding=1, padding_mode="reflect"),
                          nn.LSTM(3, 4, proj_size=2), nn.Linear(2, 2))
    net = st.hypernetize(model, space())
    assert net.converted == {"3": "Linear"}
    assert net.left_plain == {"0": "max_norm or sparse gradients have no best-response form",
                              "1": "padding_mode='reflect' has no best-response form (only 'zeros')",
                              "2": "proj_size has no best-response form"}
    with pytest.raises(TypeError, match=r"model.1: LSTM with proj_size .*; leave it out of modules= to keep it plain"):
        st.hypernetize(nn.Sequential(nn.Linear(3, 3), nn.LSTM(3, 4, proj_size=2)), space(), modules=["0", "1"])


def test_locked_dropout_shares_the_mask_across_time():
    x = torch.ones(64, 10, 16)
    y = dropout(x, torch.full((64,), 0.5), locked=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(y[:, :1].expand_as(y), y)
    assert abs(float((y == 0).float().mean()) - 0.5) < 0.05


def test_embedding_dropout_drops_word_types_per_example():
    model = LSTMLanguageModel(30, embed=6, hidden=6, layers=1, dropout=["p", None, None, None])
    net = st.hypernetize(model, st.Space([st.Float("p", 0.0, 0.9, init=0.5)]))
    ids = torch.randint(0, 30, (200, 12))
    with torch.no_grad():
        embedded = net.model.embedding(ids)
        with net._state.bind(torch.full((200, 1), 0.5), None, torch.Generator().manual_seed(0)):
            dropped = net.model.drop_embedding(ids, embedded)
    zero = (dropped == 0).all(-1)
    for b in range(200):  # a word type is dropped everywhere in its example or nowhere
        for w in ids[b].unique():
            assert zero[b][ids[b] == w].all() or not zero[b][ids[b] == w].any()
    assert 0.4 < float(zero.float().mean()) < 0.6
    net.eval()
    assert torch.equal(net.model.drop_embedding(ids, embedded), embedded)


def test_sequence_losses_average_over_tokens():
    logits, target = torch.randn(3, 5, 7), torch.randint(0, 7, (3, 5))
    flat = F.cross_entropy(logits.reshape(15, 7), target.reshape(15))
    objective = Objective(label_smoothing="s")
    assert torch.allclose(Objective().eval_loss(logits, target), flat)
    zero = objective.train_loss(logits, target, lambda name: torch.zeros(3), [])
    assert torch.allclose(zero, flat)
    smooth = objective.train_loss(logits, target, lambda name: torch.full((3,), 0.2), [])
    expected = F.cross_entropy(logits.reshape(15, 7), target.reshape(15), label_smoothing=0.2)
    assert torch.allclose(smooth, expected, atol=1e-6)


def test_each_token_is_smoothed_at_its_own_examples_rate_in_either_layout():
    """A sequence-first model's ``(T, B, C)`` outputs were smoothed as if batch-first: a raw size error
    where T != B, and where T == B each example's rate went to the tokens of one time step (found by a
    fuzz round)."""
    torch.manual_seed(0)
    rates = torch.tensor([0.0, 0.0, 0.0, 0.5])
    objective = Objective(label_smoothing="s")
    for steps in (4, 6):  # T == B, and T != B
        logits, target = torch.randn(steps, 4, 7), torch.randint(0, 7, (steps, 4))
        expected = torch.stack([F.cross_entropy(logits[:, b], target[:, b], label_smoothing=float(rates[b]))
                                for b in range(4)]).mean()
        got = objective.train_loss(logits, target, lambda name: rates, [], batch_dim=1)
        assert torch.allclose(got, expected, atol=1e-6), (steps, got, expected)
        first = objective.train_loss(logits.transpose(0, 1), target.transpose(0, 1), lambda name: rates, [])
        assert torch.allclose(first, expected, atol=1e-6)
    # and through a run: a sequence-first GRU language model with a tuned smoothing rate trains
    ids = torch.randint(0, 12, (64, 5))

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.rnn, self.dec = nn.Embedding(12, 8), nn.GRU(8, 16), nn.Linear(16, 12)

        def forward(self, x):
            return self.dec(self.rnn(self.emb(x))[0])

    net = st.hypernetize(LM(), st.Space([st.Float("ls", 0.0, 0.5, init=0.1)]), batch_dim=1)
    fit = st.SelfTuner(net, (ids[:48], ids.roll(-1, 1)[:48]), (ids[48:], ids.roll(-1, 1)[48:]), method="delta-stn",
                       objective=Objective(label_smoothing="ls"),
                       settings=st.TunerSettings(lr=0.1, batch_size=8)).fit(2)
    assert math.isfinite(fit.history[-1]["val_loss"]) and fit.hparams["ls"] != 0.1


def test_ptb_ships_offline_with_the_official_token_counts():
    splits = load_dataset("ptb", seq_len=35)
    assert splits.kind == "language-model" and splits.num_classes == 10000 and splits.input_shape == (35,)
    assert len(splits.train) == (929_589 - 1) // 35
    assert len(splits.val) == (73_760 - 1) // 35 and len(splits.test) == (82_430 - 1) // 35
    x, y = splits.train.tensors
    assert torch.equal(x[0, 1:], y[0, :-1]) and torch.equal(x[1, 0], y[0, -1])  # targets are the next tokens
    model = build("lstm_lm", input_shape=splits.input_shape, num_classes=splits.num_classes, embed=8, hidden=8)
    assert model(x[:2]).shape == (2, 35, 10000)


def test_lstm_language_model_learns_under_delta_stn():
    """A tiny LM on PTB: the perplexity after a short self-tuning run is far below the vocabulary size."""
    splits = load_dataset("ptb", seq_len=20, train_subset=600, test_subset=100)
    sp = st.Space([st.Float(n, 0.0, 0.8, init=0.1) for n in ("de", "di", "dh", "do")])
    model = LSTMLanguageModel(splits.num_classes, embed=32, hidden=32, dropout=["de", "di", "dh", "do"])
    net = st.hypernetize(model, sp, form="delta", init_scale=1.0)
    val = torch.utils.data.TensorDataset(*(t[:200] for t in splits.val.tensors))
    tuner = st.SelfTuner(net, splits.train, val, method="delta-stn", seed=0,
                         settings=st.TunerSettings(batch_size=20, lr=20.0, momentum=0.0, grad_clip=0.25,
                                                   warmup_epochs=1, response_fraction=0.25))
    result = tuner.fit(epochs=2)
    loss, _ = st.evaluate(net, splits.test)
    assert math.exp(loss) < 1500 and result.compute["hyper_steps"] > 0
    assert all(0.0 <= v <= 0.8 for v in result.hparams.values())


def test_text_data_and_language_model_must_go_together(tmp_path, monkeypatch, capsys):
    from selftune.cli import main

    monkeypatch.chdir(tmp_path)
    task = "selftune/bench/tasks/ptb-lstm.toml"
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    assert main(["run", str(root / task), "--set", "model.name=mlp", "--set", "model.hidden=[8]"]) == 2
    assert "model.name" in capsys.readouterr().err
    assert main(["run", str(root / "examples/digits_mlp.toml"), "--set", "model.name=lstm_lm",
                 "--set", 'model.dropout=["dropout_in", "dropout1", "dropout2", "dropout2"]']) == 2
    assert "token sequences" in capsys.readouterr().err
    assert main(["run", str(root / task), "--set", "device=cuda"]) == 2 or torch.cuda.is_available()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("layers, bidirectional, enforce_sorted",
                         [(1, False, False), (2, True, False), (2, True, True)])
def test_a_packed_sequence_runs_through_a_converted_rnn_as_through_the_plain_one(kind, layers, bidirectional,
                                                                              enforce_sorted):
    """A PackedSequence into a converted LSTM/GRU was a DataError (stop 30): models that pack variable-length
    batches had to leave their RNN plain. Now, with and without a response: the plain module's outputs and
    final states (each sequence's last valid step, the reverse direction starting there), and a perturbation
    of one example moves that example only."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    class Packed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = kind(5, 6, num_layers=layers, bidirectional=bidirectional, batch_first=True)

        def forward(self, x):
            lengths = (x.abs().sum(-1) > 0).sum(1).clamp(min=1)
            out, state = self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=enforce_sorted))
            padded, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
            h = state[0] if isinstance(state, tuple) else state
            return torch.cat([padded.flatten(1), h.transpose(0, 1).flatten(1)], 1)

    torch.manual_seed(0)
    plain = Packed()
    lengths = torch.tensor([9, 7, 3, 1]) if enforce_sorted else torch.tensor([7, 3, 9, 1])
    x = torch.randn(4, 9, 5) * (torch.arange(9)[None, :, None] < lengths[:, None, None])
    net = st.hypernetize(copy.deepcopy(plain), st.Space([st.Float("p", 0.0, 0.9, 0.3), st.Float("q", 0.0, 0.9, 0.5)]))
    want = plain(x)
    torch.testing.assert_close(net(x), want)  # PyTorch's packed kernel
    gates = [p for n, p in net.model.rnn.named_parameters() if n.startswith("gate")]
    with torch.no_grad():
        for g in gates:
            g.zero_()
    moved = net.hparams.detach().expand(4, -1) + torch.randn(4, 2)
    torch.testing.assert_close(net(x, moved), want, atol=1e-5, rtol=1e-5)  # unrolled, responses gated off
    with torch.no_grad():
        for g in gates:
            g.normal_(std=0.5)
    centre = net.hparams.detach().expand(4, -1).clone()
    one = centre.clone()
    one[1] += 1.0
    out = net(x, one)
    torch.testing.assert_close(net(x, centre), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[1], want[1], atol=1e-4)
    torch.testing.assert_close(out[[0, 2, 3]], want[[0, 2, 3]], atol=1e-5, rtol=1e-5)


def test_a_model_that_packs_its_batches_tunes_its_dropout_under_every_single_run_method():
    from torch.nn.utils.rnn import pack_padded_sequence

    class Packed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.drop, self.head = nn.GRU(3, 8, batch_first=True), st.Dropout("d"), nn.Linear(8, 2)

        def forward(self, x):
            lengths = (x.abs().sum(-1) > 0).sum(1).clamp(min=1)
            _, h = self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
            return self.head(self.drop(h[-1]))

    torch.manual_seed(0)
    lengths = torch.randint(1, 6, (40,))
    x = torch.randn(40, 5, 3) * (torch.arange(5)[None, :, None] < lengths[:, None, None])
    y = (x.sum((1, 2)) > 0).long()
    for method in ("delta-stn", "stn", "delta-ift"):
        net = st.hypernetize(Packed(), st.Space([st.Float("d", 0.0, 0.8, 0.2)]),
                             form="stn" if method == "stn" else "delta")
        fit = st.SelfTuner(net, (x[:30], y[:30]), (x[30:], y[30:]), method=method,
                           settings=st.TunerSettings(batch_size=10, lr=0.05)).fit(3)
        assert math.isfinite(fit.history[-1]["val_loss"]) and fit.hparams["d"] != 0.2, method


def test_a_padding_token_embeds_to_zero_at_every_value_and_after_export():
    """The response matrix's padding row was random and never trained (F.embedding gives it no gradient), so
    a padding token embedded to g(c) * R[pad], not 0, and export's nn.Embedding(padding_idx=0) had a
    non-zero padding row (found by a fuzz round)."""
    torch.manual_seed(0)
    for form in ("delta", "stn"):
        net = st.hypernetize(nn.Sequential(nn.Embedding(10, 4, padding_idx=0)), space(), form=form)
        layer = net.model[0]
        assert torch.equal(layer.response_weight[0], torch.zeros(4))
        with torch.no_grad():
            layer.gate.normal_()  # responses switched on
        ids = torch.tensor([[0, 3, 0], [0, 0, 5]])
        u = net.hparams.expand(2, -1) + torch.randn(2, net.hparams.numel())
        out = net(ids, u)
        assert torch.equal(out[ids == 0], torch.zeros(int((ids == 0).sum()), 4)), form
        plain = st.export(net)
        assert torch.equal(plain[0].weight[0], torch.zeros(4)), form

"""Weight decay per layer: ``objective.weight_decay`` as a table from layer patterns to decays. Each
decay penalises only the weights of the layers its pattern names (effective weights of best-response
layers included), a pattern that names no layer is refused with the layers listed, and the decays of
different layers are tuned apart in one run."""

import pytest
import torch
import torch.nn.functional as F

import selftune as st
from selftune.errors import ConfigError
from selftune.objective import Objective, matches
from selftune.testing import digits_tuner

DECAYS = ('space.wd_first={low=1e-6, high=0.1, init=1e-4, log=true}',
          'space.wd_rest={low=1e-6, high=0.1, init=1e-4, log=true}')


def test_a_pattern_names_a_layer_or_a_block_that_holds_it():
    assert matches("encoder", "encoder.0.conv") and matches("encoder.0", "encoder.0.conv")
    assert matches("fc*", "fc2") and matches("*", "head")
    assert not matches("fc", "fc2") and not matches("encoder", "decoder.0")
    objective = Objective(weight_decay={"fc1": "a", "fc*": "b"})
    assert [objective.decay_group(m) for m in ("fc1", "fc2", "head")] == [0, 1, None]  # the first match wins
    assert Objective(weight_decay="wd").decay_group("anything") == 0
    assert Objective(weight_decay={"fc1": "a", "*": 0.1}).hyperparameters() == {"a"}


def _net():
    torch.manual_seed(0)
    space = st.Space([st.Float("wd_first", 1e-6, 1e-1, init=1e-3, log=True),
                      st.Float("wd_rest", 1e-6, 1e-1, init=1e-2, log=True)])
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 3))
    return st.hypernetize(model, space)


def test_each_decay_penalises_the_weights_of_its_own_layers():
    net = _net()
    weights = [p for p in net.general_parameters() if p.dim() > 1]
    objective = Objective(weight_decay={"0": "wd_first", "2": 0.5})  # layer 4 is named by no pattern
    groups = objective.weight_groups(net.model, weights)
    w0, w2, w4 = (net.model[i].weight for i in (0, 2, 4))
    assert [[id(p) for p in g] for g in groups] == [[id(w0)], [id(w2)]]
    logits, target = torch.randn(5, 3), torch.randint(0, 3, (5,))
    lookup = {"wd_first": torch.full((5,), 0.2)}.__getitem__
    loss = objective.train_loss(logits, target, lookup, groups)
    expected = F.cross_entropy(logits, target) + 0.5 * 0.2 * (w0 * w0).sum() + 0.5 * 0.5 * (w2 * w2).sum()
    assert torch.allclose(loss, expected)
    grad = torch.autograd.grad(loss, [w4], allow_unused=True)[0]
    assert grad is None  # the undecayed layer does not appear in the penalty


def test_the_per_layer_norms_split_the_effective_norm_of_every_example():
    net = _net()
    for layer in net.best_response_layers():
        torch.nn.init.normal_(layer.gate)
    weights = [p for p in net.general_parameters() if p.dim() > 1]
    groups = Objective(weight_decay={"0": "wd_first", "*": "wd_rest"}).weight_groups(net.model, weights)
    u, x = net.perturb(7), torch.randn(7, 6)
    with net.recording_norms() as total:
        net(x, u)
    with net.recording_norms(groups) as split:
        net(x, u)
    per_group = split()
    assert per_group.shape == (2, 7)
    assert torch.allclose(per_group.sum(0), total(), rtol=1e-5)
    assert not torch.allclose(per_group[0], per_group[0].mean().expand(7))  # per example: the response is in it


def test_a_pattern_that_names_no_layer_is_refused_with_the_layers_listed():
    with pytest.raises(ConfigError, match=r'objective\.weight_decay\["layers\.0"\]: names no layer.*\'net\.2\''):
        digits_tuner(*DECAYS, 'objective.weight_decay={"layers.0"="wd_first", "*"="wd_rest"}')
    with pytest.raises(ConfigError, match=r'weight_decay\["net\.2"\]: every layer it names is taken'):
        digits_tuner(*DECAYS, 'objective.weight_decay={"*"="wd_rest", "net.2"="wd_first"}')
    with pytest.raises(ConfigError, match=r"objective\.weight_decay: an empty table decays nothing"):
        digits_tuner(*DECAYS, "objective.weight_decay={}")
    with pytest.raises(ConfigError, match=r'objective\.weight_decay\["net\.2"\]: must be'):
        Objective(weight_decay={"net.2": [0.1]})


def test_a_pattern_that_names_a_frozen_block_says_it_is_frozen_not_missing():
    """It read "names no layer with weights; the model's are 'head.1'": a typo hunt for a layer that exists."""
    backbone = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU())
    backbone.requires_grad_(False)
    model = torch.nn.Sequential()
    model.add_module("backbone", backbone)
    model.add_module("head", torch.nn.Sequential(st.Dropout("d"), torch.nn.Linear(32, 2)))
    space = st.Space([st.Float("d", 0.0, 0.9, 0.3), st.Float("wd_bb", 1e-6, 0.1, 1e-4, log=True),
                      st.Float("wd", 1e-6, 0.1, 1e-4, log=True)])
    x, y = torch.randn(100, 8), torch.randint(0, 2, (100,))
    with pytest.raises(ConfigError, match=r"""weight_decay\["backbone"\]: names only frozen layers \('backbone\.0'"""
                                          r""": requires_grad=False\).*remove the pattern, or unfreeze"""):
        st.SelfTuner(st.hypernetize(model, space), (x[:60], y[:60]), (x[60:], y[60:]),
                     objective=st.Objective(weight_decay={"backbone": "wd_bb", "*": "wd"}),
                     settings=st.TunerSettings(batch_size=16))


@pytest.mark.parametrize("method", ["delta-stn", "ift"])
def test_the_decays_of_two_layer_groups_are_tuned_apart(method):
    tuner = digits_tuner(*DECAYS, 'objective.weight_decay={"net.2"="wd_first", "*"="wd_rest"}', method=method)
    result = tuner.fit(4)
    seen = dict(zip(tuner.net.space.names, tuner.log.hypergrad_seen, strict=True))
    assert seen["wd_first"] and seen["wd_rest"]  # both reach the validation loss
    assert all(result.hparams[k] != pytest.approx(1e-4, rel=1e-3) for k in ("wd_first", "wd_rest"))
    # each has its own hypergradient (a shared decay would have one); Adam's steps of ift can still move
    # two same-signed ones alike, so the gradient itself is compared
    names = tuner.net.space.names
    first, rest = names.index("wd_first"), names.index("wd_rest")
    if method == "ift":
        x, y = tuner._batch("val", tuner.order.next_val(tuner.generator))
        tuner.algorithm.hypergradient(tuner, x, y)
        grad = tuner.net.hparams.grad
        assert float(grad[first]) != pytest.approx(float(grad[rest]), rel=0.05)
    else:
        assert any(row["wd_first"] != pytest.approx(row["wd_rest"], rel=0.05) for row in result.trajectory)


def test_the_shipped_per_layer_example_gives_each_layer_its_own_decay():
    from pathlib import Path

    from selftune.config import load_config
    from selftune.runner import prepare

    config = load_config(Path(__file__).resolve().parents[1] / "examples" / "own_task_layers.toml", ["epochs=3"])
    tuner = prepare(config).tuner
    model = tuner.net.model
    assert [[id(p) for p in g] for g in tuner._decayed] == [[id(model[i].weight)] for i in (1, 4, 7)]
    tuner.fit(3)
    seen = dict(zip(tuner.net.space.names, tuner.log.hypergrad_seen, strict=True))
    assert seen["wd_first"] and seen["wd_hidden"] and seen["wd_out"]


def test_a_pattern_naming_a_tied_decoder_says_whose_decay_its_matrix_takes():
    """``dec.weight = emb.weight`` with a decay pattern for "dec" said it "names no layer with weights": the
    matrix is held by the embedding first, whose pattern decays it (found by a fuzz round)."""
    from torch import nn

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.mid, self.dec = nn.Embedding(20, 8), nn.Linear(8, 8), nn.Linear(8, 20)
            self.dec.weight = self.emb.weight

        def forward(self, x):
            return self.dec(torch.tanh(self.mid(self.emb(x))))

    space = st.Space([st.Float("wd", 1e-6, 1e-1, 1e-4, log=True), st.Float("wd_dec", 1e-6, 1e-1, 1e-4, log=True)])
    x = torch.randint(0, 20, (64,))
    with pytest.raises(ConfigError, match=r"objective.weight_decay\[\"dec\"\]: names only layers whose weights are "
                                          r"tied to 'emb', which holds them first: .* set it on 'emb'"):
        st.SelfTuner(st.hypernetize(LM(), space), (x[:48], x[:48]), (x[48:], x[48:]),
                     objective=st.Objective(weight_decay={"dec": "wd_dec", "*": "wd"}),
                     settings=st.TunerSettings(batch_size=16))


def test_a_parametrized_layers_own_tensors_take_no_decay():
    """The decay penalised an orthogonal layer's raw matrix, which PyTorch's map then sent to a zero weight
    after one step (validation accuracy at chance, fuzz round 44): a parametrized layer's tensors are not its
    weight, and take no decay."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    torch.nn.utils.parametrizations.orthogonal(model[2])
    space = st.Space([st.Float("wd", 1e-6, 1e-1, init=1e-2, log=True)])
    x, y = torch.randn(96, 6), torch.randint(0, 3, (96,))
    tuner = st.SelfTuner(st.hypernetize(model, space), (x, y), (x, y), method="delta-stn",
                         objective=st.Objective(weight_decay="wd"), settings=st.TunerSettings(batch_size=32, lr=0.1))
    decayed = {id(p) for group in tuner._decayed for p in group}
    assert id(model[0].weight) in decayed
    assert not decayed & {id(p) for p in model[2].parametrizations.parameters()}
    tuner.fit(2)
    weight = model[2].weight.detach()
    assert torch.allclose(weight @ weight.T, torch.eye(3), atol=1e-5)


def test_a_decay_pattern_that_names_only_a_parametrized_layer_says_so():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6, bias=False), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    torch.nn.utils.parametrizations.orthogonal(model[0])
    space = st.Space([st.Float("wd", 1e-6, 1e-1, init=1e-2, log=True)])
    net = st.hypernetize(model, space)
    assert "Orthogonal" in net.left_plain["0"]  # (with no bias, it holds no parameter of its own)
    x, y = torch.randn(48, 6), torch.randint(0, 3, (48,))
    with pytest.raises(ConfigError, match=r'^objective\.weight_decay\["0"\]: names only layers with a parametrization '
                                          r"\('0': torch\.nn\.utils\.parametrizations\), whose tensors are not the "
                                          r"weight they apply"):
        st.SelfTuner(net, (x, y), (x, y), method="fixed", objective=st.Objective(weight_decay={"0": "wd", "2": "wd"}),
                     settings=st.TunerSettings(batch_size=16))

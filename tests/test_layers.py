import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import selftune as st
from selftune.nn import BestResponseConv2d, BestResponseLinear


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def space():
    return st.Space([st.Float("a", 0.0, 0.9, init=0.3), st.Int("k", 0, 5, init=2)])


def randomize_gates(net):
    with torch.no_grad():
        for layer in net.best_response_layers():
            layer.gate.normal_(std=0.5)


def test_hypernetize_swaps_layers_and_keeps_weights():
    plain = Small()
    net = st.hypernetize(copy.deepcopy(plain), space(), form="delta")
    assert isinstance(net.model.conv, BestResponseConv2d) and isinstance(net.model.fc, BestResponseLinear)
    assert torch.equal(net.model.fc.weight, plain.fc.weight) and torch.equal(net.model.conv.bias, plain.conv.bias)


def test_delta_layer_at_current_hyperparameters_equals_plain_layer():
    plain = Small()
    net = st.hypernetize(copy.deepcopy(plain), space(), form="delta")
    randomize_gates(net)  # even with trained gates, lam_tilde == lam must give the plain network
    x = torch.randn(8, 2, 6, 6)
    u = net.hparams.detach().expand(8, -1).clone()
    assert torch.allclose(net(x, u), plain(x), atol=1e-6)
    assert torch.allclose(net(x), plain(x), atol=1e-6)
    # ... and away from lam the response changes the output.
    assert not torch.allclose(net(x, u + 1.0), plain(x), atol=1e-4)


def test_stn_layer_with_zero_gates_equals_its_elementary_part():
    plain = Small()
    net = st.hypernetize(copy.deepcopy(plain), space(), form="stn")
    with torch.no_grad():
        for layer in net.best_response_layers():
            layer.gate.zero_()
            layer.scale.fill_(1.7)
    x = torch.randn(8, 2, 6, 6)
    u = torch.randn(8, 2)
    h = 1.7 * plain.conv(x)
    expected = 1.7 * plain.fc(torch.relu(h).flatten(1))
    assert torch.allclose(net(x, u), expected, atol=1e-5)


def test_gates_are_per_example():
    net = st.hypernetize(Small(), space(), form="stn")
    randomize_gates(net)
    x = torch.randn(1, 2, 6, 6).expand(4, -1, -1, -1)
    u = torch.tensor([[0.0, 0.0], [0.0, 0.0], [2.0, -1.0], [-2.0, 1.0]])
    out = net(x, u)
    assert torch.allclose(out[0], out[1])
    assert not torch.allclose(out[0], out[2], atol=1e-4) and not torch.allclose(out[2], out[3], atol=1e-4)


def test_linear_layer_handles_sequence_inputs():
    layer_space = space()
    net = st.hypernetize(nn.Sequential(nn.Linear(3, 4)), layer_space, form="stn")
    randomize_gates(net)
    out = net(torch.randn(5, 7, 3), torch.randn(5, 2))
    assert out.shape == (5, 7, 4)


def test_hypernetize_selected_modules_and_errors():
    net = st.hypernetize(Small(), space(), modules=["fc"])
    assert isinstance(net.model.conv, nn.Conv2d) and not isinstance(net.model.conv, BestResponseConv2d)
    try:
        st.hypernetize(Small(), space(), modules=["nope"])
    except LookupError as err:
        assert "nope" in str(err)
    else:
        raise AssertionError("expected LookupError")


def test_parameter_groups_partition_the_weights():
    net = st.hypernetize(Small(), space(), form="delta")
    general, response = net.general_parameters(), net.response_parameters()
    assert {id(p) for p in general}.isdisjoint({id(p) for p in response})
    assert len(general) + len(response) == len(list(net.model.parameters()))
    assert all(p is not net.hparams for p in general + response)


def test_linearized_response_is_first_order_exact_and_trains_the_response():
    net = st.hypernetize(Small(), space(), form="delta")
    randomize_gates(net)
    net.eval()
    x = torch.randn(4, 2, 6, 6)
    centre = net.hparams.detach().expand(4, -1)
    step = 1e-3 * torch.randn(4, 2)
    exact_change = net(x, centre + step) - net(x)
    linear_change = net.forward_linearized(x, centre + step) - net(x)
    assert (linear_change - exact_change).abs().max() < 1e-2 * exact_change.abs().max()
    net.forward_linearized(x, centre + 1.0).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.response_parameters())


class TwoHeads(nn.Module):
    """Logits and an auxiliary output, as a tuple or a dict (found by fuzz round 44: linearize crashed)."""

    def __init__(self, as_dict: bool) -> None:
        super().__init__()
        self.body, self.drop, self.head, self.aux = nn.Linear(6, 8), st.Dropout("d"), nn.Linear(8, 3), nn.Linear(8, 1)
        self.as_dict = as_dict

    def forward(self, x):
        h = self.drop(torch.relu(self.body(x)))
        return {"logits": self.head(h), "aux": self.aux(h)} if self.as_dict else (self.head(h), self.aux(h))


def test_a_model_with_several_outputs_is_linearized_output_by_output():
    for as_dict in (False, True):
        torch.manual_seed(0)
        net = st.hypernetize(TwoHeads(as_dict), st.Space([st.Float("d", 0.0, 0.9, init=0.3)]), form="delta")
        randomize_gates(net)
        net.eval()
        x, centre = torch.randn(5, 6), net.hparams.detach().expand(5, -1)
        step = 1e-3 * torch.randn(5, 1)
        exact, plain, linear = net(x, centre + step), net(x), net.forward_linearized(x, centre + step)
        keys = ("logits", "aux") if as_dict else (0, 1)
        for k in keys:
            change = exact[k] - plain[k]
            assert (linear[k] - plain[k] - change).abs().max() < 1e-2 * change.abs().max()


def test_linearize_refuses_outputs_it_cannot_reach_before_the_run():
    from dataclasses import dataclass

    from selftune.errors import ConfigError

    @dataclass
    class Out:
        logits: torch.Tensor

    class Wrapped(TwoHeads):
        def forward(self, x):
            return Out(super().forward(x)[0])

    torch.manual_seed(0)
    net = st.hypernetize(Wrapped(False), st.Space([st.Float("d", 0.0, 0.9, init=0.3)]), form="delta")
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    with pytest.raises(ConfigError, match=r"^tuner\.linearize: the model returns Out objects, whose tensors the "
                                          r"first-order response cannot reach"):
        st.SelfTuner(net, (x, y), (x, y), method="delta-stn", loss=lambda out, t: F.cross_entropy(out.logits, t),
                     settings=st.TunerSettings(linearize=True, batch_size=8))


def test_an_embedding_that_scales_its_gradient_by_frequency_keeps_doing_so():
    """``nn.Embedding(scale_grad_by_freq=True)`` lost the option when converted and exported: a token seen
    three times in a batch got three times the gradient (fuzz round 44)."""

    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.fc = nn.Embedding(10, 4, scale_grad_by_freq=True), nn.Linear(4, 3)

        def forward(self, t):
            return self.fc(self.emb(t).mean(1))

    torch.manual_seed(0)
    model = Bag()
    reference = copy.deepcopy(model)
    net = st.hypernetize(model, st.Space([st.Float("d", 0.0, 0.9, init=0.3)]))
    assert "emb" in net.converted
    tokens = torch.tensor([[1, 1, 1, 2]])
    reference(tokens).sum().backward()
    net(tokens).sum().backward()
    assert torch.allclose(net.model.emb.weight.grad, reference.emb.weight.grad)
    assert st.export(net).emb.scale_grad_by_freq

import pytest
import torch
import torch.nn.functional as F

import selftune as st
from selftune.augment import cutout, gaussian_noise, random_flip, random_shift
from selftune.nn import dropout
from selftune.objective import Objective, smoothed_cross_entropy


def test_per_example_dropout_rates_are_honoured():
    g = torch.Generator().manual_seed(0)
    rates = torch.tensor([0.0, 0.1, 0.5, 0.9])
    x = torch.ones(4, 200_000)
    out = dropout(x, rates, generator=g)
    dropped = (out == 0).float().mean(1)
    assert torch.allclose(dropped, rates, atol=0.005)
    # Kept units are rescaled so the expectation is unchanged.
    assert torch.allclose(out.mean(1), torch.ones(4), atol=0.03)


def test_channelwise_dropout_drops_whole_channels():
    g = torch.Generator().manual_seed(1)
    x = torch.ones(3, 4000, 5, 5)
    out = dropout(x, torch.tensor([0.2, 0.5, 0.8]), channelwise=True, generator=g)
    per_channel = out.flatten(2)
    assert torch.all((per_channel == 0).all(-1) | (per_channel != 0).all(-1))
    assert torch.allclose((per_channel[..., 0] == 0).float().mean(1), torch.tensor([0.2, 0.5, 0.8]), atol=0.03)


def test_dropout_module_outside_a_hypernet_says_what_to_do():
    with pytest.raises(RuntimeError, match="hypernetize"):
        st.Dropout("p").train()(torch.ones(2, 3))
    assert torch.equal(st.Dropout("p").eval()(torch.ones(2, 3)), torch.ones(2, 3))


def test_cutout_cuts_the_requested_area_per_example():
    g = torch.Generator().manual_seed(0)
    x = torch.ones(3, 1, 64, 64)
    out = cutout(x, torch.tensor([0.0, 8.0, 8.0]), torch.tensor([3.0, 0.0, 1.0]), g)
    assert torch.equal(out[0], x[0]) and torch.equal(out[1], x[1])
    assert 0 < (out[2] == 0).sum() <= 64


def test_cutout_area_grows_with_length_and_holes():
    g = torch.Generator().manual_seed(0)
    x = torch.ones(4000, 1, 28, 28)
    small = (cutout(x, torch.full((4000,), 4.0), torch.ones(4000), g) == 0).float().mean()
    large = (cutout(x, torch.full((4000,), 12.0), torch.full((4000,), 3.0), g) == 0).float().mean()
    assert small < large


def test_noise_flip_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(2, 1, 50, 50)
    noisy = gaussian_noise(x, torch.tensor([0.0, 2.0]), g)
    assert noisy[0].abs().max() == 0 and abs(noisy[1].std().item() - 2.0) < 0.1
    img = torch.arange(16.0).view(1, 1, 4, 4).expand(2, -1, -1, -1)
    flipped = random_flip(img, torch.tensor([0.0, 1.0]), g)
    assert torch.equal(flipped[0], img[0]) and torch.equal(flipped[1], img[1].flip(-1))
    shifted = random_shift(img, torch.tensor([0.0, 2.0]), g)
    assert torch.equal(shifted[0], img[0])
    assert shifted[1].sum() <= img[1].sum()  # content moves out, zeros come in


def test_smoothed_cross_entropy_matches_torch_for_a_shared_rate():
    logits, target = torch.randn(16, 5), torch.randint(0, 5, (16,))
    ours = smoothed_cross_entropy(logits, target, torch.full((16,), 0.1))
    assert torch.allclose(ours, F.cross_entropy(logits, target, label_smoothing=0.1), atol=1e-6)


def test_smoothed_cross_entropy_of_class_probabilities_matches_torch():
    """Soft targets (distillation, mixup) with label smoothing: PyTorch smooths the distribution; the gather
    of integer labels crashed mid-fit on them."""
    logits, target = torch.randn(16, 5), F.softmax(torch.randn(16, 5), -1)
    ours = smoothed_cross_entropy(logits, target, torch.full((16,), 0.2))
    assert torch.allclose(ours, F.cross_entropy(logits, target, label_smoothing=0.2), atol=1e-6)
    tokens, soft = torch.randn(2, 3, 5), F.softmax(torch.randn(2, 3, 5), -1)
    loss = Objective(label_smoothing=0.2).train_loss(tokens, soft, lambda n: None)
    assert torch.allclose(loss, F.cross_entropy(tokens.reshape(6, 5), soft.reshape(6, 5), label_smoothing=0.2),
                          atol=1e-6)


def test_weight_decay_term():
    logits, target = torch.randn(4, 3), torch.randint(0, 3, (4,))
    w = torch.ones(2, 2)
    loss = Objective(weight_decay=0.5).train_loss(logits, target, lambda n: None, [[w]])
    assert torch.allclose(loss, F.cross_entropy(logits, target) + 0.5 * 0.5 * 4)


def test_weight_decay_penalises_the_effective_weights_of_each_example():
    """The per-example norm of a best-response layer is that of W + diag(g_i) W_r, so the response
    path, not only the general weights, feels the decay."""
    torch.manual_seed(0)
    space = st.Space([st.Float("wd", 1e-5, 1e-1, init=1e-3, log=True)])
    net = st.hypernetize(torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.Flatten(),
                                             torch.nn.Linear(48, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2)), space)
    for layer in net.best_response_layers():
        torch.nn.init.normal_(layer.gate)
    u, x = net.perturb(7), torch.randn(7, 1, 6, 6)
    with net.recording_norms() as norms:
        net(x, u)
    cond = net.encode(u) - net.encode(net.hparams.detach().unsqueeze(0))
    expected = torch.zeros(7)
    for layer in net.best_response_layers():
        g = (cond @ layer.gate.t())[:, : layer.out_units]
        for i in range(7):
            w = layer.weight + g[i].view(-1, *[1] * (layer.weight.dim() - 1)) * layer.response_weight
            expected[i] += (w * w).sum()
    assert torch.allclose(norms(), expected, rtol=1e-5)
    with net.recording_norms() as norms:  # at the current hyperparameters: the plain squared norm
        net(x)
    plain = sum((p * p).sum() for p in net.general_parameters() if p.dim() > 1)
    assert torch.allclose(norms(), plain.expand(7))


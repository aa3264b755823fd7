import pytest
import torch

import selftune as st
from selftune.data import DatasetUnavailable, load_dataset
from selftune.data._loaders import load_fashion_mnist
from selftune.models import build


def test_digits_split_is_disjoint_reproducible_and_standardised(digits):
    again = load_dataset("digits")
    assert torch.equal(digits.train.tensors[0], again.train.tensors[0])
    sizes = digits.sizes()
    assert sum(sizes.values()) == 1797 and sizes["test"] == round(0.2 * 1797)
    x = digits.train.tensors[0]
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    other = load_dataset("digits", split_seed=1)
    assert not torch.equal(digits.test.tensors[1], other.test.tensors[1])


def test_mnist_ships_offline_with_official_sizes():
    splits = load_dataset("mnist", val_fraction=0.1, train_subset=1000, test_subset=500)
    assert splits.sizes() == {"train": 1000, "val": 6000, "test": 500}
    assert splits.input_shape == (1, 28, 28) and splits.num_classes == 10


def test_fashion_mnist_loads_or_names_the_package_to_install():
    try:
        train_x, train_y, test_x, _ = load_fashion_mnist()
    except DatasetUnavailable as err:
        assert "dataset-fashion-mnist" in str(err)
    else:
        assert train_x.shape == (60000, 1, 28, 28) and test_x.shape == (10000, 1, 28, 28)
        assert set(train_y.tolist()) == set(range(10))


def test_adult_table_loads_offline_and_is_standardised_per_feature():
    splits = load_dataset("adult")
    assert splits.sizes() == {"train": 26049, "val": 6512, "test": 16281}
    assert splits.num_classes == 2 and splits.input_shape[0] > 100
    x = splits.train.tensors[0]
    assert torch.allclose(x.mean(0), torch.zeros(x.shape[1]), atol=1e-3)
    assert 0.2 < float(splits.test.tensors[1].float().mean()) < 0.3  # about 24% earn > 50K


def test_breast_cancer_loads_offline_with_a_held_out_test_split():
    splits = load_dataset("breast-cancer", test_fraction=0.4, val_fraction=0.25)
    assert splits.sizes() == {"train": 256, "val": 85, "test": 228}  # 569 tumours
    assert splits.num_classes == 2 and splits.input_shape == (30,)
    x = splits.train.tensors[0]
    assert torch.allclose(x.mean(0), torch.zeros(30), atol=1e-4)
    assert 0.5 < float(splits.test.tensors[1].float().mean()) < 0.75  # about 63% benign


def test_unknown_dataset():
    with pytest.raises(LookupError, match="choose one of"):
        load_dataset("cifar10")


@pytest.mark.parametrize("name, kwargs", [
    ("simple_cnn", {"dropout": ["a", "a", "b", "b"]}),
    ("alexnet_small", {"width": 8, "fc": 32, "dropout": ["a", "a", "b", "b", "b"]}),
    ("mlp", {"hidden": [16], "dropout": ["a", "b"]}),
])
@pytest.mark.parametrize("form", ["stn", "delta"])
def test_reference_models_train_as_best_response_networks(name, kwargs, form):
    space = st.Space([st.Float("a", 0.0, 0.9, init=0.2), st.Float("b", 0.0, 0.9, init=0.4)])
    net = st.hypernetize(build(name, input_shape=(1, 28, 28), num_classes=10, **kwargs), space, form=form)
    assert net.best_response_layers()
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    u = net.perturb(6)
    loss = torch.nn.functional.cross_entropy(net(x, u), y)
    loss.backward()
    assert all(p.grad is not None for p in net.general_parameters())


def test_model_dropout_list_length_is_checked():
    with pytest.raises(ValueError, match="dropout needs 4"):
        build("simple_cnn", input_shape=(1, 28, 28), num_classes=10, dropout=["a"])

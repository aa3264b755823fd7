"""The Python API as a notebook uses it (fuzz round 46): partial updates, settings that only the CLI
applied, augmentations of one's own, a list where a chain was expected, values that are not numbers. Each
case failed with a raw error or did something else than it said, silently."""

import math
import warnings

import pytest
import torch
from torch import nn

import selftune as st
from selftune.errors import ConfigError, ConfigTypeError, SelftuneWarning


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    return x, (x.mean((1, 2, 3)) > 0).long()


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), st.Dropout("dp"), nn.Flatten(), nn.Linear(144, 2))


def _space():
    return st.Space([st.Float("dp", 0.0, 0.9, init=0.2), st.Float("ns", 0.0, 1.0, init=0.1)])


def test_set_values_changes_only_the_names_it_is_given():
    net = st.hypernetize(_cnn(), _space())
    net.set_values({"dp": 0.5, "ns": 0.3})
    net.set_values({"dp": 0.7})  # it put ns back at its init, 0.1
    assert net.values()["dp"] == pytest.approx(0.7) and net.values()["ns"] == pytest.approx(0.3)


class Jitter:
    """An augmentation of one's own, reading its strength per example through ``lookup``."""

    def __call__(self, x, lookup, generator):
        return x + lookup("ns").view(-1, 1, 1, 1) * torch.randn(x.shape, generator=generator)


def test_an_augmentation_of_ones_own_is_tuned_through_what_it_looks_up():
    """Its strength was reported as driving nothing and held at its init (the hypergradient of a name nothing
    read is zeroed); a list of ops is taken as the chain it makes."""
    x, y = _data(80, 0)
    xv, yv = _data(40, 1)
    tuner = st.SelfTuner(st.hypernetize(_cnn(), _space()), (x, y), (xv, yv), method="delta-stn", augment=[Jitter()],
                         settings=st.TunerSettings(lr=0.05, batch_size=20))
    with warnings.catch_warnings():
        warnings.simplefilter("error", SelftuneWarning)  # no "ns drives nothing"
        tuner.fit(3)
    assert not tuner.log.idle and tuner.net.values()["ns"] != pytest.approx(0.1, abs=1e-6)


def test_what_is_not_an_augmentation_is_refused_naming_it():
    with pytest.raises(ConfigTypeError, match=r"^augment\[1\]: int is not an augmentation"):
        st.Augment([st.Noise(std="ns"), 3])
    with pytest.raises(ConfigTypeError, match=r"^augment: takes a list of augmentations \(got Noise\)"):
        st.Augment(st.Noise(std="ns"))


@pytest.mark.parametrize("field, value, match", [
    ("init_scale", 0.05, r"^tuner\.init_scale: 0\.05 differs from the net's 0\.5, which hypernetize set; pass it "
                         r"there: selftune\.hypernetize\(model, space, init_scale=0\.05\)"),
    ("encoding", "mip", r"^tuner\.encoding: 'mip' differs from the net's 'logit'"),
])
def test_settings_that_hypernetize_makes_are_refused_when_they_differ_from_the_nets(field, value, match):
    """Only the CLI passed them to hypernetize: set in a notebook's TunerSettings they were ignored."""
    x, y = _data(40, 0)
    with pytest.raises(ConfigError, match=match):
        st.SelfTuner(st.hypernetize(_cnn(), _space()), (x, y), (x, y),
                     settings=st.TunerSettings(batch_size=20, **{field: value}))
    st.SelfTuner(st.hypernetize(_cnn(), _space(), **{field: value}), (x, y), (x, y),
                 settings=st.TunerSettings(batch_size=20, **{field: value}))
    with pytest.raises(ConfigError, match=r"^tuner\.init_scale: must be finite"):
        st.TunerSettings(init_scale=math.inf)


@pytest.mark.parametrize("decay", [math.nan, math.inf, {"4": math.nan}])
def test_a_decay_that_is_not_a_finite_number_is_refused(decay):
    """It trained to a DivergenceError that blamed the learning rate."""
    x, y = _data(40, 0)
    with pytest.raises(ConfigError, match=r"^objective\.weight_decay: (nan|inf) is not a finite number"):
        st.SelfTuner(st.hypernetize(_cnn(), _space()), (x, y), (x, y), objective=st.Objective(weight_decay=decay))

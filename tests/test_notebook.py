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


def test_a_model_hypernetized_again_leaves_the_first_net_saying_so():
    """A cell run twice: the first HyperNet failed inside the model ("read outside a HyperNet forward pass",
    while inside its own), and a HyperNet given to hypernetize was wrapped again."""
    model = _cnn()
    first = st.hypernetize(model, _space())
    second = st.hypernetize(model, _space())
    x = torch.randn(2, 1, 6, 6)
    assert second(x).shape == (2, 2)
    with pytest.raises(RuntimeError, match=r"^this HyperNet's model was given to hypernetize again"):
        first(x)
    with pytest.raises(TypeError, match=r"^model is already a HyperNet"):
        st.hypernetize(second, _space())
    assert "_bound" not in dict(second.named_modules())  # (the reference is no second registration)


def test_metrics_that_are_not_a_dict_of_callables_are_one_line_errors():
    x, y = _data(40, 0)
    for metrics, match in (([lambda o, t: o.mean()], r"^metrics: takes a dict \{name: fn\(outputs, targets\)\} "
                                                      r"\(got list\)"),
                           ({"m": 3}, r"^metrics\['m'\]: must be a callable metric")):
        with pytest.raises(ConfigTypeError, match=match):
            st.SelfTuner(st.hypernetize(_cnn(), _space()), (x, y), (x, y), metrics=metrics,
                         settings=st.TunerSettings(batch_size=20))


def test_a_state_from_another_optimizer_net_or_object_is_refused_before_anything_loads():
    """An SGD tuner's state loaded into an Adam one failed inside PyTorch with the net already holding the
    checkpoint's weights and the roll-back point the foreign state (the next fit crashed); a network's
    state_dict was called "written by an older selftune"."""
    x, y = _data(40, 0)

    def tuner(optimizer="sgd", hidden=144):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), st.Dropout("dp"), nn.Flatten(),
                              nn.Linear(hidden, 2))
        if hidden != 144:
            model = nn.Sequential(nn.Flatten(), nn.Linear(36, hidden), nn.ReLU(), st.Dropout("dp"),
                                  nn.Linear(hidden, 2))
        return st.SelfTuner(st.hypernetize(model, _space()), (x, y), (x, y), method="delta-stn",
                            settings=st.TunerSettings(batch_size=20, optimizer=optimizer))

    saved = tuner()
    saved.fit(1)
    state = saved.state_dict()
    adam = tuner("adam")
    before = [p.detach().clone() for p in adam.net.parameters()]
    with pytest.raises(ConfigError, match=r"^checkpoint: it was saved with optimizer SGD for the 'general' weights, "
                                          r"this tuner has Adam"):
        adam.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(before, adam.net.parameters(), strict=True))
    adam.fit(1)  # still usable
    with pytest.raises(ConfigError, match=r"^checkpoint: it was saved by a net with a weight of another shape, "
                                          r"model\.4\.weight \(2, 144\) \(this net.s \(2, 8\)\)"):
        tuner(hidden=8).load_state_dict(state)
    with pytest.raises(ConfigError, match=r"^checkpoint: this is a network's state_dict \(load it with "
                                          r"net\.load_state_dict\)"):
        tuner().load_state_dict(saved.net.state_dict())


def test_callbacks_get_copies_of_rows_and_odd_arguments_are_one_line_errors():
    """A logging callback that popped a key from its row corrupted the run's history (and explain then
    failed); fit(np.int64(3)) was refused; a callback of another class failed at its first missing hook;
    an infinite entropy weight or relaxation temperature trained to a misleading end."""
    import numpy as np

    from selftune.explain import explain
    from selftune.testing import digits_tuner

    class Popper(st.Callback):
        def on_epoch_end(self, tuner, row):
            row.pop("val_loss")

        def on_step(self, tuner, row):
            if row is not None:
                row.clear()

    tuner = digits_tuner(method="delta-stn")
    fit = tuner.fit(np.int64(2), callbacks=[Popper()])
    assert all("val_loss" in r for r in tuner.history) and all(r for r in tuner.trajectory)
    fit.history[0].clear()  # the result's rows are copies too
    assert tuner.history[0] and explain(tuner)

    class NotACallback:
        def on_step(self, tuner, row):
            pass

    with pytest.raises(ConfigTypeError, match=r"^callbacks\[0\]: NotACallback is not a selftune\.Callback"):
        digits_tuner(method="fixed").fit(1, callbacks=[NotACallback()])
    for field in ("entropy_weight", "relax_temperature"):
        with pytest.raises(ConfigError, match=rf"^tuner\.{field}: must be finite"):
            st.TunerSettings(**{field: math.inf})
    with pytest.raises(ValueError, match=r"step must be a whole number >= 0"):
        fit.schedule.at(-1)


def test_following_a_schedule_at_another_pace_or_past_its_end_warns():
    """A schedule is followed by weight step: at another batch size its path was squeezed over this run's
    epochs, and past its end its last values held, silently."""
    x, y = _data(80, 0)
    xv, yv = _data(40, 1)

    def tuner(method, **settings):
        return st.SelfTuner(st.hypernetize(_cnn(), _space()), (x, y), (xv, yv), method=method,
                            settings=st.TunerSettings(lr=0.05, log_every=1, **settings))

    schedule = tuner("delta-stn", batch_size=20).fit(2).schedule
    with pytest.warns(SelftuneWarning, match=r"^tuner\.follow: the schedule was recorded at 4 weight steps an epoch, "
                                             r"this run takes 8"):
        tuner("fixed", batch_size=10, follow=schedule).fit(2)
    with pytest.warns(SelftuneWarning, match=r"^tuner\.follow: the schedule covers \d+ weight steps, this run takes "
                                             r"16; its last values hold"):
        tuner("fixed", batch_size=20, follow=schedule).fit(4)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        tuner("fixed", batch_size=20, follow=schedule).fit(2)
    assert not [w for w in said if "tuner.follow" in str(w.message)]


def test_export_leaves_the_global_generator_alone_and_score_refuses_a_device_it_lacks():
    net = st.hypernetize(_cnn(), _space())
    torch.manual_seed(7)
    st.export(net)
    after = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(3))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^device: 'cuda': CUDA is not available here"):
            st.score(net, _data(8, 0), device="cuda")


def test_a_cut_of_a_batch_cuts_per_example_lists_and_keeps_structures_of_fields():
    """rows() cuts the examples of a batch (a micro-batch, Delta-STN's response share): a list with one entry
    per example (string labels) is cut as a list; a structure of fields keeps its shape even when it has as
    many members as the batch has examples (the review of stop 35: [a, [b, c]] of 2 examples became [a])."""
    from selftune.batches import Kwargs, rows

    a, b, c = torch.randn(2, 3), torch.randn(2, 5), torch.randn(2)
    nested = rows([a, [b, c]], 0, 1, 0, 2)
    assert nested[0].shape == (1, 3) and nested[1][0].shape == (1, 5) and nested[1][1].shape == (1,)
    pair = rows((a, None), 0, 1, 0, 2)
    assert pair[0].shape == (1, 3) and pair[1] is None
    keywords = rows((a, Kwargs(mask=b, flag=torch.tensor(1.0))), 0, 1, 0, 2)
    assert keywords[1]["mask"].shape == (1, 5) and keywords[1]["flag"].dim() == 0
    assert rows(["cat", "dog"], 0, 1, 0, 2) == ["cat"]

"""Values a regulariser cannot take, and data the run is scored on, are refused before training in
one line (found by trying selftune as a user: a dropout range up to 1.5 and a negative decay trained
silently; a bad test label failed after the whole run)."""

import pytest
import torch

import selftune as st
from selftune.errors import ConfigError, DataError
from selftune.models import build


def _tuner(digits, space, objective=None, **kwargs):
    torch.manual_seed(0)
    model = build("mlp", input_shape=digits.input_shape, num_classes=10, hidden=[16], dropout=["d0", None])
    net = st.hypernetize(model, space)
    return st.SelfTuner(net, digits.train, digits.val, settings=st.TunerSettings(batch_size=64), seed=0,
                        objective=objective, **kwargs)


@pytest.mark.parametrize("space, objective, field", [
    ([st.Float("d0", 0.0, 1.5, init=1.2)], None, "space.d0"),
    ([st.Float("d0", 0.0, 1.0, init=0.5)], None, "space.d0"),
    ([st.Float("d0", -0.2, 0.5, init=0.1)], None, "space.d0"),
    ([st.Float("d0", 0.0, 0.9, init=0.5), st.Float("wd", -0.5, 0.5, init=0.1)], st.Objective(weight_decay="wd"),
     "space.wd"),
    ([st.Float("d0", 0.0, 0.9, init=0.5)], st.Objective(weight_decay=-1.0), "objective.weight_decay"),
    ([st.Float("d0", 0.0, 0.9, init=0.5)], st.Objective(label_smoothing=1.0), "objective.label_smoothing"),
])
def test_a_range_a_regulariser_cannot_take_is_refused(digits, space, objective, field):
    with pytest.raises(ConfigError) as err:
        _tuner(digits, st.Space(space), objective)
    assert err.value.field == field and "\n" not in str(err.value)


@pytest.mark.parametrize("objective, augment, field", [
    (st.Objective(weight_decay="wdd"), None, "objective.weight_decay"),
    (st.Objective(weight_decay={"0": "wdd"}), None, 'objective.weight_decay["0"]'),
    (st.Objective(label_smoothing="ls"), None, "objective.label_smoothing"),
    (None, st.Augment([st.Noise(std="noise")]), "augment"),
])
def test_a_name_the_space_does_not_declare_is_refused_naming_its_field(digits, objective, augment, field):
    """A misspelt name was a bare LookupError (no field); a misspelt dropout name passed every check and
    failed at the first training step, deep inside the forward pass."""
    with pytest.raises(ConfigError) as err:
        _tuner(digits, st.Space([st.Float("d0", 0.0, 0.9, init=0.5)]), objective, augment=augment)
    assert err.value.field == field and "['d0']" in str(err.value) and "\n" not in str(err.value)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), st.Dropout("d_0"), torch.nn.Linear(8, 2))
    with pytest.raises(ConfigError) as err:
        st.hypernetize(model, st.Space([st.Float("d0", 0.0, 0.9, init=0.5)]))
    assert str(err.value).startswith("model.1: Dropout('d_0') reads a hyperparameter the space does not declare")


def test_the_test_split_is_checked_before_training(digits):
    tuner = _tuner(digits, st.Space([st.Float("d0", 0.0, 0.9, init=0.5)]))
    x, y = digits.test.tensors
    tuner.check_data((x, y), "test")
    with pytest.raises(DataError, match="test"):
        tuner.check_data((x, y + 5), "test")


def test_score_with_a_label_the_outputs_lack_is_a_data_error(digits):
    tuner = _tuner(digits, st.Space([st.Float("d0", 0.0, 0.9, init=0.5)]))
    x, y = digits.test.tensors
    with pytest.raises(DataError, match=r"^data: label 1[0-9] at example [0-9]+ of the dataset is outside the "
                                        r"model's 10 outputs"):
        st.score(tuner.net, (x, y + 10))


def test_a_metric_that_fails_is_refused_before_training_with_the_default_loss(digits):
    space = st.Space([st.Float("d0", 0.0, 0.9, init=0.5)])
    with pytest.raises(DataError, match=r"metrics\['m'\]"):
        _tuner(digits, space, metrics={"m": lambda out, y: out.foo})
    with pytest.raises(DataError, match=r"metrics\['rows'\]"):
        _tuner(digits, space, metrics={"rows": lambda out, y: out})  # not one number


def test_a_model_returning_a_tuple_with_the_default_loss_is_a_data_error(digits):
    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = build("mlp", input_shape=digits.input_shape, num_classes=10, hidden=[16],
                              dropout=["d0", None])

        def forward(self, x):
            out = self.body(x)
            return out, out

    net = st.hypernetize(Pair(), st.Space([st.Float("d0", 0.0, 0.9, init=0.5)]))
    with pytest.raises(DataError, match="returns a tuple"):
        st.SelfTuner(net, digits.train, digits.val, settings=st.TunerSettings(batch_size=64))


@pytest.mark.parametrize("args, field", [({"optimizer": "sgd", "optimizer_args": {"momentum": 0.0}}, "momentum"),
                                         ({"optimizer": "adamw", "optimizer_args": {"weight_decay": 0.5}},
                                          "weight_decay")])
def test_an_optimizer_argument_that_would_replace_a_tuner_field_is_refused(args, field):
    with pytest.raises(ConfigError, match=rf"tuner\.optimizer_args\.{field}: .*tuner\.{field}"):
        st.TunerSettings(**args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_is_refused_with_the_way_that_works(dtype):
    """Its layers would mix float32 gates with half weights and fail at the first step with torch's dtype
    error; autocast over a float32 model is the way (tested in test_own_task)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), st.Dropout("d0"), torch.nn.Linear(8, 2)).to(dtype)
    with pytest.raises(ConfigError, match=r"model: its weights are .*float16; keep them float32 and train in half "
                                          r"precision under torch\.autocast"):
        st.hypernetize(model, st.Space([st.Float("d0", 0.0, 0.9, init=0.5)]))

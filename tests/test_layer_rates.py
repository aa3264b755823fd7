"""A learning rate per layer (``tuner.lr_scales``): a scaled layer's parameters train at the run's rate times
their scale, whatever sets that rate (a schedule, hypergradient descent, a roll-back's halving, a resumed
checkpoint), and a pattern that reaches no parameter is refused with the reason."""

import math

import pytest
import torch

from selftune.errors import ConfigError
from selftune.testing import PoisonAt, digits_tuner
from selftune.tuner import Callback

SCALES = 'tuner.lr_scales={"net.2"=0.1, "net.8"=3}'
BOUND = ('space.lr={low=1e-4, high=1.0, init=0.05, log=true}', 'tuner.lr="lr"')


class Rates(Callback):
    """Every step's rate of each parameter group of the weights' optimizer."""

    def __init__(self) -> None:
        self.steps: list[list[float]] = []

    def on_step(self, tuner, row):
        self.steps.append([g["lr"] for g in tuner.optimizers[tuner.algorithm.lr_group].param_groups])


def test_a_scaled_layer_steps_its_scale_times_as_far():
    """SGD without momentum: the first step moves a scaled layer's weights exactly scale x as far as the
    same step without scales, and the layers no pattern names exactly as far."""
    moves = []
    for scales in ((), (SCALES,)):
        tuner = digits_tuner("tuner.momentum=0.0", *scales, method="fixed")
        general = {id(p) for p in tuner.net.general_parameters()}  # not the response paths fixed leaves alone
        before = {n: p.detach().clone() for n, p in tuner.net.model.named_parameters() if id(p) in general}
        tuner.fit(1, max_steps=1)
        moves.append({n: p.detach() - before[n] for n, p in tuner.net.model.named_parameters() if n in before})
    plain, scaled = moves
    for name, move in plain.items():
        scale = 0.1 if name.startswith("net.2.") else 3.0 if name.startswith("net.8.") else 1.0
        assert torch.allclose(scaled[name], scale * move, rtol=1e-3, atol=1e-7), name  # float32 differences
        assert move.abs().sum() > 0


@pytest.mark.parametrize("method, extra", [
    ("fixed", ('tuner.schedule={kind="cosine"}',)),
    ("hd", BOUND),
    ("stn", BOUND),
    ("delta-ift", BOUND),
    ("one-pass", BOUND),
])
def test_the_scales_follow_the_rate_wherever_it_goes(method, extra):
    """Scheduled, tuned by hypergradient descent (hd, STN, Delta-STN) or by one-pass's implicit step: the
    scaled groups train at the rate x their scale at every step, and the rate itself moved."""
    tuner = digits_tuner(SCALES, *extra, method=method)
    rates = Rates()
    tuner.fit(3, callbacks=[rates])
    for rate, first, last, *_ in rates.steps:
        assert first == pytest.approx(rate * 0.1, rel=1e-9) and last == pytest.approx(rate * 3, rel=1e-9)
    assert rates.steps[-1][0] != pytest.approx(rates.steps[0][0], rel=1e-3)
    if method == "stn":  # the response group keeps its own rate
        assert len(rates.steps[0]) == 4


@pytest.mark.parametrize("extra", [(), BOUND])
def test_a_roll_back_halves_a_scaled_layer_once(extra):
    tuner = digits_tuner('tuner.lr_scales={"net.2"=0.1}', *extra, method="delta-stn")
    rates, poison = Rates(), PoisonAt(20)
    tuner.fit(2, callbacks=[poison, rates])
    assert tuner.divergences == 1
    for rate, scaled in rates.steps:
        assert scaled == pytest.approx(rate * 0.1, rel=1e-9)
    at = [i for i, step in enumerate(rates.steps) if i and step[0] < 0.75 * rates.steps[i - 1][0]]
    assert at, "the rate did not come down at the roll-back"


def test_a_run_with_scales_resumes_exactly():
    whole = digits_tuner(SCALES, *BOUND, method="delta-ift")
    whole.fit(3)
    first = digits_tuner(SCALES, *BOUND, method="delta-ift")
    first.fit(3, max_steps=40)
    second = digits_tuner(SCALES, *BOUND, method="delta-ift")
    second.load_state_dict(first.state_dict())
    second.fit(3)
    assert second.weights_lr == whole.weights_lr
    for a, b in zip(whole.net.state_dict().values(), second.net.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("scales, match", [
    ('{"fc1"=0.1}', r'^tuner\.lr_scales\["fc1"\]: names no layer with weights; the model\'s are \'net\.2\', '
                    r"'net\.5', 'net\.8'$"),
    ('{"net.*"=0.1, "net.5"=2}', r'^tuner\.lr_scales\["net\.5"\]: every layer it names is taken by an earlier '
                                 r"pattern"),
    ('{"net.2"=0}', r'^tuner\.lr_scales\["net\.2"\]: must be a positive number \(got 0\); freeze a layer with '
                    r"requires_grad=False"),
    ('{"net.2"=-1}', r'^tuner\.lr_scales\["net\.2"\]: must be a positive number'),
    ('{"net.2"="x"}', r'^tuner\.lr_scales\["net\.2"\]: must be a positive number \(got \'x\'\)'),
    ('{"net.2"=1e41}', r'^tuner\.lr_scales\["net\.2"\]: torch\.optim\.SGD failed its first step at the rate it '
                       r"gives \(5e\+39\)"),
])
def test_a_scale_that_reaches_no_parameter_is_refused(scales, match):
    with pytest.raises(ConfigError, match=match):
        digits_tuner(f"tuner.lr_scales={scales}", method="fixed")


@pytest.mark.filterwarnings("ignore:space. wd drive")
def test_a_scale_on_frozen_layers_says_they_are_frozen():
    import selftune as st

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    model[0].requires_grad_(False)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    space = st.Space([st.Float("wd", 1e-6, 1e-1, init=1e-4, log=True)])
    with pytest.raises(ConfigError, match=r'^tuner\.lr_scales\["0"\]: names only frozen layers \(\'0\''):
        st.SelfTuner(st.hypernetize(model, space), (x, y), (x, y), method="fixed",
                     settings=st.TunerSettings(lr_scales={"0": 0.1}, batch_size=16))
    tuner = st.SelfTuner(st.hypernetize(model, space), (x, y), (x, y), method="fixed",
                         settings=st.TunerSettings(lr_scales={"2": 0.1}, batch_size=16))
    frozen = model[0].weight.detach().clone()
    tuner.fit(1)
    assert torch.equal(model[0].weight, frozen)
    groups = tuner.optimizers["weights"].param_groups
    assert [len(g["params"]) for g in groups] == [0, 2] and math.isclose(groups[1]["lr"], 0.01 * 0.1)


def test_the_order_of_the_patterns_is_part_of_what_a_bench_keeps_and_a_study_continues():
    """The first pattern that names a layer decides its scale (and its decay), so two orders train
    differently; a bench kept the runs and continued the studies of the other order (dicts compare, and
    sorted JSON hashes, without order: fuzz round 45). A config without scales keeps its study's name."""
    from selftune.config import comparable
    from selftune.methods.search import trial_digest
    from selftune.testing import digits_config

    first = digits_config('tuner.lr_scales={"net.*"=0.1, "net.8"=3}')
    swapped = digits_config('tuner.lr_scales={"net.8"=3, "net.*"=0.1}')
    assert first.tuner.lr_scales == swapped.tuner.lr_scales  # equal as dicts, yet they train apart
    assert trial_digest(first) != trial_digest(swapped)
    assert comparable(first.model_dump(mode="json")) != comparable(swapped.model_dump(mode="json"))
    assert trial_digest(first) == trial_digest(digits_config('tuner.lr_scales={"net.*"=0.1, "net.8"=3}'))
    plain = digits_config().model_dump(mode="json")
    recorded_before = {**plain, "tuner": {k: v for k, v in plain["tuner"].items() if k != "lr_scales"}}
    assert comparable(plain) == comparable(recorded_before)


def test_a_pattern_that_names_a_parameter_says_patterns_name_layers():
    """A user naming a parameter (a temperature of the model's own, a block's gain) was told it named no
    layer, in a list that offered '' (the model itself) as one (fuzz round 45)."""
    import selftune as st

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.temperature = torch.nn.Parameter(torch.ones(()))
            self.block = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.block(x)) / self.temperature

    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    space = st.Space([st.Float("wd", 1e-6, 1e-1, init=1e-4, log=True)])
    for pattern, match in (("temperature", r"names a parameter; patterns name layers \(model\.named_modules\(\)\), "
                                           r"not parameters: only \"\*\" reaches the model's own parameters$"),
                           ("block.0.weight", r"names a parameter; .*: use 'block\.0'$"),
                           ("nope", r"names no layer with weights; the model's are the model itself \(\"\*\"\), "
                                    r"'block\.0', 'head'$")):
        with pytest.raises(ConfigError, match=rf'^tuner\.lr_scales\["{pattern}"\]: {match}'):
            st.SelfTuner(st.hypernetize(Scaled(), space), (x, y), (x, y), method="fixed",
                         objective=st.Objective(weight_decay="wd"),
                         settings=st.TunerSettings(lr_scales={pattern: 0.1}, batch_size=16))


def test_a_state_saved_with_other_scales_is_refused_and_a_roll_back_names_the_pattern():
    """A state saved with other scales loaded into a tuner silently kept the checkpoint's (or failed with
    PyTorch's "different number of parameter groups"); a roll-back named every group "weights lr"
    (fuzz round 45)."""
    saved = digits_tuner('tuner.lr_scales={"net.2"=0.1}', method="delta-stn")
    saved.fit(1, max_steps=3)
    state = saved.state_dict()
    for other, match in (((), r"layer rate scales \{'net\.2': 0\.1\}, this tuner has none"),
                         (('tuner.lr_scales={"net.2"=0.5}',), r"layer rate scales \{'net\.2': 0\.1\}, this tuner "
                                                               r"has \{'net\.2': 0\.5\}"),
                         (('tuner.lr_scales={"net.5"=0.1}',), r"layer rate scales \{'net\.2': 0\.1\}, this tuner "
                                                               r"has \{'net\.5': 0\.1\}")):
        with pytest.raises(ConfigError, match=rf"^checkpoint: it was saved with {match}"):
            digits_tuner(*other, method="delta-stn").load_state_dict(state)
    poison = PoisonAt(5)
    digits_tuner('tuner.lr_scales={"net.2"=0.1}', method="delta-stn").fit(1, callbacks=[poison])
    assert "general lr of 'net.2' (x0.1) 0.005 -> 0.0025" in poison.events[0]["message"]

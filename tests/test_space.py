import math

import pytest
import torch

import selftune as st


def make_space():
    return st.Space([
        st.Float("p", 0.0, 0.9, init=0.5),
        st.Float("lr", 1e-5, 1.0, init=1e-3, log=True),
        st.Int("k", 2, 24, init=4),
        st.Float("edge", -3.0, 3.0, init=-3.0),
    ])


def test_constrained_values_stay_in_bounds_for_any_real():
    space = make_space()
    u = torch.randn(10_000, len(space)) * 30
    v = space.to_constrained(u.double())
    for i, p in enumerate(space):
        assert torch.all(v[:, i] >= p.low - 0.5 - 1e-9) and torch.all(v[:, i] <= p.high + 0.5 + 1e-9)
        if not p.is_int:
            assert torch.all(v[:, i] >= p.low) and torch.all(v[:, i] <= p.high)
    d = space.discretize(v)
    k = space.index("k")
    assert torch.all(d[:, k] == d[:, k].round()) and d[:, k].min() >= 2 and d[:, k].max() <= 24


def test_round_trip_unconstrained_constrained():
    space = make_space()
    u = (torch.randn(500, len(space), dtype=torch.float64) * 3).clamp(-8, 8)  # |logit| < logit(1 - 1e-4)
    back = space.to_unconstrained(space.to_constrained(u))
    assert torch.allclose(back, u, atol=1e-6)


def test_init_values_are_recovered_including_on_a_bound():
    space = make_space()
    values = space.values_dict(space.init_unconstrained())
    assert values["p"] == pytest.approx(0.5, rel=1e-5)
    assert values["lr"] == pytest.approx(1e-3, rel=1e-4)
    assert values["k"] == 4 and isinstance(values["k"], int)
    assert values["edge"] == pytest.approx(-3.0, abs=1e-3)
    assert all(math.isfinite(x) for x in space.init_unconstrained().tolist())


def test_integer_cells_are_equally_wide():
    space = st.Space([st.Int("k", 0, 3, init=1)])
    g = ((torch.arange(4000, dtype=torch.float64) + 0.5) / 4000).unsqueeze(1)
    counts = torch.bincount(space.discretize(space.to_constrained(torch.logit(g))).long().squeeze(1))
    assert counts.tolist() == [1000, 1000, 1000, 1000]


def test_logit_encoding_gives_a_hyperparameter_near_a_bound_the_same_slope_as_one_in_the_middle():
    """The gates' input must not flatten near a bound: with MIP's map a dropout of 0.05 got a ~13x
    weaker hypergradient than one of 0.5 and could not rise (docs/benchmarks/official-delta-stn)."""
    space = st.Space([st.Float("p", 0.0, 1.0, init=0.5)])
    slopes = {}
    for kind in ("logit", "mip"):
        for value in (0.05, 0.5):
            u = space.from_dict({"p": value}).requires_grad_()
            enc = space.encode(u, kind)
            assert enc.shape == (space.encoding_width(kind),)
            jac = torch.autograd.functional.jacobian(lambda x, kind=kind: space.encode(x, kind), u)
            slopes[kind, value] = float(jac.norm())
    assert slopes["logit", 0.05] == pytest.approx(slopes["logit", 0.5]) == pytest.approx(1.0)
    assert slopes["mip", 0.05] < slopes["mip", 0.5] / 5
    with pytest.raises(ValueError, match="encoding must be one of"):
        space.encode(torch.zeros(1), "raw")


def test_encoding_has_constant_norm():
    space = make_space()
    enc = space.encode(torch.randn(64, len(space)) * 10, "mip")
    assert enc.shape == (64, 2 * len(space))
    pairs = enc.view(64, 2, len(space))
    assert torch.allclose(pairs.pow(2).sum(1), torch.ones(64, len(space)), atol=1e-6)


@pytest.mark.parametrize("make, field", [
    (lambda: st.Float("p", 0.5, 0.1, init=0.3), "low"),
    (lambda: st.Float("p", 0.0, 1.0, init=1.5), "init"),
    (lambda: st.Float("p", 0.0, 1.0, init=0.5, log=True), "log"),
    (lambda: st.Int("k", 0, 5, init=2.5), "init"),
    (lambda: st.Float("bad name", 0.0, 1.0, init=0.5), "name"),
    (lambda: st.Float("p", 0.0, float("nan"), init=0.5), "high"),
])
def test_bad_declarations_name_the_problem(make, field):
    with pytest.raises(ValueError, match=field if field not in ("log", "name") else r"log|name|identifier|> 0"):
        make()


def test_space_rejects_duplicates_and_unknown_lookups():
    with pytest.raises(ValueError, match="twice"):
        st.Space([st.Float("p", 0, 1, init=0.5), st.Float("p", 0, 1, init=0.5)])
    with pytest.raises(LookupError, match="nope"):
        make_space().index("nope")
    with pytest.raises(ValueError, match="outside"):
        make_space().from_dict({"p": 0.95})


@pytest.mark.parametrize("name", ["step", "epoch", "train_loss", "seconds", "weights_lr", "batch_size", "val_loss",
                                  "val_mae", "dropout_scale"])
def test_a_name_the_records_reserve_is_refused(name, tmp_path):
    """A hyperparameter named like a column of the run's records (the trajectory, epochs.csv,
    schedule.csv) would be overwritten there silently; it is refused, in Python and in a config."""
    with pytest.raises(ValueError, match=rf"hyperparameter '{name}': the run's records use that name"):
        st.Space([st.Float(name, 0.0, 0.5, init=0.1)])
    from selftune.config import load_config
    from selftune.errors import ConfigError

    (tmp_path / "c.toml").write_text(f'epochs = 2\n[data]\nname = "digits"\n[model]\nname = "mlp"\nhidden = [8]\n'
                                     f'dropout = ["{name}"]\n[space.{name}]\nlow = 0.0\nhigh = 0.5\ninit = 0.1\n')
    with pytest.raises(ConfigError, match=rf"^space\.{name}: the run's records use that name"):
        load_config(tmp_path / "c.toml")

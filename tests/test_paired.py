"""The paired test of a bench's verdict: a tuned method against fixed training, seed by seed."""

import itertools
import math

import pytest

from selftune.bench.harness import verdict
from selftune.bench.paired import describe, paired_test, smallest_p
from selftune.config import load_config
from selftune.methods import MethodResult


def direct_p(changes: list[float]) -> float:
    """The exact two-sided signed-rank p-value by enumerating every sign assignment (no ties)."""
    ranks = {c: i + 1 for i, c in enumerate(sorted(changes, key=abs))}
    observed = sum(ranks[c] for c in changes if c > 0)
    n, total = len(changes), len(changes) * (len(changes) + 1) / 2
    extreme = min(observed, total - observed)
    count = sum(1 for signs in itertools.product((0, 1), repeat=n)
                if min(s := sum(r for r, b in zip(range(1, n + 1), signs) if b), total - s) <= extreme)
    return count / 2 ** n


def test_p_value_matches_a_direct_enumeration():
    tuned = [0.131, 0.091, 0.100, 0.144, 0.128, 0.129, 0.090]
    fixed = [0.138, 0.132, 0.128, 0.153, 0.132, 0.127, 0.095]
    r = paired_test(tuned, fixed)
    changes = [math.log(t / f) for t, f in zip(tuned, fixed)]
    assert r.relative and r.n == 7 and r.lower
    assert r.p == pytest.approx(direct_p(changes))
    assert r.median == pytest.approx(math.expm1(sorted(changes)[3]))


def test_all_seeds_one_way_is_a_verdict_only_with_enough_seeds():
    six = describe([0.1] * 6, [0.2, 0.21, 0.22, 0.23, 0.24, 0.25])
    assert six.endswith("better") and "p 0.031" in six  # 2 / 2**6
    assert describe([0.3] * 6, [0.2, 0.21, 0.22, 0.23, 0.24, 0.25]).endswith("worse")
    # five seeds cannot reach 5% however they fall
    assert smallest_p(5) > 0.05 and "too few seeds (5)" in describe([0.1] * 5, [0.2, 0.21, 0.22, 0.23, 0.24])
    mixed = describe([0.1, 0.3, 0.1, 0.3, 0.1, 0.3], [0.2, 0.2, 0.2, 0.2, 0.2, 0.21])
    assert "inside the seed noise" in mixed


def test_the_direction_is_the_heavier_ranks_not_the_median():
    """Many tiny gains and fewer large losses: the median is a gain, the ranks say worse, and the verdict
    follows the test."""
    tuned = [0.999] * 26 + [1.5] * 24
    r = paired_test(tuned, [1.0] * 50)
    assert r.median < 0 and r.p < 0.05 and r.lower is False
    assert describe(tuned, [1.0] * 50).endswith("worse")


def test_equal_pairs_drop_out_and_diverged_runs_rank_last():
    # bit-identical pairs carry no information about the direction
    assert paired_test([0.5, 0.5, 0.1], [0.5, 0.5, 0.2]).n == 1
    assert describe([0.5, 0.5], [0.5, 0.5]) == "equal on every seed" and describe([], []) == "-"
    # a fixed run that diverged is the tuned run's largest win, whatever the finite changes
    r = paired_test([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [math.inf, 0.1, 0.2, 0.3, 0.4, 0.5])
    assert r.n == 6 and r.median > 0 and r.p == pytest.approx(direct_p([-100.0, *[math.log(x / (x - 0.1)) for x in
                                                                                (0.2, 0.3, 0.4, 0.5, 0.6)]]))
    # diverged runs on both sides leave no median, and say so
    assert describe([math.inf, 1.0], [1.0, math.inf]).startswith("median undefined")
    # a loss with no zero point (a Gaussian NLL can be negative): plain differences
    r = paired_test([-1.0, -2.0, -3.5], [-0.5, -1.5, -3.0])
    assert not r.relative and r.median == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="one fixed loss per tuned loss"):
        paired_test([0.1], [0.1, 0.2])


def test_the_bench_verdict_shows_the_paired_test(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('epochs = 2\n[data]\nname = "digits"\n'
                    '[space.dropout]\ntype = "float"\nlow = 0.0\nhigh = 0.9\ninit = 0.5\n'
                    '[model]\nname = "mlp"\ndropout = ["dropout"]\n')
    config = load_config(path)

    def result(method: str, seed: int, loss: float, failed: bool = False) -> MethodResult:
        return MethodResult(method=method, seed=seed, test_loss=loss, test_accuracy=0.9, val_loss=loss, examples=1,
                            seconds=1.0, start="default", start_values={"dropout": 0.5}, hparams={"dropout": 0.4},
                            failed="diverged" if failed else "")

    results = [result("fixed", s, 0.2 + 0.01 * s) for s in range(6)]
    results += [result("delta-ift", s, 0.1 + 0.01 * s) for s in range(5)] + [result("delta-ift", 5, math.nan, True)]
    lines = verdict(results, config)
    row = next(line for line in lines if line.startswith("| default | delta-ift |"))
    # five wins and a diverged run: the divergence is the largest loss of all, so the six pairs are noise
    p = direct_p([math.log((0.1 + 0.01 * s) / (0.2 + 0.01 * s)) for s in range(5)] + [100.0])
    assert "| 5/6 (1 diverged) |" in row and f"p {p:.2f}: inside the seed noise" in row and p > 0.4
    # a method that diverged on every seed lost every pair: the test says so
    lost = verdict(results[:6] + [result("delta-ift", s, math.nan, True) for s in range(6)], config)
    row = next(line for line in lost if line.startswith("| default | delta-ift |"))
    assert "| 0/6 (6 diverged) | +inf, p 0.031: worse |" in row


def test_a_change_against_a_loss_of_zero_or_below_is_a_plain_difference(capsys):
    """`run --compare` and `replay` divided by a reference test loss of 0 (a hinge loss on separable data: a
    traceback after both runs had trained) and read a negative one backwards (-4.81 against -4.60 printed as
    "raises the test loss by 4.7%"); the bench's "vs best search" column did both (found by a fuzz round)."""
    from types import SimpleNamespace

    from selftune.bench.paired import describe_change, loss_change
    from selftune.cli import _comparison

    assert loss_change(0.9, 1.0) == (pytest.approx(-10.0), True)
    assert loss_change(-4.8137, -4.5995) == (pytest.approx(-0.2142), False)
    assert loss_change(0.1, 0.0) == (pytest.approx(0.1), False)
    assert describe_change(0.0, 0.0) == "+0.0000" and describe_change(1.1, 1.0) == "+10.0%"

    def run(method, loss, run_id):
        return SimpleNamespace(method=method, run_id=run_id, test={"loss": loss}, hparams={"d": 0.1},
                               compute={"examples": 100, "seconds": 1.0})

    _comparison(run("delta-stn", -4.8137, 2), run("fixed", -4.5995, 1))
    assert "delta-stn lowers the test loss by 0.2142 against fixed" in capsys.readouterr().out
    _comparison(run("delta-stn", 0.0, 2), run("fixed", 0.0, 1))
    assert "delta-stn leaves the test loss against fixed" in capsys.readouterr().out


def test_a_cell_where_every_run_diverged_says_so_not_equal():
    """Every tuned and fixed run diverged (NaN test losses): the cell read "equal on every seed"."""
    nan = float("nan")
    assert describe([nan, nan], [nan, nan]) == "no pair to compare: both runs diverged on every seed"

"""Interval arithmetic against cases worked out by hand (and published Wilson tables)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cai.stats import Interval, bootstrap_mean, mean_interval, paired_difference, wilson, z_value

Z = 1.959963984540054


def test_z_value():
    assert z_value() == pytest.approx(Z, abs=1e-9)
    assert z_value(0.90) == pytest.approx(1.644853627, abs=1e-8)
    with pytest.raises(ValueError):
        z_value(1.0)


def test_wilson_8_of_10():
    # By hand: z2n = z^2/10 = 0.384146; centre = (0.8 + 0.192073) / 1.384146 = 0.716740;
    # half = z * sqrt(0.016 + 0.0096037) / 1.384146 = 0.226579  ->  [0.490161, 0.943319].
    iv = wilson(8, 10)
    assert iv.estimate == 0.8 and iv.n == 10 and iv.method == "wilson"
    assert iv.low == pytest.approx(0.490161, abs=1e-5)
    assert iv.high == pytest.approx(0.943319, abs=1e-5)


def test_wilson_edges():
    # 0 of 10: low is 0 and high is z2n / (1 + z2n) = 0.384146 / 1.384146 = 0.277533.
    iv = wilson(0, 10)
    assert iv.low == 0.0 and iv.high == pytest.approx(0.277533, abs=1e-5)
    iv = wilson(10, 10)
    assert iv.high == 1.0 and iv.low == pytest.approx(1 - 0.277533, abs=1e-5)
    # 50 of 100: symmetric around 0.5, half = z * sqrt(0.0025 + 0.0000960) / 1.038415 = 0.096159.
    iv = wilson(50, 100)
    assert iv.low == pytest.approx(0.5 - 0.096159, abs=1e-5)
    assert iv.high == pytest.approx(0.5 + 0.096159, abs=1e-5)
    # Ties counted as half a success are accepted.
    assert wilson(7.5, 10).estimate == 0.75
    empty = wilson(0, 0)
    assert empty.n == 0 and math.isnan(empty.estimate) and empty.fmt() == "n/a (n=0)"
    with pytest.raises(ValueError):
        wilson(11, 10)


def test_bootstrap_two_points_by_hand():
    # Resampled means of [0, 1] are 0, .5, 1 with probability 1/4, 1/2, 1/4, so the 2.5 % and
    # 97.5 % percentiles are 0 and 1.
    iv = bootstrap_mean([0.0, 1.0], resamples=4000, seed=1)
    assert iv.estimate == 0.5 and iv.low == 0.0 and iv.high == 1.0 and iv.method == "bootstrap"


def test_bootstrap_constant_seeded_and_close_to_wilson():
    iv = bootstrap_mean([0.7] * 25)
    assert iv.low == pytest.approx(0.7) and iv.high == pytest.approx(0.7)
    xs = np.array([1.0] * 60 + [0.0] * 40)
    a, b = bootstrap_mean(xs, seed=3), bootstrap_mean(xs, seed=3)
    assert a == b  # same seed, same interval
    w = wilson(60, 100)
    assert a.estimate == 0.6
    assert a.low == pytest.approx(w.low, abs=0.03) and a.high == pytest.approx(w.high, abs=0.03)
    # Chunked resampling (many values) gives a sane interval around the mean.
    big = bootstrap_mean(np.tile([0.0, 1.0], 5000), resamples=1000)
    assert big.low < 0.5 < big.high and big.high - big.low < 0.03
    assert math.isnan(bootstrap_mean([]).estimate)


def test_paired_difference_by_hand():
    # diffs 1, 2, 3, 4: mean 2.5, sd = sqrt(5/3) = 1.290994, se = 0.645497,
    # interval 2.5 -/+ 1.959964 * 0.645497 = 2.5 -/+ 1.265151 = [1.234849, 3.765151].
    iv = paired_difference([1, 2, 3, 4], [0, 0, 0, 0])
    assert iv.estimate == pytest.approx(2.5)
    assert iv.stderr == pytest.approx(0.645497, abs=1e-6)
    assert iv.low == pytest.approx(1.234849, abs=1e-5) and iv.high == pytest.approx(3.765151, abs=1e-5)
    assert iv.method == "stderr" and iv.n == 4
    one = mean_interval([3.0])
    assert one.low == one.high == 3.0 and one.stderr is None
    with pytest.raises(ValueError):
        paired_difference([1, 2], [1])


def test_fmt_and_json():
    iv = Interval(0.6124, 0.5781, 0.6452, 776, "wilson")
    assert iv.fmt() == "0.612 [0.578, 0.645] n=776"
    assert iv.fmt(2, method=True) == "0.61 [0.58, 0.65] n=776 wilson"
    d = json.loads(json.dumps(wilson(0, 0).as_dict()))
    assert d["estimate"] is None and d["n"] == 0

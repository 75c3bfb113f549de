"""Per-layer statistics against brute-force definitions, and the replicate summary."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from varprop import stats
from varprop.stats import STATS, log10_mean_pow10, side_stats, summarize


def brute(x: np.ndarray) -> dict:
    pairs = [(i, j) for i, j in itertools.combinations(range(len(x)), 2)
             if np.linalg.norm(x[i]) > 0 and np.linalg.norm(x[j]) > 0]
    cos = [x[i] @ x[j] / np.linalg.norm(x[i]) / np.linalg.norm(x[j]) for i, j in pairs]
    return {
        "mean": x.mean(), "std": x.std(), "log10_std": math.log10(x.std()), "second_moment": np.mean(x**2),
        "sq_unit_mean": np.mean(x.mean(axis=0) ** 2), "unit_var": np.mean(x.var(axis=0)),
        "frac_zero": np.mean(x == 0), "cos_sim": np.mean(cos), "abs_cos_sim": np.mean(np.abs(cos)),
    }


def test_side_stats_match_definitions():
    rng = np.random.default_rng(0)
    u = np.maximum(rng.standard_normal((40, 7)) + 0.3, 0)  # nonzero mean, exact zeros
    u[3] = 0  # a dead sample: excluded from the cosine pairs
    log_s = math.log(3.5)
    got = side_stats(u.astype(np.float32), log_s, saturated=0.25)
    want = brute(u.astype(np.float32).astype(np.float64) * 3.5)
    for key, value in want.items():
        # a float32 run's |cos| comes from a float32 Gram matrix: each cosine off by at most (fan + 2) 2^-24
        tol = (u.shape[1] + 2) * 2.0**-24 if key == "abs_cos_sim" else 1e-15
        assert got[key] == pytest.approx(value, rel=1e-12, abs=tol), key
    assert got["frac_saturated"] == 0.25
    assert set(got) == set(STATS)


def test_side_stats_beyond_float_range():
    u = np.random.default_rng(1).standard_normal((20, 10))
    got = side_stats(u, log_s=5000 * math.log(10))
    assert got["log10_std"] == pytest.approx(5000 + math.log10(u.std()), abs=1e-9)
    assert math.isinf(got["std"]) and math.isinf(got["second_moment"])
    tiny = side_stats(u, log_s=-5000 * math.log(10))
    assert tiny["std"] == 0 and tiny["log10_std"] == pytest.approx(-5000 + math.log10(u.std()))


def test_summary_mean_and_typical_network():
    layers = pd.DataFrame({
        "config": "a", "replicate": [0, 1, 2], "layer": 1,
        **{f"post_{s}": [1.0, 2.0, 3.0] for s in STATS},
    })
    layers["post_log10_std"] = [0.0, 1.0, 2.0]
    s = summarize(layers).iloc[0]
    assert s["post_log10_typical_std"] == pytest.approx(1.0)
    assert s["post_log10_rms_std"] == pytest.approx(0.5 * math.log10((1 + 100 + 10_000) / 3))
    assert s["post_mean"] == pytest.approx(2.0)
    assert s["post_mean_se"] == pytest.approx(1 / math.sqrt(3))
    assert s["post_mean_hi"] - s["post_mean"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)


def test_log10_mean_pow10_handles_huge_and_zero():
    assert log10_mean_pow10(np.array([5000.0, 5000.0])) == pytest.approx(5000)
    assert log10_mean_pow10(np.array([0.0, -np.inf])) == pytest.approx(math.log10(0.5))
    assert log10_mean_pow10(np.array([-np.inf])) == -math.inf


def test_side_stats_over_many_blocks():
    """Five blocks of rows, each summed in several pieces, on three threads:
    the sums combine to the whole-array definitions (a mean 1000 sd's from zero costs no digits),
    and the thread count changes no bit."""
    from varprop.parallel import Pool, row_chunks

    rng = np.random.default_rng(2)
    x = 1e3 + rng.standard_normal((1200, 1024))
    x[5] = 0  # a dead sample among the first 128, whose |cos| is then taken over the next live ones
    assert len(row_chunks(*x.shape)) == 5
    got = side_stats(x, 0.0)
    assert side_stats(x, 0.0, pool=Pool(3)) == got
    live = x[np.linalg.norm(x, axis=1) > 0]
    r = live / np.linalg.norm(live, axis=1)[:, None]
    k = len(r)
    head = np.abs(r[:128] @ r[:128].T)
    want = {"mean": x.mean(), "std": x.std(), "second_moment": np.mean(x**2), "unit_var": np.mean(x.var(axis=0)),
            "sq_unit_mean": np.mean(x.mean(axis=0) ** 2), "frac_zero": np.mean(x == 0),
            "cos_sim": (np.sum(r.sum(axis=0) ** 2) - k) / (k * (k - 1)),
            "abs_cos_sim": (head.sum() - np.trace(head)) / (128 * 127)}
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key


@pytest.mark.parametrize("values, expected", [
    ([1.0, 1.0, 1.0], (1.0, 1.0, 1.0)),
    ([0.0, 2.0], (1.0, 1 - 12.706204736174698, 1 + 12.706204736174698)),  # t_{0.975, 1} = 12.7062 (tables)
    ([math.nan, 3.0], (3.0, math.nan, math.nan)),  # non-finite values are left out; one value has no interval
])
def test_mean_interval(values, expected):
    np.testing.assert_allclose(stats.mean_interval(values), expected, rtol=1e-12)


def _direct_abs_cos(x: np.ndarray) -> float:
    live = x[np.linalg.norm(x.astype(np.float64), axis=1) > 0][:128].astype(np.float64)
    r = live / np.linalg.norm(live, axis=1)[:, None]
    head = np.abs(r @ r.T)
    return (head.sum() - np.trace(head)) / (len(r) * (len(r) - 1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scale", [1.0, 1e19, 1e-22])
def test_abs_cos_at_any_in_range_scale(dtype, scale):
    # Rows whose products leave the dtype's range (a float32 Gram matrix of 1e19 overflows; half the head at
    # 1e-22 underflows) are taken as unit rows: |cos| stays within the Gram matrix's rounding,
    # (fan + 2) 2^-24 a cosine in float32, at every scale, on the stacked path and alone alike.
    rng = np.random.default_rng(4)
    x = rng.standard_normal((300, 64)) * scale
    x[1:128:2] *= 1e-22 / scale if scale != 1.0 else 1.0
    x[7] = 0  # a dead sample among the first 128
    u = x.astype(dtype)
    tol = (u.shape[1] + 2) * 2.0**-24 if dtype == np.float32 else 1e-13
    got = side_stats(u, 0.0)["abs_cos_sim"]
    assert got == pytest.approx(_direct_abs_cos(u), abs=tol)
    stacked = stats.side_stats_stacked(np.stack([u[:100], u[100:200]]), [0.0, 0.0], [0.0, 0.0])
    assert [s["abs_cos_sim"] for s, _ in stacked] == [side_stats(u[:100], 0.0)["abs_cos_sim"],
                                                      side_stats(u[100:200], 0.0)["abs_cos_sim"]]


def test_later_fills_rows_as_side_stats_and_runs_readers_in_order():
    rng = np.random.default_rng(1)
    later = stats.Later()
    shapes = [(128, 256)] * 6 + [(12, 8)] * 3  # two stacks: the first fills (4 slots) before the flush
    arrays = [np.maximum(rng.standard_normal(s), 0).astype(np.float32) * 3 for s in shapes]
    assert all(later.takes(u) for u in arrays)
    order = []
    rows = []
    for i, u in enumerate(arrays):
        rows.append(later.stats(u.copy(), log_s=0.1 * i, saturated=0.5))
        later.then(lambda i=i: order.append((i, rows[i].get("std"))))
    for u in arrays:
        u[...] = 0  # the values as they were when asked for: a later change is not seen
    # The first stack filled at the fourth array, leaving nothing waiting: what waited ran then; the rest
    # waits for the flush.
    assert [i for i, _ in order] == [0, 1, 2, 3]
    later.flush()
    assert [i for i, _ in order] == list(range(len(arrays)))
    rng = np.random.default_rng(1)
    for i, (s, row) in enumerate(zip(shapes, rows)):
        u = np.maximum(rng.standard_normal(s), 0).astype(np.float32) * 3
        assert row == side_stats(u, 0.1 * i, saturated=0.5)  # bit for bit
        assert order[i][1] == row["std"]
    done = []
    later.then(lambda: done.append(1))  # nothing waits: at once
    assert done == [1]
    assert not stats.Later.takes(np.empty((1000, 200), np.float32))


def test_later_holds_a_bounded_number_of_values_whatever_the_shapes():
    # A stack per shape: a taper of many widths would otherwise keep a stack of each until the end.
    later = stats.Later()
    rng = np.random.default_rng(2)
    rows, most = [], 0
    for width in range(200, 2, -1):
        u = rng.standard_normal((60, width)).astype(np.float32)
        rows.append((later.stats(u, 0.0), u))
        most = max(most, later.held)
    assert most <= stats.LATER_ELEMENTS
    later.flush()
    assert all(row == side_stats(u, 0.0) for row, u in rows)


def test_later_runs_what_waits_once_too_many_calls_wait():
    # A stack that never fills (rows of several shapes, each short of its piece) must not keep every
    # call waiting to the end: past LATER_CALLS the waiting rows are taken and the calls run.
    later = stats.Later()
    u = np.ones((256, 128), np.float32)
    row = later.stats(u, 0.0)  # one of four slots
    ran = []
    for i in range(stats.LATER_CALLS - 1):
        later.then(lambda i=i: ran.append(i))
    assert ran == []
    later.then(lambda: ran.append("last"))
    assert len(ran) == stats.LATER_CALLS and ran[-1] == "last" and row["std"] == 0.0

"""The committed gallery cannot silently go stale: a small entry is
regenerated and compared with the one in reports/.

The committed numbers were made on another CPU. varprop's results are
bit-identical for any thread count on one machine, but float32 BLAS kernels
and NumPy's vectorised float32 log/sin/cos may round differently on a CPU
with other instructions, and a deep stack carries those last-bit differences
forward. So each column is compared on the scale of its own quantity: a mean
against that side's std (a mean 4e-4 times its std moves by its std's
rounding, not its own), channel statistics against the second moment,
cosines and fractions on their own [0, 1] scale; the rounding allowed is
1e-5 of that scale, far above float32's 6e-8 per operation compounded over
8 layers, and far below any difference a change to the engine makes.
"""

import re
from pathlib import Path

import numpy as np
import pandas as pd

from varprop import gallery

ROOT = Path(__file__).resolve().parents[1] / "reports"
ROUNDING = 1e-5  # relative to each quantity's own scale (see the module docstring)


def _masked(text: str) -> str:
    """The report's text with its numbers blanked (BLAS on another CPU may move a last digit)."""
    return re.sub(r"[-+]?\d[\d.]*(e[-+]?\d+)?", "#", text)


def _scale(frame: pd.DataFrame, column: str) -> np.ndarray:
    """The scale a column's rounding is measured against, per row."""
    side, _, stat = column.partition("_")
    if column.startswith("theory_"):
        side, _, stat = column.removeprefix("theory_").partition("_")
        side = "theory_" + side
    value = frame[column].to_numpy(float)
    if stat == "mean" and f"{side}_std" in frame:
        return frame[f"{side}_std"].to_numpy(float)
    if stat in ("sq_unit_mean", "unit_var") and f"{side}_second_moment" in frame:
        return frame[f"{side}_second_moment"].to_numpy(float)
    if stat in ("cos_sim", "abs_cos_sim", "frac_zero", "frac_saturated"):
        return np.ones(len(frame))
    return np.abs(value)


def assert_same_up_to_rounding(fresh: pd.DataFrame, committed: pd.DataFrame) -> None:
    """Every numeric column of ``fresh`` within ROUNDING of ``committed`` on its own scale; NaN where NaN."""
    assert list(fresh.columns) == list(committed.columns) and fresh.shape == committed.shape
    for column in committed.select_dtypes("number").columns:
        a, b = committed[column].to_numpy(float), fresh[column].to_numpy(float)
        assert np.array_equal(np.isnan(a), np.isnan(b)), column
        scale = _scale(committed, column)
        with np.errstate(invalid="ignore"):  # inf - inf where both overflowed: equal, caught by a == b
            ok = np.isnan(a) | (a == b) | (np.abs(a - b) <= ROUNDING * np.abs(scale))
        bad = np.flatnonzero(~ok)
        assert not bad.size, (f"{column} row {bad[0]}: {b[bad[0]]!r} against the committed {a[bad[0]]!r} "
                              f"(scale {scale[bad[0]]:.3g})")
    for column in committed.columns.difference(committed.select_dtypes("number").columns):
        assert list(fresh[column].astype(str)) == list(committed[column].astype(str)), column


def test_small_gallery_entry_regenerates_identically(tmp_path):
    committed = ROOT / "small-check"
    assert committed.is_dir(), "run `varprop gallery` and commit reports/"
    fresh = gallery.build(tmp_path, ["small-check"])[0]
    assert_same_up_to_rounding(pd.read_csv(fresh / "layers.csv"), pd.read_csv(committed / "layers.csv"))
    assert _masked((fresh / "report.md").read_text()) == _masked((committed / "report.md").read_text())


def test_the_comparison_catches_a_real_change(tmp_path):
    """A change far above rounding (1e-4 of a std) fails; the committed table passes against itself."""
    committed = pd.read_csv(ROOT / "small-check" / "layers.csv")
    assert_same_up_to_rounding(committed.copy(), committed)
    moved = committed.copy()
    row = int(np.flatnonzero(moved["post_std"].notna())[3])
    moved.loc[row, "post_std"] *= 1 + 1e-4
    try:
        assert_same_up_to_rounding(moved, committed)
    except AssertionError as exc:
        assert "post_std" in str(exc)
    else:
        raise AssertionError("a 1e-4 relative change passed")


def test_every_gallery_entry_is_committed():
    for name in gallery.ENTRIES:
        assert (ROOT / name / "report.md").is_file() and (ROOT / name / "report.html").is_file(), name

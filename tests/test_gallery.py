"""The committed gallery cannot silently go stale: a small entry is
regenerated and compared with the one in reports/."""

import re
from pathlib import Path

import numpy as np
import pandas as pd

from varprop import gallery

ROOT = Path(__file__).resolve().parents[1] / "reports"


def _masked(text: str) -> str:
    """The report's text with its numbers blanked (BLAS on another CPU may move a last digit)."""
    return re.sub(r"[-+]?\d[\d.]*(e[-+]?\d+)?", "#", text)


def test_small_gallery_entry_regenerates_identically(tmp_path):
    committed = ROOT / "small-check"
    assert committed.is_dir(), "run `varprop gallery` and commit reports/"
    fresh = gallery.build(tmp_path, ["small-check"])[0]
    a, b = pd.read_csv(committed / "layers.csv"), pd.read_csv(fresh / "layers.csv")
    assert list(a.columns) == list(b.columns) and a.shape == b.shape
    num = a.select_dtypes("number").columns
    np.testing.assert_allclose(b[num].to_numpy(float), a[num].to_numpy(float), rtol=1e-5, atol=1e-12)
    assert _masked((fresh / "report.md").read_text()) == _masked((committed / "report.md").read_text())


def test_every_gallery_entry_is_committed():
    for name in gallery.ENTRIES:
        assert (ROOT / name / "report.md").is_file() and (ROOT / name / "report.html").is_file(), name

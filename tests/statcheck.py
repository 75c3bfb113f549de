"""Helpers shared by the statistical tests."""

from scipy import stats


def z_two_sided(alpha: float) -> float:
    """The normal quantile of a two-sided test at false-alarm rate ``alpha``."""
    return float(stats.norm.isf(alpha / 2))


def t_two_sided(alpha: float, dof: int) -> float:
    """Student's t quantile of a two-sided test at false-alarm rate ``alpha``."""
    return float(stats.t.isf(alpha / 2, dof))

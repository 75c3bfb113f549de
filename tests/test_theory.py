"""Mean-field theory against closed forms, independent quadrature and exact
one-layer Monte-Carlo expectations; the fits' slopes; the theory commands."""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import integrate, special, stats

import varprop
from varprop.nn import activations as A
from varprop import fit, theory
from varprop.theory import cmap, meanfield, perlayer, quadrature
from varprop.cli import main

from statcheck import t_two_sided

ALPHA = 1e-5
SMOOTH = ["linear", "tanh", "sigmoid", "gelu", "silu", "softplus"]


def quad(f, q=1.0):
    """E[f(z)], z ~ N(0, q), by scipy's adaptive quadrature, split at 0."""
    g = lambda z: f(np.array([z]))[0] * stats.norm.pdf(z, scale=math.sqrt(q))  # noqa: E731
    opts = dict(epsabs=1e-14, epsrel=1e-13, limit=200)
    return integrate.quad(g, -np.inf, 0, **opts)[0] + integrate.quad(g, 0, np.inf, **opts)[0]


@pytest.mark.parametrize("name", A.NAMES)
@pytest.mark.parametrize("q", [1e-3, 1.0, 30.0, 1e4])
def test_quadrature_agrees_with_scipy_quad(name, q):
    act = A.get(name)
    for f in (act.phi, lambda z: act.phi(z) ** 2, lambda z: act.dphi(z) ** 2):
        ref = quad(f, q)
        assert theory.expect(f, q) == pytest.approx(ref, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("log_q", [-5.0, 0.0, 3.0, 2000.0])
def test_relu_and_linear_closed_forms(log_q):
    relu = theory.moments(A.get("relu"), log_q)
    assert relu.log_m2 == pytest.approx(log_q + math.log(0.5), abs=1e-12)  # E[relu(z)^2] = q/2
    assert relu.log_sd == pytest.approx(0.5 * log_q + 0.5 * math.log(0.5 - 1 / (2 * math.pi)), abs=1e-12)
    if log_q < 700:
        assert relu.mean == pytest.approx(math.sqrt(math.exp(log_q) / (2 * math.pi)), rel=1e-12)
    assert relu.dphi2 == pytest.approx(0.5)
    lin = theory.moments(A.get("linear"), log_q)
    assert lin.log_m2 == pytest.approx(log_q) and lin.mean == 0


@pytest.mark.parametrize("a,q", [(0.5, 1.0), (1.0, 3.0), (2.0, 0.1)])
def test_erf_second_moment(a, q):
    """E[erf(a z)^2] = (2/pi) arcsin(2 a^2 q / (1 + 2 a^2 q)) for z ~ N(0, q)."""
    exact = 2 / math.pi * math.asin(2 * a * a * q / (1 + 2 * a * a * q))
    assert theory.expect(lambda z: special.erf(a * z) ** 2, q) == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("name", ["tanh", "gelu", "sigmoid", "elu"])
def test_moments_are_continuous_into_the_limit_regimes(name):
    act = A.get(name)
    inside, outside = theory.moments(act, 599.0), theory.moments(act, 601.0)
    assert outside.log_m2 - inside.log_m2 == pytest.approx(2.0 if act.slope_pos or act.slope_neg else 0.0,
                                                           abs=1e-9)


def test_cmap_quadrature_matches_arccos_kernel():
    """The 2-D quadrature path, run on a smooth stand-in far out where it is
    relu (gelu at huge q), against the closed form at moderate q."""
    for c in (-0.5, 0.0, 0.3, 0.9):
        k = (math.sqrt(1 - c * c) + (math.pi - math.acos(c)) * c) / math.pi  # relu: E[h1 h2] / E[h^2]
        assert theory.cos_post(A.get("relu"), 0.0, c) == pytest.approx(k, rel=1e-12)
        assert theory.cos_post(A.get("gelu"), 1400.0, c) == pytest.approx(k, rel=1e-12)
    ref = integrate.dblquad(lambda y, x: np.tanh(x) * np.tanh(0.6 * x + 0.8 * y) * stats.norm.pdf(x)
                            * stats.norm.pdf(y), -10, 10, -10, 10, epsabs=1e-12)[0] / quad(lambda z: np.tanh(z) ** 2)
    assert theory.cos_post(A.get("tanh"), 0.0, 0.6) == pytest.approx(ref, rel=1e-7)


def polar_cos(act, log_q, c, points):
    """An independent c-map: E[phi(z1) phi(z2)] in polar coordinates, z1 = r cos(t - t0), z2 = r cos(t + t0)
    with r Rayleigh, t uniform and cos(2 t0) = c, by Gauss-Legendre panels graded toward the four angles
    where z1 or z2 vanishes (phi's kink or steep step) and, in r, toward 0."""
    t0 = 0.5 * math.acos(c)
    cuts = sorted({(math.pi / 2 + s * t0 + k * math.pi) % (2 * math.pi) for s in (-1, 1) for k in (0, 1)})
    cuts.append(cuts[0] + 2 * math.pi)
    g, gw = np.polynomial.legendre.leggauss(points)
    grade = np.concatenate([[0.0], 2.0 ** np.arange(-30, 1)])  # a panel's fractions, graded toward its ends
    ts, tw = [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        half = (b - a) / 2
        for lo, hi in zip(grade[:-1], grade[1:]):
            for start, sign in ((a, 1), (b, -1)):
                x = start + sign * half * (lo + (hi - lo) * (g + 1) / 2)
                ts.append(x)
                tw.append(half * (hi - lo) / 2 * gw)
    t, wt = np.concatenate(ts), np.concatenate(tw) / (2 * math.pi)
    edges = np.concatenate([[0.0], 2.0 ** np.arange(-30, 1), np.arange(1.5, 13.01, 0.5)])
    r = np.concatenate([(b - a) / 2 * g + (a + b) / 2 for a, b in zip(edges[:-1], edges[1:])])
    wr = np.concatenate([(b - a) / 2 * gw for a, b in zip(edges[:-1], edges[1:])]) * r * np.exp(-r * r / 2)
    scale = math.exp(0.5 * log_q)
    u1 = act.phi(scale * r[:, None] * np.cos(t - t0)[None, :])
    u2 = act.phi(scale * r[:, None] * np.cos(t + t0)[None, :])
    m2 = float(wr @ (u1 * u1) @ wt)
    return float(wr @ (u1 * u2) @ wt) / m2


# Activations and q where the 2-D Gauss-Hermite rule is off by 1e-4 to 7e-2 and the series takes over.
SERIES_CASES = [("tanh", 10.0), ("tanh", 100.0), ("selu", 1.0), ("elu", 1.0), ("sigmoid", 44.0),
                ("softplus", 934.0), ("silu", 30.0)]


@pytest.mark.parametrize("name,q", SERIES_CASES)
def test_cmap_series_against_an_independent_rule(name, q):
    """Within the series' own bound (the most the terms it leaves out can add) of a polar-coordinate rule,
    whose error is taken as its change from 12 to 16 points a panel."""
    act = A.get(name)
    at = cmap.AtQ(act, math.log(q), with_dphi2=False)
    for c in (-0.9, 0.3, 0.9, 0.99, 0.999):
        ref, finer = polar_cos(act, math.log(q), c, 12), polar_cos(act, math.log(q), c, 16)
        value = at.cos(c)
        assert at.needs_series()
        assert abs(value - finer) <= at.series().bound(c) + 2 * abs(finer - ref) + 1e-13, (c, value - finer)


@pytest.mark.parametrize("name,q", [("selu", 1.0), ("tanh", 100.0), ("elu", 2.0)])
def test_dphi_cross_is_the_slope_of_the_cmap(name, q):
    """Price's theorem, d/dc E[phi(z1) phi(z2)] = q E[phi'(z1) phi'(z2)], which mean_field's xi_c uses:
    against central differences of the polar rule, their error taken as the change from step 2h to h
    (the 2-D rule alone is off by 4e-3 to 1e-2 here: phi' jumps at 0, or nearly)."""
    act = A.get(name)
    at = cmap.AtQ(act, math.log(q))
    scale = math.exp(at.moments.log_m2) / q
    for c in (-0.5, 0.2, 0.6, 0.9):
        diff = [(polar_cos(act, math.log(q), c + h, 16) - polar_cos(act, math.log(q), c - h, 16)) / (2 * h) * scale
                for h in (2e-4, 1e-4)]
        assert meanfield.dphi_cross(at, c) == pytest.approx(diff[1], abs=abs(diff[1] - diff[0]) + 1e-9), c
    assert meanfield.dphi_cross(at, 1.0) == at.moments.dphi2


@pytest.mark.parametrize("name,log_q,kernel", [
    ("tanh", 400.0, lambda c: 2 / math.pi * math.asin(c)),  # tanh(e^200 x) is sign(x)
    ("gelu", 400.0, lambda c: (math.sqrt(1 - c * c) + (math.pi - math.acos(c)) * c) / math.pi),  # relu
    ("elu", 400.0, lambda c: (math.sqrt(1 - c * c) + (math.pi - math.acos(c)) * c) / math.pi),
])
def test_cmap_series_in_the_jump_and_kink_limits(name, log_q, kernel):
    """A jump's Hermite coefficients decay like k^-1.5 and a kink's like k^-2.5, the slowest the series
    meets: against the closed forms, the fitted spread of the terms left out is within 1% of their bound,
    and the series is exact to rounding wherever the bound is negligible."""
    at = cmap.AtQ(A.get(name), log_q, with_dphi2=False)
    for c in (-0.999, -0.9, -0.5, 0.0001, 0.3, 0.9, 0.99, 0.999, 0.9999):
        err = abs(at.cos(c) - kernel(c))
        assert err <= 0.01 * at.series().bound(c) + 1e-13, (c, err, at.series().bound(c))


@pytest.mark.parametrize("name", A.NAMES)
def test_cmap_stays_a_cosine(name):
    """|cos| <= 1, cos(1) = 1 and cos(-1) = E[phi(z) phi(-z)] / E[phi^2], at every q (the 2-D rule alone
    reached 1.0094 for tanh with bias 3, 1.0053 for sigmoid with unit init)."""
    act = A.get(name)
    for log_q in (-700.0, -5.0, -2.0, -1.251501000667112, -1.0, 0.0, 1.0, 2.0, 3.8, 4.6, 7.0, 12.0, 100.0, 599.0,
                  601.0):
        at = cmap.AtQ(act, log_q, with_dphi2=False)
        values = [at.cos(c) for c in (-1.0, -1 + 2.0**-53, -0.9999, -0.5, 0.5, 0.99, 0.9999, 1 - 1e-9, 1.0)]
        assert all(-1 <= v <= 1 for v in values), (log_q, values)
        assert values[-1] == 1.0
        if at.slopes is None and abs(log_q) <= 12:  # where scipy's quad can take phi directly
            assert values[0] == pytest.approx(quad(lambda z: act.phi(z) * act.phi(-z), math.exp(log_q))
                                              / quad(lambda z: act.phi(z) ** 2, math.exp(log_q)), abs=1e-10)


def test_predicted_cosines_of_deep_stacks_stay_cosines():
    for kw in (dict(activation="sigmoid", init="unit"), dict(activation="tanh", bias_std=3.0),
               dict(activation="elu", init="he", bias_std=0.1)):
        th = theory.predict(varprop.RunSpec(varprop.NetworkSpec.square(300, 100, **kw)))
        cos = th["theory_post_cos_sim"].to_numpy()[1:]
        assert np.all((cos >= -1) & (cos <= 1)), kw


@pytest.mark.parametrize("name", ["relu", "linear", "tanh", "selu"])
def test_gains_against_independent_values(name):
    act = A.get(name)
    m = quad(act.phi)
    m2 = quad(lambda z: act.phi(z) ** 2)
    g = theory.gains(name)
    assert g["second_moment_gain"] == pytest.approx(1 / math.sqrt(m2), rel=1e-10)
    assert g["variance_gain"] == pytest.approx(1 / math.sqrt(m2 - m * m), rel=1e-9)
    if name == "relu":
        assert g["second_moment_gain"] == pytest.approx(math.sqrt(2), rel=1e-13)
        assert g["variance_gain"] == pytest.approx(1 / math.sqrt(0.5 - 1 / (2 * math.pi)), rel=1e-13)
        assert abs(g["variance_gain"] - g["nfnets_gamma"]) > 1e-4  # the published constant was sampled
    if name == "tanh":
        assert g["torch_calculate_gain"] == pytest.approx(5 / 3) and abs(g["second_moment_gain"] - 5 / 3) > 0.05
    if name == "selu":  # self-normalizing: mean 0 and second moment 1 at N(0, 1), to its constants' precision
        assert g["second_moment_gain"] == pytest.approx(1.0, abs=1e-4) and abs(g["mean"]) < 1e-4


def test_gain_of_a_user_callable():
    g = theory.gains(lambda z: 2 * z)
    assert g["second_moment_gain"] == pytest.approx(0.5, rel=1e-12)


@pytest.mark.parametrize("act,sw,sb", [("tanh", 1.5, 0.05), ("tanh", 0.8, 0.1), ("sigmoid", 2.0, 0.3),
                                       ("gelu", 1.2, 0.2)])
def test_fixed_point_and_chi(act, sw, sb):
    r = theory.mean_field(act, sw, sb)
    phi = A.get(act)
    q = r["q_star"]
    assert sw**2 * quad(lambda z: phi.phi(z) ** 2, q) + sb**2 == pytest.approx(q, rel=1e-10)
    assert r["chi_1"] == pytest.approx(sw**2 * quad(lambda z: phi.dphi(z) ** 2, q), rel=1e-9)
    assert r["phase"] == ("ordered" if r["chi_1"] < 1 else "chaotic")
    if r["phase"] == "ordered":
        assert r["xi_c"] == pytest.approx(-1 / math.log(r["chi_1"]), rel=1e-9)


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "linear", "elu", "softplus"])
@pytest.mark.parametrize("excess", [1.003, 1.02, 2.0])  # (within 1e-3 of chi_1 = 1 the phase reads critical)
def test_relu_like_beyond_the_edge_explodes_and_is_not_chaotic(act, excess):
    # at large q the q-map q -> sigma_w^2 E[phi(z)^2] + sigma_b^2 multiplies q by sigma_w^2 E[phi^2] / q, which
    # tends to sigma_w^2 (a+^2 + a-^2) / 2 for slopes a+ and a- at +-infinity: beyond 1, no finite fixed point,
    # however slowly q runs away (0.3% a layer here)
    slopes = {"relu": (1, 0), "leaky_relu": (1, 0.01), "linear": (1, 1), "elu": (1, 0), "softplus": (1, 0)}[act]
    sigma_w = math.sqrt(excess * 2 / (slopes[0] ** 2 + slopes[1] ** 2))
    r = theory.mean_field(act, sigma_w, 0.1)
    assert r["q_star"] == math.inf and r["phase"] == "exploding", r
    below = theory.mean_field(act, sigma_w / math.sqrt(excess * 1.01), 0.1)
    assert below["q_star"] < math.inf and below["phase"] != "exploding"
    grid = theory.phase_grid(act, np.array([sigma_w**2, below["sigma_w"] ** 2]), np.array([0.01]))
    assert list(grid["phase"]) == [r["phase"], below["phase"]]


@pytest.mark.parametrize("act,slopes", [("relu", (1, 0)), ("leaky_relu", (1, 0.01)), ("linear", (1, 1))])
@pytest.mark.parametrize("gap", [1e-4, 1e-6])
def test_q_star_near_the_edge_of_a_homogeneous_activation(act, slopes, gap):
    # phi(a z) = a phi(z): the q-map is affine, q' = sigma_w^2 (a+^2 + a-^2) / 2 q + sigma_b^2 = (1 - gap) q +
    # sigma_b^2, so q* = sigma_b^2 / gap exactly; iterating creeps toward it by 1 - gap a step. The q-map's
    # error, its quadrature's ~1e-15 relative, moves its root by ~1e-15 / gap relative.
    sigma_w, sigma_b = math.sqrt((1 - gap) * 2 / (slopes[0] ** 2 + slopes[1] ** 2)), 0.1
    r = theory.mean_field(act, sigma_w, sigma_b)
    assert r["q_star"] == pytest.approx(sigma_b**2 / gap, rel=1e-14 / gap)
    # the phase grid gets there too: its iteration stops at steps below 1e-13 q, gap (q* - q) a step, which
    # leaves 1e-13 / gap of q* (10 times that allowed for its Aitken jumps); what it has not settled by then it
    # settles as mean_field does
    grid = theory.phase_grid(act, np.array([sigma_w**2]), np.array([sigma_b**2]))
    assert grid["q_star"].iloc[0] == pytest.approx(r["q_star"], rel=1e-12 / gap)
    # on the edge itself (sigma_w^2 rounded) a bias grows q by sigma_b^2 a layer, without end
    edge = theory.mean_field(act, sigma_w / math.sqrt(1 - gap), sigma_b)
    assert edge["q_star"] == math.inf
    grid = theory.phase_grid(act, np.array([edge["sigma_w"] ** 2]), np.array([sigma_b**2]))
    assert grid["q_star"].iloc[0] == math.inf and grid["phase"].iloc[0] == "exploding"


@pytest.mark.parametrize("act,added", [("elu", 1.0), ("selu", None), ("softplus", None)])
def test_activations_that_add_to_q_on_their_edge_run_away(act, added):
    # relu-like at +infinity (growth sigma_w^2 / 2 = 1 at He's sigma_w), but adding to q of their own: elu's
    # negative side gives q' - q -> sigma_w^2 P(z < 0) = 1, selu's more, softplus's log(2)-like offset grows
    # with sqrt(q). No bias is needed for q to run away, as it does for relu with one.
    sigma_w = math.sqrt(2) / (1.0507009873554805 if act == "selu" else 1)  # selu = lambda elu_alpha
    if added is not None:  # elu, in closed form: E[elu(x)^2] = q/2 + P(x<0) - 2 E[e^x; x<0] + E[e^2x; x<0],
        q = 1e8            # E[e^tx; x<0] = exp(t^2 q/2) Phi(-t sqrt(q)), x ~ N(0, q)
        below = 0.5 - 2 * math.exp(q / 2 + special.log_ndtr(-math.sqrt(q))) + math.exp(
            2 * q + special.log_ndtr(-2 * math.sqrt(q)))
        assert sigma_w**2 * below == pytest.approx(added, rel=1e-3)  # q' - q, the sigma_w^2 q / 2 = q cancelled
    assert theory.mean_field(act, sigma_w, 0.0)["q_star"] == math.inf


def test_tanh_just_above_its_edge_keeps_a_small_q_star():
    # q' = s q (1 - 2 q + O(q^2)) for tanh without bias: q* ~ (s - 1) / (2 s), reached by 1 - (s - 1) a step
    # (20,000 steps do not settle it at s = 1.0001); at s = 1 exactly q* = 0
    for s in (1.001, 1.0001):
        q = theory.mean_field("tanh", math.sqrt(s), 0.0)["q_star"]
        assert 0 < q and q_step_gap(s, q) < 1e-12 * q
    assert theory.mean_field("tanh", 1.0, 0.0)["q_star"] == 0


def q_step_gap(s, q):
    phi = A.get("tanh")
    return abs(s * quad(lambda z: phi.phi(z) ** 2, q) - q)


def test_criticality_of_he_relu_and_tanh_edge():
    assert theory.mean_field("relu", math.sqrt(2), 0.0)["phase"] == "critical"
    r = theory.mean_field("tanh", 1.0, 0.0)
    assert r["q_star"] == 0 and r["phase"] == "critical"


def normalized_inputs(tmp_path, n0, rows=256):
    x = np.random.default_rng(5).standard_normal((rows, n0))
    x *= math.sqrt(n0) / np.linalg.norm(x, axis=1, keepdims=True)  # every |x_i|^2 = n0: q is the same for all
    np.save(tmp_path / "x.npy", x)
    return str(tmp_path / "x.npy")


@pytest.mark.parametrize("name", ["tanh", "relu", "gelu", "sigmoid", "selu", "softplus"])
def test_one_layer_monte_carlo_matches_theory(tmp_path, name):
    """For one layer with Gaussian weights and inputs of fixed norm, z is exactly
    N(0, q) for every sample and the upstream gradient is independent of z, so
    the theory's moments of h and delta are exact expectations; the
    Monte-Carlo means over replicates must agree within their t interval."""
    n0 = 64
    spec = varprop.RunSpec(varprop.NetworkSpec(widths=(n0, 400), activation=name, init="he", bias_std=0.2),
                           input_file=normalized_inputs(tmp_path, n0), replicates=40, seed=7, backward=True,
                           dtype="float64")
    df = varprop.simulate(spec)
    for col in ("post_second_moment", "post_mean", "delta_second_moment"):
        rows = df[df["layer"] == 1]
        v = rows[col].to_numpy()
        tq = t_two_sided(ALPHA, len(v) - 1)
        assert abs(v.mean() - rows[f"theory_{col}"].iloc[0]) < tq * v.std(ddof=1) / math.sqrt(len(v)), col
    # (The input gradient delta W^T is not tested here: delta depends on W through z, so its mean-field
    # value is exact only up to O(1/fan_in) for smooth activations.)


def test_theory_for_ten_thousand_layers():
    spec = varprop.RunSpec(varprop.NetworkSpec.square(10_000, 100, activation="gelu", init="unit"), backward=True)
    th = theory.predict(spec)
    assert np.isfinite(th["theory_post_log10_std"]).all() and np.isfinite(th["theory_grad_log10_std"]).all()
    # gelu at huge scale is relu: log10 std grows by log10(sqrt(100 / 2)) per layer.
    slope = np.diff(th["theory_post_log10_std"].to_numpy()[-100:])
    np.testing.assert_allclose(slope, 0.5 * math.log10(50), rtol=1e-9)


@pytest.mark.parametrize("init,expected", [("unit", 0.5), ("fan_in", 0.0)])
def test_fan_in_law_slope(init, expected):
    base = varprop.RunSpec(varprop.NetworkSpec.square(1, 10, init=init), samples=200, replicates=10, seed=1)
    _, f = fit.fan_in_law(base, [10, 30, 100, 300, 1000, 3000])
    assert f.dof == 9 and f.slope_lo < f.slope < f.slope_hi
    assert abs(f.slope - expected) < t_two_sided(ALPHA, f.dof) * f.slope_se
    assert f.slope_se < 0.002  # and the law is pinned down tightly


def test_depth_growth_slopes_and_theory():
    """Unit and fan_in stacks share their draws, so their measured slopes differ
    by exactly log10(sqrt(n)) per layer, as the theory's do."""
    spec = varprop.NetworkSpec.square(40, 100)
    df = varprop.simulate(spec, vary={"init": ["unit", "fan_in"]}, samples=50, replicates=6, seed=2,
                          dtype="float64")
    g = fit.depth_growth(df).set_index("config")
    assert (g["burn_in"] == 4).all()
    assert g.loc["unit", "slope"] - g.loc["fan_in", "slope"] == pytest.approx(1.0, abs=1e-9)
    assert g.loc["unit", "theory_slope"] == pytest.approx(1.0) and g.loc["fan_in", "theory_slope"] == 0
    assert (g["slope_lo"] < g["slope"]).all() and (g["slope"] < g["slope_hi"]).all()


def test_a_flat_mean_field_has_no_slope():
    """relu under He: the q-map keeps q exactly but for float64 rounding, which is not reported as a slope
    (the report printed 4.842e-17 per layer); a real slope of that layer count is kept."""
    spec = varprop.NetworkSpec.square(50, 64, init="he", activation="relu")
    df = varprop.simulate(spec, vary={"gain": [math.sqrt(2), 1.001 * math.sqrt(2)]}, samples=32, replicates=2)
    flat, rising = fit.depth_growth(df)["theory_slope"]
    assert flat == 0 and rising == pytest.approx(math.log10(1.001), rel=1e-6)


def test_theory_gain_fit_commands(tmp_path):
    r = CliRunner().invoke(main, ["theory", "--activation", "tanh", "--sigma-w", "1.5", "--sigma-b", "0.05",
                                  "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["phase"] == "chaotic" and data["chi_1"] > 1
    r = CliRunner().invoke(main, ["theory", "--activation", "relu", "--sigma-w", "1.4142135623730951",
                                  "--layers", "3"])
    assert r.exit_code == 0 and "critical" in r.output and "post_std" in r.output
    # there every q is a fixed point: the q_0 the iteration started from is not named as "the" q*
    assert "fixed point q*                           every q (the q-map is the identity" in r.output
    r = CliRunner().invoke(main, ["gain", "gelu"])
    assert r.exit_code == 0 and "1.7009" in r.output
    r = CliRunner().invoke(main, ["fit", "--init", "unit", "--fan-in", "10,100,1000", "--samples", "50",
                                  "--replicates", "2", "--out", str(tmp_path / "fit"), "--json"])
    assert r.exit_code == 0, r.output
    assert abs(json.loads(r.output)["fit"]["slope"] - 0.5) < 0.05
    assert {p.name for p in (tmp_path / "fit").iterdir()} == {".varprop-manifest.json", "points.csv", "fit.json",
                                                              "fan_in_law.png", "report.md",
                                                              "report.html"}
    for bad, option in ((["theory", "--sigma-w", "-1"], "--sigma-w"), (["gain", "nope"], "ACTIVATION:"),
                        (["fit", "--fan-in", "0,10"], "--fan-in"),
                        (["theory", "--layers", "100000000"], "--layers")):
        r = CliRunner().invoke(main, bad)
        assert r.exit_code == 2 and option in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert "--max-memory" not in r.stderr  # theory has no such option to suggest


@pytest.mark.parametrize("name", ["tanh", "selu"])
def test_phase_grid_agrees_with_single_points_and_the_known_edge(name):
    """The grid iterates the same maps as mean_field, all points at once, with an 8-point rule for q* (a
    24-point one there): q* and chi_1 to 1e-6, and so c* and xi_c to 1e-5, away from the critical line
    (chi_1 within 2% of 1), where c* moves by only ~1 - 1/xi_c a step and the grid stops at 2,000."""
    grid = theory.phase_grid(name, [0.64, 1.0, 2.25], [0.0, 0.01, 0.09])
    for _, row in grid.iterrows():
        one = theory.mean_field(name, math.sqrt(row["sigma_w2"]), math.sqrt(row["sigma_b2"]))
        if 1e-6 < one["q_star"] < 1e100:  # away from the sigma_b = 0 collapse, where q* -> 0 only slowly
            assert row["q_star"] == pytest.approx(one["q_star"], rel=1e-6)
            assert row["chi_1"] == pytest.approx(one["chi_1"], rel=1e-6)
            if abs(row["chi_1"] - 1) > 0.02:
                assert row["c_star"] == pytest.approx(one["c_star"], abs=1e-5)
                assert row["xi_c"] == pytest.approx(one["xi_c"], rel=1e-5)
    if name != "tanh":
        return
    # tanh with no bias: q* = 0 for sigma_w^2 <= 1 where chi_1 = sigma_w^2 tanh'(0)^2 = sigma_w^2.
    edge = grid[(grid["sigma_b2"] == 0) & (grid["sigma_w2"] < 1)].iloc[0]
    assert edge["chi_1"] == pytest.approx(0.64, rel=1e-6) and edge["phase"] == "ordered"


def test_phase_grid_settles_q_star_near_the_critical_line():
    """selu near sigma_w^2 = 1.8, where the q-map's slope at q* is 0.994 and 0.9992 (xi_q 160 and 1300
    layers): the grid's q* must be a fixed point of its own 8-point map (it stopped at 431 and 893 of
    471 and 3592 after a fixed 400 steps), and mean_field's (24 points) but for the two rules'
    difference, ~1e-8 of the map, times 1 / (1 - slope): within 1e-5."""
    act = A.get("selu")
    x, w = theory.nodes(8)
    for sw2, sb2 in ((1.8, 0.4), (1.81, 0.0)):
        q = float(theory.phase_grid(act, [sw2], [sb2])["q_star"].iloc[0])
        assert sw2 * (act.phi(math.sqrt(q) * x) ** 2 @ w) + sb2 == pytest.approx(q, rel=1e-12)
        assert q == pytest.approx(theory.mean_field(act, math.sqrt(sw2), math.sqrt(sb2))["q_star"], rel=1e-5)


def test_phase_command(tmp_path):
    r = CliRunner().invoke(main, ["phase", "--activation", "tanh", "--resolution", "8", "--out",
                                  str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    assert {p.name for p in (tmp_path / "p").iterdir()} == {".varprop-manifest.json", "phase.csv", "phase.png",
                                                            "report.md", "report.html"}


@pytest.mark.parametrize("activation,init", [("linear", "fan_in"), ("relu", "he")])
def test_finite_width_band_for_single_sample_stacks(activation, init):
    """One sample through a Gaussian stack: log |h|^2 is a sum of independent
    log chi-square terms, so the band must hold 95% of networks (binomial
    interval) and the typical line their mean log std (t interval)."""
    spec = varprop.RunSpec(varprop.NetworkSpec.square(30, 64, activation=activation, init=init), samples=1,
                           replicates=400, seed=8, dtype="float64")
    df = varprop.simulate(spec)
    last = df[df["layer"] == 30]
    # One sample: the std over units; the band is for it (mean-field ratio of std to RMS).
    v = last["post_log10_std"].to_numpy()
    lo, hi = last["theory_post_log10_std_lo"].iloc[0], last["theory_post_log10_std_hi"].iloc[0]
    outside = int(np.sum((v < lo) | (v > hi)))
    k_lo, k_hi = stats.binom.ppf([ALPHA / 2, 1 - ALPHA / 2], len(v), 0.05)
    assert k_lo <= outside <= k_hi, outside
    typical = last["theory_post_log10_std_typical"].iloc[0]
    assert abs(v.mean() - typical) < t_two_sided(ALPHA, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))


# --- predict's fast paths against the plain computations they replace ---------------------------------

def plain_moments(act, log_q):
    """theory.moments as it was: the 1-D rule through apply_scaled, closed forms only for a+ z / a- z."""
    if act.homogeneous or (0.5 * log_q > A.LOG_DIRECT and (act.slope_pos or act.slope_neg)):
        return theory.moments(act, log_q)
    x, w = theory.nodes()
    u, log_s = A.apply_scaled(act, x, 0.5 * log_q)
    m, m2 = float(w @ u), float(w @ (u * u))
    var = float(w @ (u - m) ** 2)
    d = A.dphi_scaled(act, x, 0.5 * log_q)
    mean = m * math.exp(log_s) if log_s < 700 else math.copysign(math.inf, m) if m else 0.0
    return theory.Moments(mean, log_s + 0.5 * math.log(var) if var > 0 else -math.inf,
                          2 * log_s + math.log(m2) if m2 > 0 else -math.inf, float(w @ (d * d)),
                          math.log(abs(m)) + log_s if m else -math.inf)


def plain_cos(act, log_q, c):
    """theory.cos_post as it was: phi at all 48 x 48 pairs of the 2-D rule."""
    c = min(max(c, -1.0), 1.0)
    if act.homogeneous or (0.5 * log_q > A.LOG_DIRECT and (act.slope_pos or act.slope_neg)):
        return theory.cos_post(act, log_q, c)
    x1, w1 = np.polynomial.hermite_e.hermegauss(48)
    x, y, w = x1[:, None], x1[None, :], np.outer(w1, w1) / w1.sum() ** 2
    u1, l1 = A.apply_scaled(act, np.broadcast_to(x, w.shape).copy(), 0.5 * log_q)
    u2, l2 = A.apply_scaled(act, c * x + math.sqrt(max(0.0, 1 - c * c)) * y, 0.5 * log_q)
    cross = float(np.sum(w * u1 * u2)) * math.exp(l1 + l2 - 2 * max(l1, l2))
    log_m2 = plain_moments(act, log_q).log_m2
    return cross * math.exp(2 * max(l1, l2) - log_m2) if math.isfinite(log_m2) else math.nan


@pytest.mark.parametrize("name", A.NAMES)
def test_expectations_match_the_plain_rules(name):
    """One evaluation of phi per q for both rules, phi left unscaled where it cannot overflow, the 2-D
    rule's pairs of negligible weight left out, and the closed forms of a linear phi at tiny q, all agree
    with the plain rules (cos where the 2-D rule is used). Tolerance 1e-12 on logs,
    on cos (a ratio of order one) and on means relative to the sd: the plain rules' own rounding reaches
    ~1e-13 at |log q| ~ 1300, in exp(2 log s - log E[phi^2]) (an ulp of 2 log s)."""
    act = A.get(name)
    for log_q in (-1300.0, -700.0, -599.0, -40.0, -5.0, 0.0, 3.0, 8.0, 599.0, 601.0, 1400.0):
        fast, plain = theory.moments(act, log_q), plain_moments(act, log_q)
        assert fast.log_m2 == pytest.approx(plain.log_m2, rel=0, abs=1e-12)
        assert fast.log_sd == pytest.approx(plain.log_sd, rel=0, abs=1e-12)
        assert abs(fast.mean - plain.mean) <= 1e-12 * (abs(plain.mean) + math.exp(min(plain.log_sd, 700)))
        # log |mean| on the same scale (its relative error, allowed 1e-12 of the sd), wherever the mean is
        # more than a rounding of 0
        if math.isfinite(plain.log_abs_mean) and plain.log_abs_mean > plain.log_sd - 20:
            allowed = 1e-12 * max(1.0, math.exp(plain.log_sd - plain.log_abs_mean))
            assert abs(fast.log_abs_mean - plain.log_abs_mean) <= allowed, (name, log_q)
        assert fast.dphi2 == pytest.approx(plain.dphi2, rel=1e-13)
        at = cmap.AtQ(act, log_q, with_dphi2=False)
        for c in (-1.0, -0.7, 0.0, 1e-19, -1e-19, 1e-17, -1e-13, 1e-9, 0.3, 0.999, 1 - 2.0**-53, 1.0, 1.2):
            if at.needs_series() or (at.slopes is None and not cmap.NEGLIGIBLE_C <= abs(c) < 1):
                continue  # the series, or the 1-D rule at c = +-1 and c ~ 0: tested against other rules above
            assert theory.cos_post(act, log_q, c) == pytest.approx(plain_cos(act, log_q, c), rel=0, abs=1e-12,
                                                                   nan_ok=True), (log_q, c)


def test_dphi2_at_many_q_at_once():
    """predict takes E[phi'(z)^2] for all layers in one pass; against moments one q at a time, to the
    rounding of a 720-term sum taken in another order."""
    log_q = np.array([-1300.0, -40.0, -3.0, 0.0, 5.0, 599.0, 601.0, 1400.0])
    for name in A.NAMES:
        act = A.get(name)
        np.testing.assert_allclose(perlayer.dphi2_at(act, log_q), [theory.moments(act, lq).dphi2 for lq in log_q],
                                   rtol=1e-13)


@pytest.mark.parametrize("kw,repeats", [
    (dict(activation="sigmoid"), True),  # q and c reach a fixed point
    (dict(activation="softplus", init="torch-default"), True),  # and c >= 1: phi(z2) on 48 nodes
    (dict(activation="selu"), True),  # q fixed from the start, c still moving
    (dict(activation="tanh", bias_std=0.1, init="he"), True),
    (dict(activation="tanh"), False),  # c stays ~0: the 2-D rule factors
    (dict(activation="gelu"), False),  # into the closed forms of tiny q
    (dict(activation="elu", init="he", bias_std=0.1), False),
    (dict(activation="relu", init="he", bn_layers=(3, 100, 101)), False),
    (dict(activation="tanh", bn_layers=(5, 250), bn_position="post", output_activation="linear"), False),
])
def test_reused_steps_are_the_full_recursion_bitwise(kw, repeats):
    """predict copies a layer's step when its inputs (shape, activation, BN, log E[h^2], cos) are bitwise
    those of an earlier layer, and reuses the expectations of a q met before. A deterministic function of
    bitwise-equal inputs returns bitwise-equal outputs, so the tolerance is zero."""
    spec = varprop.RunSpec(varprop.NetworkSpec.square(500, 100, **{"init": "fan_in", **kw}), backward=True)
    scheme = spec.network.init.resolve()
    fast = np.array(perlayer.forward(spec, scheme, 0.0, 0.0))
    np.testing.assert_array_equal(fast, np.array(perlayer.forward(spec, scheme, 0.0, 0.0, reuse=False)))
    assert (np.unique(fast[:, 0]).size < 250) == repeats  # q repeats: the shortcut is exercised


def test_logaddexp_is_numpys():
    values = [-math.inf, math.inf, math.nan, 0.0, -0.0, 1.0, -700.0, 700.0, 1e-300, 3.3, -2.7, 1e308, -1e308]
    values += list(np.random.default_rng(0).normal(0, 50, 200))
    for a in values:
        for b in values:
            with np.errstate(all="ignore"):
                expected = float(np.logaddexp(a, b))
            got = quadrature.logaddexp(a, b)
            assert got == expected or (math.isnan(got) and math.isnan(expected))


@pytest.mark.parametrize("residual", [False, True])
def test_theory_columns_overflow_where_float64_ends(residual):
    # A unit-init linear stack of width 100 multiplies the gradient's second moment by 100 a layer (or
    # block): 100**154 = 1e308 still fits in float64 and must be reported, 1e310 must be inf, as the
    # measured columns are (one overflow rule, logscale.exp_times, for every column).
    opts = {"width": 100, "init": "unit", "backward": True, "samples": 8}
    opts.update({"residual": "plain", "alpha": 1, "blocks": 160, "branch_depth": 1} if residual
                else {"layers": 160})
    df = theory.predict(varprop.spec.from_options(opts)).set_index("layer")
    log10_m2 = 2 * df["theory_grad_log10_std"]
    fits = log10_m2 < math.log10(np.finfo(float).max)
    assert fits.any() and (~fits).any()
    m2 = df["theory_grad_second_moment"]
    assert np.isfinite(m2[fits]).all() and np.isinf(m2[~fits]).all()
    np.testing.assert_allclose(np.log10(m2[fits]), log10_m2[fits], rtol=0, atol=1e-12)
    assert np.isfinite(df.loc[fits[fits].index, "theory_grad_std"]).all()

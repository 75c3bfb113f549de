"""Residual stacks: Monte Carlo against each scheme's recursion, the
identities at init (SkipInit, Fixup), the stated variances of Fixup and
NF-ResNets, depth without overflow, determinism and bad input."""

import math

import numpy as np
import pytest
from click.testing import CliRunner
from statcheck import t_two_sided

import varprop
from varprop.cli import main
from varprop.nn import layers
from varprop import stats
from varprop.montecarlo.run import run_configs
from varprop.report import markdown
from varprop.report import residual as residual_report
from varprop.report.document import to_markdown
from varprop.spec import expand, from_options, to_options
from varprop.theory import gains

ALPHA = 1e-4  # false-alarm rate of each statistical comparison (fixed seeds: a failure is a real miss)


def _run(replicates=24, **options):
    base = {"width": 64, "samples": 64, "init": "he", "activation": "relu", "backward": True, "seed": 3}
    merged = {k: v for k, v in {**base, **options, "replicates": replicates}.items() if v is not None}
    return varprop.simulate(from_options(merged))


def _assert_mean(df, column, layer, rel_bias=0.0):
    """The replicate mean of ``column`` at ``layer`` agrees with the theory's, within the t interval of the mean
    (and ``rel_bias`` of it: the finite-width bias of a mean-field prediction that is not exact)."""
    side, stat = column.split("_", 1)
    rows = df[df["layer"] == layer]
    x = rows[column].to_numpy()
    theory = float(rows[f"theory_{column}"].iloc[0])
    half = t_two_sided(ALPHA, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    assert abs(x.mean() - theory) <= half + rel_bias * theory, (column, layer, x.mean(), theory, half)


# The second-moment recursion is exact in expectation at any width for relu and linear branches with Gaussian
# weights whose activations read dense outputs (the original order): given the layer below, each unit of
# z = h W is Gaussian, E[relu(z)^2] = E[z^2] / 2, and the last dense layer's zero-mean weights make the skip
# and the branch uncorrelated. No finite-width allowance there. (In the pre-activation order the lead relu reads
# the stream, skewed at finite width: test_preact_relu_reads_a_skewed_stream.)
EXACT = [
    {"residual": "plain", "blocks": 12, "branch_order": "original"},
    {"residual": "plain", "alpha": "1/sqrt(L)", "blocks": 30, "branch_depth": 1, "activation": "leaky_relu",
     "branch_order": "original"},
    {"residual": "plain", "alpha": "1/sqrt(l)", "blocks": 10, "branch_depth": 3, "branch_order": "original",
     "activation": "linear", "init": "fan_in", "width": 32},
]


@pytest.mark.parametrize("options", EXACT, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_exact_recursions_forward_and_backward(options):
    df = _run(**options)
    blocks = options["blocks"]
    for layer in (blocks // 2, blocks):
        _assert_mean(df, "post_second_moment", layer)
        _assert_mean(df, "pre_second_moment", layer)
    # Backward the recursion assumes the backward weights independent of the forward ones (mean field):
    # exact for linear branches; for relu a finite-width bias of order 1/width per block, bounded here by
    # blocks / width.
    bias = 0.0 if options.get("activation") == "linear" else blocks / options.get("width", 64)
    _assert_mean(df, "grad_second_moment", 0, bias)


def test_preact_relu_reads_a_skewed_stream():
    """Pre-activation order at width 4: the stream after a block is x + W relu(x), skewed (E[x^3] > 0), so the
    next lead relu keeps more than half of E[x^2] and the mean runs above the recursion q_l = 2 q_(l-1) (alpha
    = 1, branch depth 1, He init), which is exact at block 1 alone, where the stream is the Gaussian input. The
    report calls the preact recursion an infinite-width limit for this reason."""
    df = _run(replicates=4000, residual="plain", alpha=1.0, blocks=3, branch_depth=1, width=4, samples=8,
              backward=False)
    _assert_mean(df, "post_second_moment", 1)
    rows = df[df["layer"] == 3]["post_second_moment"].to_numpy()
    theory = float(df[df["layer"] == 3]["theory_post_second_moment"].iloc[0])
    t = (rows.mean() - theory) / (rows.std(ddof=1) / math.sqrt(len(rows)))
    assert t > t_two_sided(ALPHA, len(rows) - 1), (rows.mean(), theory, t)


def test_smooth_activation_at_large_width():
    """tanh's q-map is the mean-field (infinite-width) one; at width 512 its bias (order 1/width per layer) is
    far inside the sampling error of 16 replicates."""
    df = _run(replicates=16, residual="plain", alpha=0.5, blocks=6, width=512, activation="tanh", init="xavier",
              samples=32)
    _assert_mean(df, "post_second_moment", 6, rel_bias=6 / 512)
    _assert_mean(df, "grad_second_moment", 0, rel_bias=6 / 512)
    _assert_mean(df, "post_cos_sim", 6, rel_bias=0.0)


def test_bn_at_branch_end_adds_alpha_squared():
    """De & Smith (2020): with batch norm ending each branch, Var f = 1 per batch channel (up to eps), so
    q_l = q_0 + l alpha^2, at any width."""
    df = _run(replicates=8, residual="bn-end", alpha=0.5, blocks=20, bn_eps=0.0)
    for layer in (10, 20):
        rows = df[df["layer"] == layer]
        # Each BN channel has exactly unit variance over its batch, so alpha^2 E[f^2] is exact; the stream's
        # second moment is q_0 (measured) + l alpha^2 plus the branches' cross terms, zero in expectation.
        expected = df[df["layer"] == 0]["post_second_moment"].to_numpy() + layer * 0.25
        assert np.allclose(rows["pre_second_moment"], 0.25, rtol=1e-5)
        diff = rows["post_second_moment"].to_numpy() - expected
        half = t_two_sided(ALPHA, len(diff) - 1) * diff.std(ddof=1) / math.sqrt(len(diff))
        assert abs(diff.mean()) <= half
        assert float(rows["theory_post_second_moment"].iloc[0]) == pytest.approx(1 + layer * 0.25, rel=1e-12)


@pytest.mark.parametrize("scheme", ["skipinit", "fixup"])
def test_zero_branch_is_exactly_the_identity(scheme):
    df = _run(replicates=2, residual=scheme, blocks=8)
    for _, rep in df.groupby("replicate"):
        for side in ("post", "grad"):
            col = rep[f"{side}_second_moment"].to_numpy()
            assert (col == col[0 if side == "post" else -1]).all()  # bit for bit
        assert (rep["pre_second_moment"].iloc[1:] == 0).all()
        assert (rep["delta_second_moment"].iloc[1:] == 0).all()
    # what a block adds is the zero vector: its cosine to another is undefined, measured and in theory alike
    assert df[df["layer"] > 0][["pre_cos_sim", "theory_pre_cos_sim"]].isna().all().all()
    if scheme == "skipinit":  # the branch is measured though it adds nothing, and its weights get no gradient
        assert (df[df["layer"] > 0]["branch_second_moment"] > 0).all()
        assert (df[df["layer"] > 0]["weight_grad_norm"] == 0).all()


def test_fixup_scales_the_branch_by_depth():
    """Fixup (Zhang et al. 2019): the last branch layer starts at 0 and the others are scaled by
    L^(-1/(2m-2)), so each branch's hidden units have second moment 1/L of He's: with a relu lead, He
    dense and relu, E[a^2] = q / (2L). The zero layer's weight gradient a^T g then has
    E||a^T g||_F^2 = N n^2 E[a^2] E[g^2] exactly (g is the N(0, 1) upstream gradient, independent of a)."""
    blocks, n, samples = 16, 64, 64
    df = _run(replicates=6, residual="fixup", blocks=blocks)
    x = df[df["layer"] > 0]
    q0 = df[df["layer"] == 0]["post_second_moment"].to_numpy()  # the stream, unchanged by every block
    g2 = df[df["layer"] == 0]["grad_second_moment"].to_numpy()
    expected = samples * n * n * (q0 / (2 * blocks)) * g2
    ratio = (x["weight_grad_norm"].to_numpy() ** 2).reshape(len(q0), blocks) / expected[:, None]
    per_rep = ratio.mean(axis=1)
    half = t_two_sided(ALPHA, len(per_rep) - 1) * per_rep.std(ddof=1) / math.sqrt(len(per_rep))
    assert abs(per_rep.mean() - 1) <= half


def test_nf_resnet_stated_variance_and_gamma():
    """NF-ResNets (Brock et al. 2021): the stream's expected variance is 1 + l alpha^2 and each branch's
    is 1 (scaled weight standardisation and gamma). Var of a centred unit-norm projection is that of its
    input over units, n/(n-1) of the theory's; at width 256 that is within 0.4%, inside the allowance."""
    g = gains("relu")
    assert g["variance_gain"] == pytest.approx(1 / math.sqrt(0.5 - 0.5 / math.pi), rel=1e-12)
    assert g["nfnets_gamma"] == pytest.approx(1.7139588594436646) and abs(g["nfnets_gamma"] - 1.712859) > 1e-3
    df = _run(replicates=10, residual="nf", blocks=25, width=256)
    for layer in (12, 25):
        rows = df[df["layer"] == layer]
        assert float(rows["theory_post_second_moment"].iloc[0]) == pytest.approx(1 + layer * 0.04, rel=1e-9)
        _assert_mean(df, "post_second_moment", layer, rel_bias=1 / 256)
        res_var = rows["branch_second_moment"].to_numpy()
        half = t_two_sided(ALPHA, len(res_var) - 1) * res_var.std(ddof=1) / math.sqrt(len(res_var))
        assert abs(res_var.mean() - 1) <= half + 1 / 256
    stack = layers.build(from_options({"residual": "nf", "blocks": 3, "width": 8, "activation": "relu"}).network)
    assert [round(k.beta**2, 12) for k in stack] == [1.0, 1.04, 1.08]


@pytest.mark.slow
def test_ten_thousand_blocks_without_overflow():
    """alpha = 1 with a variance-preserving branch doubles the variance per block: 2^10000 at the end,
    carried in log scale, forward and backward; its theory too. (At width 8 a branch can switch off for
    good -- every unit of the collapsed stream negative, so relu passes nothing -- and the stream then
    stops growing: a real finding, not this test's subject; width 32 keeps the branches alive.)"""
    df = _run(replicates=1, residual="plain", blocks=10_000, width=32, samples=8, branch_depth=1)
    last = df[df["layer"] == 10_000].iloc[0]
    assert math.isinf(last["post_std"]) and math.isinf(last["theory_post_std"])
    assert last["theory_post_log10_std"] == pytest.approx(5000 * math.log10(2), rel=1e-12)
    # One network drifts below the mean (the typical network) by a fraction of log 2 per block.
    assert 0.8 * last["theory_post_log10_std"] < last["post_log10_std"] < 1.01 * last["theory_post_log10_std"]
    first = df[df["layer"] == 0].iloc[0]
    assert first["grad_log10_std"] > 1000 and np.isfinite(df["grad_log10_std"]).all()
    assert np.isfinite(df["post_log10_std"]).all()


def test_bit_identical_across_thread_counts():
    runs = []
    for threads in (1, 2):
        for scheme in ("nf", "bn-end"):
            spec = from_options({"residual": scheme, "blocks": 5, "width": 96, "samples": 256, "backward": True,
                                 "activation": "gelu", **({"bn": "all"} if scheme == "bn-end" else {})})
            runs.append(varprop.simulate(spec, threads=threads))
        staged = {"residual": "plain", "widths": [96, 96, 192, 192], "projection": True, "samples": 256,
                  "backward": True, "activation": "relu", "branch_order": "original", "bn": "all"}
        runs.append(varprop.simulate(from_options(staged), threads=threads))
    assert runs[0].equals(runs[3]) and runs[1].equals(runs[4]) and runs[2].equals(runs[5])


def test_projection_shortcuts_follow_the_recursion():
    """A stage's first block projects its lead's output, relu(x): He's 2 / n_in times relu's E[x^2] / 2 keeps
    the skip's second moment at the stream's, so q still doubles per block (exact in expectation, as the plain
    stack's); backward, the finite-width bias of relu's mean-field gradients, blocks / width."""
    options = {"residual": "plain", "widths": [32, 32, 32, 64, 64, 128], "projection": True, "samples": 64,
               "init": "he", "activation": "relu", "backward": True, "seed": 5, "replicates": 24}
    df = varprop.simulate(from_options(options))
    theory = df.groupby("layer")["theory_post_second_moment"].first()
    assert list(theory) == pytest.approx([2.0**block for block in range(6)], rel=1e-12)
    for block in (3, 5):  # the transitions, 32 -> 64 and 64 -> 128
        _assert_mean(df, "post_second_moment", block)
        _assert_mean(df, "pre_second_moment", block)
    _assert_mean(df, "grad_second_moment", 0, 5 / 32)
    assert df[df["layer"] == 3]["fan_in"].iloc[0] == 32 and df[df["layer"] == 3]["width"].iloc[0] == 64


@pytest.mark.parametrize("options", [
    {"residual": "plain", "blocks": 3, "init": "he"},  # linear hidden layers of variance gain 2
    {"residual": "plain", "widths": [64, 64, 32, 32, 128], "projection": True, "init": "xavier", "width": None,
     "branch_order": "original"},  # and xavier's 2 / (n_in + n_out) through transitions that shrink and grow
])
def test_linear_branches_whose_layers_do_not_preserve_the_variance(options):
    """Linear branches with Gaussian weights: the recursion is exact in expectation whatever each dense layer's
    n v, which a next layer must read from the layer before it (it read the branch's input)."""
    df = _run(**{"activation": "linear", "backward": False, **options})
    last = int(df["layer"].max())
    for block in range(1, last + 1):
        _assert_mean(df, "post_second_moment", block)
        _assert_mean(df, "pre_second_moment", block)


def test_memory_plan_counts_every_branch_layer_and_projection():
    from varprop.montecarlo import memory

    spec = from_options({"residual": "plain", "widths": [64, 4096], "projection": True})
    # branch 64 x 4096 and 4096 x 4096, projection 64 x 4096, float32
    assert memory.weight_bytes(spec) == 4 * (64 * 4096 + 4096 * 4096 + 64 * 4096)
    assert memory.working_bytes(spec) >= 2 * 4 * 4096 * 4096
    skip = residual_report.theory_scope({"residual": "skipinit", "widths": [8, 16], "projection": True,
                                         "activation": "relu", "init": "he"})
    assert "bit for bit" not in skip and "projection shortcuts carry the signal" in skip, skip
    # zero branches: the lead relu reads a projection's Gaussian output, never a skewed stream: still exact
    assert "forward second moments: the exact mean" in skip, skip


def test_projection_of_an_input_with_no_variance(tmp_path):
    """Constant inputs (a mean and no variance) projected in the original order: the theory reads a variance of
    0 (it raised a math domain error)."""
    np.save(tmp_path / "const.npy", np.ones((16, 8), np.float32))
    df = varprop.simulate(from_options({"residual": "plain", "widths": [8, 16], "projection": True,
                                        "branch_order": "original", "input_file": str(tmp_path / "const.npy")}))
    assert np.isfinite(df["theory_post_second_moment"]).all()


def test_nf_transition_resets_the_expected_variance():
    """NF-ResNets' transition block: its skip projects gamma phi(x / beta), of variance 1, so the expected
    variance starts again from 1 + alpha^2 (Brock et al. 2021)."""
    net = from_options({"residual": "nf", "widths": [8, 8, 8, 16, 16], "projection": True,
                        "activation": "relu"}).network
    stack = layers.build(net)
    assert [round(k.beta**2, 12) for k in stack] == [1.0, 1.04, 1.08, 1.04]
    assert [k.projection is not None for k in stack] == [False, False, True, False]
    df = _run(replicates=10, residual="nf", width=None, widths=[128] * 3 + [256] * 3, projection=True)
    theory = df.groupby("layer")["theory_post_second_moment"].first()
    assert list(theory) == pytest.approx([1, 1.04, 1.08, 1.04, 1.08, 1.12], rel=1e-9)
    for block in (3, 5):  # Var of a centred unit-norm projection: n / (n - 1) of the theory's, as in a stage
        _assert_mean(df, "post_second_moment", block, rel_bias=1 / 128)


@pytest.mark.parametrize("args, option", [
    (["--residual", "plain", "--alpha", "-1"], "--alpha"),
    (["--residual", "plain", "--alpha", "nan"], "--alpha"),
    (["--residual", "plain", "--branch-depth", "0"], "--branch-depth"),
    (["--residual", "plain", "--widths", "8,16,8"], "--widths"),
    (["--residual", "plain", "--widths", "8,8,8", "--projection"], "--projection"),
    (["--widths", "8,16,8", "--projection"], "--projection"),
    (["--residual", "skipinit", "--alpha", "0.5"], "--alpha"),
    (["--residual", "nf", "--bn", "all"], "--bn"),
    (["--residual", "plain", "--layers", "5"], "--layers"),
    (["--blocks", "5"], "--blocks"),
])
def test_bad_input_one_line_exit_2(tmp_path, args, option):
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["simulate", *args, "--out", str(out)])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"varprop: error: {option}:"), r.output
    assert not out.exists()


@pytest.mark.parametrize("shape, dtype", [((300, 700), np.float32), ((5, 3), np.float64), ((1, 1), np.float32)])
def test_mean_square_is_side_stats_own(shape, dtype):
    """The residual blocks' scale-only pass gives the very mean square the full statistics give (its bits set
    the next product's prescale, so the numbers must not move); 300 x 700 spans several of its pieces."""
    u = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    assert stats.mean_square(u) == stats.side_stats_ms(u, 0.0)[1]


def test_residual_report_speaks_of_blocks():
    run = run_configs(expand({"residual": ["plain", "nf"], "blocks": 6, "width": 16, "samples": 16,
                              "activation": "relu", "init": "he", "replicates": 2}))
    text = to_markdown(markdown.build_document(run, "std.png"))
    assert text.startswith("# varprop: 6 residual blocks of width 16")
    assert "| `--blocks`" in text and "`--layers`" not in text and "## Per-block statistics" in text
    assert "## Std per block" in text and "healthy through 6 blocks" in text and " layer" not in text.split(
        "## Residual blocks")[0].replace("layers.csv", "").replace("dense layer", "").replace("the layer below", "")
    assert "block" in markdown.terminal_table(run).splitlines()[1]


def test_a_collapse_is_one_finding_from_the_block_on_which_it_holds():
    run = run_configs(expand({"residual": "plain", "blocks": 20, "width": 64, "samples": 64, "activation": "relu",
                              "init": "he", "replicates": 2}))
    findings = to_markdown(markdown.build_document(run, "std.png")).split("## Findings")[1].split("One verdict")[0]
    cos = run.summary.set_index("layer")["post_abs_cos_sim"]
    start = max(cos.index[cos <= 0.9]) + 1  # above 0.9 from here to the last block
    assert 1 < start < 20 and findings.count("collapse") == 1
    assert f"the inputs collapse onto one direction from block {start} (mean |cos| between samples " \
           f"{cos[20]:.3f} at block 20)" in findings


@pytest.mark.parametrize("options, exact", [
    ({"residual": "plain", "activation": "relu", "init": "he", "branch_order": "original"}, True),
    ({"residual": "plain", "activation": "relu", "init": "he"}, False),  # the lead relu reads a skewed stream
    ({"residual": "plain", "activation": "linear", "init": "fan_in"}, True),
    ({"residual": "plain", "activation": "tanh", "init": "xavier"}, False),
    ({"residual": "skipinit", "activation": "tanh", "init": "xavier"}, True),
    ({"residual": "nf", "activation": "relu", "init": "he"}, False),
    ({"residual": "plain", "activation": "relu", "init": "he", "distribution": "uniform"}, False),
])
def test_theory_scope(options, exact):
    """Exact at any width: linear branches, relu ones in the original order, with Gaussian weights (the
    forward mean), and zero branches;
    a limit otherwise (the claim is held to what the exact-recursion tests above check)."""
    spec = from_options({**options, "blocks": 3, "width": 8})
    scope = residual_report.theory_scope(to_options(spec))
    assert scope.startswith("exact") or scope.startswith("forward second moments: the exact mean") if exact else \
        scope.startswith("an infinite-width limit")

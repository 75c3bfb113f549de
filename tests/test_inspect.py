"""varprop inspect: a user's own PyTorch model, measured with hooks, against statistics computed by hand."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from click.testing import CliRunner  # noqa: E402

from varprop.nn import inits  # noqa: E402
from varprop.cli import main  # noqa: E402
from varprop.montecarlo.seeds import generator  # noqa: E402
from varprop.errors import SpecError  # noqa: E402
from varprop.stats import side_stats  # noqa: E402
from varprop.torch import (assert_preserves_variance, check_preserves_variance, inspect, residual_table,  # noqa: E402
                           tensor_stats, width_sweep)



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tests' tensors are tiny: one torch thread is faster, and immune to a busy machine's scheduling
    (a thread of a parallel kernel descheduled stalls every other one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hand_stats(x: np.ndarray, sample_axis: int = 0, channel_axis: int = 1) -> dict[str, float]:
    """The layers.csv statistics written out directly (float64, every pair of samples)."""
    x = np.asarray(x, dtype=np.float64)
    others = tuple(a for a in range(x.ndim) if a != channel_axis)
    col_mean = x.mean(axis=others)
    rows = np.moveaxis(x, sample_axis, 0).reshape(x.shape[sample_axis], -1)
    rows = rows[np.linalg.norm(rows, axis=1) > 0]  # an all-zero sample has no direction: left out
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    cos = unit @ unit.T
    n = len(rows)
    head = np.abs(cos[:128, :128])
    m = min(n, 128)
    return {"mean": x.mean(), "std": x.std(), "second_moment": (x**2).mean(),
            "sq_unit_mean": (col_mean**2).mean(), "unit_var": x.var(axis=others).mean(),
            "frac_zero": (x == 0).mean(), "cos_sim": (cos.sum() - n) / (n * (n - 1)),
            "abs_cos_sim": (head.sum() - m) / (m * (m - 1))}


def assert_stats(row: pd.Series, side: str, x: np.ndarray, sample_axis: int = 0, channel_axis: int = 1) -> None:
    """The row's statistics of one side against :func:`hand_stats` of ``x``. Float64 sums of float32 values
    in another order agree to rounding of order 1e-15 on each quantity's scale. The cosines' products are
    float32: |cos| from a Gram matrix, whose rounding is at most (entries per sample) * 2^-24 in a cosine;
    the mean cosine from the sum of the N unit-normalised samples, each entry a float32 sum of N terms, which
    moves |sum|^2 by at most 2 (N + 1) 2^-24 N (Cauchy-Schwarz) and the mean by that over N (N - 1)."""
    n = x.shape[sample_axis]
    fan = x.size // n
    tolerances = {"abs_cos_sim": fan * 2.0**-24, "cos_sim": 2 * (n + 1) * 2.0**-24 / (n - 1)}
    for k, v in hand_stats(x, sample_axis, channel_axis).items():
        got = row[f"{side}_{k}"]
        scale = 1.0 if k == "frac_zero" else max(abs(v), row[f"{side}_second_moment"])
        tol = tolerances.get(k, 1e-10 * scale)
        assert abs(got - v) <= tol, (row.name, side, k, got, v)


def recording(factory):
    """A factory that keeps the models it makes (to inspect them after varprop has)."""
    made = []

    def make(*args):
        model = factory(*args)
        made.append(model)
        return model

    return make, made


def upstream(seed: int, replicate: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The N(0, 1) output gradient inspect uses (documented: the seed tree's 'upstream' node)."""
    return torch.from_numpy(inits.standard_normal(generator(seed, replicate, 0, "upstream", 0), shape, np.float32))


def hooked_pass(model: nn.Module, x: torch.Tensor, g: torch.Tensor | None, names: list[str]):
    """Each named module's output and the gradient w.r.t. it, with hooks registered here by hand."""
    outs, grads, handles = {}, {}, []
    for name in names:
        module = model.get_submodule(name)

        def fwd(mod, args, out, name=name):
            outs[name] = out.detach().clone()  # now: an in-place module may overwrite it next
            if g is not None:
                handles.append(out.register_hook(lambda grad, name=name: grads.__setitem__(name, grad.clone())))

        handles.append(module.register_forward_hook(fwd))
    try:
        out = model(x.clone().requires_grad_(g is not None))
        if g is not None:
            (out * g).sum().backward()
    finally:
        for h in handles:
            h.remove()
    return outs, grads


# --- statistics against a hand computation -----------------------------------------------------------------

def test_statistics_match_a_hand_computation_with_hooks_registered_by_hand():
    make, made = recording(lambda: nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 4),
                                                 nn.Tanh()))
    x = np.random.default_rng(1).standard_normal((7, 6)).astype(np.float32)
    table = inspect(make, inputs=x, replicates=2, backward=True, seed=5)
    assert list(table["name"].unique()) == ["(input)", "0", "1", "2", "3"]
    for r, model in enumerate(made):
        rows = table[table["replicate"] == r].set_index("name")
        assert_stats(rows.loc["(input)"], "post", x)
        outs, grads = hooked_pass(model, torch.from_numpy(x), upstream(5, r, (7, 4)), ["0", "1", "2", "3"])
        for name in ["0", "1", "2", "3"]:
            assert_stats(rows.loc[name], "post", outs[name].numpy())
            assert_stats(rows.loc[name], "grad", grads[name].numpy())
        # saturation of the tanh: |1 - tanh(z)^2| < 1e-3 on its input, the output of "2"
        z = outs["2"].numpy().astype(np.float64)
        assert rows.loc["3", "post_frac_saturated"] == np.mean(np.abs(1 - np.tanh(z) ** 2) < 1e-3)
        assert rows.loc["1", "post_frac_saturated"] == np.mean(outs["0"].numpy() <= 0)  # relu: dead inputs
        model.zero_grad()
        (model(torch.from_numpy(x)) * upstream(5, r, (7, 4))).sum().backward()
        assert rows.loc["0", "weight_grad_norm"] == pytest.approx(float(model[0].weight.grad.double().norm()),
                                                                  rel=1e-6)


def test_two_dimensional_statistics_are_simulates_own():
    x = np.random.default_rng(0).standard_normal((50, 30)) * 2 + 0.5
    x[x < -1] = 0
    ours, theirs = tensor_stats(torch.from_numpy(x)), side_stats(x, 0.0)
    for k in theirs:
        if not math.isnan(theirs[k]):
            assert ours[k] == pytest.approx(theirs[k], rel=1e-12, abs=1e-14), k


def test_inplace_relu_gradients_equal_those_of_the_out_of_place_twin():
    make, made = recording(lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 3)))
    table = inspect(make, input_shape=(10, 8), replicates=1, backward=True, seed=2)
    twin = copy.deepcopy(made[0])
    twin[1] = nn.ReLU(inplace=False)
    x = torch.from_numpy(inits.standard_normal(generator(2, 0, 0, "inputs"), (10, 8), np.float32))
    z = twin[0](x)
    h = twin[1](z)
    z.retain_grad()
    h.retain_grad()
    (twin[2](h) * upstream(2, 0, (10, 3))).sum().backward()
    rows = table.set_index("name")
    assert_stats(rows.loc["0"], "grad", z.grad.numpy())  # w.r.t. the value before the relu
    assert_stats(rows.loc["1"], "grad", h.grad.numpy())
    assert_stats(rows.loc["0"], "post", z.detach().numpy())  # taken before the relu overwrote it
    assert rows.loc["0", "post_frac_zero"] == 0 and rows.loc["1", "post_frac_zero"] > 0.2


class _InputInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.relu_(x))


def test_inplace_activation_of_the_input_itself_with_backward():
    # autograd refuses relu_ on a leaf: the model runs on a copy; the input's row keeps the values before the
    # relu and the gradient with respect to them, which the relu zeroes where its input was negative
    make, made = recording(_InputInPlace)
    table = inspect(make, input_shape=(10, 8), replicates=1, backward=True, seed=2).set_index("name")
    x = torch.from_numpy(inits.standard_normal(generator(2, 0, 0, "inputs"), (10, 8), np.float32))
    leaf = x.clone().requires_grad_(True)
    (made[0](leaf.clone()) * upstream(2, 0, (10, 3))).sum().backward()
    assert_stats(table.loc["(input)"], "post", x.numpy())
    assert_stats(table.loc["(input)"], "grad", leaf.grad.numpy())
    assert table.loc["(input)", "grad_frac_zero"] == np.mean(x.numpy() <= 0)


class _LSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 8, num_layers=2, batch_first=True)

    def forward(self, x):
        return self.lstm(x)


def test_an_rnn_state_has_its_samples_on_axis_1():
    # h_n and c_n are [layers, N, H] whatever batch_first says of the sequence output [N, T, H]
    make, made = recording(_LSTM)
    table = inspect(make, input_shape=(5, 7, 6), replicates=1, seed=3).set_index("name")
    x = torch.from_numpy(inits.standard_normal(generator(3, 0, 0, "inputs"), (5, 7, 6), np.float32))
    with torch.no_grad():  # as inspect ran it (PyTorch picks another LSTM kernel when grad is on)
        out, (h, c) = made[0](x)
    assert_stats(table.loc["lstm[0]"], "post", out.detach().numpy(), 0, 2)
    for name, t in (("lstm[1][0]", h), ("lstm[1][1]", c)):
        assert (table.loc[name, "sample_axis"], table.loc[name, "channel_axis"]) == (1, 2)
        assert_stats(table.loc[name], "post", t.detach().numpy(), 1, 2)


def test_the_users_input_is_not_changed_by_a_model_that_changes_its_input():
    x = np.random.default_rng(2).standard_normal((10, 8)).astype(np.float32)
    kept = x.copy()
    table = inspect(_InputInPlace, inputs=x, replicates=2, seed=1)
    assert np.array_equal(x, kept)
    assert (table[table["name"] == "(input)"]["post_frac_zero"] == 0).all()  # every replicate read it whole


class _Seq(nn.Module):
    """Linear over [N, T, C], then attention over [T, N, C] (batch_first=False)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 8)
        self.attn = nn.MultiheadAttention(8, 2)

    def forward(self, x):
        h = self.proj(x)
        t = h.transpose(0, 1)
        return self.attn(t, t, t, need_weights=False)[0]


class _SeqFirstWrapper(nn.Module):
    """A user's module stating batch_first=False, traced and rewritten (its gelu), fed [T, N, C]."""

    def __init__(self):
        super().__init__()
        self.batch_first = False
        self.fc, self.norm = nn.Linear(6, 6), nn.LayerNorm(6)

    def forward(self, x):
        return self.norm(torch.nn.functional.gelu(self.fc(x)))


class _HeadFirst(nn.Module):
    """Declared head first: the Conv1d that reads the [N, C, L] input comes second."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.conv = nn.Conv1d(4, 8, 3, padding=1)

    def forward(self, x):
        return self.head(self.conv(x).mean(-1))


class _HeadFirstUntraced(_HeadFirst):
    """The same, but fx cannot trace it (control flow on a tensor): the pass finds the input's reader."""

    def forward(self, x):
        h = self.conv(x)
        return self.head(h.mean(-1) if h.sum() > -1e30 else h.amax(-1))


@pytest.mark.parametrize("factory,shape,checks", [
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)), (5, 3, 6, 6),
     {"0": (0, 1), "1": (0, 1)}),
    (lambda: nn.Sequential(nn.Conv1d(3, 4, 3), nn.GELU()), (5, 3, 9), {"0": (0, 1), "1": (0, 1)}),
    (_Seq, (5, 7, 6), {"proj": (0, 2), "attn[0]": (1, 2)}),
    # [T, N, C] throughout: the layer keeps batch_first on its attention, its Linear and LayerNorm inherit it
    (lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0), (7, 5, 8),
     {"(input)": (1, 2), "norm1": (1, 2), "linear1": (1, 2), "linear2": (1, 2), "norm2": (1, 2)}),
    (_HeadFirst, (5, 4, 9), {"(input)": (0, 1), "conv": (0, 1)}),
    (_HeadFirstUntraced, (5, 4, 9), {"(input)": (0, 1), "conv": (0, 1)}),
    # the rewritten copy has lost the attribute: the model as built says it
    (_SeqFirstWrapper, (7, 5, 6), {"(input)": (1, 2), "fc": (1, 2), "norm": (1, 2)}),
    # Flatten returns a view of the conv's output, Identity its input: rows of their own all the same
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Identity()), (5, 3, 6, 6),
     {"0": (0, 1), "1": (0, 1), "2": (0, 1)}),
])
def test_channel_and_sample_axes(factory, shape, checks):
    make, made = recording(factory)
    table = inspect(make, input_shape=shape, replicates=1, seed=4).set_index("name")
    x = torch.from_numpy(inits.standard_normal(generator(4, 0, 0, "inputs"), shape, np.float32))
    outs = {"(input)": x}
    for name in set(checks) - {"(input)"}:
        module = made[0].get_submodule(name.removesuffix("[0]"))
        module.register_forward_hook(lambda m, a, out, name=name: outs.__setitem__(
            name, (out[0] if isinstance(out, tuple) else out).detach().clone()))
    made[0](x)
    for name, (sample_axis, channel_axis) in checks.items():
        assert (table.loc[name, "sample_axis"], table.loc[name, "channel_axis"]) == (sample_axis, channel_axis)
        assert_stats(table.loc[name], "post", outs[name].numpy(), sample_axis, channel_axis)


# --- residual additions -------------------------------------------------------------------------------------

class _Residual(nn.Module):
    """x + alpha * fc(x), fc without bias and with N(0, 1 / n) weights: the skip's second moment is the
    input's, the branch's alpha^2 times it in expectation over the weights, the sum's their total."""

    def __init__(self, n: int = 128, alpha: float = 1.0):
        super().__init__()
        self.fc = nn.Linear(n, n, bias=False)
        nn.init.normal_(self.fc.weight, std=n**-0.5)
        self.alpha = alpha

    def forward(self, x):
        return x + self.alpha * self.fc(x) if self.alpha != 1 else x + self.fc(x)


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_residual_skip_and_branch_against_the_closed_form(alpha):
    reps = 30
    table = inspect(lambda: _Residual(128, alpha), input_shape=(64, 128), replicates=reps, seed=1)
    res = residual_table(table)
    assert len(res) == reps and set(res["skip"]) == {"(input)"}
    assert set(res["branch"]) == ({"fc"} if alpha == 1 else {""})  # alpha * fc(x) is not a module's output
    inputs = table[table["name"] == "(input)"].set_index("replicate")
    res = res.set_index("replicate")
    assert np.array_equal(res["skip_second_moment"], inputs["post_second_moment"])  # the skip is the input
    t = sps.t.isf(1e-4 / 2, reps - 1)  # false-alarm 1e-4 per quantity

    def within(values: np.ndarray, expected: float) -> None:
        se = values.std(ddof=1) / math.sqrt(len(values))
        assert abs(values.mean() - expected) <= t * se, (values.mean(), expected, se)

    # E over the weights, given the input: branch = alpha^2 mean(w^2) n E[x^2], sum = skip + branch
    ratio = res["branch_second_moment"] / res["skip_second_moment"]
    within(ratio.to_numpy(), alpha**2)
    cross = (res["sum_second_moment"] - res["skip_second_moment"] - res["branch_second_moment"]).to_numpy()
    within(cross, 0.0)
    if alpha == 1:  # the addition is a row with its mean-field prediction, 1 + n mean(w^2) = 2
        add = table[table["name"] == "add()"]
        assert add["theory_post_second_moment"].iloc[0] == pytest.approx(2.0, rel=0.02)
        within(add["post_second_moment"].to_numpy(), add["theory_post_second_moment"].iloc[0])


class _Block(nn.Module):
    """conv -> bn, then the skip added to the branch in place (``out += x``) or not, then an in-place relu."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.conv, self.bn, self.relu, self.inplace = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(
            inplace=True), inplace

    def forward(self, x):
        out = self.bn(self.conv(x))
        if self.inplace:
            out += x
        else:
            out = out + x
        return self.relu(out)


def test_an_in_place_addition_is_traced_in_place_with_the_same_statistics():
    from varprop.inspect import graph

    prepared = graph.prepare(_Block(True))
    assert [op.target.__name__ for op in prepared.residuals] == ["iadd"]  # not a copy the model does not make
    tables = [inspect(lambda inplace=inplace: _Block(inplace), input_shape=(6, 4, 5, 5), replicates=2,
                      backward=True, seed=9) for inplace in (True, False)]
    assert list(tables[0]["name"]) == list(tables[1]["name"])
    assert "add()" in set(tables[0]["name"])
    measured = [c for c in tables[0].columns if c.startswith(("post_", "grad_"))]
    # the same float32 additions in the same order: equal, bn's row taken before the addition overwrote it
    pd.testing.assert_frame_equal(tables[0][measured], tables[1][measured])
    res = [residual_table(t)[["skip", "branch", "skip_second_moment", "branch_second_moment"]] for t in tables]
    pd.testing.assert_frame_equal(*res)


def test_transformer_layer_additions_found_by_its_known_structure():
    factory = lambda: nn.Sequential(nn.Linear(8, 16), nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0,  # noqa
                                                                                  batch_first=True))
    table = inspect(factory, input_shape=(3, 5, 8), replicates=1)
    res = residual_table(table).set_index("block")
    assert list(res.index) == ["1+1", "1+2"]
    # each branch ends in a dropout (p = 0: it returns its input, a row of its own)
    assert res.loc["1+1", "skip"] == "0" and res.loc["1+1", "branch"] == "1.dropout1"
    assert res.loc["1+2", "skip"] == "1.norm1" and res.loc["1+2", "branch"] == "1.dropout2"
    rows = table.set_index("name")
    assert res.loc["1+2", "skip_second_moment"] == rows.loc["1.norm1", "post_second_moment"]
    assert (res.loc["1+1", "branch_second_moment"] == rows.loc["1.dropout1", "post_second_moment"]
            == rows.loc["1.self_attn[0]", "post_second_moment"])


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 64)

    def forward(self, x):
        h = F.leaky_relu(self.fc1(x), 0.2)
        return torch.nn.functional.gelu(self.fc2(h), approximate="tanh").tanh()


def test_functional_activations_are_traced_into_rows_with_their_arguments():
    table = inspect(_Functional, input_shape=(16, 32), replicates=2, seed=3).set_index(["replicate", "name"])
    rows = table.loc[0]
    assert list(rows.index) == ["(input)", "fc1", "leaky_relu()", "fc2", "gelu()", "tanh()"]
    # slope 0.2 (not the default 0.01): E[leaky(z)^2] = (1 + 0.2^2) / 2 E[z^2] for the mean-field z
    fc1, leaky = rows.loc["fc1"], rows.loc["leaky_relu()"]
    assert leaky["theory_post_second_moment"] == pytest.approx(0.52 * fc1["theory_post_second_moment"], rel=1e-12)
    assert leaky["post_frac_saturated"] == 0  # |phi'| >= 0.2 everywhere
    assert rows.loc["gelu()", "theory"] == "n/a: gelu() is not modelled"  # the tanh approximation
    assert rows.loc["tanh()", "theory"].startswith("n/a")  # its input is not Gaussian


# --- replicates, seeds, hooks ----------------------------------------------------------------------------

def _small_cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                         nn.Dropout(0.2), nn.Flatten(), nn.Linear(8 * 36, 5))


def test_replicates_are_reproducible_by_seed_whatever_else_runs():
    state = torch.get_rng_state()
    a = inspect(_small_cnn, input_shape=(4, 3, 6, 6), replicates=2, backward=True, seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left as it was
    torch.randn(100)  # someone else draws in between
    b = inspect(_small_cnn, input_shape=(4, 3, 6, 6), replicates=3, backward=True, seed=7)
    measured = [c for c in a.columns if not c.startswith("theory")]  # theory averages over the replicates run
    pd.testing.assert_frame_equal(a[measured], b[b["replicate"] < 2][measured].reset_index(drop=True))
    c = inspect(_small_cnn, input_shape=(4, 3, 6, 6), replicates=1, seed=8)
    assert not np.allclose(a[a["replicate"] == 0]["post_std"], c["post_std"])


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(m._backward_pre_hooks) for m in model.modules())


class _Fails(nn.Module):
    def __init__(self, where: str):
        super().__init__()
        self.fc, self.act, self.where = nn.Linear(4, 4), nn.ReLU(), where

    def forward(self, x):
        h = self.act(self.fc(x))
        if self.where == "forward":
            raise RuntimeError("boom in forward")
        return _Boom.apply(h) if self.where == "backward" else h


class _Boom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("boom in backward")


@pytest.mark.parametrize("where", ["nowhere", "forward", "backward"])
def test_every_hook_is_removed_after_success_and_after_an_exception(where):
    make, made = recording(lambda: _Fails(where))
    if where == "nowhere":
        inspect(make, input_shape=(3, 4), replicates=2, backward=True, trace=False)
    else:
        with pytest.raises(SpecError, match=f"boom in {where}"):
            inspect(make, input_shape=(3, 4), replicates=1, backward=True, trace=False)
    assert made and all(_hooks(m) == 0 for m in made)
    for m in made:  # and the model still runs with no hook firing
        m(torch.randn(2, 4)) if where != "forward" else None


def test_an_instance_is_copied_and_reinitialised_not_modified():
    model = nn.Sequential(nn.Linear(5, 5), nn.ReLU())
    before = copy.deepcopy(model.state_dict())
    table = inspect(model, input_shape=(4, 5), replicates=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and _hooks(model) == 0
    assert table[table["name"] == "0"]["post_std"].nunique() == 2
    assert any("reset_parameters" in n for n in table.attrs["inspect"]["notes"])


# --- theory -----------------------------------------------------------------------------------------------

def test_conv_theory_counts_the_padded_border_and_agrees_with_many_replicates():
    factory = lambda: nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),  # noqa: E731
                                    nn.Conv2d(16, 16, 3, padding=1, stride=2), nn.ReLU(), nn.Conv2d(16, 8, 3))
    reps = 60
    table = inspect(factory, input_shape=(4, 3, 6, 6), replicates=reps, backward=True, seed=3)
    t = sps.t.isf(1e-4 / 2 / 12, reps - 1)  # 12 comparisons, false alarm 1e-4 overall
    for side in ("post", "grad"):
        g = table.groupby("layer")
        m, se = g[f"{side}_second_moment"].mean(), g[f"{side}_second_moment"].std() / math.sqrt(reps)
        th = g[f"theory_{side}_second_moment"].first()
        assert th.notna().all()
        assert (np.abs(m - th) <= t * se).all(), pd.DataFrame({"measured": m, "se": se, "theory": th})
    # a scalar fan-in (9 taps everywhere) would predict the first conv's output 6x6 border-free: too high
    first = table[table["layer"] == 1]
    assert first["theory_post_second_moment"].iloc[0] < 27 * first["weight_ms"].mean()


# --- width sweep --------------------------------------------------------------------------------------------

def _mlp(width: int, unit: bool) -> nn.Module:
    """Input 16 -> width -> width -> width, no bias: N(0, 1) hidden weights (the standard normal
    parametrisation: std ~ width^(k/2) at hidden layer k) or N(0, 1/fan_in) (width-independent)."""
    layers, n = [], 16
    for _ in range(3):
        lin = nn.Linear(n, width, bias=False)
        nn.init.normal_(lin.weight, std=1.0 if unit and n != 16 else n**-0.5)
        layers.append(lin)
        n = width
    return nn.Sequential(*layers)


@pytest.mark.parametrize("unit", [True, False])
def test_width_sweep_exponents(unit):
    result = width_sweep(lambda w: _mlp(w, unit), [32, 64, 128, 256], (32, 16), replicates=4, backward=True)
    ex = result.exponents.set_index(["name", "side"])
    t = sps.t.isf(1e-4 / 2, 3)
    for k in range(3):
        expected = {"output": k / 2, "gradient": (2 - k) / 2} if unit else {"output": 0.0, "gradient": 0.0}
        for side, b in expected.items():
            row = ex.loc[(str(k), side)]
            assert abs(row["exponent"] - b) <= t * row["se"] + 1e-3, (k, side, row["exponent"], b)
    assert result.passed is (not unit)
    assert ("FAIL" if unit else "PASS") in result.message and "shrink" not in result.message


def _vanishing_readout(width: int) -> nn.Module:
    m = nn.Sequential(nn.Linear(16, width, bias=False), nn.Linear(width, 4, bias=False))
    nn.init.normal_(m[0].weight, std=16**-0.5)
    nn.init.normal_(m[1].weight, std=1 / width)  # muP's readout: output std ~ width^-1/2
    return m


def test_width_sweep_says_when_a_failing_layer_only_vanishes():
    result = width_sweep(_vanishing_readout, [32, 64, 128, 256], (32, 16), replicates=4)
    assert result.passed is False and "it shrinks with width" in result.message, result.message


# --- testing helpers ----------------------------------------------------------------------------------------

def _tanh_net(last_std: float) -> nn.Module:
    m = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Tanh(), nn.Linear(64, 64, bias=False))
    nn.init.normal_(m[0].weight, std=1 / 8)
    nn.init.normal_(m[2].weight, std=last_std)
    return m


def test_assert_preserves_variance():
    good = lambda: _tanh_net(1 / 8)  # noqa: E731  fan_in init: stds 1, 0.63 (tanh), 0.63
    assert assert_preserves_variance(good, input_shape=(32, 64), band=4).passed
    with pytest.raises(AssertionError, match=r"forward std of 2 leaves the band \[1/4, 4\]"):
        assert_preserves_variance(lambda: _tanh_net(1.0), input_shape=(32, 64), band=4)  # 8 x 0.63
    result = check_preserves_variance(good, (32, 64), band=4, direction="both")
    assert result.passed and set(result.table["direction"]) == {"forward", "backward"}


class _HiddenInplace(nn.Module):
    """Two linear layers with a relu between them that no hook sees: applied in place on the first's output."""

    def __init__(self, how: str):
        super().__init__()
        self.a, self.b, self.how = nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False), how

    def forward(self, x):
        h = self.a(x)
        if self.how == "method":
            h.relu_()
        else:
            h = F.relu(h, inplace=True)
        return self.b(h)


@pytest.mark.parametrize("make,options", [
    (lambda: nn.Sequential(nn.Linear(64, 64, bias=False), nn.ReLU(inplace=True), nn.Linear(64, 64, bias=False)),
     {"types": "Linear"}),  # the relu left out of the selection
    (lambda: _HiddenInplace("method"), {"trace": False}),
    (lambda: _HiddenInplace("functional"), {"trace": False}),
])
def test_a_tensor_changed_in_place_unseen_restarts_the_theory(make, options):
    """The second linear layer reads the first's output after a relu the hooks do not see changed it in place:
    the theory must not take that input for the first layer's output (it would predict twice the second
    moment, E[z^2] against E[relu(z)^2] = E[z^2] / 2) but restart from the input as measured."""
    table = inspect(make, (256, 64), replicates=2, backward=True, **options)
    b = table[table["layer"] == table["layer"].max()]
    assert (b["theory"] == f"restart at {b['name'].iloc[0]}").all()
    m2, theory = b["post_second_moment"].mean(), b["theory_post_second_moment"].iloc[0]
    # two replicates of a 64-wide layer: each output second moment within a few x sqrt(2/64) of its mean
    assert abs(math.log(theory / m2)) < 0.35
    assert table["theory_grad_second_moment"].isna().all()  # the gradient's chain is broken there too


class _NonFiniteOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(20, 8)

    def forward(self, x):
        return torch.log(self.fc(x) - 1e9)  # NaN everywhere


def test_a_check_fails_a_module_with_inf_or_nan_values():
    result = check_preserves_variance(_NonFiniteOut, (64, 20), band=4, replicates=8)
    assert not result.passed and "inf or NaN values in some re-initialisation" in result.message
    with pytest.raises(AssertionError, match="inf or NaN"):
        assert_preserves_variance(_NonFiniteOut, input_shape=(64, 20), band=4, replicates=8)


def test_a_checks_reproduce_command_says_every_option(user_models):
    """A model named by a string reruns as varprop check --model with its options; what the command line
    cannot say (a backward-only check: --backward checks both directions) is the Python call, every option
    spelled out."""
    both = check_preserves_variance(f"{user_models}:make_model", (4, 3, 4, 4), direction="both", mode="eval",
                                    types="Linear,Conv2d", seed=3, replicates=8)
    assert both.command.startswith(f"varprop check --model {user_models}:make_model ")
    for words in ("--backward", "--model-mode eval", "--types Linear,Conv2d", "--seed 3", "--replicates 8",
                  "--input-shape 4,3,4,4"):
        assert words in both.command, both.command
    back = check_preserves_variance(f"{user_models}:make_model", (4, 3, 4, 4), direction="backward", mode="eval",
                                    types="Linear", replicates=8)
    assert back.command.startswith(f"varprop.torch.check_preserves_variance('{user_models}:make_model', ")
    assert "direction='backward'" in back.command and "mode='eval'" in back.command and "types='Linear'" in back.command
    listed = check_preserves_variance(f"{user_models}:make_model", (4, 3, 4, 4), modules=["0", "3"], replicates=8)
    assert "--modules 0,3" in listed.command  # one value, as --modules takes it


class _UnusedLast(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.probe = nn.Linear(20, 5), nn.Linear(20, 7)

    def forward(self, x):
        y = self.a(x)
        self.probe(x)  # runs last, returned by no one
        return y


def test_findings_name_the_module_the_model_returns_as_its_output():
    from varprop.report import inspect as report

    table = inspect(_UnusedLast, (16, 20))
    assert table.attrs["inspect"]["outputs"] == [1]
    summary = report.module_summary(table)
    forward = next(f for f in report.findings(summary, residual_table(table), table.attrs["inspect"])
                   if f.startswith("Forward:"))
    plain = "".join(ch for ch in forward if ch >= " ")  # without the markup's literal-text marks
    assert plain.startswith("Forward: the output a (Linear, row 1)"), plain


# --- bad input ----------------------------------------------------------------------------------------------

class _IntOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x).argmax(1)


class _Many(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 2)

    def forward(self, x):
        return {"logits": self.a(x), "aux": (self.b(x), x.shape[0])}


class _Bare(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3))

    def forward(self, x):
        return x @ self.w


class _NoForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)


def _raises():
    raise ValueError("width must be even\nmore detail")


def _exits():
    sys.exit(3)  # a factory's own exit is the user's error to see, not a silent end of varprop


@pytest.mark.parametrize("model,kwargs,option,words", [
    ("no_such_module_xyz:make", {}, "--model", "cannot import module"),
    (_raises, {}, "--model", "raised ValueError: width must be even"),
    (lambda: 3, {}, "--model", "returned int, not a torch.nn.Module"),
    (lambda: nn.Linear(4, 3), {"input_shape": (2, 5)}, "--input-shape", "mat1 and mat2 shapes cannot be multiplied"),
    (_Bare, {}, "--model", "_Bare has no submodules"),
    (_NoForward, {}, "--model", 'missing the required "forward" function'),
    (_IntOut, {}, "--model", "no floating-point tensor (got int64)"),
    (lambda: nn.Linear(4, 3), {"modules": "conv*"}, "--modules", "no module name matches conv*"),
    (lambda: nn.Sequential(nn.Linear(4, 3)), {"types": "linear"}, "--types", "(did you mean Linear?)"),
    (lambda: nn.Linear(4, 3), {"device": "cuda"}, "--device", "no GPU"),
    (lambda: nn.Linear(4, 3), {"input_shape": "2,x"}, "--input-shape", "comma-separated positive integers"),
    (lambda: nn.Linear(4, 3), {"mode": "test"}, "--mode", "train or eval"),
    (lambda: nn.Linear(4, 3), {"input_shape": (10**12, 4)}, "--input-shape", "use a smaller --input-shape"),
    (_exits, {}, "--model", "_exits() called sys.exit(3)"),
    (lambda: nn.Linear(4, 3), {"modules": " , "}, "--modules", "expected comma-separated names"),
])
def test_bad_input_is_one_line_naming_the_option(model, kwargs, option, words):
    if option == "--device" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SpecError) as info:
        inspect(model, **{"input_shape": (2, 4), **kwargs})
    message = str(info.value)
    assert message.startswith(option + ":") and words in message and "\n" not in message


def test_tuple_and_dict_outputs_are_measured_element_by_element():
    table = inspect(_Many, input_shape=(6, 4), backward=True)
    names = list(table["name"])
    assert "a" in names and "b" in names and table["grad_std"].notna().all()


# --- the command line ---------------------------------------------------------------------------------------

@pytest.fixture
def user_models(tmp_path, monkeypatch):
    """A module of the user's beside the working directory, as varprop's users have them."""
    name = f"usermodels_{abs(hash(tmp_path)) % 10**8}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        def make_model():
            return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(),
                                 nn.Linear(4 * 16, 10))
        def make_mlp(width):
            return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 3))
        def broken():
            raise RuntimeError("cannot build today")
        def make_tokens():
            return nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 16))
        def make_embedding():
            return nn.Sequential(nn.Embedding(50, 16))
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_cli_writes_a_report(user_models, tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["inspect", f"{user_models}:make_model", "--input-shape", "4,3,4,4",
                                    "--replicates", "2", "--backward", "--out", str(out)])
    assert res.exit_code == 0, res.output
    for f in ("report.md", "report.html", "layers.csv", "config.json", "summary.json", "std_per_module.png"):
        assert (out / f).is_file(), f
    layers = pd.read_csv(out / "layers.csv")
    assert {"post_std", "grad_std", "theory_post_second_moment", "replicate", "name"} <= set(layers.columns)
    first = (out / "report.md").read_text()
    assert "## Findings" in first
    redraw = CliRunner().invoke(main, ["report", str(out)])  # varprop report redraws an inspect run as one
    assert redraw.exit_code == 0, redraw.output
    assert (out / "report.md").read_text() == first and not (out / "std_per_layer.png").exists()
    whole = (out / "layers.csv").read_text()
    for text, words in ((whole[:-9], "ends in the middle of a row"),
                        ("".join(whole.splitlines(True)[:-1]), "lacks rows")):  # the last replicate's last row
        (out / "layers.csv").write_text(text)
        bad = CliRunner().invoke(main, ["report", str(out), "--force"])
        assert bad.exit_code == 2 and words in bad.output and len(bad.output.strip().splitlines()) == 1, bad.output


def test_token_ids_are_no_reference_the_first_module_is(user_models, tmp_path):
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 50, (8, 5)))
    out = tmp_path / "ids"
    res = CliRunner().invoke(main, ["inspect", f"{user_models}:make_tokens", "--input-file", "ids.npy", "--out",
                                    str(out)])
    assert res.exit_code == 0, res.output
    layers = pd.read_csv(out / "layers.csv")
    emb, lin = (layers[layers["name"] == n]["post_std"].pow(2).mean() ** 0.5 for n in ("0", "1"))
    findings = (out / "report.md").read_text().split("## Findings")[1]
    # the ids' std (about 14) is no signal: ratios are taken to the embedding's output
    assert f"x{lin / emb:.3g} that of the first module `0` (Embedding, row 1)" in findings, findings
    alone = tmp_path / "alone"
    res = CliRunner().invoke(main, ["inspect", f"{user_models}:make_embedding", "--input-file", "ids.npy", "--out",
                                    str(alone)])
    assert res.exit_code == 0, res.output
    findings = (alone / "report.md").read_text().split("## Findings")[1].split("##")[0]
    assert "no signal to take ratios to" in findings and "the input's" not in findings, findings


def test_cli_reproduce_command_reruns_the_same_numbers(user_models, tmp_path):
    """The command a report gives (from the option table, every default that fixes the numbers pinned)
    reruns the run: the same rows, byte for byte."""
    import shlex

    first = tmp_path / "first"
    res = CliRunner().invoke(main, ["inspect", f"{user_models}:make_model", "--input-shape", "4,3,4,4", "--backward",
                                    "--seed", "3", "--out", str(first)])
    assert res.exit_code == 0, res.output
    words = shlex.split(json.loads((first / "config.json").read_text())["command"])
    assert words[:3] == ["varprop", "inspect", f"{user_models}:make_model"]
    assert {"--seed", "--replicates", "--mode", "--backward"} <= set(words)
    again = tmp_path / "again"
    words[words.index("--out") + 1] = str(again)
    res = CliRunner().invoke(main, words[1:])
    assert res.exit_code == 0, res.output
    assert (first / "layers.csv").read_bytes() == (again / "layers.csv").read_bytes()


def test_cli_width_sweep(user_models, tmp_path):
    out = tmp_path / "sweep"
    res = CliRunner().invoke(main, ["inspect", f"{user_models}:make_mlp", "--input-shape", "16,8",
                                    "--width-sweep", "16,32,64", "--replicates", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "Width sweep:" in res.output and (out / "exponents.csv").is_file()
    first = (out / "report.md").read_text()
    assert CliRunner().invoke(main, ["report", str(out)]).exit_code == 0
    assert (out / "report.md").read_text() == first


@pytest.mark.parametrize("args,message", [
    (["{m}:broken", "--input-shape", "2,3"], "MODEL: {m}:broken() raised RuntimeError: cannot build today"),
    (["{m}:nope", "--input-shape", "2,3"], "MODEL: module '{m}' has no callable 'nope'"),
    (["{m}:make_model", "--input-shape", "2,3,5"], "--input-shape: the model's forward failed"),
    (["{m}:make_model", "--input-shape", "4,3,4,4", "--replicates", "0"], "--replicates: expected a positive"),
    (["{m}:make_model"], "--input-shape: give the input's shape"),
    (["{m}:make_model", "--input-shape", "4,3,4,4", "--mode", "evil"], "--mode: expected train"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(user_models, tmp_path, args, message):
    out = tmp_path / "bad"
    res = CliRunner().invoke(main, ["inspect", *[a.format(m=user_models) for a in args], "--out", str(out)])
    assert res.exit_code == 2
    assert res.output.strip() == "varprop: error: " + message.format(m=user_models) or \
        res.output.startswith("varprop: error: " + message.format(m=user_models)), res.output
    assert len(res.output.strip().splitlines()) == 1 and not out.exists()


def test_cli_refuses_an_empty_out(user_models):
    res = CliRunner().invoke(main, ["inspect", f"{user_models}:make_model", "--input-shape", "4,3,4,4", "--out", ""])
    assert res.exit_code == 2 and res.stderr.strip() == "varprop: error: --out: expected a directory path, got ''"
    assert not (Path.cwd() / "reports").exists()  # not the default directory instead


def test_cli_keeps_a_directory_it_did_not_write(user_models, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    res = CliRunner().invoke(main, ["inspect", f"{user_models}:make_model", "--input-shape", "4,3,4,4",
                                    "--out", str(out)])
    assert res.exit_code == 2 and "--out" in res.output
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_check_model_exit_status(user_models):
    res = CliRunner().invoke(main, ["check", "--model", f"{user_models}:make_mlp", "--input-shape", "16,8"])
    assert res.exit_code == 2 and res.output.startswith("varprop: error: --model:") and "width" in res.output
    res = CliRunner().invoke(main, ["check", "--model", f"{user_models}:make_model", "--input-shape", "8,3,4,4",
                                    "--band", "100"])
    assert res.exit_code == 0 and res.output.startswith("PASS:"), res.output
    res = CliRunner().invoke(main, ["check", "--model", f"{user_models}:make_model", "--input-shape", "8,3,4,4",
                                    "--band", "1.01"])
    assert res.exit_code == 1 and res.output.startswith("FAIL:") and "Reproduce: varprop check --model" in res.output
    res = CliRunner().invoke(main, ["check", "--model", f"{user_models}:make_model", "--input-shape", "8,3,4,4",
                                    "--init", "he"])
    assert res.exit_code == 2 and res.output.startswith("varprop: error: --init:")
    res = CliRunner().invoke(main, ["check", "--device", "cuda"])  # a model's option without the model
    assert res.exit_code == 2 and res.output.startswith("varprop: error: --model:") and "--device" in res.output


def test_without_torch_the_command_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    res = CliRunner().invoke(main, ["inspect", "x:y", "--input-shape", "2,3"])
    assert res.exit_code == 2
    assert res.output.strip() == "varprop: error: PyTorch is not installed; install it with: pip install " \
                                 "'varprop[torch]'"


def test_importing_varprop_does_not_import_torch():
    code = "import sys, varprop, varprop.torch, varprop.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("scale", [1e19, 1e-22])
def test_abs_cos_of_a_tensor_beyond_float32_products(scale):
    # An exploding (or vanishing) float32 network's outputs: their Gram matrix leaves float32's range, so
    # the unit rows' is taken; |cos| stays within its float32 rounding of the direct float64 value.
    x = np.random.default_rng(0).standard_normal((300, 64))
    r = x[:128] / np.linalg.norm(x[:128], axis=1)[:, None]
    head = np.abs(r @ r.T)
    want = (head.sum() - np.trace(head)) / (128 * 127)
    got = tensor_stats(torch.tensor(x * scale, dtype=torch.float32))["abs_cos_sim"]
    assert got == pytest.approx(want, abs=(64 + 2) * 2.0**-24)


def _deep_relu(depth: int = 40, width: int = 16) -> nn.Module:
    layers = []
    for _ in range(depth):
        linear = nn.Linear(width, width, bias=False)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers)


def test_a_model_check_with_undecided_modules_outside_the_band_is_undecided():
    # A narrow deep relu net: its typical std leaves the band, but 8 re-initialisations' intervals reach inside.
    result = check_preserves_variance(_deep_relu, (32, 16), replicates=8)
    outside = result.table[(result.table["verdict"] == "undecided")
                           & (result.table["log10_ratio"].abs() > math.log10(2))]
    assert result.passed and result.verdict == "undecided" and result.undecided_outside == len(outside) > 0
    assert "stays within" not in result.message and f"{len(outside)} of them measured outside" in result.message

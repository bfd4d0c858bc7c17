"""The merge math against independent oracles (least squares on the raw data, closed-form identities)."""

import pytest
import torch

from regmean.methods.average import weighted_average
from regmean.methods.regmean import affine_gram, reconstruction_error, regmean_solve, shrink, solve_spd
from regmean.methods.task_arithmetic import task_arithmetic

K, D_IN, D_OUT = 3, 6, 4


def data(seed=0, n=(20, 30, 25)):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(k, D_IN, generator=g) @ torch.randn(D_IN, D_IN, generator=g) for k in n]
    ws = torch.randn(K, D_OUT, D_IN, generator=g)
    bs = torch.randn(K, D_OUT, generator=g)
    return xs, ws, bs


def grams(xs):
    return torch.stack([x.T @ x for x in xs])


ONES = torch.ones(K, dtype=torch.float64)


@pytest.fixture(autouse=True)
def _float64():
    """These oracles are exact in float64; the default dtype is restored so other test files are unaffected."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def test_identical_models_give_that_model():
    xs, ws, _ = data()
    same = ws[:1].expand(K, -1, -1)
    merged, ridge = regmean_solve(same, grams(xs), ONES, ONES, alpha=0.9)
    torch.testing.assert_close(merged, ws[0])
    assert ridge == 0


def test_one_model_gives_itself():
    xs, ws, _ = data()
    merged, _ = regmean_solve(ws[:1], grams(xs)[:1], ONES[:1], ONES[:1], alpha=1.0)
    torch.testing.assert_close(merged, ws[0])


def test_equal_grams_give_simple_average():
    xs, ws, _ = data()
    g = grams(xs)[:1].expand(K, -1, -1)
    merged, _ = regmean_solve(ws, g, ONES, ONES, alpha=0.5)
    torch.testing.assert_close(merged, ws.mean(0))
    c = torch.tensor([1.0, 2.0, 5.0])
    merged, _ = regmean_solve(ws, g, c, c, alpha=1.0)
    torch.testing.assert_close(merged, weighted_average(ws, c))


def test_regmean_is_least_squares_optimum_on_concatenated_data():
    xs, ws, _ = data()
    x = torch.cat(xs)
    y = torch.cat([xi @ wi.T for xi, wi in zip(xs, ws, strict=True)])
    oracle = torch.linalg.lstsq(x, y).solution.T
    merged, _ = regmean_solve(ws, grams(xs), ONES, ONES, alpha=1.0)
    torch.testing.assert_close(merged, oracle)


def test_alpha_minimises_the_regularised_objective():
    """alpha * ||X_i (W - W_i)^T||^2 + (1 - alpha) tr((W - W_i) D_i (W - W_i)^T) as one stacked least squares."""
    xs, ws, _ = data(1)
    alpha = 0.3
    rows, targets = [], []
    for xi, wi in zip(xs, ws, strict=True):
        d_half = torch.diag(torch.diagonal(xi.T @ xi).sqrt())
        rows += [alpha**0.5 * xi, (1 - alpha) ** 0.5 * d_half]
        targets += [alpha**0.5 * xi @ wi.T, (1 - alpha) ** 0.5 * d_half @ wi.T]
    oracle = torch.linalg.lstsq(torch.cat(rows), torch.cat(targets)).solution.T
    merged, _ = regmean_solve(ws, grams(xs), ONES, ONES, alpha=alpha)
    torch.testing.assert_close(merged, oracle)


def test_alpha_zero_is_per_feature_weighted_average():
    xs, ws, _ = data(2)
    diag = torch.stack([torch.diagonal(g) for g in grams(xs)])  # [K, d_in]
    oracle = (ws * diag[:, None, :]).sum(0) / diag.sum(0)
    merged, _ = regmean_solve(ws, grams(xs), ONES, ONES, alpha=0.0)
    torch.testing.assert_close(merged, oracle)


def test_joint_bias_is_affine_least_squares():
    xs, ws, bs = data(3)
    x1 = torch.cat([torch.cat([x, torch.ones(len(x), 1)], 1) for x in xs])
    y = torch.cat([x @ w.T + b for x, w, b in zip(xs, ws, bs, strict=True)])
    oracle = torch.linalg.lstsq(x1, y).solution.T  # [d_out, d_in + 1]
    aug = torch.stack([affine_gram(x.T @ x, x.sum(0), len(x)) for x in xs])
    wb = torch.cat([ws, bs[:, :, None]], dim=2)
    merged, _ = regmean_solve(wb, aug, ONES, ONES, alpha=1.0)
    torch.testing.assert_close(merged, oracle)


def test_mean_weighting_divides_each_gram_by_its_rows():
    xs, ws, _ = data(4, n=(5, 50, 500))
    counts = torch.tensor([5.0, 50.0, 500.0])
    mean_merged, _ = regmean_solve(ws, grams(xs), 1 / counts, ONES, alpha=1.0)
    oracle, _ = regmean_solve(ws, torch.stack([x.T @ x / len(x) for x in xs]), ONES, ONES, alpha=1.0)
    torch.testing.assert_close(mean_merged, oracle)


def test_singular_gram_takes_a_ridge_toward_the_average():
    xs, ws, _ = data(5)
    xs = [x.clone() for x in xs]
    for x in xs:
        x[:, 0] = 0.0  # feature 0 never seen by any model: its column is unconstrained
    merged, ridge = regmean_solve(ws, grams(xs), ONES, ONES, alpha=1.0)
    assert ridge > 0
    torch.testing.assert_close(merged[:, 0], ws.mean(0)[:, 0], atol=1e-6, rtol=1e-6)
    assert torch.isfinite(merged).all()


def test_solve_spd_matches_a_direct_solve():
    g = torch.Generator().manual_seed(6)
    m = torch.randn(8, 8, generator=g)
    a = m @ m.T + torch.eye(8)
    b = torch.randn(8, 3, generator=g)
    x, ridge = solve_spd(a, b, torch.zeros_like(b))
    torch.testing.assert_close(a @ x, b)
    assert ridge == 0


def test_shrink_keeps_the_diagonal():
    g = grams(data()[0])
    s = shrink(g, 0.25)
    torch.testing.assert_close(torch.diagonal(s, dim1=-2, dim2=-1), torch.diagonal(g, dim1=-2, dim2=-1))
    off = ~torch.eye(D_IN, dtype=torch.bool)
    torch.testing.assert_close(s[:, off], 0.25 * g[:, off])


def test_reconstruction_error_is_zero_for_the_model_itself_and_matches_outputs():
    xs, ws, _ = data(7)
    g = xs[0].T @ xs[0]
    assert reconstruction_error(ws[0], ws[0], g) == 0
    direct = ((xs[0] @ (ws[1] - ws[0]).T) ** 2).sum() / ((xs[0] @ ws[0].T) ** 2).sum()
    assert reconstruction_error(ws[1], ws[0], g) == pytest.approx(float(direct))


def test_task_arithmetic_and_average():
    base = torch.randn(4, 5)
    ts = torch.stack([base + 1, base + 2, base + 4])
    torch.testing.assert_close(task_arithmetic(ts, ONES, base, scaling=0.5), base + 0.5 * 7)
    torch.testing.assert_close(weighted_average(ts, torch.tensor([1.0, 1.0, 2.0])), base + 11 / 4)

"""The merge math against independent oracles (least squares on the raw data, closed-form identities)."""

import pytest
import torch

from regmean.methods.average import weighted_average
from regmean.methods.least_squares import (
    affine_gram,
    check_rows,
    reconstruction_error,
    regmean_solve,
    solve_spd,
)
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


def shrink(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha G + (1 - alpha) diag(G), written plainly (the oracles' own)."""
    return alpha * gram + (1 - alpha) * torch.diag_embed(torch.diagonal(gram, dim1=-2, dim2=-1))


def solve(*args, **kwargs):
    """The merged weight and the ridge."""
    solution = regmean_solve(*args, **kwargs)
    return solution.merged, solution.ridge


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
    merged, ridge = solve(same, grams(xs), ONES, ONES, alpha=0.9)
    torch.testing.assert_close(merged, ws[0])
    assert ridge == 0


def test_one_model_gives_itself():
    xs, ws, _ = data()
    merged, _ = solve(ws[:1], grams(xs)[:1], ONES[:1], ONES[:1], alpha=1.0)
    torch.testing.assert_close(merged, ws[0])


def test_equal_grams_give_simple_average():
    xs, ws, _ = data()
    g = grams(xs)[:1].expand(K, -1, -1)
    merged, _ = solve(ws, g, ONES, ONES, alpha=0.5)
    torch.testing.assert_close(merged, ws.mean(0))
    c = torch.tensor([1.0, 2.0, 5.0])
    merged, _ = solve(ws, g, c, c, alpha=1.0)
    torch.testing.assert_close(merged, weighted_average(ws, c))


def test_regmean_is_least_squares_optimum_on_concatenated_data():
    xs, ws, _ = data()
    x = torch.cat(xs)
    y = torch.cat([xi @ wi.T for xi, wi in zip(xs, ws, strict=True)])
    oracle = torch.linalg.lstsq(x, y).solution.T
    merged, _ = solve(ws, grams(xs), ONES, ONES, alpha=1.0)
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
    merged, _ = solve(ws, grams(xs), ONES, ONES, alpha=alpha)
    torch.testing.assert_close(merged, oracle)


def test_alpha_zero_is_per_feature_weighted_average():
    xs, ws, _ = data(2)
    diag = torch.stack([torch.diagonal(g) for g in grams(xs)])  # [K, d_in]
    oracle = (ws * diag[:, None, :]).sum(0) / diag.sum(0)
    merged, _ = solve(ws, grams(xs), ONES, ONES, alpha=0.0)
    torch.testing.assert_close(merged, oracle)


def test_joint_bias_is_affine_least_squares():
    xs, ws, bs = data(3)
    x1 = torch.cat([torch.cat([x, torch.ones(len(x), 1)], 1) for x in xs])
    y = torch.cat([x @ w.T + b for x, w, b in zip(xs, ws, bs, strict=True)])
    oracle = torch.linalg.lstsq(x1, y).solution.T  # [d_out, d_in + 1]
    aug = torch.stack([affine_gram(x.T @ x, x.sum(0), len(x)) for x in xs])
    wb = torch.cat([ws, bs[:, :, None]], dim=2)
    merged, _ = solve(wb, aug, ONES, ONES, alpha=1.0)
    torch.testing.assert_close(merged, oracle)


def test_mean_weighting_divides_each_gram_by_its_rows():
    xs, ws, _ = data(4, n=(5, 50, 500))
    counts = torch.tensor([5.0, 50.0, 500.0])
    mean_merged, _ = solve(ws, grams(xs), 1 / counts, ONES, alpha=1.0)
    oracle, _ = solve(ws, torch.stack([x.T @ x / len(x) for x in xs]), ONES, ONES, alpha=1.0)
    torch.testing.assert_close(mean_merged, oracle)


def test_singular_gram_takes_a_ridge_toward_the_average():
    xs, ws, _ = data(5)
    xs = [x.clone() for x in xs]
    for x in xs:
        x[:, 0] = 0.0  # feature 0 never seen by any model: its column is unconstrained
    merged, ridge = solve(ws, grams(xs), ONES, ONES, alpha=1.0)
    assert ridge > 0
    torch.testing.assert_close(merged[:, 0], ws.mean(0)[:, 0], atol=1e-6, rtol=1e-6)
    assert torch.isfinite(merged).all()


def test_solve_spd_matches_a_direct_solve():
    g = torch.Generator().manual_seed(6)
    m = torch.randn(8, 8, generator=g)
    a = m @ m.T + torch.eye(8)
    b = torch.randn(8, 3, generator=g)
    x, ridge, _ = solve_spd(a, b)
    torch.testing.assert_close(a @ x, b)
    assert ridge == 0


def test_reconstruction_error_is_zero_for_the_model_itself_and_matches_outputs():
    xs, ws, _ = data(7)
    g = xs[0].T @ xs[0]
    assert reconstruction_error(ws[0], ws[0], g).value == 0
    direct = ((xs[0] @ (ws[1] - ws[0]).T) ** 2).sum() / ((xs[0] @ ws[0].T) ** 2).sum()
    assert reconstruction_error(ws[1], ws[0], g).value == pytest.approx(float(direct))


def test_task_arithmetic_and_average():
    base = torch.randn(4, 5)
    ts = torch.stack([base + 1, base + 2, base + 4])
    torch.testing.assert_close(task_arithmetic(ts, ONES, base, scaling=0.5), base + 0.5 * 7)
    torch.testing.assert_close(weighted_average(ts, torch.tensor([1.0, 1.0, 2.0])), base + 11 / 4)


def ill_conditioned_system(seed=8, d=96, d_out=40, n=30, k=4):
    """Real-like: K fine-tunes of one weight (small differences), float32 Grams of rank n < d each (as a pooler's
    on a few hundred texts); with alpha 0.9 the system's condition number is about 1e7."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(0, -3, d, dtype=torch.float64)
    xs = [(torch.randn(n, d, generator=g, dtype=torch.float64) @ mix).float() for _ in range(k)]
    base = torch.randn(d_out, d, generator=g, dtype=torch.float64)
    ws = [base + 1e-2 * torch.randn(d_out, d, generator=g, dtype=torch.float64) for _ in range(k)]
    return ws, [x.T @ x for x in xs]  # Grams summed in float32, as `measure` stores them


def test_ill_conditioned_real_like_system_is_solved_to_the_float64_optimum():
    """Within 1e-6 (relative, max-abs) of the float64 optimum computed another way (LU on the whole weights, no
    deviation form), where products in float32 (the former solve) land far away."""
    ws, gs = ill_conditioned_system()
    alpha, ones = 0.9, torch.ones(len(ws), dtype=torch.float64)
    a = sum(shrink(g.double(), alpha) for g in gs)
    cond = torch.linalg.cond(a)
    assert cond > 1e6
    oracle = torch.linalg.solve(a, sum(shrink(g.double(), alpha) @ w.T for g, w in zip(gs, ws, strict=True))).T
    solution = regmean_solve(ws, gs, ones, ones, alpha)
    scale = oracle.abs().max()
    assert (solution.merged - oracle).abs().max() / scale < 1e-6
    assert solution.ridge == 0 and solution.residual() < 1e-12
    in_float32 = torch.linalg.solve(
        a, sum((shrink(g, alpha) @ w.float().T).double() for g, w in zip(gs, ws, strict=True))
    ).T
    assert (in_float32 - oracle).abs().max() / scale > 1e-5  # the system is hard enough to tell them apart


def test_diagnostics_on_sampled_rows_estimate_the_exact_figures():
    g = torch.Generator().manual_seed(9)
    d, d_out = 24, 3000
    x = torch.randn(200, d, generator=g)
    gram = x.T @ x
    weight = torch.randn(d_out, d, generator=g)
    merged = weight + 0.1 * torch.randn(d_out, d, generator=g) * torch.linspace(0, 2, d_out)[:, None]
    rows = check_rows(d_out, "layer.0.mlp", exact=False)
    assert rows is not None and len(rows) == 30 and torch.equal(rows, check_rows(d_out, "layer.0.mlp", False))
    assert not torch.equal(rows, check_rows(d_out, "layer.1.mlp", False))  # seeded by the layer's name
    assert check_rows(d_out, "layer.0.mlp", exact=True) is None and check_rows(16, "small", exact=False) is None
    exact = reconstruction_error(merged, weight, gram)
    direct = ((x @ (merged - weight).T) ** 2).sum() / ((x @ weight.T) ** 2).sum()
    assert exact.value == pytest.approx(float(direct)) and exact.stderr == 0
    estimate = reconstruction_error(merged, weight, gram, rows)
    assert 0 < estimate.stderr < 0.3 * exact.value
    assert abs(estimate.value - exact.value) < 4 * estimate.stderr
    # the standard error is honest: over many samples, about 95% of the 2-sigma intervals cover the exact value
    covered = 0
    for seed in range(200):
        sample = torch.randperm(d_out, generator=torch.Generator().manual_seed(seed))[:30]
        e = reconstruction_error(merged, weight, gram, sample)
        covered += abs(e.value - exact.value) < 2 * e.stderr
    assert 0.85 < covered / 200 <= 1.0


def test_all_finite_sees_every_nan_and_inf_and_no_false_one():
    from regmean.io.untrusted import all_finite

    big = torch.full((1000,), 3e38, dtype=torch.float32)  # finite, but its sum overflows
    assert all_finite(big) and all_finite(torch.full((10,), 1.7e308, dtype=torch.float64))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            t = torch.ones(50, dtype=dtype)
            t[17] = bad
            assert not all_finite(t), (bad, dtype)
    both = torch.ones(4)
    both[0], both[1] = float("inf"), -float("inf")  # their sum is NaN: still caught
    assert not all_finite(both)

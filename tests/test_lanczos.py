"""Lanczos (unlearn_kernels.solvers.lanczos) against torch.linalg.eigh of the dense float64 matrix."""
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from spectra import sym_with_spectrum

from unlearn_kernels.solvers import as_operator, lanczos
from unlearn_kernels.solvers.lanczos import LanczosProcess, distinct_pairs, ritz_pairs


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture
def matrix(rng):
    # Indefinite, with separated extremes so that a short run resolves them.
    lam = torch.cat([torch.tensor([-7.0, -5.5]), torch.linspace(-2, 3, 56), torch.tensor([6.0, 9.0])]).double()
    return sym_with_spectrum(lam, rng)[0]


@pytest.mark.parametrize("reorth", ["full", "selective"])
def test_extremes_match_eigh(matrix, reorth):
    ev = torch.linalg.eigvalsh(matrix)
    res = lanczos(matrix, 60, reorth=reorth, which="BE", num_eigs=4, tol=1e-12)
    assert res.converged and res.num_steps < 60
    assert rel_err(res.eigenvalues, ev[[0, 1, -2, -1]]) < 1e-8
    V = res.eigenvectors
    # Ritz vectors are eigenvectors: residuals agree with the reported bounds, and V is orthonormal.
    resid = torch.linalg.vector_norm(matrix @ V - V * res.eigenvalues, dim=0)
    assert float(resid.max()) < 1e-9 * 9.0
    assert torch.allclose(resid, res.residual_bounds, rtol=1e-10, atol=1e-10)
    assert torch.allclose(V.T @ V, torch.eye(4, dtype=torch.float64), rtol=1e-10, atol=1e-10)
    assert res.num_hvps == res.num_steps


@pytest.mark.parametrize("reorth", ["full", "selective", "none"])
def test_on_every_device(matrix, reorth, device):
    """The matrix on the device (cuda too where a GPU is visible: each step runs the CUDA kernel there): the
    extremes of eigh on the CPU, eigenvectors on the device."""
    ev = torch.linalg.eigvalsh(matrix)
    res = lanczos(matrix.to(device), 60, reorth=reorth, which="BE", num_eigs=2, tol=1e-12)
    assert res.eigenvectors.device.type == device.type
    assert rel_err(res.eigenvalues.cpu(), ev[[0, -1]]) < 1e-8
    resid = torch.linalg.vector_norm(matrix @ res.eigenvectors.cpu() - res.eigenvectors.cpu() * res.eigenvalues.cpu(),
                                     dim=0)
    assert float(resid.max()) < 1e-7


@pytest.mark.parametrize("scale", [1e-6, 1e6])
def test_the_stopping_rule_is_relative(matrix, scale):
    """tol bounds the residuals relative to the largest Ritz value: the matrix scaled takes the steps it takes
    unscaled, to the same relative accuracy (an absolute rule stopped the 1e-6-scaled one after 12 steps of 19,
    unconverged and 1.9e-7 off, and ran the 1e6-scaled one to 30)."""
    ev = torch.linalg.eigvalsh(matrix)[[0, 1, -2, -1]]
    plain = lanczos(matrix, 60, which="BE", num_eigs=4, tol=1e-8)
    scaled = lanczos(matrix * scale, 60, which="BE", num_eigs=4, tol=1e-8)
    assert plain.converged and scaled.converged and scaled.num_steps == plain.num_steps
    assert rel_err(scaled.eigenvalues / scale, ev) < 1e-10



def test_an_odd_count_of_both_ends_takes_the_extra_one_from_the_top():
    """which="BE": half from each end, the extra one from the top, as ARPACK does."""
    res = lanczos(torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64)), 10, which="BE", num_eigs=3, tol=0)
    assert res.eigenvalues.tolist() == pytest.approx([1.0, 9.0, 10.0], rel=1e-12)

def test_no_reorth_extremes_and_ghosts(matrix):
    ev = torch.linalg.eigvalsh(matrix)
    short = lanczos(matrix, 40, reorth="none", which="BE", num_eigs=2, tol=0)
    assert rel_err(short.eigenvalues, ev[[0, -1]]) < 1e-8
    # Without reorthogonalisation the basis loses orthogonality once Ritz values converge; with
    # full reorthogonalisation it stays orthonormal.
    for reorth, lost in (("none", True), ("full", False)):
        proc = LanczosProcess(as_operator(matrix), torch.ones(60, dtype=torch.float64), reorth=reorth,
                              store_basis=True, capacity=60, generator=torch.Generator().manual_seed(0))
        while not proc.exhausted:
            proc.step()
        Q = proc.basis[:proc.n]
        assert (float((Q @ Q.T - torch.eye(proc.n, dtype=torch.float64)).abs().max()) > 1e-3) == lost


@pytest.fixture
def isolated_top():
    """A spectrum whose top eigenvalue (0.9) stands apart from the rest (-0.6 to 0.6): without
    reorthogonalisation it converges early and comes back as ghost copies."""
    gen = torch.Generator().manual_seed(1)
    Q = torch.linalg.qr(torch.randn(70, 70, dtype=torch.float64, generator=gen))[0]
    lam = torch.linspace(-0.6, 0.6, 70, dtype=torch.float64)
    lam[-1] = 0.9
    H = Q @ torch.diag(lam) @ Q.T
    return (H + H.T) / 2


@pytest.mark.parametrize("two_pass", [False, True])
@pytest.mark.parametrize("which, num_eigs, expected", [("LA", 3, [-3, -2, -1]), ("BE", 5, [0, 1, -3, -2, -1])])
def test_no_reorth_reports_each_eigenvalue_once(isolated_top, two_pass, which, num_eigs, expected):
    """reorth="none" (and so two-pass mode) returned the top eigenvalue twice, [0.5826, 0.9, 0.9] for the top
    three [0.5652, 0.5826, 0.9], and called it converged: a ghost copy passes the residual test. One Ritz pair
    per eigenvalue now."""
    ev = torch.linalg.eigvalsh(isolated_top)
    res = lanczos(isolated_top, 70, reorth="none", two_pass=two_pass, which=which, num_eigs=num_eigs, tol=1e-10)
    assert res.converged
    assert rel_err(res.eigenvalues, ev[expected]) < 1e-10
    resid = torch.linalg.vector_norm(isolated_top @ res.eigenvectors - res.eigenvectors * res.eigenvalues, dim=0)
    assert float((resid / torch.linalg.vector_norm(res.eigenvectors, dim=0)).max()) < 1e-9


def test_no_reorth_is_not_converged_before_it_has_every_wanted_eigenvalue(isolated_top):
    """Ghost copies dropped, the run stops only once num_eigs distinct eigenvalues have converged (it stopped
    at the ghost before)."""
    full = lanczos(isolated_top, 70, reorth="full", num_eigs=3, tol=1e-10)
    none = lanczos(isolated_top, 70, reorth="none", num_eigs=3, tol=1e-10)
    assert full.converged and none.converged and len(none.eigenvalues) == 3
    assert torch.allclose(none.eigenvalues, full.eigenvalues, rtol=1e-10, atol=0)


def test_fewer_distinct_eigenvalues_than_asked_for_are_not_converged(isolated_top, monkeypatch):
    """Where the pairs tell apart fewer eigenvalues than num_eigs (here made so: one pair kept), the run goes on
    to k and reports converged=False, with what it has."""
    module = sys.modules[LanczosProcess.__module__]  # the package exports a function of the module's name
    monkeypatch.setattr(module, "distinct_pairs", lambda theta, bounds, eps: np.array([int(np.argmin(bounds))]))
    res = lanczos(isolated_top, 30, reorth="none", num_eigs=3, tol=1e-10)
    assert not res.converged and res.num_steps == 30 and len(res.eigenvalues) == 1


def test_two_pass_ending_at_an_invariant_subspace_is_converged_with_fewer_eigenvalues(rng):
    """Two-pass mode stops at a breakdown (no basis to restart from): the start vector's Krylov space holds two
    distinct eigenvalues, both found exactly, so the run is converged though num_eigs asked for three."""
    H = sym_with_spectrum(torch.tensor([1.0] * 5 + [2.0] * 5, dtype=torch.float64), rng)[0]
    res = lanczos(H, 10, reorth="none", two_pass=True, num_eigs=3, tol=1e-10)
    assert res.converged and res.num_steps == 2 and res.restarts == 0
    assert res.eigenvalues.tolist() == pytest.approx([1.0, 2.0], rel=1e-12)


def test_no_reorth_keeps_an_eigenvalue_found_again_after_a_breakdown(rng):
    """A breakdown restarts from a vector orthogonal to the stored basis, so an eigenvalue the next block finds
    again is repeated, not a ghost: kept, as "full" keeps it (here 0, of multiplicity 25)."""
    lam = torch.zeros(30, dtype=torch.float64)
    lam[:5] = torch.tensor([5.0, 3.0, -2.0, 1.0, 4.0])
    H = sym_with_spectrum(lam, rng)[0]
    full, none = (lanczos(H, 12, num_eigs=12, tol=0, reorth=reorth) for reorth in ("full", "none"))
    assert none.restarts >= 1 and len(none.eigenvalues) == 12
    assert float((none.eigenvalues - full.eigenvalues).abs().max()) < 1e-12


def test_distinct_pairs_drops_pairs_that_may_be_one_eigenvalue():
    """Two pairs whose intervals (Ritz value +- residual bound, widened by rounding) overlap certify one
    eigenvalue: the one with the smaller bound stays. Disjoint intervals certify two."""
    theta = np.array([1.0, 1.0 + 1e-15, 2.0, 2.05, 3.0, 3.0 + 1e-9])
    bounds = np.array([1e-17, 1e-20, 1e-12, 0.1, 1e-14, 1e-14])
    assert distinct_pairs(theta, bounds, np.finfo(np.float64).eps).tolist() == [1, 2, 4, 5]


@pytest.mark.parametrize("which,expected", [("LA", [-3, -2, -1]), ("SA", [0, 1, 2])])
def test_which(matrix, which, expected):
    ev = torch.linalg.eigvalsh(matrix)
    res = lanczos(matrix, 60, which=which, num_eigs=3, tol=1e-12)
    assert rel_err(res.eigenvalues, ev[expected]) < 1e-8


def test_two_pass_equals_one_pass(matrix):
    one = lanczos(matrix, 30, reorth="none", which="BE", num_eigs=2, tol=0)
    two = lanczos(matrix, 30, reorth="none", which="BE", num_eigs=2, tol=0, two_pass=True)
    assert torch.equal(one.eigenvalues, two.eigenvalues)
    assert float((one.eigenvectors - two.eigenvectors).abs().max()) < 1e-12
    assert two.num_hvps == 2 * 30 - 1  # the second pass regenerates q_2 .. q_30
    assert one.num_hvps == 30


def test_breakdown_restart_low_rank(rng):
    lam = torch.zeros(30, dtype=torch.float64)
    lam[:5] = torch.tensor([5.0, 3.0, -2.0, 1.0, 4.0])
    H = sym_with_spectrum(lam, rng)[0]
    res = lanczos(H, 12, num_eigs=12, tol=0)
    # Krylov space of a random v0: 5 eigenvectors + 1 null direction, then restarts in the null space.
    assert res.restarts >= 1 and res.num_steps == 12
    assert float(res.betas[5]) == 0.0
    expected = torch.cat([torch.tensor([-2.0]), torch.zeros(7), torch.tensor([1.0, 3.0, 4.0, 5.0])]).double()
    assert float((res.eigenvalues - expected).abs().max()) < 1e-12
    V = res.eigenvectors
    assert torch.allclose(V.T @ V, torch.eye(12, dtype=torch.float64), rtol=1e-10, atol=1e-10)


def test_invariant_start_vector_recovers_whole_spectrum(rng):
    lam = torch.linspace(-1, 2, 12, dtype=torch.float64)
    H = sym_with_spectrum(lam, rng)[0]
    v0 = torch.linalg.eigh(H).eigenvectors[:, 4]  # breakdown after the first step
    res = lanczos(H, 12, v0=v0, num_eigs=12, tol=0)
    assert res.restarts >= 1
    assert float((res.eigenvalues - lam).abs().max()) < 1e-12


@pytest.mark.parametrize("which, index", [("SA", 0), ("LA", -1)])
def test_early_stop_waits_for_the_block_after_a_breakdown(rng, which, index):
    # v0 an eigenvector: the first step breaks down with an exact pair, and the tolerance test stopped there,
    # returning it as the extreme eigenvalue (converged=True) although k allowed the restart to find the true one
    lam = torch.linspace(-3, 7, 50, dtype=torch.float64)
    H, U = sym_with_spectrum(lam, rng)
    res = lanczos(H, 50, v0=U[:, 3], which=which)
    assert res.restarts >= 1 and res.converged
    assert float((res.eigenvalues[0] - lam[index]).abs()) < 1e-9
    # repeated eigenvalues: each block (a random restart) holds one copy of each; four copies of the top take
    # four blocks, where the test stopped after two with [-1, -1, 2, 2]
    H, _ = sym_with_spectrum(torch.cat([torch.full((25,), 2.0), torch.full((25,), -1.0)]).double(), rng)
    res = lanczos(H, 50, which="LA", num_eigs=4)
    assert float((res.eigenvalues - 2.0).abs().max()) < 1e-9


@pytest.mark.parametrize("which, num_eigs, expected", [
    ("LA", 8, [0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0]),
    ("BE", 8, [0.0, 0.0, 0.0, 0.0, 2.0, 3.0, 4.0, 5.0]),
])
def test_a_null_space_costs_a_product_a_block_not_the_rest_of_k(rng, which, num_eigs, expected):
    # rank 5 in d = 200: past the first block (the 5 eigenvalues and v0's null-space part) each restart is a
    # null vector whose block breaks down at once with an exact 0; the stop waited for the empty block after
    # it and spent all k = 60 products (53 restarts) for three zeros
    lam = torch.cat([torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]), torch.zeros(195)]).double()
    H, _ = sym_with_spectrum(lam, rng)
    res = lanczos(H, 60, which=which, num_eigs=num_eigs, tol=1e-10)
    assert res.converged and float((res.eigenvalues - torch.tensor(expected).double()).abs().max()) < 1e-9
    assert res.num_hvps <= 12, res.num_hvps  # 6 + one a zero found + one block that finds nothing new


def test_a_block_with_one_more_copy_of_the_top_is_not_settled_by_small_gaps():
    # eight distinct top values 0.9 tol max|theta| apart (v0 sees one copy of each) and seven more copies of the
    # top one: every block after the first finds a copy of 10, which moved no wanted value by more than the
    # tolerance (each shifts up by one gap) and so ended the wait, with six copies of 10 missing (0.054 off)
    tol, gap = 1e-3, 0.9 * 1e-3 * 10.0
    lam = torch.tensor([10.0 - gap * i for i in range(8)] + [10.0] * 7 + [0.0] * 65, dtype=torch.float64)
    v0 = torch.zeros(80, dtype=torch.float64)
    v0[:8] = 1.0
    for reorth in ("full", "selective", "none"):
        res = lanczos(torch.diag(lam), 80, v0=v0, num_eigs=8, tol=tol, reorth=reorth)
        assert res.converged and float((res.eigenvalues - 10.0).abs().max()) < 1e-9, reorth


@pytest.mark.parametrize("reorth", ["full", "selective"])
def test_wanted_values_at_zero_converge_relative_to_the_largest_ritz_value(rng, reorth):
    # the smallest eigenvalues of a PSD H of rank 5 are a null space: tol relative to the wanted values (about
    # 1e-16) could not be met, and "selective" ran all k = 100 products to report exact zeros unconverged
    lam = torch.cat([torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]), torch.zeros(195)]).double()
    H, _ = sym_with_spectrum(lam, rng)
    res = lanczos(H, 100, which="SA", num_eigs=8, tol=1e-6, reorth=reorth, return_eigenvectors=False)
    assert res.converged and float(res.eigenvalues.abs().max()) < 1e-12 and res.num_hvps <= 20, res.num_hvps


def test_both_ends_with_one_value_is_the_top_alone_after_a_breakdown():
    # which="BE" with num_eigs=1 wants the top value only: the closed block's bottom (-50) was compared with the
    # top's edge (5) and taken for a find, costing another block
    lam = torch.zeros(50, dtype=torch.float64)
    lam[:3] = torch.tensor([5.0, 4.0, -50.0], dtype=torch.float64)
    v0 = torch.zeros(50, dtype=torch.float64)
    v0[:2] = 1.0
    top, both = (lanczos(torch.diag(lam), 50, v0=v0, which=w, num_eigs=1, tol=1e-8) for w in ("LA", "BE"))
    assert top.eigenvalues.tolist() == both.eigenvalues.tolist() == [5.0] and both.converged
    assert both.num_hvps == top.num_hvps


def test_no_reorth_keeps_a_block_after_a_restart_off_the_earlier_blocks(rng):
    # v0 the top eigenvector of a rotated H: the first step breaks down; the next block, without
    # reorthogonalisation, lost its orthogonality to the first and regrew the simple eigenvalue 10, which the
    # block structure took for a repeated copy: [10, 10] for the top two, [5, 10], with converged=True
    lam = torch.cat([torch.tensor([10.0]), torch.linspace(0, 5, 199)]).double()
    H, U = sym_with_spectrum(lam, rng)
    res = lanczos(H, 150, v0=U[:, 0].clone(), reorth="none", num_eigs=2, tol=1e-10)
    assert res.restarts >= 1 and res.converged
    assert float((res.eigenvalues - torch.tensor([5.0, 10.0]).double()).abs().max()) < 1e-8


def test_early_stop_after_a_breakdown_waits_for_every_wanted_value_of_the_new_block():
    # v0 in the invariant block {5, 4, 3}; the top three are {10, 5, 4.2}: with three wanted, the stop waited only
    # for the new block's top value (10) and returned [10, 5, 4] (the exact 4 hid 4.2) on 10 of 60 seeds
    spec = torch.cat([torch.tensor([5.0, 4.0, 3.0, 10.0, 4.2]), torch.linspace(0, 1, 295)]).double()
    v0 = torch.zeros(300, dtype=torch.float64)
    v0[:3] = torch.tensor([0.9, -0.7, 0.85])
    for seed in (14, 15, 19, 37, 38, 46, 47, 48, 51, 55):
        res = lanczos(torch.diag(spec), 100, v0=v0, num_eigs=3, which="LA", tol=1e-2, seed=seed)
        assert res.converged and float((res.eigenvalues - torch.tensor([4.2, 5.0, 10.0]).double()).abs().max()) < 1e-2


@pytest.mark.parametrize("reorth", ["full", "selective"])
def test_whole_space_is_invariant(rng, reorth):
    # d steps span the whole space: the last residual vector is rounding, a breakdown (for
    # "selective" only once it is projected off the converged Ritz vectors), and T is exact. The
    # bounds are the Ritz pairs' residuals: 0 with "full"; with "selective" what its projections
    # removed (its basis is orthogonal to about sqrt(eps) only, and so are its Ritz vectors).
    lam = torch.linspace(-1, 3, 30, dtype=torch.float64)
    H = sym_with_spectrum(lam, rng)[0]
    res = lanczos(H, 30, which="BE", num_eigs=30, tol=0, reorth=reorth)
    assert res.num_steps == 30 and float(res.betas[-1]) == 0.0
    V = res.eigenvectors
    assert torch.allclose(res.residual_bounds, torch.linalg.vector_norm(H @ V - V * res.eigenvalues, dim=0),
                          rtol=1e-3, atol=1e-13)
    assert res.converged or reorth == "selective"
    assert float((res.eigenvalues - lam).abs().max()) < 1e-12


@pytest.mark.parametrize("seed", range(5))
def test_selective_residual_bounds_hold_on_repeated_eigenvalues(seed):
    """Selective reorthogonalisation's projections remove parts of H q_j (up to sqrt(eps) ||T||) that T
    does not hold: the bounds left them out, claimed 1e-15 where the top Ritz pairs' residuals were
    1e-9 to 1e-8, and said converged at tol 1e-10 on 5 of 5 seeds."""
    lam = torch.cat([torch.full((8,), -1.0), torch.linspace(0, 1, 8), torch.full((8,), 3.0)]).double()
    H, _ = sym_with_spectrum(lam, torch.Generator().manual_seed(seed))
    res = lanczos(H, 24, reorth="selective", num_eigs=2, tol=1e-10, seed=seed)
    V = res.eigenvectors
    true = torch.linalg.vector_norm(H @ V - V * res.eigenvalues, dim=0)
    assert torch.allclose(res.residual_bounds, true, rtol=1e-3, atol=1e-13)
    assert not res.converged or float(true.max()) <= 1e-10 * 3.0


@pytest.mark.parametrize("reorth", ["full", "selective", "none"])
def test_forced_restart_keeps_the_coupling(matrix, reorth):
    """A restart while beta > 0 drops a residual vector r that is not rounding. The new block is not kept
    orthogonal to r (it could not reach r's part of H's eigenvectors), so the projection of H on the basis
    is T plus the coupling beta <r, q_j> between r's row and every later vector; the residual norms count
    the part of r still outside the basis. Two restarts: from a random vector, then from a given one."""
    proc = LanczosProcess(as_operator(matrix), torch.ones(60, dtype=torch.float64), reorth=reorth,
                          store_basis=True, capacity=30, generator=torch.Generator().manual_seed(0))
    for steps, start in ((10, None), (8, None), (6, torch.arange(60, dtype=torch.float64))):
        if start is not None or proc.n:
            proc.restart(start)
        for _ in range(steps):
            proc.step()
    first = proc.couplings[0]
    assert len(proc.couplings) == 2 and first.row == 9 and first.start == 10
    B = proc.basis[:proc.n]
    dropped = first.rest + B[10:].T @ torch.tensor(first.weights, dtype=torch.float64)  # r, rebuilt
    assert abs(float(B[10] @ dropped)) > 1e-3  # the probe block is not orthogonal to r
    theta, S = proc.ritz_pairs()
    A = (S * theta) @ S.T
    # "none" and "selective": B is orthonormal to rounding only in the directions the projections cover
    tol = 1e-12 if reorth == "full" else 1e-6
    assert np.abs(A - (B @ matrix @ B.T).numpy()).max() <= tol * 9.0
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        z = torch.randn(proc.n, generator=gen, dtype=torch.float64)
        true = float(torch.linalg.vector_norm(matrix @ (B.T @ z) - B.T @ (torch.from_numpy(A) @ z)))
        assert proc.residual_norm(z.numpy()) == pytest.approx(true, rel=1e-6)


def test_float32_and_callable_operator(matrix):
    ev = torch.linalg.eigvalsh(matrix)
    H32 = matrix.float()
    res = lanczos(H32, 60, which="BE", num_eigs=2, tol=1e-6)
    assert res.eigenvectors.dtype == torch.float32
    assert rel_err(res.eigenvalues, ev[[0, -1]]) < 1e-5
    v0 = torch.ones(60, dtype=torch.float64)
    res = lanczos(lambda v: matrix @ v, 60, v0=v0, which="SA", tol=1e-12)
    assert rel_err(res.eigenvalues, ev[:1]) < 1e-8


def test_bad_inputs(matrix):
    with pytest.raises(ValueError, match="k must be"):
        lanczos(matrix, 0)
    with pytest.raises(ValueError, match="which"):
        lanczos(matrix, 5, which="LM")
    with pytest.raises(ValueError, match="reorth='none'"):
        lanczos(matrix, 5, two_pass=True)
    with pytest.raises(ValueError, match="reorth must be"):
        lanczos(matrix, 5, reorth="partial")
    with pytest.raises(ValueError, match=r"^num_eigs = 6 Ritz pairs need at least as many Lanczos steps and "
                                         r"dimensions: k = 5, d = 60$"):
        lanczos(matrix, 5, num_eigs=6)
    with pytest.raises(ValueError, match="num_eigs = 61 .* k = 100, d = 60"):
        lanczos(matrix, 100, num_eigs=61)
    # "BE" asks for two pairs by default: the error named a num_eigs = 2 the caller never passed
    with pytest.raises(ValueError, match=r"^which='BE' \(without num_eigs: 2\) Ritz pairs need .* k = 1, d = 60$"):
        lanczos(matrix, 1, which="BE")
    with pytest.raises(TypeError, match="^two_pass must be a bool, got str$"):
        lanczos(matrix, 5, two_pass="no")
    with pytest.raises(TypeError, match="^return_eigenvectors must be a bool, got int$"):
        lanczos(matrix, 5, return_eigenvectors=0)
    with pytest.raises(ValueError, match="symmetric"):
        lanczos(matrix + torch.triu(torch.ones_like(matrix)), 5)
    bad = matrix.clone()
    bad[3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        lanczos(bad, 5)
    with pytest.raises(ValueError, match="dimension"):
        lanczos(matrix, 5, v0=torch.ones(7, dtype=torch.float64))
    with pytest.raises(ValueError, match="non-zero"):
        lanczos(matrix, 5, v0=torch.zeros(60, dtype=torch.float64))
    with pytest.raises(ValueError, match="square"):
        lanczos(torch.ones(3, 4, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match=r"^lanczos: a function v -> H v needs v0 \(its length, dtype and device"):
        lanczos(lambda v: v, 2)  # the shared message asked for "those of the gradient", which lanczos does not take
    with pytest.raises(ValueError, match=r"^H is empty \(0 x 0\): it has no eigenvalues$"):
        lanczos(torch.ones(0, 0, dtype=torch.float64), 5)
    for seed, error in (("a", TypeError), (1.0, TypeError), (True, TypeError), (-1, ValueError), (2**63, ValueError)):
        with pytest.raises(error, match="seed must be"):
            lanczos(matrix, 5, seed=seed)


def test_numpy_integer_seed(matrix):
    """A numpy integer is a seed like the Python int of the same value."""
    expected = lanczos(matrix, 10, tol=0.0, seed=7).alphas
    assert torch.equal(lanczos(matrix, 10, tol=0.0, seed=np.int64(7)).alphas, expected)
    assert torch.equal(lanczos(matrix, 10, tol=0.0, seed=np.uint32(7)).alphas, expected)


def test_overflowing_products_raise():
    """A finite matrix whose Rayleigh quotients overflow float64 (its eigenvalue 4c is above the
    largest float64): the step's alpha is Inf, and the step says so instead of handing it to T."""
    c = 0.85e308
    with pytest.raises(ValueError, match="alpha or beta is not finite"):
        lanczos(torch.full((4, 4), c, dtype=torch.float64), 3, v0=torch.ones(4, dtype=torch.float64))


@settings(max_examples=15, deadline=None)
@given(d=st.integers(2, 16), seed=st.integers(0, 2**16), log_scale=st.floats(-3, 3))
def test_property_extremes(d, seed, log_scale):
    gen = torch.Generator().manual_seed(seed)
    lam = torch.randn(d, generator=gen, dtype=torch.float64) * 10.0**log_scale
    H = sym_with_spectrum(lam, gen)[0]
    res = lanczos(H, d, which="BE", num_eigs=2, tol=0, seed=seed)
    ev = torch.linalg.eigvalsh(H)
    assert float((res.eigenvalues - ev[[0, -1]]).abs().max()) <= 1e-8 * float(ev.abs().max())


@pytest.mark.parametrize("scale", [1e-170, 1e-200])
def test_products_whose_squares_underflow_are_refused(scale):
    """Entries of H q below 1.5e-154 square to subnormals or 0: beta came out 0 at every step, read as a
    breakdown each time, and lanczos returned [1.2e-171, 9.2e-171] for [-1e-170, 2e-170], reported converged."""
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64, generator=gen))
    H = (Q * (torch.linspace(-1, 2, 40, dtype=torch.float64) * scale)) @ Q.T
    with pytest.raises(ValueError, match="the products H q have entries all below 1.5e-154 .* scale the operator up"):
        lanczos(H, k=40, num_eigs=2, which="BE")
    result = lanczos(H / scale, k=40, num_eigs=2, which="BE")  # the same problem scaled: right
    np.testing.assert_allclose(result.eigenvalues, [-1.0, 2.0], rtol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 7, 40])
def test_ritz_pairs_are_the_tridiagonal_eigenpairs(k):
    """ritz_pairs calls LAPACK's dstevd itself (scipy's eigh_tridiagonal around it cost 3x): the eigenpairs of T
    against numpy's dense eigh, a breakdown's zero coupling and a 1 x 1 T (which the binding cannot take) too."""
    rng = np.random.default_rng(k)
    alphas, betas = list(rng.normal(size=k)), list(np.abs(rng.normal(size=k)))
    if k > 2:
        betas[k // 2] = 0.0
    T = np.diag(alphas) + np.diag(betas[:k - 1], 1) + np.diag(betas[:k - 1], -1)
    theta, S = ritz_pairs(alphas, betas)
    assert theta.dtype == S.dtype == np.float64 and S.shape == (k, k)
    assert np.allclose(theta, np.linalg.eigvalsh(T), atol=1e-13)
    assert np.allclose(T @ S, S * theta, atol=1e-12) and np.allclose(S.T @ S, np.eye(k), atol=1e-12)


def test_float32_products_below_the_smallest_normal_number_are_refused():
    """A float32 H of entries ~1e-44 (subnormal products, digits lost) gave eigenvalues ~5e3 with no error (r62);
    float64's underflow was refused already."""
    rng = np.random.default_rng(14)
    Q, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    H = torch.tensor(Q @ np.diag(np.linspace(-1, 1, 30)) @ Q.T * 1e-44, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"the products H q have entries all below 1\.2e-38 .* smallest normal number"):
        lanczos((H + H.T) / 2, 30, which="BE", num_eigs=2)

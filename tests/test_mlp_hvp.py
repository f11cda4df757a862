"""mlp_hvp (fused exact MLP Hessian-vector products) and FusedMLPHessian.

Oracle: the dense float64 Hessian of the flattened loss from ``torch.autograd.functional.hessian``
(reverse-over-reverse, independent of the op's torch.func reference), times the tangents. Every
backend runs on every device it takes (the CUDA kernel too where a GPU is visible).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from devices import backend_devices
from tolerance import assert_within_rule, relative_error
from torch import nn
from torch.autograd.functional import hessian

from unlearn_kernels import backends, choose_backend, ops
from unlearn_kernels.backends import BackendStatus, BackendUnavailableError
from unlearn_kernels.curvature import GenericHessian, hessian_operator
from unlearn_kernels.curvature.fused_mlp import FusedMLPHessian, supports
from unlearn_kernels.ops.mlp_hvp import ACTIVATIONS

ACTS = list(ACTIVATIONS)
PAIRS = backend_devices("mlp_hvp")
COMPILED = backend_devices("mlp_hvp", compiled_only=True)
FNS = {"identity": lambda a: a, "relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}


def _problem(dims, acts, bias, k, rng, dtype=torch.float64, n=9, smoothing=0.0):
    """Random MLP parameters, data and K tangents (float64, then cast), as keyword arguments of mlp_hvp."""
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=rng, dtype=torch.float64) * scale).to(dtype)

    layers = list(zip(dims[:-1], dims[1:]))
    has_bias = bias if isinstance(bias, list) else [bias] * len(layers)
    return dict(
        x=rand(n, dims[0]),
        target=torch.randint(0, dims[-1], (n,), generator=rng),
        weights=[rand(o, i, scale=1.5 / i**0.5) for i, o in layers],
        biases=[rand(o, scale=0.5) if b else None for (_, o), b in zip(layers, has_bias)],
        activations=acts,
        v_weights=[rand(k, o, i) for i, o in layers],
        v_biases=[rand(k, o) if b else None for (_, o), b in zip(layers, has_bias)],
        label_smoothing=smoothing,
    )


def _flat(hv_w, hv_b):
    k = hv_w[0].shape[0]
    return torch.cat([t.reshape(k, -1) for t in [*hv_w, *(b for b in hv_b if b is not None)]], dim=1)


def _dense_products(p, ignore_index=-100):
    """H V in float64 with H the dense Hessian of the flat parameter vector (weights, then biases)."""
    x, y = p["x"].double(), p["target"]
    shapes = [w.shape for w in p["weights"]] + [b.shape for b in p["biases"] if b is not None]
    has_bias = [b is not None for b in p["biases"]]
    flat = torch.cat([t.double().reshape(-1) for t in [*p["weights"], *(b for b in p["biases"] if b is not None)]])

    def loss(w):
        parts = iter(torch.split(w, [s.numel() for s in shapes]))
        ws = [next(parts).view(s) for s in shapes[: len(p["weights"])]]
        h = x
        for wt, with_bias, act in zip(ws, has_bias, p["activations"]):
            h = FNS[act](h @ wt.T + (next(parts) if with_bias else 0))
        return F.cross_entropy(h, y, label_smoothing=p["label_smoothing"], ignore_index=ignore_index)

    k = p["v_weights"][0].shape[0]
    v = [*p["v_weights"], *(vb if vb is not None else torch.zeros(k, *b.shape, dtype=b.dtype)
                            for b, vb in zip(p["biases"], p["v_biases"]) if b is not None)]
    V = torch.cat([t.double().reshape(k, -1) for t in v], dim=1)
    return V @ hessian(loss, flat)  # the Hessian is symmetric


def _cast(p, dtype=None, device=None):
    """The problem with its floating tensors cast to ``dtype`` and every tensor moved to ``device``."""
    def conv(t):
        return None if t is None else t.to(device=device, dtype=dtype)

    lists = {k: [conv(t) for t in p[k]] for k in ("weights", "biases", "v_weights", "v_biases") if k in p}
    return {**p, "x": conv(p["x"]), "target": p["target"].to(device), **lists}


# ----------------------------------------------------------------------------- the op
@pytest.mark.every_backend  # its cuda pairs run inside the body: benchmarks/gpu_check.sh selects it by this mark
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("dims", [[5, 4, 3], [6, 17, 3]])  # a layer under and one over the kernels' 16-wide switch
def test_float64_matches_dense_hessian_and_reference(act, bias, k, dims, rng):
    p = _problem(dims, [act, act], bias, k, rng)
    exact = _dense_products(p)
    for backend, device in PAIRS:
        hv_w, hv_b = ops.mlp_hvp(**_cast(p, device=device), backend=backend)
        assert [t.shape for t in hv_w] == [v.shape for v in p["v_weights"]]
        assert [b is None for b in hv_b] == [not bias, not bias]
        assert all(t.device.type == device for t in hv_w)
        assert relative_error(_flat(hv_w, hv_b).cpu(), exact) <= 1e-10, (backend, device)


@pytest.mark.every_backend  # its cuda pairs run inside the body: benchmarks/gpu_check.sh selects it by this mark
def test_relu_at_an_exactly_zero_pre_activation(rng):
    """A pruned hidden unit (a zero weight row, no bias) has pre-activation exactly 0 on every row, where
    torch's relu' is 0: a kernel with relu'(0) = 1 gave products 1.84 off (on a scale of 1) and every other test
    passed, their weights being random and continuous."""
    p = _problem([5, 4, 3], ["relu", "identity"], False, 2, rng)
    p["weights"][0][1] = 0.0
    exact = _dense_products(p)
    for backend, device in PAIRS:
        out = _flat(*ops.mlp_hvp(**_cast(p, device=device), backend=backend)).cpu()
        assert relative_error(out, exact) <= 1e-10, (backend, device)


@pytest.mark.every_backend  # its cuda pairs run inside the body: benchmarks/gpu_check.sh selects it by this mark
def test_deeper_mixed_chain_with_label_smoothing_and_ignored_rows(rng):
    p = _problem([6, 5, 4, 5, 4], ["gelu", "sigmoid", "relu", "tanh"], [True, False, True, True], 4, rng,
                 n=11, smoothing=0.2)
    p["target"][[2, 7]] = -3
    p["v_biases"][2] = None  # zero tangent for a present bias
    exact = _dense_products(p, ignore_index=-3)
    for backend, device in PAIRS:
        out = _flat(*ops.mlp_hvp(**_cast(p, device=device), ignore_index=-3, backend=backend))
        assert relative_error(out.cpu(), exact) <= 1e-10, (backend, device)


@pytest.mark.every_backend  # its cuda pairs run inside the body: benchmarks/gpu_check.sh selects it by this mark
def test_rows_over_several_loss_tiles_with_ignored_rows_at_their_edges(rng):
    # the CPU loss takes rows 64 at a time (max, exps, sums, logs per tile): 133 rows are two full tiles and
    # a partial one, with ignored rows on both sides of each edge; then an ignored row with a NaN in the
    # third tile (its exps run with the tile's) is still refused
    p = _problem([5, 6, 4], ["tanh", "identity"], True, 3, rng, n=133, smoothing=0.1)
    p["target"][[0, 63, 64, 65, 127, 128, 132]] = -100
    exact = _dense_products(p)
    for backend, device in PAIRS:
        out = _flat(*ops.mlp_hvp(**_cast(p, device=device), backend=backend))
        assert relative_error(out.cpu(), exact) <= 1e-10, (backend, device)
    p["x"][130, 2] = float("nan")
    p["target"][130] = -100
    for backend, device in PAIRS:
        with pytest.raises(ValueError, match="NaN or"):
            ops.mlp_hvp(**_cast(p, device=device), backend=backend)


@pytest.mark.parametrize("backend, device", COMPILED)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("k", [1, 5])
def test_float32_within_twice_the_pytorch_error(backend, device, act, k, rng):
    p64 = _problem([12, 16, 16, 7], [act, act, "identity"], True, k, rng, n=40, smoothing=0.1)
    exact = _flat(*ops.mlp_hvp_ref(**p64))  # float64 torch.func: independent of the compiled kernels
    p32 = _cast(p64, torch.float32, device)
    out = _flat(*ops.mlp_hvp(**p32, backend=backend)).cpu()
    plain = _flat(*ops.mlp_hvp(**p32, backend="reference")).cpu()
    assert_within_rule(out, plain, exact, ulps=1.0)


@pytest.mark.parametrize("backend, device", COMPILED)
def test_k_tangents_equal_k_single_products(backend, device, rng):
    p = _cast(_problem([6, 8, 3], ["tanh", "identity"], True, 4, rng), device=device)
    together = _flat(*ops.mlp_hvp(**p, backend=backend))
    for i in range(4):
        single = dict(p, v_weights=[v[i:i + 1] for v in p["v_weights"]], v_biases=[v[i:i + 1] for v in p["v_biases"]])
        torch.testing.assert_close(_flat(*ops.mlp_hvp(**single, backend=backend)), together[i:i + 1],
                                   rtol=1e-13, atol=1e-15)


def test_opcheck(rng):
    p = _problem([5, 4, 3], ["gelu", "relu"], [True, False], 2, rng)
    args = (p["x"], p["target"], p["weights"], p["biases"], [ACTIVATIONS[a] for a in p["activations"]],
            p["v_weights"], p["v_biases"], 0.1, -100, True)
    torch.library.opcheck(torch.ops.unlearn_kernels.mlp_hvp.default, args)


# ----------------------------------------------------------------------------- the flat-vector form
def _flat_layout(p, order, chosen):
    """V (d, K) over the ``chosen`` parameters (names like "w1", "b0") stacked in ``order``, their
    offsets, and the dense products of the full parameter vector restricted to them."""
    sizes = {f"w{l}": w.numel() for l, w in enumerate(p["weights"])}
    sizes |= {f"b{l}": b.numel() for l, b in enumerate(p["biases"]) if b is not None}
    offsets, start = {}, 0
    for name in order:
        if name in chosen:
            offsets[name] = start
            start += sizes[name]
    num_layers = len(p["weights"])
    return offsets, [offsets.get(f"w{l}", -1) for l in range(num_layers)], [offsets.get(f"b{l}", -1) for l in range(num_layers)]


def _flat_tangents(p, offsets):
    """V (d, K) from the problem's tangents at ``offsets``; the unchosen tangents of ``p`` set to zero."""
    k = p["v_weights"][0].shape[0]
    d = sum(t.numel() // k for name, t in _named_tangents(p) if name in offsets)
    V = torch.zeros(d, k, dtype=p["x"].dtype)
    for name, t in _named_tangents(p):
        if name in offsets:
            V[offsets[name]:offsets[name] + t.numel() // k] = t.reshape(k, -1).T
        else:
            t.zero_()
    return V


def _named_tangents(p):
    yield from ((f"w{l}", v) for l, v in enumerate(p["v_weights"]))
    yield from ((f"b{l}", v) for l, v in enumerate(p["v_biases"]) if v is not None)


@pytest.mark.every_backend  # its cuda pairs run inside the body: benchmarks/gpu_check.sh selects it by this mark
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("chosen", [("w0", "b0", "w1", "b1", "w2"), ("w2", "b1"), ("b0",)])
def test_flat_form_matches_the_dense_hessian_block(k, chosen, rng):
    p = _problem([5, 4, 4, 3], ["tanh", "relu", "identity"], [True, True, False], k, rng)
    offsets, w_off, b_off = _flat_layout(p, ["b1", "w0", "w2", "b0", "w1"], chosen)  # not the layer order
    V = _flat_tangents(p, offsets)
    full = _flat(*ops.mlp_hvp(**p, backend="cpp"))  # (K, all parameters), unchosen tangents zeroed
    exact = _dense_products(p)
    assert relative_error(full, exact) <= 1e-10
    names = [f"w{l}" for l in range(3)] + ["b0", "b1"]
    sizes = [w.numel() for w in p["weights"]] + [4, 4]
    starts = dict(zip(names, [sum(sizes[:i]) for i in range(len(sizes))]))
    expected = torch.zeros_like(V)
    for name in chosen:
        n = dict(zip(names, sizes))[name]
        expected[offsets[name]:offsets[name] + n] = exact[:, starts[name]:starts[name] + n].T
    common = dict(x=p["x"], target=p["target"], weights=p["weights"], biases=p["biases"], activations=p["activations"],
                  V=V, weight_offsets=w_off, bias_offsets=b_off)
    for backend, device in PAIRS:
        moved = _cast(common, device=device) | {"V": V.to(device)}
        out = ops.mlp_hvp_flat(**moved, backend=backend)
        assert out.shape == V.shape and out.T.is_contiguous() and out.device.type == device
        assert relative_error(out.cpu(), expected) <= 1e-10, (backend, device)
    ref = ops.mlp_hvp_flat_ref(**common)
    assert relative_error(ref, expected) <= 1e-10


@pytest.mark.parametrize("backend, device", PAIRS)
def test_flat_form_bad_layout_raises_clear_errors(backend, device, rng):
    p = _cast(_problem([5, 4, 3], ["tanh", "identity"], [True, False], 2, rng), device=device)
    base = dict(x=p["x"], target=p["target"], weights=p["weights"], biases=p["biases"], activations=p["activations"],
                V=torch.randn(20 + 4 + 12, 2, dtype=torch.float64, device=device), weight_offsets=[0, 24],
                bias_offsets=[20, -1])
    assert ops.mlp_hvp_flat(**base, backend=backend).shape == (36, 2)

    def call(exc, match, **changes):
        with pytest.raises(exc, match=match):
            ops.mlp_hvp_flat(**{**base, **changes}, backend=backend)

    call(ValueError, r"weight_offsets\[1\] = 23 where row 24 was expected", weight_offsets=[0, 23])
    # any negative offset was "not chosen", and a tiling that then failed blamed another entry
    call(ValueError, r"weight_offsets\[1\] = -2: an offset is a row of V \(>= 0\), or -1 for a parameter that is not "
                     r"chosen", weight_offsets=[0, -2])
    call(ValueError, r"bias_offsets\[0\] = -1099511627776: an offset", bias_offsets=[-(2**40), -1],
         V=torch.randn(32, 2, dtype=torch.float64, device=device))
    call(ValueError, "have 36 entries but V has 40 rows", V=torch.randn(40, 2, dtype=torch.float64, device=device))
    call(ValueError, r"bias_offsets\[1\] = 36 but layer 1 has no bias", bias_offsets=[20, 36])
    call(ValueError, "one entry per layer", weight_offsets=[0])
    call(ValueError, "V must be a 2-D", V=torch.randn(36, dtype=torch.float64, device=device))
    call(TypeError, "V has dtype Float but x has Double", V=torch.randn(36, 2, device=device))
    call(ValueError, f"V is on meta but x on {device}", V=base["V"].to("meta"))
    call(ValueError, f"target is on meta but x on {device}", target=p["target"].to("meta"))
    call(ValueError, "'softplus' is not one of", activations=["softplus", "identity"])
    call(ValueError, r"target\[0\] = 3 is out of range", target=torch.full((9,), 3, device=device))
    nan_v = base["V"].clone()
    nan_v[5, 1] = float("nan")
    call(ValueError, "NaN or Inf", V=nan_v)
    # argument types and options: checked before any backend, the same for all
    call(TypeError, "^mlp_hvp_flat: x must be a torch.Tensor, got ndarray$", x=p["x"].cpu().numpy())
    call(TypeError, "^mlp_hvp_flat: target must be a torch.Tensor, got list$", target=p["target"].tolist())
    call(TypeError, "^mlp_hvp_flat: V must be a torch.Tensor, got ndarray$", V=base["V"].cpu().numpy())
    call(TypeError, r"^mlp_hvp_flat: biases must be a list of tensors \(one per layer\), got NoneType$", biases=None)
    call(TypeError, r"^mlp_hvp_flat: weights\[0\] must be a tensor, got list$",
         weights=[p["weights"][0].tolist(), p["weights"][1]])
    call(TypeError, r"^mlp_hvp_flat: weight_offsets\[1\] must be an int, got float$", weight_offsets=[0, 24.0])
    call(TypeError, r"^mlp_hvp_flat: bias_offsets\[1\] must be an int, got bool$", bias_offsets=[20, True])
    call(ValueError, r"^mlp_hvp_flat: weight_offsets\[1\] must be in the int64 range", weight_offsets=[0, 2**64])
    call(TypeError, r"^mlp_hvp_flat: bias_offsets must be a list of ints \(one per layer\), got int$", bias_offsets=20)
    call(TypeError, "^mlp_hvp_flat: ignore_index must be an int, got float$", ignore_index=1.5)
    call(TypeError, "^mlp_hvp_flat: check_finite must be a bool, got str$", check_finite="no")
    call(ValueError, r"^mlp_hvp_flat: label_smoothing must be a finite number in \[0, 1\], got 1.5$",
         label_smoothing=1.5)
    # offsets as a tuple, numpy or torch integers: the same products
    expected = ops.mlp_hvp_flat(**base, backend=backend)
    for offsets in [(np.int64(0), 24), np.array([0, 24]), torch.tensor([0, 24])]:
        torch.testing.assert_close(ops.mlp_hvp_flat(**{**base, "weight_offsets": offsets}, backend=backend), expected)


def test_flat_form_opcheck(rng):
    p = _problem([5, 4, 3], ["gelu", "identity"], [True, False], 2, rng)
    V = torch.randn(32, 2, dtype=torch.float64)
    args = (p["x"], p["target"], p["weights"], p["biases"], [2, 0], V, [0, 20], [-1, -1], 0.1, -100, True)
    torch.library.opcheck(torch.ops.unlearn_kernels.mlp_hvp_flat.default, args)


def test_backend_report_and_choice(rng):
    assert "mlp_hvp" in backends() and backends()["mlp_hvp"]["cpp"].usable
    assert choose_backend("mlp_hvp", "cpu") == choose_backend("mlp_hvp", torch.device("cpu")) == "cpp"
    p = _problem([3, 2], ["identity"], True, 1, rng)
    with pytest.raises(BackendUnavailableError, match="no Triton kernel"):
        ops.mlp_hvp(**p, backend="triton")
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        ops.mlp_hvp(**p, backend="cuda")


@pytest.mark.parametrize("backend, device", PAIRS)
def test_bad_input_raises_clear_errors(backend, device, rng):
    p = _cast(_problem([5, 4, 3], ["tanh", "relu"], True, 2, rng), device=device)
    f64 = dict(dtype=torch.float64, device=device)

    def call(exc, match, **changes):
        with pytest.raises(exc, match=match):
            ops.mlp_hvp(**{**p, **changes}, backend=backend)

    call(ValueError, r"weights\[1\] has shape \[3, 5\] but its input has 4 features",
         weights=[p["weights"][0], torch.randn(3, 5, **f64)])
    call(ValueError, r"v_weights\[1\] must have shape \(K, out, in\) = \(2, 3, 4\)",
         v_weights=[p["v_weights"][0], torch.randn(3, 3, 4, **f64)])
    call(ValueError, r"v_biases\[0\] must have shape", v_biases=[torch.randn(1, 4, **f64), None])
    call(ValueError, r"v_biases\[1\] is given but layer 1 has no bias", biases=[p["biases"][0], None])
    call(ValueError, "must all have one entry per layer, got 2, 2, 1, 2 and 2", activations=["tanh"])
    call(ValueError, "'softplus' is not one of", activations=["tanh", "softplus"])
    call(TypeError, r"weights\[0\] has dtype Float but x has Double", weights=[p["weights"][0].float(), p["weights"][1]])
    # One tensor on "meta": the dispatcher picks the op's fake, which must check devices as the kernels do.
    call(ValueError, rf"v_weights\[0\] is on meta but x on {device}", v_weights=[p["v_weights"][0].to("meta"), p["v_weights"][1]])
    call(ValueError, f"target is on meta but x on {device}", target=p["target"].to("meta"))
    call(ValueError, rf"biases\[1\] is on meta but x on {device}", biases=[p["biases"][0], p["biases"][1].to("meta")])
    call(ValueError, "target must have shape", target=p["target"][:3])
    call(ValueError, r"target\[0\] = 3 is out of range for 3 classes", target=torch.full((9,), 3, device=device))
    call(ValueError, "every target is ignore_index", target=torch.full((9,), -100, device=device))
    call(ValueError, "label_smoothing", label_smoothing=1.5)
    call(ValueError, "label_smoothing must be a finite number", label_smoothing=True)
    call(ValueError, "label_smoothing must be a finite number", label_smoothing=float("nan"))
    call(ValueError, "x must be 2-D", x=p["x"][None])
    # Argument types and the plain Python options are checked before any backend, the same for all.
    call(TypeError, "^mlp_hvp: x must be a torch.Tensor, got ndarray$", x=p["x"].cpu().numpy())
    call(TypeError, "^mlp_hvp: target must be a torch.Tensor, got list$", target=p["target"].tolist())
    call(TypeError, r"^mlp_hvp: v_weights\[1\] must be a tensor, got ndarray$",
         v_weights=[p["v_weights"][0], p["v_weights"][1].cpu().numpy()])
    call(TypeError, "^mlp_hvp: ignore_index must be an int, got float$", ignore_index=1.5)
    call(TypeError, "^mlp_hvp: ignore_index must be an int, got str$", ignore_index="a")
    call(TypeError, "^mlp_hvp: ignore_index must be an int, got bool$", ignore_index=False)
    call(ValueError, r"^mlp_hvp: ignore_index must be in the int64 range \[-2\*\*63, 2\*\*63\), "
                     "got 1180591620717411303424$", ignore_index=2**70)
    call(TypeError, "^mlp_hvp: check_finite must be a bool, got str$", check_finite="no")
    call(ValueError, r"^mlp_hvp: label_smoothing must be a finite number in \[0, 1\], got 'a'$", label_smoothing="a")
    call(ValueError, r"^mlp_hvp: label_smoothing must be a finite number in \[0, 1\], got 2.0$",
         label_smoothing=2.0, x=p["x"][None])  # an option before a shape, on every backend
    nan_x = p["x"].clone()
    nan_x[3, 1] = float("nan")
    call(ValueError, "NaN", x=nan_x)
    nan_v = [v.clone() for v in p["v_weights"]]
    nan_v[0][1, 2, 3] = float("inf")
    call(ValueError, "NaN or Inf", v_weights=nan_v)
    # Without the check, the NaN goes through: the values are the caller's to inspect.
    out, _ = ops.mlp_hvp(**{**p, "x": nan_x}, check_finite=False, backend=backend)
    assert torch.isnan(out[0]).any()


@pytest.mark.parametrize("backend, device", PAIRS)
def test_each_public_function_names_itself_for_a_bad_activation(backend, device, rng):
    """The activation names are checked by one helper for every public function; each error names the
    function called (mlp_hvp_flat and mlp_hvp_state named mlp_hvp)."""
    p = _cast(_problem([5, 4, 3], ["tanh", "identity"], [True, False], 2, rng), device=device)
    model = dict(x=p["x"], target=p["target"], weights=p["weights"], biases=p["biases"])
    V = torch.randn(36, 2, dtype=torch.float64, device=device)
    offsets = dict(weight_offsets=[0, 24], bias_offsets=[20, -1])
    state = ops.mlp_hvp_state(**model, activations=p["activations"], backend=backend)
    calls = {
        "mlp_hvp": lambda acts: ops.mlp_hvp(**model, activations=acts, v_weights=p["v_weights"],
                                            v_biases=p["v_biases"], backend=backend),
        "mlp_hvp_flat": lambda acts: ops.mlp_hvp_flat(**model, activations=acts, V=V, **offsets, backend=backend),
        "mlp_value_grad_flat": lambda acts: ops.mlp_value_grad_flat(**model, activations=acts, **offsets,
                                                                    backend=backend),
        "mlp_hvp_state": lambda acts: ops.mlp_hvp_state(**model, activations=acts, backend=backend),
        "mlp_hvp_flat_cached": lambda acts: ops.mlp_hvp_flat_cached(p["x"], state, p["weights"], p["biases"], acts, V,
                                                                    **offsets, backend=backend),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=rf"^{name}: activations\[0\] = 'bogus' is not one of"):
            call(["bogus", "identity"])
        with pytest.raises(TypeError, match=f"^{name}: activations must be a list of names, got str$"):
            call("tanh")


def test_direct_dispatcher_call_checks_its_inputs(rng):
    p = _problem([5, 4, 3], ["tanh", "relu"], True, 2, rng)
    op = torch.ops.unlearn_kernels.mlp_hvp
    args = [p["x"], p["target"], p["weights"], p["biases"], [3, 1], p["v_weights"], p["v_biases"], 0.0, -100, True]
    with pytest.raises(ValueError, match=r"weights\[1\] has shape"):
        op(*args[:2], [p["weights"][0], p["weights"][0]], *args[3:])
    with pytest.raises(ValueError, match="not an activation code"):
        op(*args[:4], [3, 9], *args[5:])
    with pytest.raises(ValueError, match="one entry per layer"):
        op(*args[:4], [3], *args[5:])


@pytest.mark.parametrize("backend, device", PAIRS)
def test_integer_ignore_index_of_any_kind(backend, device, rng):
    """ignore_index as a numpy or Python int, also in the flat and state forms, gives the products of
    the loss without the rows of that label (a float is refused: see test_bad_input_raises_clear_errors)."""
    p = _cast(_problem([5, 4, 3], ["tanh", "identity"], True, 2, rng), device=device)
    p["target"][:4] = 1
    expected = _dense_products(_cast(p, device="cpu"), ignore_index=1)
    for ignore_index in (1, np.int64(1), np.int32(1)):
        out = _flat(*ops.mlp_hvp(**p, ignore_index=ignore_index, backend=backend))
        assert relative_error(out.cpu(), expected) <= 1e-10, (backend, ignore_index)
    d = sum(w.numel() for w in p["weights"]) + sum(b.numel() for b in p["biases"])
    V = torch.randn(d, 2, dtype=torch.float64, generator=rng).to(device)
    common = dict(x=p["x"], target=p["target"], weights=p["weights"], biases=p["biases"], activations=p["activations"])
    flat = ops.mlp_hvp_flat(**common, V=V, weight_offsets=[0, 24], bias_offsets=[20, 36], ignore_index=np.int64(1),
                            backend=backend)
    state = ops.mlp_hvp_state(**common, ignore_index=np.int16(1), backend=backend)
    cached = ops.mlp_hvp_flat_cached(p["x"], state, p["weights"], p["biases"], p["activations"], V, [0, 24], [20, 36],
                                     backend=backend)
    reference = ops.mlp_hvp_flat(**common, V=V, weight_offsets=[0, 24], bias_offsets=[20, 36], ignore_index=1,
                                 backend="reference")
    torch.testing.assert_close(flat, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cached, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_meta_tensors_give_the_fakes_shapes(backend, rng):
    """Meta tensors hold no values: "auto" takes the reference for them, which checks the arguments
    but no values (targets, finiteness) and returns meta tensors shaped as the ops' fakes'."""
    p = _cast(_problem([5, 4, 3], ["gelu", "identity"], [True, False], 2, rng), device="meta")
    hv_w, hv_b = ops.mlp_hvp(**p, backend=backend)
    assert [(t.shape, t.device.type) for t in hv_w] == [((2, 4, 5), "meta"), ((2, 3, 4), "meta")]
    assert hv_b[1] is None and (hv_b[0].shape, hv_b[0].device.type) == ((2, 4), "meta")
    # the registered op on meta tensors runs its fake
    fake = torch.ops.unlearn_kernels.mlp_hvp(p["x"], p["target"], p["weights"], p["biases"], [2, 0], p["v_weights"],
                                             p["v_biases"], 0.0, -100, True)
    assert [t.shape for t in [*hv_w, hv_b[0]]] == [t.shape for t in fake]
    common = dict(x=p["x"], target=p["target"], weights=p["weights"], biases=p["biases"], activations=p["activations"])
    V = torch.empty(36, 3, dtype=torch.float64, device="meta")
    flat = ops.mlp_hvp_flat(**common, V=V, weight_offsets=[0, 24], bias_offsets=[20, -1], backend=backend)
    state = ops.mlp_hvp_state(**common, backend=backend)
    cached = ops.mlp_hvp_flat_cached(p["x"], state, p["weights"], p["biases"], p["activations"], V, [0, 24], [20, -1],
                                     backend=backend)
    fake_state = torch.ops.unlearn_kernels.mlp_hvp_state(p["x"], p["target"], p["weights"], p["biases"], [2, 0], 0.0,
                                                         -100, True)
    assert [t.shape for t in state] == [t.shape for t in fake_state]
    assert flat.shape == cached.shape == (36, 3) and flat.device.type == cached.device.type == "meta"
    with pytest.raises(ValueError, match="target must have shape"):
        ops.mlp_hvp(**{**p, "target": p["target"][:3]}, backend=backend)


# ----------------------------------------------------------------------------- fixed weights
@pytest.mark.every_backend  # its cuda pairs run inside the body: benchmarks/gpu_check.sh selects it by this mark
@pytest.mark.parametrize("acts", [["tanh", "relu", "identity"], ["gelu", "sigmoid", "identity"]])
@pytest.mark.parametrize("chosen", [("w0", "b0", "w1", "b1", "w2"), ("w2", "b1"), ("b0",), ("w1",)])
def test_state_and_cached_products_equal_the_whole_pass(acts, chosen, rng):
    # Layer widths 4 and 3 take the cached pass's narrow-layer route on the CPU (under 16 outputs), 17 the other.
    p = _problem([5, 4, 17, 3], acts, [True, True, False], 3, rng, smoothing=0.1)
    p["target"][2] = -100  # an ignored row
    offsets, w_off, b_off = _flat_layout(p, ["b1", "w0", "w2", "b0", "w1"], chosen)
    V = _flat_tangents(p, offsets)
    model = dict(x=p["x"], target=p["target"], weights=p["weights"], biases=p["biases"], activations=p["activations"])
    whole = ops.mlp_hvp_flat(**model, V=V, weight_offsets=w_off, bias_offsets=b_off, label_smoothing=0.1, backend="cpp")
    ref_state = ops.mlp_hvp_state_ref(**model, label_smoothing=0.1)
    for backend, device in PAIRS:
        on = _cast(model, device=device)
        state = ops.mlp_hvp_state(**on, label_smoothing=0.1, backend=backend)
        assert len(state) == 4 * 3 + 1
        for a, b in zip(state, ref_state):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-13, atol=1e-15)
        out = ops.mlp_hvp_flat_cached(on["x"], state, on["weights"], on["biases"], acts, V.to(device), w_off, b_off,
                                      backend=backend)
        assert out.shape == V.shape and out.T.is_contiguous()
        assert relative_error(out.cpu(), whole) <= 1e-12, (backend, device)
    ref = ops.mlp_hvp_flat_cached_ref(p["x"], ref_state, p["weights"], p["biases"], acts, V, w_off, b_off)
    assert relative_error(ref, whole) <= 1e-12


@pytest.mark.parametrize("backend, device", COMPILED)
@pytest.mark.parametrize("form", ["mlp_hvp", "mlp_hvp_flat", "mlp_hvp_flat_cached"])
def test_float32_products_of_confident_rows_keep_float32s_relative_accuracy(backend, device, form):
    """Rows whose top class has p_c between 1 - 2e-4 and 1 - 4e-6 (an unlearning method's retain rows, near an
    interpolating model), the target that class on some rows and another on the others: each row's float32 product
    within 1e-5 of float64, relative to the row's largest entry. The loss's R-rows p (r - sum_j p_j r_j) lost up to
    1.6e-2 of it where r_c - sum_j p_j r_j cancelled; every form now takes them relative to the top class."""
    n, classes, k = 41, 3, 2
    gen = torch.Generator().manual_seed(3)
    weight = torch.zeros(classes, n, dtype=torch.float64)
    weight[0], weight[2] = torch.linspace(9.0, 13.0, n, dtype=torch.float64), -0.5
    # row i's logits are (margin_i, 0, -0.5): each row's product is a column of the weight's, apart from the others'
    x, target = torch.eye(n, dtype=torch.float64), (torch.arange(n) % 4 == 3).long()  # every fourth row misfit
    V = torch.randn(classes * n, k, generator=gen, dtype=torch.float64)
    exact = ops.mlp_hvp_flat_ref(x, target, [weight], [None], ["identity"], V, [0], [-1])
    x32, w32, V32 = x.float().to(device), weight.float().to(device), V.float().to(device)
    t = target.to(device)
    if form == "mlp_hvp":
        products = ops.mlp_hvp(x32, t, [w32], [None], ["identity"], [V32.T.reshape(k, classes, n)], [None],
                               backend=backend)[0][0]
        got = products.reshape(k, -1).T
    elif form == "mlp_hvp_flat":
        got = ops.mlp_hvp_flat(x32, t, [w32], [None], ["identity"], V32, [0], [-1], backend=backend)
    else:
        state = ops.mlp_hvp_state(x32, t, [w32], [None], ["identity"], backend=backend)
        got = ops.mlp_hvp_flat_cached(x32, state, [w32], [None], ["identity"], V32, [0], [-1], backend=backend)
        # the same rows in ATen ops (the C++ CPU kernel's form for a strided state, the CUDA kernel's always)
        strided = [*state[:-2], *(kept.T.contiguous().T for kept in state[-2:])]
        assert not strided[-1].is_contiguous()
        aten = ops.mlp_hvp_flat_cached(x32, strided, [w32], [None], ["identity"], V32, [0], [-1], backend=backend)
        assert float((aten - got).norm() / got.norm()) <= 1e-6
    assert got.dtype == torch.float32
    rows = lambda m: m.reshape(classes, n, k).transpose(0, 1)  # noqa: E731 - (row, class, tangent)
    error = (rows(got.cpu().double()) - rows(exact)).abs().amax(1) / rows(exact).abs().amax(1)
    assert float(error.max()) <= 1e-5


@pytest.mark.parametrize("backend, device", COMPILED)
def test_cached_products_in_chunks_of_tangents(backend, device, rng):
    # N x width above the chunk size (2^18 elements): the tangents go through one at a time.
    p = _problem([5, 300, 3], ["tanh", "identity"], [True, True], 3, rng, n=1000)
    V = torch.randn(5 * 300 + 300 + 300 * 3 + 3, 3, dtype=torch.float64, generator=rng)
    layout = ([0, 1800], [1500, 2700])
    exact = ops.mlp_hvp_flat_ref(p["x"], p["target"], p["weights"], p["biases"], p["activations"], V, *layout)
    p = _cast(p, device=device)
    state = ops.mlp_hvp_state(p["x"], p["target"], p["weights"], p["biases"], p["activations"], backend=backend)
    out = ops.mlp_hvp_flat_cached(p["x"], state, p["weights"], p["biases"], p["activations"], V.to(device), *layout,
                                  backend=backend)
    assert out.shape == V.shape and out.T.is_contiguous() and relative_error(out.cpu(), exact) <= 1e-12


@pytest.mark.every_backend  # its cuda pairs run inside the body: benchmarks/gpu_check.sh selects it by this mark
@pytest.mark.parametrize("chosen", [("w0", "b0", "w1", "b1", "w2", "b2"), ("w2", "b1"), ("w1",)])
def test_cached_products_over_rows_in_several_blocks(chosen, rng):
    # the CPU pass takes rows in blocks of about 131,072 / (K x the widest layer output) rows, at least 64: with a
    # layer of 2,048 units 133 rows are three blocks (64, 64, 5), each block's products added to the first's (the
    # hidden layers' d^T Rh terms in their own sums); a NaN in the kept state of the last block is still refused
    p = _problem([5, 2048, 17, 4], ["tanh", "gelu", "identity"], True, 2, rng, n=133, smoothing=0.1)
    p["target"][[0, 63, 64, 127, 130]] = -100
    offsets, w_off, b_off = _flat_layout(p, ["w0", "b0", "w1", "b1", "w2", "b2"], chosen)
    V = _flat_tangents(p, offsets)
    model = dict(x=p["x"], target=p["target"], weights=p["weights"], biases=p["biases"], activations=p["activations"])
    exact = ops.mlp_hvp_flat_ref(**model, V=V, weight_offsets=w_off, bias_offsets=b_off, label_smoothing=0.1)
    for backend, device in PAIRS:
        on = _cast(model, device=device)
        state = ops.mlp_hvp_state(**on, label_smoothing=0.1, backend=backend)
        out = ops.mlp_hvp_flat_cached(on["x"], state, on["weights"], on["biases"], on["activations"], V.to(device),
                                      w_off, b_off, backend=backend)
        assert relative_error(out.cpu(), exact) <= 1e-12, (backend, device)
        bad = [t.clone() for t in state]
        bad[6][131, 7] = float("nan")  # act'(a_1) of a kept row of the last block
        with pytest.raises(ValueError, match="the R-derivative of the logits contains NaN or Inf"):
            ops.mlp_hvp_flat_cached(on["x"], bad, on["weights"], on["biases"], on["activations"], V.to(device),
                                    w_off, b_off, backend=backend)


@pytest.mark.parametrize("backend, device", COMPILED)
def test_cached_products_of_successive_calls_stay_apart(backend, device, rng):
    # the CPU pass keeps its blocks' scratch memory between calls (per thread): calls of other sizes and dtypes in
    # between, growing it, change neither a later call's products nor an earlier call's result
    def case(dims, n, dtype):
        p = _problem(dims, ["tanh"] * (len(dims) - 2) + ["identity"], True, 2, rng, n=n)
        names = [f"{kind}{layer}" for layer in range(len(dims) - 1) for kind in "wb"]
        offsets, w_off, b_off = _flat_layout(p, names, names)
        V = _flat_tangents(p, offsets)
        model = dict(x=p["x"], target=p["target"], weights=p["weights"], biases=p["biases"],
                     activations=p["activations"])
        exact = ops.mlp_hvp_flat_ref(**model, V=V, weight_offsets=w_off, bias_offsets=b_off)
        on = _cast(model, dtype=dtype, device=device)
        state = ops.mlp_hvp_state(**on, backend=backend)
        return lambda: ops.mlp_hvp_flat_cached(on["x"], state, on["weights"], on["biases"], on["activations"],
                                               V.to(dtype=dtype, device=device), w_off, b_off, backend=backend), exact

    calls = [case([5, 300, 3], 700, torch.float64), case([4, 40, 17, 6], 90, torch.float32),
             case([6, 1500, 20, 3], 200, torch.float64)]
    first = [call() for call, _ in calls]
    kept = [out.clone() for out in first]
    for (call, exact), out, copy_of_out in zip(calls * 2, first * 2, kept * 2):
        again = call()
        tol = 1e-12 if again.dtype == torch.float64 else 1e-5
        assert relative_error(again.double().cpu(), exact) <= tol
        torch.testing.assert_close(out, copy_of_out, rtol=0, atol=0)  # not overwritten by later calls


def test_state_and_cached_opcheck(rng):
    p = _problem([5, 4, 3], ["gelu", "relu"], [True, False], 2, rng)
    codes = [ACTIVATIONS[a] for a in p["activations"]]
    args = (p["x"], p["target"], p["weights"], p["biases"], codes, 0.1, -100, True)
    torch.library.opcheck(torch.ops.unlearn_kernels.mlp_hvp_state.default, args)
    state = torch.ops.unlearn_kernels.mlp_hvp_state(*args)
    V = torch.randn(32, 2, dtype=torch.float64)
    cached = (p["x"], state, p["weights"], p["biases"], codes, V, [0, 20], [-1, -1], True)
    torch.library.opcheck(torch.ops.unlearn_kernels.mlp_hvp_flat_cached.default, cached)


@pytest.mark.parametrize("backend, device", PAIRS)
def test_cached_form_bad_state_raises_clear_errors(backend, device, rng):
    p = _cast(_problem([5, 4, 3], ["tanh", "identity"], [True, False], 2, rng), device=device)
    state = ops.mlp_hvp_state(p["x"], p["target"], p["weights"], p["biases"], p["activations"], backend=backend)
    base = dict(x=p["x"], state=state, weights=p["weights"], biases=p["biases"], activations=p["activations"],
                V=torch.randn(36, 2, dtype=torch.float64, device=device), weight_offsets=[0, 24], bias_offsets=[20, -1])

    def call(exc, match, **changes):
        with pytest.raises(exc, match=match):
            ops.mlp_hvp_flat_cached(**{**base, **changes}, backend=backend)

    call(ValueError, "state must be the 9 tensors", state=state[:-1])
    call(ValueError, r"weight_offsets\[1\] = 23 where row 24 was expected", weight_offsets=[0, 23])
    call(TypeError, "V has dtype Float but x has Double", V=torch.randn(36, 2, device=device))
    call(ValueError, f"V is on meta but x on {device}", V=base["V"].to("meta"))
    call(ValueError, rf"state\[2\] is on meta but x on {device}", state=[*state[:2], state[2].to("meta"), *state[3:]])
    nan_v = base["V"].clone()
    nan_v[3, 0] = float("nan")
    call(ValueError, "NaN or Inf", V=nan_v)
    # a state of other data (fewer rows) or the wrong activation: the same message from every backend
    call(ValueError, r"state\[0\] has shape \[3, 4\] but \(9, 4\) was expected: pass the state that mlp_hvp_state",
         state=[state[0][:3], *state[1:]])
    call(ValueError, r"state\[4\] has shape \[9, 3\] but is empty for this layer's activation",
         state=[*state[:4], state[3][:, :3], *state[5:]])
    with pytest.raises(ValueError, match="every target is ignore_index"):
        ops.mlp_hvp_state(p["x"], torch.full((9,), -100, device=device), p["weights"], p["biases"], p["activations"],
                          backend=backend)
    with pytest.raises(ValueError, match=f"target is on meta but x on {device}"):
        ops.mlp_hvp_state(p["x"], p["target"].to("meta"), p["weights"], p["biases"], p["activations"], backend=backend)
    # argument types and options: checked before any backend, the same for all
    call(TypeError, "^mlp_hvp_flat_cached: x must be a torch.Tensor, got ndarray$", x=p["x"].cpu().numpy())
    call(TypeError, "^mlp_hvp_flat_cached: V must be a torch.Tensor, got list$", V=base["V"].tolist())
    call(TypeError, r"^mlp_hvp_flat_cached: state\[1\] must be a tensor, got NoneType$",
         state=[state[0], None, *state[2:]])
    call(TypeError, r"^mlp_hvp_flat_cached: state must be a list of tensors \(those mlp_hvp_state returned\), "
                    "got Tensor$", state=state[0])
    call(TypeError, r"^mlp_hvp_flat_cached: weight_offsets\[0\] must be an int, got float$", weight_offsets=[0.0, 24])
    call(TypeError, "^mlp_hvp_flat_cached: check_finite must be a bool, got int$", check_finite=0)
    model = (p["weights"], p["biases"], p["activations"])
    for exc, match, kwargs in [
        (TypeError, "^mlp_hvp_state: x must be a torch.Tensor, got ndarray$", {"x": p["x"].cpu().numpy()}),
        (TypeError, "^mlp_hvp_state: target must be a torch.Tensor, got ndarray$",
         {"target": p["target"].cpu().numpy()}),
        (TypeError, "^mlp_hvp_state: ignore_index must be an int, got float$", {"ignore_index": -100.0}),
        (TypeError, "^mlp_hvp_state: check_finite must be a bool, got str$", {"check_finite": "no"}),
        (ValueError, r"^mlp_hvp_state: label_smoothing must be a finite number in \[0, 1\], got -0.5$",
         {"label_smoothing": -0.5}),
    ]:
        with pytest.raises(exc, match=match):
            ops.mlp_hvp_state(**{"x": p["x"], "target": p["target"], **kwargs}, weights=model[0], biases=model[1],
                              activations=model[2], backend=backend)


def test_layer_and_state_checks_are_the_same_for_every_backend(device, rng):
    """The reference's checks of the flat, state and cached forms are the C++ checks, in their order:
    every backend names the same problem (the reference named another one, accepted a bias of the
    wrong shape, or failed with an IndexError)."""
    p = _cast(_problem([5, 4, 3], ["tanh", "identity"], True, 2, rng), device=device)
    x, w, b, acts = p["x"], p["weights"], p["biases"], p["activations"]
    state = ops.mlp_hvp_state(x, p["target"], w, b, acts, backend="reference")
    base = dict(x=x, state=state, weights=w, biases=b, activations=acts,
                V=torch.randn(39, 2, dtype=torch.float64, device=device), weight_offsets=[0, 24], bias_offsets=[20, 36])
    cases = {  # -> (exception, the first words of the message after "mlp_hvp_flat_cached: ", changes)
        "1-D x": (ValueError, "x must be 2-D", {"x": x[:, 0]}),
        "integer x": (TypeError, "x must be float32 or float64", {"x": x.long()}),
        "no layers": (ValueError, "at least one layer", {"weights": [], "biases": [], "activations": []}),
        "short activations": (ValueError, "weights, biases and activations", {"activations": acts[:1]}),
        "bias shape": (ValueError, "biases[0] must have shape", {"biases": [b[0][:3], b[1]]}),
        "state dtype, in the C++ order": (TypeError, "state[1] has dtype", {"state": [t.float() for t in state]}),
        "V dtype before the state": (TypeError, "V has dtype", {"state": state[:-1], "V": base["V"].float()}),
        "no parameter chosen, 1-D x": (ValueError, "x must be 2-D",
                                       {"x": x[:, 0], "V": base["V"][:0], "weight_offsets": [-1, -1],
                                        "bias_offsets": [-1, -1]}),
    }
    for case, (exc, start, changes) in cases.items():
        messages = set()
        for backend in [b for b, d in PAIRS if d == device.type]:
            with pytest.raises(exc) as info:
                ops.mlp_hvp_flat_cached(**{**base, **changes}, backend=backend)
            messages.add(str(info.value).split("\n")[0])
        assert len(messages) == 1 and messages.pop().split(": ", 1)[1].startswith(start), (case, messages)
    # two blocks at one offset: the same one is reported (Python sorted ties by size, C++ by layer)
    flat = {k: v for k, v in base.items() if k != "state"}
    for call in (lambda bk: ops.mlp_hvp_flat(**{**flat, "weight_offsets": [0, 0]}, target=p["target"], backend=bk),
                 lambda bk: ops.mlp_hvp_state(x, p["target"], w, b, acts[:1], backend=bk)):
        messages = set()
        for backend in [b for b, d in PAIRS if d == device.type]:
            with pytest.raises(ValueError) as info:
                call(backend)
            messages.add(str(info.value).split("\n")[0])
        assert len(messages) == 1, messages


@pytest.mark.parametrize("backend, device", PAIRS)
def test_expanded_weights_and_biases(backend, device, rng):
    """Weights and biases whose entries share memory (expanded) give the products of their copies (the
    reference failed in torch.func's make_dual)."""
    p = _cast(_problem([5, 4, 3], ["tanh", "identity"], True, 2, rng), device=device)
    expanded = {**p, "weights": [p["weights"][0][:1].expand(4, 5), p["weights"][1]],
                "biases": [p["biases"][0][:1].expand(4), p["biases"][1]]}
    copied = {**expanded, "weights": [t.contiguous() for t in expanded["weights"]],
              "biases": [t.contiguous() for t in expanded["biases"]]}
    for got, want in zip(ops.mlp_hvp(**expanded, backend=backend), ops.mlp_hvp(**copied, backend=backend)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend, device", PAIRS)
def test_no_chosen_parameter_gives_an_empty_product(backend, device, rng):
    # V with no rows (every offset -1): the compiled cached pass raised "Expected a proper Tensor but got None".
    p = _cast(_problem([5, 4, 3], ["tanh", "identity"], [True, False], 2, rng), device=device)
    model = dict(x=p["x"], weights=p["weights"], biases=p["biases"], activations=p["activations"])
    state = ops.mlp_hvp_state(**model, target=p["target"], backend=backend)
    V = torch.empty(0, 2, dtype=torch.float64, device=device)
    flat = ops.mlp_hvp_flat(**model, target=p["target"], V=V, weight_offsets=[-1, -1], bias_offsets=[-1, -1],
                            backend=backend)
    cached = ops.mlp_hvp_flat_cached(**model, state=state, V=V, weight_offsets=[-1, -1], bias_offsets=[-1, -1],
                                     backend=backend)
    assert flat.shape == cached.shape == (0, 2)


@pytest.mark.parametrize("backend, device", PAIRS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_ignored_row_raises(backend, device, bad, rng):
    # An ignored row adds nothing to the loss, but a NaN or Inf in it reaches every product through the
    # backward's 0 * Inf: the compiled kernels checked the kept rows only and returned NaN products.
    p = _cast(_problem([5, 4, 3], ["tanh", "relu"], True, 2, rng), device=device)
    p["target"][3] = -100
    p["x"][3, 1] = bad
    with pytest.raises(ValueError, match="NaN or"):
        ops.mlp_hvp(**p, backend=backend)
    if bad != bad:  # NaN reaches the logits; tanh takes an Inf to +-1, and the state holds no x
        with pytest.raises(ValueError, match="NaN or"):
            ops.mlp_hvp_state(p["x"], p["target"], p["weights"], p["biases"], p["activations"], backend=backend)


NON_FINITE_PLACES = ["x", "x, ignored row"] + [f"{name}[{l}]" for name in ("weights", "biases", "v_weights", "v_biases")
                                               for l in range(2)]


def _outcomes(p, backend):
    """Each op's products (state) on problem p, or the first line of its refusal."""
    model = dict(x=p["x"], weights=p["weights"], biases=p["biases"], activations=p["activations"])
    V = _flat(p["v_weights"], p["v_biases"]).T  # [5, 4, 3]: W0, W1, b0, b1
    layout = dict(V=V, weight_offsets=[0, 20], bias_offsets=[32, 36])
    calls = {
        "mlp_hvp": lambda: _flat(*ops.mlp_hvp(**model, target=p["target"], v_weights=p["v_weights"],
                                              v_biases=p["v_biases"], backend=backend)),
        "mlp_hvp_flat": lambda: ops.mlp_hvp_flat(**model, target=p["target"], **layout, backend=backend),
        "mlp_hvp_state": lambda: ops.mlp_hvp_state(**model, target=p["target"], backend=backend),
        "mlp_hvp_flat_cached": lambda: ops.mlp_hvp_flat_cached(
            **model, state=ops.mlp_hvp_state(**model, target=p["target"], backend=backend), **layout, backend=backend),
    }
    outcomes = {}
    for op, call in calls.items():
        try:
            outcomes[op] = call()
        except ValueError as e:
            outcomes[op] = str(e).split("\n")[0]
    return outcomes


@pytest.mark.parametrize("act", ["relu", "tanh", "sigmoid"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("place", NON_FINITE_PLACES)
def test_non_finite_values_give_the_same_outcome_on_every_backend(place, value, act, device, rng):
    """check_finite refuses what makes the logits or their R-derivatives non-finite, with the same
    message from every backend: the reference checked its inputs instead (other messages, and an Inf
    that tanh saturates or an -Inf bias under ReLU refused there but not by the kernels)."""
    # tanh and sigmoid saturate an infinite first-layer weight: the R-logits' limit is finite (act' = 0 there),
    # which the kernels compute, while the torch.func reference's forward AD multiplies x's zero tangent by the
    # infinite weight (0 * Inf = NaN) and refuses (as mlp_hvp's docstring says); checked as such below, the
    # kernels among themselves
    saturated = place == "weights[0]" and act in ("tanh", "sigmoid") and abs(value) == float("inf")
    p = _cast(_problem([5, 4, 3], [act, "identity"], True, 2, rng), device=device)
    p["target"][5] = -100
    if place.startswith("x"):
        p["x"][5 if "ignored" in place else 2, 1] = value
    else:
        name, l = place[:-3], int(place[-2])
        p[name][l].view(-1)[-2] = value
    outcomes = {backend: _outcomes(p, backend) for backend, d in PAIRS if d == device.type}
    if saturated:
        reference = outcomes.pop("reference")
        assert any("R-derivative of the logits contains NaN" in v for v in reference.values() if isinstance(v, str))
        computed = [t for kernel in outcomes.values() for v in kernel.values()
                    for t in (v if isinstance(v, list) else [v])]
        assert all(isinstance(t, torch.Tensor) and bool(torch.isfinite(t).all()) for t in computed), outcomes
    first, *others = outcomes.values()
    for other in others:
        for op, want in first.items():
            if isinstance(want, str) or isinstance(other[op], str):
                assert other[op] == want, (op, outcomes)
            else:
                torch.testing.assert_close(other[op], want, rtol=1e-10, atol=1e-12, msg=lambda m: f"{op}: {m}")


@pytest.mark.parametrize("backend, device", PAIRS)
def test_an_infinite_weight_that_tanh_saturates_is_named_in_the_r_logits_refusal(backend, device, rng):
    """An Inf in a middle layer's weight under tanh leaves the logits finite and makes their R-derivative
    NaN (tanh' = 0 times an infinite Ra): the refusal said "check v_weights and v_biases" only."""
    p = _cast(_problem([5, 4, 3, 3], ["tanh", "tanh", "identity"], True, 2, rng), device=torch.device(device))
    p["weights"][1].view(-1)[-2] = float("inf")
    with pytest.raises(ValueError, match=r"R-derivative of the logits contains NaN or Inf \(check v_weights and "
                                         r"v_biases, then x and the weights: an Inf weight under a saturating"):
        ops.mlp_hvp(**p, backend=backend)


def test_fused_operator_cache_equals_the_whole_pass_and_follows_the_weights():
    model = _model()
    x, y = _data(n=15)
    batches = [(x[:6], y[:6]), (x[6:12], y[6:12]), (x[12:], y[12:])]
    loss = nn.CrossEntropyLoss(label_smoothing=0.1)
    params = ["7.weight", "1.bias", "3.0.weight"]
    cached = FusedMLPHessian(model, loss, batches, params)
    streamed = FusedMLPHessian(model, loss, batches, params, cache_bytes=0)
    V = torch.randn(cached.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    expected = streamed.matmat(V)
    for _ in range(2):  # builds the cache, then reads it
        assert relative_error(cached.matmat(V), expected) <= 1e-12
    assert cached.cached_batches == 3 and streamed.cached_batches == 0
    per_batch = cached.cached_bytes / 3
    partial = FusedMLPHessian(model, loss, batches, params, cache_bytes=int(2.5 * per_batch))
    assert relative_error(partial.matmat(V), expected) <= 1e-12 and partial.cached_batches == 2
    assert relative_error(partial.matmat(V), expected) <= 1e-12
    # An optimizer step moves the weights: the cache is rebuilt from them.
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    fresh = FusedMLPHessian(model, loss, batches, params, cache_bytes=0).matmat(V)
    assert relative_error(fresh, expected) > 1e-3
    assert relative_error(cached.matmat(V), fresh) <= 1e-12
    model[1].weight.data = model[1].weight.detach() * 0.5  # data replaced: the operator follows it
    assert relative_error(cached.matmat(V), FusedMLPHessian(model, loss, batches, params).matmat(V)) <= 1e-12


# ----------------------------------------------------------------------------- the curvature operator
def _model(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(12, 7), nn.GELU(), nn.Sequential(nn.Linear(7, 6, bias=False), nn.Tanh()),
        nn.Dropout(0.3), nn.Linear(6, 4), nn.Sigmoid(), nn.Linear(4, 3),
    ).to(dtype).eval()


def _data(n=13, dtype=torch.float64):
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 3, 4, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("params", [None, ["7.weight", "1.bias", "3.0.weight"]])
def test_fused_operator_matches_generic_hessian(params, device):
    model = _model().to(device)
    x, y = _data()
    y[7] = -100  # an ignored row
    x, y = x.to(device), y.to(device)
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]  # uneven batches: the operator is the mean over all rows
    loss = nn.CrossEntropyLoss(label_smoothing=0.1)
    fused = FusedMLPHessian(model, loss, batches, params)
    generic = GenericHessian(model, loss, batches, params)
    assert fused.shape == generic.shape and fused.path == "fused"
    V = torch.randn(fused.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(device)
    assert relative_error(fused.matmat(V), generic.matmat(V)) <= 1e-10
    assert relative_error(fused.matvec(V[:, 0]), generic.matvec(V[:, 0])) <= 1e-10
    assert relative_error(fused.gradient(), generic.gradient()) <= 1e-12  # from the kept state
    assert (fused.num_products, fused.num_gradients, fused.num_data_passes) == (4, 3, 3)  # no product probe
    assert relative_error(FusedMLPHessian(model, loss, batches, params, cache_bytes=0).gradient(), generic.gradient()) <= 1e-12
    before = [t.clone() for t in model.parameters()]
    fused.matmat(V)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_hessian_operator_auto_takes_the_fused_path():
    model = _model()
    x, y = _data()
    op = hessian_operator(model, F.cross_entropy, (x, y))
    assert op.path == "fused"
    dense = op.to_dense()
    torch.testing.assert_close(dense, dense.T, rtol=0, atol=1e-14)


def test_fused_operator_float32_against_float64(device):
    x, y = _data(n=64)
    exact_op = GenericHessian(_model(), nn.CrossEntropyLoss(), (x, y))  # float64 torch.func, not the fused kernels
    V = torch.randn(exact_op.shape[0], 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    exact = exact_op.matmat(V)
    m32 = _model(torch.float32).to(device)
    data32 = (x.float().to(device), y.to(device))
    fused = FusedMLPHessian(m32, nn.CrossEntropyLoss(), data32).matmat(V.float().to(device)).cpu()
    plain = GenericHessian(m32, nn.CrossEntropyLoss(), data32).matmat(V.float().to(device)).cpu()
    assert_within_rule(fused, plain, exact, ulps=1.0)


@pytest.mark.parametrize(
    "model, loss, reason",
    [
        (nn.Sequential(nn.Linear(4, 4), nn.Unflatten(1, (1, 2, 2)), nn.Conv2d(1, 1, 2), nn.Flatten()),
         nn.CrossEntropyLoss(), "layer '1' is Unflatten"),
        (nn.Sequential(nn.Flatten(), nn.Conv2d(1, 1, 2)), nn.CrossEntropyLoss(), "layer '1' is Conv2d"),
        (nn.Sequential(nn.Linear(4, 3)), nn.MSELoss(), "loss is MSELoss"),
        (nn.Sequential(nn.Linear(4, 3)), nn.CrossEntropyLoss(reduction="sum"), "reduction='sum'"),
        (nn.Sequential(nn.Linear(4, 3)), nn.CrossEntropyLoss(weight=torch.ones(3)), "class weights"),
        (nn.Sequential(nn.Linear(4, 3), nn.GELU(approximate="tanh")), nn.CrossEntropyLoss(), "approximate='tanh'"),
        (nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Tanh()), nn.CrossEntropyLoss(), "second activation"),
        (nn.Sequential(nn.ReLU(), nn.Linear(4, 3)), nn.CrossEntropyLoss(), "before the first Linear"),
        (nn.Sequential(nn.Linear(4, 3), nn.Flatten()), nn.CrossEntropyLoss(), "is a Flatten after a Linear"),
        (nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)), nn.CrossEntropyLoss(), "Dropout in training mode"),
        (nn.Sequential(nn.Linear(4, 3).half()), nn.CrossEntropyLoss(), "float16"),
        (nn.Sequential(nn.Flatten()), nn.CrossEntropyLoss(), "no Linear"),
        (nn.Linear(4, 3), nn.CrossEntropyLoss(), "not an nn.Sequential"),
    ],
)
def test_supports_names_the_reason(model, loss, reason):
    why = supports(model, loss)
    assert why is not None and reason in why, why
    with pytest.raises(ValueError, match="cannot be used"):
        FusedMLPHessian(model, loss, (torch.randn(2, 4), torch.zeros(2, dtype=torch.long)))


def test_a_backend_that_cannot_run_is_refused_at_construction():
    """An unknown backend, or one that cannot run here, was accepted and failed at the first product."""
    model, data = nn.Sequential(nn.Linear(4, 3)), (torch.randn(5, 4), torch.arange(5) % 3)
    with pytest.raises(ValueError, match=r"^FusedMLPHessian: mlp_hvp: unknown backend 'bogus'"):
        FusedMLPHessian(model, nn.CrossEntropyLoss(), data, backend="bogus")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match=r"^FusedMLPHessian: mlp_hvp: backend 'cuda' cannot run"):
            FusedMLPHessian(model, nn.CrossEntropyLoss(), data, backend="cuda")
    assert FusedMLPHessian(model, nn.CrossEntropyLoss(), data, backend="reference").backend == "reference"


def test_the_reference_backend_needs_no_compiled_kernel(monkeypatch):
    """Without the extension (its status stood in for here) ``backend="reference"``, which runs, was refused
    at construction ("the cpp mlp_hvp kernel cannot run"): only "auto" needs a compiled kernel (without one
    ``hessian_operator`` takes the generic path, faster than the fused reference)."""
    import unlearn_kernels.curvature.fused_mlp as fused_mlp

    missing = BackendStatus(False, "extension not loaded: test")
    monkeypatch.setattr(fused_mlp, "status", lambda op, backend: missing)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    data = (torch.randn(6, 4, dtype=torch.float64), torch.arange(6) % 3)
    assert "the cpp mlp_hvp kernel cannot run: extension not loaded: test" in supports(model, nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="cannot be used: the cpp mlp_hvp kernel cannot run"):
        FusedMLPHessian(model, nn.CrossEntropyLoss(), data)
    fused = FusedMLPHessian(model, nn.CrossEntropyLoss(), data, backend="reference")
    v = torch.randn(fused.shape[0], dtype=torch.float64)
    assert relative_error(fused.matvec(v), GenericHessian(model, nn.CrossEntropyLoss(), data).matvec(v)) <= 1e-12


def test_supports_tied_weights_and_inputs_it_cannot_take():
    shared = nn.Linear(4, 4)
    assert "tied" in supports(nn.Sequential(shared, nn.Tanh(), shared), nn.CrossEntropyLoss())
    model = nn.Sequential(nn.Linear(4, 3)).double()
    assert supports(model, nn.CrossEntropyLoss()) is None
    with pytest.raises(ValueError, match=r"not \(N, features\)"):
        # (N, 5, 4) inputs: a Linear over the last dim, logits (N, 5, 3) with (N, 3) targets; generic only.
        FusedMLPHessian(model, nn.CrossEntropyLoss(), (torch.randn(2, 5, 4, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.long)))


def test_sequential_subclasses_take_the_fused_path_only_with_sequentials_forward():
    from unlearn_kernels.curvature.fused_mlp import supports
    from unlearn_kernels.models import MLP

    assert supports(MLP(6, hidden=(5,), num_classes=3), F.cross_entropy) is None

    class Scaled(nn.Sequential):
        def forward(self, x):
            return 2 * super().forward(x)

    reason = supports(Scaled(nn.Linear(6, 3)), F.cross_entropy)
    assert reason is not None and "Scaled" in reason


@pytest.mark.parametrize("backend, device", PAIRS)
def test_results_never_require_grad(backend, device, rng):
    """The op is not differentiable: with inputs that require grad the compiled ops' results claimed
    requires_grad and a backward gave None gradients (torch only warned), the reference's a gradient."""
    p = _cast(_problem([5, 4, 3], ["tanh", "identity"], True, 2, rng), device=device)
    for key in ("x", "weights", "biases", "v_weights", "v_biases"):
        p[key] = ([t.requires_grad_() for t in p[key]] if isinstance(p[key], list) else p[key].requires_grad_())
    hv_w, hv_b = ops.mlp_hvp(**p, backend=backend)
    d = sum(w.numel() for w in p["weights"]) + sum(b.numel() for b in p["biases"])
    V = torch.randn(d, 2, dtype=torch.float64, generator=rng).to(device).requires_grad_()
    common = dict(x=p["x"], target=p["target"], weights=p["weights"], biases=p["biases"], activations=p["activations"])
    flat = ops.mlp_hvp_flat(**common, V=V, weight_offsets=[0, 24], bias_offsets=[20, 36], backend=backend)
    state = ops.mlp_hvp_state(**common, backend=backend)
    cached = ops.mlp_hvp_flat_cached(p["x"], state, p["weights"], p["biases"], p["activations"], V, [0, 24], [20, 36],
                                     backend=backend)
    results = [*hv_w, *hv_b, flat, cached, *(t for t in state if isinstance(t, torch.Tensor))]
    assert not any(t.requires_grad for t in results)


def test_many_classes_and_confident_rows_keep_the_small_probabilities(device):
    """The CPU kernel summed a softmax row in float32: for a confident row exp(z - max) ~ 2e-9 is below half an
    ulp of the running sum once the top class is in it, so every later class was dropped and p_y - 1 came out
    0 (the fused gradient's bias entry of class 0 had the wrong sign with 100,000 classes). The CUDA kernel's
    lanes did the same, each lane's sum (the top class's lane drops 1/32 of the mass: 3% off, an emulation
    of its float32 sums in that order). Summed in double, the gradient is within a tenth of PyTorch's own
    float32 error (6.3e-2 here; ours 6.6e-4 on the CPU) and the uncached and cached products within twice it."""
    classes, n = 20_000, 32
    y = torch.arange(n) % 10
    model = nn.Sequential(nn.Linear(10, classes))
    with torch.no_grad():  # logits 20 at the target, 0 elsewhere
        model[0].weight.zero_()
        model[0].bias.zero_()
        model[0].weight[:10, :10] = torch.eye(10)
    x = 20.0 * F.one_hot(y, 10).float()
    exact = hessian_operator(model.double(), F.cross_entropy, (x.double(), y), path="generic")
    v = torch.randn(exact.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    g64, hv64 = exact.gradient(), exact.matvec(v)
    model.float()
    torch32 = hessian_operator(model, F.cross_entropy, (x, y), path="generic")  # plain autograd in float32
    g_err, hv_err = relative_error(torch32.gradient().double(), g64), relative_error(torch32.matvec(v.float()), hv64)
    model, x, y, v = model.to(device), x.to(device), y.to(device), v.to(device)
    for cache_bytes in (None, 0):
        fused = hessian_operator(model, F.cross_entropy, (x, y), path="fused", cache_bytes=cache_bytes)
        assert relative_error(fused.gradient().cpu(), g64) <= g_err / 10
        assert relative_error(fused.matvec(v.float()).cpu(), hv64) <= 2 * hv_err

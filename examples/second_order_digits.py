"""Hessian-vector products, top eigenvalues and a cubic-regularised Newton step for a PyTorch model
trained on the scikit-learn digits (real data bundled with scikit-learn; runs in seconds on a CPU).

    python examples/second_order_digits.py
"""
import torch
import torch.nn.functional as F

from unlearn_kernels.curvature import get_flat_parameters, hessian_operator
from unlearn_kernels.data import load_dataset
from unlearn_kernels.models import build_model
from unlearn_kernels.solvers import cubic_newton_step, lanczos
from unlearn_kernels.training import TrainConfig, init_model, train

digits = load_dataset("digits")
model = init_model(lambda: build_model("mlp", digits.input_shape, digits.num_classes, hidden=(128,)), seed=0)
train(model, digits.train, TrainConfig(epochs=20))

# The Hessian of the mean cross-entropy over the training set, as a linear operator. For this
# Linear/ReLU chain the fused C++ kernel is chosen automatically; any nn.Module works (generic path).
H = hessian_operator(model, F.cross_entropy, digits.train)
print(f"Hessian operator: d = {H.shape[0]}, path = {H.path}")

v = torch.randn(H.shape[0])
Hv = H.matvec(v)                                  # one Hessian-vector product
HV = H.matmat(torch.randn(H.shape[0], 8))          # 8 products in one pass over the data
print(f"|Hv| = {Hv.norm():.4f}, HV: {tuple(HV.shape)}, products so far: {H.num_products}")

top = lanczos(H, k=40, num_eigs=5, which="BE")     # both ends of the spectrum
print("extreme Ritz values:", [f"{x:.4g}" for x in top.eigenvalues.tolist()], f"({top.num_hvps} HVPs; residual bounds "
      f"up to {top.residual_bounds.max():.1e}, converged to tol: {top.converged})")

# One cubic-regularised Newton step on the loss: min_s g^T s + 1/2 s^T H s + M/6 |s|^3.
g = H.gradient()
step = cubic_newton_step(H, g, M=1.0, method="krylov")
print(f"cubic Newton step: |s| = {step.step_norm:.4f}, model value {step.model_value:.3e}, "
      f"sigma = {step.sigma:.4f}, {step.num_hvps} HVPs, residual {step.residual:.1e}")
w = get_flat_parameters(model)
print(f"|w| = {w.norm():.3f}; apply with unlearn_kernels.curvature.set_flat_parameters(model, w + step.step)")

"""Public kernel ops. Each takes ``backend="auto"|"cpp"|"cuda"|"triton"|"reference"``; each has a
pure-PyTorch reference ``<op>_ref`` beside it. ``unlearn_kernels.backends()`` says what runs here."""
from ..backends import register_ops
from .cubic_secular import SolutionOverflow, cubic_secular_solve, cubic_secular_solve_ref
from .gelu_double_backward import gelu_double_backward, gelu_double_backward_ref
from .gemm import gemm, gemm_ref
from .lanczos_step import lanczos_step, lanczos_step_ref
from .layer_norm_double_backward import layer_norm_double_backward, layer_norm_double_backward_ref
from .lora_linear import lora_linear, lora_linear_jvp, lora_linear_jvp_ref, lora_linear_ref
from .mlp_hvp import (
    mlp_hvp,
    mlp_hvp_flat,
    mlp_hvp_flat_cached,
    mlp_hvp_flat_cached_ref,
    mlp_hvp_flat_ref,
    mlp_hvp_ref,
    mlp_hvp_state,
    mlp_hvp_state_ref,
    mlp_value_grad_flat,
    mlp_value_grad_flat_ref,
)
from .softmax_ce import softmax_ce_grad, softmax_ce_grad_ref, softmax_ce_hvp, softmax_ce_hvp_ref
from .softmax_double_backward import softmax_double_backward, softmax_double_backward_ref
from .weights_fingerprint import weights_fingerprint, weights_fingerprint_ref

# Every op (also its dispatcher name) and the backends it is implemented in; what can run here is
# decided by unlearn_kernels.backends.
OP_BACKENDS: dict[str, tuple[str, ...]] = {
    "softmax_ce_grad": ("cpp", "cuda", "triton", "reference"),
    "softmax_ce_hvp": ("cpp", "cuda", "triton", "reference"),
    "lanczos_step": ("cpp", "cuda", "triton", "reference"),
    "cubic_secular_solve": ("cpp", "reference"),
    "gemm": ("cpp", "reference"),
    "softmax_double_backward": ("cpp", "reference"),
    "layer_norm_double_backward": ("cpp", "reference"),
    "gelu_double_backward": ("cpp", "reference"),
    "mlp_hvp": ("cpp", "cuda", "reference"),
    "mlp_hvp_flat": ("cpp", "cuda", "reference"),
    "mlp_hvp_state": ("cpp", "cuda", "reference"),
    "mlp_hvp_flat_cached": ("cpp", "cuda", "reference"),
    "mlp_value_grad_flat": ("cpp", "cuda", "reference"),
    "lora_linear": ("cpp", "cuda", "triton", "reference"),
    "lora_linear_jvp": ("cpp", "cuda", "triton", "reference"),
    "weights_fingerprint": ("cpp", "cuda", "reference"),
}
register_ops(OP_BACKENDS)

__all__ = [
    "OP_BACKENDS",
    "SolutionOverflow",
    "cubic_secular_solve",
    "cubic_secular_solve_ref",
    "gelu_double_backward",
    "gelu_double_backward_ref",
    "gemm",
    "gemm_ref",
    "lanczos_step",
    "lanczos_step_ref",
    "layer_norm_double_backward",
    "layer_norm_double_backward_ref",
    "lora_linear",
    "lora_linear_jvp",
    "lora_linear_jvp_ref",
    "lora_linear_ref",
    "mlp_hvp",
    "mlp_hvp_flat",
    "mlp_hvp_flat_cached",
    "mlp_hvp_flat_cached_ref",
    "mlp_hvp_flat_ref",
    "mlp_hvp_ref",
    "mlp_hvp_state",
    "mlp_hvp_state_ref",
    "mlp_value_grad_flat",
    "mlp_value_grad_flat_ref",
    "softmax_ce_grad",
    "softmax_ce_grad_ref",
    "softmax_ce_hvp",
    "softmax_ce_hvp_ref",
    "softmax_double_backward",
    "softmax_double_backward_ref",
    "weights_fingerprint",
    "weights_fingerprint_ref",
]

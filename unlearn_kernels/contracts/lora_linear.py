"""The contract of the ``lora_linear`` ops shared by their namespaces (C++/CUDA and Triton): the fake
(meta) implementations, which give the output shapes without computing."""
from __future__ import annotations


def fake_forward(x, weight, bias, lora_a, lora_b, scale):
    """y: (N, out) like x."""
    return x.new_empty(x.shape[0], weight.shape[0])


def fake_backward(grad_out, x, weight, lora_a, lora_b, scale, output_mask):
    """(grad_x, grad_a, grad_b), each None where ``output_mask`` does not ask for it."""
    need_x, need_a, need_b = output_mask
    return tuple(t.new_empty(t.shape) if need else None for t, need in ((x, need_x), (lora_a, need_a), (lora_b, need_b)))


def fake_jvp(x, weight, bias, lora_a, lora_b, scale, tangent_a, tangent_b):
    """(y, its tangent): both (N, out) like x."""
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], weight.shape[0])

"""Custom autograd Functions for the curvature tests: a loss or layer whose derivatives the operators must check
(no forward-mode derivative, a backward that is not differentiable)."""
import torch


class Square(torch.autograd.Function):
    """x^2, its input saved for the backward and a jvp; subclasses give the backward (and the jvp)."""

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])


def square_function(differentiable_backward: bool) -> type[torch.autograd.Function]:
    """x^2 with a backward but no forward-mode derivative (jvp); the backward marked @once_differentiable
    unless ``differentiable_backward``."""

    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad

    once = torch.autograd.function.once_differentiable
    return type("SquareWithoutJvp", (Square,),
                {"backward": staticmethod(backward if differentiable_backward else once(backward))})

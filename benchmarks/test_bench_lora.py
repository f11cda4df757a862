"""pytest-benchmark view of the LoRA suite: ``pytest benchmarks/test_bench_lora.py``. Each candidate's
forward+backward (gradients of x, A and B; of x alone for the frozen layer) is checked against
float64 before it is timed; the candidates of one rank are one group, side by side (pytest-benchmark's
default ``--benchmark-group-by=group``)."""
import pytest
import torch

from .common import check_plain, kernel_backends, plain_error_tolerance, synchronized
from .lora import FLOOR, candidates, exact_outputs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CANDIDATES = [f"ours:{b}" for b in kernel_backends(DEVICE)] + ["peft", "eager", FLOOR]


@pytest.fixture(scope="module", params=[16, 64], ids=lambda r: f"r{r}")
def layer(request):
    gen = torch.Generator().manual_seed(0)
    tokens, n_in, n_out, rank = 4096, 1024, 1024, request.param

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(DEVICE)

    x, grad_out = rand(tokens, n_in), rand(tokens, n_out)
    weight, bias = rand(n_out, n_in, std=n_in**-0.5), rand(n_out)
    lora_a, lora_b = rand(rank, n_in, std=n_in**-0.5), rand(n_out, rank, std=rank**-0.5)
    cands = candidates(DEVICE, x, weight, bias, lora_a, lora_b, 2.0, 2 * rank, grad_out, with_compile=False)
    return rank, cands, exact_outputs(x, weight, bias, lora_a, lora_b, 2.0, grad_out)


@pytest.mark.parametrize("candidate", CANDIDATES)
def test_lora_forward_backward(benchmark, layer, candidate):
    if candidate == "peft":
        pytest.importorskip("peft")  # the baseline is optional (the test extra installs it)
    rank, cands, exact = layer
    kind = "frozen" if candidate == FLOOR else "lora"
    plain = cands["eager" if kind == "lora" else FLOOR][1]()
    ref = exact[kind][1]
    out = cands[candidate][1]()
    floor = 16 * torch.finfo(out.dtype).eps * max(ref.abs().max().item(), 1.0)
    check_plain(plain, ref)  # the eager and frozen candidates are the plain computations: gated by themselves
    assert (out.double() - ref).abs().max().item() <= plain_error_tolerance(plain, ref, floor)
    benchmark.group = f"forward+backward r{rank}"
    fn = cands[candidate][1]
    benchmark(synchronized(fn, DEVICE))

"""Data-parallel curvature: each process holds a shard of the digits training set, and the Hessian
over all of it is one operator, the same on every process (one all_reduce per product).

    torchrun --standalone --nproc-per-node 2 examples/distributed_curvature.py
    python examples/distributed_curvature.py          # one process, the same numbers

gloo on CPU, NCCL on GPUs (one GPU per process). Every process computes the same eigenvalues and
the same cubic-regularised Newton step; the script checks both across processes.
"""
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from unlearn_kernels.curvature import hessian_operator
from unlearn_kernels.curvature.distributed import all_gather_objects
from unlearn_kernels.data import load_dataset
from unlearn_kernels.models import build_model
from unlearn_kernels.solvers import cubic_newton_step, lanczos
from unlearn_kernels.training import TrainConfig, init_model, train

torch.set_num_threads(1)
if torch.cuda.is_available():
    device, backend = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))), "nccl"
    torch.cuda.set_device(device)
else:
    device, backend = torch.device("cpu"), "gloo"
if "RANK" in os.environ:  # torchrun's rendezvous
    dist.init_process_group(backend)
else:  # run directly: a group of one process, whose in-process store needs no port (a fixed one may be taken)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
rank, world = dist.get_rank(), dist.get_world_size()

digits = load_dataset("digits")
model = init_model(lambda: build_model("mlp", digits.input_shape, digits.num_classes, hidden=(128,)), seed=0)
train(model, digits.train, TrainConfig(epochs=20))
model.to(device).eval()
for p in model.parameters():  # every process must hold the same weights: take rank 0's
    dist.broadcast(p.data, src=0)

# This process's shard: every world-th row of the training set.
x, y = digits.train.x[rank::world].to(device), digits.train.y[rank::world].to(device)
H = hessian_operator(model, F.cross_entropy, (x, y), process_group=dist.group.WORLD)
if rank == 0:
    print(f"{world} process(es), rows per process {H.shards.shard_sizes}, d = {H.shape[0]}, "
          f"local path = {H.local.path}")

top = lanczos(H, k=40, num_eigs=5, which="BE", seed=0)
g = H.gradient()
step = cubic_newton_step(H, g, M=1.0, method="krylov", seed=0)

# The same result on every process: compare everyone's checksums with rank 0's. The package's gather waits
# until gloo's worker thread has let go of its tensors (see all_reduce_released): torch.distributed's own
# collectives, as a script's last call, now and then abort the process at exit.
checks = (top.eigenvalues.double().sum().item(), step.step.double().sum().item())
gathered = all_gather_objects(checks, dist.group.WORLD, device)
same = all(c == gathered[0] for c in gathered)
if rank == 0:
    print("extreme Ritz values:", [f"{v:.4g}" for v in top.eigenvalues.tolist()], f"({top.num_hvps} HVPs; residual "
          f"bounds up to {top.residual_bounds.max():.1e}, converged to tol: {top.converged})")
    print(f"cubic Newton step: |s| = {step.step_norm:.4f}, model value {step.model_value:.3e}, {step.num_hvps} HVPs")
    print(f"the same eigenvalues and step on every process: {same}")
dist.destroy_process_group()
if not same:
    raise SystemExit("the processes disagree")

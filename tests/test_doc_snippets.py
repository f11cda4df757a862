"""The Python snippets of README.md and docs/guide.md run as printed.

Each ```python block is executed in a namespace that holds the names the prose gives it (a trained
digits MLP ``model``, its ``data``, ``forget``/``retain``/``validation`` sets, tangents ``v`` and
``V``), so an API change that the docs did not follow fails here. The data-parallel block needs a
process group per process; examples/distributed_curvature.py runs it (tests/test_examples.py).
"""
import re
from pathlib import Path

import pytest
import torch

from unlearn_kernels.data import load_dataset
from unlearn_kernels.models import build_model
from unlearn_kernels.training import TrainConfig, init_model, train

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks() -> list:
    params = []
    for name in ("README.md", "docs/guide.md"):
        for i, code in enumerate(BLOCK.findall((ROOT / name).read_text())):
            marks = [pytest.mark.skip(reason="needs one process group per process: examples/distributed_curvature.py")
                     ] if "init_process_group" in code else []
            params.append(pytest.param(code, id=f"{name}:{i}", marks=marks))
    return params


@pytest.fixture(scope="module")
def namespace() -> dict:
    digits = load_dataset("digits", seed=0)
    model = init_model(lambda: build_model("mlp", digits.input_shape, digits.num_classes), 0)
    train(model, digits.train, TrainConfig(epochs=3, seed=0))
    forget, retain = digits.train.subset(torch.arange(0, 60)), digits.train.subset(torch.arange(60, len(digits.train)))
    d = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    return {"model": model, "data": digits.train, "forget": forget, "retain": retain, "validation": digits.val,
            "v": torch.randn(d, generator=gen), "V": torch.randn(d, 3, generator=gen)}


def test_the_docs_have_snippets():
    assert len(_blocks()) >= 6


@pytest.mark.parametrize("code", _blocks())
def test_snippet_runs(code, namespace):
    if "from unlearn_kernels.methods import METHODS" not in code and "METHODS[" in code:
        code = "from unlearn_kernels.methods import METHODS\n" + code  # a continuation of the guide's first block
    exec(compile(code, "<snippet>", "exec"), dict(namespace))

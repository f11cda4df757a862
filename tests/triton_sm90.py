"""Compiles the Triton kernels of the ops named on the command line for an H100/H200 (sm_90),
without a GPU: Triton ships ptxas. Run by tests/test_triton_compile.py in a fresh process, because
the kernels must be defined compiled, not interpreted. Each kernel is compiled with the launch
configuration its module uses on a GPU, for every input dtype the op accepts; one JSON line per
compiled variant: op, variant, ok, shared (bytes of shared memory), int64_ids (every program id is
widened to int64 before any arithmetic: a tile index times the tile's size wraps in int32 from 2**31
rows on), error. Run without TRITON_INTERPRET, so that the kernels are defined compiled."""
import json
import re
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}
LAUNCH_OPTIONS = ("num_warps", "num_stages")


def _softmax_ce():
    from unlearn_kernels.triton_kernels import softmax_ce as m

    common = {"flag_ptr": "*i32", "N": "i32", "C": "i32", "z_stride": "i32"}
    for ty in DTYPES:
        # two classes (the smallest block), one row per block, several rows per program, several blocks per row
        for n_cols in (2, 10, 1000, 50_000):
            cfg = m._launch_config(4096, n_cols)
            grad = {"z_ptr": "*" + ty, "y_ptr": "*i64", "out_ptr": "*" + ty, **common, "smoothing_bits": "i64",
                    "ignore_index": "i32"}
            hvp = {"z_ptr": "*" + ty, "u_ptr": "*" + ty, "out_ptr": "*" + ty, **common, "u_stride": "i32"}
            for kernel, sig in ((m._grad_kernel, grad), (m._hvp_kernel, hvp)):
                yield f"{kernel.__name__} {ty} C={n_cols}", kernel, sig, {"FP64": ty == "fp64", **cfg}


def _lanczos_step():
    from unlearn_kernels.triton_kernels import lanczos_step as m

    cfg = m._launch_config(101_770, 35)
    sizes = {"d": "i32", "m": "i32"}
    for ty in DTYPES:
        v, f64 = "*" + ty, "*fp64"
        sigs = {
            m._pass1: {"hq_ptr": v, "q_ptr": v, "qp_ptr": v, "b_ptr": v, "w_ptr": v, "alpha_ptr": f64,
                       "beta_prev_ptr": f64, "bpart_ptr": f64, **sizes, "n_tiles": "i32"},
            m._pass2: {"b_ptr": v, "w_ptr": v, "c_ptr": f64, "part_ptr": f64, "bpart_ptr": f64, **sizes,
                       "n_tiles": "i32"},
            m._pass3: {"b_ptr": v, "w_ptr": v, "c_ptr": f64, "again_ptr": "*i32", "part_ptr": f64, **sizes},
        }
        for kernel, sig in sigs.items():
            yield f"{kernel.__name__} {ty}", kernel, sig, cfg


def _lora_linear():
    from unlearn_kernels.triton_kernels import lora_linear as m

    strides = ("s_pm", "s_pk", "s_qn", "s_qk", "s_lm", "s_lr", "s_rn", "s_rr")
    for ty, dtype in DTYPES.items():
        v = "*" + ty
        sig = {"p_ptr": v, "q_ptr": v, "l_ptr": v, "r_ptr": v, "bias_ptr": v, "c_ptr": v, "M": "i32", "N": "i32",
               "K": "i32", "R": "i32", "alpha_bits": "i64", "beta_bits": "i64", **{s: "i32" for s in strides}}
        # the forward's epilogue at rank 16 and at rank 32 (the largest BLOCK_R: the most shared memory), a plain product
        for rank, bias in ((16, True), (32, True), (0, False)):
            cfg = m._launch_config(4096, 4096, 4096, rank, dtype)
            flags = {"HAS_LOW_RANK": rank > 0, "HAS_BIAS": bias}
            yield f"_matmul {ty} rank={rank} bias={bias}", m._matmul, sig, {**flags, **cfg}


KERNELS = {"softmax_ce": _softmax_ce, "lanczos_step": _lanczos_step, "lora_linear": _lora_linear}


def _int64_ids(ttir: str) -> bool:
    """Whether every use of every ``tt.get_program_id`` value in the Triton IR is its sign extension to i64."""
    lines = ttir.splitlines()
    for name in re.findall(r"(%[\w.]+) = tt\.get_program_id", ttir):
        uses = [line.strip() for line in lines if re.search(re.escape(name) + r"(?![\w.])", line)
                and "tt.get_program_id" not in line]
        if not all(re.match(r"%[\w.]+ = arith\.extsi " + re.escape(name) + r" : i32 to i64", use) for use in uses):
            return False
    return True


def main(ops: list[str]) -> None:
    for op in ops:
        for variant, kernel, signature, config in KERNELS[op]():
            options = {k: config[k] for k in LAUNCH_OPTIONS if k in config}
            constexprs = {k: val for k, val in config.items() if k not in LAUNCH_OPTIONS}
            record = {"op": op, "variant": variant}
            try:
                types = {**signature, **dict.fromkeys(constexprs, "constexpr")}
                src = ASTSource(kernel, signature={name: types[name] for name in kernel.arg_names},
                                constexprs=constexprs)
                compiled = triton.compile(src, target=TARGET, options=options)
                record.update(ok=bool(compiled.asm["cubin"]), shared=compiled.metadata.shared,
                              int64_ids=_int64_ids(compiled.asm["ttir"]))
            except Exception as err:  # reported to the test, which names the variant
                record.update(ok=False, error=f"{type(err).__name__}: {err}"[-3000:])
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

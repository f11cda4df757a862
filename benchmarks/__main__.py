"""Benchmark runner: ``python -m benchmarks [suite ...] [--device cpu|cuda|cuda:N] [--quick]``.

Writes ``benchmarks/results/<suite>_<cpu|gpu>.json`` (environment, config, medians, ratios) and
prints a table per suite. A ``--quick`` run (a smoke test) writes to ``unlearn_kernels_benchmarks_quick/``
in the system's temporary folder unless ``--out`` says otherwise, so that it never replaces the committed
results.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import tempfile
import traceback
from pathlib import Path

import torch

from unlearn_kernels.cli import UsageError, check_device, check_out_folder, check_threads, path_argument, run_program

from . import common

SUITES = {
    "softmax_ce": "softmax cross-entropy gradient and HVP on logits",
    "hvp": "Hessian-vector products in gradient units: ours (fused, generic) vs curvlinops, PyHessian, autograd",
    "lanczos": "top-10 Hessian eigenvalues: our lanczos vs scipy eigsh on the same operator",
    "cubic": "cubic-regularised Newton subproblem: dense, krylov and gd from d = 1e3 to 1e6",
    "lora": "fused LoRA linear forward and forward+backward vs PEFT's layer, the eager expression and the frozen layer",
    "lora_hvp": "Hessian-vector products on LoRA adapters (the RFA study's digits MLP): double backward vs "
                "forward-over-reverse",
    "distributed": "Hessian-vector product and gradient over a large batch: 2 processes x 1 thread vs 1 process",
    "unlearn": "unlearning cost as the data grows: retrain vs CureNewton (subsampled Hessian) and fine-tuning",
    "floors": "the matmuls / convolutions an exact product cannot skip, timed alone, vs ours and PyHessian's "
              "cached graph",
}

QUICK_DIR = Path(tempfile.gettempdir()) / "unlearn_kernels_benchmarks_quick"


def _run_suites(args: argparse.Namespace, device: torch.device, out: Path) -> list[str]:
    """Runs each suite of ``args.suites`` on ``device``, writes its JSON into ``out`` and prints its table;
    returns the suites that failed: raised, or gave a wrong result from one of the package's candidates."""
    failed = []
    for suite in args.suites:
        try:
            module = importlib.import_module(f".{suite}", __package__)
        except Exception:  # a suite whose module cannot load (an anchor's import) costs no other suite
            print(f"\n{suite}: FAILED to load")
            traceback.print_exc()
            failed.append(suite)
            continue
        devices = getattr(module, "DEVICES", ("cpu", "cuda"))  # a suite may declare the devices it runs on
        if device.type not in devices:
            print(f"\n{suite}: skipped, it runs on {', '.join(devices)} only")
            continue
        # only the suites with torch.compile candidates take with_compile
        takes_compile = "with_compile" in inspect.signature(module.run).parameters
        kwargs = {"with_compile": not (args.no_compile or args.quick)} if takes_compile else {}
        baseline = getattr(module, "BASELINE", "eager")
        try:
            if args.quick:
                kwargs.update(module.QUICK)  # every suite declares its quick settings
            measurements, config = module.run(device, **kwargs)
            config["quick"] = args.quick  # a quick run's JSON says so
            # a suite that measures in other processes says what they ran with
            path = common.write_results(suite, device, measurements, baseline, config, out_dir=out,
                                        measured_with=getattr(module, "MEASURED_WITH", None))
        except Exception:  # one failing suite must not cost the others' results (a GPU run is short)
            print(f"\n{suite}: FAILED")
            traceback.print_exc()
            failed.append(suite)
            continue
        print(f"\n{suite}: {SUITES[suite]}")
        print(common.format_table(measurements, baseline))
        print(f"results: {path}")
        # a kernel of ours that fails its correctness gate, or cannot run for a reason the suite does not
        # expect (a build without it, an error in it), fails the run (an anchor's, curvlinops's on the ViT
        # say, is reported in the table only); its JSON is written all the same
        ours = [m for m in measurements if m.candidate.startswith("ours") or m.candidate in getattr(module, "OURS", ())]
        wrong = [f"{m.candidate} on {m.case}" for m in ours if m.status == "wrong"]
        if wrong:
            print(f"\n{suite}: FAILED its correctness gates: {'; '.join(wrong)}")
            failed.append(suite)
        expected = getattr(module, "EXPECTED_UNAVAILABLE", ())
        broken = [f"{m.candidate} on {m.case} ({m.status})" for m in ours if m.status.startswith("unavailable")
                  and not any(reason in m.status for reason in expected)]
        if broken:
            print(f"\n{suite}: FAILED: candidates of ours that could not run: {'; '.join(broken)}")
            if suite not in failed:
                failed.append(suite)
        # the docs' plot of a suite is drawn from its committed CPU JSON: redrawn whenever a full run (not a
        # --quick smoke test) replaces it
        plot = getattr(module, "PLOT", None)
        committed = path.parent.resolve() == common.RESULTS_DIR.resolve()
        if plot is not None and device.type == "cpu" and committed and not args.quick:
            try:
                print(f"plot: {plot(path)}")
            except Exception:  # as a failing suite: the other suites still run
                print(f"\n{suite}: plot FAILED")
                traceback.print_exc()
                if suite not in failed:
                    failed.append(suite)
    return failed


def main(argv: list[str] | None = None) -> int:
    """Runs the suites ``argv`` names (default: ``sys.argv[1:]``, as the program) and returns the exit status:
    1 when a suite failed (raised, or one of the package's candidates failed its correctness gate), 2
    (``SystemExit``) for a wrong option; Ctrl-C (the suites finished before it keep their JSON) and an output
    that cannot be written end as :func:`unlearn_kernels.cli.run_program` says."""
    return run_program("python -m benchmarks", _run, argv)


def _run(argv: list[str] | None) -> int:
    """:func:`main`'s work: the options checked before any suite runs, then the suites."""
    suites = "\n".join(f"  {name:<12} {what}" for name, what in SUITES.items())
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__, epilog=f"suites:\n{suites}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suites", nargs="*", default=list(SUITES), help="suites to run (default all; listed below)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:<index> (default: cuda when one is visible, else cpu)")
    parser.add_argument("--quick", action="store_true", help="smaller shapes, short timing, no torch.compile")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile candidates")
    parser.add_argument("--out", type=path_argument, default=None,
                        help=f"directory for the JSON results (default: {common.RESULTS_DIR}; "
                             f"with --quick {QUICK_DIR})")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        try:
            check_threads(args.threads)
        except UsageError as exc:
            parser.error(str(exc))
        torch.set_num_threads(args.threads)
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        parser.error(f"unknown suite(s) {unknown}; choose from {list(SUITES)}")
    repeated = sorted({s for s in args.suites if args.suites.count(s) > 1})
    if repeated:  # a second run would only replace the first one's JSON
        parser.error(f"suite(s) named more than once: {repeated}")
    try:
        device = check_device(args.device, types=("cpu", "cuda"))  # the suites run on these
    except UsageError as exc:
        parser.error(str(exc))
    if device.type == "cuda":  # float32 at full precision, as on the CPU: cuDNN's default rounds convolutions to TF32
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    # checked before any suite runs, not when the first one writes its results
    out = Path(args.out) if args.out is not None else QUICK_DIR if args.quick else common.RESULTS_DIR
    try:
        check_out_folder(out, [common.result_path(suite, device, out) for suite in args.suites])
    except UsageError as exc:
        parser.error(str(exc))
    env = common.environment(device)
    print(f"device: {env['device_name']} ({env['device']}), torch {env['torch']}, threads {env['cpu_threads']}",
          flush=True)  # an output that cannot be written fails here, before the suites
    failed = _run_suites(args, device, out)
    if failed:
        print(f"\nfailed suites: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

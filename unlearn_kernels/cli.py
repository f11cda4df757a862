"""The ``unlearn-kernels`` command line.

``unlearn-kernels run`` with no options runs three scenarios on digits with the MLP (10% random
forgetting, 10% mislabeled data, class 3), 3 seeds, the methods of
:data:`~unlearn_kernels.study.SCENARIO_METHODS`, against the retrain oracle, and prints each
scenario's table and a summary of the gap each method closes; ``--protocol`` runs one scenario with
:data:`~unlearn_kernels.study.DEFAULT_METHODS`. ``unlearn-kernels backends`` says which kernel
backends are usable here.
"""
from __future__ import annotations

import argparse
import ast
import atexit
import contextlib
import dataclasses
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ._version import __version__

if TYPE_CHECKING:
    import torch

    from .study import StudyConfig


class UsageError(Exception):
    """A wrong option: reported in one line with exit status 2, never as a traceback."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a batch scheduler), raised where the program is, so that it ends
    as after Ctrl-C: the work finished so far written, one line, no traceback."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


class OutputError(Exception):
    """Standard output could not be written (a full disk, a reader that went away); the OSError is its cause."""


class _CheckedStdout:
    """``sys.stdout`` whose failed writes raise :class:`OutputError`: :func:`run_program` tells them from
    the OSErrors of the work itself (a results file on a full disk), and argparse, which drops an OSError
    of its ``--help`` (status 0, no help), lets them through."""

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._refuse_closed()
        try:
            return self._checked(self._stream.write, text)
        except UnicodeEncodeError:  # a stream that cannot show "±" (PYTHONIOENCODING=ascii): escaped, not lost
            encoding = self._stream.encoding or "ascii"
            return self._checked(self._stream.write, text.encode(encoding, "backslashreplace").decode(encoding))

    def flush(self) -> None:
        self._refuse_closed()
        self._checked(self._stream.flush)

    def _refuse_closed(self) -> None:
        if self._stream is None:  # started with standard output closed (`>&-`): Python's sys.stdout is None
            raise OutputError("standard output is closed")

    @staticmethod
    def _checked(call: Callable[..., Any], *args: Any) -> Any:
        try:
            return call(*args)
        except OSError as exc:
            raise OutputError(exc.strerror or str(exc)) from exc

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding, ...
        return getattr(self._stream, name)


def run_program(prog: str, command: Callable[[list[str] | None], int], argv: list[str] | None) -> int:
    """``command(argv)``'s exit status, ended the way every command line of the project ends.

    Ctrl-C prints one line, ``<prog>: interrupted``. Called in the same process (``argv`` given, e.g. by
    a test) the status is then 130; run as the program (``argv`` None: the process's own arguments) the
    process ends by SIGINT, so that a shell loop running it stops too (a status of 130 lets it go on).
    SIGTERM, in the main thread, ends it the same way (:class:`Terminated`) with ``<prog>: terminated``
    and status 143, the shell's for SIGTERM (its default action kills the process at once, losing what
    it had finished). Standard output that cannot be written gives one line and status 1;
    a reader that went away (``| head``) no line and status 141, the shell's for SIGPIPE. Usage errors
    (``SystemExit``) pass. torch's thread count (a command's ``--threads``) is the caller's again afterwards.
    """
    import torch  # (the package imports it anyway)

    threads = torch.get_num_threads()
    stdout = sys.stdout
    # signal handlers are set in the main thread only; a SIGTERM the process was started ignoring stays ignored,
    # and one handled outside Python (getsignal gives None) is left alone: it could not be put back afterwards
    handled = (threading.current_thread() is threading.main_thread()
               and signal.getsignal(signal.SIGTERM) not in (signal.SIG_IGN, None))
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if handled else None
    try:
        with contextlib.redirect_stdout(_CheckedStdout(stdout)):
            try:
                return command(argv)
            finally:
                sys.stdout.flush()  # buffered output fails here, not in a traceback at exit
    except Terminated:
        print(f"{prog}: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt as interrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        if argv is not None:
            return 130  # the shell's status for SIGINT
        # Python ends a program whose KeyboardInterrupt nobody caught by SIGINT, after its clean-up (atexit:
        # multiprocessing's children and semaphores); the line above is the report, without a traceback
        _print_no_traceback_of(interrupt)
        raise
    except OutputError as exc:
        if argv is None and stdout is not None:  # run as the program: Python flushes its stdout again at exit
            atexit.register(_discard_unwritten_output, stdout)
        if isinstance(exc.__cause__, BrokenPipeError):
            return 141
        print(f"{prog}: error: cannot write to standard output: {exc}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads)  # called in a process of the caller's: its count as it was
        if handled:
            signal.signal(signal.SIGTERM, previous)


_REPORTED = "_unlearn_kernels_reported"
"""The attribute that marks an exception already reported in one line (:func:`_print_no_traceback_of`)."""


def _print_no_traceback_of(reported: BaseException) -> None:
    """Makes ``sys.excepthook`` print nothing for ``reported``, an exception already reported in one line,
    and hand every other exception to the hook it replaces (a caller that goes on gets its tracebacks).
    ``reported`` is marked, not kept: the hook would otherwise hold its traceback's frames for good."""
    setattr(reported, _REPORTED, True)
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        if not getattr(exc, _REPORTED, False):
            previous(exc_type, exc, tb)

    sys.excepthook = hook


def _discard_unwritten_output(stream: TextIO) -> None:
    """Run at exit (atexit runs before Python's own flush of stdout): if ``stream`` still cannot be written,
    its file descriptor points at the null device, so that the output it holds goes nowhere instead of
    failing again at that flush ("Exception ignored", status 120). Not done when the write failed: a
    caller that ran ``main()`` in its own process keeps its descriptor, and what it writes later, as it was."""
    try:
        stream.flush()
        return  # written after all
    except ValueError:  # closed since: it holds nothing
        return
    except OSError:
        with contextlib.suppress(OSError, ValueError):  # a stream without a file descriptor holds nothing
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, stream.fileno())
            finally:
                os.close(devnull)


def path_argument(text: str) -> str:
    """The argparse ``type`` of a folder option: ``''`` (``--out "$DIR"`` with DIR unset) is refused
    (:func:`~unlearn_kernels.checkpoint.refuse_empty_path`), not read as the working folder; argparse
    prints an ArgumentTypeError as a usage error, after the option's name. A leading ``~`` is the home
    folder, as in the shell, which leaves it unexpanded after ``=`` (``--out=~/runs``)."""
    from .checkpoint import refuse_empty_path

    try:
        refuse_empty_path(text, "'' names no folder")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return os.path.expanduser(text)


def check_out_folder(folder: Path, files: Sequence[Path] = (), *, make: bool = True) -> None:
    """The one check of an ``--out`` folder (this command's, the benchmark runner's, the examples'), before any
    work rather than when its results are written after it: ``folder`` is a folder or can be made one (made, with
    its parents, when ``make``), it takes writes, and none of ``files``, those the caller writes there, is a
    directory or a file that cannot be overwritten. When ``make`` and ``files`` are given, a trial file is written
    where the first of them goes: permission bits may allow writes a read-only file system still refuses.

    Raises:
        UsageError: ``--out: <why>``, naming the folder or the file.
    """
    from .checkpoint import check_writable_folder, probe_atomic_write

    try:
        check_writable_folder(folder, make=make)
    except ValueError as exc:
        raise UsageError(f"--out: {exc}") from None
    for path in files:
        if path.is_dir():
            raise UsageError(f"--out: {str(path)!r}, where the run writes a file, is a directory")
        if path.exists() and not os.access(path, os.W_OK):
            raise UsageError(f"--out: {str(path)!r}, which the run overwrites, is not writable")
    if make and files:
        try:
            probe_atomic_write(files[0])
        except OSError as exc:
            raise UsageError(f"--out: {str(folder)!r} cannot be written: {exc}") from None


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _seeds(text: str) -> tuple[int, ...]:
    """``--seeds`` as integers (StudyConfig checks that there is one, their range and that they are
    distinct)."""
    try:
        return tuple(int(v) for v in _comma_list(text))
    except ValueError:
        raise UsageError(f"--seeds expects comma-separated integers, got {text!r}") from None


def _check_out(root: Path, configs: dict[str, Any]) -> list[Path]:
    """The output directory (``--out``) and each scenario's directory in it are directories or can
    be made ones, and no file the run will write there is a directory or a file that cannot be
    overwritten: checked before any work, not when the results are written after the study. Returns
    the files the run may write or remove."""
    from . import report

    files = [root / name / file for name, config in configs.items()
             for file in report.study_files(config.methods, max(1, config.sequential))]
    if len(configs) > 1:
        files += [root / report.SUMMARY_FILE, root / report.GAP_CLOSED_PLOT]
    # each folder with the files the run writes there; made later: --out after every check, a scenario's folder
    # when its results are written
    for folder in (root, *(root / name for name in configs)):
        check_out_folder(folder, [f for f in files if f.parent == folder], make=False)
    # what an earlier run left that this one does not replace is removed when the results are written (a
    # scenario's plots, and the summary of several scenarios with its plot when it covers a scenario this
    # run writes): none of them may be a directory
    removed = [root / name / plot for name in configs for plot in (report.GAP_CLOSED_PLOT, report.SEQUENTIAL_PLOT)]
    for path in [*removed, root / report.SUMMARY_FILE, root / report.GAP_CLOSED_PLOT]:
        if path.is_dir():
            raise UsageError(f"--out: {str(path)!r}, where the run writes or removes a file, is a directory")
    return sorted(set(files) | set(removed))


@contextlib.contextmanager
def _only_run_in(root: Path) -> Iterator[None]:
    """An exclusive lock on the ``--out`` folder while the run lasts (two runs writing into one folder
    left one's results beside the other's plots); the system releases it when the process ends,
    however it ends. Where there are no POSIX locks, no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(root, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:  # other than "in use": a file system without locks (ENOSYS, ENOLCK), run without
            if isinstance(error, BlockingIOError):
                raise UsageError(f"--out {str(root)!r} is in use by another unlearn-kernels run: wait for it to "
                                 "end, or choose another --out") from None
        yield
    finally:
        os.close(fd)


def parse_method_options(items: list[str]) -> dict[str, dict[str, Any]]:
    """``--set METHOD.OPTION=VALUE`` items as ``{method: {option: value}}``.

    VALUE is read as a Python literal (``2``, ``1e-3``, ``None``, ``(1, 2)``, ``'x'``) or a torch
    dtype (``torch.float64``), and kept as a string when it is neither (``auto``). Whether the
    method and option exist is checked by :class:`~unlearn_kernels.study.StudyConfig`.
    """
    options: dict[str, dict[str, Any]] = {}
    for item in items:
        target, equals, text = item.partition("=")
        method, dot, option = target.strip().partition(".")
        if not equals or not dot or not method or not option.isidentifier():
            raise UsageError(f"--set expects METHOD.OPTION=VALUE (e.g. cure_newton.M=auto), got {item!r}")
        chosen = options.setdefault(method, {})
        if option in chosen:  # as a repeated --seeds or --methods value is refused
            raise UsageError(f"--set gives {method}.{option} twice")
        chosen[option] = _option_value(text.strip())
    return options


def _option_value(text: str) -> Any:
    """A ``--set`` VALUE: a Python literal, a torch dtype written ``torch.<name>``, else the text."""
    with contextlib.suppress(ValueError, SyntaxError, TypeError):  # not a literal: a dtype or the text
        return ast.literal_eval(text)
    if text.startswith("torch."):
        import torch

        dtype = getattr(torch, text.removeprefix("torch."), None)
        if isinstance(dtype, torch.dtype):
            return dtype
    return text


def check_device(text: str, types: tuple[str, ...] | None = None) -> torch.device:
    """``text``, the ``--device`` of ``unlearn-kernels run`` and ``python -m benchmarks``, as a torch device of
    one of ``types`` (None: any type) that can run here; else a :class:`UsageError` that names ``text``."""
    from .checks import check_device as checked_device  # imports torch: not at the module's top (fast --help)

    try:
        return checked_device("--device", text, types)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _cmd_backends(args: argparse.Namespace) -> int:
    import unlearn_kernels

    print(unlearn_kernels.backends())
    return 0


def _study_configs(args: argparse.Namespace) -> dict:
    """``{scenario name: StudyConfig}``: the three default scenarios, or the one ``--protocol`` names."""
    from .checks import check_int, check_number
    from .data.datasets import LOCAL_DATASETS
    from .study import (
        DEFAULT_METHODS,
        DEFAULT_RECIPES,
        SCENARIO_METHODS,
        StudyConfig,
        check_dataset_and_model,
        check_epochs,
        default_cache_dir,
        default_scenarios,
    )

    try:  # before the recipe is looked up by the model's name
        check_dataset_and_model(args.dataset, args.model)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.root is not None and args.dataset not in LOCAL_DATASETS:  # it would be ignored
        raise UsageError(f"--root is for the datasets read from local files ({', '.join(LOCAL_DATASETS)}); "
                         f"{args.dataset} is bundled")
    check_device(args.device)
    if args.methods is not None:
        methods = tuple(_comma_list(args.methods))
        if not methods:
            raise UsageError("--methods names no method")
    else:  # the three quick scenarios leave out the two slow exact damped solves (see SCENARIO_METHODS)
        methods = DEFAULT_METHODS if args.protocol else SCENARIO_METHODS
    if args.sequential is not None:
        if args.protocol is None:
            raise UsageError("--sequential needs --protocol (random, mislabeled or class)")
        if args.sequential < 1:
            raise UsageError(f"--sequential must be >= 1 (the number of requests), got {args.sequential}")
    try:
        if args.epochs is not None:  # the study's bound (>= 1) before the recipe's (>= 0): one message for both
            check_epochs(args.epochs)
        if args.lr is not None:  # the recipe's rules, under the options' names (TrainConfig names its fields)
            check_number("the training recipe's lr (--lr)", args.lr, 0.0, strict=True)
        if args.batch_size is not None:
            check_int("the training recipe's batch size (--batch-size)", args.batch_size)
        recipe = dataclasses.replace(DEFAULT_RECIPES[args.model], **{k: v for k, v in (
            ("epochs", args.epochs), ("lr", args.lr), ("batch_size", args.batch_size)) if v is not None})
    except ValueError as exc:  # TrainConfig's checks, e.g. --lr -1
        raise UsageError(str(exc)) from None
    try:
        cache_dir = None if args.no_cache else default_cache_dir()
    except ValueError as exc:  # no home folder to put it in
        raise UsageError(str(exc)) from None
    # StudyConfig refuses an option of another protocol (--forget-class with random, --forget-fraction with class)
    method_options = parse_method_options(args.set or [])
    common = dict(dataset=args.dataset, root=args.root, model=args.model, methods=methods,
                  forget_fraction=args.forget_fraction, method_options=method_options, seeds=_seeds(args.seeds),
                  recipe=recipe, device=args.device, cache_dir=cache_dir)
    try:
        if args.protocol is None:
            return default_scenarios(forget_classes=tuple(args.forget_class or (3,)), **common)
        name = args.protocol + (f"-sequential{args.sequential}" if args.sequential else "")
        return {name: StudyConfig(protocol=args.protocol, forget_classes=tuple(args.forget_class or ()),
                                  sequential=args.sequential or 0, **common)}
    except (ValueError, TypeError) as exc:  # StudyConfig's own checks (method options among them)
        raise UsageError(str(exc) + _read_as_numbers(method_options, str(exc))) from None


def _read_as_numbers(method_options: dict[str, dict[str, Any]], message: str) -> str:
    """Where ``message`` is a method's refusal of its options: a note on an option that ``--set`` read as a
    number and that the method takes as text (``rfa.targets=1`` is the int 1, the layer's name the text '1'),
    else ""."""
    from .methods import METHODS

    for method, options in method_options.items():
        if not message.startswith(f"{method} rejects the options"):
            continue
        for option, value in options.items():
            if isinstance(value, (bool, int, float, complex)):
                with contextlib.suppress(TypeError, ValueError):
                    METHODS[method](**{**options, option: str(value)})
                    return (f" (--set read {method}.{option} as the {type(value).__name__} {value!r}; for text, "
                            f"quote it: --set \"{method}.{option}='{value}'\")")
    return ""


def _percent(fraction: float) -> str:
    """``fraction`` in percent with up to 3 significant digits: 0.1 is "10%", 0.002 "0.2%" (not "0%")."""
    return f"{fraction * 100:.3g}%"


def _describe(config) -> str:
    if config.protocol == "class":
        what = f"forget class(es) {list(config.forget_classes)}"
    elif config.protocol == "mislabeled":
        what = f"{_percent(config.forget_fraction)} of the train labels wrong, forget those rows"
    else:
        what = f"{_percent(config.forget_fraction)} random forgetting"
    if config.sequential:
        what += f", {config.sequential} sequential requests"
    return what


@contextlib.contextmanager
def _progress(label: str) -> Iterator[Callable[[str, int, int], None]]:
    """A progress callback: a tqdm bar on a terminal, otherwise one plain line per phase (a log file
    or a pipe gets no carriage-return frames; a terminal that reports no width, as a pseudo-terminal of
    0 x 0 columns does, got an empty bar: nothing at all)."""
    if _terminal_width(sys.stderr) > 0:
        from tqdm import tqdm

        with tqdm(total=1, unit="run", dynamic_ncols=True, file=sys.stderr) as bar:
            def update(phase: str, done: int, total: int) -> None:
                bar.total = total
                bar.n = done
                bar.set_description(f"{label}: {phase}")
                bar.refresh()

            yield update
    else:
        def update(phase: str, done: int, total: int) -> None:
            # progress only: a standard error that cannot be written (its reader gone, a full disk) stops no work
            with contextlib.suppress(OSError):
                print(f"[{label} {done}/{total}] {phase}", file=sys.stderr, flush=True)

        yield update


def _terminal_width(stream: Any) -> int:
    """The columns of the terminal ``stream`` writes to; 0 where it is not a terminal or reports none."""
    try:
        return os.get_terminal_size(stream.fileno()).columns if stream.isatty() else 0
    except (AttributeError, OSError, ValueError):  # no file descriptor (a StringIO), or a closed one
        return 0


def _damaged_checkpoint(exc: Exception) -> UsageError:
    """The usage error of a damaged cached original (left in place for the user): one line."""
    first_line = str(exc).splitlines()[0]  # torch's unpickling errors run over several lines
    return UsageError(f"{first_line} (delete it to retrain, or run with --no-cache)")


def usable_cpus() -> int:
    """How many CPUs this process may run on: its CPU affinity where the system has one (a container or
    ``taskset`` may allow fewer than the machine has), else the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def check_threads(threads: int) -> None:
    """UsageError unless ``threads`` is between 1 and the CPUs this process may use: OpenMP fails to
    create tens of thousands of threads (or the process dies in a segmentation fault), and more threads
    than CPUs only wait on each other."""
    cpus = usable_cpus()
    if not 1 <= threads <= cpus:
        raise UsageError(f"--threads must be between 1 and {cpus} (the CPUs this process may use), got {threads}")


def _cmd_run(args: argparse.Namespace) -> int:
    from .checkpoint import remove_orphan_temporaries
    from .study import check_scenario

    configs = _study_configs(args)
    check_threads(args.threads)
    for config in configs.values():  # every scenario's data before the first one's training
        try:
            check_scenario(config)
        except (ValueError, TypeError, OSError, ImportError) as exc:  # e.g. a missing class, an unreadable file
            hint = ""
            if config.protocol == "class" and args.protocol is None and not args.forget_class:
                hint = (" (the default class scenario forgets class 3: pick another with --forget-class, or run one "
                        "scenario with --protocol random or --protocol mislabeled)")
            # with several scenarios, which one: an option such as --forget-fraction serves two of them
            scenario = f"the {config.protocol} scenario: " if len(configs) > 1 else ""
            raise UsageError(scenario + str(exc) + hint) from None
    first = next(iter(configs.values()))
    root = Path(args.out if args.out is not None else f"runs/{first.dataset}-{first.model}")
    files = _check_out(root, configs)
    _set_threads_and_check_caches(args, configs)  # may make the cache folder: after the --out checks (they make none)
    check_out_folder(root)  # makes it, last: a refused run leaves no new folder behind
    with _only_run_in(root):
        for path in _written_by_any_run(root, files):  # left by a run killed while it wrote them (no other run
            remove_orphan_temporaries(path)             # writes here now), this scenario's or another's
        return _run_scenarios(args, configs, root)


def _written_by_any_run(root: Path, files: list[Path]) -> set[Path]:
    """The files a run into ``root`` writes: this run's (``files``), and those any run may have written
    there: the summary of several scenarios with its plot, and every study file of the scenario folders
    already there (a scenario's folder is named after its protocol, ``<protocol>-sequential<K>`` with
    ``--sequential``)."""
    from . import report
    from .study import PROTOCOLS

    names = report.study_files(("original",), 2)  # every file a study can write
    scenarios = [p for p in root.iterdir() if p.is_dir() and p.name.split("-sequential")[0] in PROTOCOLS]
    return {*files, root / report.SUMMARY_FILE, root / report.GAP_CLOSED_PLOT,
            *(folder / name for folder in scenarios for name in names)}


def _set_threads_and_check_caches(args: argparse.Namespace, configs: dict[str, StudyConfig]) -> None:
    """Sets torch's threads to ``--threads`` and checks each scenario's cache of original models: before any
    training (not when a later seed's original is saved) and before --out is made."""
    import torch

    from .checkpoint import CheckpointError
    from .study import check_cache

    # The default models are small: one intra-op thread is fastest, and OpenMP threads that wait on
    # each other on a busy machine slow training many times over. Larger models: raise --threads. Set before
    # the cache check: a cached model's record names the threads it was trained with.
    torch.set_num_threads(args.threads)
    for config in configs.values():
        try:
            check_cache(config)
        except (ValueError, OSError) as exc:  # OSError: e.g. a folder where a read-only cache's file should be
            raise UsageError(str(exc)) from None
        except CheckpointError as exc:
            raise _damaged_checkpoint(exc) from None


def _run_scenarios(args: argparse.Namespace, configs: dict[str, StudyConfig], root: Path) -> int:
    """The rest of ``run``, in the ``--out`` folder ``root``, checked and held by this run."""
    from . import report
    from .checkpoint import CheckpointError
    from .study import run_study

    first = next(iter(configs.values()))
    methods = f"{len(first.methods)} method" + "s" * (len(first.methods) != 1)
    print(f"unlearn-kernels run: {first.dataset}, {first.model}, "
          + (f"{len(configs)} scenarios ({', '.join(configs)})" if len(configs) > 1 else _describe(first))
          + f", seeds {list(first.seeds)}, {methods} on {first.device}",
          flush=True)  # an output that cannot be written fails here, before the training
    if not args.methods and not args.protocol:
        print("(damped_newton and influence, exact solves of an indefinite system that take up to about 40 s a "
              "call here, are left out of the three quick scenarios: run them with --protocol or --methods)")
    start = time.perf_counter()
    studies, results = {}, {}
    for name, config in configs.items():
        if len(configs) > 1:
            print(f"\n=== scenario {name}: {_describe(config)} ===")
        with _progress(name) as progress:
            try:
                study = run_study(config, progress=progress)
            except (ValueError, FileNotFoundError, ImportError) as exc:  # e.g. a later seed's data
                raise UsageError(str(exc)) from None
            except CheckpointError as exc:
                raise _damaged_checkpoint(exc) from None
        out_dir = root / name
        # a summary of earlier results of this scenario would disagree with the new ones (a run of several
        # scenarios writes a new summary once all are done)
        for stale in report.remove_stale_summary(root, name):
            if len(configs) == 1:
                print(f"removed {stale}: it summarised the {name} results this run replaces")
        # the earlier results and plots go first and the new results come last, so that they are never
        # beside plots of another run; a plot that fails, or Ctrl-C or SIGTERM while the plots are drawn,
        # still gets the finished study's results written, beside the plots drawn by then
        for stale_file in (report.RESULTS_FILE, *report.PLOT_FILES):
            with contextlib.suppress(FileNotFoundError):
                (out_dir / stale_file).unlink()
        try:
            plots = report.write_plots(study, out_dir)
        except BaseException:
            print(f"results: {report.write_json(study, out_dir / report.RESULTS_FILE)}")  # the plots' error follows
            raise
        results[name] = report.write_json(study, out_dir / report.RESULTS_FILE)
        # the tables after the files: a reader that goes away (| head) ends the run at a print, the study kept
        summary = report.summarize(study["records"])
        noise = report.gap_closed_noise(study["records"])
        for request in sorted(summary):
            print()
            print(report.format_table(summary[request],
                                      title=f"request {request + 1} of {len(summary)}" if len(summary) > 1 else ""))
            if request in noise:
                print(report.format_noise_note(noise[request]))
        print(f"results: {results[name]}\nplots: {', '.join(str(p) for p in plots)}")
        studies[name] = study
    if len(configs) > 1 and "original" not in first.methods:
        print("\n(no summary of the scenarios: the gap closed is measured against the original, which --methods "
              "leaves out)")
    elif len(configs) > 1:
        print()
        print(report.format_scenario_summary(studies))
        summary_path = report.write_summary_json(studies, results, root / report.SUMMARY_FILE)
        plot = report.plot_gap_closed(studies, root / report.GAP_CLOSED_PLOT)
        print(f"summary: {summary_path}, {plot}")
    print(f"\nAcc_f/Acc_r/Acc_test: accuracy on the forget set (mislabeled: against the wrong labels it was trained "
          f"on; acc_forget_true in the JSON is against the true labels), the retain set and the test set; "
          f"Acc_f so far (sequential runs): accuracy on every row forgotten up to that request; "
          f"MIA(ent): entropy-based MIA (fraction of D_f predicted member); JS(f,gold): JS divergence to the "
          f"oracle on D_f; AvgGap: mean |gap| to the oracle over MIA and the three accuracies; closed Acc_f, "
          f"closed AvgGap: 1 - |gap| / |Original's gap| (1 = the oracle's value, 0 = no better than the Original, "
          f"< 0 = further from the oracle; \"(k/n seeds)\": defined on k seeds only, where the Original's gap "
          f"is not 0); ToW: tug of war, the product over the forget, retain and test sets of 1 - |accuracy gap to "
          f"the oracle|; time s: wall time of the unlearning call (the Original's: returning the model as it is); "
          f"speed-up: the oracle's retraining time / that time; mean±std over {len(first.seeds)} seed(s).")
    print(f"total time {time.perf_counter() - start:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``backends`` and ``run`` commands."""
    parser = argparse.ArgumentParser(prog="unlearn-kernels",
                                     description="Fast second-order machine unlearning for PyTorch.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("backends", help="which kernel backends are built and usable here, and why not",
                       description="List each kernel op's backends (C++, CUDA, Triton, reference) and whether each "
                                   "is built and usable on this machine, with the reason where it is not.")
    p.set_defaults(func=_cmd_backends)

    p = sub.add_parser("run", help="run the unlearning study and print its result table",
                       description="Train the original model, unlearn with each method (see --methods), retrain "
                                   "the oracle, and compare; writes results.json and PNG plots. Without "
                                   "--protocol: three scenarios (random, mislabeled, class) and a summary of the "
                                   "gap each method closes.")
    p.add_argument("--dataset", default="digits", help="digits, breast_cancer, wine, iris, lfw, mnist, "
                   "fashion_mnist, cifar10, cifar100 (the last four from --root)")
    p.add_argument("--root", type=path_argument, default=None,
                   help="directory with the local dataset files (MNIST/CIFAR)")
    p.add_argument("--model", default="mlp", help="mlp, cnn, resnet18 or vit")
    p.add_argument("--protocol", default=None, choices=("random", "mislabeled", "class"),
                   help="run this one scenario (default: three scenarios, random, mislabeled and class, then a "
                        "summary of the gap each method closes)")
    p.add_argument("--forget-fraction", type=float, default=None,
                   help="fraction of the train split to forget (random) or to mislabel and forget (mislabeled); "
                        "default 0.1; not for --protocol class")
    p.add_argument("--forget-class", type=int, action="append",
                   help="class to forget (repeatable; required with --protocol class; the default scenarios use "
                        "class 3)")
    p.add_argument("--sequential", type=int, default=None, metavar="K",
                   help="K forget requests one after another (with --protocol; mislabeled: the wrong-label rows "
                        "in K parts; class: one class per request, K classes)")
    p.add_argument("--methods", default=None,
                   help="comma-separated method names; retrain (the oracle) always runs. Default without "
                        "--protocol: every method but damped_newton, influence, damped_newton_cg, "
                        "cure_newton_lora and retrain_reseeded; with --protocol: damped_newton and influence too")
    p.add_argument("--set", action="append", metavar="METHOD.OPTION=VALUE",
                   help="a method option, e.g. cure_newton.M=auto (repeatable; VALUE is read as a Python literal "
                        "or a torch dtype such as torch.float64, else kept as text)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (default 1: fastest for small models)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs of the original and the oracle "
                   "(default: the model's recipe, unlearn_kernels.study.DEFAULT_RECIPES; mlp 30, cnn 20)")
    p.add_argument("--lr", type=float, default=None, help="learning rate of that training (default: the recipe's; "
                   "mlp and cnn 0.05)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size of that training (default: the "
                   "recipe's; mlp and cnn 64)")
    p.add_argument("--out", type=path_argument, default=None, help="output directory (default "
                   "runs/<dataset>-<model>); each scenario writes <out>/<scenario>/results.json and plots")
    p.add_argument("--no-cache", action="store_true",
                   help="no checkpoint cache: train the original model even if a matching one is cached, and "
                        "save none")
    p.set_defaults(func=_cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command in ``argv`` (default: ``sys.argv[1:]``, as the program) and returns its exit status;
    a wrong option gives a one-line error and status 2, Ctrl-C and an unwritable output end as
    :func:`run_program` says."""
    return run_program("unlearn-kernels", _run_command, argv)


def _run_command(argv: list[str] | None) -> int:
    """The command ``argv`` names; a :class:`UsageError` is its one-line error and status 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"unlearn-kernels: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a results file or checkpoint on a full disk, say: the work's, not the options'
        print(f"unlearn-kernels: error: {exc or type(exc).__name__}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

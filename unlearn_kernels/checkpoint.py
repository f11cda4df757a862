"""Model checkpoints that know what they were trained on.

A checkpoint is one ``torch.save`` file holding the weights (a CPU state dict) and a JSON metadata
record (recipe, model, data fingerprint, device, versions and a hash of the training code). Writes
are atomic: the file is written to a temporary file in the same directory, fsynced, then moved over
the target with ``os.replace``, so a crash leaves either the old checkpoint or the new one, never a
torn file.
:func:`train_or_load` reuses a cached model only when the whole metadata record matches.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import inspect
import json
import math
import os
import platform
import stat
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from ._version import __version__
from .checks import check_device, check_module, first_nonfinite_model_weight
from .labeled import LabeledData
from .training import (
    ProgressCallback,
    TrainConfig,
    TrainStats,
    check_config,
    check_converged,
    check_data,
    check_model_factory,
    check_new_each_call,
    init_model,
    train,
)

try:
    import fcntl
except ImportError:  # no POSIX locks (Windows): temporaries are not locked, and none is taken for an orphan
    fcntl = None

#: bumped when the layout of the file changes (old files are then retrained, not misread)
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read (corrupt, truncated, or not a checkpoint)."""


class CheckpointFormatError(CheckpointError):
    """A checkpoint file of another :data:`FORMAT_VERSION` (another version of this package wrote it)."""


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of named tensors' names, dtypes, shapes and bytes: equal iff the tensors are."""
    digest = hashlib.sha256()
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        # a uint8 view covers every dtype (numpy has no bfloat16)
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def data_fingerprint(data: LabeledData) -> str:
    """SHA-256 (hex) of the inputs' and labels' dtypes, shapes and bytes: equal iff the data are."""
    return tensors_digest({"x": data.x, "y": data.y})


def model_signature(model: nn.Module) -> dict[str, Any]:
    """What must match to reuse weights: the model's class, its submodules (name, class and options,
    e.g. ``['1', 'ReLU', '']``: modules without parameters, an activation or a dropout, change training
    too), the names, shapes and dtypes of its state and which parameters train (a frozen layer trains
    another model).

    Raises:
        ValueError: an entry of the model's state is not a tensor (a module's ``get_extra_state``): checkpoints
            hold tensors only.
    """
    state = model.state_dict()
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"the model cannot be checkpointed: its state entry {name!r} is a "
                             f"{type(value).__name__}, not a tensor (a module's get_extra_state); checkpoints hold "
                             "tensors only: train it without a cache")
    return {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "modules": [[name, type(module).__name__, module.extra_repr()] for name, module in model.named_modules() if name],
        "state": [[name, list(t.shape), str(t.dtype)] for name, t in state.items()],
        "trainable": [name for name, p in model.named_parameters() if p.requires_grad],
    }


def starting_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a model starts training from: its state dict and its non-persistent buffers, which the
    state dict leaves out but the forward may read (a buffer that scales the input: a model built with
    another value reused the cached weights of the first, test accuracy 0.10)."""
    state = model.state_dict()
    return {**state, **{f"{name} (non-persistent buffer)": b for name, b in model.named_buffers() if name not in state}}


def cache_path(folder: str | os.PathLike[str], stem: str, model: nn.Module, config: TrainConfig,
               model_info: Mapping[str, Any] | None = None, device: torch.device | str = "cpu") -> Path:
    """``folder/<stem>-<key>.pt``, the key a short hash of the recipe, the model's signature and
    starting state (``model``: as initialised; :func:`starting_state`), ``model_info`` and the training device
    as checkpoints record it (:func:`device_description`: on the CPU with its instruction set and thread count):
    models trained another way (another recipe, architecture, start or device on the same data) get
    files of their own instead of overwriting each other in turn. Versions and training code are left
    out of the key, so a model made stale by them is overwritten, not kept beside the new one.

    Raises:
        TypeError: ``model`` is not an nn.Module or ``config`` not a TrainConfig.
    """
    check_module("cache_path: model", model)
    check_config("cache_path", config)
    key = json.dumps([config.to_dict(), model_signature(model), tensors_digest(starting_state(model)),
                      dict(model_info or {}), device_description(device)], sort_keys=True, default=str)
    return Path(folder) / f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"


def _normalise(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON round trip: the form metadata is stored and compared in (tuples become lists, ...)."""
    if not isinstance(metadata, Mapping):
        raise TypeError(f"checkpoint metadata must be a mapping, got {type(metadata).__name__}")
    try:
        return json.loads(json.dumps(metadata, sort_keys=True, allow_nan=True))
    except (TypeError, ValueError) as error:
        raise TypeError(f"checkpoint metadata must be JSON-serialisable: {error}") from error


def _fsync_directory(directory: Path) -> None:
    # makes the rename itself durable; not every platform can open a directory
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _new_file_mode(path: Path) -> int:
    """The permissions a plain ``open(path, "w")`` leaves: an existing file's own, else 0o666 less
    the umask (read from /proc where it can be, so that the process umask is never changed)."""
    if path.exists():
        return stat.S_IMODE(path.stat().st_mode)
    try:
        with open("/proc/self/status") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration):
        mask = os.umask(0o022)  # no /proc: read it by setting it (and set it back at once)
        os.umask(mask)
    return 0o666 & ~mask


def _locked_duplicate(fd: int) -> int | None:
    """A duplicate of ``fd`` holding an exclusive lock (``flock``) on its file, which lasts until the
    duplicate is closed, past ``fd``'s own closing; None where the system or the file system has no locks."""
    if fcntl is None:
        return None
    held = os.dup(fd)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
    except OSError:  # a file system without locks (ENOLCK, ENOSYS, EOPNOTSUPP)
        os.close(held)
        return None
    return held


def _new_temporary(path: Path) -> tuple[int, str, int | None]:
    """``(fd, name, lock)``: a new temporary file beside ``path`` for :func:`atomic_write`, locked (``lock``:
    see :func:`_locked_duplicate`) so that :func:`remove_orphan_temporaries` leaves it alone."""
    while True:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        lock, kept = None, False
        try:
            lock = _locked_duplicate(fd)
            # else taken for an orphan and removed between its making and its lock: another is made
            kept = lock is None or _still_named(name, fd)
        finally:
            if not kept:
                os.close(fd)
                if lock is not None:
                    os.close(lock)
        if kept:
            return fd, name, lock


def _still_named(name: str, fd: int) -> bool:
    """Whether ``name`` is still the file open at ``fd``."""
    try:
        return os.path.samestat(os.stat(name), os.fstat(fd))
    except FileNotFoundError:
        return False


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[Any]], None], *, binary: bool = False) -> Path:
    """Write a file through ``write(handle)`` to a temporary file beside ``path``, flushed to disk,
    then moved over ``path``: on any failure the previous file (if any) is left intact and no
    temporary file remains. The temporary is locked until it is moved (``flock``, where the system has
    it), which tells it from the orphan of a killed process (:func:`remove_orphan_temporaries`).
    An OSError that names no file (a full disk's ``[Errno 28]``) is given ``path`` as its filename.
    Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name, lock = _new_temporary(path)
    try:
        try:
            os.chmod(tmp_name, _new_file_mode(path))  # mkstemp's 0600 -> what open() would have given
        except BaseException:
            os.close(fd)  # not yet owned by a file object
            raise
        with os.fdopen(fd, "wb" if binary else "w") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:
            exc.filename = str(path)  # else "[Errno 28] No space left on device" names no file
        raise
    finally:
        if lock is not None:
            os.close(lock)
    _fsync_directory(path.parent)
    return path


def remove_orphan_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files :func:`atomic_write` left beside ``path`` in a process killed while
    it wrote (SIGKILL: no clean-up runs), and return them. A temporary that a live write holds
    locked is left alone, as is every one where there are no locks (no orphan can be told from a live
    write there) and one that cannot be opened or removed (another user's, a read-only folder)."""
    path = Path(path)
    if fcntl is None:
        return []
    removed = []
    for temporary in sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp")):
        with contextlib.suppress(OSError):  # BlockingIOError: a live write's
            fd = os.open(temporary, os.O_RDWR)  # for writing: NFS emulates flock by a write lock, which needs it
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                temporary.unlink()  # while locked: a write that made it just now then finds it gone
                removed.append(temporary)
            finally:
                os.close(fd)
    return removed


def save_json(payload: Any, path: str | os.PathLike[str]) -> Path:
    """``payload`` as indented strict JSON at ``path``, written through :func:`atomic_write`. A NaN or an
    infinity (a diagnostic of a method that did nothing, a rejected trial's decrease of -inf) is
    written as null: Python's own ``NaN`` / ``Infinity`` tokens are not JSON, and strict readers (jq,
    JavaScript, most languages' parsers) refuse the whole file. Returns ``path``."""
    strict = _finite_or_null(payload)
    return atomic_write(path, lambda handle: json.dump(strict, handle, indent=2, allow_nan=False))


def _finite_or_null(value: Any) -> Any:
    """``value`` with every non-finite float, in any nesting of dicts, lists and tuples, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value


def save_figure(fig: Any, path: str | os.PathLike[str], *, dpi: int = 110) -> Path:
    """Matplotlib figure ``fig`` as a PNG at ``path``, written through :func:`atomic_write`: an interrupted
    plot leaves the previous image or the new one, never a torn file. Returns ``path``."""
    return atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=dpi), binary=True)


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, metadata: Mapping[str, Any]) -> None:
    """Write ``model``'s weights and ``metadata`` (JSON-serialisable) to ``path`` atomically.

    On any failure the previous file at ``path`` (if any) is left intact and no temporary file remains.
    """
    path = Path(path)
    state = {name: t.detach().cpu() for name, t in model.state_dict().items()}
    payload = {
        "format": FORMAT_VERSION,
        "metadata": json.dumps(_normalise(metadata), sort_keys=True),
        "state_dict": state,
        # torch.load checks no checksum: flipped bits in the weights loaded without a word
        "digest": tensors_digest(state),
    }

    def write(handle: IO[Any]) -> None:
        try:
            torch.save(payload, handle)
        except RuntimeError as error:  # torch's zip writer on a full disk: "unexpected pos 1920 vs 1814"
            raise OSError(f"cannot write the checkpoint {path}: {error}") from error

    atomic_write(path, write, binary=True)


def refuse_empty_path(path: str | os.PathLike[str], message: str) -> Path:
    """``path`` as a Path, or ValueError(``message``) if it is empty (``""``, or an ``os.PathLike`` of one),
    which ``Path`` would read as the working folder: the one check of an empty path, for options and
    arguments that name a file or a folder. ``message`` names what the path is for and what to pass
    instead (the command line's argparse type, :func:`unlearn_kernels.cli.path_argument`, turns the
    ValueError into a usage error)."""
    if os.fspath(path) == "":
        raise ValueError(message)
    return Path(path)


def check_cache_dir(name: str, cache_dir: Any, cached: str) -> Path | None:
    """``cache_dir`` as a Path, or None for no cache: TypeError unless it is None, a str or an
    ``os.PathLike`` of a str; ValueError for an empty path, which ``Path`` reads as the working folder.
    ``name`` leads the messages (e.g. "Retrain: cache_dir"), ``cached`` says what would be cached."""
    if cache_dir is None:
        return None
    # else pathlib's own TypeError, which names neither the option nor its owner
    if not (isinstance(cache_dir, (str, os.PathLike)) and isinstance(os.fspath(cache_dir), str)):
        raise TypeError(f"{name} must be None or a folder as a str or os.PathLike (e.g. a pathlib.Path), got "
                        f"{type(cache_dir).__name__}")
    return refuse_empty_path(cache_dir, f"{name} is an empty path, which would cache {cached} in the working folder; "
                                        'name a folder ("." for the working folder), or None for no cache')


def _exists_and_is_dir(path: Path, described: str) -> tuple[bool, bool]:
    """Whether something is at ``path`` and whether it is a directory; ValueError ``"<described> cannot be
    used: <why>"`` for a path the system cannot look up (a name longer than the file system takes, where
    ``Path.exists`` and ``Path.is_dir`` raise OSError, or one with a NUL character)."""
    if "\0" in str(path):  # Path.exists answers False for it, and the write fails later with "embedded null byte"
        raise ValueError(f"{described} cannot be used: it contains a NUL character")
    try:
        return path.exists(), path.is_dir()
    except OSError as error:
        raise ValueError(f"{described} cannot be used: {error.strerror}") from None


def _dangling_link(path: Path) -> str | None:
    """Why ``path`` cannot be made a folder, where a symbolic link on the way (``path`` included) resolves to
    nothing: its target does not exist, or links lead back to themselves (mkdir says only "File exists", and
    ``Path.exists`` is False for both, so the folder looks merely missing); None where there is none."""
    for p in (path, *path.parents):
        if p.is_symlink() and not p.exists():
            try:
                os.stat(p)
            except OSError as error:
                if error.errno == errno.ELOOP:
                    return f"{str(p)!r} is a symbolic link in a loop of links ({os.readlink(p)!r})"
            return f"{str(p)!r} is a symbolic link to {os.readlink(p)!r}, which does not exist"
    return None


def _why_not_made(path: Path, error: OSError) -> str:
    """Why ``mkdir(parents=True)`` of ``path`` failed: a symbolic link on the way that resolves to nothing,
    named (:func:`_dangling_link`); else the error."""
    return _dangling_link(path) or str(error)


def _check_writable_file(path: str | os.PathLike[str]) -> None:
    # Path("") is the working folder, which would be reported as "'.' is a directory"
    path = refuse_empty_path(path, "checkpoint path is an empty path: name a file")
    if _exists_and_is_dir(path, f"checkpoint path {str(path)!r}")[1]:
        raise ValueError(f"checkpoint path {str(path)!r} is a directory, not a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"checkpoint path {str(path)!r}: its folder cannot be made "
                         f"({_why_not_made(path.parent, error)})") from None


def check_writable_folder(path: str | os.PathLike[str], *, make: bool = True) -> Path:
    """``path`` as a Path if files can be written into it: it is not a file, it is made (with its
    parents) if missing when ``make``, and, if it exists, it takes writes (permission bits and a
    read-only file system alike). Lets a caller refuse, before its work, a folder it could not save
    that work into.

    Raises:
        ValueError: ``'<path>' is a file, not a directory``, ``... cannot be made: <why>`` (naming a symbolic
            link on the way whose target does not exist), ``... cannot be
            used: <why>`` (a path the system cannot look up),
            ``... is not writable``, or ``path`` is empty (which ``Path`` would read as the working folder).
    """
    path = refuse_empty_path(path, 'the folder is an empty path, which would be the working folder: name a folder '
                                   '("." for the working folder)')
    exists, is_dir = _exists_and_is_dir(path, repr(str(path)))
    if exists and not is_dir:
        raise ValueError(f"{str(path)!r} is a file, not a directory")
    if make:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"{str(path)!r} cannot be made: {_why_not_made(path, error)}") from None
    elif not exists and (dangling := _dangling_link(path)) is not None:  # else found only when it is made
        raise ValueError(f"{str(path)!r} cannot be made: {dangling}")
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{str(path)!r} is not writable")
    return path


def probe_atomic_write(path: str | os.PathLike[str]) -> None:
    """OSError if :func:`atomic_write` could not create its temporary file beside ``path`` (a read-only
    folder or file system): tried with the same call, and the trial file removed. Lets a caller
    refuse, before its work, a place it could not save that work to."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    with contextlib.suppress(FileNotFoundError):  # taken for an orphan (remove_orphan_temporaries) and removed
        os.unlink(name)


def _reads_to_end(path: Path) -> bool:
    """Whether ``path`` can be opened and read to its end (an OSError of doing so: no), a MiB at a time."""
    try:
        with open(path, "rb") as handle:
            left = os.fstat(handle.fileno()).st_size
            while left > 0 and (chunk := handle.read(min(left, 1 << 20))):
                left -= len(chunk)
    except OSError:
        return False
    return True


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(metadata, state_dict)`` stored at ``path``.

    Raises:
        FileNotFoundError: no file at ``path`` (IsADirectoryError: a directory there).
        OSError: the file cannot be read (PermissionError: no permission), as raised by ``open``.
        ValueError: ``path`` is empty (which ``Path`` would read as the working folder) or cannot be
            looked up (a name longer than the file system takes).
        CheckpointError: the file is corrupt, truncated or not a checkpoint (CheckpointFormatError: a
            checkpoint of another format).
    """
    path = refuse_empty_path(path, "checkpoint path is an empty path: name a file")
    if _exists_and_is_dir(path, f"checkpoint path {str(path)!r}")[1]:
        raise IsADirectoryError(f"{path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:
        # the file cannot be read (no permission, an I/O error): not a damaged file. But torch's zip reader
        # raises OSError too, "[Errno 22] Invalid argument", for a truncated archive (241 of 352 cut lengths of
        # a checkpoint): where the file reads to its end, the error is the file's content
        if not _reads_to_end(path):
            raise
        raise CheckpointError(f"{path} is not a readable checkpoint (corrupt or truncated?): {error}") from error
    except Exception as error:  # torch.load raises many types for a damaged file
        # its weights-only refusal advises loading with weights_only=False: unsafe, and no help for a damaged file
        # (an empty file gives EOFError with no message)
        first_line = (str(error).splitlines() or [""])[0]
        why = ("torch.load's weights-only unpickler refuses it" if "weights_only" in str(error)
               else f"{type(error).__name__}: {first_line}" if first_line
               else f"{type(error).__name__} (an empty file?)")
        raise CheckpointError(f"{path} is not a readable checkpoint (corrupt or truncated?): {why}") from error
    if isinstance(payload, dict) and type(payload.get("format")) is int and payload["format"] != FORMAT_VERSION:
        raise CheckpointFormatError(f"{path} is an unlearn-kernels checkpoint of format {payload['format']}, not "
                                    f"{FORMAT_VERSION}")
    if not (isinstance(payload, dict) and type(payload.get("format")) is int and payload["format"] == FORMAT_VERSION
            and isinstance(payload.get("metadata"), str) and isinstance(payload.get("state_dict"), dict)
            and all(isinstance(name, str) and isinstance(t, torch.Tensor)
                    for name, t in payload["state_dict"].items())):
        raise CheckpointError(f"{path} is not an unlearn-kernels checkpoint of format {FORMAT_VERSION}")
    try:
        metadata = json.loads(payload["metadata"])
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} has unreadable metadata: {error}") from error
    if not isinstance(metadata, dict):  # save_checkpoint stores a JSON object
        raise CheckpointError(f"{path} has unreadable metadata: a JSON {type(metadata).__name__}, not an object")
    # files written before the digest have none (their weights cannot be checked)
    if "digest" in payload and payload["digest"] != tensors_digest(payload["state_dict"]):
        raise CheckpointError(f"{path} is corrupt: its weights do not match the checksum stored with them")
    return metadata, payload["state_dict"]


def load_checkpoint(
    path: str | os.PathLike[str], expected_metadata: Mapping[str, Any]
) -> dict[str, torch.Tensor] | None:
    """The state dict stored at ``path`` if its metadata equals ``expected_metadata``, else None.

    None means "retrain": the file is absent or was made by another recipe, model, data, device,
    version, training code or file format.

    Raises:
        CheckpointError: the file exists but is corrupt (it is left in place for inspection).
        OSError: the file cannot be read (PermissionError: no permission).
        IsADirectoryError: ``path`` is a directory; ValueError: it is empty or cannot be looked up.
    """
    expected = _normalise(expected_metadata)
    try:
        metadata, state = read_checkpoint(path)
    except (FileNotFoundError, CheckpointFormatError):
        return None
    return state if metadata == expected else None


def software_versions() -> dict[str, str]:
    """The versions of Python, torch and this package, as every record of a result names them (checkpoints,
    results.json, the benchmarks' JSON)."""
    return {"python": platform.python_version(), "torch": torch.__version__, "unlearn_kernels": __version__}


def _source_file(cls: type) -> str | None:
    try:
        path = inspect.getsourcefile(cls)
    except TypeError:  # a class without a file (built in, or defined in an interactive session)
        return None
    # a module shipped as bytecode only, or inside a zip archive, names a source file that is not there
    return path if path is not None and os.path.isfile(path) else None


def code_fingerprint(model: nn.Module) -> str:
    """SHA-256 (hex) of the code that decides what training produces: the training recipe's own
    module (``training.py``), the data loader's (``labeled.py``) and the source files of the
    model's module classes outside torch and of their base classes (e.g. ``models/mlp.py``). Editing any of
    them changes the fingerprint, so a checkpoint trained by older code is not reused. A class whose source file
    cannot be found (defined interactively, or shipped as bytecode only or in a zip archive) contributes
    its qualified name only."""
    # every class a module's behaviour comes from: a forward inherited from a base class in another file too
    names = {f"{cls.__module__}.{cls.__qualname__}": cls for m in model.modules() for cls in type(m).__mro__
             if cls is not object}
    files = {inspect.getsourcefile(train), inspect.getsourcefile(LabeledData)}
    without_file = []
    for name, cls in sorted(names.items()):
        if cls.__module__.split(".")[0] == "torch":
            continue  # torch's own modules: covered by the torch version
        path = _source_file(cls)
        if path is None:
            without_file.append(name)
        else:
            files.add(path)
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(Path(path).name.encode() + b"\0" + Path(path).read_bytes() + b"\0")
    digest.update("\0".join(without_file).encode())
    return digest.hexdigest()


def device_description(device: torch.device | str) -> str:
    """The device training runs on, as recorded in checkpoints: the CPU with the instruction set torch's
    kernels use (AVX2, AVX512: their rounding differs) and its thread count (the order of floating-point
    sums changes with it), the trained weights changing with either; or the GPU's type and name
    (results differ between devices, so a checkpoint is reused only on the same kind)."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"
    return device.type


def training_metadata(
    model: nn.Module, data: LabeledData, config: TrainConfig, model_info: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """The metadata record :func:`train_or_load` writes and compares: recipe, model (signature plus
    ``model_info``, e.g. the name and kwargs given to ``build_model``, and its starting weights:
    ``model`` as initialised, so that a factory that starts elsewhere, from pretrained weights say,
    trains its own), data fingerprint, the training device, the versions of Python, torch and this package,
    and :func:`code_fingerprint`.

    Raises:
        TypeError / ValueError: ``model``, ``data``, ``config`` or ``device`` is not what :func:`train_or_load`
            takes (its checks), or the model's state holds a non-tensor (:func:`model_signature`).
    """
    owner = "training_metadata"
    check_module(f"{owner}: model", model)
    check_data(owner, data)
    check_config(owner, config)
    check_device(f"{owner}: device", device)
    return {
        "recipe": config.to_dict(),
        "model": {**model_signature(model), "info": dict(model_info or {}),
                  "init": tensors_digest(starting_state(model))},
        "data": data_fingerprint(data),
        "device": device_description(device),
        "versions": software_versions(),
        "code": code_fingerprint(model),
    }


def train_or_load(
    path: str | os.PathLike[str],
    model_factory: Callable[[], nn.Module],
    data: LabeledData,
    config: TrainConfig,
    *,
    model_info: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
    progress: ProgressCallback | None = None,
    owner: str = "train_or_load",
    role: str = "training",
) -> tuple[nn.Module, TrainStats | None]:
    """A model trained on ``data`` with ``config``: loaded from ``path`` when a checkpoint there has the
    same recipe, model, data fingerprint, device, versions and training code, otherwise trained (from ``model_factory()``
    initialised with ``config.seed``) and saved to ``path``.

    ``owner`` and ``role`` name the caller and ``data`` in the training's refusals (see
    :func:`~unlearn_kernels.training.train`): a caller that trains through this function gives its own name.

    Returns:
        ``(model, stats)``: the model on ``device`` in eval mode; ``stats`` is None when it was loaded.
        A trained model whose save fails (a disk that filled meanwhile) is returned with a RuntimeWarning
        saying so; nothing is left at ``path``.

    Raises:
        TypeError: ``model_factory`` is not a callable (a module instance is refused), ``data`` not a
            LabeledData or ``config`` not a TrainConfig.
        CheckpointError: a corrupt file is at ``path`` (unreadable, not fitting the model, or holding
            NaN/Inf weights; delete it to retrain).
        OSError: the file at ``path`` cannot be read (PermissionError: no permission).
        ValueError: ``model_factory`` returns models that share a parameter or buffer (see
            :func:`~unlearn_kernels.training.check_new_each_call`: loading or training would write into
            the modules shared), checked before any load or training; a ``device`` that cannot run here
            (see :func:`~unlearn_kernels.checks.check_device`); the training diverged (NaN/Inf weights:
            nothing is saved); ``path`` is empty, a directory or cannot be looked up, or its folder
            cannot be made or (when a model must be trained) takes no new file, as a read-only one:
            checked before training, which would otherwise be lost when the save fails; as
            :func:`~unlearn_kernels.training.train` refuses ``data`` or the model, named after ``owner``.
    """
    check_model_factory(owner, model_factory)
    check_data(owner, data)
    check_config(owner, config)
    check_device(f"{owner}: device", device)
    model = init_model(model_factory, config.seed)
    check_new_each_call(owner, model_factory, model, config.seed)  # before a load or training writes into it
    _check_writable_file(path)
    remove_orphan_temporaries(path)  # of a run killed while it saved here (SIGKILL): they stayed for good
    metadata = training_metadata(model, data, config, model_info, device)
    state = load_checkpoint(path, metadata)
    if state is not None:
        try:
            model.load_state_dict(state)
        except (RuntimeError, KeyError) as error:  # tensors of other shapes, missing or extra names
            # torch's heading ("Error(s) in loading state_dict for Sequential:"), then a line per mismatch: those
            # lines, on one (a one-line message is all there is)
            lines = [line.strip().rstrip(".") for line in str(error).splitlines() if line.strip()]
            raise CheckpointError(f"{path} does not fit the model it was saved for (damaged?): "
                                  f"{'; '.join(lines[1:] or lines)}") from None
        bad = first_nonfinite_model_weight(model)
        if bad is not None:
            raise CheckpointError(f"{path} holds a model whose {bad[0]} {bad[1]!r} has {bad[2]} values")
        return model.to(device).eval(), None
    try:  # checked here, not before the load: a cache that is only read still serves the loads above
        probe_atomic_write(path)
    except OSError as error:
        raise ValueError(f"checkpoint path {str(path)!r}: its folder takes no new file ({error})") from None
    stats = train(model, data, config, device=device, progress=progress, owner=owner, role=role)
    check_converged(owner, role, config, model)  # never cached: every later run would load the diverged model
    try:
        save_checkpoint(path, model, metadata)
    except OSError as error:  # a disk that filled during the training: the trained model is still good
        warnings.warn(f"{owner}: the trained model could not be saved to {str(path)!r} ({error}); it is returned "
                      "all the same, and the next run trains again", RuntimeWarning, stacklevel=2)
    return model, stats

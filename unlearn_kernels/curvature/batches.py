"""The data an operator reads: :class:`BatchSource` (re-iterable batches on one device, checked and
watched for changes) and :class:`RowMean` (the mean over batches weighted by their rows)."""
from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from ..checks import check_int, check_tensor, first_nonfinite_row
from ..labeled import LabeledData
from ..ops import weights_fingerprint
from .params import WeightsKey, host_values, same_weights, version_counter

Batch = tuple[torch.Tensor, torch.Tensor]
DataSpec = LabeledData | tuple[torch.Tensor, torch.Tensor] | Iterable[Batch]
"""What ``data`` arguments accept: a LabeledData, an (x, y) pair of tensors, or a re-iterable of
(x, y) batches (a list, a DataLoader with a fixed order)."""


class RowMean:
    """The mean over all rows of per-batch means, each weighted by its rows (a plain-mean loss's
    value, gradient or products over the batches). Summed in float32 at least: in float16 the sum of
    rows x batch means overflows to Inf (a row count above 65,504 is no float16 factor at all) and in
    bfloat16 it loses accuracy with every batch; :meth:`result` rounds to the batches' dtype. A single
    batch's mean is returned as it is (no scaling by its rows and back)."""

    def __init__(self) -> None:
        self._total: torch.Tensor | None = None
        self._count = 0
        self._summed = False  # whether _total holds the sum (else the mean) of what was added

    def add(self, mean: torch.Tensor, rows: int, *, owned: bool = False) -> None:
        """Add a batch's mean over its ``rows`` rows. ``mean`` is not written unless ``owned`` (the
        caller gives it up: it may become the running total, saving a copy)."""
        wide = mean.float() if mean.dtype in (torch.float16, torch.bfloat16) else mean
        self._dtype = mean.dtype
        if self._total is None:
            self._total = wide if owned or wide is not mean else wide.clone()
        else:
            if not self._summed:
                self._total.mul_(self._count)
                self._summed = True
            self._total.add_(wide, alpha=rows)
        self._count += rows

    @property
    def rows(self) -> int:
        """The rows added so far."""
        return self._count

    def result(self) -> torch.Tensor:
        """The mean over every row added, in the batches' dtype (ValueError if none was)."""
        if self._total is None:
            raise ValueError("data is empty: it yields no batches")
        if self._summed:
            self._total.div_(self._count)
            self._summed = False
        return self._total.to(self._dtype)


#: the integer type of each element size: the data's change key sums the values' bits in it
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor's values' bits as integers of their own width (views: no copy); a complex tensor or one of
    another element size as it is."""
    bits = []
    for t in tensors:
        kind = _BITS.get(t.element_size())
        bits.append(t if kind is None or t.is_complex() else t.view(kind))
    return bits


def _bit_sums(tensors: list[torch.Tensor]) -> list[int | float]:
    """Per tensor the sum of its values' bits (:func:`_bits`), wrapping: a change detector made without a wider
    copy of the data, which would cost as much as a product; any single change shows (a float sum of digits'
    80,000 inputs, 4.1e7, rounded a +1 away)."""
    return host_values([b.sum() if b.is_floating_point() or b.is_complex() else b.sum(dtype=b.dtype)
                        for b in _bits(tensors)], torch.int64)


def _fingerprints(tensors: list[torch.Tensor]) -> list[tuple[int | float, float]]:
    """Per tensor its bit sum (:func:`_bit_sums`) and the position checksum of its bits
    (:func:`~unlearn_kernels.ops.weights_fingerprint`: weights fixed per position, so values that only moved,
    a batch flipped at random, which keep every sum, change it): a second pass over the data."""
    return [(total, checksum) for total, (_, checksum) in zip(_bit_sums(tensors), weights_fingerprint(_bits(tensors)))]


class BatchSource:
    """Re-iterable (x, y) batches on one device, from any :data:`DataSpec`.

    Each iteration is one pass over the data. Tensor data (LabeledData or a pair) is one batch, or
    chunks of ``batch_size`` rows when given (chunk to bound memory; the operator is the same for a
    loss that is a plain mean over rows, see the module docstring).
    Batches from an iterable are moved to ``device``; their dtypes are left as they are.

    NaN or Inf in the inputs or (floating-point) targets is a ValueError naming the row: tensor data
    is checked in full here, batches from an iterable as each pass reads them (before they are moved
    to ``device``), so a bad later batch fails the product or gradient that meets it.

    A batch with no rows is skipped (its weight n_b / N is 0; its mean loss would be 0/0). After
    :meth:`watch_layouts`, a batch whose layout (the inputs' and targets' shapes past the rows, and
    their dtypes) is new is first checked by the owner's probe, once per layout, so that data the
    model or the loss cannot take (a wrong input width or dtype) is a ValueError naming the batch and
    the first batch's layout, not a raw torch error; batches of a known layout cost a tuple compare.
    """

    def __init__(self, data: DataSpec, device: torch.device, batch_size: int | None = None) -> None:
        if batch_size is not None:
            batch_size = check_int("batch_size", batch_size)
        self.device = device
        # the probe as a zero-argument callable returning it: a weak reference to an operator's bound method,
        # which held the operator in a cycle (op.data -> op), so that a dropped operator kept its cache
        # until the cyclic collector ran
        self._probe: Callable[[], Callable[[torch.Tensor, torch.Tensor], None] | None] = lambda: None
        self._layouts: set[tuple] = set()  # the layouts the probe accepted
        self._first_layout = ""
        self._copies = False  # give copies of the batches: the model writes its inputs (run_watching)
        self._pass_keys: list[tuple] | None = None  # the first complete pass's batch keys (iterable data)
        if isinstance(data, LabeledData):
            data = (data.x, data.y)
        if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
            x, y = self._check_batch(data)
            bad = _first_nonfinite(x, y)
            if bad is not None:
                raise ValueError(f"the data's {bad[0]} contain NaN or Inf (first at row {bad[1]})")
            self._checked = True  # every chunk is finite: no per-pass checks
            # the chunks are views of the caller's tensors, and the caches hold what was computed from them
            self._watch(lambda: {"inputs x": x, "targets y": y})
            step = batch_size or max(x.shape[0], 1)
            self._batches: Iterable[Any] = [(x[i:i + step], y[i:i + step]) for i in range(0, x.shape[0], step)]
            self._whole: Iterable[Any] = [(x, y)]
        elif isinstance(data, (torch.Tensor, str, bytes)) or not isinstance(data, Iterable):
            raise TypeError(
                "data must be a LabeledData, an (x, y) tuple of tensors, or a re-iterable of (x, y) batches "
                f"(a list or DataLoader), got {type(data).__name__}"
            )
        elif iter(data) is data:
            raise TypeError("data is a one-shot iterator (e.g. a generator); pass a list or a DataLoader")
        else:
            if batch_size is not None:
                raise ValueError("batch_size applies to tensor data only; a DataLoader sets its own batch size")
            if isinstance(data, DataLoader):
                _check_nothing_dropped(data)
            self._checked = False
            self._batches = self._whole = data
            # a DataLoader's (or another iterable's) batches are new every pass: each pass's are compared with
            # the first complete pass's (a list's are watched as the caller's tensors below)
            self._pass_keys = None if isinstance(data, (list, tuple)) else []
            # the caller's tensors behind the batches, read again at each check (a list's batches and a
            # TensorDataset's tensors can be replaced or added): a list or tuple of tensor batches, or the
            # tensors of a DataLoader's TensorDataset (its batches are new tensors every pass, the caches are
            # not). Not those behind a Subset: summing a large base tensor at every product to watch a few of
            # its rows cost 14 times the product; the batches streamed on each pass are compared instead.
            if isinstance(data, DataLoader) and isinstance(data.dataset, TensorDataset):
                dataset = data.dataset
                self._watch(lambda: {f"the DataLoader's dataset tensor {i}": t for i, t in enumerate(dataset.tensors)})
            elif isinstance(data, (list, tuple)):
                # the list's own iteration, not a subclass's (one that counts its passes counted the checks)
                items = list.__iter__ if isinstance(data, list) else tuple.__iter__
                self._watch(lambda: {f"batch {i}'s {role}": t for i, batch in enumerate(items(data))
                                     if isinstance(batch, (tuple, list))
                                     for role, t in zip(("inputs x", "targets y"), batch) if isinstance(t, torch.Tensor)})
            else:
                self._watch(dict)

    @staticmethod
    def _check_batch(batch: Any) -> Batch:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2
                and all(isinstance(t, torch.Tensor) for t in batch)):
            parts = list(batch[:3]) if isinstance(batch, (tuple, list)) else [batch]
            hint = (" (torch.as_tensor converts numpy arrays)"
                    if any(type(part).__module__ == "numpy" for part in parts) else "")
            raise TypeError(f"each batch must be an (x, y) pair of tensors, got {type(batch).__name__}{hint}")
        x, y = batch
        check_tensor("a batch's inputs x", x)  # sparse: "reshape is not implemented for sparse tensors" later
        check_tensor("a batch's targets y", y)
        if x.dim() == 0 or y.dim() == 0:  # one sample at a time (a DataLoader with batch_size=None)
            raise ValueError(f"a batch has {x.dim()}-d inputs x and {y.dim()}-d targets y: batches have the rows "
                             "along their first dimension (is it a DataLoader with batch_size=None, giving "
                             "unbatched samples?)")
        if x.is_meta or y.is_meta:  # shapes without values: torch would fail at the first value read
            raise ValueError("a batch is on the meta device (it has no values)")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"a batch has {x.shape[0]} inputs but {y.shape[0]} targets")
        return x, y

    def _watch(self, tensors: Callable[[], dict[str, torch.Tensor]]) -> None:
        """Watch the caller's tensors that ``tensors()`` names (read again at every check)."""
        self._watched = tensors
        self._key = self._data_key()

    def _data_key(self) -> tuple[tuple[str, ...], WeightsKey]:
        """The watched tensors' names, and per tensor its version counter, data pointer and the integer sum
        of its values' bits (:func:`_bit_sums`: a write through ``.data`` or numpy bumps no version counter),
        one pass over the data before every product (~15 us on digits' 1,797 x 64 inputs). Not the position
        checksum the passes over batches compare (:meth:`_same_as_first_pass`): a second pass, ~45 us more there,
        3-6% of a digits-MLP product, for writes that only move values in place through ``.data`` or numpy (two
        columns swapped), which go unseen: build a new operator after such a write."""
        tensors = self._watched()
        # a sparse or meta tensor has no values to sum: the batch check refuses it when a pass reads it
        dense = [t if t.layout == torch.strided and not t.is_meta else torch.zeros(0) for t in tensors.values()]
        return tuple(tensors), tuple((version_counter(t), t.data_ptr(), total)
                                     for t, total in zip(dense, _bit_sums(dense)))

    def run_watching(self, probe: Callable[[torch.Tensor, torch.Tensor], Any], x: torch.Tensor,
                     y: torch.Tensor) -> None:
        """``probe(x, y)`` (a construction probe: the model on the first batch) on copies of the batch;
        if it wrote them (a model whose first module works in place, ``ReLU(inplace=True)``), every
        pass would write its inputs: from now on each pass gives copies of the batches, so that the
        passes never write the caller's data (which stays watched) and the write of one chunk does
        not invalidate the cached gradient graph of another (chunks of a tensor share its version
        counter: torch's autograd would refuse the next cached product)."""
        x, y = x.clone(), y.clone()
        probe(x, y)
        if version_counter(x) or version_counter(y):
            self._copies = True

    @property
    def copies(self) -> bool:
        """Whether the passes give copies of the batches (the model writes its inputs)."""
        return self._copies

    def is_callers(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is memory that exists anyway: it shares its storage with the caller's watched
        data (a chunk of it), or it is a slice of a larger storage (the rows ``X[i:j]`` that a re-iterable or a
        Dataset yields of a tensor it holds, which one batch's count would charge whole, once per batch).
        A DataLoader's collated batch, a copy or a batch moved to another device has a storage of its own,
        held only by what keeps it."""
        storage = tensor.untyped_storage()
        if storage.nbytes() > tensor.numel() * tensor.element_size():
            return True
        ptr = storage.data_ptr()
        return any(t.layout == torch.strided and t.untyped_storage().data_ptr() == ptr
                   for t in self._watched().values())

    def check_unchanged(self, owner: str) -> None:
        """ValueError if tensor data was written in place, or replaced, since this source was made
        (:meth:`_data_key`; one pass over the data for the sums, small beside a product over it): the
        chunks are views of the caller's tensors, and what an operator cached or checked (activations,
        gradient graphs, finiteness) is of the data it was given. A cached fused product then mixed old
        activations with new inputs (wrong for both), a generic one failed inside torch's autograd, an
        uncached one read NaN written there unchecked; a batch added to a list went unread once every
        batch was cached."""
        names, key = self._data_key()
        if names != self._key[0]:
            raise ValueError(f"{owner}: the data's batches were replaced, added or removed after it was built: build "
                             "a new one on the data as it is now")
        for name, now, was in zip(names, key, self._key[1]):
            if not same_weights((now,), (was,)):
                how = "replaced" if now[1] != was[1] else "written in place"
                raise ValueError(f"{owner}: the data ({name}) was {how} after it was built: build a new one on the "
                                 "changed data (or pass a copy of the data)")

    def watch_layouts(self, first: Batch, probe: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
        """From now on run ``probe(x, y)`` on the first batch of each new layout (see the class
        docstring); ``first`` is the batch it accepted already. A ValueError it raises is raised
        again naming the batch."""
        x, y = first
        self._probe = weakref.WeakMethod(probe) if inspect.ismethod(probe) else lambda: probe
        self._layouts = {_layout(x, y)}
        self._first_layout = (f"inputs x of shape {tuple(x.shape)}, {x.dtype} and targets y of shape "
                              f"{tuple(y.shape)}, {y.dtype}")

    def __iter__(self) -> Iterator[Batch]:
        return self._iterate(self._batches)

    @property
    def tensor_data(self) -> bool:
        """Whether the data is one (x, y) pair of tensors (chunked by ``batch_size``), not an iterable of batches."""
        return self._whole is not self._batches

    def whole(self) -> Iterator[Batch]:
        """Tensor data in one batch, whatever ``batch_size`` (for a pass that bounds its own memory); an
        iterable's batches as they come. The same checks as iterating."""
        return self._iterate(self._whole)

    def _iterate(self, batches: Iterable[Any]) -> Iterator[Batch]:
        keys: list[tuple] = []
        for index, batch in enumerate(batches):
            x, y = self._check_batch(batch)
            # derivatives are taken in the parameters only: inputs that require grad attached some paths'
            # products and gradients to the caller's graph, and held products kept each batch's activations
            x, y = x.detach(), y.detach()
            if self._pass_keys is not None:
                keys.append(self._same_as_first_pass(index, x, y))
            if x.shape[0] == 0:
                continue
            # an iterable's batches can only be checked as they stream (else NaN products, silently)
            bad = None if self._checked else _first_nonfinite(x, y)
            if bad is not None:
                raise ValueError(f"batch {index} of the data: its {bad[0]} contain NaN or Inf "
                                 f"(first at row {bad[1]}, counted within the batch)")
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self._copies:
                x, y = x.clone(), y.clone()
            probe = self._probe()
            if probe is not None and _layout(x, y) not in self._layouts:
                try:
                    probe(x, y)
                except ValueError as err:
                    raise ValueError(f"batch {index} of the data: {err} (the first batch has {self._first_layout})"
                                     ) from err
                self._layouts.add(_layout(x, y))
            yield x, y
        if self._pass_keys is not None:
            if not self._pass_keys:
                self._pass_keys = keys
            elif len(keys) != len(self._pass_keys):
                raise different_passes(f"{len(keys)} batches where the first pass had {len(self._pass_keys)}")

    def _same_as_first_pass(self, index: int, x: torch.Tensor, y: torch.Tensor) -> tuple:
        """Batch ``index``'s key (shapes, dtypes, bit sums and checksums: :func:`_fingerprints`), checked
        against the first complete pass's.

        The construction probes compare the first batch of two passes; a random transform or sampler that
        changes only later batches (data sorted by class, augmented in some) made a Hessian that was a
        different matrix at every product over streamed batches, and an Objective whose value moved at
        fixed weights."""
        (x_sum, x_checksum), (y_sum, y_checksum) = _fingerprints([x, y])  # a random flip keeps the sums
        key = (tuple(x.shape), x.dtype, tuple(y.shape), y.dtype, x_sum, x_checksum, y_sum, y_checksum)
        first = self._pass_keys
        if first and (index >= len(first) or first[index] != key):
            raise different_passes(f"batch {index} differs")
        return key


def different_passes(what: str) -> ValueError:
    """The error for data whose passes differ (``what``: where)."""
    return ValueError(f"the data yields different batches on two passes ({what}: a DataLoader with shuffle=True, a "
                      "random sampler or a random transform, or data written since the first pass): every pass must "
                      "see the same batches; use a fixed order, e.g. LabeledData.loader(batch_size, shuffle=False), "
                      "and build a new operator on changed data")


def _check_nothing_dropped(loader: DataLoader) -> None:
    """ValueError where ``loader`` drops samples on a pass (drop_last, from a batch sampler too), or may and
    cannot tell how many (a sampler or an IterableDataset without a length)."""
    batch_sampler = loader.batch_sampler  # the DataLoader's (from batch_size) or the caller's; None: unbatched
    size = getattr(batch_sampler, "batch_size", None)
    if not getattr(batch_sampler, "drop_last", False) or not size:
        return
    iterable = isinstance(loader.dataset, IterableDataset)
    if iterable and loader.num_workers > 1:  # each worker batches (and drops) its own share
        raise ValueError(f"the DataLoader has drop_last=True over an IterableDataset read by {loader.num_workers} "
                         "workers, each of which drops its own remainder: use drop_last=False so the operator "
                         "covers all the data")
    try:  # the rows a pass draws: an IterableDataset's, else its sampler's (a sampler may draw a subset)
        rows = len(loader.dataset if iterable else batch_sampler.sampler)  # type: ignore[arg-type,union-attr]
    except (TypeError, NotImplementedError, AttributeError):  # no length, or a batch sampler without a sampler
        raise ValueError("the DataLoader has drop_last=True over data of unknown length, so it may drop samples on "
                         "every pass: use drop_last=False so the operator covers all the data") from None
    if rows % size:
        raise ValueError(f"the DataLoader has drop_last=True and drops {rows % size} samples on every pass "
                         "(different ones if it shuffles): use drop_last=False so the operator covers all the data")


def _layout(x: torch.Tensor, y: torch.Tensor) -> tuple:
    """What must agree between batches for a model to run on them all: shapes past the rows, dtypes."""
    return x.shape[1:], x.dtype, y.shape[1:], y.dtype


def _first_nonfinite(x: torch.Tensor, y: torch.Tensor) -> tuple[str, int] | None:
    """("inputs x" or "targets y", row) of the first NaN or Inf in a batch, or None."""
    for what, t in (("inputs x", x), ("targets y", y)):
        row = first_nonfinite_row(t)
        if row is not None:
            return what, row
    return None

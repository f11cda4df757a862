"""Forget protocols: invariants (disjoint, covering, stratified, sequential shrinking), the mislabeled
protocol (seeded, stratified, every corrupted label wrong, D_f with the corrupted labels) and rejections."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unlearn_kernels.data import (
    ForgetRequest,
    LabeledData,
    class_forget,
    index_forget,
    make_request,
    mislabel,
    random_forget,
    remove_classes,
    sequential_class_forget,
    sequential_forget,
    split_forget,
)

label_lists = st.lists(st.integers(0, 4), min_size=4, max_size=80)


def _check_request(request: ForgetRequest, universe: torch.Tensor) -> None:
    """Sorted unique int64 indices, disjoint, and together exactly ``universe``."""
    for idx in (request.forget_idx, request.retain_idx):
        assert idx.dtype == torch.int64 and idx.dim() == 1 and len(idx) > 0
        assert bool((idx[1:] > idx[:-1]).all())
    assert not set(request.forget_idx.tolist()) & set(request.retain_idx.tolist())
    assert sorted(request.forget_idx.tolist() + request.retain_idx.tolist()) == universe.tolist()


def _check_stratified(labels: torch.Tensor, pool: torch.Tensor, forget: torch.Tensor) -> None:
    """Every class of the pool gives within one sample of its share of ``forget``."""
    for c in labels[pool].unique().tolist():
        share = len(forget) * int((labels[pool] == c).sum()) / len(pool)
        assert abs(int((labels[forget] == c).sum()) - share) < 1, c


@settings(max_examples=60, deadline=None)
@given(labels=label_lists, fraction=st.floats(0.01, 0.99), seed=st.integers(0, 2**31), stratified=st.booleans())
def test_random_forget_invariants(labels: list[int], fraction: float, seed: int, stratified: bool) -> None:
    y = torch.tensor(labels)
    count = round(fraction * len(y))
    if count in (0, len(y)):
        with pytest.raises(ValueError, match="forgets"):
            random_forget(y, fraction, seed, stratified)
        return
    request = random_forget(y, fraction, seed, stratified)
    _check_request(request, torch.arange(len(y)))
    assert len(request.forget_idx) == count
    if stratified:
        _check_stratified(y, torch.arange(len(y)), request.forget_idx)
    again = random_forget(labels, fraction, seed, stratified)  # a plain list works too, and seeds reproduce
    assert torch.equal(again.forget_idx, request.forget_idx)


def test_random_forget_hand_counted_shares() -> None:
    # classes of 5, 3 and 2 rows; forgetting 5 rows: quotas 2.5, 1.5, 1.0
    y = torch.tensor([0] * 5 + [1] * 3 + [2] * 2)
    seen = set()
    for seed in range(40):
        counts = torch.bincount(y[random_forget(y, 0.5, seed).forget_idx], minlength=3).tolist()
        seen.add(tuple(counts))
    assert seen == {(3, 1, 1), (2, 2, 1)}  # ties broken both ways, never anything else
    assert random_forget(y, 0.5, 0).description == "random 0.5 of train (stratified, seed 0)"
    different = {tuple(random_forget(y, 0.5, s, stratified=False).forget_idx.tolist()) for s in range(5)}
    assert len(different) > 1


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, 0.01, 0.97])
def test_random_forget_rejects_bad_fractions(fraction: float) -> None:
    with pytest.raises(ValueError, match="fraction"):
        random_forget(torch.arange(10) % 2, fraction, 0)  # 0.01 forgets no sample, 0.97 all 10


@settings(max_examples=40, deadline=None)
@given(labels=label_lists, data=st.data())
def test_class_forget_takes_exactly_the_classes(labels: list[int], data: st.DataObject) -> None:
    y = torch.tensor(labels)
    present = sorted(set(labels))
    classes = data.draw(st.lists(st.sampled_from(present), min_size=1, max_size=len(present), unique=True))
    if set(classes) == set(present):
        with pytest.raises(ValueError, match="no sample to retain"):
            class_forget(y, classes)
        return
    request = class_forget(y, classes)
    _check_request(request, torch.arange(len(y)))
    assert request.forget_idx.tolist() == [i for i, c in enumerate(labels) if c in classes]


def test_class_forget_accepts_one_class_and_rejects_bad_ones() -> None:
    y = torch.tensor([0, 1, 2, 1, 0, 2, 2])
    assert class_forget(y, 2).forget_idx.tolist() == [2, 5, 6]
    assert class_forget(y, {0, 1}).forget_idx.tolist() == [0, 1, 3, 4]
    with pytest.raises(ValueError, match=r"\[7\] do not occur"):
        class_forget(y, [1, 7])
    with pytest.raises(ValueError, match="no class"):
        class_forget(y, [])
    with pytest.raises(TypeError, match="integers"):
        class_forget(y, 1.5)
    # a nested one was flattened ([[1, 2]] as [1, 2]), where sequential_class_forget refuses it
    for nested in (torch.tensor([[1, 2]]), np.array([[1], [2]])):
        data = LabeledData(torch.zeros(7, 2), y)
        for call in (lambda: class_forget(y, nested), lambda: remove_classes(data, nested)):
            with pytest.raises(TypeError, match=r"^classes must be a class id or a flat sequence of them, got shape "):
                call()


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(0, 3), min_size=10, max_size=80),
    num_requests=st.integers(1, 4),
    fraction=st.floats(0.02, 0.2),
    seed=st.integers(0, 1000),
    stratified=st.booleans(),
)
def test_sequential_forget_disjoint_and_shrinking(labels, num_requests, fraction, seed, stratified) -> None:
    y = torch.tensor(labels)
    count = round(fraction * len(y))
    if count == 0:
        with pytest.raises(ValueError, match="forgets no sample"):
            sequential_forget(y, num_requests, fraction, seed, stratified)
        return
    requests = sequential_forget(y, num_requests, fraction, seed, stratified)
    assert len(requests) == num_requests
    remaining = torch.arange(len(y))
    forgotten: set[int] = set()
    for k, request in enumerate(requests):
        _check_request(request, remaining)  # forget_k and retain_k split what earlier requests left
        assert len(request.forget_idx) == count
        assert not forgotten & set(request.forget_idx.tolist())
        if stratified:
            _check_stratified(y, remaining, request.forget_idx)
        forgotten |= set(request.forget_idx.tolist())
        remaining = request.retain_idx
        assert len(remaining) == len(y) - (k + 1) * count
        assert request.description.startswith(f"request {k + 1}/{num_requests}")
    first = random_forget(y, fraction, seed, stratified)
    assert torch.equal(first.forget_idx, requests[0].forget_idx)


def test_sequential_forget_rejects_too_many_requests() -> None:
    y = torch.arange(20) % 2
    with pytest.raises(ValueError, match="would forget 20 samples, which leaves none of the 20 to retain"):
        sequential_forget(y, 5, 0.2, 0)  # 5 x 4 = 20
    with pytest.raises(ValueError, match="would forget 80 samples, which leaves none of the 20"):
        sequential_forget(y, 20, 0.2, 0)  # far beyond: the count, not "all 20"
    with pytest.raises(ValueError, match="num_requests"):
        sequential_forget(y, 0, 0.1, 0)
    with pytest.raises(ValueError, match="num_requests must be an int >= 1, got True"):
        sequential_forget(y, True, 0.1, 0)
    assert len(sequential_forget(y, np.int64(2), 0.1, 0)) == 2  # numpy integers are integers


def test_index_forget_and_its_rejections() -> None:
    request = index_forget(6, [4, 1])
    assert request.forget_idx.tolist() == [1, 4] and request.retain_idx.tolist() == [0, 2, 3, 5]
    with pytest.raises(ValueError, match=r"duplicate indices: \[1\]"):
        index_forget(6, [1, 3, 1])
    with pytest.raises(ValueError, match="out of range"):
        index_forget(6, [0, 6])
    with pytest.raises(ValueError, match="out of range"):
        index_forget(6, [-1])
    with pytest.raises(ValueError, match="empty"):
        index_forget(6, [])
    with pytest.raises(ValueError, match="nothing would be retained"):
        index_forget(3, [0, 1, 2])
    with pytest.raises(TypeError, match="integer"):
        index_forget(6, [0.0, 1.0])
    with pytest.raises(TypeError, match="integer"):
        index_forget(3, torch.tensor([True, False, False]))
    with pytest.raises(ValueError, match="num_samples"):
        index_forget(1, [0])


def test_make_request_validates_user_sets() -> None:
    request = make_request(torch.tensor([5, 2]), [0, 3], num_samples=8)  # need not cover all 8
    assert request.forget_idx.tolist() == [2, 5] and request.retain_idx.tolist() == [0, 3]
    with pytest.raises(ValueError, match=r"overlap in 1 indices, e.g. \[3\]"):
        make_request([1, 3], [3, 4], 8)
    with pytest.raises(ValueError, match="retain_idx is empty"):
        make_request([1], [], 8)
    with pytest.raises(ValueError, match="forget_idx has duplicate"):
        make_request([1, 1], [2], 8)
    with pytest.raises(ValueError, match="retain_idx has indices out of range"):
        make_request([1], [8], 8)


def test_forget_request_checks_its_own_invariants() -> None:
    with pytest.raises(ValueError, match="sorted"):
        ForgetRequest(torch.tensor([3, 1]), torch.tensor([2]))
    with pytest.raises(TypeError, match="int64"):
        ForgetRequest(torch.tensor([1], dtype=torch.int32), torch.tensor([2]))
    with pytest.raises(ValueError, match="overlap"):
        ForgetRequest(torch.tensor([1, 2]), torch.tensor([2, 3]))
    # torch's "Tensor.item() cannot be called on meta tensors" named no argument
    with pytest.raises(ValueError, match=r"^ForgetRequest: forget_idx is on the meta device"):
        ForgetRequest(torch.tensor([1, 2], device="meta"), torch.tensor([3]))


def test_apply_returns_the_rows(rng: torch.Generator) -> None:
    train = LabeledData(torch.randn(10, 3, generator=rng), torch.arange(10) % 3)
    forget, retain = class_forget(train.y, 1).apply(train)
    assert torch.equal(forget.x, train.x[[1, 4, 7]]) and torch.equal(forget.y, torch.tensor([1, 1, 1]))
    assert torch.equal(retain.x, train.x[[0, 2, 3, 5, 6, 8, 9]])
    with pytest.raises(ValueError, match="out of range for a train split of 5"):
        index_forget(10, [7]).apply(train.subset(torch.arange(5)))


def test_remove_classes() -> None:
    test = LabeledData(torch.arange(8.0).unsqueeze(1), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    kept = remove_classes(test, [1, 2])
    assert kept.y.tolist() == [0, 0, 0] and kept.x.squeeze(1).tolist() == [0.0, 3.0, 6.0]
    assert remove_classes(test, 0).y.tolist() == [1, 2, 1, 2, 1]
    with pytest.raises(ValueError, match=r"\[5\] do not occur"):
        remove_classes(test, 5)
    with pytest.raises(ValueError, match="leaves no sample"):
        remove_classes(test, [0, 1, 2])


# --------------------------------------------------------------------------- the mislabeled protocol
@settings(max_examples=40, deadline=None)
@given(labels=st.lists(st.integers(0, 4), min_size=20, max_size=80), fraction=st.floats(0.05, 0.5),
       seed=st.integers(0, 2**31), num_classes=st.integers(5, 7))
def test_mislabel_changes_exactly_the_picked_labels(labels, fraction, seed, num_classes) -> None:
    y = torch.tensor(labels)
    corruption = mislabel(y, fraction, seed, num_classes=num_classes)
    rows = corruption.corrupted_idx
    assert len(rows) == round(fraction * len(y)) and bool((rows[1:] > rows[:-1]).all())
    _check_stratified(y, torch.arange(len(y)), rows)  # the same stratified pick as random_forget
    assert torch.equal(rows, random_forget(y, fraction, seed).forget_idx)
    assert bool((corruption.labels[rows] != y[rows]).all())  # every corrupted label is wrong ...
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[rows] = False
    assert torch.equal(corruption.labels[keep], y[keep])  # ... and no other label changed
    assert 0 <= int(corruption.labels.min()) and int(corruption.labels.max()) < num_classes
    again = mislabel(labels, fraction, seed, num_classes=num_classes)  # seeded: reproducible
    assert torch.equal(again.labels, corruption.labels)


def test_mislabel_draws_the_wrong_label_uniformly() -> None:
    y = torch.zeros(4000, dtype=torch.long)
    y[::2] = 1  # two classes present, four possible
    corruption = mislabel(y, 0.5, seed=3, num_classes=4)
    rows = corruption.corrupted_idx
    for true in (0, 1):
        new = corruption.labels[rows][y[rows] == true]
        counts = torch.bincount(new, minlength=4).tolist()
        assert counts[true] == 0
        # 1000 draws over 3 classes: each share within 5 standard deviations (~0.075) of 1/3
        assert all(abs(c / len(new) - 1 / 3) < 0.075 for i, c in enumerate(counts) if i != true), counts
    assert mislabel(y, 0.5, seed=4, num_classes=4).labels.tolist() != corruption.labels.tolist()


def test_mislabel_rejections() -> None:
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    with pytest.raises(ValueError, match="num_classes must be an int >= 2, got 1"):
        mislabel(torch.zeros(10, dtype=torch.long), 0.2, num_classes=1)
    with pytest.raises(ValueError, match="outside num_classes=2"):
        mislabel(y, 0.2, num_classes=2)
    with pytest.raises(ValueError, match="non-negative"):
        mislabel(torch.tensor([0, -1, 1, 0]), 0.5)
    with pytest.raises(ValueError, match="fraction"):
        mislabel(y, 0.0)


def test_corruption_apply_gives_the_original_the_wrong_labels(rng: torch.Generator) -> None:
    train = LabeledData(torch.randn(30, 2, generator=rng), torch.arange(30) % 3)
    corruption = mislabel(train.y, 0.2, seed=1)
    corrupted = corruption.apply(train)
    assert torch.equal(corrupted.x, train.x) and torch.equal(corrupted.y, corruption.labels)
    assert not torch.equal(corrupted.y, train.y)
    (request,) = split_forget(len(train), corruption.corrupted_idx)
    forget, retain = request.apply(corrupted)
    assert torch.equal(forget.y, corruption.labels[corruption.corrupted_idx])  # D_f: the corrupted labels
    assert bool((forget.y != train.y[corruption.corrupted_idx]).all())
    assert torch.equal(retain.y, train.y[request.retain_idx])  # D_r: every other row, labels untouched
    with pytest.raises(ValueError, match="not the ones this corruption was drawn from"):
        corruption.apply(LabeledData(train.x, (train.y + 1) % 3))
    with pytest.raises(ValueError, match="train split of 30 samples, got 10"):
        corruption.apply(train.subset(torch.arange(10)))


@settings(max_examples=40, deadline=None)
@given(forget=st.sets(st.integers(0, 49), min_size=1, max_size=40), num_requests=st.integers(1, 6),
       seed=st.integers(0, 1000))
def test_split_forget_parts_are_disjoint_and_cover_the_set(forget, num_requests, seed) -> None:
    if num_requests > len(forget):
        with pytest.raises(ValueError, match="non-empty requests"):
            split_forget(50, sorted(forget), num_requests, seed)
        return
    requests = split_forget(50, sorted(forget), num_requests, seed)
    assert len(requests) == num_requests
    parts = [set(r.forget_idx.tolist()) for r in requests]
    assert set().union(*parts) == forget and sum(map(len, parts)) == len(forget)  # disjoint, covering
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    forgotten: set[int] = set()
    for request, part in zip(requests, parts):
        forgotten |= part
        # the retain set: every row not forgotten so far, the parts still to come included
        assert set(request.retain_idx.tolist()) == set(range(50)) - forgotten
    assert [r.forget_idx.tolist() for r in split_forget(50, sorted(forget), num_requests, seed)] == \
        [r.forget_idx.tolist() for r in requests]


def test_split_forget_shuffles_with_its_seed() -> None:
    """The parts are a seeded shuffle of the rows, not runs of them in order (a split that ignored its seed
    passed every test: they checked disjointness and sizes)."""
    rows = list(range(0, 40, 2))
    splits = {tuple(tuple(r.forget_idx.tolist()) for r in split_forget(50, rows, 4, seed)) for seed in range(5)}
    assert len(splits) == 5
    assert tuple(tuple(rows[5 * k:5 * k + 5]) for k in range(4)) not in splits


def test_mislabel_picks_rows_across_classes_unless_stratified() -> None:
    """90 rows of class 0 and 10 of class 1, 20% corrupted: stratified, always 2 of class 1 (its share); not
    stratified, a plain random pick whose class-1 count varies with the seed (stratified=False once picked the
    stratified rows and only said otherwise)."""
    y = torch.tensor([0] * 90 + [1] * 10)
    counts = {flag: {int((y[mislabel(y, 0.2, seed, stratified=flag).corrupted_idx] == 1).sum()) for seed in range(20)}
              for flag in (True, False)}
    assert counts[True] == {2} and len(counts[False]) > 1


def test_split_forget_rejections() -> None:
    with pytest.raises(ValueError, match="nothing would be retained"):
        split_forget(3, [0, 1, 2])
    with pytest.raises(ValueError, match="num_requests"):
        split_forget(5, [0, 1], 0)
    with pytest.raises(ValueError, match="duplicate"):
        split_forget(5, [1, 1])


def test_sequential_class_forget_one_class_per_request() -> None:
    y = torch.tensor([0, 1, 2, 3, 1, 2, 3, 0])
    first, second = sequential_class_forget(y, [2, 0])
    assert first.forget_idx.tolist() == [2, 5] and first.retain_idx.tolist() == [0, 1, 3, 4, 6, 7]
    assert second.forget_idx.tolist() == [0, 7] and second.retain_idx.tolist() == [1, 3, 4, 6]
    assert second.description == "request 2/2: class 0"
    with pytest.raises(ValueError, match="distinct"):
        sequential_class_forget(y, [1, 1])
    with pytest.raises(ValueError, match=r"\[9\] do not occur"):
        sequential_class_forget(y, [1, 9])
    with pytest.raises(ValueError, match="no sample to retain"):
        sequential_class_forget(y, [0, 1, 2, 3])


SEEDED = {
    "random_forget": lambda y, seed: random_forget(y, 0.3, seed=seed).forget_idx,
    "sequential_forget": lambda y, seed: sequential_forget(y, 2, 0.2, seed=seed)[1].forget_idx,
    "mislabel": lambda y, seed: mislabel(y, 0.3, seed=seed).labels,
    "split_forget": lambda y, seed: split_forget(len(y), [0, 3, 5, 7], 2, seed=seed)[0].forget_idx,
}


@pytest.mark.parametrize("name", sorted(SEEDED))
def test_protocol_seeds_are_checked(name) -> None:
    y = torch.arange(30) % 3
    draw = SEEDED[name]
    assert torch.equal(draw(y, np.int64(3)), draw(y, 3))  # numpy integers are seeds too, the same ones
    with pytest.raises(TypeError, match="seed must be an int, got float"):
        draw(y, 0.5)
    for bad in (-1, 2**64):
        with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\)"):
            draw(y, bad)


def test_bad_labels_classes_and_flags() -> None:
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises(ValueError, match="labels must be non-negative class ids, got -1"):
        random_forget(torch.tensor([-1, 0, 1, 1, -1, 0]), 0.5)
    for fn in (random_forget, mislabel):
        with pytest.raises(TypeError, match="stratified must be a bool, got str"):
            fn(y, 0.5, stratified="no")
    with pytest.raises(TypeError, match="stratified must be a bool"):
        sequential_forget(y, 2, 0.2, stratified="no")
    for bad in ("3", None, ["3"], [None]):
        with pytest.raises(TypeError, match="classes must be integers"):
            class_forget(y, bad)
    with pytest.raises(TypeError, match="classes must be a sequence of class ids, one per request, got 3"):
        sequential_class_forget(y, 3)
    with pytest.raises(TypeError, match="classes must be integers"):
        sequential_class_forget(y, [1.5])
    assert [r.forget_idx.tolist() for r in sequential_class_forget(y, np.array([2, 0]))] == [[2, 5], [0, 3]]


def test_stratified_takes_a_numpy_bool() -> None:
    # the flag is checked as every other one (checks.check_bool): np.False_ was refused as "not a bool"
    y = torch.arange(20) % 4
    for fn in (random_forget, mislabel):
        assert fn(y, 0.2, stratified=np.False_).description == fn(y, 0.2, stratified=False).description
    assert sequential_forget(y, 2, 0.2, stratified=np.True_)[1].forget_idx.tolist() == \
        sequential_forget(y, 2, 0.2)[1].forget_idx.tolist()


@pytest.mark.parametrize("bad, found", [
    ("0101", "got '0101'"),  # was torch's "new(): invalid data type 'str'"
    ({0: 1}, "got {0: 1}"),  # was RuntimeError "Could not infer dtype of dict"
    (LabeledData(torch.zeros(4, 1), torch.tensor([0, 1, 0, 1])), "got LabeledData"),  # data, not data.y
], ids=["str", "dict", "labeled-data"])
def test_labels_that_are_no_integers_name_the_argument(bad, found: str) -> None:
    with pytest.raises(TypeError, match=f"labels must be integers, {found}"):
        random_forget(bad, 0.5)


def test_complex_and_uint64_labels() -> None:
    with pytest.raises(ValueError, match="labels must be a non-empty 1-D integer tensor, got torch.complex64"):
        random_forget(torch.tensor([0j, 1j, 0j, 1j]), 0.5)  # was NotImplementedError from torch's "<"
    y = np.array([0, 1, 0, 1, 2, 2])  # was NotImplementedError too: torch compares no uint64 tensor
    assert random_forget(y.astype(np.uint64), 0.5).forget_idx.tolist() == random_forget(y, 0.5).forget_idx.tolist()


def test_unsigned_labels_are_one_rule_for_the_protocols_and_the_metrics() -> None:
    """mislabel took uint32 labels while the metrics' check_labels refused them (TypeError), and the uint64
    wrap check was written twice: one rule now (checks.as_int64), labels of any integer dtype are the ids
    they hold, a uint64 value int64 cannot hold is refused by name, at both entry points."""
    from unlearn_kernels.eval import accuracy

    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    logits = torch.nn.functional.one_hot(y, 3).float()
    for dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64):
        assert mislabel(y.to(dtype), 0.5).labels.tolist() == mislabel(y, 0.5).labels.tolist()
        assert accuracy(logits, y.to(dtype)) == 1.0
    wrapped = torch.cat([y[:-1], torch.tensor([-1])]).view(torch.uint64)  # its last value is 2**64 - 1
    for call in (lambda: mislabel(wrapped, 0.5), lambda: accuracy(logits, wrapped)):
        with pytest.raises(ValueError, match=r"must lie in the int64 range, got 18446744073709551615$"):
            call()


def test_indices_beyond_int64_name_the_argument() -> None:
    with pytest.raises(ValueError, match=r"^indices must lie in the int64 range, got \[1180591620717411303424\]$"):
        split_forget(20, [2**70])  # was torch's "Overflow when unpacking long long", then "must be integers"


def test_sequential_class_forget_refuses_nested_classes() -> None:
    with pytest.raises(TypeError, match=r"classes must be a flat sequence of class ids, one per request, got shape "
                                        r"\(1, 2\)"):
        sequential_class_forget(torch.arange(8) % 4, [[1, 2]])  # was int()'s "argument must be ... not 'list'"


def test_mislabel_of_a_single_class_says_no_different_label_exists() -> None:
    # was "num_classes must be an int >= 2, got 1", of an argument the caller never passed
    with pytest.raises(ValueError, match=r"^the labels hold one class \(0\), so no different label exists to draw; if "
                                         r"the data has more classes, pass num_classes \(it defaults to max\(labels\) "
                                         r"\+ 1\)$"):
        mislabel(torch.zeros(10, dtype=torch.long), 0.2)
    # one class present but more declared: a different label exists
    corruption = mislabel(torch.zeros(10, dtype=torch.long), 0.2, num_classes=3)
    assert bool((corruption.labels[corruption.corrupted_idx] != 0).all())


@pytest.mark.parametrize("kind", [np.uint64, np.int64, np.uint32, np.int32, np.uint16, np.int16, np.uint8, np.int8])
def test_classes_of_every_numpy_integer_kind(kind) -> None:
    # np.uint64 was refused: "classes must be integers, got np.uint64(2) (an integer is required)"
    y = torch.tensor([0, 1, 2, 1, 0, 2, 2])
    assert class_forget(y, kind(2)).forget_idx.tolist() == [2, 5, 6]
    assert class_forget(y, [kind(2), 0]).forget_idx.tolist() == [0, 2, 4, 5, 6]
    assert class_forget(y, np.array([2], dtype=kind)).forget_idx.tolist() == [2, 5, 6]
    data = LabeledData(torch.arange(7.0).unsqueeze(1), y)
    assert remove_classes(data, kind(1)).y.tolist() == [0, 2, 0, 2, 2]
    requests = sequential_class_forget(y, [kind(2), kind(0)])
    assert [r.forget_idx.tolist() for r in requests] == [[2, 5, 6], [0, 4]]
    assert requests[1].description == "request 2/2: class 0"


@pytest.mark.parametrize("bad", [True, np.True_, 2.0, np.float64(2.0), [np.uint64(1), 2.5]],
                         ids=["bool", "numpy-bool", "float", "numpy-float", "uint64-and-float"])
def test_classes_that_are_bools_or_floats_are_still_refused(bad) -> None:
    with pytest.raises(TypeError, match="classes must be integers, got torch.(bool|float)"):
        class_forget(torch.tensor([0, 1, 2, 1, 0, 2, 2]), bad)


def test_numpy_uint64_indices_and_labels_in_lists() -> None:
    # the same conversion serves every argument: these were "... must be integers, ... (an integer is required)"
    assert index_forget(6, [np.uint64(4), np.uint64(1)]).forget_idx.tolist() == [1, 4]
    labels = [np.uint64(c) for c in (0, 1, 0, 1, 2, 2)]
    assert random_forget(labels, 0.5).forget_idx.tolist() == random_forget([0, 1, 0, 1, 2, 2], 0.5).forget_idx.tolist()
    with pytest.raises(ValueError, match=r"^classes must lie in the int64 range, got \[18446744073709551615\]$"):
        class_forget(torch.tensor([0, 1]), [np.uint64(2**64 - 1)])  # as the Python int: beyond int64


def test_uint64_values_beyond_int64_are_named_with_their_value() -> None:
    """They wrapped at the int64 cast: "labels must be non-negative class ids, got -9223372036854775803",
    "class(es) [-9223372036854775808] do not occur"; a 0-d array of classes failed in numpy."""
    y = torch.tensor([0, 1, 2, 1, 0, 2, 2])
    with pytest.raises(ValueError, match=r"^labels must lie in the int64 range, got 9223372036854775813$"):
        random_forget(np.array([0, 1, 2**63 + 5], dtype=np.uint64), 0.5)
    with pytest.raises(ValueError, match=r"^classes must lie in the int64 range, got 9223372036854775811$"):
        class_forget(y, torch.tensor([2**63 + 3], dtype=torch.uint64))
    assert class_forget(y, np.array(2)).forget_idx.tolist() == [2, 5, 6]

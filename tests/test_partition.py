"""Aux + client parts: disjoint, covering the (capped) training split, fixed by the seed."""

from __future__ import annotations

import pytest

from fedcollm.data.partition import split_indices
from fedcollm.data.records import MCQRecord
from fedcollm.errors import FedCoLLMError

RECORDS = [MCQRecord(str(i), f"q{i}", ("a", "b", "c", "d"), i % 4) for i in range(103)]


def _all_parts(split):
    return [split.aux, *split.clients]


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_disjoint_and_covering(scheme):
    split = split_indices(RECORDS, 4, scheme, alpha=0.5, seed=3)
    parts = _all_parts(split)
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)), "an example is in two parts"
    assert set(flat) == set(range(len(RECORDS)))
    assert all(len(p) > 0 for p in parts)


def test_iid_parts_are_equal_sized():
    sizes = [len(p) for p in _all_parts(split_indices(RECORDS, 4, "iid", seed=0))]
    assert max(sizes) - min(sizes) <= 1 and len(sizes) == 5


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_same_seed_same_split_other_seed_other_split(scheme):
    a = split_indices(RECORDS, 4, scheme, seed=7)
    assert a == split_indices(RECORDS, 4, scheme, seed=7)
    assert a != split_indices(RECORDS, 4, scheme, seed=8)


def test_cap_takes_a_subset():
    split = split_indices(RECORDS, 4, "iid", seed=0, max_examples=50)
    assert sum(len(p) for p in _all_parts(split)) == 50


def test_too_few_examples_is_a_clear_error():
    with pytest.raises(FedCoLLMError, match="too few"):
        split_indices(RECORDS[:5], 4, "iid")


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.2, 0.4])
def test_aux_fraction_sizes_the_auxiliary_part_and_the_clients_share_the_rest_equally(fraction):
    records = [MCQRecord(str(i), f"q{i}", ("a", "b"), i % 2) for i in range(1000)]
    split = split_indices(records, 4, "iid", seed=1, aux_fraction=fraction)
    assert len(split.aux) == round(fraction * 1000)
    sizes = [len(c) for c in split.clients]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 1000 - len(split.aux)
    flat = [i for p in _all_parts(split) for i in p]
    assert sorted(flat) == list(range(1000))

"""The private ops of the paged store's Triton lowering, in eager (their lowerings are checked by
``tests/test_store_triton.py`` through Inductor's Triton backend): ``kvpass::_last_writer_slots`` (the plan) and
``kvpass::_searchsorted_inline`` (the row search), on fresh random inputs against plain Python definitions."""

from __future__ import annotations

import pytest
import torch

from kvpass.ops._inline_search import searchsorted_inline
from kvpass.ops._last_writer import last_writer_slots


def _last_writer_loop(slots):
    """The definition: each element's slot if no later element targets it, else -1 (and -1 for skipped)."""
    s = slots.tolist()
    return torch.tensor([x if x >= 0 and x not in s[e + 1:] else -1 for e, x in enumerate(s)], dtype=slots.dtype)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_last_writer_slots_keeps_the_last_writer_of_each_slot(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 80, (1,), generator=g))
    slots = torch.randint(-3, max(2, n // 2), (n,), generator=g).to(dtype)  # duplicates and skipped (< 0)
    slots = torch.where(slots < 0, -1, slots)
    got = last_writer_slots(slots)
    assert got.dtype == dtype
    assert torch.equal(got, _last_writer_loop(slots))
    kept = got[got >= 0]
    assert kept.unique().numel() == kept.numel(), "the winners' slots must be unique"


@pytest.mark.parametrize("right", [True, False])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_searchsorted_inline_is_searchsorted(right, dtype):
    g = torch.Generator().manual_seed(3)
    seq = torch.randint(0, 40, (9,), generator=g).sort().values.to(dtype)  # repeated entries included
    values = torch.arange(-2, 45, dtype=dtype)
    got = searchsorted_inline(seq, values, right=right)
    assert got.dtype == dtype
    assert torch.equal(got.long(), torch.searchsorted(seq.long(), values.long(), right=right))

"""Layers that store with the same addressing in one compiled graph share one plan (``kvpass/ops/_plan_sharing.py``),
and a write to the addressing between two stores (in place, through a view, through the base) ends the sharing:
compiled results equal eager on fresh random inputs, through Inductor and an eager inner (``aot_eager``)."""

from __future__ import annotations

import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import kvpass

H, D, BS = 4, 16, 8


def _decode_inputs(layers, seed, rows=6):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randint(0, 30, (rows,), generator=g, dtype=torch.int32)
    ctx[2] = -1  # a padding row
    width = 5
    nb = rows * width + 3
    table = torch.randperm(nb, generator=g)[: rows * width].reshape(rows, width).to(torch.int32)
    states = [torch.randn(rows, H, D, generator=g) for _ in range(2 * layers)]
    caches = [torch.randn(nb, H, BS, D, generator=g) for _ in range(2 * layers)]
    return table, ctx, states, caches


def _layers(states, caches, table, ctx):
    for i in range(0, len(states), 2):
        kvpass.store_paged_kv(states[i], states[i + 1], caches[i], caches[i + 1], table, None, ctx)


def _check(fn, args_of, backend, seed):
    table, ctx, states, caches = _decode_inputs(3, seed)
    eager = [c.clone() for c in caches]
    fn(states, eager, table.clone(), ctx.clone())
    comp = [c.clone() for c in caches]
    compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)
    if backend == "inductor":
        _, code = run_and_get_code(compiled, states, comp, table.clone(), ctx.clone())
    else:
        compiled(states, comp, table.clone(), ctx.clone())
        code = None
    for i, (e, c) in enumerate(zip(eager, comp)):
        assert torch.equal(e, c), f"cache {i}: compiled differs from eager in {int((e != c).sum())} elements"
    assert not all(torch.equal(e, c) for e, c in zip(eager, caches)), "nothing was written: vacuous"
    return code


def test_layers_with_one_addressing_share_one_plan():
    code = _check(lambda s, c, t, x: _layers(s, c, t, x), None, "inductor", seed=0)
    call = code[0][code[0].index("def call"):]
    assert len(re.findall(r"aten\.sort\.stable\(", call)) == 1, "the plan (one sort) should run once for 3 layers"


def _mutating(kind):
    def fn(states, caches, full_table, ctx):
        table = full_table[:, :4] if kind == "through the base" else full_table
        kvpass.store_paged_kv(states[0], states[1], caches[0], caches[1], table, None, ctx)
        if kind == "in place":
            table[0, 0] = table[1, 1]  # row 0 now writes into row 1's block too
            ctx.add_(1)
        elif kind == "through a view":
            table.view(-1).copy_(table.view(-1).flip(0))  # every block of the table moves
        elif kind == "through a view of ctx":
            view = ctx[1:]
            view.sub_(3).clamp_(min=-1)
        elif kind == "through the base":  # the addressing is a view of the written tensor
            full_table[0].copy_(full_table[3])
        kvpass.store_paged_kv(states[2], states[3], caches[2], caches[3], table, None, ctx)
        kvpass.store_paged_kv(states[4], states[5], caches[4], caches[5], table, None, ctx)
    return fn


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
@pytest.mark.parametrize("kind", ["in place", "through a view", "through a view of ctx", "through the base"])
def test_a_write_to_the_addressing_between_layers_is_seen(kind, backend):
    for seed in (1, 2):
        _check(_mutating(kind), None, backend, seed)


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_layers_with_other_addressing_tensors_of_the_same_shape_do_not_share(backend):
    def fn(states, caches, table, ctx):
        other_table, other_ctx = table.flip(0), (ctx + 3).clamp(max=39)  # same shapes and dtypes, other values
        kvpass.store_paged_kv(states[0], states[1], caches[0], caches[1], table, None, ctx)
        kvpass.store_paged_kv(states[2], states[3], caches[2], caches[3], other_table, None, ctx)
        kvpass.store_paged_kv(states[4], states[5], caches[4], caches[5], table, None, other_ctx)
    for seed in (3, 4):
        _check(fn, None, backend, seed)

"""Issue 12 item 13: a tensor-parallel shared-KV decoder with host caches (``torch.distributed``, gloo, CPU).

:class:`TPDecoder` splits the attention heads across ranks (Megatron style: ``q/k/v_proj`` by output rows, ``o_proj``
by input columns, an all-reduce of the partial outputs after the output projection). Every rank keeps its own
host cache (numpy buffers) for its own K/V heads, written and read the way a port would; layer 2 shares layer 0's
K/V (a read-only follower). With ``world == 1`` it is the single-process model, the oracle.

:func:`worker` is what each of the two processes runs (``torch.multiprocessing.spawn``): eager and
``kvpass.compile`` on the same fresh random inputs, then it saves what the test checks.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

HID, HEADS, D, MAX, VOCAB = 16, 4, 4, 16, 32
PREFILL, DECODE = 4, 6


class TPDecoder(nn.Module):
    """Three attention layers, the last one reusing layer 0's K/V; ``rank``'s share of the heads of each."""

    def __init__(self, rank=0, world=1, seed=0):
        super().__init__()
        self.world = world
        h = HEADS // world
        self.h = h
        rows = slice(rank * h * D, (rank + 1) * h * D)
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, HID)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(VOCAB, HID, generator=g))
        self.q, self.k, self.v, self.o = (nn.ParameterList() for _ in range(4))
        for _ in range(3):
            full = [torch.randn(HEADS * D, HID, generator=g) / math.sqrt(HID) for _ in range(3)]
            o = torch.randn(HID, HEADS * D, generator=g) / math.sqrt(HEADS * D)
            self.q.append(nn.Parameter(full[0][rows].clone()))
            self.k.append(nn.Parameter(full[1][rows].clone()))
            self.v.append(nn.Parameter(full[2][rows].clone()))
            self.o.append(nn.Parameter(o[:, rows].clone()))
        rng = np.random.default_rng(seed + rank + 1)
        self.k_buf = [rng.standard_normal((h, MAX, D)).astype(np.float32) for _ in range(2)]  # poisoned
        self.v_buf = [rng.standard_normal((h, MAX, D)).astype(np.float32) for _ in range(2)]
        self.pos = 0

    def forward(self, ids):
        x = self.embed(ids)
        t, p = x.shape[0], self.pos
        split = lambda y: y.view(t, self.h, D).transpose(0, 1)  # noqa: E731
        for i in range(3):
            q = split(F.linear(x, self.q[i]))
            if i < 2:  # owners: write the new K/V into this rank's host cache, read the history back
                k, v = split(F.linear(x, self.k[i])), split(F.linear(x, self.v[i]))
                self.k_buf[i][:, p : p + t] = k.detach().cpu().numpy()
                self.v_buf[i][:, p : p + t] = v.detach().cpu().numpy()
            j = 0 if i == 2 else i  # layer 2 reuses layer 0's K/V
            kh = torch.from_numpy(self.k_buf[j][:, : p + t]).to(x.device)
            vh = torch.from_numpy(self.v_buf[j][:, : p + t]).to(x.device)
            a = F.scaled_dot_product_attention(q, kh, vh)
            out = F.linear(a.transpose(0, 1).reshape(t, self.h * D), self.o[i])
            if self.world > 1:
                dist.all_reduce(out)
            x = x + out
        self.pos = p + t
        return x @ self.embed.weight.t()


def token_inputs(seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (PREFILL,), generator=g)] + [
        torch.randint(0, VOCAB, (1,), generator=g) for _ in range(DECODE)]


def run_steps(step, xs):
    with torch.no_grad():
        return [step(x).detach().clone() for x in xs]


def worker(rank, world, init_file, out_dir):
    """One rank: eager and ``kvpass.compile`` of its shard on the same inputs; saves outputs, graph counts, the
    collectives in the graphs handed to the inner compiler, the K/V-path checks and the report."""
    import copy
    import warnings

    import idioms_buffer as ib
    import kvpass
    from kvpass.testing import RecordingBackend

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        xs = token_inputs()
        eager = run_steps(TPDecoder(rank, world), xs)
        rec, reports, dynamo = RecordingBackend(), [], []
        kv = kvpass.backend(inner=rec, on_report=reports.append)

        def front(gm, example_inputs, **kw):
            dynamo.append(copy.deepcopy(gm))
            return kv(gm, example_inputs, **kw)

        torch._dynamo.reset()
        compiled = run_steps(kvpass.compile(TPDecoder(rank, world), backend=front), xs)
        collectives = [sum(1 for n in g.graph.nodes if "all_reduce" in str(n.target)) for g in rec.graphs]
        torch.save(dict(eager=eager, compiled=compiled, graphs=len(dynamo), collectives=collectives,
                        host=[len(ib.kv_host_ops(g)) for g in rec.graphs],
                        through=[len(ib.kv_through_buffer(g)) for g in rec.graphs],
                        matches=[m.source for r in reports for m in r.matches],
                        skips=[s.reason for r in reports for s in r.skips]), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()

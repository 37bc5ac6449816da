"""host_hop: K/V that leaves the device and comes back unchanged is the device tensor itself.

The idiom, as user code::

    k_back = torch.from_numpy(k.detach().cpu().numpy()).to(k.device)
    # also: torch.tensor(k.cpu().numpy()), torch.as_tensor(np.ascontiguousarray(...)), .clone(), .contiguous()

Graph before (Dynamo)::

    detach = .detach(k); cpu = .cpu(detach); view_as = .view_as(cpu, cpu)
    as_tensor = torch.as_tensor(view_as); to = .to(as_tensor, device)

Graph after::

    detach = .detach(k)                          # uses of `to` now use `detach`

Only whole round trips match (the chain leaves for the host and comes back as a tensor), plus a tensor rebuilt
with ``as_tensor``/``from_numpy``/``tensor`` from what already is a device tensor (left behind when
``host_padding`` moved a pad to the device). A host array produced by a numpy computation (``astype``, math) and
turned into a tensor is not a hop of K and is left alone.

At ATen level (exported or post-grad graphs) the same for ``aten._to_copy`` device hops, ``clone``, ``alias``,
``lift_fresh_copy``: ``_to_copy(_to_copy(k, device=cpu), device=cuda)`` becomes ``k``.

Why it is exact: every step copies values without changing dtype, and the chain ends on the device it started
from, so the result equals the source (detached when the chain detached it). Left unchanged, with the reason in
the report: a chain whose intermediate host array is mutated in place before the rebuild, a result that is then
mutated in place (in eager it was a fresh copy or an alias of the host array, not of ``k``), and a source that is
mutated in place later (a fresh copy would not see that).
"""

from __future__ import annotations

import torch
import torch.fx

from kvpass.pattern_api import (
    HOP_FUNCTIONS, Emit, Report, host_chain, is_numpy_wrapper, meta_value, mutates_in_place, mutation_between, _hop_input,
)

NAME = "host_hop"


class HostHop:
    """See the module docstring."""

    name = NAME

    def apply(self, gm: torch.fx.GraphModule, report: Report) -> int:
        graph = gm.graph
        order = {n: i for i, n in enumerate(graph.nodes)}
        count = 0
        for node in reversed(list(graph.nodes)):
            if node.graph is None or not node.users:
                continue
            if all(_hop_input(u) is node for u in node.users):
                continue  # not the end of a chain: its users continue the hop
            chain = host_chain(node)
            if chain is None:
                continue
            # a full round trip, or a tensor rebuilt from what already is a device tensor (as after host_padding)
            rebuilt = any(n.op == "call_function" and n.target in HOP_FUNCTIONS for n in chain.nodes)
            if not (chain.round_trip or (rebuilt and not is_numpy_wrapper(chain.source))):
                continue
            src_val, end_val = meta_value(chain.source), meta_value(node)
            if not isinstance(src_val, torch.Tensor) or not isinstance(end_val, torch.Tensor):
                continue
            if src_val.device != end_val.device or src_val.dtype != end_val.dtype or src_val.shape != end_val.shape:
                continue  # ends elsewhere (a real transfer) or changes the value
            why = None
            if mutation_between(chain) is not None:
                why = f"the host copy is mutated in place by {mutation_between(chain).name} before it comes back"
            elif any(mutates_in_place(u) and u.args[0] is node for u in node.users):
                why = "the rebuilt tensor is mutated in place"
            elif any(mutates_in_place(u) and u.args[0] is chain.source and order[u] > order[node]
                     for u in chain.source.users):
                why = "the source is mutated in place after the hop"
            if why:
                report.add_skip(NAME, node, why)
                continue
            new = chain.source
            if chain.detached:
                new = next((n for n in chain.nodes if n.args and n.args[0] is chain.source and (
                    (n.op == "call_method" and n.target == "detach") or n.target is torch.ops.aten.detach.default)),
                    None) or Emit(graph, node).detach(chain.source)
            node.replace_all_uses_with(new)
            report.add_match(NAME, chain.nodes, anchor=node, detail=f"{len(chain.nodes)} hop steps removed")
            count += 1
        return count


PATTERN = HostHop()

"""Dependence analysis over a :class:`~kvpass.fidelity.graph.Program`.

For every value the analysis computes two facts:

- ``tok``: the value depends on a token input (a ``USER_INPUT``; every placeholder of a plain GraphModule);
- ``srcs``: the set of sources (constants, buffers) whose *elements* the value carries, as a bitset.

Dependence follows every argument of every op (no list of "pass-through" ops), across higher-order-op bodies,
and through memory: an in-place write (``copy_``, ``index_put_``, setitem, any schema argument marked ``(a!)``)
into a view of a base makes every read of that base depend on what was written, whatever the order of the read
and the write in the graph (a fixpoint, conservative for order); so does a mutation recorded in the signature
(``buffers_to_mutate``).

One exception is what separates K/V data from the tables that transform it. In an op that *mixes* its inputs
arithmetically (elementwise arithmetic, matmul/linear/einsum contractions, norms, attention itself), an input
that does not depend on the tokens is a *coefficient* when another input does: a rotary table multiplied into
the computed K, a weight in a projection, a bias. Coefficients are not carried into the result's ``srcs``. When
no input of such an op depends on the tokens, the operands broadcast into the result (a smaller rotary table
multiplied into a baked K) are coefficients too, and the full-shape ones carry. Every other op (views, copies,
``cat``/``stack``, scatters and in-place writes, ``flip``, ``roll``, ``where``, any op unknown to kvpass) places
elements of its inputs in its result and carries all of them: an unknown op can only add findings, never hide
one. What an attention returns carries no source: sources are followed up to the attention that reads them.
Index-like arguments (``index``, ``indices``, ``mask``, ``condition``) add to ``tok`` but carry no elements.
"""

from __future__ import annotations

import dataclasses

from ..errors import KVPassError
from .graph import Graph, Node, Program

__all__ = ["Dataflow", "analyse", "MIXING_OPS", "INDEX_ARGS"]

#: ops whose result is an arithmetic mix of their inputs (a token-free input there is a coefficient)
MIXING_OPS = {
    "mul", "mul_", "div", "div_", "add", "add_", "sub", "sub_", "rsub", "true_divide", "floor_divide", "pow",
    "maximum", "minimum", "fmod", "remainder", "atan2", "addcmul", "addcdiv", "lerp", "hypot",
    "__mul__", "__rmul__", "__add__", "__radd__", "__sub__", "__rsub__", "__truediv__", "__rtruediv__",
    "__iadd__", "__imul__", "__matmul__", "multiply", "divide", "subtract",
    "matmul", "mm", "bmm", "baddbmm", "addmm", "addmv", "addbmm", "linear", "einsum", "_weight_int8pack_mm",
    "convolution", "conv1d", "conv2d", "layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm",
    "group_norm", "batch_norm", "scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_cudnn_attention", "flex_attention", "embedding",
}
#: argument names that select positions; they add token dependence but carry no elements
INDEX_ARGS = {"index", "indices", "mask", "condition", "cond", "offsets", "block_table", "cu_q_lens",
              "context_kv_lens", "chunk_metadata"}

_EMPTY = (False, 0)


@dataclasses.dataclass
class Dataflow:
    """The facts of :mod:`kvpass.fidelity.dataflow` for one program.

    ``value(node)`` is ``(tok, srcs)`` as seen by a reader of ``node`` (writes into its base included);
    ``bit[source]`` the bit of each source; ``written[root]`` the writes into each base, with their nodes.
    """

    program: Program
    state: dict
    extra: dict
    root: dict
    bit: dict
    writes: dict

    def value(self, node) -> tuple[bool, int]:
        """``(tok, srcs)`` of ``node`` for a reader, including every write into its base."""
        return _read(self.state, self.extra, self.root, node)

    def carries(self, node, source) -> bool:
        """Does ``node`` carry elements of ``source``?"""
        return bool(self.value(node)[1] & self.bit[source])

    def root_of(self, node) -> Node:
        """The base a view (or an in-place result) aliases."""
        return self.root.get(node, node)


def _read(state: dict, extra: dict, root: dict, node) -> tuple[bool, int]:
    """What a reader of ``node`` sees: its own facts and every write into its base."""
    if not isinstance(node, Node) or node.op == "subgraph":
        return _EMPTY
    s = state.get(node, _EMPTY)
    if isinstance(s, list):
        s = _union(s)
    e = extra.get(root.get(node, node), _EMPTY)
    return s[0] or e[0], s[1] | e[1]


def _union(states) -> tuple[bool, int]:
    tok, srcs = False, 0
    for s in states:
        if isinstance(s, list):
            s = _union(s)
        tok, srcs = tok or s[0], srcs | s[1]
    return tok, srcs


def _numel(shape) -> int | None:
    if shape is None:
        return None
    n = 1
    for s in shape:
        n *= s if isinstance(s, int) else 2
    return n


class _Run:
    def __init__(self, program: Program):
        self.p = program
        self.bit = {s: 1 << i for i, s in enumerate(program.sources)}
        self.state: dict = {}
        self.extra: dict = {}
        self.root: dict = {}
        self.writes: dict = {}
        self.tokens = set(program.tokens)
        self.by_node = {s.node: s for s in program.sources}
        self.cut: set = set()

    def val(self, node) -> tuple[bool, int]:
        return _read(self.state, self.extra, self.root, node)

    def add_extra(self, root: Node, v: tuple[bool, int], writer: Node) -> bool:
        old = self.extra.get(root, _EMPTY)
        new = (old[0] or v[0], old[1] | v[1])
        self.writes.setdefault(root, [])
        if writer not in self.writes[root]:
            self.writes[root].append(writer)
        if new != old:
            self.extra[root] = new
            return True
        return False

    def run(self, rounds: int = 64) -> None:
        for _ in range(rounds):  # monotone: each round can only add facts; real graphs settle in 2 or 3
            changed = self.graph(self.p.graph)
            for written, dest in self.p.mutations:
                changed |= self.add_extra(self.root.get(dest, dest), self.val(written), written)
            if not changed:
                return
        raise KVPassError(f"kvpass.check: the dependence analysis did not settle in {rounds} rounds (a chain of "
                          f"{rounds}+ in-place writes, each read before it is written); no verdict")

    def graph(self, g: Graph, bindings: list | None = None) -> bool:
        changed = False
        if bindings is not None:
            for ph, operand in zip(g.inputs, bindings):
                self.state[ph] = self.val(operand)
                if isinstance(operand, Node):
                    self.root[ph] = self.root.get(operand, operand)
        for n in g.nodes:
            if n.op == "placeholder":
                if bindings is not None and n in g.inputs:
                    continue
                bit = self.bit.get(self.by_node.get(n), 0)
                self.state[n] = (n in self.tokens, bit)
                continue
            changed |= self.call(n)
        return changed

    def call(self, n: Node) -> bool:
        changed = False
        if n.subgraphs:
            last = max(i for i, a in enumerate(n.args) if isinstance(a, Node) and a.op == "subgraph") \
                if any(isinstance(a, Node) and a.op == "subgraph" for a in n.args) else -1
            operands = [x for a in n.args[last + 1:] for x in (a if isinstance(a, (list, tuple)) else [a])]
            operands += [x for a in n.kwargs.values() for x in (a if isinstance(a, (list, tuple)) else [a])
                         if isinstance(x, Node)]
            outs: list = []
            for g in n.subgraphs:
                changed |= self.graph(g, operands)
                for i, o in enumerate(g.outputs):
                    while len(outs) <= i:
                        outs.append(_EMPTY)
                    v = self.val(o)
                    outs[i] = (outs[i][0] or v[0], outs[i][1] | v[1])
            own = self.combine(n)
            if n.opname == "flex_attention" or n in self.cut:
                self.state[n] = (own[0], 0)
            else:
                self.state[n] = [(o[0] or own[0], o[1]) for o in outs]
            return changed
        if n.opname == "getitem" and n.args and isinstance(n.args[0], Node) and \
                isinstance(self.state.get(n.args[0]), list):
            parts = self.state[n.args[0]]
            i = n.args[1] if len(n.args) > 1 else None
            self.state[n] = parts[i] if isinstance(i, int) and -len(parts) <= i < len(parts) else _union(parts)
            return changed
        v = self.combine(n)
        if n in self.cut:
            v = (v[0], 0)
        self.state[n] = v
        if (n.view or n.writes) and n.args and isinstance(n.args[0], Node):
            base = n.args[0]
            self.root[n] = self.root.get(base, base)
        for pos in n.writes:
            dest = n.args[pos] if pos < len(n.args) else None
            if isinstance(dest, Node):
                changed |= self.add_extra(self.root.get(dest, dest), v, n)
        return changed

    def combine(self, n: Node) -> tuple[bool, int]:
        data, tok = [], False
        for _, name, a in n.tensor_args():
            if a.op == "subgraph":
                continue
            v = self.val(a)
            tok = tok or v[0]
            if name not in INDEX_ARGS:
                data.append((a, v))
        if n.opname not in MIXING_OPS or len(data) < 2:
            return tok, _union(v for _, v in data)[1]
        if tok:
            return True, _union(v for _, v in data if v[0])[1]
        full = [v for a, v in data if a.shape is not None and n.shape is not None
                and _numel(a.shape) == _numel(n.shape) and len(a.shape) == len(n.shape)]
        return False, _union(full or [v for _, v in data])[1]


def analyse(program: Program, attention_ops=()) -> Dataflow:
    """Run the dependence analysis (see the module docstring) to its fixpoint.

    ``attention_ops``: the attention nodes (SDPA-like ops, the two matmuls of ``softmax(Q @ K^T) @ V``); their
    results carry no source: sources are followed to the attention that reads them, and what an attention
    returns is a new activation, not K/V data (else every constant of layer 0 would reach every later layer).
    """
    run = _Run(program)
    run.cut = set(attention_ops)
    run.run()
    return Dataflow(program, run.state, run.extra, run.root, run.bit, run.writes)

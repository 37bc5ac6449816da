"""kvpass's one IR: the functionalized ATen graph.

Every rewrite runs on the form Inductor's post-grad passes and ``torch.export`` already see:

- every op is an ATen ``OpOverload`` (or a ``SymInt`` function such as ``operator.add`` / ``torch.sym_max``);
- every value is SSA: a write into a tensor is a functional ``slice_scatter`` / ``select_scatter`` /
  ``index_put`` / ``copy`` that returns the new value, every view is an explicit op;
- a graph input that the program mutates (a host cache buffer) is written once, at the end, by a
  ``copy_(input, new_value)`` epilogue.

In that form aliasing and mutation are facts of the graph (``kvpass.aliasing``), not something each rule
re-derives. A torch-level graph (Dynamo, ``symbolic_trace``) reaches it through AOTAutograd with
``keep_inference_input_mutations=True`` (:func:`functionalize`), exactly what ``backend="inductor"`` does
before its post-grad passes. What functionalization cannot see, two graph inputs that are views of one numpy
pool, is handled at call time (:func:`kvpass.aliasing.overlapping_inputs`).
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from .errors import KVPassError

__all__ = ["is_aten_graph", "functionalize", "FunctionalizeError"]


class FunctionalizeError(KVPassError, ValueError):
    """A torch-level graph could not be brought to the functional ATen IR; the message says which input."""


_SYM_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod, operator.truediv,
                  operator.neg, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
                  operator.getitem, operator.pow, torch.sym_max, torch.sym_min, torch.sym_not, torch.sym_int,
                  torch.sym_float, torch.sym_sum}


def is_aten_graph(gm: torch.fx.GraphModule) -> bool:
    """True when every op of ``gm`` is an ATen op (or arithmetic on sizes): an exported, AOTAutograd or post-grad
    graph, rewritten as it is. A graph with ``call_method``/``call_module`` nodes or torch-level functions
    (Dynamo, ``symbolic_trace``) is not."""
    for node in gm.graph.nodes:
        if node.op in ("call_method", "call_module"):
            return False
        if node.op == "placeholder" and "val" not in node.meta:
            return False  # traced ATen graphs carry their values; a hand-made or symbolic_trace graph does not
        if node.op == "call_function" and not isinstance(node.target, (torch._ops.OpOverload,
                                                                        torch._ops.HigherOrderOperator)):
            if node.target not in _SYM_FUNCTIONS and not _is_sym_builtin(node.target):
                return False
            if node.target is not operator.getitem and isinstance(
                    node.meta.get("val", node.meta.get("example_value")), torch.Tensor):
                return False  # operator.add on tensors: torch level (getitem takes one output of a multi-output op)
    return True


def _is_sym_builtin(target) -> bool:
    mod = getattr(target, "__module__", "") or ""
    return mod.startswith("torch.fx.experimental.sym_node") or getattr(target, "__name__", "") in (
        "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "_assert_scalar", "sym_constrain_range")


def _placeholder_values(gm, example_inputs):
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    metas = [n.meta.get("example_value", n.meta.get("val")) for n in placeholders]
    if all(m is not None for m in metas):
        # Dynamo's own fake values: the same ShapeEnv, so symbolic positions stay symbolic.
        return metas
    if example_inputs is None:
        missing = next(n.name for n, m in zip(placeholders, metas) if m is None)
        raise FunctionalizeError(
            f"example_inputs: graph input {missing!r} has no traced value in node.meta; pass example_inputs "
            "(one per placeholder) to functionalize a torch-level graph")
    if len(example_inputs) != len(placeholders):
        raise FunctionalizeError(f"example_inputs: expected {len(placeholders)} values (one per placeholder), "
                                 f"got {len(example_inputs)}")
    return list(example_inputs)


def functionalize(gm: torch.fx.GraphModule, example_inputs=None) -> torch.fx.GraphModule:
    """The functionalized ATen graph of a torch-level ``gm`` (inference, ``copy_`` epilogue for mutated inputs).

    The result takes the same inputs as ``gm`` (its parameters stay attributes) and returns the same flat
    outputs. Input values come from ``node.meta`` (Dynamo graphs keep their fake values and symbolic sizes) or,
    where a placeholder has none, from ``example_inputs``; real ints there are specialized to their values.
    ``stack_trace`` metadata survives, so reports keep the user's source line.
    """
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    values = _placeholder_values(gm, example_inputs)
    params = dict(gm.named_parameters(remove_duplicate=False)) | dict(gm.named_buffers(remove_duplicate=False))
    captured: list[torch.fx.GraphModule] = []

    def forward_compiler(fw: torch.fx.GraphModule, _inputs):
        captured.append(fw)
        return make_boxed_func(fw.forward)

    with torch.no_grad():
        aot_module_simplified(_tuple_output(gm), values, fw_compiler=forward_compiler,
                              keep_inference_input_mutations=True)
    (fw,) = captured
    _restore_output_structure(fw, gm)
    if params:
        _bind_lifted_parameters(fw, gm, list(params))
    fw.meta["kvpass_functional"] = True
    return fw


def _tuple_output(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` returning a flat tuple (what AOTAutograd takes); ``gm`` itself when it already does."""
    import torch.utils._pytree as pytree

    out = next(n for n in gm.graph.nodes if n.op == "output")
    if isinstance(out.args[0], tuple):
        return gm
    graph = torch.fx.Graph()
    env = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            leaves, _ = pytree.tree_flatten(node.args[0])
            graph.output(tuple(env[x] if isinstance(x, torch.fx.Node) else x for x in leaves))
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    return torch.fx.GraphModule(gm, graph)


def _restore_output_structure(fw: torch.fx.GraphModule, gm: torch.fx.GraphModule) -> None:
    """Return what ``gm`` returns, in its structure: AOTAutograd's graph returns a flat tuple, with the bases of
    outputs that are views of intermediates appended (its runtime wrapper rebuilds the views; values are the
    same without it)."""
    import torch.utils._pytree as pytree

    (want,) = [n for n in gm.graph.nodes if n.op == "output"][0].args
    leaves, spec = pytree.tree_flatten(want)
    out_node = [n for n in fw.graph.nodes if n.op == "output"][0]
    have = list(out_node.args[0]) if isinstance(out_node.args[0], (tuple, list)) else [out_node.args[0]]
    tensor_leaves = [x for x in leaves if isinstance(x, torch.fx.Node)]
    if len(have) < len(tensor_leaves) or len(tensor_leaves) != len(leaves):
        return  # constants among the outputs: keep AOTAutograd's flat tuple
    out_node.args = (pytree.tree_unflatten(have[: len(leaves)], spec),)
    fw.graph.eliminate_dead_code()
    fw.recompile()


def _bind_lifted_parameters(fw: torch.fx.GraphModule, gm: torch.fx.GraphModule, names: list[str]) -> None:
    """AOTAutograd lifts ``gm``'s parameters and buffers to the first placeholders; put them back as attributes
    so that the ATen graph is called like ``gm``."""
    placeholders = [n for n in fw.graph.nodes if n.op == "placeholder"][: len(names)]
    for i, (node, name) in enumerate(zip(placeholders, names)):
        attr = f"_kvpass_param_{i}"
        fw.register_buffer(attr, gm.get_parameter(name) if name in dict(gm.named_parameters()) else gm.get_buffer(name))
        with fw.graph.inserting_before(node):
            get = fw.graph.get_attr(attr)
        get.meta = dict(node.meta)
        node.replace_all_uses_with(get)
        fw.graph.erase_node(node)
    fw.graph.lint()
    fw.recompile()

"""Check that each side condition of the rules (and each aliasing guard) is pinned by a test: remove the guard (one source edit), run the tests
that should catch it, expect a failure; restore the file. Not collected by pytest (it edits the sources).

    python tests/mutate_guards.py            # every guard; prints one line each and exits 1 if a removal went unnoticed
    python tests/mutate_guards.py NAME ...   # only these

Each entry: (name, file, the guard's source text, what it becomes without the guard, pytest node ids).
"""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
G = "tests/test_guards.py::"
S = "tests/test_store_ops.py::test_invalid_arguments_raise_and_write_nothing"
H = "tests/test_host_elimination.py::"
B = "tests/test_idioms_buffer.py::"
GH = "tests/test_guards_host.py::"
T = "tests/test_store_triton.py::test_triton_store_is_exact_and_at_most_two_kernels"

MUTATIONS = [
    ("scatter_slice: a read outside the write is the old buffer", "patterns/scatter_slice.py",
     "        if known_le(b, s) or known_le(e, a):", "        if True:",
     [G + "test_read_past_the_end_of_the_write_keeps_the_buffer_tail"]),
    ("scatter_slice: a read outside the write is the old buffer (history before the write)",
     "patterns/scatter_slice.py", "        if known_le(b, s) or known_le(e, a):", "        if True:",
     [B + "test_buffer_idiom_compiles_clean[06a_history_before_write]",
      B + "test_buffer_idiom_compiles_clean[06b_lagging_follower]"]),
    ("scatter_slice: a read inside the write ends inside it", "patterns/scatter_slice.py",
     "        if known_le(s, a) and known_le(b, e):", "        if known_le(s, a):",
     [G + "test_read_past_the_end_of_the_write_keeps_the_buffer_tail"]),
    ("scatter_slice: a read around the write covers it", "patterns/scatter_slice.py",
     "        if known_le(a, s) and known_le(e, b):", "        if True:",
     [G + "test_read_overlapping_the_write_partially_is_selected_by_position"]),
    ("scatter_slice: a select of the written index only", "patterns/scatter_slice.py",
     "                    if known_eq(i, j):", "                    if True:",
     [G + "test_one_position_write_then_a_read_of_another_position"]),
    ("scatter_slice: copy() is its source only without a dtype change", "patterns/scatter_slice.py",
     "        if not (isinstance(dst, torch.Tensor) and isinstance(src, torch.Tensor)) or dst.dtype != src.dtype \\",
     "        if not (isinstance(dst, torch.Tensor) and isinstance(src, torch.Tensor)) \\",
     [G + "test_dtype_change_through_the_buffer_is_not_history", G + "test_tensor_buffer_written_in_another_dtype"]),
    ("scatter_slice: only the program's state (cache buffers)", "patterns/scatter_slice.py",
     "            if src not in created and scatter_base(src) not in states:", "            if False:",
     [G + "test_scatter_into_an_intermediate_is_not_a_cache"]),
    ("pad_slice: no padding on another dim", "patterns/pad_slice.py",
     "    if any(row != (0, 0) for i, row in enumerate(rows) if i != d):", "    if False:",
     [G + "test_padding_on_another_dim_is_not_cancelled"]),
    ("pad_slice: the slice keeps no padding", "patterns/pad_slice.py",
     "    if not (known_le(before, a) and known_le(b, end)):", "    if False:",
     [G + "test_slice_that_keeps_padding_is_not_cancelled"]),
    ("host_elimination: only ops exact on every device move", "patterns/host_elimination.py",
     "    if packet.__name__ in _EXACT:", "    if True:",
     [H + "test_transcendental_on_the_host_stops_the_move"]),
    ("host_elimination: a dtype change on the way stays", "patterns/host_elimination.py",
     "                return (src if t[1] is None or t[1] == sv.dtype else _cast(em, src, t[1])), 1",
     "                return src, 1",
     [H + "test_dtype_change_on_the_way_is_kept"]),
    ("host_elimination: amax/amin move only over an abs", "patterns/host_elimination.py",
     "    return packet.__name__ in _EXACT_OF_ABS and of_abs", "    return packet.__name__ in _EXACT_OF_ABS",
     [H + "test_amax_of_a_signed_value_stays_on_the_host"]),
    ("view_fold: a reshape chain folds only back to a shape it had", "patterns/view_fold.py",
     "                if _same_shape(x, node):", "                if True:",
     [GH + "test_flat_buffer_viewed_in_another_shape_is_not_folded"]),
    ("view_fold: only the program's state (cache buffers)", "patterns/view_fold.py",
     "            if scatter_base(node.args[0]) not in states:", "            if False:",
     [GH + "test_reshapes_of_a_value_that_is_not_a_cache_are_left_alone"]),
    ("backend: inputs over one numpy pool run the traced graph", "kvpass/dynamo_backend.py",
     "        if pairs:", "        if False:",
     [G + "test_two_caches_on_one_numpy_pool_run_as_eager"]),
    ("verify: inputs that share memory are copied together", "kvpass/aliasing.py",
     "    for i, j in overlapping_inputs(inputs, external_only=True):", "    for i, j in []:",
     [G + "test_verify_copies_inputs_that_share_memory_together"]),
    ("rewrite: the returned module runs as traced on overlapping inputs", "kvpass/engine.py",
     "            if not pairs:", "            if True:",
     [G + "test_rewritten_graph_runs_as_traced_on_inputs_that_share_memory"]),
    ("rules: a read selected by position needs a non-empty write", "kvpass/rules.py",
     "    if not isinstance(vv, torch.Tensor) or not known_lt(s, e):", "    if not isinstance(vv, torch.Tensor):",
     [G + "test_a_write_that_may_be_empty_is_not_selected_by_position"]),
    # issue 12, part B (buffer-region idioms): tests in tests/test_idioms_buffer.py
    ("tracing: tensor writes at a symbolic int index stay symbolic", "kvpass/tracing.py",
     "        torch.Tensor.__setitem__ = traceable_tensor_setitem", "        pass",
     [B + "test_buffer_idiom_compiles_clean[04_per_token_loop]",
      B + "test_buffer_idiom_compiles_clean[04b_per_token_host_tensor]"]),
    ("tracing: slice(i, i + 1) only where 0 <= i < size", "kvpass/tracing.py",
     "        if isinstance(i, torch.SymInt) and not (guard_or_false(0 <= i) and guard_or_false(i < shape[d])):",
     "        if False:",
     [B + "test_symbolic_negative_index_write_keeps_numpy_meaning",
      B + "test_symbolic_negative_index_write_into_a_tensor_keeps_its_meaning"]),
    ("scatter_slice: a rolled write must not wrap around the end", "patterns/scatter_slice.py",
     "        if not (known_le(0, to) and known_le(end, n)):", "        if False:",
     [B + "test_roll_of_a_write_that_wraps_is_not_decomposed"]),
    ("aliasing: a grown buffer has a graph input among its pieces", "kvpass/aliasing.py",
     '            and any(isinstance(p, torch.fx.Node) and (p.op == "placeholder" or grown(p)) for p in node.args[0])',
     "            and True",
     [B + "test_a_concatenation_of_intermediates_is_not_a_cache"]),
    ("rules: pos % W is pos only where 0 <= pos < W", "kvpass/rules.py",
     "    subst = {m: m.args[0] for m in mods if proven(m.args[0] >= 0) and proven(m.args[0] < m.args[1])}",
     "    subst = {m: m.args[0] for m in mods}",
     [B + "test_ring_position_is_its_int_only_where_bounded"]),
    ("scatter_slice: a select of the written index only (slab regions)", "patterns/scatter_slice.py",
     "                    if known_eq(i, j):", "                    if True:",
     [B + "test_buffer_idiom_compiles_clean[05b_slab_tuple]"]),
    # a sample of the store ops' argument checks (each invalid-argument class has its own test)
    ("store: states/cache dtype", "kvpass/ops/_store.py", "        elif states.dtype != cache.dtype:",
     "        elif False:", [S + "[dtype_mismatch]"]),
    ("store: int32 index tensors", "kvpass/ops/_store.py", "        if t.dtype != dtype:", "        if False:",
     [S + "[block_table_int64]"]),
    ("store: block_table rows", "kvpass/ops/_store.py", "    if block_table.shape[0] != rows:", "    if False:",
     [S + "[block_table_rows]"]),
    ("store: K and V caches sharing memory", "kvpass/ops/_store.py", "        if _overlaps(cache, first_cache):",
     "        if False:", [S + "[value_cache_is_key_cache]"]),
    ("store: block ids and lengths in range", "kvpass/ops/_store.py", "    if bool(flags.any()):", "    if False:",
     [S + "[block_id_too_large]", S + "[cu_q_lens_decreasing]"]),
    # the store on the Triton path (slow: Inductor's Triton backend under Triton's interpreter; to run one case
    # only: KVPASS_TRITON_CASES='kv/slot_mapping/HND/fp32' python tests/mutate_guards.py triton)
    ("store (triton): skipped tokens write nothing", "kvpass/ops/_store.py",
     "    return valid & ~overwritten", "    return ~overwritten", [T + "[kv/slot_mapping/HND/fp32]"]),
    ("store (triton): the last writer of a slot wins", "kvpass/ops/_store.py",
     "& valid[None, :] & (e[None, :] > e[:, None])", "& valid[None, :] & (e[None, :] < e[:, None])",
     [T + "[kv/slot_mapping/HND/fp32]"]),
    ("store (triton): the scatter's store is masked", "kvpass/ops/_masked_store.py",
     "            return ops.masked(mask, body, 0)", "            return body()", [T + "[kv/slot_mapping/HND/fp32]"]),
]


def run(entry) -> bool:
    """Apply one mutation, run its tests, restore. True when the tests failed (the guard is pinned)."""
    name, path, old, new, tests = entry
    full = os.path.join(ROOT, path)
    with open(full) as f:
        source = f.read()
    if source.count(old) != 1:
        raise SystemExit(f"{name}: the guard's text is not found exactly once in {path}; update this script")
    try:
        with open(full, "w") as f:
            f.write(source.replace(old, new))
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                             cwd=ROOT, capture_output=True, text=True)
    finally:
        with open(full, "w") as f:
            f.write(source)
    return out.returncode != 0


def main(argv) -> int:
    selected = [m for m in MUTATIONS if not argv or any(a in m[0] for a in argv)]
    unnoticed = 0
    for entry in selected:
        caught = run(entry)
        unnoticed += not caught
        print(f"{'caught   ' if caught else 'UNNOTICED'} {entry[0]}", flush=True)
    print(f"{len(selected) - unnoticed}/{len(selected)} guard removals caught by their tests")
    return 1 if unnoticed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

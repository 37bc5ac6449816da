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
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
G = "tests/test_guards.py::"
S = "tests/test_store_ops.py::test_invalid_arguments_raise_and_write_nothing"
H = "tests/test_host_elimination.py::"
B = "tests/test_idioms_buffer.py::"
GH = "tests/test_guards_host.py::"
HD = "tests/test_idioms_hostdriven.py::"
SV = "tests/test_stored_values.py::"
T = "tests/test_store_triton.py::test_triton_store_is_exact_and_at_most_two_kernels"

XS = "tests/test_export_sliding.py::"

MUTATIONS = [
    ("deploy: sym_max/sym_min become an operand only where the order is proven", "kvpass/deploy.py",
     "    elif _known(b <= a):", "    elif True:",
     [XS + "test_sym_max_and_sym_min_of_proven_order_become_the_operand"]),
    ("export: guards on positions no graph input carries stay checked on the one position",
     "kvpass/faithful_export.py", "    known = set(symbols) | set(unfed)", "    known = set(symbols)",
     [XS + "test_a_counter_read_only_by_a_branch_is_a_position_and_its_guard_an_assert"]),
    ("export: with an int input per position, a guard on a position no input carries is refused",
     "kvpass/faithful_export.py", "            if unfed:\n", "            if False:\n",
     [XS + "test_a_guard_on_a_branch_only_counter_is_refused_where_no_input_can_carry_it"]),
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
    # a rewritten read sees what the buffer holds: its rounding, and later writes where the caller keeps a view
    ("rules: a narrow float read back from a buffer passes through its bits", "kvpass/rules.py",
     "    if not isinstance(v, torch.Tensor) or v.dtype not in _NARROW_FLOATS or _rounded_already(node, structure):",
     "    if True:",
     [SV + "test_narrow_buffer_stored_and_read_in_one_step",
      SV + "test_narrow_buffer_keeps_its_rounding[float16-float32-inductor]",
      SV + "test_narrow_buffer_keeps_its_rounding[bfloat16-float32-inductor]"]),
    ("rules: only a loaded or bit-cast value counts as rounded", "kvpass/rules.py",
     "    return node.target is aten.view.dtype or node.target in structure\n", "    return True\n",
     [SV + "test_narrow_buffer_keeps_its_rounding[bfloat16-float32-inductor]"]),
    ("scatter_slice: a read returned as a view of the buffer stays a read", "patterns/scatter_slice.py",
     "            if any(u in returned for u in node.users):", "            if False:",
     [SV + "test_history_returned_as_views_shows_a_later_write[eager]",
      "tests/test_unit_rules.py::test_scatter_slice_returned_views_are_left"]),
    ("scatter_slice: a select of the written index only (slab regions)", "patterns/scatter_slice.py",
     "                    if known_eq(i, j):", "                    if True:",
     [B + "test_buffer_idiom_compiles_clean[05b_slab_tuple]"]),
    # growing and evicting host caches (tests/test_idioms_growing.py)
    ("backend: overlapping inputs fall back only where one may be written", "kvpass/dynamo_backend.py",
     "                 if watched[i] in written or watched[j] in written]", "                 if False]",
     [G + "test_two_caches_on_one_numpy_pool_run_as_eager"]),
    ("aliasing: a value computed from an input reaching a side effect writes it", "kvpass/aliasing.py",
     "            written |= derived", "            pass",
     [G + "test_two_caches_on_one_numpy_pool_run_as_eager"]),
    ("tracing: a created host cache's token dims are dynamic", "kvpass/tracing.py",
     "                        _tell_dynamic(forward.__code__, source, shape, dims)", "                        pass",
     ["tests/test_idioms_growing.py::test_created_cache_compiles_to_its_graph_budget"]),
    ("tracing: ndarray.copy() is C-contiguous, as numpy's", "kvpass/tracing.py",
     "        nd.copy = traceable_ndarray_copy", "        pass",
     ["tests/test_idioms_growing.py::test_created_cache_compiles_to_its_graph_budget[created_numpy_copy_first]"]),
    ("tracing: a view that appeared gets dynamic strides", "kvpass/tracing.py",
     "                        _tell_dynamic(forward.__code__, source, shape, set(), strides=True)", "                        pass",
     ["tests/test_idioms_growing.py::test_a_view_of_a_created_cache_kept_for_the_next_step_takes_no_extra_graph"]),
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
    # issue 23 (items 2, 3, 5): tests in tests/test_idioms_hostdriven.py
    ("tracing: .item() of a float or bool tensor keeps its graph break", "kvpass/tracing.py",
     "    if dtype is not None and (dtype.is_floating_point or dtype.is_complex or dtype is torch.bool):",
     "    if False:",
     [HD + "test_float_item_keeps_its_graph_break"]),
    ("tracing: astype(copy=False) is the array itself only at its own dtype", "kvpass/tracing.py",
     "            if same:\n                return self", "            if True:\n                return self",
     [HD + "test_astype_copy_false_is_the_array_or_a_cast"]),
    ("tracing: astype at the array's own dtype copies", "kvpass/tracing.py",
     "            return type(self)(self.tensor.clone())", "            pass",
     [HD + "test_astype_at_the_same_dtype_is_a_copy"]),
    ("aliasing: a write reads an overlapping source first (numpy's meaning)", "kvpass/aliasing.py",
     "                return x.clone()\n", "                return x\n",
     [HD + "test_shifted_window_is_exact_both_directions[5g_shift_views_right]"]),
    ("tracing: a list written at the same places every step is not a row list", "kvpass/tracing.py",
     "    if _flagged(held) or symbolic or floats or (earlier and not seen <= earlier):",
     "    if _flagged(held) or symbolic or floats or earlier:",
     [HD + "test_list_of_layer_caches_replaced_each_step_still_compiles"]),
    ("tracing: a row list found at a new length runs eagerly", "kvpass/tracing.py",
     "    if _flagged(held) or symbolic or floats or (earlier and not seen <= earlier):",
     "    if _flagged(held) or symbolic or floats:",
     [HD + "test_list_rows_run_eagerly_and_say_so_in_one_line[3f_list_rows_append]"]),
    ("tracing: only a float tolist of a row runs eagerly", "kvpass/tracing.py",
     "    if dtype is not None and (dtype.is_floating_point or dtype.is_complex) and ndim != 0:",
     "    if True:",
     [HD + "test_host_driven_idiom_compiles_to_two_graphs[3c_tolist_positions]"]),
    ("tracing: only an array over immutable memory runs eagerly", "kvpass/tracing.py",
     "    if _cannot_be_made_writeable(value):", "    if True:",
     [HD + "test_host_driven_idiom_compiles_to_two_graphs[2a_np_dtype_cast]"]),
    ("aliasing: a reordered buffer is a gather of a graph input", "kvpass/aliasing.py",
     '            and root.args[0].op == "placeholder"}', "            }",
     [HD + "test_a_gather_of_an_intermediate_is_not_a_cache"]),
    ("scatter_slice: only index writes at read-back positions are reported", "patterns/scatter_slice.py",
     "            if is_read and _at_read_back_position(src) and scatter_base(src) in states:  # not decomposed",
     "            if is_read and getattr(src, 'target', None) is aten.index_put.default and scatter_base(src) in states:",
     [HD + "test_index_tensor_write_into_a_cache_is_not_reported"]),
    # the store on the Triton path (slow: Inductor's Triton backend under Triton's interpreter; to run one case
    # only: KVPASS_TRITON_CASES='kv/slot_mapping/HND/fp32' python tests/mutate_guards.py triton)
    ("store (triton): skipped tokens write nothing", "kvpass/ops/_store.py",
     "_last_writer.last_writer_slots(torch.where(valid, blk * bs + off, -1))",
     "_last_writer.last_writer_slots(blk * bs + off)",
     [T + "[kv/slot_mapping/HND/fp32]"]),
    ("store (triton): elements that lost their slot write nothing", "kvpass/ops/_store.py",
     "    write = winner >= 0\n", "    write = winner >= -1\n", [T + "[kv/slot_mapping/HND/fp32]"]),
    ("store (triton): the last writer of a slot wins", "kvpass/ops/_last_writer.py",
     "            after = ops.gt(", "            after = ops.lt(", [T + "[kv/slot_mapping/HND/fp32]"]),
    ("store (triton): the inline row search counts the row ends <= the token", "kvpass/ops/_inline_search.py",
     "index_dtype, right)", "index_dtype, not right)", [T + "[kv/block_table+cu_q_lens/HND/fp32]"]),
    ("store: the last writer's eager definition", "kvpass/ops/_last_writer.py",
     "& (e[None, :] > e[:, None])", "& (e[None, :] < e[:, None])",
     ["tests/test_store_plan_ops.py::test_last_writer_slots_keeps_the_last_writer_of_each_slot"]),
    ("store: a shared plan needs its addressing unchanged", "kvpass/ops/_plan_sharing.py",
     "        if (old_geometry == geometry and old_states == states and tracer_ref() is tracer",
     "        if (old_geometry == geometry and tracer_ref() is tracer",
     ["tests/test_store_plan_sharing.py::test_a_write_to_the_addressing_between_layers_is_seen"]),
    ("store: a shared plan needs the same addressing tensors", "kvpass/ops/_plan_sharing.py",
     "                and all((r is None and t is None) or (r is not None and r() is t) for r, t in zip(refs, addressing))):",
     "                ):",
     ["tests/test_store_plan_sharing.py::test_layers_with_other_addressing_tensors_of_the_same_shape_do_not_share"]),
    ("store: a chunk element lies in its chunk", "kvpass/ops/_store.py",
     "valid = ((j >= 0) & (j < ln) & ", "valid = ((j >= 0) & ", ["tests/test_store_ops.py::test_chunks_reading_arbitrary_tokens"]),
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
        # a cache of its own: what Inductor compiles from the mutated source must not be served to a later run
        # (a stale compile of a mutant was seen served from the shared cache after the source was restored)
        with tempfile.TemporaryDirectory(prefix="kvpass-mutant-") as cache:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
            out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                                 cwd=ROOT, capture_output=True, text=True, env=env)
    finally:
        with open(full, "w") as f:
            f.write(source)
    if out.returncode not in (0, 1):  # 2 interrupted, 4 usage (a test id that does not exist), 5 no tests
        raise SystemExit(f"{name}: pytest exited {out.returncode}, not a test failure:\n{out.stdout[-2000:]}")
    return out.returncode == 1


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

"""Check that each guard of the catalogue is pinned by a test: remove the guard (one source edit), run the tests
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
R = "tests/test_rewrite_api.py::"

MUTATIONS = [
    ("buffer_history: aliasing read used after a later write", "patterns/buffer_history.py",
     "        elif writes.alias_used_after_next_write(read, end):", "        elif False:",
     [G + "test_history_that_aliases_the_buffer_and_is_used_after_a_later_write"]),
    ("buffer_history: mutation through a view", "patterns/buffer_history.py",
     "        for buf in mutated_buffers(node, last_write):", "        for buf in ():",
     [G + "test_buffer_mutated_through_a_view_between_write_and_read"]),
    ("engine: augmented assignment is a side effect", "kvpass/engine.py",
     '"setitem", "__setitem__", "wrapped___setitem__", "delitem", "__delitem__") or name in IN_PLACE_OPS',
     '"setitem", "__setitem__", "wrapped___setitem__", "delitem", "__delitem__")',
     [G + "test_buffer_mutated_through_a_view_between_write_and_read"]),
    ("buffer_history: dtype change through the buffer", "patterns/buffer_history.py",
     "        if v_val.dtype != buf_val.dtype or end_val.dtype != buf_val.dtype:", "        if False:",
     [G + "test_dtype_change_through_the_buffer_is_not_history"]),
    ("buffer_history: read result mutated in place", "patterns/buffer_history.py",
     "        elif any(mutates_in_place(u) for n in _chain(read.node, end) for u in n.users):", "        elif False:",
     [G + "test_history_mutated_in_place_writes_the_buffer"]),
    ("shared_read: another row of the buffer", "patterns/shared_read.py",
     "        if first.kind != second.kind or set(first.select) != set(second.select) or any(",
     "        if first.kind != second.kind and any(",
     [G + "test_two_rows_of_one_buffer_are_not_the_same_read"]),
    ("host_concat: concatenated array mutated", "patterns/host_concat.py",
     "            if writer is not None:", "            if False:",
     [G + "test_concatenated_history_mutated_before_the_rebuild"]),
    ("host_concat: rebuilt tensor mutated", "patterns/host_concat.py",
     "            if any(mutates_in_place(u) and u.args and u.args[0] is h for h in hops for u in h.users):",
     "            if False:",
     [G + "test_tensor_rebuilt_from_concatenated_history_mutated_in_place"]),
    ("host_padding: zero buffer written twice", "patterns/host_padding.py",
     "        if any(mutates_in_place(u) and u.args and u.args[0] is zeros for u in users[1:]):", "        if False:",
     [G + "test_zero_buffer_written_twice_is_not_a_pad"]),
    ("host_hop: host copy mutated before it comes back", "patterns/host_hop.py",
     "            if mutation_between(chain) is not None:", "            if False:",
     [R + "test_unsafe_hops_are_left_unchanged[mutated_between]", R + "test_mutation_between_hop_and_rebuild_is_reported"]),
    ("host_hop: rebuilt tensor mutated", "patterns/host_hop.py",
     "            elif any(mutates_in_place(u) and u.args[0] is node for u in node.users):", "            elif False:",
     [R + "test_rebuilt_tensor_mutated_in_place_is_not_rewritten"]),
    ("hop: a dtype change is not a hop", "kvpass/pattern_api.py",
     "                _dtype_of(node) is not None and _dtype_of(src) is not None and _dtype_of(node) != _dtype_of(src):",
     "                False:",
     [G + "test_dtype_round_trip_through_the_host_is_not_a_hop"]),
    # a sample of the store ops' argument checks (each invalid-argument class has its own test)
    ("store: states/cache dtype", "kvpass/ops/_store.py", "        if states.dtype != cache.dtype:",
     "        if False:", [S + "[dtype_mismatch]"]),
    ("store: int32 index tensors", "kvpass/ops/_store.py", "        if t.dtype != torch.int32:", "        if False:",
     [S + "[block_table_int64]"]),
    ("store: block_table rows", "kvpass/ops/_store.py", "    if block_table.shape[0] != rows:", "    if False:",
     [S + "[block_table_rows]"]),
    ("store: K and V caches sharing memory", "kvpass/ops/_store.py", "        if _overlaps(cache, first_cache):",
     "        if False:", [S + "[value_cache_is_key_cache]"]),
    ("store: block ids and lengths in range", "kvpass/ops/_store.py", "    if bool(flags.any()):", "    if False:",
     [S + "[block_id_too_large]", S + "[cu_q_lens_decreasing]"]),
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

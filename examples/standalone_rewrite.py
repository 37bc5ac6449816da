"""``kvpass.rewrite`` on its own: capture a graph with Dynamo, rewrite it, print the report and the diff.

    python examples/standalone_rewrite.py

The cache here is the simplest port idiom: a numpy host buffer written with ``.cpu().numpy()`` and read back
with ``torch.from_numpy(...)``. ``kvpass.rewrite`` functionalizes the Dynamo graph (ATen ops, the cache write
as ``slice_scatter`` + a ``copy_`` epilogue), then rewrites; ``verify=True`` runs the graph before and after and
raises if they differ. The diff compares like for like: the functional graph before and after the rules. It ends
with ``PASS: ...`` (exit 0) or ``FAIL: ...`` (exit 1).
"""

import argparse
import copy
import sys

import numpy as np
import torch

import kvpass
from kvpass.testing import capture_graphs
from kvpass.tracing import tracing_context


class HostKVCache:
    """A preallocated host buffer ``[heads, max_len, head_dim]`` and a position."""

    def __init__(self, heads=2, max_len=32, head_dim=8):
        self.k = np.zeros((heads, max_len, head_dim), dtype=np.float32)
        self.pos = 0

    def update(self, k):
        t = k.shape[1]
        self.k[:, self.pos : self.pos + t] = k.detach().cpu().numpy()
        self.pos += t
        return torch.from_numpy(self.k[:, : self.pos]).to(k.device)


def attend(cache, q, k):
    """Scores of ``q`` against the whole K history."""
    return torch.softmax(q @ cache.update(k).transpose(-1, -2), dim=-1)


def main(argv=None) -> int:
    """Capture, rewrite with ``verify=True``, print the report and the diff; ``PASS`` (0) or ``FAIL: ...`` (1)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0].strip("`"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the random q and k (default 0)")
    args = parser.parse_args(argv)
    g = torch.Generator().manual_seed(args.seed)
    q, k = torch.randn(2, 4, 8, generator=g), torch.randn(2, 4, 8, generator=g)
    with tracing_context(), torch.no_grad():
        _, graphs = capture_graphs(attend, HostKVCache(), q, k, transform=lambda gm: gm)
    before = graphs[0].before
    after, report = kvpass.rewrite(copy.deepcopy(before), example_inputs=graphs[0].example_inputs, verify=True)
    print(report.format())
    print(kvpass.diff(report.before, after))
    if not report.matches:
        print("FAIL: kvpass.rewrite found no round trip to rewrite")
        return 1
    print(f"PASS: {len(report.matches)} round trip(s) rewritten, the graph gives the same result before and after "
          "(verify=True)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Bytes read and peak memory of ``kvpass check`` on a ``.pt2`` whose weights total ``--weights-gib`` GiB.

    python bench/check_archive.py --weights-gib 1

Builds (in a temporary folder, deleted after unless ``--keep``) a program with one attention whose K history is
a baked constant and a large embedding and LM head that no K/V path needs, saves it with ``torch.export.save``,
then checks it in fresh child processes: the untrusted reader (default), the same with ``--verify-all-crcs``, and
``torch.export.load`` (``--trusted``). Each child reports the bytes it read from the archive (kvpass's count,
and the process's ``rchar`` from ``/proc/self/io`` during the check), its peak RSS (``VmHWM``) and that after
``import kvpass`` and the Python heap peak (``tracemalloc``), and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

_CHILD = r"""
import json, resource, sys, time, tracemalloc
import kvpass
from kvpass.fidelity import Limits, check

def hwm_kib():  # VmHWM: this process's peak RSS (ru_maxrss would carry the parent's over exec)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM"))

def rchar():
    with open("/proc/self/io") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("rchar"))

mode, path = sys.argv[1], sys.argv[2]
base_rss = hwm_kib()
tracemalloc.start()
r0, t0 = rchar(), time.perf_counter()
if mode == "trusted":
    found = check(path, trusted=True)
else:
    found = check(path, limits=Limits(verify_all_crcs=(mode == "verify")))
seconds, r1 = time.perf_counter() - t0, rchar()
heap = tracemalloc.get_traced_memory()[1]
rss = hwm_kib()
print(json.dumps({"mode": mode, "findings": len(found), "bytes_read_kvpass": getattr(found, "bytes_read", None),
                  "rchar": r1 - r0, "rss_growth_mib": (rss - base_rss) / 1024, "rss_base_mib": base_rss / 1024,
                  "rss_peak_mib": rss / 1024, "heap_peak_mib": heap / 2**20,
                  "seconds": seconds}))
"""


def build(path: str, weights_gib: float) -> int:
    """Save the program; returns the bytes of weights in it."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    d = 1024
    vocab = int(weights_gib * 2**30 / (2 * d * 4))

    class Big(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, d)
            self.head = nn.Linear(d, vocab, bias=False)
            self.q = nn.Linear(d, d, bias=False)
            self.k = nn.Linear(d, 128, bias=False)
            self.hist = torch.zeros(1, 1, 4, 128)  # the baked K/V history: the one payload the check reads

        def forward(self, ids):
            x = self.embed(ids)
            t = ids.shape[1]
            q = self.q(x).view(1, t, 8, 128).transpose(1, 2)
            k = torch.cat([self.hist, self.k(x).view(1, t, 1, 128).transpose(1, 2)], 2).expand(1, 8, t + 4, 128)
            return self.head(F.scaled_dot_product_attention(q, k, k).transpose(1, 2).reshape(1, t, d))

    with torch.no_grad():
        model = Big()
        ep = torch.export.export(model, (torch.randint(0, vocab, (1, 4)),), strict=False)
        torch.export.save(ep, path)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main(argv=None) -> int:
    """Build the archive, check it three ways in child processes, print one JSON line each and a table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights-gib", type=float, default=1.0)
    ap.add_argument("--keep", action="store_true", help="keep the archive")
    ap.add_argument("--modes", default="untrusted,verify,trusted")
    args = ap.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="kvpass-check-bench-")
    try:
        path = os.path.join(folder, "big.pt2")
        weights = build(path, args.weights_gib)
        size = os.path.getsize(path)
        print(f"archive {path}: {size / 2**20:.1f} MiB, weights {weights / 2**20:.1f} MiB")
        rows = []
        for mode in args.modes.split(","):
            out = subprocess.run([sys.executable, "-c", _CHILD, mode, path], capture_output=True, text=True,
                                 check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]))
        print("| mode | findings | bytes read (kvpass count) | bytes read (rchar) | peak RSS (after import) | "
              "Python heap peak | time |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            counted = "-" if r["bytes_read_kvpass"] is None else f"{r['bytes_read_kvpass'] / 2**10:.0f} KiB"
            print(f"| {r['mode']} | {r['findings']} | {counted} | {r['rchar'] / 2**10:.0f} KiB | "
                  f"{r['rss_peak_mib']:.0f} MiB ({r['rss_base_mib']:.0f} MiB) | {r['heap_peak_mib']:.1f} MiB | "
                  f"{r['seconds']:.2f} s |")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Decode-step latency and compiled-graph count on the reference model (eager, backend="inductor",
backend="kvpass", kvpass.compile) side by side in one process, timed with kvpass.timing (the method of
``kvpass demo``). Same as ``kvpass bench``.

    python bench/decode.py [--steps 16] [--rounds 9] [--warmup 2] [--device cpu|cuda]
"""

import sys

from kvpass.benchmark import main

if __name__ == "__main__":
    sys.exit(main(prog="bench/decode.py"))

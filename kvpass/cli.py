"""The ``kvpass`` command line: ``kvpass demo``, ``kvpass check FILE.pt2``, ``kvpass bench``, ``kvpass --version``."""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["main"]


def _demo(args) -> int:
    import torch

    from .examples.shared_kv_model import SharedKVConfig, kv_owners, reference_model

    torch.manual_seed(args.seed)
    config = SharedKVConfig()
    owners = kv_owners(config)
    print(f"kvpass demo: reference shared-KV decoder, {config.num_layers} layers, "
          f"kv_shared_layers={config.kv_shared_layers}, sandwich_norms={config.sandwich_norms}")
    for i, t in enumerate(config.layer_types):
        kind = config.follower_kind(i)
        role = f"{kind} follower of layer {owners[i]}" if kind else ("owner" if i in owners.values() else "own cache")
        print(f"  layer {i}: {t:<17} head_dim={config.layer_head_dim(i):<3} {role}")
    host = reference_model(config, seed=args.seed)
    twin = reference_model(config, functional=True, seed=args.seed)
    prompt = torch.randint(0, config.vocab_size, (1, 8))
    t0 = time.perf_counter()
    tokens = host.generate(prompt, args.steps)
    dt = time.perf_counter() - t0
    twin_tokens = twin.generate(prompt, args.steps)
    print(f"\neager, host round-trip caches: prefill 8 + {args.steps} decode steps in {dt * 1e3:.1f} ms")
    print(f"  tokens:            {tokens.tolist()}")
    print(f"  functional twin:   {twin_tokens.tolist()}  ({'identical' if torch.equal(tokens, twin_tokens) else 'DIFFERENT'})")
    print("\nnext: the same model through make_fx/torch.export (fidelity check), backend='inductor' and "
          "backend='kvpass' (graph counts, rewrite report, step latency), compared with this eager run.")
    return 0 if torch.equal(tokens, twin_tokens) else 1


def _check(args) -> int:
    """``kvpass check FILE.pt2 ...``: exit 0 when every file is clean, 1 with findings, 2 when one is unreadable."""
    from .fidelity import ProgramLoadError, check, format_findings

    status = 0
    for path in args.files:
        try:
            findings = check(path)
        except ProgramLoadError as e:
            print(f"kvpass check: error: cannot read {e.path!r}: {e.reason}", file=sys.stderr)
            status = 2
            continue
        if not findings:
            print(f"{path}: clean: every attention key/value comes from the computation")
            continue
        status = max(status, 1)
        print(f"{path}: {len(findings)} finding(s): K/V that the capture baked or disconnected")
        print(format_findings(findings))
    return status


def main(argv=None) -> int:
    """Entry point of the ``kvpass`` console script."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="kvpass",
        description="Make shared-KV-cache decoders compile-clean and export-faithful under torch.compile/export.",
    )
    parser.add_argument("--version", action="version", version=f"kvpass {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="run the story on the bundled reference model")
    demo.add_argument("--steps", type=int, default=16, help="decode steps after an 8-token prefill (default 16)")
    demo.add_argument("--seed", type=int, default=0, help="random seed for weights and prompt (default 0)")
    bench = sub.add_parser("bench", help="decode-step latency: eager, inductor, kvpass, kvpass.compile (minutes)",
                           add_help=False)
    chk = sub.add_parser(
        "check", help="find K/V that an exported program baked as constants (exit 1 if any, 0 if clean)",
        description="Check .pt2 files written by torch.export.save for K/V values that do not come from the "
                    "computation. Exit status: 0 clean, 1 findings, 2 a file is missing or unreadable.",
    )
    chk.add_argument("files", nargs="+", metavar="FILE.pt2", help="exported program(s) to check")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own parser (kvpass.benchmark), options passed through as they are
        from .benchmark import main as bench_main

        return bench_main(argv[1:], prog="kvpass bench")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "demo":
        if args.steps < 0:
            parser.error(f"--steps must be >= 0, got {args.steps}")
        return _demo(args)
    if args.command == "check":
        return _check(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())

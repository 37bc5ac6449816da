"""The ``kvpass`` command line: ``kvpass demo``, ``kvpass check FILE.pt2``, ``kvpass bench``, ``kvpass --version``."""

from __future__ import annotations

import argparse
import sys

from .argtypes import non_negative_int, positive_int

__all__ = ["main", "OneLineErrorParser"]


class OneLineErrorParser(argparse.ArgumentParser):
    """Every ``kvpass`` (sub)command's parser: a usage error is one line on stderr, ``PROG: error: MESSAGE (see
    PROG --help)``, and exit status 2; ``--help`` prints the full help."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _check(args) -> int:
    """``kvpass check FILE.pt2 ...``: exit 0 when every file is clean, 1 with findings, 2 when one is unreadable."""
    import dataclasses

    from .fidelity import Limits, ProgramLoadError, check, format_findings

    limits = Limits(verify_all_crcs=args.verify_all_crcs)
    fields = {f.name for f in dataclasses.fields(Limits)}
    for item in args.limit or []:
        name, _, value = item.partition("=")
        names = ", ".join(sorted(fields - {"verify_all_crcs"}))
        if name not in fields or name == "verify_all_crcs":
            print(f"kvpass check: error: --limit {item!r}: unknown limit {name!r}; expected NAME=INTEGER, NAME one "
                  f"of {names}", file=sys.stderr)
            return 2
        try:
            number = int(value.strip())
        except ValueError:
            number = None
        if number is None or number < 0:
            what = "a negative value" if number is not None else f"{value!r} is not an integer"
            print(f"kvpass check: error: --limit {item!r}: {what}; a limit is an integer >= 0 (NAME=INTEGER)",
                  file=sys.stderr)
            return 2
        setattr(limits, name, number)
    status = 0
    for path in args.files:
        try:
            findings = check(path, trusted=args.trusted, limits=limits)
        except ProgramLoadError as e:
            print(f"kvpass check: error: cannot read {e.path!r}: {e.reason}", file=sys.stderr)
            status = 2
            continue
        print(f"{path}: {findings.summary()}")
        if findings:
            status = max(status, 1)
            print(format_findings(findings))
        if findings.not_inspected:
            print(f"  not inspected: {'; '.join(findings.not_inspected)}")
    return status


def main(argv=None) -> int:
    """Entry point of the ``kvpass`` console script."""
    from . import __version__

    parser = OneLineErrorParser(
        prog="kvpass",
        description="Make shared-KV-cache decoders compile-clean and export-faithful under torch.compile/export.",
    )
    parser.add_argument("--version", action="version", version=f"kvpass {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    demo = sub.add_parser(
        "demo", help="run the story on the bundled reference model (about a minute; --timing, --full: minutes)",
        description="The whole story on the bundled reference model, every figure computed in the run: what "
                    "stock torch.compile / make_fx / export do with host round trips of K/V, what kvpass rewrites "
                    "(with your source lines), a faithful kvpass.export checked clean, and a one-line takeaway. "
                    "--timing adds the decode-step latency of eager and kvpass.compile timed with one method "
                    "(kvpass.timing: the same warm-up for every runner, interleaved rounds, median and min-max, "
                    "ratios per round; Inductor compiles kvpass's graphs), --full also times stock Inductor "
                    "(its graphs take several minutes to compile on a cold cache).",
    )
    demo.add_argument("--timing", action="store_true",
                      help="also time the decode step of eager and kvpass.compile (Inductor compiles: minutes on a "
                           "cold cache)")
    demo.add_argument("--full", action="store_true",
                      help="the long run: --timing with stock Inductor timed too, 16 decode steps, 9 rounds")
    demo.add_argument("--steps", type=non_negative_int, default=None,
                      help="decode steps after an 8-token prefill (default 8, 16 with --full; >= 1 when timed)")
    demo.add_argument("--rounds", type=positive_int, default=None,
                      help="timed rounds, the runners interleaved in each (default 5, 9 with --full)")
    demo.add_argument("--seed", type=int, default=0, help="random seed for weights and prompt (default 0)")
    demo.add_argument("--json", action="store_true", help="print the results as JSON (same content)")
    demo.add_argument("--no-timing", action="store_true",
                      help="no timing table, even with --timing or --full (no Inductor compiles; the default)")
    demo.add_argument("--device", default="cpu", help="cpu (default), or cuda / cuda:N when available")
    demo.add_argument("--model", default="reference", help="'reference' (default, the bundled model) or 'hf-gemma4' (transformers, tiny random)")
    sub.add_parser("bench", help="decode-step latency: eager, inductor, kvpass, kvpass.compile (minutes)",
                   add_help=False)  # parsed by kvpass.benchmark (kvpass bench --help)
    chk = sub.add_parser(
        "check", help="find K/V that an exported program baked as constants (exit 1 if any, 0 if clean)",
        description="Check .pt2 files written by torch.export.save for K/V values that do not come from the "
                    "computation. The file is read with zipfile + json + numpy: nothing in it is executed, "
                    "unpickled, loaded or compiled (pickled members and AOTInductor libraries are listed as not "
                    "inspected), within limits on sizes, member names and JSON depth (see --limit).",
        epilog="Exit status: 0 clean, 1 findings, 2 a file is missing or unreadable (one line on stderr: "
               "damaged, not a PT2 archive, or over a limit). 'no attention found in this program' is exit 0 "
               "but means there was nothing to check.",
    )
    chk.add_argument("files", nargs="+", metavar="FILE.pt2", help="exported program(s) to check")
    chk.add_argument("--trusted", action="store_true",
                     help="load with torch.export.load instead (RUNS CODE FROM THE FILE: only for files you made)")
    chk.add_argument("--limit", action="append", metavar="NAME=N",
                     help="override a limit of kvpass.fidelity.Limits, e.g. --limit max_json_depth=1000 "
                          "(max_archive_bytes, max_members, max_member_bytes, max_total_bytes, "
                          "max_compression_ratio, max_json_bytes, max_json_depth, max_nodes, max_tensor_bytes, "
                          "max_value_read_bytes)")
    chk.add_argument("--verify-all-crcs", action="store_true",
                     help="also read every member (weights too) to check its CRC-32; by default only the members "
                          "the check reads are read, and checked")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own parser (kvpass.benchmark), options passed through as they are
        from .benchmark import main as bench_main

        return bench_main(argv[1:], prog="kvpass bench", parser_class=OneLineErrorParser)
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the subcommand that got them, not by the top-level parser
        (sub.choices[args.command] if args.command else parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "demo":
        if args.steps == 0 and (args.timing or args.full) and not args.no_timing:
            demo.error("argument --steps: 0 steps leave nothing to time; give --steps >= 1 or --no-timing")
        from .demo import device_problem
        from .demo import main as demo_main

        problem = device_problem(args.device)
        if problem:
            demo.error(f"argument --device: {args.device!r}: {problem}")

        return demo_main(args)
    if args.command == "check":
        return _check(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())

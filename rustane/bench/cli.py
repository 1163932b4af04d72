"""``python -m rustane.bench``: one CLI for every benchmark (docs/benchmarks.md).

Subcommands are modules of this package listed in ``COMMANDS``; each defines ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``. Adding a benchmark is one module and one line.
``--suite ci`` runs the fixed quick set the CI gate compares against ``bench/baselines``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from rustane.cli import ArgumentParser, debug_enabled

#: subcommand -> module under rustane.bench
COMMANDS = {
    "native": "native",
    "sim": "sim",
    "train": "train",
    "generate": "generate",
    "qk-norm": "qk_norm",
    "compare": "compare",
    "plot": "plot",
    "finetune": "finetune",
    "sweep": "sweep",
}
SUITES = ("ci", "smoke")  # rustane/bench/suite.py defines them


def _module(name: str):
    return importlib.import_module(f"rustane.bench.{COMMANDS[name]}")


def parser() -> argparse.ArgumentParser:
    # rustane.cli's parser: one-line flag errors, --debug declared
    p = ArgumentParser(prog="python -m rustane.bench",
                                description="rustane benchmarks: JSON results, baselines, a noise-aware gate")
    p.add_argument("--suite", choices=SUITES, default=None,
                   help="run a fixed set of benchmarks (ci: the quick set the CI gate uses, <= 3 min on 2 cores; smoke: the same at the tiny preset, for tests)")
    p.add_argument("--out", default=None, help="with --suite: write the result JSON here (default: stdout)")
    p.add_argument("--backend", choices=("sim", "ane", "auto"), default="sim",
                   help="with --suite: ane adds the engine on the Neural Engine (macOS); auto = ane where it runs")
    sub = p.add_subparsers(dest="what", metavar="{" + ",".join(COMMANDS) + "}")
    for name in COMMANDS:
        mod = _module(name)
        sp = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_suite-child"] and len(argv) == 3 and argv[1] in SUITES:
        # internal: the pinned measuring process of run_suite (rustane/bench/suite.py)
        from rustane.bench import suite
        return suite.child_main(argv[1], argv[2])
    p = parser()
    args = p.parse_args(argv)
    try:
        if args.suite is not None:
            if args.what is not None:
                p.error("--suite runs its own set; give either --suite or a subcommand")
            from rustane.bench import suite
            return suite.run_suite(args.suite, args.out, args.debug or debug_enabled(), args.backend)
        if args.what is None:
            p.error("give a subcommand or --suite ci")
        return _module(args.what).run(args)
    except (ValueError, FileNotFoundError, OSError) as exc:
        if args.debug or debug_enabled():
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2

"""The `regate` command."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from . import __version__


def _demo(args: argparse.Namespace) -> int:
    from .demo import format_results, run_demo

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="regate-demo-"))
    results = run_demo(out, steps=args.steps, batch_size=args.batch_size, seed=args.seed, keep_ratio=args.keep_ratio)
    print()
    print(format_results(results))
    print(f"\nreference cache: {out / 'reference_cache'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regate", description="ReGATE token elision for multimodal-LLM training")
    parser.add_argument("--version", action="version", version=f"regate-plugin {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a tiny LLaVA with none / regate / random elision, offline")
    demo.add_argument("--out", help="directory for the reference cache (default: a new temporary directory)")
    demo.add_argument("--steps", type=int, default=200, help="optimizer steps per mode (default: 200)")
    demo.add_argument("--batch-size", type=int, default=8)
    demo.add_argument("--keep-ratio", type=float, default=0.35, help="kept fraction on sparse steps (default: 0.35)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())

"""The `edgeprompt` command: `edgeprompt make-model PRESET`, `edgeprompt demo`."""

import argparse
import sys

from edgeprompt_vllm import __version__, demo
from edgeprompt_vllm.models import make_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgeprompt", description="EdgePrompt for vLLM")
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    make_model.build_parser(sub.add_parser("make-model", help="write a deterministic model for a preset"))
    demo.build_parser(sub.add_parser("demo", help="run the end-to-end demo on this machine"))
    args = parser.parse_args(argv)
    run = {"make-model": make_model.run, "demo": demo.run}[args.command]
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

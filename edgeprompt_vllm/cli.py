"""The `edgeprompt` command.

    edgeprompt demo                      the end-to-end demo on this machine (cloud + edge + client)
    edgeprompt cloud --model M --prompts configs/cloud_prompts/    start the cloud (Ray actor)
    edgeprompt edge-args --ray-address HOST:PORT                  the edge's `vllm serve` flags
    edgeprompt make-model PRESET         write a deterministic model for a preset
"""

import argparse
import sys

from edgeprompt_vllm import __version__


def main(argv: list[str] | None = None) -> int:
    from edgeprompt_vllm import demo
    from edgeprompt_vllm.models import make_model
    from edgeprompt_vllm.serving import commands

    parser = argparse.ArgumentParser(prog="edgeprompt", description="EdgePrompt for vLLM")
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo.build_parser(sub.add_parser("demo", help="run the end-to-end demo on this machine"))
    commands.build_cloud_parser(sub.add_parser(
        "cloud", help="start the cloud: Ray actor + the cloud prompt registry, prefilled"))
    commands.build_edge_args_parser(sub.add_parser(
        "edge-args", help="print the `vllm serve` flags of an edge for a cloud"))
    make_model.build_parser(sub.add_parser("make-model", help="write a deterministic model for a preset"))
    args = parser.parse_args(argv)
    run = {"make-model": make_model.run, "demo": demo.run, "cloud": commands.run_cloud,
           "edge-args": commands.run_edge_args}[args.command]
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

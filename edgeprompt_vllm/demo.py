"""`edgeprompt demo`: the main job, end to end on one machine.

Today (issue 2) it is a smoke run: build the tiny model, start `vllm serve` with the EdgePrompt
plugin, talk to it through the `openai` client (a completion and a streamed chat), show which
vLLM processes loaded the plugin, and shut everything down (also on Ctrl-C). The cloud actor and
relay attention join it in later issues.
"""

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

from edgeprompt_vllm.models.make_model import default_model_dir, make_model
from edgeprompt_vllm.serving.server import CPU_SERVE_ARGS, VllmServer

SYSTEM = "You are a helpful assistant for a travel agency. Answer in one short paragraph."
QUESTION = "Which three things should I pack for a week in Lisbon in spring?"


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", type=Path, help="model directory (default: build the tiny-llama preset)")
    parser.add_argument("--vllm-args", default=" ".join(CPU_SERVE_ARGS),
                        help="extra `vllm serve` arguments (default: the CPU settings)")
    parser.add_argument("--max-tokens", type=int, default=32)
    return parser


def _plugin_processes(trace_dir: Path) -> list[str]:
    return sorted(p.read_text().strip() for p in trace_dir.glob("*.txt"))


def run(args: argparse.Namespace) -> int:
    from openai import OpenAI

    model = args.model
    if model is None:
        model = default_model_dir("tiny-llama")
        print(f"[1/4] building tiny-llama in {model}", flush=True)
        make_model("tiny-llama", model)
    elif not (Path(model) / "config.json").is_file():
        print(f"edgeprompt demo: error: {model} has no config.json", file=sys.stderr)
        return 2
    trace_dir = Path(tempfile.mkdtemp(prefix="edgeprompt-trace-"))
    print("[2/4] starting vllm serve with the EdgePrompt plugin (CPU: ~20 s)", flush=True)
    t0 = time.time()
    server = VllmServer(model, extra_args=tuple(shlex.split(args.vllm_args)),
                        env={"EDGEPROMPT_PLUGIN_TRACE_DIR": str(trace_dir)})
    try:
        server.start()
        print(f"      ready at {server.base_url} after {time.time() - t0:.0f} s (log: {server.log_path})")
        client = OpenAI(base_url=server.base_url + "/v1", api_key="EMPTY", timeout=120)
        name = str(model)
        print("[3/4] requests through the openai client")
        done = client.completions.create(model=name, prompt="The capital of Portugal is",
                                         max_tokens=args.max_tokens, temperature=0)
        print(f"      completion: {done.choices[0].text!r}")
        stream = client.chat.completions.create(
            model=name, max_tokens=args.max_tokens, temperature=0, stream=True,
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}])
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        print(f"      chat (streamed): {text!r}")
        print(f"      the plugin loaded in: {', '.join(_plugin_processes(trace_dir))}")
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        print("[4/4] shutting down", flush=True)
        server.stop()
    print("demo finished")
    return 0

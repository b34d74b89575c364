"""`edgeprompt demo`: EdgePrompt end to end on one machine, with the two real commands' parts.

1. builds the tiny-llama model (or takes `--model PATH`, e.g. on a GPU);
2. the cloud: a private local Ray cluster, the CloudPromptService actor, the cloud prompt registry
   (configs/cloud_prompts/) registered and prefilled, as `edgeprompt cloud` does;
3. the edge: `vllm serve` with the EdgePrompt plugin, connector, relay attention and middleware;
4. the client: the `openai` package, chat and completion requests naming a cloud prompt;
5. what crossed the link: bytes, layers and how much of the transfer overlapped edge compute;
6. shuts everything down, also on Ctrl-C (exit 130).
"""

import argparse
import json
import shlex
import shutil
import signal
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path

from edgeprompt_vllm.models.make_model import default_model_dir, make_model
from edgeprompt_vllm.serving.server import CPU_ENGINE_ARGS, VllmServer

CHAT_QUESTIONS = ("Which three things should I pack for a week in Lisbon in spring?",
                  "Can you book me a surf lesson in Ericeira in July?",
                  "Is the Douro valley nice for walking in October?",
                  "How do I get from Porto to Seville by train?")
COMPLETION_PROMPT = "Which shoes should I wear on the hills of Lisbon?\nAnswer:"


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", type=Path, help="model directory (default: build the tiny-llama preset)")
    parser.add_argument("--prompts", type=Path, default=None,
                        help="cloud prompt registry (default: the packaged configs/cloud_prompts/)")
    parser.add_argument("--vllm-args", default=None,
                        help="extra `vllm serve` engine arguments (default: small CPU settings, "
                             "or GPU memory shares on a GPU)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--layer-delay-ms", type=float, default=0.0,
                        help="emulate a slow link: each cloud layer takes this long to arrive")
    parser.add_argument("--strategy", default="layerwise",
                        help="the edge's transfer strategy (edge/planner.py): layerwise, grouped, "
                             "bulk, recompute or auto (the planner decides)")
    return parser


def _pick(specs, kind: str):
    return next((s for s in specs if s.kind == kind), None)


def _status(resp) -> str:
    params = (getattr(resp, "model_extra", None) or {}).get("kv_transfer_params") or {}
    st = params.get("edgeprompt")
    if not st:
        return "no cloud prompt"
    s = f"cloud prompt {st.get('cloud_prompt')}: {st.get('status')}"
    if st.get("cloud_tokens"):
        s += f", {st['cloud_tokens']} tokens of cloud KV"
    return s


def _link_report(server_url: str, timeline_path: Path, requests: int) -> list[str]:
    from edgeprompt_vllm.serving.prom import scrape, total

    samples = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the engine's last stats may trail the last answer
        samples = scrape(server_url)
        if total(samples, "edgeprompt_cloud_prompt_hits_total") + \
                total(samples, "edgeprompt_cloud_prompt_misses_total") >= requests:
            break
        time.sleep(0.2)

    def t(name, **labels):
        return total(samples, name, **labels)

    lines = [
        f"cloud KV received: {t('edgeprompt_cloud_kv_bytes_total'):.0f} bytes in "
        f"{t('edgeprompt_cloud_layers_received_total'):.0f} layers "
        f"({t('edgeprompt_cloud_loaded_tokens_total'):.0f} tokens)",
        f"cloud prompt hits: {t('edgeprompt_cloud_prompt_hits_total', kind='loaded'):.0f} loaded "
        f"from the cloud, {t('edgeprompt_cloud_prompt_hits_total', kind='cached'):.0f} already on "
        f"the edge; misses: {t('edgeprompt_cloud_prompt_misses_total'):.0f}",
    ]
    recs = [json.loads(x) for x in timeline_path.read_text().splitlines()] \
        if timeline_path.exists() else []
    for rec in recs:
        layers = rec["layers"]
        arrived = [x["ready_s"] for x in layers if _arrived(x)]
        transfer = max(arrived) if arrived else 0.0
        waited = rec["total_wait_s"]
        overlap = max(0.0, 1 - waited / transfer) if transfer > 0 else 0.0
        who = ", ".join(f"{x['prompt_id']} ({x['tokens']} tokens)" for x in rec["loads"])
        lines.append(f"load of {who}: {len(arrived)}/{len(layers)} layers, "
                     f"{sum(x['nbytes'] for x in layers)} bytes, last layer after "
                     f"{1e3 * transfer:.1f} ms; the forward waited {1e3 * waited:.1f} ms "
                     f"-> {100 * overlap:.0f}% of the transfer overlapped edge compute")
        lines.append("  per layer (ms): " + "; ".join(
            f"L{x['layer']} arrived {1e3 * x['ready_s']:.1f}, waited {1e3 * (x['wait_s'] or 0):.1f}"
            for x in layers if _arrived(x)))
    lines.append(f"relay attention groups: {t('edgeprompt_relay_groups_total'):.0f} "
                 f"over {t('edgeprompt_relay_groups_per_step_count'):.0f} steps")
    return lines


def _arrived(layer: dict) -> bool:
    r = layer["ready_s"]
    return isinstance(r, float) and r == r  # (None or NaN: it never arrived)


def run(args: argparse.Namespace) -> int:
    from openai import OpenAI

    from edgeprompt_vllm.cloud.launch import has_cuda, resolve_dtype, stop_cloud
    from edgeprompt_vllm.cloud.prompt_files import PromptFileError, default_registry_dir, load_registry
    from edgeprompt_vllm.config import EdgePromptConfig
    from edgeprompt_vllm.serving.edge_args import edge_command, edge_serve_args, ray_env

    try:
        specs = load_registry(args.prompts or default_registry_dir())
    except PromptFileError as e:
        print(f"edgeprompt demo: error: {e}", file=sys.stderr)
        return 2
    chat_spec, text_spec = _pick(specs, "system"), _pick(specs, "text")
    if chat_spec is None:
        print("edgeprompt demo: error: the registry has no chat system prompt", file=sys.stderr)
        return 2

    def on_term(signum, frame):  # `kill` behaves as Ctrl-C: clean up, then exit
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    gpu = has_cuda()
    server = actor = None
    ray_started = False
    rc = 0
    work = Path(tempfile.mkdtemp(prefix="edgeprompt-demo-"))
    try:
        model = args.model
        if model is None:
            model = default_model_dir("tiny-llama")
            print(f"[1/6] building tiny-llama in {model}", flush=True)
            make_model("tiny-llama", model)
        elif not (Path(model) / "config.json").is_file():
            print(f"edgeprompt demo: error: {model} has no config.json", file=sys.stderr)
            return 2
        else:
            print(f"[1/6] model {model}", flush=True)
        model = str(model)
        dtype = resolve_dtype(model, "auto")
        dummy = not any(Path(model).glob("*.safetensors")) and not any(Path(model).glob("*.bin"))
        load_format = "dummy" if dummy else "auto"

        import ray

        from edgeprompt_vllm.cloud.launch import start_cloud

        namespace = f"edgeprompt-demo-{uuid.uuid4().hex[:8]}"
        print("[2/6] the cloud: a local Ray cluster, the CloudPromptService actor, the registry "
              f"({', '.join(s.name for s in specs)})", flush=True)
        t0 = time.time()
        ray.init(address="local", namespace=namespace, include_dashboard=False,
                 log_to_driver=False, logging_level="WARNING")
        ray_started = True
        address = ray.get_runtime_context().gcs_address
        actor, _ = start_cloud(
            model, specs, name="edgeprompt-cloud", namespace=namespace, detached=False,
            num_cpus=0, num_gpus=0.4 if gpu else 0, dtype=dtype, block_size=32,
            load_format=load_format, engine_kwargs={"gpu_memory_utilization": 0.35} if gpu else None)
        print(f"      cloud ready after {time.time() - t0:.0f} s (Ray at {address}); same as: "
              f"edgeprompt cloud --model {model} --prompts {args.prompts or default_registry_dir()}",
              flush=True)

        timeline = work / "timeline.jsonl"
        options = dict(ray_address=address, namespace=namespace, actor_name="edgeprompt-cloud",
                       timeline_path=str(timeline), emulated_layer_delay_s=args.layer_delay_ms / 1e3)
        if "strategy" in {f.name for f in fields(EdgePromptConfig)}:
            # The demo shows the transfer: on a fast edge the planner may rightly compute a
            # tiny model's cloud prompt itself ("auto"); `--strategy auto` lets it.
            options["strategy"] = args.strategy
        config = EdgePromptConfig(**options)
        engine_args = shlex.split(args.vllm_args) if args.vllm_args is not None else (
            ["--max-model-len", "2048", "--gpu-memory-utilization", "0.45", "--enforce-eager"] if gpu
            else list(CPU_ENGINE_ARGS))
        if dummy:
            engine_args += ["--load-format", "dummy"]
        edge_args = edge_serve_args(config, dtype=dtype, block_size=32)
        print("[3/6] the edge: " + edge_command(model, edge_args, engine_args, ray_env()), flush=True)
        t0 = time.time()
        server = VllmServer(model, extra_args=(*edge_args, *engine_args), log_path=work / "vllm.log")
        server.start()
        print(f"      ready at {server.base_url} after {time.time() - t0:.0f} s (log: {server.log_path})",
              flush=True)

        client = OpenAI(base_url=server.base_url + "/v1", api_key="EMPTY", timeout=300)
        cloud = {"kv_transfer_params": {"cloud_prompt": chat_spec.name}}
        print(f"[4/6] requests through the openai client, cloud prompt {chat_spec.name!r} "
              "(the client sends only the user's message)", flush=True)
        if args.model is None:
            print("      (tiny-llama has random weights: its words are noise; the path is the point)")
        kw = dict(model=model, max_tokens=args.max_tokens, temperature=0, extra_body=cloud)
        resp = client.chat.completions.create(
            messages=[{"role": "user", "content": CHAT_QUESTIONS[0]}], **kw)
        print(f"      user: {CHAT_QUESTIONS[0]}")
        print(f"      answer: {resp.choices[0].message.content!r}")
        print(f"      ({_status(resp)})")
        # Three users at once: they share the cloud blocks now on the edge (relay attention
        # reads them once per step for the group); one answer is streamed.
        def ask(question, stream=False):
            r = client.chat.completions.create(
                messages=[{"role": "user", "content": question}], stream=stream, **kw)
            if stream:
                return "".join(c.choices[0].delta.content or "" for c in r if c.choices), "streamed"
            return r.choices[0].message.content, _status(r)

        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(ask, q, i == 0) for i, q in enumerate(CHAT_QUESTIONS[1:])]
            for q, f in zip(CHAT_QUESTIONS[1:], futures):
                answer, how = f.result()
                print(f"      user: {q}")
                print(f"      answer: {answer!r} ({how})")
        if text_spec is not None:
            resp = client.completions.create(
                model=model, prompt=COMPLETION_PROMPT, max_tokens=args.max_tokens, temperature=0,
                extra_body={"kv_transfer_params": {"cloud_prompt": text_spec.name}})
            print(f"      completion with cloud prompt {text_spec.name!r}: {COMPLETION_PROMPT!r} ->")
            print(f"      answer: {resp.choices[0].text!r}")
            print(f"      ({_status(resp)})")

        print("[5/6] what crossed the link (edge -> cloud: prompt ids, fingerprint and layer "
              "numbers only)", flush=True)
        for line in _link_report(server.base_url, timeline, len(CHAT_QUESTIONS) + (text_spec is not None)):
            print("      " + line)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr, flush=True)
        rc = 130
    except Exception as e:
        print(f"edgeprompt demo: error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        if server is not None:
            print(server.log_tail(), file=sys.stderr)
        rc = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the cleanup
        print("[6/6] shutting down the edge, the cloud actor and the Ray cluster", flush=True)
        if server is not None:
            server.stop()
        if ray_started:
            stop_cloud(actor)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if rc == 0:
        shutil.rmtree(work, ignore_errors=True)  # (kept on failure: the server log is in it)
        print("demo finished")
    return rc

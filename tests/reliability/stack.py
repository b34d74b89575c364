"""The reliability suite's real deployment on one machine, with handles to break each part.

    Ray head node  (`ray start --head`, token auth, private temp dir)   <- edge engine, test driver
    Ray cloud node (`ray start --resources {"cloud": 1}`)              <- the cloud actor
    `edgeprompt cloud --resources-cloud ...`                            (its driver, on the head)
    edge:  `vllm serve` with the flags `edgeprompt cloud` prints (+ the options below)
    stock: `vllm serve` without the plugin, the reference for every answer

Nodes are ended by their process group, never `ray stop` (other users' clusters).
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import ray
import yaml

from edgeprompt_vllm.serving.server import CPU_ENGINE_ARGS, CPU_SERVE_ARGS, VllmServer, free_port
from helpers import interruptible

BIN = Path(sys.executable).parent
RAY_ENV = {**os.environ, "RAY_AUTH_MODE": "token"}
ACTOR = "cloud"
FETCH_TIMEOUT_S = 5.0  # the edge's per-layer fetch timeout in these tests
MARKER = "PRIVATE-MARKER"  # in every edge prompt of the suite: must never reach the cloud or a log


def fault_prompt(name: str, topic: str) -> dict:
    """A text cloud prompt of ~200 tokens (6 blocks of 32), its own text per fault."""
    return {"name": name, "text": f"Reference notes on {topic}. " + " ".join(
        f"Item {i}: {topic} detail number {i} matters for the answer." for i in range(18)) + "\n"}


FAULT_PROMPTS = [fault_prompt(n, t) for n, t in (
    ("f-corrupt", "river ferries"), ("f-stall", "mountain huts"), ("f-kill", "tram lines"),
    ("f-node", "harbour cranes"), ("f-tenant", "city libraries"))]


def kill_group(proc: subprocess.Popen, sig=signal.SIGKILL, wait_s: float = 30) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _wait_log(log: Path, proc, pattern: str, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, log.read_text(errors="replace"), re.MULTILINE)
        if m:
            return m
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}:\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.3)
    raise TimeoutError(f"no {pattern!r} in {log}:\n{log.read_text(errors='replace')[-3000:]}")


@dataclass
class Stack:
    model: Path
    tmp: Path
    registry_dir: Path = None
    namespace: str = "ep-reliability"
    address: str = ""
    ray_tmp: str = ""
    head: subprocess.Popen = None
    cloud_node: subprocess.Popen = None
    cloud_proc: subprocess.Popen = None
    cloud_log: Path = None
    edge: VllmServer = None
    stock: VllmServer = None
    audit_path: Path = None
    cloud_logs: list = field(default_factory=list)  # every cloud command's log, for the audit
    edge_command: str = ""  # the edge command the first cloud printed

    # ---------------- Ray nodes ----------------
    def _ray_node(self, args: list[str], name: str) -> subprocess.Popen:
        with open(self.tmp / f"{name}.log", "wb") as log:
            return subprocess.Popen([str(BIN / "ray"), "start", "--block", "--disable-usage-stats",
                                     f"--temp-dir={self.ray_tmp}", *args],
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=RAY_ENV)

    def alive_nodes(self) -> set[str]:
        return {n["NodeID"] for n in ray.nodes() if n["Alive"]}

    def _wait_new_node(self, known: set[str], timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not self.alive_nodes() - known:
            if time.monotonic() > deadline:
                raise TimeoutError("the new Ray node did not come up")
            time.sleep(0.5)

    def start_head(self) -> None:
        port = free_port()
        from ray.util import get_node_ip_address

        self.address = f"{get_node_ip_address()}:{port}"
        self.head = self._ray_node(["--head", f"--port={port}", "--num-cpus=2",
                                    "--include-dashboard=false"], "ray-head")
        deadline = time.monotonic() + 60
        _token_auth_in_this_process()
        if ray.is_initialized():  # another test module's cluster (the whole suite in one process)
            ray.shutdown()
        while True:  # this process is a driver of the cluster (stall, corrupt, kill, stats)
            try:
                ray.init(address=self.address, namespace=self.namespace, log_to_driver=False,
                         logging_level="WARNING")
                break
            except Exception:
                if time.monotonic() > deadline or self.head.poll() is not None:
                    raise
                time.sleep(1)

    def start_cloud_node(self) -> None:
        known = self.alive_nodes()
        self.cloud_node = self._ray_node([f"--address={self.address}", "--num-cpus=1",
                                          '--resources={"cloud": 1}'], f"ray-cloud-node-{len(known)}")
        self._wait_new_node(known)

    def stop_cloud_node(self) -> None:
        kill_group(self.cloud_node)  # SIGKILL: the node dies as a crashed machine would

    # ---------------- the cloud (`edgeprompt cloud`) ----------------
    def write_registry(self) -> None:
        from edgeprompt_vllm.cloud.prompt_files import default_registry_dir

        self.registry_dir = self.tmp / "registry"
        self.registry_dir.mkdir()
        for p in default_registry_dir().glob("*.yaml"):
            (self.registry_dir / p.name).write_text(p.read_text())
        for spec in FAULT_PROMPTS:
            (self.registry_dir / f"{spec['name']}.yaml").write_text(yaml.safe_dump(spec))

    def start_cloud(self, *extra: str) -> str:
        """Starts `edgeprompt cloud` on the cloud node; -> the edge command it prints."""
        self.cloud_log = self.tmp / f"cloud-{len(self.cloud_logs)}.log"
        self.cloud_logs.append(self.cloud_log)
        with open(self.cloud_log, "wb") as log:
            self.cloud_proc = subprocess.Popen(
                [str(BIN / "edgeprompt"), "cloud", "--model", str(self.model), "--prompts",
                 str(self.registry_dir), "--ray-address", self.address, "--namespace",
                 self.namespace, "--actor-name", ACTOR, "--resources-cloud", "--no-progress", *extra],
                **interruptible(stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=RAY_ENV))
        command = _wait_log(self.cloud_log, self.cloud_proc, r"^  ((?:\w+=\S+ )*vllm serve .*)$", 240)
        _wait_log(self.cloud_log, self.cloud_proc, r"serving; Ctrl-C stops it", 30)
        return command.group(1)

    def stop_cloud(self) -> None:
        """Ctrl-C to the cloud command: it kills its actor (if still alive) and exits."""
        if self.cloud_proc is not None and self.cloud_proc.poll() is None:
            kill_group(self.cloud_proc, signal.SIGINT, wait_s=60)

    def actor(self):
        return ray.get_actor(ACTOR, namespace=self.namespace)

    def cloud_stats(self) -> dict:
        return ray.get(self.actor().stats.remote(), timeout=30)

    # ---------------- the edge and the stock server ----------------
    def edge_args(self, command: str, **options) -> tuple[list[str], dict]:
        """The printed command's flags, with EdgePrompt options added; -> (args, env)."""
        words = shlex.split(command)
        env = dict(w.split("=", 1) for w in words[:words.index("vllm")])
        args = words[words.index("vllm") + 3:]
        i = args.index("--kv-transfer-config") + 1
        kvt = json.loads(args[i])
        kvt["kv_connector_extra_config"].update(options)
        args[i] = json.dumps(kvt)
        return args, env

    def start_edge(self, command: str) -> None:
        self.audit_path = self.tmp / "audit.jsonl"
        args, env = self.edge_args(command, strategy="layerwise", fetch_timeout_s=FETCH_TIMEOUT_S,
                                   audit_path=str(self.audit_path))
        self.edge = VllmServer(self.model, extra_args=(*args, *CPU_ENGINE_ARGS,
                                                       "--enable-prompt-tokens-details"),
                               env=env, log_path=self.tmp / "edge.log")
        self.edge.start()

    def start_stock(self) -> None:
        self.stock = VllmServer(self.model, extra_args=(*CPU_SERVE_ARGS, "--block-size", "32"),
                                env={"VLLM_PLUGINS": ""}, log_path=self.tmp / "stock.log")
        self.stock.start()

    def close(self) -> None:
        for srv in (self.edge, self.stock):
            if srv is not None:
                srv.stop()
        self.stop_cloud()
        ray.shutdown()
        for node in (self.cloud_node, self.head):
            if node is not None and node.poll() is None:
                kill_group(node, signal.SIGTERM, wait_s=10)
        if self.ray_tmp:
            shutil.rmtree(self.ray_tmp, ignore_errors=True)


def start_stack(model: Path, tmp: Path) -> Stack:
    stack = Stack(model, tmp)
    stack.ray_tmp = tempfile.mkdtemp(prefix="ep-rel-", dir="/tmp")  # short: Ray's socket paths
    try:
        stack.write_registry()
        stack.start_head()
        stack.start_cloud_node()
        stock_error = []
        stock = threading.Thread(target=lambda: _capture(stack.start_stock, stock_error))
        stock.start()  # the stock server starts while the cloud prefills
        command = stack.start_cloud()
        stock.join()
        if stock_error:
            raise stock_error[0]
        stack.start_edge(command)
        stack.edge_command = command
        return stack
    except BaseException:
        stack.close()
        raise


def _token_auth_in_this_process() -> None:
    """RAY_AUTH_MODE=token for this (pytest) process too, as Ray does for a cluster it starts
    (ray._private.authentication: the env, then its cached config refreshed)."""
    from ray._raylet import Config

    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")


def _capture(fn, errors: list) -> None:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 (re-raised by the caller)
        errors.append(e)


# ---------------- reading the edge ----------------
def engine_metrics(base_url: str) -> dict[str, float]:
    """vLLM's own gauges and counters we check (summed over engines)."""
    from edgeprompt_vllm.serving.prom import scrape, total

    samples = scrape(base_url, prefix="")
    names = ("vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting",
             "edgeprompt_cloud_layers_received_total", "edgeprompt_cloud_layer_failures_total")
    present = {name for name, _, _ in samples}
    assert set(names[:3]) <= present, f"vLLM's metrics changed: {sorted(present)[:40]}"
    return {n: total(samples, n) for n in names}


def wait_kv_idle(base_url: str, timeout: float = 20) -> dict:
    """Waits until no request runs or waits and the KV cache usage is 0 (nothing leaked)."""
    deadline = time.monotonic() + timeout
    while True:
        m = engine_metrics(base_url)
        if m["vllm:kv_cache_usage_perc"] == 0 and m["vllm:num_requests_running"] == 0 \
                and m["vllm:num_requests_waiting"] == 0:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"the edge's KV cache did not return to idle: {m}")
        time.sleep(0.3)


def healthy(base_url: str) -> bool:
    with urllib.request.urlopen(base_url + "/health", timeout=5) as r:
        return r.status == 200

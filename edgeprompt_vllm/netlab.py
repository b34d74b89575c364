"""Emulated cloud-edge links on one machine: two network namespaces joined by a veth pair.

    with NetLab(rate_mbit=100) as lab:              # needs root and iproute2 (`ip`, `tc`)
        address = lab.start_ray()                   # head (+ `cloud` resource) in the cloud ns,
                                                    # a worker node in the edge ns
        lab.run_in("edge", [python, script, ...])   # the edge engine, attached to the edge node
        lab.set_rate(1000)                          # reshape the link live
        lab.set_rtt(0.02)                           # netem where the kernel has it; else False

    ep-cloud-TAG  [epc-TAG 10.213.0.1/30] <== veth ==> [epe-TAG 10.213.0.2/30]  ep-edge-TAG

Bandwidth is shaped by the kernel on both ends of the veth: netem `rate` when the kernel has
netem, else `tbf`. Round-trip delay comes from netem where available; many kernels (these
machines: "Specified qdisc kind is unknown") lack it, and then `set_rtt` returns False and the
caller uses the transport's labelled EMULATED round trip (transport/client.py,
EdgePromptConfig.emulated_rtt_s / set_emulated_link). Addresses exist only inside the two
namespaces; nothing is routed anywhere else. Everything is torn down on exit (processes by id,
then the namespaces, which removes the veth pair).
"""

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

CLOUD_IP, EDGE_IP, PREFIX = "10.213.0.1", "10.213.0.2", 30
GCS_PORT = 6379  # inside the cloud namespace: never collides with the host's Ray clusters
RAY_ENV = {"RAY_AUTH_MODE": "token"}  # as tests/edge/test_two_nodes.py: one token file for all


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(list(argv), capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


def available() -> tuple[bool, str]:
    """(True, "") where network namespaces, veth and tc can be used here; else (False, why)."""
    if sys.platform != "linux":
        return False, "network namespaces need Linux"
    if os.geteuid() != 0:
        return False, "creating network namespaces needs root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"`{tool}` (iproute2) is not installed"
    name = f"ep-probe-{uuid.uuid4().hex[:6]}"
    p = _run("ip", "netns", "add", name, check=False)
    if p.returncode != 0:
        return False, f"`ip netns add` failed: {p.stderr.strip()}"
    try:
        p = _run("ip", "netns", "exec", name, "ip", "link", "add", "epx0", "type", "veth",
                 "peer", "name", "epx1", check=False)
        if p.returncode != 0:
            return False, f"cannot create a veth pair: {p.stderr.strip()}"
        p = _run("ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "epx0", "root", "tbf",
                 "rate", "100mbit", "burst", "32kb", "latency", "50ms", check=False)
        if p.returncode != 0:
            return False, f"tc tbf is not available: {p.stderr.strip()}"
        return True, ""
    finally:
        _run("ip", "netns", "del", name, check=False)


def _count(cpus: str) -> int:
    """Number of CPUs in a taskset list such as "0", "2-3" or "0,2-3"."""
    n = 0
    for part in cpus.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


def split_cpus(n: int | None = None) -> dict[str, str] | None:
    """Half of the CPUs for the cloud, the other half for the edge; None with fewer than 2."""
    n = n or os.cpu_count() or 1
    if n < 2:
        return None
    half = n // 2
    span = lambda lo, hi: str(lo) if lo == hi else f"{lo}-{hi}"  # noqa: E731
    return {"cloud": span(0, half - 1), "edge": span(half, n - 1)}


class NetLab:
    def __init__(self, rate_mbit: float = 1000, tag: str | None = None, workdir: str | None = None,
                 cpus: dict[str, str] | None = None):
        """cpus: optional CPU list per side ({"cloud": "0", "edge": "1"}): every process of that
        side is pinned there (taskset, and vLLM's CPU thread binding), so that cloud and edge do
        not steal each other's cores and timings measure the link, not the scheduler."""
        self.tag = tag or uuid.uuid4().hex[:6]
        self.cpus = cpus or {}
        self.ns = {"cloud": f"ep-cloud-{self.tag}", "edge": f"ep-edge-{self.tag}"}
        self.dev = {"cloud": f"epc-{self.tag}", "edge": f"epe-{self.tag}"}
        self.ip = {"cloud": CLOUD_IP, "edge": EDGE_IP}
        self.rate_mbit = rate_mbit
        self.rtt_s = 0.0
        self.netem: bool | None = None
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix=f"epn-{self.tag}-", dir="/tmp"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ray_dir = Path(f"/tmp/epn-{self.tag}")  # short: Ray's socket paths must fit 107 bytes
        self._procs: list[subprocess.Popen] = []
        self._up = False

    # ---------------- namespaces and the link ----------------
    def up(self) -> "NetLab":
        ok, why = available()
        if not ok:
            raise RuntimeError(f"cannot build the emulated link: {why}")
        atexit.register(self.down)
        self._up = True
        for ns in self.ns.values():
            _run("ip", "netns", "add", ns)
        # the pair is born inside the cloud namespace, one end moves to the edge one
        self.exec("cloud", "ip", "link", "add", self.dev["cloud"], "type", "veth", "peer", "name",
                  self.dev["edge"])
        self.exec("cloud", "ip", "link", "set", self.dev["edge"], "netns", self.ns["edge"])
        for side in ("cloud", "edge"):
            self.exec(side, "ip", "link", "set", "lo", "up")
            self.exec(side, "ip", "addr", "add", f"{self.ip[side]}/{PREFIX}", "dev", self.dev[side])
            self.exec(side, "ip", "link", "set", self.dev[side], "up")
        self.netem = self._probe_netem()
        self.set_rate(self.rate_mbit)
        return self

    def exec(self, side: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run("ip", "netns", "exec", self.ns[side], *argv, check=check)

    def _probe_netem(self) -> bool:
        p = self.exec("cloud", "tc", "qdisc", "replace", "dev", self.dev["cloud"], "root", "netem",
                      "delay", "0ms", check=False)
        return p.returncode == 0

    def _shape(self) -> None:
        rate = f"{int(self.rate_mbit * 1000)}kbit"
        for side in ("cloud", "edge"):
            dev = self.dev[side]
            if self.netem:  # one-way delay = half the round trip, each way
                self.exec(side, "tc", "qdisc", "replace", "dev", dev, "root", "netem", "delay",
                          f"{self.rtt_s * 500:.3f}ms", "rate", rate, "limit", "100000")
            else:
                burst = max(64 * 1024, int(self.rate_mbit * 1e6 / 8 / 250))  # >= 4 ms of traffic
                self.exec(side, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                          "burst", str(burst), "latency", "200ms")

    def set_rate(self, rate_mbit: float) -> None:
        """Link bandwidth, both directions (kernel-shaped)."""
        if rate_mbit <= 0:
            raise ValueError("rate_mbit must be > 0")
        self.rate_mbit = rate_mbit
        self._shape()

    def set_rtt(self, rtt_s: float) -> bool:
        """Round-trip delay by netem; False where the kernel has no netem (the caller then uses
        the transport's EMULATED round trip instead)."""
        self.rtt_s = rtt_s
        if not self.netem:
            return rtt_s == 0
        self._shape()
        return True

    def qdiscs(self) -> str:
        return "\n".join(self.exec(s, "tc", "qdisc", "show", "dev", self.dev[s]).stdout.strip()
                         for s in ("cloud", "edge"))

    def rx_bytes(self, side: str = "edge") -> int:
        return int(self.exec(side, "cat", f"/sys/class/net/{self.dev[side]}/statistics/rx_bytes").stdout)

    # ---------------- processes inside the namespaces ----------------
    def env(self, **extra) -> dict:
        return {**os.environ, **RAY_ENV, **extra}

    def popen(self, side: str, argv: list[str], log: str | Path | None = None, **kw) -> subprocess.Popen:
        """A process in `side`'s namespace, in its own session (ended by `down`)."""
        out = open(log, "ab") if log else subprocess.DEVNULL
        env = kw.pop("env", None) or self.env()
        pin = []
        if side in self.cpus:
            cpus = self.cpus[side]
            pin = ["taskset", "-c", cpus]
            env = {**env, "VLLM_CPU_OMP_THREADS_BIND": cpus, "OMP_NUM_THREADS": str(_count(cpus))}
        p = subprocess.Popen(["ip", "netns", "exec", self.ns[side], *pin, *argv], stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True, env=env, **kw)
        self._procs.append(p)
        return p

    def run_in(self, side: str, argv: list[str], timeout: float = 900, **kw) -> subprocess.CompletedProcess:
        p = self.popen(side, argv, **kw)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill(p)
            raise
        return subprocess.CompletedProcess(p.args, p.returncode)

    @property
    def ray_address(self) -> str:
        return f"{CLOUD_IP}:{GCS_PORT}"

    def start_ray(self, cloud_cpus: int = 1, edge_cpus: int = 2,
                  object_store_bytes: int = 1 << 30, timeout: float = 120) -> str:
        """A Ray head in the cloud namespace (resource `cloud`), a worker node in the edge one."""
        ray = str(Path(sys.executable).parent / "ray")
        common = ["--block", "--disable-usage-stats", f"--object-store-memory={object_store_bytes}"]
        self.popen("cloud", [ray, "start", "--head", *common, f"--node-ip-address={CLOUD_IP}",
                             f"--port={GCS_PORT}", f"--num-cpus={cloud_cpus}", '--resources={"cloud": 1}',
                             "--include-dashboard=false", f"--temp-dir={self.ray_dir}/c"],
                   log=self.dir / "ray-cloud.log")
        self._wait_nodes(1, timeout)
        self.popen("edge", [ray, "start", *common, f"--node-ip-address={EDGE_IP}",
                            f"--address={self.ray_address}", f"--num-cpus={edge_cpus}",
                            f"--temp-dir={self.ray_dir}/e"], log=self.dir / "ray-edge.log")
        self._wait_nodes(2, timeout)
        return self.ray_address

    def _wait_nodes(self, n: int, timeout: float) -> None:
        code = ("import ray,sys; ray.init(address=sys.argv[1], log_to_driver=False,"
                " _node_ip_address=sys.argv[2]);print(sum(1 for x in ray.nodes() if x['Alive']))")
        side = "cloud" if n == 1 else "edge"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            p = subprocess.run(["ip", "netns", "exec", self.ns[side], sys.executable, "-c", code,
                                self.ray_address, self.ip[side]], capture_output=True, text=True,
                               env=self.env(), timeout=60)
            if p.returncode == 0 and p.stdout.strip().splitlines()[-1:] == [str(n)]:
                return
            time.sleep(1)
        raise TimeoutError(f"{n} Ray node(s) not up at {self.ray_address} in {timeout} s; "
                           f"logs in {self.dir}")

    # ---------------- teardown ----------------
    @staticmethod
    def _kill(p: subprocess.Popen) -> None:
        if p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
        except ProcessLookupError:
            pass

    def down(self) -> None:
        if not self._up:
            return
        self._up = False
        for p in reversed(self._procs):
            self._kill(p)
        self._procs.clear()
        for ns in self.ns.values():  # anything still inside our namespaces was started by us
            pids = _run("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _run("ip", "netns", "del", ns, check=False)
        shutil.rmtree(self.ray_dir, ignore_errors=True)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        try:
            atexit.unregister(self.down)
        except Exception:  # pragma: no cover
            pass

    def __enter__(self) -> "NetLab":
        try:
            return self.up()
        except BaseException:
            self.down()
            raise

    def __exit__(self, *exc) -> None:
        self.down()

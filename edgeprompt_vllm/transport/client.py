"""The edge's Ray client to the cloud actor: the only way the edge talks to the cloud.

Privacy by construction (DESIGN.md invariant 1): its public methods take only a cloud prompt id
(checked against the cloud's own registry), the model fingerprint (fixed at connect), layer
indices and flow control. There is no method that could carry edge tokens or text.

    client = CloudClient.connect(config, fingerprint)   # finds the actor; handshake or raise
    client.registry() -> [CloudPrompt]                  # cloud -> edge: public prompts
    stream = client.fetch_layers("sys-A", range(L))     # starts a background fetch
    header, kv = stream.result(l, timeout)              # kv: [2, T, Hkv, hs], checksum verified

A stream moves `layers_per_message` layers per message (1: layer-wise; L: one bulk message),
optionally encoded on the wire (codecs.py). Messages are pulled one after another (a serial
link); `stream.messages` records each one's timing for the planner (edge/planner.py).

FAULTS (docs/reliability.md): a call that times out or finds the actor dead marks the cloud
down. While down, calls fail at once (CloudUnavailable: no engine step waits on a dead cloud);
at most every `RETRY_S` the next call looks the actor up again by name and repeats the
handshake, so a restarted cloud is used again, and one restarted with another model is refused
(its handshake fails; the client stays down and says why).

EMULATED LINKS (tests and benchmarks only, labelled as such in the log): `emulated_rtt_s` adds a
round trip to every message, `emulated_layer_delay_s` makes every layer occupy a serial link for
that long. They stand in for netem where the kernel lacks it (netlab.py); the bandwidth of an
emulated cloud-edge link comes from the kernel (tc tbf), not from here.
"""

import json
import os
import threading
import time
from concurrent.futures import Future
from typing import Iterable

import ray

from edgeprompt_vllm import ray_fork
from edgeprompt_vllm.config import EdgePromptConfig
from edgeprompt_vllm.fingerprint import Fingerprint, FingerprintMismatch
from edgeprompt_vllm.log import get_logger
from edgeprompt_vllm.prompts import CloudPrompt, check_prompt_id
from edgeprompt_vllm.transport.audit import AuditLog
from edgeprompt_vllm.transport.codecs import check_codec
from edgeprompt_vllm.transport.wire import LayerHeader, decode_layer

logger = get_logger(__name__)

# Benchmarks change the emulated link of a running engine (same process) through this.
_EMULATION_OVERRIDE: dict = {}


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def set_emulated_link(rtt_s: float | None = None, layer_delay_s: float | None = None) -> None:
    """Overrides the EMULATED per-message round trip / per-layer delay of every client in this
    process (None: back to each client's config)."""
    for key, value in (("rtt_s", rtt_s), ("layer_delay_s", layer_delay_s)):
        if value is None:
            _EMULATION_OVERRIDE.pop(key, None)
        elif value < 0:
            raise ValueError(f"emulated {key} must be >= 0")
        else:
            _EMULATION_OVERRIDE[key] = float(value)


class CloudUnavailable(RuntimeError):
    """The cloud actor cannot be found or does not answer in time."""


class UnknownCloudPrompt(KeyError):
    pass


RETRY_S = 2.0  # a cloud marked down is looked up again at most this often
_RELOOK_S = 0.2  # ... or this soon after its actor died (a restarted cloud is a new actor)


def ensure_ray(address: str | None, namespace: str, node_ip: str | None = None) -> None:
    """`node_ip`: attach to the Ray node with that address (a host running several nodes would
    otherwise attach to its head node). Joins with Ray's token authentication on
    (RAY_AUTH_MODE=token unless set otherwise: docs/reliability.md). Raises ForkedRayDriver in a
    fork of a Ray driver (ray_fork.py), whose Ray calls would hang."""
    ray_fork.check_not_forked()
    if not ray.is_initialized():
        require_token_auth(starting=False)
        kw = {"_node_ip_address": node_ip} if node_ip else {}
        ray.init(address=address or "auto", namespace=namespace, log_to_driver=False,
                 logging_level="WARNING", include_dashboard=False, **kw)


def require_token_auth(starting: bool) -> None:
    """Ray's token authentication for this process and its children: RAY_AUTH_MODE=token unless
    the environment says otherwise. Starting a cluster without it is refused; joining one
    without it is logged as a warning."""
    if "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        try:  # Ray caches its config: refresh it, as Ray does when it enables token auth
            from ray._raylet import Config

            Config.initialize("")
        except (ImportError, AttributeError):  # pragma: no cover (other Ray versions)
            pass
    mode = os.environ["RAY_AUTH_MODE"].lower()
    if mode == "token":
        return
    if starting:
        raise RuntimeError(f"refusing to start a Ray cluster with RAY_AUTH_MODE={mode!r}: "
                           "EdgePrompt clusters use token authentication (unset it, or set "
                           "RAY_AUTH_MODE=token)")
    logger.warning("joining Ray with RAY_AUTH_MODE=%r: without token authentication anyone who "
                   "reaches the cluster can run code in it", mode)


class CloudClient:
    def __init__(self, actor, fingerprint: Fingerprint, timeout_s: float = 60.0,
                 audit: AuditLog | None = None, emulated_layer_delay_s: float = 0.0,
                 emulated_rtt_s: float = 0.0, emulated_link_path: str | None = None,
                 locate=None, health_timeout_s: float = 5.0):
        """`locate`: () -> the actor handle by name (raises ValueError if absent), to reconnect."""
        self._actor = actor
        self._locate, self._health_timeout_s = locate, health_timeout_s
        self._down: str | None = None  # why the cloud is considered down; None: up
        self._retry_at = 0.0
        self._lock = threading.Lock()
        self._fp = fingerprint
        self._digest = fingerprint.digest()
        self._timeout_s = timeout_s
        self._audit = audit or AuditLog(None)
        self._delay_s = emulated_layer_delay_s
        self._rtt_s = emulated_rtt_s
        self._link_path, self._link_mtime, self._link_file = emulated_link_path, None, {}
        self._warned_emulation = False
        self._known: set[str] = set()
        self.cloud_info: dict = {}

    @classmethod
    def connect(cls, config: EdgePromptConfig, fingerprint: Fingerprint) -> "CloudClient":
        ensure_ray(config.ray_address, config.namespace, config.ray_node_ip)
        deadline = time.monotonic() + config.connect_timeout_s
        while True:
            try:
                actor = ray.get_actor(config.actor_name, namespace=config.namespace)
                break
            except ValueError as e:
                if time.monotonic() > deadline:
                    raise CloudUnavailable(f"no cloud actor {config.actor_name!r} in namespace "
                                           f"{config.namespace!r}: {e}") from e
                time.sleep(0.5)
        client = cls(actor, fingerprint, config.connect_timeout_s, AuditLog(config.audit_path),
                     config.emulated_layer_delay_s, config.emulated_rtt_s, config.emulated_link_path,
                     locate=lambda: ray.get_actor(config.actor_name, namespace=config.namespace),
                     health_timeout_s=config.health_timeout_s)
        client.handshake()
        client._timeout_s = config.fetch_timeout_s
        return client

    # -- the calls toward the cloud: every argument goes through _send (and the audit) --
    def _call(self, method: str, *args):
        self._ensure_up()
        return self._send(self._actor, method, *args)

    def _send(self, actor, method: str, *args):
        self._audit.record(method, args)
        return getattr(actor, method).remote(*args)

    def _get(self, ref, timeout_s: float | None = None):
        timeout_s = timeout_s or self._timeout_s
        try:
            return ray.get(ref, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError as e:
            raise self._mark_down(f"cloud did not answer in {timeout_s} s") from e
        except ray.exceptions.RayActorError as e:  # a restarted cloud is a new actor: look soon
            raise self._mark_down(f"cloud actor died: {_first_line(e)}", _RELOOK_S) from e
        except (ray.exceptions.ObjectLostError, ray.exceptions.RaySystemError) as e:
            raise self._mark_down(f"cloud data lost: {_first_line(e)}") from e

    # -- down / reconnect (the module docstring, FAULTS) --
    @property
    def down_reason(self) -> str | None:
        """Why the cloud is considered down (None: up, or due for another look)."""
        return self._down if self._down and time.monotonic() < self._retry_at else None

    def _mark_down(self, reason: str, retry_s: float = RETRY_S) -> CloudUnavailable:
        with self._lock:
            if self._down is None:
                logger.warning("cloud unavailable: %s; the edge computes cloud prompts itself "
                               "until it answers again", reason)
            self._down, self._retry_at = reason, time.monotonic() + retry_s
        return CloudUnavailable(reason)

    def _ensure_up(self) -> None:
        """Raises CloudUnavailable while down; when a new look is due, finds the actor by name and
        shakes hands with it (other callers fail at once meanwhile)."""
        if self._down is None:
            return
        with self._lock:
            if self._down is None:
                return
            if time.monotonic() < self._retry_at or self._locate is None:
                raise CloudUnavailable(self._down)
            self._retry_at = time.monotonic() + RETRY_S
            reason = self._down
        try:
            actor = self._locate()
            self.handshake(self._health_timeout_s, actor)
        except FingerprintMismatch as e:
            logger.error("the cloud came back with another model; its KV is refused: %s", e)
            raise self._mark_down(f"the cloud now runs another model: {e}") from None
        except CloudUnavailable:
            raise
        except Exception as e:  # noqa: BLE001 (no actor by that name, no GCS...: still down)
            raise self._mark_down(f"{reason}; no cloud now: {type(e).__name__}: "
                                  f"{_first_line(e)}") from None
        with self._lock:
            self._actor, self._down = actor, None
        logger.warning("cloud available again (handshake done)")

    def handshake(self, timeout_s: float | None = None, actor=None) -> dict:
        """Refuses (FingerprintMismatch) unless the cloud runs the same model and layout."""
        ref = self._send(actor or self._actor, "handshake", self._fp.to_dict())
        reply = self._get(ref, timeout_s)
        if not reply["ok"]:
            raise FingerprintMismatch(reply["error"])
        self._fp.check_same(Fingerprint.from_dict(reply["fingerprint"]))
        self.cloud_info = reply
        return reply

    def registry(self, timeout_s: float | None = None) -> list[CloudPrompt]:
        prompts = [CloudPrompt.from_dict(d)
                   for d in self._get(self._call("registry", self._digest), timeout_s)]
        self._known = {p.prompt_id for p in prompts}
        return prompts

    def _check_id(self, prompt_id: str) -> str:
        check_prompt_id(prompt_id)
        if prompt_id not in self._known:  # only ids the cloud itself published can leave the edge
            raise UnknownCloudPrompt(f"cloud prompt {prompt_id!r} is not in the cloud's registry")
        return prompt_id

    def _check_layers(self, layers: Iterable[int]) -> list[int]:
        out = [int(l) for l in layers]
        if any(not 0 <= l < self._fp.num_layers for l in out):
            raise ValueError(f"layer indices {out} outside 0..{self._fp.num_layers - 1}")
        return out

    def describe(self, prompt_id: str, timeout_s: float | None = None) -> dict:
        return self._get(self._call("describe", self._check_id(prompt_id), self._digest), timeout_s)

    def fetch_layers(self, prompt_id: str, layers: Iterable[int], max_inflight: int = 8,
                     layers_per_message: int = 1, codec: str = "none") -> "LayerStream":
        layers = self._check_layers(layers)
        return LayerStream(self, self._check_id(prompt_id), layers, max(1, int(max_inflight)),
                           max(1, int(layers_per_message)), check_codec(codec))

    def emulation(self) -> tuple[float, float]:
        """(rtt_s, layer_delay_s) of the EMULATED link now in force (0, 0: none)."""
        if self._link_path:  # a benchmark changes the link of a running engine through this file
            try:
                mtime = os.stat(self._link_path).st_mtime_ns
                if mtime != self._link_mtime:
                    with open(self._link_path) as f:
                        self._link_file, self._link_mtime = json.load(f), mtime
            except (OSError, ValueError):
                pass
        over = {**self._link_file, **_EMULATION_OVERRIDE}
        rtt = float(over.get("rtt_s", self._rtt_s))
        delay = float(over.get("layer_delay_s", self._delay_s))
        if (rtt or delay) and self._warned_emulation != (rtt, delay):
            self._warned_emulation = (rtt, delay)
            logger.warning("EMULATED cloud-edge link in the transport: +%.1f ms per message, "
                           "+%.1f ms per layer (test/benchmark emulation, not the network)",
                           1e3 * rtt, 1e3 * delay)
        return rtt, delay


class LayerStream:
    """Fetches layers in order on a background thread; one Future per layer.

    Layers travel in messages of `layers_per_message` (the last one may be shorter). Up to
    `max_inflight` message calls are outstanding (flow control): a cold prompt's call returns as
    soon as the cloud computed that message's layers. The message payloads are pulled one after
    another, so each message costs its own latency (stop-and-wait; what grouping amortises).
    With an emulated round trip r every message arrives r later; with an emulated layer delay d,
    layer i is ready no earlier than start + (i + 1) * d (one serial link).
    """

    def __init__(self, client: CloudClient, prompt_id: str, layers: list[int], max_inflight: int,
                 layers_per_message: int = 1, codec: str = "none"):
        self.prompt_id, self.layers = prompt_id, layers
        self.layers_per_message, self.codec = layers_per_message, codec
        g = layers_per_message
        self.groups = [layers[i:i + g] for i in range(0, len(layers), g)]
        self.futures: dict[int, Future] = {l: Future() for l in layers}
        self.timings: dict[int, dict] = {l: {} for l in layers}
        self.messages: list[dict] = []  # per message: layers, bytes, header/pull/ready times
        self._client, self._inflight = client, max_inflight
        self.t_start = self._link_free = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"ep-fetch-{prompt_id}")
        self._thread.start()

    def result(self, layer: int, timeout_s: float) -> tuple[LayerHeader, "object"]:
        return self.futures[layer].result(timeout=timeout_s)

    def consumed(self, layer: int, event) -> None:
        """The consumer is done with `layer`'s tensor (on the GPU once `event`, if any, has
        completed). Object-store layers need nothing; pair_link.PairStream frees a slot."""

    def _call(self, group: list[int]):
        c = self._client
        if len(group) == 1 and self.codec == "none":  # the plain per-layer call
            return c._call("fetch_layer", self.prompt_id, c._digest, group[0])
        return c._call("fetch_layers", self.prompt_id, c._digest, list(group), self.codec)

    def _run(self) -> None:
        refs = {}
        for i, group in enumerate(self.groups):
            try:
                while len(refs) < self._inflight and len(refs) + i < len(self.groups):
                    j = i + len(refs)
                    refs[j] = self._call(self.groups[j])
                self._finish(group, refs.pop(i))
            except CloudUnavailable as e:  # the cloud is gone or stalls: so is the rest of the
                self._fail(self.layers, e)  # stream; every layer not delivered fails now
                return
            except BaseException as e:  # a bad message (checksum...): that message only
                self._fail(group, e)

    def _fail(self, layers, error: BaseException) -> None:
        for layer in layers:
            if not self.futures[layer].done():
                self.futures[layer].set_exception(error)

    def _now(self) -> float:
        return time.perf_counter() - self.t_start

    def _finish(self, group: list[int], ref) -> None:
        c = self._client
        reply = c._get(ref)
        replies = [reply] if len(group) == 1 and self.codec == "none" else reply
        header_s = self._now()
        pull_s = max(header_s, self.messages[-1]["ready_s"] if self.messages else 0.0)
        headers = [LayerHeader(**h) for h, _ in replies]
        if [h.layer for h in headers] != list(group):
            raise RuntimeError(f"cloud sent layers {[h.layer for h in headers]}, asked {group}")
        raws = c._get([r for _, (r,) in replies])  # one message: its payloads pulled together
        data_s = self._now()
        kvs = [decode_layer(h, raw) for h, raw in zip(headers, raws)]  # raises CorruptLayer
        rtt, delay = c.emulation()
        if rtt:  # EMULATED: this message's round trip on the link
            time.sleep(rtt)
        msg = {"layers": list(group), "nbytes": sum(h.nbytes for h in headers),
               "wire_nbytes": sum(h.payload_nbytes for h in headers), "codec": self.codec,
               "header_s": header_s, "pull_s": pull_s, "data_s": data_s,
               "cloud_compute_s": [h.compute_s for h in headers]}
        for l, header, kv in zip(group, headers, kvs):
            if delay:  # EMULATED: one serial link, this layer occupies it for d after it arrived
                self._link_free = max(self._link_free, time.perf_counter()) + delay
                time.sleep(max(0.0, self._link_free - time.perf_counter()))
            tm = self.timings[l]
            tm.update(header_s=header_s, data_s=data_s, ready_s=self._now(), nbytes=header.nbytes,
                      wire_nbytes=header.payload_nbytes, cloud_compute_s=header.compute_s,
                      message=len(self.messages))
            self.futures[l].set_result((header, kv))
        msg["ready_s"] = self._now()
        self.messages.append(msg)

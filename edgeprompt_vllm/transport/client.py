"""The edge's Ray client to the cloud actor: the only way the edge talks to the cloud.

Privacy by construction (DESIGN.md invariant 1): its public methods take only a cloud prompt id
(checked against the cloud's own registry), the model fingerprint (fixed at connect), layer
indices and flow control. There is no method that could carry edge tokens or text.

    client = CloudClient.connect(config, fingerprint)   # finds the actor; handshake or raise
    client.registry() -> [CloudPrompt]                  # cloud -> edge: public prompts
    stream = client.fetch_layers("sys-A", range(L))     # starts a background fetch
    header, kv = stream.result(l, timeout)              # kv: [2, T, Hkv, hs], checksum verified
"""

import threading
import time
from concurrent.futures import Future
from typing import Iterable

import ray

from edgeprompt_vllm.config import EdgePromptConfig
from edgeprompt_vllm.fingerprint import Fingerprint, FingerprintMismatch
from edgeprompt_vllm.prompts import CloudPrompt, check_prompt_id
from edgeprompt_vllm.transport.audit import AuditLog
from edgeprompt_vllm.transport.wire import LayerHeader, decode_layer


class CloudUnavailable(RuntimeError):
    """The cloud actor cannot be found or does not answer in time."""


class UnknownCloudPrompt(KeyError):
    pass


def ensure_ray(address: str | None, namespace: str) -> None:
    if not ray.is_initialized():
        ray.init(address=address or "auto", namespace=namespace, log_to_driver=False,
                 logging_level="WARNING", include_dashboard=False)


class CloudClient:
    def __init__(self, actor, fingerprint: Fingerprint, timeout_s: float = 60.0,
                 audit: AuditLog | None = None, emulated_layer_delay_s: float = 0.0):
        self._actor = actor
        self._fp = fingerprint
        self._digest = fingerprint.digest()
        self._timeout_s = timeout_s
        self._audit = audit or AuditLog(None)
        self._delay_s = emulated_layer_delay_s
        self._known: set[str] = set()
        self.cloud_info: dict = {}

    @classmethod
    def connect(cls, config: EdgePromptConfig, fingerprint: Fingerprint) -> "CloudClient":
        ensure_ray(config.ray_address, config.namespace)
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
                     config.emulated_layer_delay_s)
        client.handshake()
        client._timeout_s = config.fetch_timeout_s
        return client

    # -- the calls toward the cloud: every argument goes through _call (and the audit) --
    def _call(self, method: str, *args):
        self._audit.record(method, args)
        return getattr(self._actor, method).remote(*args)

    def _get(self, ref, timeout_s: float | None = None):
        try:
            return ray.get(ref, timeout=timeout_s or self._timeout_s)
        except ray.exceptions.GetTimeoutError as e:
            raise CloudUnavailable(f"cloud did not answer in {timeout_s or self._timeout_s} s") from e
        except ray.exceptions.RayActorError as e:
            raise CloudUnavailable(f"cloud actor died: {e}") from e

    def handshake(self) -> dict:
        """Refuses (FingerprintMismatch) unless the cloud runs the same model and layout."""
        reply = self._get(self._call("handshake", self._fp.to_dict()))
        if not reply["ok"]:
            raise FingerprintMismatch(reply["error"])
        self._fp.check_same(Fingerprint.from_dict(reply["fingerprint"]))
        self.cloud_info = reply
        return reply

    def registry(self) -> list[CloudPrompt]:
        prompts = [CloudPrompt.from_dict(d) for d in self._get(self._call("registry", self._digest))]
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

    def describe(self, prompt_id: str) -> dict:
        return self._get(self._call("describe", self._check_id(prompt_id), self._digest))

    def fetch_layers(self, prompt_id: str, layers: Iterable[int], max_inflight: int = 8) -> "LayerStream":
        layers = self._check_layers(layers)
        return LayerStream(self, self._check_id(prompt_id), layers, max(1, int(max_inflight)))


class LayerStream:
    """Fetches layers in order on a background thread; one Future per layer.

    Up to `max_inflight` fetch calls are outstanding (flow control). A cold prompt's layer call
    returns as soon as the cloud computed that layer. With an emulated delay d, layer i is
    ready no earlier than start + (i + 1) * d (one serial link).
    """

    def __init__(self, client: CloudClient, prompt_id: str, layers: list[int], max_inflight: int):
        self.prompt_id, self.layers = prompt_id, layers
        self.futures: dict[int, Future] = {l: Future() for l in layers}
        self.timings: dict[int, dict] = {l: {} for l in layers}
        self._client, self._inflight = client, max_inflight
        self.t_start = self._link_free = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"ep-fetch-{prompt_id}")
        self._thread.start()

    def result(self, layer: int, timeout_s: float) -> tuple[LayerHeader, "object"]:
        return self.futures[layer].result(timeout=timeout_s)

    def _run(self) -> None:
        c = self._client
        refs = {}
        for i, l in enumerate(self.layers):
            while len(refs) < self._inflight and len(refs) + i < len(self.layers):
                nxt = self.layers[i + len(refs)]
                refs[nxt] = c._call("fetch_layer", self.prompt_id, c._digest, nxt)
            ref = refs.pop(l)
            try:
                self._finish(i, l, ref)
            except BaseException as e:  # each layer fails on its own; never hang the waiter
                self.futures[l].set_exception(e)

    def _finish(self, i: int, layer: int, ref) -> None:
        c, tm = self._client, self.timings[layer]
        header_d, (data_ref,) = c._get(ref)
        tm["header_s"] = time.perf_counter() - self.t_start
        raw = c._get(data_ref)
        tm["data_s"] = time.perf_counter() - self.t_start
        header = LayerHeader(**header_d)
        kv = decode_layer(header, raw)  # raises CorruptLayer
        if c._delay_s:  # one serial link: this layer occupies it for d after it arrived
            self._link_free = max(self._link_free, time.perf_counter()) + c._delay_s
            time.sleep(max(0.0, self._link_free - time.perf_counter()))
        tm["ready_s"] = time.perf_counter() - self.t_start
        tm["nbytes"] = header.nbytes
        tm["cloud_compute_s"] = header.compute_s
        self.futures[layer].set_result((header, kv))

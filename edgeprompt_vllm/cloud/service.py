"""CloudPromptService: the cloud's Ray actor. Prefills cloud prompts once, keeps and streams their KV.

It runs the same model as the edges in a vLLM engine inside this actor process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), with prefix caching off so each prompt is really computed,
and captures per-layer K, V with hooks (capture.py). Threaded (max_concurrency): fetches of a
cold prompt wait on per-layer slots that fill while the prefill runs (the paper's timeline).

Edge-facing methods take only a prompt id, the fingerprint digest and a layer index, each
checked (a registered id, this model's digest, an int layer in range, a known codec) before
anything else runs; anything else is refused with an error naming the parameter.
"""

import os
import threading
import time

import ray
import torch

from edgeprompt_vllm.cloud.pair_sender import PairSender
from edgeprompt_vllm.fingerprint import Fingerprint, model_fingerprint
from edgeprompt_vllm.log import get_logger
from edgeprompt_vllm.prompts import CloudPrompt, PromptRegistry
from edgeprompt_vllm.transport.pair_group import device_checksum
from edgeprompt_vllm.transport.wire import decode_layer, encode_kv

logger = get_logger(__name__)


class CloudPromptService:
    def __init__(self, model: str, dtype: str = "float32", block_size: int = 32,
                 max_kv_bytes: int = 1 << 30, max_model_len: int = 2048, load_format: str = "auto",
                 engine_kwargs: dict | None = None):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the model must live in this process
        from vllm import LLM

        from edgeprompt_vllm.cloud.capture import KVCapture
        from edgeprompt_vllm.cloud.store import PromptStore

        kw = dict(dtype=dtype, enforce_eager=True, enable_prefix_caching=False,
                  block_size=block_size, max_model_len=max_model_len, load_format=load_format,
                  max_num_batched_tokens=max_model_len, kv_cache_memory_bytes=1 << 28,
                  max_num_seqs=1, seed=0)
        kw.update(engine_kwargs or {})
        self.llm = LLM(model, **kw)
        self.fingerprint = model_fingerprint(model, dtype, block_size, load_format,
                                             _engine_model_config(self.llm).quantization)
        self.max_model_len = max_model_len
        self.capture = KVCapture(self.fingerprint.num_kv_heads, self.fingerprint.head_size)
        (n,) = self.llm.apply_model(self.capture.install)
        if n != self.fingerprint.num_layers:
            raise RuntimeError(f"model has {n} attention layers, config.json says {self.fingerprint.num_layers}")
        self.registry = PromptRegistry(block_size)
        self.store = PromptStore(max_kv_bytes)
        self._engine_lock = threading.Lock()
        self._reg_lock = threading.Lock()
        self._sources: dict[str, dict] = {}  # prompt id -> {"kind", "content"}: how it was given
        self.prefills = 0
        self._encodings: dict = {}  # (prompt, layer, checksum, codec) -> encoded (header, ref)
        self._stalls: dict[tuple[str, int], float] = {}  # tests only: stall_layer_for_testing
        self.pairs = PairSender(_engine_device(), ray.util.get_node_ip_address())

    # ---------------- registration (operators, configs) ----------------
    def register_prompt(self, prompt_id: str, token_ids: list[int] | None = None,
                        text: str | None = None, pinned: bool = False, prefill: bool = False) -> dict:
        """Registers a cloud prompt by token ids or text; `prefill` computes it now (warm)."""
        return self._register(prompt_id, token_ids, text, pinned, prefill,
                              {"kind": "text", "content": text} if text is not None else
                              {"kind": "tokens", "content": None})

    def _register(self, prompt_id, token_ids, text, pinned, prefill, source) -> dict:
        if (token_ids is None) == (text is None):
            raise ValueError("give exactly one of token_ids, text")
        if text is not None:
            token_ids = self.llm.get_tokenizer().encode(text)  # as vLLM tokenizes a text prompt
        prompt = CloudPrompt(prompt_id, tuple(int(t) for t in token_ids), pinned)
        if len(prompt.token_ids) >= self.max_model_len:
            raise ValueError(f"cloud prompt {prompt_id!r} has {len(prompt.token_ids)} tokens; "
                             f"max_model_len is {self.max_model_len}")
        with self._reg_lock:
            self.registry.add(prompt)
            self._sources[prompt_id] = source
        if prefill:
            self._prefill(prompt)
        return {"prompt_id": prompt_id, "num_tokens": len(prompt.token_ids),
                "shipped_tokens": prompt.shipped_len(self.registry.block_size)}

    def register_chat_system(self, prompt_id: str, system: str, pinned: bool = False,
                             prefill: bool = False) -> dict:
        """A chat system prompt, as the token prefix every conversation with it starts with."""
        tok = self.llm.get_tokenizer()

        def render(user):  # as vLLM's chat endpoint: render to text, then encode it
            text = tok.apply_chat_template([{"role": "system", "content": system},
                                            {"role": "user", "content": user}],
                                           tokenize=False, add_generation_prompt=True)
            return tok.encode(text, add_special_tokens=False)

        a, b = render("a"), render("Zq 9")
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return self._register(prompt_id, list(a[:n]), None, pinned, prefill,
                              {"kind": "system", "content": system})

    def unregister(self, prompt_id: str) -> None:
        with self._reg_lock:
            self.registry.remove(prompt_id)
            self._sources.pop(prompt_id, None)
        self.store.drop(prompt_id)

    # ---------------- edge-facing: prompt id, fingerprint, layer index only ----------------
    def handshake(self, edge_fingerprint: dict) -> dict:
        try:
            diff = self.fingerprint.diff(Fingerprint.from_dict(edge_fingerprint))
        except TypeError as e:
            diff = [f"malformed fingerprint: {e}"]
        return {"ok": not diff, "fingerprint": self.fingerprint.to_dict(),
                "error": ("model fingerprint mismatch: " + "; ".join(diff)) if diff else None,
                "pair": self.pairs.describe()}

    def _check(self, digest: str) -> None:
        if digest != self.fingerprint.digest():
            raise PermissionError("fingerprint digest does not match this cloud's model; handshake first")

    def registry(self, digest: str) -> list[dict]:
        self._check(digest)
        with self._reg_lock:
            return [self.registry.get(pid).to_dict() for pid in self.registry.ids()]

    def catalog(self, digest: str) -> list[dict]:
        """How each public cloud prompt was given (for an edge's API server, which prepends it):
        kind "system" (a chat system message), "text" (a text prefix) or "tokens" (token ids);
        the registry's entries plus "kind" and "content" (the system message or text)."""
        self._check(digest)
        with self._reg_lock:
            return [{**self.registry.get(pid).to_dict(),
                     **self._sources.get(pid, {"kind": "tokens", "content": None})}
                    for pid in self.registry.ids()]

    def _registered(self, prompt_id) -> CloudPrompt:
        if not isinstance(prompt_id, str):
            raise TypeError(f"prompt_id must be a string, not {type(prompt_id).__name__}")
        with self._reg_lock:
            return self.registry.get(prompt_id)  # KeyError: not registered

    def _layer(self, layer) -> int:
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise TypeError(f"layer must be an int, not {type(layer).__name__}")
        if not 0 <= layer < self.fingerprint.num_layers:
            raise IndexError(f"layer {layer} outside 0..{self.fingerprint.num_layers - 1}")
        return layer

    def describe(self, prompt_id: str, digest: str) -> dict:
        self._check(digest)
        prompt = self._registered(prompt_id)
        kv = self.store.get(prompt_id)
        slots = kv.slots if kv else []
        return {"prompt_id": prompt_id, "token_ids": list(prompt.token_ids),
                "shipped_tokens": prompt.shipped_len(self.registry.block_size),
                "num_layers": self.fingerprint.num_layers,
                "bytes_per_layer": prompt.shipped_len(self.registry.block_size)
                * self.fingerprint.kv_bytes_per_token(),
                "checksums": [s.header.checksum if s.header else None for s in slots],
                "state": "warm" if kv and kv.complete else ("computing" if kv else "cold")}

    def fetch_layer(self, prompt_id: str, digest: str, layer: int, timeout_s: float = 120.0):
        """-> (header dict, [ObjectRef of the raw bytes]); waits until the layer is computed
        (at most `timeout_s`, capped at _MAX_WAIT_S)."""
        self._check(digest)
        layer = self._layer(layer)
        kv = self._ensure(self._registered(prompt_id))
        if not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise ValueError(f"timeout_s must be a positive number, not {timeout_s!r}")
        timeout_s = min(float(timeout_s), _MAX_WAIT_S)
        slot = kv.slots[layer]
        self._wait_layer(prompt_id, layer, slot, timeout_s)
        return slot.header.to_dict(), [slot.ref]  # a list: Ray passes the inner ref unresolved

    def _wait_layer(self, prompt_id: str, layer: int, slot, timeout_s: float) -> None:
        stall = self._stalls.get((prompt_id, layer)) or self._stalls.get((prompt_id, -1))
        if stall:  # tests only (stall_layer_for_testing)
            time.sleep(stall)
        if not slot.ready.wait(timeout_s):
            raise TimeoutError(f"layer {layer} of {prompt_id!r} not computed in {timeout_s} s")
        if slot.error:
            raise RuntimeError(f"cloud prefill of {prompt_id!r} failed: {slot.error}")

    def fetch_layers(self, prompt_id: str, digest: str, layers: list[int], codec: str = "none",
                     timeout_s: float = 120.0) -> list:
        """Several layers as one message, optionally encoded (transport/codecs.py):
        -> [(header dict, [ObjectRef of the encoded bytes])] in the order asked; returns once
        all of them are computed. Encodings are made once per (layer, codec) and kept."""
        from edgeprompt_vllm.transport.codecs import check_codec

        check_codec(codec)
        if not isinstance(layers, list) or not 0 < len(layers) <= self.fingerprint.num_layers:
            raise ValueError(f"layers must be a list of 1 to {self.fingerprint.num_layers} layer "
                             "indices")
        layers = [self._layer(layer) for layer in layers]
        out = []
        for layer in layers:
            header_d, (ref,) = self.fetch_layer(prompt_id, digest, layer, timeout_s)
            if codec != "none":
                header_d, ref = self._encoded(header_d, ref, codec)
            out.append((header_d, [ref]))
        return out

    # ---------------- the GPU-pair channel (cloud/pair_sender.py, transport/pair_link.py) ----
    def pair_open(self, digest: str, backend: str, timeout_s: float = 60.0) -> dict:
        """Opens this cloud's end of a pair channel for one edge receiver -> where to join."""
        self._check(digest)
        return self.pairs.open(backend, min(float(timeout_s), _MAX_WAIT_S))

    def pair_send(self, prompt_id: str, digest: str, layer: int, pair_id: str, seq: int,
                  timeout_s: float = 120.0) -> dict:
        """Sends one layer over the pair as its `seq`-th send (once computed) -> its header
        dict plus "dsum", the device checksum the receiver must find."""
        self._check(digest)
        layer = self._layer(layer)
        kv = self._ensure(self._registered(prompt_id))
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise ValueError(f"seq must be an int >= 0, not {seq!r}")
        timeout_s = min(float(timeout_s), _MAX_WAIT_S)
        slot = kv.slots[layer]

        def payload():
            self._wait_layer(prompt_id, layer, slot, timeout_s)
            return self._device_kv(slot)

        self.pairs.send(pair_id, seq, payload, timeout_s)
        return {**slot.header.to_dict(), "dsum": slot.dsum}

    def pair_close(self, digest: str, pair_id: str) -> None:
        self._check(digest)
        self.pairs.close(pair_id)

    def _device_kv(self, slot):
        """The layer as a tensor on this cloud's device, and its device checksum (kept)."""
        if slot.device_kv is None:  # from the stored bytes, verified first
            kv = decode_layer(slot.header, ray.get(slot.ref)).to(self.pairs.device, copy=True)
            slot.device_kv, slot.dsum = kv, device_checksum(kv)
        return slot.device_kv, slot.dsum

    def _encoded(self, header_d: dict, ref, codec: str):
        from edgeprompt_vllm.transport.wire import LayerHeader

        key = (header_d["prompt_id"], header_d["layer"], header_d["checksum"], codec)
        with self._reg_lock:
            hit = self._encodings.get(key)
        if hit is None:
            header = LayerHeader(**header_d)
            kv = decode_layer(header, ray.get(ref))  # verifies the stored bytes first
            enc_header, raw = encode_kv(header.prompt_id, header.layer, kv, header.compute_s, codec)
            hit = (enc_header.to_dict(), ray.put(raw))
            with self._reg_lock:
                self._encodings[key] = hit
                while len(self._encodings) > _MAX_ENCODINGS:  # the oldest encodings go first
                    self._encodings.pop(next(iter(self._encodings)))
        return hit

    # ---------------- prefill and capture ----------------
    def _ensure(self, prompt: CloudPrompt):
        kv, created = self.store.start(prompt.prompt_id, self.fingerprint.num_layers, prompt.pinned)
        if created:
            threading.Thread(target=self._run_prefill, args=(prompt, kv), daemon=True).start()
        return kv

    def _prefill(self, prompt: CloudPrompt) -> None:
        kv = self._ensure(prompt)
        for s in kv.slots:
            s.ready.wait()

    def _run_prefill(self, prompt: CloudPrompt, kv) -> None:
        from vllm import SamplingParams, TokensPrompt

        n = prompt.shipped_len(self.registry.block_size)

        def on_layer(layer, k, v, compute_s):
            both = torch.stack([k, v])  # [2, T, H, hs] on the engine's device
            header, raw = encode_kv(prompt.prompt_id, layer, both, compute_s)
            if layer == self.fingerprint.num_layers - 1:  # counted before anyone can fetch it
                self.prefills += 1
            # with a pair channel open, a GPU cloud keeps the layer on the GPU too (else the first
            # pair send of a layer uploads it from the stored bytes: _device_kv)
            keep = both.is_cuda and self.pairs.active()
            self.store.fill(kv, layer, header, ray.put(raw), both if keep else None,
                            device_checksum(both) if keep else None)

        try:
            if n == 0:
                raise ValueError(f"cloud prompt {prompt.prompt_id!r} is shorter than one block")
            with self._engine_lock:
                self.capture.begin(n, on_layer)
                try:
                    t0 = time.perf_counter()
                    self.llm.generate([TokensPrompt(prompt_token_ids=list(prompt.token_ids))],
                                      SamplingParams(max_tokens=1), use_tqdm=False)
                finally:
                    self.capture.end()
            logger.info("prefilled cloud prompt %s (%d tokens) in %.3f s", prompt.prompt_id,
                        len(prompt.token_ids), time.perf_counter() - t0)
            if not kv.complete:
                raise RuntimeError("the prefill did not reach every attention layer")
        except Exception as e:  # waiters get the error, never a hang
            logger.exception("prefill of %s failed", prompt.prompt_id)
            kv.fail(f"{type(e).__name__}: {e}")

    # ---------------- operations and tests ----------------
    def stats(self) -> dict:
        import psutil

        return {"prefills": self.prefills, "store": self.store.summary(),
                "registered": len(self.registry), "rss_bytes": psutil.Process().memory_info().rss,
                "fingerprint": self.fingerprint.to_dict(), "node_id": ray.get_runtime_context().get_node_id()}

    def stall_layer_for_testing(self, prompt_id: str, layer: int, seconds: float) -> None:
        """Fetches of this layer (-1: every layer) of the prompt answer `seconds` late (fault
        tests: a stalled cloud); 0 ends it."""
        if seconds:
            self._stalls[(prompt_id, int(layer))] = float(seconds)
        else:
            self._stalls.pop((prompt_id, int(layer)), None)

    def corrupt_layer_for_testing(self, prompt_id: str, layer: int) -> None:
        """Replaces a stored layer by flipped bytes under the old checksum (integrity tests)."""
        kv = self.store.get(prompt_id)
        slot = kv.slots[layer]
        device_kv, _ = self._device_kv(slot)  # the pair channel's copy, under the old checksum
        flat = device_kv.view(-1).view(torch.uint8)
        flat[flat.numel() // 2] ^= 0xFF
        raw = ray.get(slot.ref).copy()
        raw[len(raw) // 2] ^= 0xFF
        slot.ref = ray.put(raw)


_MAX_ENCODINGS = 256
_MAX_WAIT_S = 300.0  # no fetch holds one of the actor's threads longer than this


def _engine_model_config(llm):
    """The engine's resolved ModelConfig (its quantization method, as the edge's connector sees it)."""
    engine = llm.llm_engine
    return getattr(engine, "model_config", None) or engine.vllm_config.model_config


def _engine_device() -> torch.device:
    """The device of this actor's engine (CUDA_VISIBLE_DEVICES narrows it to one GPU)."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")

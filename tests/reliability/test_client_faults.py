"""The edge's cloud client under faults, with a fake actor (no Ray, no vLLM): a dead cloud makes
calls fail at once, then is looked up again by name; a cloud back with another model stays
refused; a timeout backs off; a load stream stops at a dead cloud but not at a bad message.
(tests/reliability/test_faults.py shows the same with the real parts.)"""

import time

import pytest
import ray
import torch

from edgeprompt_vllm.fingerprint import model_fingerprint
from edgeprompt_vllm.transport import client as client_module
from edgeprompt_vllm.transport.client import RETRY_S, CloudClient, CloudUnavailable
from edgeprompt_vllm.transport.wire import CorruptLayer, encode_layer


class Ref:
    def __init__(self, value=None, error=None):
        self.value, self.error = value, error


class FakeActor:
    """Answers like CloudPromptService; `dead` makes every call fail as a killed actor's would."""

    def __init__(self, fp, dead=False, corrupt_layer=None):
        self.fp, self.dead, self.corrupt_layer, self.calls = fp, dead, corrupt_layer, []

    def __getattr__(self, method):
        actor = self

        class Method:
            def remote(self, *args):
                actor.calls.append(method)
                if actor.dead:
                    return Ref(error=ray.exceptions.RayActorError())
                return Ref(getattr(actor, f"do_{method}")(*args))

        return Method()

    def do_handshake(self, fp):
        return {"ok": fp == self.fp.to_dict(), "fingerprint": self.fp.to_dict(),
                "error": None if fp == self.fp.to_dict() else "model fingerprint mismatch: weights"}

    def do_registry(self, digest):
        return [{"prompt_id": "p", "token_ids": list(range(64)), "pinned": False}]

    def do_describe(self, pid, digest):
        return {"state": "warm"}

    def do_fetch_layer(self, pid, digest, layer):
        header, raw = encode_layer(pid, layer, torch.ones(64, 2, 64), torch.ones(64, 2, 64))
        if layer == self.corrupt_layer:
            raw = raw.copy()
            raw[0] ^= 0xFF
        return header.to_dict(), [Ref(raw)]


def fake_get(ref, timeout=None):
    if isinstance(ref, list):
        return [fake_get(r) for r in ref]
    if ref.error is not None:
        raise ref.error
    return ref.value


@pytest.fixture
def fp(tiny_model):
    return model_fingerprint(tiny_model, "float32", 32)


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    monkeypatch.setattr(client_module.ray, "get", fake_get)


def make_client(fp, first, located):
    c = CloudClient(first, fp, timeout_s=5, locate=lambda: located.pop(0))
    c.handshake()
    c.registry()
    return c


def test_a_dead_cloud_fails_at_once_then_is_found_again(fp):
    dead, back = FakeActor(fp), FakeActor(fp)
    c = make_client(fp, dead, [back])
    dead.dead = True
    with pytest.raises(CloudUnavailable, match="cloud actor died"):
        c.describe("p")
    assert c.down_reason is not None
    n = len(dead.calls)
    with pytest.raises(CloudUnavailable):
        c.describe("p")  # down: nothing is sent
    assert len(dead.calls) == n and back.calls == []
    time.sleep(0.25)  # an actor that died is looked up again soon
    assert c.describe("p") == {"state": "warm"}
    assert back.calls == ["handshake", "describe"] and c.down_reason is None


def test_a_cloud_back_with_another_model_stays_refused(fp, tiny_model):
    other = FakeActor(model_fingerprint(tiny_model, "float32", 32, load_format="dummy"))
    dead = FakeActor(fp)
    c = make_client(fp, dead, [other])
    dead.dead = True
    with pytest.raises(CloudUnavailable):
        c.describe("p")
    time.sleep(0.25)
    with pytest.raises(CloudUnavailable, match="the cloud now runs another model"):
        c.describe("p")
    assert other.calls == ["handshake"]  # its KV was never asked for
    with pytest.raises(CloudUnavailable):
        c.describe("p")  # and it stays refused until the next look
    assert other.calls == ["handshake"]


def test_a_timeout_backs_off(fp, monkeypatch):
    actor = FakeActor(fp)
    c = make_client(fp, actor, [actor])
    monkeypatch.setattr(client_module.ray, "get", lambda ref, timeout=None: (_ for _ in ()).throw(
        ray.exceptions.GetTimeoutError("slow")))
    with pytest.raises(CloudUnavailable, match="did not answer"):
        c.describe("p")
    n = len(actor.calls)
    t0 = time.monotonic()
    with pytest.raises(CloudUnavailable):
        c.describe("p")
    assert len(actor.calls) == n and time.monotonic() - t0 < 0.1
    assert 0 < c._retry_at - time.monotonic() <= RETRY_S


def test_a_stream_skips_a_bad_message_but_stops_at_a_dead_cloud(fp):
    actor = FakeActor(fp, corrupt_layer=1)
    c = make_client(fp, actor, [])
    stream = c.fetch_layers("p", range(4))
    assert [stream.result(l, 5)[1].shape for l in (0, 2, 3)] == [(2, 64, 2, 64)] * 3
    with pytest.raises(CorruptLayer):
        stream.result(1, 5)  # that message only
    actor.corrupt_layer, actor.dead = None, True
    stream = c.fetch_layers("p", range(4))
    t0 = time.monotonic()
    for layer in range(4):  # every layer fails at once: nobody waits a timeout per layer
        with pytest.raises(CloudUnavailable):
            stream.result(layer, 5)
    assert time.monotonic() - t0 < 1


def test_a_stalled_cloud_costs_a_stream_one_timeout(fp, monkeypatch):
    actor = FakeActor(fp)
    c = make_client(fp, actor, [])
    c._timeout_s = 0.3

    def stalled_get(ref, timeout=None):  # the cloud never answers a fetch
        if isinstance(ref, Ref) and isinstance(ref.value, tuple):
            time.sleep(timeout)
            raise ray.exceptions.GetTimeoutError("stalled")
        return fake_get(ref, timeout)

    monkeypatch.setattr(client_module.ray, "get", stalled_get)
    t0 = time.monotonic()
    stream = c.fetch_layers("p", range(4))
    for layer in range(4):
        with pytest.raises(CloudUnavailable, match="did not answer"):
            stream.result(layer, 5)
    assert time.monotonic() - t0 < 0.6  # one timeout, not one per layer (4 x 0.3 s)

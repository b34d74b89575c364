"""The GPU-pair transport's logic on CPU (gloo), with the real parts: a CloudPromptService actor
(the tiny model), the edge's receiver actor and PairLink in this process. Layers arrive exactly
as the object store delivers them; a flipped layer fails alone; a stalled cloud breaks the link
within the timeout (its receiver killed), and a new link then works; the calls toward the cloud
carry nothing but ids, the digest, layer indices and sequence numbers. The same code on two GPUs
(NCCL): tests/edge/test_pair_gpu.py."""

import json
import pickle
import threading
import time
import uuid

import pytest
import ray
import torch

from edgeprompt_vllm.config import EdgePromptConfig
from edgeprompt_vllm.fingerprint import model_fingerprint
from edgeprompt_vllm.transport import pair_group
from edgeprompt_vllm.transport.client import RETRY_S, CloudClient
from edgeprompt_vllm.transport.pair_group import PairGroup, device_checksum, host_store, peer_store
from edgeprompt_vllm.transport.pair_link import PairBroken, PairLink, pair_possible
from edgeprompt_vllm.transport.wire import CorruptLayer

pytestmark = pytest.mark.slow
BS, LAYERS = 32, 4
SHAPE = (2, 96, 2, 64)  # a 100-token prompt ships 96 tokens of the tiny model


@pytest.fixture(scope="module")
def cloud(tiny_model, tmp_path_factory):
    from edgeprompt_vllm.cloud.deploy import start_cloud_service

    ns = f"ep-pair-test-{uuid.uuid4().hex[:8]}"
    ray.init(address="local", namespace=ns, include_dashboard=False, num_cpus=2, log_to_driver=False)
    try:
        actor = start_cloud_service(str(tiny_model), name="cloud", namespace=ns, detached=False,
                                    num_cpus=0, block_size=BS)
        for pid, lo in (("P", 10), ("Q", 500), ("R", 900)):  # R computed now, the others cold
            ray.get(actor.register_prompt.remote(pid, token_ids=list(range(lo, lo + 100)),
                                                 prefill=pid == "R"))
        audit = tmp_path_factory.mktemp("pair") / "audit.jsonl"
        config = EdgePromptConfig(namespace=ns, actor_name="cloud", connect_timeout_s=30,
                                  fetch_timeout_s=30, audit_path=str(audit))
        c = CloudClient.connect(config, model_fingerprint(tiny_model, "float32", BS))
        c.registry()
        yield actor, c, audit
    finally:
        ray.shutdown()


def layers_of(stream) -> list[torch.Tensor]:
    return [stream.result(l, 60)[1] for l in range(LAYERS)]


def test_layers_arrive_exactly_as_through_the_object_store(cloud):
    _, client, _ = cloud
    assert client.cloud_info["pair"]["backend"] == "gloo"
    link = PairLink(client, torch.device("cpu"), timeout_s=30)
    try:
        streams = [link.fetch_layers(pid, range(LAYERS), SHAPE, "float32") for pid in "PQ"]
        got = [layers_of(s) for s in streams]  # two prompts at once over one link, in step
        for pid, pair_layers in zip("PQ", got):
            want = layers_of(client.fetch_layers(pid, range(LAYERS)))
            assert all(torch.equal(a, b) for a, b in zip(pair_layers, want, strict=True)), pid
        assert not torch.equal(got[0][0], got[1][0])
        assert all(streams[0].timings[l]["nbytes"] == 96 * 2 * 2 * 64 * 4 for l in range(LAYERS))
    finally:
        link.close()


def test_a_flipped_layer_fails_alone_and_the_link_stays_up(cloud):
    actor, client, _ = cloud
    link = PairLink(client, torch.device("cpu"), timeout_s=30)
    try:
        ray.get(actor.corrupt_layer_for_testing.remote("R", 2))
        stream = link.fetch_layers("R", range(LAYERS), SHAPE, "float32")
        with pytest.raises(CorruptLayer, match="layer 2 of 'R': device checksum"):
            stream.result(2, 60)
        assert [stream.result(l, 60)[1].shape for l in (0, 1, 3)] == [SHAPE] * 3
        assert link.broken is None
        assert len(layers_of(link.fetch_layers("P", range(LAYERS), SHAPE, "float32"))) == LAYERS
    finally:
        link.close()


def test_a_stalled_cloud_breaks_the_link_in_time_and_a_new_one_works(cloud):
    actor, client, _ = cloud
    link = PairLink(client, torch.device("cpu"), timeout_s=2)
    ray.get(actor.stall_layer_for_testing.remote("Q", 1, 6.0))
    try:
        t0 = time.perf_counter()
        stream = link.fetch_layers("Q", range(LAYERS), SHAPE, "float32")
        assert stream.result(0, 10)[1].shape == SHAPE
        for l in (1, 2, 3):
            with pytest.raises(PairBroken):
                stream.result(l, 10)
        assert time.perf_counter() - t0 < 5  # one timeout, not one per layer
        assert link.broken
        with pytest.raises(ray.exceptions.RayActorError):  # its receiver was killed
            ray.get(link.receiver.ping.remote(), timeout=10)
        with pytest.raises(PairBroken):
            link.fetch_layers("P", range(LAYERS), SHAPE, "float32")
    finally:
        ray.get(actor.stall_layer_for_testing.remote("Q", 1, 0))
    assert client.down_reason  # a stalled cloud is down for the client too, for RETRY_S
    time.sleep(RETRY_S)
    fresh = PairLink(client, torch.device("cpu"), timeout_s=30)
    try:
        assert len(layers_of(fresh.fetch_layers("Q", range(LAYERS), SHAPE, "float32"))) == LAYERS
    finally:
        fresh.close()


def test_the_calls_toward_the_cloud_carry_ids_and_indices_only(cloud):
    _, client, audit = cloud
    records = [json.loads(x) for x in audit.read_text().splitlines()]
    assert {r["method"] for r in records} <= {"handshake", "registry", "describe", "fetch_layer",
                                              "pair_open", "pair_send", "pair_close"}
    sends = [pickle.loads(bytes.fromhex(r["pickled_hex"]))[1] for r in records
             if r["method"] == "pair_send"]
    assert sends and all(len(args) == 6 for args in sends)
    for args in sends:  # prompt id, digest, layer, pair id, sequence number, timeout
        pid, digest, layer, pair_id, seq, timeout = args
        assert pid in "PQR" and digest == client._digest and 0 <= layer < LAYERS
        assert pair_id.startswith("pair-") and isinstance(seq, int) and timeout > 0


def test_pair_group_moves_tensors_in_order_and_checksums_see_every_word():
    store, port = host_store("127.0.0.1")
    groups = {}

    def join(rank):
        groups[rank] = PairGroup(store if rank == 0 else peer_store("127.0.0.1", port), rank,
                                 "gloo", 30)
        groups[rank].hello(torch.device("cpu"))  # rank 1 returns once rank 0's element arrived

    threads = [threading.Thread(target=join, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    sent = [torch.randn(2, 8, 2, 4).to(dt) for dt in (torch.float16, torch.float32)]
    sender = threading.Thread(target=lambda: [groups[0].send(t, device_checksum(t)) for t in sent])
    sender.start()
    for t in sent:
        out = torch.empty_like(t)
        assert groups[1].recv(out) == device_checksum(t) == device_checksum(out)
        assert torch.equal(out, t)
    sender.join(30)
    for g in groups.values():
        g.close()
    t = sent[1]
    flipped = t.clone()
    flipped.view(-1).view(torch.int16)[3] ^= 1
    assert device_checksum(flipped) != device_checksum(t) != device_checksum(t.flip(1))


def test_device_checksum_is_the_position_weighted_word_sum(monkeypatch):
    """sum(w[i] * (i % 65521 + 1)) over the 16-bit words, exactly, across chunk boundaries."""
    monkeypatch.setattr(pair_group, "_CHUNK", pair_group._MOD)  # 3 chunks below
    monkeypatch.setattr(pair_group, "_weights", {})
    t = torch.randint(-(1 << 15), 1 << 15, (2 * pair_group._MOD + 101,), dtype=torch.int16)
    mod = pair_group._MOD
    t[mod - 1], t[2 * mod - 1] = -(1 << 15), (1 << 15) - 1  # extreme words at the top weight 65521
    pos = torch.arange(t.numel(), dtype=torch.int64)
    expected = int((t.to(torch.int64) * (pos % 65521 + 1)).sum())
    assert device_checksum(t) == expected
    assert device_checksum(t.view(torch.float16)) == expected  # any dtype: its 16-bit words


def test_pair_needs_a_channel_that_can_exist():
    cpu = torch.device("cpu")
    assert pair_possible(None, cpu) == "the cloud offers no pair channel"
    assert pair_possible({"backend": "gloo", "device_uuid": None}, cpu) is None
    assert "cloud on a GPU" in pair_possible({"backend": "nccl", "device_uuid": "GPU-x"}, cpu)

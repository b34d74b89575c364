"""The benchmark helpers without engines: workload, Poisson arrivals, metrics, sustainable rate."""

import numpy as np
import pytest
from transformers import AutoTokenizer

from edgeprompt_vllm.bench.load import (
    Result,
    p99_ci95,
    poisson_offsets,
    summarize,
    sustainable_rate,
)
from edgeprompt_vllm.bench.workload import describe_workload, make_workload


@pytest.fixture(scope="module")
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(str(tiny_model))


def test_workload_shapes_passes_and_output_lens(tok):
    w = make_workload(tok, 100, 30, 40, output_len=None, max_output_len=64)
    assert len(w.cloud) == 100 and w.cloud[0] == tok.bos_token_id
    assert len(w.edges) == 40 and all(len(e) == 30 for e in w.edges)
    assert len({tuple(e) for e in w.edges}) == 40  # distinct human turns: no shared edge prefixes
    assert all(4 <= n <= 64 for n in w.output_lens) and len(set(w.output_lens)) > 1
    second = w.part(20, 20)
    assert second.edges == w.edges[20:] and second.output_lens == w.output_lens[20:]
    assert second.prompts()[0] == w.cloud + w.edges[20]
    fixed = make_workload(tok, 100, 30, 4, output_len=16)
    assert fixed.output_lens is None and fixed.edges == w.edges[:4]
    d = describe_workload(fixed, 16)
    assert d["sharegpt_complete_records"] > 10_000 and d["output_lens"] == "fixed 16 (ignore_eos)"
    assert "from ShareGPT" in describe_workload(w, None, 64)["output_lens"]


def test_poisson_offsets():
    t = poisson_offsets(20_000, rate=5.0, seed=1)
    assert t[0] == 0 and np.all(np.diff(t) >= 0)
    assert abs(np.diff(t).mean() - 0.2) < 0.01
    assert np.array_equal(t, poisson_offsets(20_000, 5.0, seed=1))


def test_summarize():
    ok = Result(ok=True, ttft_s=0.1, latency_s=1.1, output_tokens=11, itl_s=[0.1] * 10)
    bad = Result(error="HTTP 500")
    m = summarize([ok, ok, bad], duration_s=2.0)
    assert m["completed"] == 2 and m["failed"] == 1 and m["errors"] == ["HTTP 500"]
    assert m["output_tok_per_s"] == 11.0
    assert m["tpot_ms"]["p50"] == pytest.approx(100.0) and m["ttft_ms"]["p99"] == pytest.approx(
        100.0
    )
    assert m["itl_ms"]["mean"] == pytest.approx(100.0)


def test_p99_interval_brackets_p99_and_narrows_with_more_requests():
    rng = np.random.default_rng(1)
    few, many = rng.gamma(4, 3, 200), rng.gamma(4, 3, 5000)  # per-request TPOT, ms-like
    (lo, hi), (lo2, hi2) = p99_ci95(few, ms=False), p99_ci95(many, ms=False)
    assert lo <= np.percentile(few, 99) <= hi and lo2 <= np.percentile(many, 99) <= hi2
    assert hi2 - lo2 < (hi - lo) / 2
    assert p99_ci95([0.01]) is None
    ok = Result(ok=True, ttft_s=0.1, latency_s=1.1, output_tokens=11, itl_s=[0.1] * 10)
    assert summarize([ok, ok], 1.0)["tpot_ms"]["p99_ci95"] == pytest.approx([100.0, 100.0])


def _pts(*pairs, failed_at=None):
    return [{"rate": r, "tpot_ms": {"p99": t}, "failed": int(r == failed_at)} for r, t in pairs]


def test_sustainable_rate():
    s = sustainable_rate(_pts((2, 20), (4, 30), (8, 70)), slo_ms=50)
    assert s["rate"] == 4 and s["interpolated"] == pytest.approx(6.0) and not s["censored"]
    s = sustainable_rate(_pts((2, 20), (4, 30)), slo_ms=50)
    assert s["rate"] == 4 and s["censored"]
    assert sustainable_rate(_pts((2, 60), (4, 30)), slo_ms=50)["rate"] == 0  # lowest fails
    s = sustainable_rate(_pts((2, 20), (4, 30), (8, 40), failed_at=8), slo_ms=50)
    assert s["rate"] == 4 and s["interpolated"] == 4  # failures are not interpolated


@pytest.mark.parametrize("argv, gpu, edge, cloud", [
    ([], True, 0.65, 0.25),  # the cloud engine shares the edge's GPU
    (["--cloud-device", "1"], True, 0.9, 0.25),  # the cloud on its own GPU
    (["--cloud-device", "1", "--gpu-memory-utilization", "0.8"], True, 0.8, 0.25),
    (["--cloud-device", "1"], False, None, None),  # CPU: no memory shares at all
])
def test_edge_memory_share(argv, gpu, edge, cloud):
    import argparse

    from edgeprompt_vllm.bench.cli import add_workload_args, resolve_memory

    p = argparse.ArgumentParser()
    add_workload_args(p, ("relay",), "64", "engine")
    args = p.parse_args(argv)
    resolve_memory(args, gpu)
    assert (args.gpu_memory_utilization, args.cloud_gpu_memory_utilization) == (edge, cloud)
    assert args.cloud_device == ("1" if gpu and argv else None)


def test_cloud_device_must_be_another_gpu():
    from edgeprompt_vllm.bench.cli import check_cloud_device

    check_cloud_device("1", 2)
    for bad, gpus in (("0", 2), ("1", 1), ("2", 2), ("x", 4)):
        with pytest.raises(SystemExit, match="name a second GPU"):
            check_cloud_device(bad, gpus)


def test_load_client_opens_a_connection_per_request():
    """No pooled keep-alive connection can go stale between rates (the server may close it just
    as it is reused). A keep-alive server counts the connections it accepts; the default
    httpx client would reuse one."""
    import asyncio

    import httpx

    from edgeprompt_vllm.bench.load import fresh_connections_client

    async def count_connections(client) -> int:
        writers = []

        async def serve(reader, writer):
            writers.append(writer)
            try:
                while await reader.readuntil(b"\r\n\r\n"):  # a request's head: answer it
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass  # the client closed the connection

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with client:
            for _ in range(3):
                assert (await client.get(f"http://127.0.0.1:{port}/")).text == "ok"
        for w in writers:
            w.close()
        server.close()
        await server.wait_closed()
        return len(writers)

    assert asyncio.run(count_connections(fresh_connections_client())) == 3
    assert asyncio.run(count_connections(httpx.AsyncClient())) == 1  # pooled: the race exists


def test_cloud_gpu_index_is_mapped_to_the_visible_gpus(monkeypatch):
    """--cloud-device 1 under CUDA_VISIBLE_DEVICES=2,3 is physical GPU 3: the actor's env var
    names physical GPUs (before this, the cloud landed on physical GPU 1)."""
    from edgeprompt_vllm.cloud.deploy import visible_gpu

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3")
    assert [visible_gpu(0), visible_gpu(1)] == ["2", "3"]
    with pytest.raises(ValueError, match="GPU 2 is not visible"):
        visible_gpu(2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_gpu(1) == "1"

"""The documented edge flags, and the metrics plumbing (stats aggregate; Prometheus names)."""

import functools
import json

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from edgeprompt_vllm.config import EdgePromptConfig
from edgeprompt_vllm.edge.stats import EdgePromptPromMetrics, EdgePromptStats
from edgeprompt_vllm.serving.commands import build_edge_args_parser, run_edge_args
from edgeprompt_vllm.serving.edge_args import MIDDLEWARE, edge_serve_args


def test_edge_flags_carry_one_validated_config():
    cfg = EdgePromptConfig(ray_address="10.0.0.5:6379", on_cloud_unavailable="error")
    args = edge_serve_args(cfg, dtype="float16", block_size=16)
    assert args[:6] == ["--dtype", "float16", "--block-size", "16", "--attention-backend", "CUSTOM"]
    assert args[args.index("--middleware") + 1] == MIDDLEWARE
    kvt = json.loads(args[args.index("--kv-transfer-config") + 1])
    assert kvt["kv_connector"] == "EdgePromptConnector" and kvt["kv_role"] == "kv_consumer"
    assert kvt["kv_load_failure_policy"] == "recompute"
    assert kvt["kv_connector_extra_config"] == {"ray_address": "10.0.0.5:6379", "namespace": "edgeprompt",
                                                "on_cloud_unavailable": "error"}
    assert EdgePromptConfig.from_dict(kvt["kv_connector_extra_config"]) == cfg


def test_edge_args_command(capsys):
    import argparse

    args = build_edge_args_parser(argparse.ArgumentParser()).parse_args(
        ["--ray-address", "1.2.3.4:6379", "--model", "/models/m"])
    assert run_edge_args(args) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("vllm serve /models/m --dtype float32 --block-size 32 --attention-backend CUSTOM")
    assert "'{\"kv_connector\":\"EdgePromptConnector\"" in out  # shell-quoted JSON


def test_stats_aggregate_and_empty():
    a, b = EdgePromptStats(), EdgePromptStats()
    assert a.is_empty()
    a.add("cloud_bytes", 100)
    a.observe("layer_waits", 0.5)
    b.request_finished({"status": "loaded"})
    b.request_finished({"status": "cached"})
    b.request_finished({"status": "load_failed_recomputed"})
    b.request_finished(None)
    a.aggregate(b)
    assert a.data["cloud_bytes"] == 100 and a.data["hits_loaded"] == 1 and a.data["hits_cached"] == 1
    assert a.data["misses"] == {"load_failed": 1} and a.data["layer_waits"] == [0.5]
    assert not a.is_empty() and a.reduce()["misses"] == 1
    assert EdgePromptStats(data=a.to_dict()).data == a.data  # crosses processes as a plain dict


def test_prometheus_names():
    reg = CollectorRegistry()
    types = {Counter: functools.partial(Counter, registry=reg), Gauge: functools.partial(Gauge, registry=reg),
             Histogram: functools.partial(Histogram, registry=reg)}

    class Cfg:
        kv_transfer_config = None

    prom = EdgePromptPromMetrics(Cfg(), types, ["model_name", "engine"], {0: ["m", "0"]})
    st = EdgePromptStats()
    st.add("cloud_bytes", 4096)
    st.add("cloud_layers", 4)
    st.add("relay_groups", 2)
    st.observe("relay_groups_per_step", 2)
    st.observe("layer_waits", 0.002)
    st.request_finished({"status": "loaded"})
    st.request_finished({"status": "unknown_cloud_prompt"})
    prom.observe(st.to_dict(), 0)
    text = generate_latest(reg).decode()
    for line in ('edgeprompt_cloud_kv_bytes_total{engine="0",model_name="m"} 4096.0',
                 'edgeprompt_cloud_layers_received_total{engine="0",model_name="m"} 4.0',
                 'edgeprompt_cloud_prompt_hits_total{engine="0",kind="loaded",model_name="m"} 1.0',
                 'edgeprompt_cloud_prompt_misses_total{engine="0",model_name="m",reason="unknown_cloud_prompt"} 1.0',
                 'edgeprompt_relay_groups_total{engine="0",model_name="m"} 2.0',
                 'edgeprompt_relay_groups_per_step_count{engine="0",model_name="m"} 1.0',
                 'edgeprompt_layer_wait_seconds_count{engine="0",model_name="m"} 1.0'):
        assert line in text, line

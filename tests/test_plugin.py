"""The plugin as vLLM sees it: entry point, idempotent register(), packaged kernels and configs."""

import importlib.metadata as md
import importlib.resources
import importlib.util
import os

import edgeprompt_vllm
from edgeprompt_vllm import plugin


def test_entry_point_and_console_scripts_are_declared():
    eps = md.entry_points(group="vllm.general_plugins")
    assert {ep.name: ep.value for ep in eps}.get("edgeprompt") == "edgeprompt_vllm:register"
    scripts = {ep.name for ep in md.entry_points(group="console_scripts")}
    assert {"edgeprompt", "edgeprompt-make-model"} <= scripts


def test_register_is_idempotent_and_traced(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPROMPT_PLUGIN_TRACE_DIR", str(tmp_path))
    monkeypatch.setattr(plugin, "_registered_pid", None)
    edgeprompt_vllm.register()
    edgeprompt_vllm.register()
    assert plugin.is_registered()
    assert [p.name for p in tmp_path.iterdir()] == [f"{os.getpid()}.txt"]


def test_vllm_loader_calls_register(monkeypatch):
    from vllm.plugins import load_plugins_by_group

    monkeypatch.setattr(plugin, "_registered_pid", None)
    funcs = load_plugins_by_group("vllm.general_plugins")
    funcs["edgeprompt"]()
    assert plugin.is_registered()


def test_kernels_and_configs_are_inside_the_package():
    configs = importlib.resources.files("edgeprompt_vllm.configs").joinpath("models")
    assert configs.joinpath("tiny-llama.yaml").is_file()
    assert importlib.util.find_spec("edgeprompt_vllm.kernels") is not None

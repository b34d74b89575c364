"""`vllm serve` on the CPU install with the plugin: the OpenAI API through the `openai` client."""

import subprocess

import openai
import pytest

from edgeprompt_vllm.serving.server import VllmServer, vllm_executable
from helpers import plugin_processes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    trace = tmp_path_factory.mktemp("trace")
    with VllmServer(tiny_model, env={"EDGEPROMPT_PLUGIN_TRACE_DIR": str(trace)}) as srv:
        srv.trace_dir = trace
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="EMPTY", timeout=120)


def test_vllm_command_works_on_the_cpu_wheel():
    out = subprocess.run([vllm_executable(), "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith("0.")


def test_plugin_loaded_in_api_server_engine_core_and_worker(server):
    assert plugin_processes(server.trace_dir) == ["EngineCore", "MainProcess", "VllmWorker-0"]


def test_completions_stream_and_not(client, server):
    kw = dict(model=server.model, prompt="The capital of Portugal is", max_tokens=16, temperature=0)
    whole = client.completions.create(**kw)
    assert whole.usage.completion_tokens == 16
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
    assert streamed == whole.choices[0].text and streamed.strip()


def test_chat_stream_and_not(client, server):
    kw = dict(model=server.model, max_tokens=16, temperature=0,
              messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}])
    whole = client.chat.completions.create(**kw)
    assert whole.choices[0].message.role == "assistant"
    chunks = client.chat.completions.create(**kw, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content and streamed.strip()


def test_bad_request_is_a_400_and_the_server_keeps_serving(client, server):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=server.model, prompt="x", max_tokens=10_000)
    assert err.value.status_code == 400 and "max" in str(err.value).lower()
    ok = client.completions.create(model=server.model, prompt="Hello", max_tokens=4, temperature=0)
    assert ok.usage.completion_tokens == 4

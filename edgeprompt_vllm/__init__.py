"""EdgePrompt for vLLM: a shared cloud prompt prefilled once in the cloud, private edge prompts
served on the edge, and relay attention that reads the shared KV once per batch.

`register()` is the vLLM general-plugin entry point (setup.py: `vllm.general_plugins`).
"""

__version__ = "0.1.0"


def register() -> None:
    """Runs in every vLLM process (API server or `LLM`, EngineCore, each worker).

    It must be cheap and idempotent: vLLM calls it once per process, but a process may also
    import and call it directly. Heavy imports happen inside `plugin.register_all`.
    """
    from edgeprompt_vllm.plugin import register_all

    register_all()

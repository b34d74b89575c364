"""Loggers for EdgePrompt, placed under vLLM's `vllm` logger.

vLLM configures handlers and the level (`VLLM_LOGGING_LEVEL`) for the `vllm` logger tree, so
naming ours `vllm.edgeprompt.*` gives EdgePrompt's lines vLLM's format and process prefixes.
"""

import logging


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"vllm.edgeprompt.{name.removeprefix('edgeprompt_vllm.')}")

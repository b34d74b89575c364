"""Triton kernels for relay attention (prefix pass + suffix pass + exact LSE merge), each with a
checked launcher and a pure-torch reference. Installed as `edgeprompt_vllm.kernels`; imports only
torch, triton and the standard library.

Convention everywhere: lse: float32, natural log, [num_heads, num_tokens].
"""

from . import cost_model
from .handoff import Handoff
from .merge import (
    merge_attn_states,
    merge_attn_states_ref,
    merge_partial_states,
    merge_partial_states_ref,
)
from .paged_suffix import paged_suffix, paged_suffix_ref
from .relay_attention import (
    RelayMetadata,
    handoff_buffers,
    plain_attention_ref,
    relay_attention,
    relay_attention_ref,
)
from .relay_prefix import relay_prefix, relay_prefix_partials, relay_prefix_ref

__all__ = [
    "Handoff",
    "RelayMetadata",
    "cost_model",
    "handoff_buffers",
    "merge_attn_states",
    "merge_attn_states_ref",
    "merge_partial_states",
    "merge_partial_states_ref",
    "paged_suffix",
    "paged_suffix_ref",
    "plain_attention_ref",
    "relay_attention",
    "relay_attention_ref",
    "relay_prefix",
    "relay_prefix_partials",
    "relay_prefix_ref",
]

"""Full CUDA graphs for the decode steps that relay nothing (Model Runner V2, vLLM 0.26).

(Where the FULL graphs hold the relay kernels themselves, graph_relay.py, there is nothing to
forecast: `enable_for(..., forecast=False)` only records each step's mode for the builders and
the connector, and vLLM's dispatch is left as it is.)

Stock FlashAttention lets vLLM replay a whole uniform decode step as one CUDA graph (FULL); the
relay kernels' launches depend on the step's grouping, planned on the host, so a step that relays
must run under piecewise graphs with attention eager between the pieces. The relay builder
reports UNIFORM_BATCH support, so vLLM keeps its default FULL_AND_PIECEWISE mode and captures both
kinds of graph (the FULL ones with relay off: FlashAttention over each request's whole block
table, as stock vLLM). This module wraps the runner's graph dispatch: a uniform decode step runs
its FULL graph unless the forecast says it relays, and then the PIECEWISE graph of the same size.

The forecast is set by the last build that was not a FULL step (dispatch comes before the
step's metadata is built): relay next if that build's relaying groups save more over all layers
than a piecewise step costs (cost_model.worth_leaving_full_graph), or if a request in it was
still prefilling: it decodes from the next step on, so that step runs eagerly and decides. A
fresh engine starts forecasting relay. Builds of FULL steps group nothing, so the forecast only
changes at steps that run eagerly anyway (prefill chunks, piecewise decode): the groups change
only when requests join, which takes such steps; requests leaving only make a group less worth
relaying. A wrong forecast is never wrong output: a FULL step is stock vLLM's FlashAttention,
a PIECEWISE step runs the relay path the builder decides.

A FULL step runs no Python inside the forward, so the connector's per-layer waits cannot run
there: its loads wait for every layer before the graph (`step_is_full_graph`, worker_side.py).

Scope: only the target model's manager (ModelCudaGraphManager) of engines whose relay builder
enabled it (`enable_for`, keyed by the VllmConfig object itself: vLLM re-runs its __post_init__
once the engine core has started, v1/engine/core.py, which gives it a new instance_id); the
builder keeps reporting no CUDA-graph support with speculative decoding (the draft's graphs must
follow the target's mode) and with data parallelism (the ranks would have to agree on the
forecast). Where vLLM dispatches no graph (profile runs, `need_eager`), the last step's mode
stays: a FULL one only makes that step group nothing and wait for its loads up front, still
exact.
"""

import weakref
from dataclasses import asdict, dataclass, field
from functools import partial

import numpy as np

from edgeprompt_vllm.log import get_logger

logger = get_logger(__name__)


@dataclass
class GraphModeStats:
    full_steps: int = 0  # uniform decode steps replayed as one CUDA graph
    piecewise_for_relay: int = 0  # uniform decode steps moved from FULL to PIECEWISE (forecast)
    eager_for_relay: int = 0  # ... moved to no graph at all (no PIECEWISE graph of that size)


@dataclass
class _Step:
    mode: str = "NONE"  # CUDAGraphMode name dispatched for the current step
    forecast_relay: bool = True  # whether the next uniform decode step should leave its FULL graph
    notes: list = field(default_factory=list)  # this step's builders' forecasts (one per builder)


STATS = GraphModeStats()
STEP = _Step()
_INSTALLED: list[str] = []
# id(VllmConfig) of an engine whose relay builder enabled this -> (weak reference, forecast)
_ENABLED: dict[int, tuple[weakref.ref, bool]] = {}


def enable_for(vllm_config, forecast: bool = True) -> None:
    """Record the graph mode of this engine's steps and, if `forecast`, move the steps forecast
    to relay out of their FULL graphs (each relay builder calls it; one that needs the forecast
    turns it on for the engine)."""
    forecast = forecast or bool(_forecast_of(vllm_config))
    _ENABLED[id(vllm_config)] = (weakref.ref(vllm_config), forecast)


def _forecast_of(vllm_config) -> bool | None:
    """None: an engine that did not enable this (dispatch as stock vLLM)."""
    entry = _ENABLED.get(id(vllm_config))
    return entry[1] if entry is not None and entry[0]() is vllm_config else None


def full_graphs_possible(vllm_config) -> bool:
    """FULL decode graphs beside relay: Model Runner V2, FULL decode graphs asked for (not
    enforce_eager, which sets the mode to NONE, nor a PIECEWISE-only mode), no speculative
    decoding (the draft's graphs would have to follow each target step's mode), no data
    parallelism (the ranks would have to agree on the forecast)."""
    mode = getattr(vllm_config.compilation_config, "cudagraph_mode", None)
    return (bool(getattr(vllm_config, "use_v2_model_runner", False))
            and mode is not None and mode.decode_mode().name == "FULL"
            and vllm_config.speculative_config is None
            and vllm_config.parallel_config.data_parallel_size == 1)


def has_prefill(common, max_group_query_len: int) -> bool:
    """Whether a request of the step (CommonAttentionMetadata) is still prefilling: vLLM's
    is_prefilling where it has one, else more query tokens than a relay group takes."""
    num_reqs = common.num_reqs
    prefilling = getattr(common, "is_prefilling", None)
    if prefilling is not None:
        return bool(prefilling[:num_reqs].any())
    query_lens = np.diff(common.query_start_loc_cpu[: num_reqs + 1].numpy())
    return bool((query_lens > max_group_query_len).any())


def step_is_full_graph() -> bool:
    """Whether the step being built / run replays a FULL graph (no Python in its forward)."""
    return STEP.mode == "FULL"


def note_build(relay_next: bool) -> None:
    """A relay builder's forecast for the steps after this one: any builder's True wins."""
    STEP.notes.append(relay_next)


def choose(dispatch, num_reqs, num_tokens, uniform_token_count, *args, forecast: bool = True,
           **kwargs):
    """dispatch(num_reqs, num_tokens, uniform_token_count, ...) -> descriptor, moved from FULL
    to the PIECEWISE graph of the same size when `forecast` is on and says the step relays."""
    if STEP.notes:  # the builds since the last dispatch; a FULL step's leave the forecast as it is
        STEP.forecast_relay, STEP.notes = any(STEP.notes), []
    desc = dispatch(num_reqs, num_tokens, uniform_token_count, *args, **kwargs)
    if desc.cg_mode.name == "FULL" and forecast and STEP.forecast_relay:
        # no uniform token count: the candidates left are the mixed-batch (PIECEWISE) graphs
        desc = dispatch(num_reqs, num_tokens, None, *args, **kwargs)
        if desc.cg_mode.name == "PIECEWISE":
            STATS.piecewise_for_relay += 1
        elif desc.cg_mode.name == "NONE":  # e.g. FULL_DECODE_ONLY: no piecewise graphs
            STATS.eager_for_relay += 1
    if desc.cg_mode.name == "FULL":
        STATS.full_steps += 1
    STEP.mode = desc.cg_mode.name
    return desc


def install() -> bool:
    """Wrap Model Runner V2's ModelCudaGraphManager.dispatch (the target model's graphs; once
    per process); False where it is absent (then the relay builder reports no CUDA-graph
    support). Managers of engines that did not `enable_for` dispatch as before."""
    if _INSTALLED:
        return True
    try:
        from vllm.v1.worker.gpu.cudagraph_utils import ModelCudaGraphManager
    except ImportError as e:
        logger.info("relay: no Model Runner V2 graph dispatch to wrap (%s)", e)
        return False
    dispatch = ModelCudaGraphManager.dispatch

    def relay_aware_dispatch(self, *args, **kwargs):
        forecast = _forecast_of(self.vllm_config)
        if forecast is None:
            return dispatch(self, *args, **kwargs)
        return choose(partial(dispatch, self), *args, forecast=forecast, **kwargs)

    ModelCudaGraphManager.dispatch = relay_aware_dispatch
    _INSTALLED.append("done")
    return True


def graph_mode_stats() -> dict:
    return asdict(STATS)

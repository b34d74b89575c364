"""Full CUDA graphs for the decode steps that relay nothing (Model Runner V2, vLLM 0.26).

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
"""

from dataclasses import asdict, dataclass
from functools import partial

from edgeprompt_vllm.log import get_logger

logger = get_logger(__name__)


@dataclass
class GraphModeStats:
    full_steps: int = 0  # uniform decode steps replayed as one CUDA graph
    piecewise_for_relay: int = 0  # uniform decode steps moved from FULL to PIECEWISE (forecast)


@dataclass
class _Step:
    mode: str = "NONE"  # CUDAGraphMode name dispatched for the current step
    forecast_relay: bool = True  # whether the next uniform decode step should run piecewise


STATS = GraphModeStats()
STEP = _Step()
_INSTALLED: list[str] = []


def step_is_full_graph() -> bool:
    """Whether the step being built / run replays a FULL graph (no Python in its forward)."""
    return STEP.mode == "FULL"


def note_build(relay_next: bool) -> None:
    """The relay builder's forecast for the steps after one that is not FULL."""
    STEP.forecast_relay = relay_next


def choose(dispatch, num_reqs, num_tokens, uniform_token_count, *args, **kwargs):
    """dispatch(num_reqs, num_tokens, uniform_token_count, ...) -> descriptor, moved from FULL
    to the PIECEWISE graph of the same size when the forecast says the step relays."""
    desc = dispatch(num_reqs, num_tokens, uniform_token_count, *args, **kwargs)
    if desc.cg_mode.name == "FULL" and STEP.forecast_relay:
        # no uniform token count: the candidates left are the mixed-batch (PIECEWISE) graphs
        desc = dispatch(num_reqs, num_tokens, None, *args, **kwargs)
        STATS.piecewise_for_relay += 1
    elif desc.cg_mode.name == "FULL":
        STATS.full_steps += 1
    STEP.mode = desc.cg_mode.name
    return desc


def install() -> bool:
    """Wrap Model Runner V2's CudaGraphManager.dispatch (once per process); False where it is
    absent (then the relay builder reports no CUDA-graph support, as before)."""
    if _INSTALLED:
        return True
    try:
        from vllm.v1.worker.gpu.cudagraph_utils import CudaGraphManager
    except ImportError as e:
        logger.info("relay: no Model Runner V2 graph dispatch to wrap (%s)", e)
        return False
    dispatch = CudaGraphManager.dispatch
    CudaGraphManager.dispatch = lambda self, *args, **kw: choose(partial(dispatch, self), *args, **kw)
    _INSTALLED.append("done")
    return True


def graph_mode_stats() -> dict:
    return asdict(STATS)

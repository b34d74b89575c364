"""Per-layer replay of the relay kernels' launches: plan once per batch, launch cheaply per layer.

Every attention layer of a decode step runs the same relay pipeline with the same metadata; only
the layer's query, key/value caches and output differ. Run through the checked launchers, one layer
costs ~350 us of host time (argument checks, split and tile choices, Triton's argument binding at
~35 us per launch; measured on the H100 machine), more than the kernels take on the GPU at batch
~200, so eager attention made the decode step host-bound. `LayerReplay` runs the first layer
through the launchers, records each kernel launch (grid and arguments), and replays the recorded
launches for every later layer with only the layer's tensors swapped, through the compiled
kernel's launcher when Triton exposes it (falling back to `kernel[grid](**kwargs)`). A call of
another library's kernel made through `_launch.call` (FA3's prefix pass, external_prefix.py) is
recorded and replayed the same way, and so are the stream switches of a schedule that runs work
on a side stream (_launch.Fork: the fork, the switch back, the join).

Safe by construction: the launches are replayed only for inputs of the same shape, strides and
dtype as the first layer's, in the same order, on the current stream (or the side stream a
recorded fork switched to); scratch buffers the launchers allocated are kept alive by the
recording and reused layer after layer (each layer's side-stream work starts after the previous
layer's main-stream work and is joined before the layer ends, so they run in order). A recording in which a launch reads a *view* of a layer input (not the input
itself) could not be re-pointed, so it is refused and every layer then runs the launchers.
"""

import contextlib
from collections.abc import Callable

import torch

from . import _launch

LayerInputs = dict[str, torch.Tensor]


def _signature(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), t.stride(), t.dtype, t.device, t.data_ptr() % 16 == 0)


class _RecordedLaunch:
    def __init__(self, kernel, grid, kwargs: dict, compiled, inputs: LayerInputs):
        self.kernel, self.grid, self.kwargs = kernel, grid, dict(kwargs)
        by_id = {id(t): name for name, t in inputs.items()}
        # kwarg name -> layer input name, for the arguments that are a layer input itself
        self.slots = {k: by_id[id(v)] for k, v in kwargs.items() if id(v) in by_id}
        self.raw = _RawLauncher.make(kernel, compiled, self.kwargs)

    def replay(self, inputs: LayerInputs) -> None:
        kwargs = self.kwargs
        for arg, name in self.slots.items():
            kwargs[arg] = inputs[name]
        if self.grid is None:  # another library's kernel (_launch.call)
            self.kernel(**kwargs)
            return
        if self.raw is not None:
            try:
                self.raw(self.grid, kwargs)
                return
            except Exception:  # noqa: BLE001  Triton's internals moved: use its public launch
                self.raw = None
        self.kernel[self.grid](**kwargs)


class _RawLauncher:
    """Calls a compiled Triton kernel's launcher directly (what `JITFunction.run` ends with),
    skipping argument binding and the cache lookup. Only for a specialization already compiled
    for arguments with the same integer values and tensor alignment."""

    def __init__(self, compiled, arg_names: list[str]):
        from triton import knobs

        self.compiled, self.arg_names, self.knobs = compiled, arg_names, knobs

    @classmethod
    def make(cls, kernel, compiled, kwargs: dict) -> "_RawLauncher | None":
        names = getattr(kernel, "arg_names", None)
        if compiled is None or names is None or not all(n in kwargs for n in names):
            return None  # the interpreter (no compiled kernel), or defaulted parameters
        if not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata", "launch_metadata")):
            return None
        try:
            return cls(compiled, list(names))
        except ImportError:
            return None

    def __call__(self, grid, kwargs: dict) -> None:
        args = [kwargs[n] for n in self.arg_names]
        c = self.compiled
        stream = torch.cuda.current_stream().cuda_stream
        meta = c.launch_metadata(grid, stream, *args)
        rt = self.knobs.runtime
        c.run(grid[0], grid[1], grid[2], stream, c.function, c.packed_metadata, meta,
              rt.launch_enter_hook, rt.launch_exit_hook, *args)


class _Recorder:
    def __init__(self, inputs: LayerInputs):
        self.inputs = inputs
        self.launches: list[_RecordedLaunch] = []
        self.safe = True
        self._input_storages = {t.untyped_storage().data_ptr(): name for name, t in inputs.items()}

    def __call__(self, kernel, grid, kwargs: dict, compiled) -> None:
        ids = {id(t) for t in self.inputs.values()}
        for v in kwargs.values():
            if isinstance(v, torch.Tensor) and id(v) not in ids and \
                    v.untyped_storage().data_ptr() in self._input_storages:
                self.safe = False  # a view of a layer input: it could not be re-pointed
        self.launches.append(_RecordedLaunch(kernel, grid, kwargs, compiled, self.inputs))


class LayerReplay:
    """Runs `pipeline(**inputs)` for the first layer, then replays its kernel launches.

        replay = LayerReplay(lambda query, out: relay_attention(query, ..., out=out))
        for layer ...: replay(query=q, out=o)        # named tensors: the per-layer inputs
    """

    def __init__(self, pipeline: Callable[..., object]):
        self.pipeline = pipeline
        self.launches: list[_RecordedLaunch] | None = None
        self.signature: dict | None = None

    def __call__(self, **inputs: torch.Tensor) -> None:
        signature = {name: _signature(t) for name, t in inputs.items()}
        if self.launches is not None and signature == self.signature:
            for launch in self.launches:
                launch.replay(inputs)
            return
        if self.signature is not None:  # refused, or another layout: no replay for this batch
            self.pipeline(**inputs)
            return
        recorder = _Recorder(inputs)
        with _recording(recorder):
            self.pipeline(**inputs)
        self.signature = signature
        self.launches = recorder.launches if recorder.safe else None

    @property
    def replaying(self) -> bool:
        return self.launches is not None


@contextlib.contextmanager
def _recording(recorder: _Recorder):
    previous, _launch.RECORDER = _launch.RECORDER, recorder
    try:
        yield
    finally:
        _launch.RECORDER = previous

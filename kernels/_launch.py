"""Launcher helpers shared by the relay-attention kernels: argument checks and device facts.

Every check raises ``ValueError`` naming the offending argument; kernels assume valid input.
"""

import functools
import os

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

RECORDER = None  # set by replay.LayerReplay while it records a layer's launches
LAST_KERNEL = None  # the kernel of the latest launch() in this process (see follows_launch_of)


def launch(kernel, grid: tuple, **kwargs) -> None:
    """`kernel[grid](**kwargs)`, reported to the active recorder (replay.py) if there is one."""
    global LAST_KERNEL
    compiled = kernel[grid](**kwargs)
    LAST_KERNEL = kernel
    if RECORDER is not None:
        RECORDER(kernel, grid, kwargs, compiled)


def call(fn, **kwargs) -> None:
    """`fn(**kwargs)`, another library's kernel (external_prefix.py), reported to the active
    recorder like a launch (grid None) so that replay.py replays it with the layer's tensors."""
    global LAST_KERNEL
    fn(**kwargs)
    LAST_KERNEL = fn
    if RECORDER is not None:
        RECORDER(fn, None, kwargs, None)


def follows_launch_of(kernel) -> bool:
    """Whether the latest launch() was of `kernel`: a launch made now follows it on the stream,
    provided the caller enqueued no other kernel in between (used to chain launches with PDL)."""
    return LAST_KERNEL is kernel


def supports_pdl(t: torch.Tensor) -> bool:
    """Programmatic dependent launch (a kernel starting while the previous one still runs; it
    waits with griddepcontrol.wait before reading that kernel's output): CUDA, sm_90+, compiled."""
    return (
        t.is_cuda
        and not interpreting()
        and torch.cuda.get_device_capability(t.device)[0] >= 9
    )


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_flags(dtype: torch.dtype) -> tuple[bool, str | None]:
    """(UPCAST_DOT, DOT_PRECISION) for a tl.dot over `dtype` operands.

    fp32 asks for "ieee": Triton's default for fp32 on NVIDIA is tf32, which breaks the fp32
    tolerance.
    Half types keep Triton's default (None).
    NOTE: the interpreter multiplies the raw uint16 bit patterns of bf16 operands in tl.dot
    (triton-lang/triton#11584, "we just don't support it yet"), so under the interpreter bf16
    operands are upcast to fp32 first; on a GPU they are not.
    """
    upcast = interpreting() and dtype == torch.bfloat16
    precision = "ieee" if (dtype == torch.float32 or upcast) else None
    return upcast, precision


@functools.cache
def num_sms(device_index: int | None) -> int:
    """Streaming multiprocessors of the device; 4 under the interpreter (keeps CPU grids small)."""
    if device_index is None or not torch.cuda.is_available() or interpreting():
        return 4
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def _side_stream(device_index: int, priority: int) -> "torch.cuda.Stream":
    return torch.cuda.Stream(device=device_index, priority=priority)


def side_stream(device: torch.device, priority: int = 0) -> "torch.cuda.Stream":
    """One cached side stream per CUDA device and priority (for overlapping the prefix pass with
    the suffix). Lower is higher, as in torch.cuda.Stream: -1 lets the GPU place its programs
    before those of a normal-priority launch queued at the same time."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _side_stream(index, priority)


class Fork:
    """A fork to a side stream and the join back, each step reported to the active recorder like
    a launch (`call`), so that replay.py replays the stream switches in order with the launches
    between them:

        fork = Fork(side); call(fork.enter)   # side waits for the current stream; side current
        ... launches on the side stream ...
        call(fork.leave)                      # the stream current at enter() is current again
        ... launches there ...
        call(fork.join)                       # it waits for everything queued on the side
    """

    def __init__(self, side: "torch.cuda.Stream"):
        self.side = side
        self.main = None

    def enter(self) -> None:
        self.main = torch.cuda.current_stream(self.side.device)
        self.side.wait_stream(self.main)
        torch.cuda.set_stream(self.side)

    def leave(self) -> None:
        torch.cuda.set_stream(self.main)

    def join(self) -> None:
        torch.cuda.current_stream(self.side.device).wait_stream(self.side)


def device_sms(t: torch.Tensor) -> int:
    return num_sms(t.device.index if t.device.type == "cuda" else None)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_tensor(name: str, t, ndim: int, dtypes, device: torch.device | None = None) -> None:
    """Type, rank, dtype and device of one tensor argument."""
    if not isinstance(t, torch.Tensor):
        # ValueError, not TypeError: one error type for every bad argument.
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")  # noqa: TRY004
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in tuple(dtypes):
        raise ValueError(f"{name} must have dtype in {tuple(dtypes)}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")


def check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    """`shape` entries that are None are free."""
    ok = len(shape) == t.dim() and all(s is None or s == d for s, d in zip(shape, t.shape))
    if not ok:
        want = tuple("*" if s is None else s for s in shape)
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")


def check_int32(name: str, t, ndim: int, device: torch.device) -> None:
    check_tensor(name, t, ndim, (torch.int32,), device)
    check_last_dim_contiguous(name, t)


def check_kv_cache(key_cache, value_cache, query: torch.Tensor) -> tuple[int, int, int]:
    """Caches are [num_blocks, block_size, num_kv_heads, head_size]; returns the last three."""
    check_tensor("key_cache", key_cache, 4, (query.dtype,), query.device)
    check_tensor("value_cache", value_cache, 4, (query.dtype,), query.device)
    if key_cache.shape != value_cache.shape:
        raise ValueError(
            f"value_cache shape {tuple(value_cache.shape)} != "
            f"key_cache shape {tuple(key_cache.shape)}"
        )
    check_last_dim_contiguous("key_cache", key_cache)
    check_last_dim_contiguous("value_cache", value_cache)
    _, block_size, num_kv_heads, head_size = key_cache.shape
    if block_size & (block_size - 1):
        raise ValueError(f"key_cache block_size must be a power of two, got {block_size}")
    if head_size != query.shape[2]:
        raise ValueError(f"key_cache head_size {head_size} != query head_size {query.shape[2]}")
    if query.shape[1] % num_kv_heads:
        raise ValueError(
            f"query num_heads {query.shape[1]} is not a multiple of "
            f"key_cache num_kv_heads {num_kv_heads}"
        )
    return block_size, num_kv_heads, head_size


def check_query(query) -> None:
    check_tensor("query", query, 3, SUPPORTED_DTYPES)
    check_last_dim_contiguous("query", query)


def check_out(name: str, out, query: torch.Tensor, dtypes=None) -> None:
    check_tensor(name, out, 3, dtypes or (query.dtype,), query.device)
    check_shape(name, out, tuple(query.shape))
    check_last_dim_contiguous(name, out)


def check_lse(name: str, lse, num_heads: int, num_tokens: int, device: torch.device) -> None:
    check_tensor(name, lse, 2, (torch.float32,), device)
    check_shape(name, lse, (num_heads, num_tokens))


def host_int(value: int | None, fallback) -> int:
    """A host-side size: the caller's value, or `fallback()` (which may sync with the device)."""
    return int(value) if value is not None else int(fallback())

"""The benchmark harness: workloads, their parameters, the timer, the bandwidth probe and the
device's name, shared by the clipping, health and training benchmarks of this package.

Every baseline is torch's own function as torch defines it (``TORCH``), never the live
``torch.nn.utils`` attribute, which is fusedclip's while ``fusedclip.patch_torch()`` is on.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import platform
import time
from typing import Callable

import torch

from fusedclip import patch

__all__ = ["WORKLOADS", "Workload", "make_parameters", "time_call", "back_to_back_seconds", "interleave",
           "BandwidthProbe", "TORCH", "device_name", "device_slug", "best_device"]

# torch's clipping functions as torch defines them (patch.TORCH_FUNCTIONS holds the originals).
TORCH = {name: fn for (module, name), fn in patch.TORCH_FUNCTIONS.items() if module is torch.nn.utils}


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    dtype: torch.dtype
    shapes: tuple[tuple[int, ...], ...]
    bandwidth_bound: bool = True  # False: too few bytes for a bandwidth floor to mean anything
    on_cpu_by_default: bool = True  # False: run on a CPU only when named (--workloads)

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def label(self) -> str:
        return f"{self.name} {str(self.dtype).replace('torch.', '')}"


def gpt2_small_shapes() -> tuple[tuple[int, ...], ...]:
    """GPT-2 small (124M): 148 parameter tensors, 124,439,808 elements."""
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,)]  # ln_1, attention
        shapes += [(d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # ln_2, MLP
    shapes += [(d,), (d,)]  # ln_f
    return tuple(shapes)


def llama_3_2_1b_shapes() -> tuple[tuple[int, ...], ...]:
    """Llama-3.2-1B: 146 parameter tensors, 1,235,814,400 elements (tied embeddings: the output
    layer is the embedding). 32 query heads and 8 key-value heads of 64; RMSNorm weights."""
    d, vocab, layers, ffn, head, kv_heads = 2048, 128256, 16, 8192, 64, 8
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d,), (d, d), (kv_heads * head, d), (kv_heads * head, d), (d, d)]  # attention
        shapes += [(d,), (ffn, d), (ffn, d), (d, ffn)]  # MLP: gate, up, down
    shapes += [(d,)]  # final norm
    return tuple(shapes)


WORKLOADS: dict[str, Callable[[], list[Workload]]] = {
    "gpt2-124m": lambda: [
        Workload("gpt2-124m", torch.float32, gpt2_small_shapes()),
        Workload("gpt2-124m", torch.bfloat16, gpt2_small_shapes()),
    ],
    # 2.5 GB of bf16 grads (7.4 GB with the bandwidth probe): a GPU workload unless named.
    "llama-1b": lambda: [
        Workload("llama-1b", torch.bfloat16, llama_3_2_1b_shapes(), on_cpu_by_default=False)
    ],
    "many-small": lambda: [
        Workload("many-small", torch.float32, ((64, 64),) * 4096),
        Workload("many-small", torch.float16, ((64, 64),) * 4096),
    ],
    "tiny-10k": lambda: [Workload("tiny-10k", torch.float32, ((1000,),) * 10_000)],
    # 1,000 tensors of 8 elements: almost no bytes, so the time is the host's cost per call.
    "host-1k": lambda: [Workload("host-1k", torch.float32, ((8,),) * 1000, bandwidth_bound=False)],
}


def make_parameters(workload: Workload, device: torch.device, seed: int = 0) -> list[torch.nn.Parameter]:
    """Parameters (storage left untouched) whose .grad is random data of the workload's shapes.

    All parameters are allocated first and the gradients after them, last parameter first, as a
    model's initialisation and then its backward allocate them. The random numbers are drawn on
    ``device`` itself (a GPU draws llama-1b's 1.2G in milliseconds; a CPU would take seconds).
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    params = [
        torch.nn.Parameter(torch.empty(shape, dtype=workload.dtype, device=device))
        for shape in workload.shapes
    ]
    for p in reversed(params):
        p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float32, device=device).to(workload.dtype)
    return params


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of fn, from an idle device to its last kernel's end. On a GPU between
    two events on the current stream: the host's time to issue the work counts (the GPU waits
    for it), the synchronisation's return after the work does not."""
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start_s = time.perf_counter()
    fn()
    return time.perf_counter() - start_s


def back_to_back_seconds(fn: Callable[[], object], device: torch.device, calls: int = 200) -> float:
    """Seconds per call of fn called ``calls`` times in a row with no synchronisation between
    them, waiting for the device once at the end: on a GPU, where the kernels take less time than
    issuing them, the host's cost per call."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def interleave(
    calls: dict[str, Callable[[], object]],
    device: torch.device,
    repeats: int,
    warmup: int,
    before: Callable[[str], None] = lambda name: None,
    after: Callable[[], None] = lambda: None,
    between: Callable[[], None] = lambda: None,
) -> dict[str, list[float]]:
    """Seconds of each timed call, by name, the warm-up left out.

    Every repetition runs each call once, in an order rotated by one each time (for two calls:
    alternating), so that drift in the machine's speed hits all of them alike. before(name) and
    after() run untimed around each call (restoring the gradients, say), between() after each
    repetition (a bandwidth probe).
    """
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            before(name)
            elapsed = time_call(calls[name], device)
            after()
            if i >= warmup:
                times[name].append(elapsed)
        between()
    return times


class BandwidthProbe:
    """Read, read-modify-write and copy bandwidth of one float32 tensor, in bytes per second.

    Each workload gets its own probe of the same size as its gradients, allocated right after
    them: the floor then reflects the same bytes in memory placed alike (and the same share of
    them in cache), laid out as one tensor for torch's best kernels.
    """

    def __init__(self, device: torch.device, n_bytes: int):
        n = max(n_bytes // 4, 1)
        self.bytes = n * 4
        self.device = device
        self.a = torch.rand(n, device=device) + 0.5
        self.b = torch.empty_like(self.a)
        self.samples: dict[str, list[float]] = {"read": [], "rmw": [], "copy": []}

    def sample(self) -> None:
        self.samples["read"].append(self.bytes / time_call(lambda: self.a.sum(), self.device))
        self.samples["rmw"].append(2 * self.bytes / time_call(lambda: self.a.mul_(1.0), self.device))
        self.samples["copy"].append(2 * self.bytes / time_call(lambda: self.b.copy_(self.a), self.device))

    def median(self, kind: str, since: int = 0) -> float:
        """The median of the samples of one kind, from sample number ``since`` on."""
        return statistics.median(self.samples[kind][since:])


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = float(a.double()), float(b.double())
    return abs(a - b) / max(abs(b), 1e-30)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def device_slug(name: str) -> str:
    """A device's name as a file name: lower case, each run of other characters than letters
    and digits one '-' ("NVIDIA H200" -> "nvidia-h200"). scripts/gpu.sh names its logs alike."""
    slug = "".join(c if c.isascii() and c.isalnum() else "-" for c in name.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    return slug


def best_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

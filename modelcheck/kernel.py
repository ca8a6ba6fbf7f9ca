"""The compiled one-pass reductions of float32 activations, their samples and the model's
parameters on the CPU (``_kernel.c``), called through ctypes.

Installing modelcheck builds them where a C compiler is found; where none is, or with
``MODELCHECK_NO_KERNEL=1`` set, the statistics take PyTorch's own operations, which give
the same results in five or six passes over each activation instead of one.

A large activation is reduced on as many threads as PyTorch's own operations use, when the
kernel shares PyTorch's OpenMP runtime: those threads are still spinning from the layer that
wrote it. With a runtime of its own, it would only compete with them, and stays on one thread.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import os
from collections.abc import Sequence

import torch

__all__ = [
    "LIBRARY",
    "THREADED",
    "SaturationTest",
    "accepts",
    "add_power_sums",
    "parameter_values",
    "reduce_into",
    "saturation_test",
]

_NONE, _ABOVE, _AWAY = 0, 1, 2  # the kernel's kinds of saturation test

_VERSION = 5
"""The ``modelcheck_kernel_version()`` whose functions this module calls."""

SaturationTest = tuple[int, float, float]
"""(kind, centre, bound) as the kernel takes them: see ``saturation_test``."""


def _load() -> ctypes.CDLL | None:
    if os.environ.get("MODELCHECK_NO_KERNEL"):
        return None
    spec = importlib.util.find_spec("modelcheck._kernel")
    if spec is None or spec.origin is None:  # not built: no compiler at install time
        return None
    try:
        library = ctypes.CDLL(spec.origin)
        if library.modelcheck_kernel_version() != _VERSION:
            return None  # built from another version of _kernel.c: reinstall to rebuild
    except (OSError, AttributeError):  # built for another platform, damaged, or too old
        return None
    pointer, size, flt = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    function = library.modelcheck_reduce_f32
    function.argtypes = [pointer, size, size, size, *[pointer] * 8]
    function.argtypes += [ctypes.c_int, flt, flt, pointer, pointer, size, pointer, ctypes.c_int]
    function.restype = ctypes.c_int
    function = library.modelcheck_power_sums_f32
    function.argtypes = [pointer, size, ctypes.c_double, pointer, pointer]
    function.restype = None
    function = library.modelcheck_parameters_f32
    function.argtypes = [size, pointer, pointer, pointer, ctypes.c_int]
    function.restype = ctypes.c_int
    return library


def _shares_torch_threads(library: ctypes.CDLL | None) -> bool:
    """Whether the kernel was built with OpenMP and its runtime is the one PyTorch runs on:
    its ``omp_get_max_threads`` is the very function PyTorch's own library resolves. (Other
    libraries may bring runtimes of their own, as scikit-learn's wheels do.)"""
    if library is None or not library.modelcheck_kernel_threaded():
        return False
    try:
        ours = library.omp_get_max_threads
        theirs = ctypes.CDLL(torch._C.__file__).omp_get_max_threads
    except (OSError, AttributeError):  # PyTorch without OpenMP, or a platform that hides it
        return False
    return ctypes.cast(ours, ctypes.c_void_p).value == ctypes.cast(theirs, ctypes.c_void_p).value


LIBRARY = _load()
THREADED = _shares_torch_threads(LIBRARY)
"""Whether reductions run on PyTorch's intra-op threads (see the module docstring)."""


def accepts(x: torch.Tensor) -> bool:
    """Whether the kernel can read ``x``: contiguous float32 values in CPU memory."""
    return (
        LIBRARY is not None
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and x.is_contiguous()
    )


def saturation_test(saturation: tuple[float, float] | None) -> SaturationTest:
    """The kernel's form of the test in ``TensorSummary._saturation_flags``: at or above
    ``high`` when the low side is unbounded, else at least half the range from its centre."""
    if saturation is None:
        return _NONE, 0.0, 0.0
    low, high = saturation
    if math.isinf(low):
        return _ABOVE, 0.0, high
    return _AWAY, (high + low) / 2, (high - low) / 2


def reduce_into(
    x3: torch.Tensor,
    shift: torch.Tensor,
    totals: Sequence[int | None],
    saturation: SaturationTest,
    batch: torch.Tensor | None = None,
    sample: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Reduce ``x3`` in one pass and add the results to ``totals``, the addresses of a
    summary's float64 accumulators (sum, dsumsq, active, saturated, low, high): per unit the
    sum of x and of (x - shift)², the count of positive values and of saturated ones (each
    of those two skipped when None), and the extremes (one value each). ``batch``, a float64
    tensor of 4 × units + 2 values, receives this batch's own results (sum, dsumsq, active,
    saturated, then low and high). With ``sample`` = (at, to, out), the same pass also sets
    out[to] = x3's flat values at the ascending int64 positions ``at``."""
    at, to, out = sample if sample is not None else (None, None, None)
    failed = LIBRARY.modelcheck_reduce_f32(
        x3.data_ptr(),
        *x3.shape,
        shift.data_ptr(),
        *totals,
        None if batch is None else batch.data_ptr(),
        *saturation,
        None if at is None else at.data_ptr(),
        None if to is None else to.data_ptr(),
        0 if at is None else at.numel(),
        None if out is None else out.data_ptr(),
        torch.get_num_threads() if THREADED else 1,
    )
    if failed:
        raise MemoryError("out of memory in modelcheck's reduction kernel")


def add_power_sums(
    values: torch.Tensor, shift: float, sums: torch.Tensor, nonzero: torch.Tensor | None
) -> None:
    """Add the sums of (value - shift)^k, k = 1..4, to the float64 ``sums``, and the count
    of nonzero values to the int64 scalar ``nonzero`` (None: not counted)."""
    LIBRARY.modelcheck_power_sums_f32(
        values.data_ptr(),
        values.numel(),
        shift,
        sums.data_ptr(),
        None if nonzero is None else nonzero.data_ptr(),
    )


def parameter_values(parameters: Sequence[torch.Tensor]) -> torch.Tensor:
    """For each nonempty tensor the kernel accepts, in one call for all of them: its first
    value, the sums of the deviations from it and of their squares, its minimum and its
    maximum, as a (len(parameters), 5) float64 tensor."""
    count = len(parameters)
    data = (ctypes.c_void_p * count)(*(p.data_ptr() for p in parameters))
    sizes = (ctypes.c_int64 * count)(*(p.numel() for p in parameters))
    values = torch.empty(count, 5, dtype=torch.float64)
    threads = torch.get_num_threads() if THREADED else 1
    if LIBRARY.modelcheck_parameters_f32(count, data, sizes, values.data_ptr(), threads):
        raise MemoryError("out of memory in modelcheck's reduction kernel")
    return values

"""The FLOP floor of a benchmark case: its multiply-adds at the machine's float32 GEMM rate, measured in
the same run (so that the floor shares the run's load and clock), on the same number of threads."""
import statistics
import time

import torch

_RATE = {}  # threads -> multiply-adds per second


def mm_rate(threads: int) -> float:
    """Multiply-adds per second of a 1024^3 float32 torch.mm on `threads` threads: the median of 5, once a run."""
    if threads not in _RATE:
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
            torch.mm(a, b)
            times = []
            for _ in range(5):
                t = time.perf_counter()
                torch.mm(a, b)
                times.append(time.perf_counter() - t)
        finally:
            torch.set_num_threads(saved)
        _RATE[threads] = 1024 ** 3 / statistics.median(times)
    return _RATE[threads]


def floor_seconds(macs: int, threads: int) -> float:
    """The time `macs` multiply-adds take at mm_rate(threads)."""
    return macs / mm_rate(threads)

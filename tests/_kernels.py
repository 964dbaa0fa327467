"""What the kernel tests share: the devices they are parametrized over, and a tolerance check.

As pytorch/extension-cpp writes them: each test takes `device` from DEVICES
("cpu"; "cuda", marked `cuda` and so skipped, with the reason, without a GPU)
and calls require_kernel first.
"""
import os
import subprocess
import sys

import pytest

from xmcnas_fast import ops

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def require_kernel(op: str, device: str) -> None:
    """The compiled `op` must serve `device`: skip where the extension is not in use at all, fail where a GPU
    is present but the build has no CUDA kernels (the reference fallback is not what these tests test)."""
    if ops.has_kernel(op, device):
        return
    if device == "cuda" and ops.EXTENSION_LOADED:
        pytest.fail("a GPU is present but the extension has no CUDA kernels: rebuild with FORCE_CUDA=1")
    pytest.skip(f"compiled {op} not in use on {device}: {ops.extension_status()}")


def kernel_required(op: str):
    """An autouse fixture for a test file of `op`: require_kernel on the test's `device` (cpu if it has none)."""

    @pytest.fixture(autouse=True)
    def _kernel(request):
        callspec = getattr(request.node, "callspec", None)
        require_kernel(op, callspec.params.get("device", "cpu") if callspec else "cpu")

    return _kernel


def close(actual, expected, tol, what=""):
    """max |actual - expected| <= tol * max(|expected|, 1), compared in float64 on the CPU."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, (what, a.shape, e.shape)
    assert a.isfinite().all(), f"{what}: non-finite values"
    err = (a - e).abs().max().item() if a.numel() else 0.0
    scale = max(e.abs().max().item() if e.numel() else 0.0, 1.0)
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} x {scale:.3g}"


def rerun_on_the_portable_path(test_file: str, selection: str) -> None:
    """Run the tests of `test_file` chosen by `-k selection` again in a child process with
    XMCNAS_CPU_ISA=generic: the CPU kernels' portable loops, those a CPU without AVX-512 runs."""
    env = {**os.environ, "XMCNAS_CPU_ISA": "generic"}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", selection],
                         env=env, capture_output=True, text=True, timeout=600, cwd=os.path.dirname(test_file))
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and "failed" not in res.stdout

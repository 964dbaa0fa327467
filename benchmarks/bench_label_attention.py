"""label_attention on the CPU: the compiled kernel beside its peers, time and peak memory.

    python -m pytest benchmarks/bench_label_attention.py --benchmark-enable

Peers: the eager composition (ops.label_attention_reference: AttentionXML's
MLAttention, matmul / masked_fill / softmax / matmul) and
torch.nn.functional.scaled_dot_product_attention (Q = W expanded to [B,L,D],
K = V = h, scale 1, boolean mask [B,1,N]). Shapes: EURLex-4K and the bundled
data, 30% of the tokens padding at the end of rows of random lengths, float32,
2 threads. One benchmark group per shape and pass, so the ratios in
parentheses compare the three side by side.

The head groups ("...-head", forward+backward) time the attention and the
first layer of the model head after it, Linear(D, 256), three ways:
eager = Linear(ops.label_attention_reference(h, mask, W)); unfused =
Linear(ops.label_attention(h, mask, W)); fused = ops.label_attention(h, mask,
W, v=Linear(h)), the linear layer folded into the values (exact: the
attention weights of a row sum to 1), which skips the [B,L,D] x [D,256] GEMM
and the [B,L,D] context. Shapes: the bundled data's head (B=40, N=128, D=512,
L=566) and EURLex-4K's (B=40, N=500, D=512, L=3993). Besides one group per
case, test_head_interleaved calls the three in turn in each round (the order
rotating), so that a burst of load on the shared machine falls on all three
alike; its ratios are medians of the per-round ratios.

Short texts (test_short_texts, ids "short-..."): N in {8, 16, 32, 64} tokens
a row (30% padding as above), L in {4,190, 31,000}, D = Dv in {64, 256}
(values v = a second [B,N,D] tensor, as the model folds its first FC layer);
"train" is forward+backward at B = 40, "eval" forward only at B = 500; one
thread and two. Beside ours: eager, "today" (an earlier revision's kernels,
when XMCNAS_BASELINE_LIB names them: see baseline.py), and the FLOP floor:
the case's multiply-adds (2 L R D forward, 5 more backward, R the real
tokens of the batch) at the rate of a 1024^3 float32 torch.mm measured in the
same run on the same threads. The summary prints each peer's time over ours
and floor/ours (the fraction of the floor reached). Cases whose [B,L,Dv]
output (or eager's [B,L,N] scores) passes 2.2 GB are left out (B = 500 at
L = 31,000). Select a subset with -k, e.g. -k "short and n16 and l4190".

The head in training at short texts (test_short_head_train, ids "head-..."): the attention, ReLU,
dropout and the score (ops.label_attention_head) forward and backward, beside this checkout's two ops,
"today"'s and eager, the arms in turn in every round; the summary prints per-round ratios.

Peak memory is the extra resident memory of one call, measured in a fresh
subprocess: the RSS high-water mark (VmHWM, reset through
/proc/self/clear_refs once the inputs exist and a call on two rows has set up
what is set up once) minus the RSS before the call. It counts everything the
call touches, outputs included ([B,L,D] ctx, and the input gradients),
whatever allocator made it. Linux only.
"""
import json
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the in-place build of this checkout, also when run as a script
    sys.path.insert(0, ROOT)

from xmcnas_fast import ops  # noqa: E402

import baseline  # noqa: E402  (benchmarks/baseline.py: an earlier revision's kernels, if built)
from floor import floor_seconds  # noqa: E402

THREADS = 2
PADDING = 0.3
SHAPES = {  # name: (B, N, D, L)
    "eurlex-4k": (40, 500, 512, 3993),
    "bundled": (64, 128, 256, 598),
}
HEAD_SHAPES = {  # name: (B, N, D, L); then Linear(D, FC)
    "bundled-head": (40, 128, 512, 566),
    "eurlex-head": (40, 500, 512, 3993),
}
FC = 256
ROUNDS = {"eurlex-4k": 5, "bundled": 20, "bundled-head": 20, "eurlex-head": 5}  # medians of a few rounds


def inputs(shape, requires_grad):
    """h, mask, W and a gradient for ctx; 30% padding, at the end of rows of random lengths."""
    B, N, D, L = SHAPES[shape] if shape in SHAPES else HEAD_SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, N, D, generator=g)
    W = torch.randn(L, D, generator=g) / D ** 0.5
    frac = torch.rand(B, generator=g) * 0.6 + 0.4  # random lengths, scaled so that PADDING of all tokens is padding
    lengths = (frac * (1 - PADDING) * B * N / frac.sum()).round().long().clamp(1, N)
    mask = torch.arange(N).unsqueeze(0) < lengths.unsqueeze(1)
    grad = torch.randn(B, L, D, generator=g) if requires_grad else None
    return h.requires_grad_(requires_grad), mask, W.requires_grad_(requires_grad), grad


def sdpa(h, mask, W):
    q = W.unsqueeze(0).expand(h.shape[0], *W.shape)  # a view: no [B,L,D] copy
    return F.scaled_dot_product_attention(q, h, h, attn_mask=mask.unsqueeze(1), scale=1.0)


IMPLS = {"ours": ops.label_attention, "eager": ops.label_attention_reference, "sdpa": sdpa}
if baseline.kernels() is not None:
    IMPLS["today"] = baseline.kernels().label_attention

# the attention and the head's first layer, Linear(D, FC) with weight A [FC, D] and bias c
HEAD_IMPLS = {
    "eager": lambda h, mask, W, A, c: F.linear(ops.label_attention_reference(h, mask, W), A, c),
    "unfused": lambda h, mask, W, A, c: F.linear(ops.label_attention(h, mask, W), A, c),
    "fused": lambda h, mask, W, A, c: ops.label_attention(h, mask, W, F.linear(h, A, c)),
}


def head_step(impl, shape, rows=None):
    """forward+backward of attention + Linear(D, FC): gradients for h, W and the linear layer."""
    fn = HEAD_IMPLS[impl]
    h, mask, W, _ = inputs(shape, requires_grad=True)
    B, _, D, L = HEAD_SHAPES[shape]
    g = torch.Generator().manual_seed(1)
    A = (torch.randn(FC, D, generator=g) / D ** 0.5).requires_grad_()
    c = (torch.randn(FC, generator=g) * 0.1).requires_grad_()
    grad = torch.randn(B, L, FC, generator=g)
    if rows is not None:
        h, mask, grad = h.detach()[:rows].requires_grad_(), mask[:rows], grad[:rows]

    def run():
        h.grad = W.grad = A.grad = c.grad = None
        fn(h, mask, W, A, c).backward(grad)
    return run


def step(impl, mode, shape, rows=None):
    """The function timed (and measured) for one case, on its inputs (the first `rows` rows only if given)."""
    if shape in HEAD_SHAPES:
        return head_step(impl, shape, rows)
    fn = IMPLS[impl]
    h, mask, W, grad = inputs(shape, requires_grad=mode == "forward+backward")
    if rows is not None:
        h, mask = h.detach()[:rows].requires_grad_(h.requires_grad), mask[:rows]
        grad = None if grad is None else grad[:rows]
    if mode == "forward":
        def run():
            with torch.no_grad():
                return fn(h, mask, W)
    else:
        def run():
            h.grad = W.grad = None
            fn(h, mask, W).backward(grad)
    return run


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_peak(impl, mode, shape):
    """Run in a subprocess: extra peak RSS (MiB) of one call, after a call on two rows has
    initialised what is set up once (thread pools, BLAS buffers, autograd engine)."""
    torch.set_num_threads(THREADS)
    step(impl, mode, shape, rows=2)()
    run = step(impl, mode, shape)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    run()
    return (_status_kib("VmHWM") - before) / 1024


def peak_in_subprocess(impl, mode, shape):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, __file__, impl, mode, shape], capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_extra_mib"]


RESULTS = {}  # (shape, mode) -> impl -> {"median_s", "peak_extra_mib"}
SHORT = {}  # (short case, threads) -> impl or "floor" -> median seconds
INTERLEAVED = {}  # head shape -> impl -> median over rounds of (its time / fused's time in that round)


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    """After the module: the ratios and memory, one line per shape and pass."""
    torch.set_num_threads(THREADS)
    yield
    tr = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if not (RESULTS or INTERLEAVED or SHORT or HEAD_SHORT) or tr is None:
        return
    lines = ["", f"label_attention (CPU, {THREADS} threads, torch {torch.__version__}): medians and extra peak RSS"]
    for (shape, mode), r in RESULTS.items():
        base = "fused" if shape in HEAD_SHAPES else "ours"
        if base not in r:
            continue
        ours = r[base]
        parts = [f"{shape:12s} {mode:17s} {base} {ours['median_s']:.3f} s {ours['peak_extra_mib']:.0f} MiB"]
        for peer in ("today", "eager", "sdpa", "unfused"):
            if peer in r:
                p = r[peer]
                parts.append(f"{peer} {p['median_s'] / ours['median_s']:.2f}x slower, "
                             f"{p['median_s']:.3f} s, {p['peak_extra_mib']:.0f} MiB "
                             f"({base} {ours['peak_extra_mib'] / p['peak_extra_mib']:.2f} of it)")
        lines.append(" | ".join(parts))
    for (case, threads), r in sorted(SHORT.items()):
        if "ours" not in r:
            continue
        ours = r["ours"]
        parts = [f"{case:32s} {threads} thread{'s' if threads > 1 else ' '} ours {ours * 1e3:9.2f} ms",
                 f"floor/ours {r['floor'] / ours:.2f}"]
        parts += [f"{peer} {r[peer] / ours:.2f}x slower" for peer in ("today", "eager") if peer in r]
        lines.append(" | ".join(parts))
    for (case, threads), r in sorted(HEAD_SHORT.items()):
        lines.append(f"{case:32s} {threads} thread{'s' if threads > 1 else ' '} ours {r['ours_s'] * 1e3:9.2f} ms | "
                     f"floor/ours {r['floor_s'] / r['ours_s']:.2f} | " +
                     ", ".join(f"{arm} {r[arm]:.2f}x slower" for arm in ("two ops", "today", "eager") if arm in r))
    for shape, ratios in INTERLEAVED.items():
        lines.append(f"{shape:12s} forward+backward interleaved, per-round ratios to fused: " +
                     ", ".join(f"{impl} {r:.2f}x slower" for impl, r in ratios.items()))
    with capture.global_and_fixture_disabled():  # module teardown output is captured otherwise
        for line in lines:
            tr.write_line(line)


def test_the_three_agree():
    """What is timed computes one thing: ours, eager and SDPA on the bundled shape."""
    h, mask, W, _ = inputs("bundled", requires_grad=False)
    ref = ops.label_attention_reference(h, mask, W)
    torch.testing.assert_close(ops.label_attention(h, mask, W), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sdpa(h, mask, W), ref, atol=1e-5, rtol=1e-4)
    assert abs(1 - mask.float().mean().item() - PADDING) < 0.01


def test_the_head_three_agree():
    """What the head groups time computes one thing: eager, unfused and fused give the same scores and
    gradients (every row has a real token), here on small shapes."""
    torch.manual_seed(0)
    h = torch.randn(4, 20, 64, requires_grad=True)
    W = (torch.randn(30, 64) / 8).requires_grad_()
    A = (torch.randn(FC, 64) / 8).requires_grad_()
    c = torch.randn(FC).requires_grad_()
    mask = torch.arange(20).unsqueeze(0) < torch.tensor([[20], [3], [14], [1]])
    results = {}
    for impl, fn in HEAD_IMPLS.items():
        out = fn(h, mask, W, A, c)
        results[impl] = (out, *torch.autograd.grad(out, (h, W, A, c), torch.ones_like(out)))
    for impl in ("unfused", "fused"):
        for a, b in zip(results[impl], results["eager"]):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def _case(benchmark, impl, mode, shape):
    """Time one case; beside it, its extra peak memory from a fresh subprocess."""
    run = step(impl, mode, shape)
    if benchmark.disabled:  # a plain test run: one call, no measurements
        benchmark(run)
        return
    peak = peak_in_subprocess(impl, mode, shape)
    benchmark.extra_info["peak_extra_mib"] = round(peak, 1)
    benchmark.pedantic(run, rounds=ROUNDS[shape], iterations=1, warmup_rounds=1)
    RESULTS.setdefault((shape, mode), {})[impl] = {"median_s": benchmark.stats.stats.median,
                                                   "peak_extra_mib": peak}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_label_attention(benchmark, shape, mode, impl):
    if impl == "ours" and not ops.has_kernel("label_attention", "cpu"):
        pytest.skip(f"compiled kernel not in use: {ops.extension_status()}")
    benchmark.group = f"label_attention {shape} {mode}"
    _case(benchmark, impl, mode, shape)


@pytest.mark.parametrize("impl", list(HEAD_IMPLS))
@pytest.mark.parametrize("shape", list(HEAD_SHAPES))
def test_head(benchmark, shape, impl):
    if impl != "eager" and not ops.has_kernel("label_attention", "cpu"):
        pytest.skip(f"compiled kernel not in use: {ops.extension_status()}")
    benchmark.group = f"label_attention + Linear({FC}) {shape} forward+backward"
    _case(benchmark, impl, "forward+backward", shape)



def interleaved_rounds(benchmark, runs: dict, rounds: int):
    """Each of `runs` ({name: callable}) in turn in every round, the order rotating from round to round,
    so that a noisy machine slows every arm alike; the benchmark's time is that of a whole round.
    Returns each arm's seconds per round (the warm-up round first), or None with benchmarks disabled."""
    times = {impl: [] for impl in runs}
    order = list(runs)

    def one_round():
        for impl in order:
            t = time.perf_counter()
            runs[impl]()
            times[impl].append(time.perf_counter() - t)
        order.append(order.pop(0))

    if benchmark.disabled:
        benchmark(one_round)
        return None
    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=1)
    return times


@pytest.mark.parametrize("shape", list(HEAD_SHAPES))
def test_head_interleaved(benchmark, shape):
    """The three head cases in turn in each round; the group's time is that of a whole round."""
    if not ops.has_kernel("label_attention", "cpu"):
        pytest.skip(f"compiled kernel not in use: {ops.extension_status()}")
    benchmark.group = f"label_attention + Linear({FC}) {shape} forward+backward, interleaved"
    times = interleaved_rounds(benchmark, {impl: step(impl, "forward+backward", shape) for impl in HEAD_IMPLS},
                               ROUNDS[shape])
    if times is None:
        return
    fused = times["fused"][1:]  # after the warm-up round
    ratios = {impl: statistics.median(t / f for t, f in zip(times[impl][1:], fused)) for impl in ("eager", "unfused")}
    benchmark.extra_info.update({f"{impl}_over_fused": round(r, 3) for impl, r in ratios.items()})
    INTERLEAVED[shape] = ratios


SHORT_N = [8, 16, 32, 64]
SHORT_L = [4190, 31000]
SHORT_D = [64, 256]
SHORT_MODES = {"train": (40, "forward+backward"), "eval": (500, "forward")}
SHORT_MAX_BYTES = 2.2e9
def short_inputs(B, N, D, L, requires_grad):
    """h, mask, W, v and a gradient for ctx: rows of random lengths, PADDING of the tokens padding."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, N, D, generator=g)
    v = torch.randn(B, N, D, generator=g)
    W = torch.randn(L, D, generator=g) / D ** 0.5
    lengths = (torch.rand(B, generator=g) * 2 * (1 - PADDING) * N).round().long().clamp(1, N)
    mask = torch.arange(N).unsqueeze(0) < lengths.unsqueeze(1)
    grad = torch.randn(B, L, D, generator=g) if requires_grad else None
    for t in (h, v, W):
        t.requires_grad_(requires_grad)
    return h, mask, W, v, grad


def _short_cases():
    for mode, (B, _) in SHORT_MODES.items():
        for N in SHORT_N:
            for L in SHORT_L:
                for D in SHORT_D:
                    if B * L * max(D, N) * 4 <= SHORT_MAX_BYTES:
                        yield f"short-n{N}-l{L}-d{D}-{mode}", (B, N, D, L, mode)


SHORT_CASES = dict(_short_cases())


@pytest.mark.parametrize("impl", ["ours", "today", "eager"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", list(SHORT_CASES))
def test_short_texts(benchmark, case, threads, impl):
    if impl != "eager" and not ops.has_kernel("label_attention", "cpu"):
        pytest.skip(f"compiled kernel not in use: {ops.extension_status()}")
    if impl == "today" and "today" not in IMPLS:
        pytest.skip(f"no earlier revision's kernels: set {baseline.ENV} (benchmarks/baseline.py)")
    B, N, D, L, mode = SHORT_CASES[case]
    fn = IMPLS[impl]
    h, mask, W, v, grad = short_inputs(B, N, D, L, requires_grad=mode == "train")
    if mode == "eval":
        def run():
            with torch.no_grad():
                return fn(h, mask, W, v)
    else:
        def run():
            h.grad = W.grad = v.grad = None
            fn(h, mask, W, v).backward(grad)
    benchmark.group = f"label_attention {case} {threads} thread(s)"
    if benchmark.disabled:
        if B * L * D <= 40 * 4190 * 64:  # a plain test run: one call of the small cases only
            benchmark(run)
        return
    torch.set_num_threads(threads)
    try:
        macs = (2 if mode == "eval" else 7) * L * int(mask.sum()) * D
        floor = floor_seconds(macs, threads)
        benchmark.extra_info["floor_s"] = floor
        benchmark.pedantic(run, rounds=5 if B * L * D < 2e8 else 3, iterations=1, warmup_rounds=1)
    finally:
        torch.set_num_threads(THREADS)
    SHORT.setdefault((case, threads), {"floor": floor})[impl] = benchmark.stats.stats.median


# The head in training at short texts (ids "head-..."): the attention, ReLU, dropout (p = 0.5) and the score,
# forward and backward to the [B, L] scores' gradient, B = 40, values v as the model passes them. Arms, in
# turn in every round (interleaved_rounds): "ours" (ops.label_attention_head: the one op where its packed
# path runs, else the two ops), "two ops" (this checkout's label_attention then relu_dropout_dot), "today"
# (an earlier revision's two ops, with XMCNAS_BASELINE_LIB) and "eager" (the reference composition); the
# floor, 7 L R D multiply-adds at torch.mm's rate. D = 256 is past the packed path: there ours is the two ops.
HEAD_SHORT_CASES = {f"head-n{N}-l{L}-d{D}": (N, L, D)
                    for N, L, D in [(8, 4190, 64), (16, 4190, 64), (32, 4190, 64), (64, 4190, 64), (16, 31000, 64),
                                    (16, 4190, 256)]}
HEAD_SHORT = {}  # (case, threads) -> {arm: median over rounds of (its time / ours in that round), "ours_s", "floor_s"}


def head_short_arms(N, L, D):
    """{arm: a forward+backward of the head's scores} on one set of inputs."""
    h, mask, W, v, _ = short_inputs(40, N, D, L, requires_grad=True)
    g = torch.Generator().manual_seed(2)
    w = torch.randn(D, generator=g).requires_grad_()
    grad = torch.randn(40, L, generator=g)
    arms = {"ours": lambda: ops.label_attention_head(h, mask, W, v, w, 0.5),
            "two ops": lambda: ops.relu_dropout_dot(ops.label_attention(h, mask, W, v), w, 0.5),
            "eager": lambda: ops.relu_dropout_dot_reference(ops.label_attention_reference(h, mask, W, v), w, 0.5)}
    if baseline.kernels() is not None:
        k = baseline.kernels()
        arms["today"] = lambda: k.relu_dropout_dot(k.label_attention(h, mask, W, v), w, 0.5)

    def run(fn):
        def once():
            h.grad = W.grad = v.grad = w.grad = None
            fn().backward(grad)
        return once
    return {arm: run(fn) for arm, fn in arms.items()}, int(mask.sum())


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", list(HEAD_SHORT_CASES))
def test_short_head_train(benchmark, case, threads):
    if not ops.has_kernel("label_attention", "cpu"):
        pytest.skip(f"compiled kernel not in use: {ops.extension_status()}")
    N, L, D = HEAD_SHORT_CASES[case]
    benchmark.group = f"head in training {case} {threads} thread(s), interleaved"
    if benchmark.disabled and L * D > 4190 * 64:
        return  # a plain test run: one round of the small cases only
    arms, real = head_short_arms(N, L, D)
    torch.set_num_threads(threads)
    try:
        floor = None if benchmark.disabled else floor_seconds(7 * L * real * D, threads)
        times = interleaved_rounds(benchmark, arms, 7)
    finally:
        torch.set_num_threads(THREADS)
    if times is None:
        return
    ours = times["ours"][1:]
    r = {arm: statistics.median(t / o for t, o in zip(times[arm][1:], ours)) for arm in arms if arm != "ours"}
    r.update(ours_s=statistics.median(ours), floor_s=floor)
    benchmark.extra_info.update({k: round(v, 5) for k, v in r.items()})
    HEAD_SHORT[(case, threads)] = r


if __name__ == "__main__":  # python benchmarks/bench_label_attention.py IMPL MODE SHAPE
    print(json.dumps({"peak_extra_mib": measure_peak(*sys.argv[1:4])}))

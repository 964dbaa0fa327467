"""label_attention_shortlist on the CPU: one training step (forward+backward) beside its peers, time and
peak memory.

    python -m pytest benchmarks/bench_label_attention_shortlist.py --benchmark-enable
    python -m pytest benchmarks/bench_label_attention_shortlist.py --benchmark-enable -k "n100 and l670k"

Shapes: B = 40 documents, N in {16, 100} tokens (30% of them padding, at the end of rows of random
lengths), D = Dv = 64 (values v: a second [B,N,64] tensor, as the model folds its first FC layer into
them), a shortlist of K = 1,000 labels a document (a few padding ids), L in {100K, 670K} labels; float32,
2 threads. The step's output gradient is random; W, h and v get their gradients.

  ours         ops.label_attention_shortlist(..., sparse_grad=True): W's gradient is a sparse COO
               tensor of the rows used (what training at 670K labels takes, with SparseAdam)
  ours-dense   the same op with its default dense [L,D] gradient (zeros outside the rows used)
  eager        the eager gather: W[labels] (F.embedding: dense [L,D] gradient), then batched masked
               softmax attention in plain torch (bmm, masked_fill, softmax, bmm): [B,K,N] scores
  eager-sparse the same with F.embedding(sparse=True)
  dense        ops.label_attention over all L labels, then each document's K rows picked: run only
               where its [B,L,Dv] context and gradients fit (DENSE_BUDGET), else marked not run with
               the shape named

The optimizer groups (L = 100K, 670K) time what the gradient's layout costs after the step:
Adam over the dense [L,D] gradient against SparseAdam over the sparse one (the rows used only).

Each group prints each peer's median over ours in the summary (conftest.py); besides one group a case,
test_step_interleaved runs ours, ours-dense and eager in turn in each round (the order rotating), so
that a burst of load on the shared machine falls on all three alike: its ratios are medians of the
per-round ratios. Peak memory: the extra resident memory of one step in a fresh subprocess (VmHWM reset
once the inputs exist and a step on two rows has run, minus the RSS before), as bench_label_attention.py
measures it.
"""
import json
import os
import statistics
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the in-place build of this checkout, also when run as a script
    sys.path.insert(0, ROOT)

from xmcnas_fast import ops  # noqa: E402

from bench_label_attention import _status_kib, interleaved_rounds  # noqa: E402  (the same measures)

THREADS = 2
PADDING = 0.3
B, D, K = 40, 64, 1000
NS = {"n16": 16, "n100": 100}
LS = {"l100k": 100_000, "l670k": 670_000}
CASES = [f"{n}-{l}" for n in NS for l in LS]
DENSE_BUDGET = 8 << 30  # bytes for the dense op's ctx, its gradient and grad_v's share: a third of the machine
ROUNDS = 5


def shape_of(case):
    n, l = case.split("-")
    return NS[n], LS[l]


def inputs(case, rows=None):
    """h, mask, W, labels, v (leaves that need gradients) and the output gradient of one step."""
    N, L = shape_of(case)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, N, D, generator=g)
    v = torch.randn(B, N, D, generator=g)
    W = torch.randn(L, D, generator=g) / D ** 0.5
    frac = torch.rand(B, generator=g) * 0.6 + 0.4  # random lengths, PADDING of all tokens padding
    lengths = (frac * (1 - PADDING) * B * N / frac.sum()).round().long().clamp(1, N)
    mask = torch.arange(N).unsqueeze(0) < lengths.unsqueeze(1)
    labels = torch.randint(0, L, (B, K), generator=g)
    labels[:, -5:] = -1  # a short list's padding
    grad = torch.randn(B, K, D, generator=g)
    if rows is not None:
        h, v, mask, labels, grad = h[:rows], v[:rows], mask[:rows], labels[:rows], grad[:rows]
    return h.requires_grad_(), mask, W.requires_grad_(), labels, v.requires_grad_(), grad


def eager(h, mask, W, labels, v, sparse=False):
    """The eager gather: W's rows of each document's labels, then masked softmax attention in plain torch."""
    valid = labels >= 0
    Wk = F.embedding(labels.clamp(min=0), W, sparse=sparse)                        # [B, K, D]
    scores = torch.bmm(Wk, h.transpose(1, 2)).masked_fill(~mask.unsqueeze(1), float("-inf"))
    return torch.bmm(torch.softmax(scores, dim=-1), v) * valid.unsqueeze(-1)      # [B, K, Dv]


def dense(h, mask, W, labels, v):
    """The dense op over all L labels, then each document's K rows."""
    ctx = ops.label_attention(h, mask, W, v)                                       # [B, L, Dv]
    picked = torch.gather(ctx, 1, labels.clamp(min=0).unsqueeze(-1).expand(-1, -1, ctx.shape[2]))
    return picked * (labels >= 0).unsqueeze(-1)


IMPLS = {
    "ours": lambda h, mask, W, labels, v: ops.label_attention_shortlist(h, mask, W, labels, v, sparse_grad=True),
    "ours-dense": lambda h, mask, W, labels, v: ops.label_attention_shortlist(h, mask, W, labels, v),
    "eager": eager,
    "eager-sparse": lambda h, mask, W, labels, v: eager(h, mask, W, labels, v, sparse=True),
    "dense": dense,
}
ROLES = {"ours": "ours", "ours-dense": "context", "eager": "peer", "eager-sparse": "peer", "dense": "peer"}


def dense_bytes(case):
    N, L = shape_of(case)
    return 3 * B * L * D * 4 + 2 * L * D * 4  # ctx, its gradient and the backward's buffer; W's gradient


def step(impl, case, rows=None):
    """The function timed (and measured): one forward+backward on the case's inputs."""
    fn = IMPLS[impl]
    h, mask, W, labels, v, grad = inputs(case, rows)

    def run():
        h.grad = W.grad = v.grad = None
        fn(h, mask, W, labels, v).backward(grad)
    return run


def measure_peak(impl, case):
    """Run in a subprocess: the extra peak RSS (MiB) of one step, after a step on two rows."""
    torch.set_num_threads(THREADS)
    step(impl, case, rows=2)()
    run = step(impl, case)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    run()
    return (_status_kib("VmHWM") - before) / 1024


def peak_in_subprocess(impl, case):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, __file__, impl, case], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_extra_mib"]


RESULTS = {}  # case -> impl -> {"median_s", "peak_extra_mib"} or {"not_run": reason}
INTERLEAVED = {}  # case -> impl -> median over rounds of (its time / ours's time in that round)
OPTIM = {}  # L name -> impl -> median seconds


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    """After the module: the ratios and memory, one line per case."""
    torch.set_num_threads(THREADS)
    yield
    tr = request.config.pluginmanager.getplugin("terminalreporter")
    if not (RESULTS or INTERLEAVED or OPTIM) or tr is None:
        return
    lines = ["", f"label_attention_shortlist training step (CPU, {THREADS} threads, torch {torch.__version__}, "
                 f"B={B} K={K} D=Dv={D}): medians and extra peak RSS"]
    for case, r in RESULTS.items():
        ours = r.get("ours")
        if ours is None or "median_s" not in ours:
            continue
        parts = [f"{case:11s} ours {ours['median_s'] * 1e3:.0f} ms {ours['peak_extra_mib']:.0f} MiB"]
        for peer in ("ours-dense", "eager", "eager-sparse", "dense"):
            p = r.get(peer)
            if p is None:
                continue
            if "not_run" in p:
                parts.append(f"{peer} not run ({p['not_run']})")
            else:
                parts.append(f"{peer} {p['median_s'] / ours['median_s']:.2f}x ours's time, "
                             f"{p['peak_extra_mib']:.0f} MiB")
        lines.append("; ".join(parts))
    for case, r in INTERLEAVED.items():
        lines.append(f"{case:11s} interleaved, median of per-round ratios to ours: "
                     + ", ".join(f"{impl} {x:.2f}x" for impl, x in r.items()))
    for l, r in OPTIM.items():
        lines.append(f"optimizer step at {l}: " + ", ".join(f"{impl} {t * 1e3:.1f} ms" for impl, t in r.items()))
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():  # module teardown output is captured otherwise
        for line in lines:
            tr.write_line(line)


def test_the_peers_agree():
    """Every implementation gives the same context and gradients (W's densified) on a small case."""
    results = {}
    for impl, fn in IMPLS.items():
        h, mask, W, labels, v, grad = inputs("n16-l100k", rows=3)
        out = fn(h, mask, W, labels, v)
        gh, gW, gv = torch.autograd.grad(out, (h, W, v), grad)
        results[impl] = (out, gh, gW.to_dense(), gv)
    for impl, r in results.items():
        for a, b in zip(r, results["eager"]):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def _case(benchmark, impl, case, rounds=ROUNDS):
    """Time one case; beside it, its extra peak memory from a fresh subprocess."""
    run = step(impl, case)
    if benchmark.disabled:  # a plain test run: one call, no measurements
        benchmark(run)
        return
    peak = peak_in_subprocess(impl, case)
    benchmark.extra_info["peak_extra_mib"] = round(peak, 1)
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    RESULTS.setdefault(case, {})[impl] = {"median_s": benchmark.stats.stats.median, "peak_extra_mib": peak}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", CASES)
def test_step(benchmark, case, impl):
    if impl.startswith("ours") and not ops.has_kernel("label_attention_shortlist", "cpu"):
        pytest.skip(f"compiled kernel not in use: {ops.extension_status()}")
    benchmark.group = f"label_attention_shortlist {case} forward+backward"
    benchmark.extra_info["role"] = ROLES[impl]
    if impl == "ours-dense":
        benchmark.extra_info["what"] = "ours with a dense [L,D] gradient for W"
    if impl == "dense" and dense_bytes(case) > DENSE_BUDGET:
        N, L = shape_of(case)
        reason = (f"[B,L,Dv] = [{B},{L},{D}] float32 context, its gradient and buffers: "
                  f"{dense_bytes(case) / 2**30:.1f} GiB > {DENSE_BUDGET / 2**30:.0f} GiB")
        RESULTS.setdefault(case, {})[impl] = {"not_run": reason}
        pytest.skip(f"dense at N={N}, L={L}: not run: {reason}")
    _case(benchmark, impl, case, rounds=3 if impl == "dense" else ROUNDS)


@pytest.mark.parametrize("case", CASES)
def test_step_interleaved(benchmark, case):
    """ours, ours-dense and eager in turn in each round; the group's time is that of a whole round."""
    if not ops.has_kernel("label_attention_shortlist", "cpu"):
        pytest.skip(f"compiled kernel not in use: {ops.extension_status()}")
    benchmark.group = f"label_attention_shortlist {case} forward+backward, interleaved"
    times = interleaved_rounds(benchmark, {impl: step(impl, case) for impl in ("ours", "ours-dense", "eager")},
                               2 * ROUNDS)
    if times is None:
        return
    INTERLEAVED[case] = {impl: statistics.median(t / o for t, o in zip(times[impl], times["ours"]))
                         for impl in ("ours-dense", "eager")}


@pytest.mark.parametrize("impl", ["sparse-adam", "adam"])
@pytest.mark.parametrize("l", list(LS))
def test_optimizer_step(benchmark, l, impl):
    """The step after the gradients: SparseAdam over the sparse gradient (rows used only) against Adam over
    the dense [L,D] one (every row's moments, every step)."""
    if not ops.has_kernel("label_attention_shortlist", "cpu"):
        pytest.skip(f"compiled kernel not in use: {ops.extension_status()}")
    benchmark.group = f"optimizer step over W, L={LS[l]}"
    benchmark.extra_info["role"] = "ours" if impl == "sparse-adam" else "peer"
    h, mask, W, labels, v, grad = inputs(f"n16-{l}")
    W = torch.nn.Parameter(W.detach())
    sparse = impl == "sparse-adam"
    opt = torch.optim.SparseAdam([W], lr=1e-3) if sparse else torch.optim.Adam([W], lr=1e-3)
    ops.label_attention_shortlist(h, mask, W, labels, v, sparse_grad=sparse).backward(grad)
    if benchmark.disabled:
        benchmark(opt.step)
        return
    benchmark.pedantic(opt.step, rounds=ROUNDS, iterations=1, warmup_rounds=1)  # the same gradient each round
    OPTIM.setdefault(l, {})[impl] = benchmark.stats.stats.median


if __name__ == "__main__":  # python benchmarks/bench_label_attention_shortlist.py IMPL CASE
    print(json.dumps({"peak_extra_mib": measure_peak(*sys.argv[1:3])}))

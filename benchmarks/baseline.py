"""An earlier revision's CPU kernels beside this checkout's, in one process, for side-by-side ratios.

    python benchmarks/baseline.py main            # builds main's csrc/ once; prints the library's path
    XMCNAS_BASELINE_LIB=<that path> python -m pytest benchmarks/bench_train_step.py --benchmark-enable -k short

The revision's C++ sources (git archive REV csrc) are compiled with their operator namespace
renamed xmcnas_fast -> xmcnas_base, so that both libraries load into one process. The benchmarks
that know of it add a "today" case (the revision's kernels) when XMCNAS_BASELINE_LIB names the
library; without it they leave that case out.
"""
import argparse
import glob
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = "XMCNAS_BASELINE_LIB"


def build(rev: str, out_dir: str) -> str:
    """Compile REV's csrc/ (CPU kernels only) with the namespace renamed; returns the library's path."""
    src = os.path.join(out_dir, "src")
    os.makedirs(src, exist_ok=True)
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev, "csrc"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", src], input=archive, check=True)
    for path in glob.glob(os.path.join(src, "csrc", "**", "*.cpp"), recursive=True):
        with open(path) as f:
            text = f.read()
        text = text.replace("TORCH_LIBRARY(xmcnas_fast,", "TORCH_LIBRARY(xmcnas_base,")
        text = text.replace("TORCH_LIBRARY_IMPL(xmcnas_fast,", "TORCH_LIBRARY_IMPL(xmcnas_base,")
        with open(path, "w") as f:
            f.write(text)
    from torch.utils.cpp_extension import load
    sources = sorted(glob.glob(os.path.join(src, "csrc", "*.cpp")) + glob.glob(os.path.join(src, "csrc", "cpu", "*.cpp")))
    build_dir = os.path.join(out_dir, "build")
    os.makedirs(build_dir, exist_ok=True)
    load(name="xmcnas_base", sources=sources, extra_include_paths=[os.path.join(src, "csrc")],
         extra_cflags=["-O3", "-fopenmp", "-fvisibility=hidden", "-Wno-unused-parameter"],
         extra_ldflags=["-fopenmp"], is_python_module=False, build_directory=build_dir)
    return os.path.join(build_dir, "xmcnas_base.so")


_LOADED = None


def kernels():
    """The revision's label_attention and relu_dropout_dot as differentiable functions (ops.py's
    signatures), or None when XMCNAS_BASELINE_LIB is unset."""
    global _LOADED
    path = os.environ.get(ENV)
    if not path:
        return None
    if _LOADED is not None:
        return _LOADED
    torch.ops.load_library(path)
    base = torch.ops.xmcnas_base

    def la_setup(ctx, inputs, output):
        h, mask, W, v = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(h, mask, W, v, *output)

    def la_backward(ctx, grad, _):
        h, mask, W, v, out, lse = ctx.saved_tensors
        gh, gW, gv = base.label_attention_backward(grad.contiguous(), h, mask, W, v, out, lse)
        return gh, None, gW, None if v is None else gv

    torch.library.register_autograd("xmcnas_base::label_attention", la_backward, setup_context=la_setup)

    def rdd_setup(ctx, inputs, output):
        x, w, ctx.p, seed = inputs
        ctx.save_for_backward(x, w, seed)

    def rdd_backward(ctx, grad):
        x, w, seed = ctx.saved_tensors
        gx, gw = base.relu_dropout_dot_backward(grad, x, w, ctx.p, seed)
        return gx, gw, None, None

    torch.library.register_autograd("xmcnas_base::relu_dropout_dot", rdd_backward, setup_context=rdd_setup)

    class Kernels:
        @staticmethod
        def label_attention(h, mask, W, v=None):
            return base.label_attention(h, mask.bool(), W, v)[0]

        @staticmethod
        def relu_dropout_dot(x, w, p, training=True):
            p = p if training else 0.0
            seed = torch.randint(0, 2**62, (), dtype=torch.int64) if p > 0 else torch.zeros((), dtype=torch.int64)
            return base.relu_dropout_dot(x, w, float(p), seed)

    _LOADED = Kernels
    return _LOADED


def install(monkeypatch):
    """Make ops.label_attention and ops.relu_dropout_dot the revision's for the rest of a test, and
    ops.label_attention_score and ops.label_attention_head (the head's scores out of and in training) the two
    of them, as the revision ran them."""
    from xmcnas_fast import ops
    k = kernels()
    monkeypatch.setattr(ops, "label_attention", k.label_attention)
    monkeypatch.setattr(ops, "relu_dropout_dot", k.relu_dropout_dot)
    monkeypatch.setattr(ops, "label_attention_score",
                        lambda h, mask, W, v, w: k.relu_dropout_dot(k.label_attention(h, mask, W, v), w, 0.0, False),
                        raising=False)
    monkeypatch.setattr(ops, "label_attention_head",
                        lambda h, mask, W, v, w, p, training=True:
                        k.relu_dropout_dot(k.label_attention(h, mask, W, v), w, p, training), raising=False)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev", help="the git revision whose csrc/ to build (a branch, tag or commit)")
    parser.add_argument("--out", default=None,
                        help="folder for the sources and the build (default: a new folder under the system's temp)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix=f"xmcnas-baseline-{args.rev.replace('/', '_')}-")
    try:
        path = build(args.rev, out)
    except subprocess.CalledProcessError as e:
        sys.exit(f"baseline.py: git archive {args.rev} failed: {e.stderr.decode().strip()}")
    print(path)

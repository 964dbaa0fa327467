"""Device specs: the workers each spec gives, their labels, devices and threads, and the
errors for bad specs. The GPU count is injected, so that none of this needs a GPU."""
import pytest

from xmcnas_fast.scheduler import make_scheduler, parse_devices
from xmcnas_fast.scheduler.devices import parse, worker_specs


def gpus(n):
    return lambda: n


def no_gpu_asked():
    raise AssertionError("the GPU count was asked for a spec without CUDA devices")


def test_cpu():
    assert parse_devices("cpu", no_gpu_asked) == ["cpu"]
    assert parse_devices(" CPU:3 ", no_gpu_asked) == ["cpu#0", "cpu#1", "cpu#2"]
    assert parse_devices(["cpu:1"], no_gpu_asked) == ["cpu"]


def test_one_worker_per_gpu():
    assert parse_devices("cuda", gpus(2)) == ["cuda:0", "cuda:1"]
    assert parse_devices("cuda:1,cpu", gpus(2)) == ["cuda:1", "cpu"]
    assert parse_devices(["cuda:1", "cuda:0"], gpus(2)) == ["cuda:1", "cuda:0"]


def test_several_workers_on_one_gpu():
    assert parse("cuda:0x3", gpus(1)) == [("cuda:0#0", "cuda:0", 3), ("cuda:0#1", "cuda:0", 3),
                                          ("cuda:0#2", "cuda:0", 3)]
    assert parse_devices("cuda:1x2,cuda:0", gpus(2)) == ["cuda:1#0", "cuda:1#1", "cuda:0"]
    assert parse_devices("cuda:0x1", gpus(1)) == ["cuda:0"]
    assert parse_devices("cpu:2,cuda:1x2", gpus(2)) == ["cuda:1#0", "cuda:1#1", "cpu#0", "cpu#1"]


def test_several_workers_on_every_gpu():
    assert parse("CUDAx2", gpus(2)) == [("cuda:0#0", "cuda:0", 2), ("cuda:0#1", "cuda:0", 2),
                                        ("cuda:1#0", "cuda:1", 2), ("cuda:1#1", "cuda:1", 2)]
    assert parse_devices("cudax1", gpus(3)) == ["cuda:0", "cuda:1", "cuda:2"]


@pytest.mark.parametrize("spec, message", [
    ("", "empty device"),
    ("cpu,", "empty device"),
    ("cpu:0", "W >= 1"),
    ("cpu:two", "W >= 1"),
    ("cpu,cpu:2", "CPU workers given twice"),
    ("cpux2", "unknown device 'cpux2'"),
    ("gpu", "unknown device 'gpu'"),
    ("cuda:x", "GPU index"),
    ("cuda:0x0", "N >= 1"),
    ("cuda:0x", "N >= 1"),
    ("cudax-1", "N >= 1"),
    ("cuda:0x2x2", "N >= 1"),
    ("cuda:2", r"no such CUDA GPU \(only 2 visible\)"),
    ("cuda:0,cuda:0", r"cuda:0 given twice .* written cuda:0x2"),
    ("cuda,cuda:1x2", "cuda:1 given twice"),
    (3, "string or a list"),
])
def test_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_devices(spec, gpus(2))


def test_errors_without_a_gpu():
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        parse_devices("cuda", gpus(0))
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        parse_devices("cudax4", gpus(0))
    with pytest.raises(ValueError, match=r"none is visible"):
        parse_devices("cuda:0x2", gpus(0))


def test_every_error_names_the_forms_or_the_fix():
    with pytest.raises(ValueError) as info:
        parse_devices("tpu", gpus(1))
    assert "cuda:IxN" in str(info.value) and "cpu:W" in str(info.value)


def test_threads_split_among_all_workers():
    specs = worker_specs("cpu:3", None, (), None, 0.1, cores=8)
    assert [(s.label, s.device, s.threads) for s in specs] == [("cpu#0", "cpu", 2), ("cpu#1", "cpu", 2),
                                                                ("cpu#2", "cpu", 2)]
    assert worker_specs("cpu:16", None, (), None, 0.1, cores=8)[0].threads == 1
    # four workers on one GPU and two CPU workers share 12 cores: 2 threads each
    specs = worker_specs("cuda:0x4,cpu:2", None, (), 5.0, 0.1, gpu_count=gpus(1), cores=12)
    assert [s.threads for s in specs] == [2] * 6
    assert [(s.device, s.share) for s in specs[:4]] == [("cuda:0", 4)] * 4
    assert {s.timeout for s in specs} == {5.0}


def test_inline_takes_one_worker():
    with pytest.raises(ValueError, match=r"one device, got 2 \(cpu#0, cpu#1\)"):
        make_scheduler("inline", "cpu:2")


def test_what_each_worker_asks_ray_for():
    from xmcnas_fast.scheduler.ray_backend import actor_options   # needs no ray until a scheduler opens

    quarter = worker_specs("cuda:0x4", None, (), None, 0.1, gpu_count=gpus(1), cores=8)
    assert [actor_options(s) for s in quarter] == [{"num_gpus": 0.25, "num_cpus": 1}] * 4
    whole = worker_specs("cuda,cpu:2", None, (), None, 0.1, gpu_count=gpus(2), cores=8)
    assert [actor_options(s) for s in whole] == [{"num_gpus": 1.0, "num_cpus": 1}] * 2 + [{"num_cpus": 2}] * 2

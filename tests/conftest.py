import os

import json
import signal

import pytest
import torch


def pytest_configure(config):
    # Tests press Ctrl-C on the processes they start (a search, a scheduler's parent). A shell starts a
    # background job (`cmd &`) with SIGINT ignored, which every child inherits through exec, and a
    # child that ignores SIGINT never stops: the suite hands its children Python's own handler instead.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run tests marked slow (or set XMCNAS_RUN_SLOW=1)")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--run-slow") or os.environ.get("XMCNAS_RUN_SLOW") == "1"
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: run with --run-slow or XMCNAS_RUN_SLOW=1"))
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; none is present"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def debtags_slice(tmp_path_factory):
    """200 training and 200 test examples of the bundled debtags set, as a JSON-lines file."""
    from xmcnas_fast.data import load

    full = load("debtags")
    path = tmp_path_factory.mktemp("data") / "debtags-slice.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for split in ("train", "test"):
            ds = getattr(full, split)
            names = full.label_names + full.unseen_label_names
            for i in range(200):
                words = [full.vocab.itos[t] for t in ds.tokens(i)]
                labels = [names[j] for j in ds.labels[i].indices]
                f.write(json.dumps({"id": ds.ids[i], "text": " ".join(words), "labels": labels,
                                    "split": split}) + "\n")
    return str(path)

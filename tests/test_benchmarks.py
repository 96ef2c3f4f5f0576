"""The benchmark scripts' CPU paths (their GPU shapes share the code; only sizes differ)."""

from __future__ import annotations

import importlib
import re
import sys

import pytest


@pytest.fixture
def train_throughput(repo_root, monkeypatch):
    monkeypatch.syspath_prepend(str(repo_root / "benchmarks"))
    monkeypatch.chdir(repo_root)  # reads params.yaml
    module = importlib.import_module("train_throughput")
    yield module
    sys.modules.pop("train_throughput", None)


def test_train_throughput_qlora_trains_a_4bit_base(train_throughput, capsys):
    train_throughput.main(["--qlora", "--steps", "1", "--micro-batch", "2"])
    out = capsys.readouterr().out
    layers = re.search(r"QLoRA \((\d+) 4-bit nf4 layers\)", out)
    assert layers and int(layers.group(1)) > 0, out
    assert re.search(r"^\s+1\s+2\s+1\s+[\d.]+\s+[\d.]+\s+[\d.]+$", out, re.MULTILINE), out  # one timed step of 2

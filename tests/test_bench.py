"""cellcls.bench: its JSON, the Keras peer's protocol, and the speed changes' exactness."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cellcls import bench
from cellcls.models import SmallCNN
from tests.conftest import CONF_DIR, FAST, compose_run, run_module

KEYS = (
    "imagefolder_img_s",
    "cached_img_s",
    "plain_torch_train_img_s",
    "lightning_train_img_s",
    "lightning_same_settings_img_s",
    "keras_train_img_s",
    "lightning_over_keras",
    "lightning_same_settings_over_plain",
    "keras_peer",
)


@pytest.fixture
def no_tensorflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Subprocesses see a `tensorflow` that fails to import, as where it is not installed."""
    fake = tmp_path / "no_tf"
    (fake / "tensorflow").mkdir(parents=True)
    (fake / "tensorflow" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'tensorflow'\")\n"
    )
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(fake), os.environ.get("PYTHONPATH")]))
    )


def test_bench_prints_json_and_skips_keras_without_tensorflow(
    tmp_path: Path, synthetic_cache: Path, no_tensorflow: None
) -> None:
    args = [
        *(a for a in FAST if not a.startswith("callbacks.")),
        "data.n_train=16",
        "data.n_test=2",
        "data.image_size=32",
        "bench.n_images=24",
        "hydra.run.dir=outputs/bench",
    ]
    result = run_module("cellcls.bench", args, tmp_path, synthetic_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(KEYS) <= set(figures)
    for key in KEYS[:5]:
        assert figures[key] > 0, key
    assert figures["keras_train_img_s"] is None and figures["lightning_over_keras"] is None
    assert figures["n_images"] == 24 and figures["image_size"] == 32
    assert figures["batch_size"] == 16 and figures["peak_rss_mb"] > 0
    assert "cached / ImageFolder" in result.stdout
    out = result.stdout + result.stderr
    assert "Keras peer skipped: No module named 'tensorflow'" in out
    assert 'pip install -e ".[peers]"' in out


def tutorial_cfg(tmp_path: Path, *overrides: str):
    return compose_run(["data=synthetic", "data.image_size=32", *overrides], tmp_path, "bench")


STAND_IN = """
import argparse, json, numpy as np
p = argparse.ArgumentParser()
for a in ("images", "labels", "batch-size", "epochs", "threads", "classes", "lr", "seed"):
    p.add_argument("--" + a)
a = p.parse_args()
x, y = np.load(a.images), np.load(a.labels)
assert x.dtype == np.uint8 and x.shape == (len(y), 32, 32, 3), x.shape
print("TensorFlow chatter")
print(json.dumps({"img_s": [1.0, float(a.epochs), float(x[0, 0, 0, 0])], "tensorflow": "t",
                  "keras": "k", "jit_compile": False, "threads": int(a.threads)}))
"""


def test_keras_peer_protocol_with_a_stand_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tutorial_cfg(tmp_path)
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    monkeypatch.setattr(bench, "KERAS_PEER", script)
    images = torch.full((5, 3, 32, 32), 2, dtype=torch.uint8)  # NCHW, as the store gives them
    images[0, :, 0, 0] = torch.tensor([7, 8, 9])
    img_s, what = bench.keras_train(images, torch.arange(5), cfg)
    assert img_s == 7.0  # the best epoch after the first, from an NHWC copy of the images
    assert what == f"TensorFlow t, Keras k, {torch.get_num_threads()} threads"

    script.write_text("import sys; print('boom', file=sys.stderr); sys.exit(3)")
    img_s, what = bench.keras_train(images, torch.arange(5), cfg)
    assert img_s is None and "exit status 3" in what and "boom" in what


def test_keras_peer_skips_without_tensorflow(tmp_path: Path, no_tensorflow: None) -> None:
    images = torch.zeros((4, 3, 32, 32), dtype=torch.uint8)
    img_s, what = bench.keras_train(images, torch.arange(4), tutorial_cfg(tmp_path), sys.executable)
    assert img_s is None
    assert what.startswith("skipped: No module named 'tensorflow'") and "[peers]" in what


def test_keras_peer_only_for_the_tutorial_network(tmp_path: Path) -> None:
    cfg = tutorial_cfg(tmp_path, "model.net.hidden=64")
    img_s, what = bench.keras_train(torch.zeros((2, 3, 32, 32), dtype=torch.uint8), [0, 1], cfg)
    assert img_s is None and "model=smallcnn" in what


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")))
def test_bench_takes_every_model_option(option: str, tmp_path: Path) -> None:
    cfg = tutorial_cfg(tmp_path, f"model={option}")
    net = instantiate(cfg.model.net)
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, len(cfg.data.classes))


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_bench_takes_every_experiment(name: str, tmp_path: Path) -> None:
    cfg = compose_run([f"experiment={name}"], tmp_path, "bench")
    train = compose_run([f"experiment={name}"], tmp_path)
    assert cfg.task_name == "bench"  # its own run folder, not the experiment's
    for key in ("data.image_size", "data.batch_size", "model.net", "model.augment"):
        assert OmegaConf.select(cfg, key) == OmegaConf.select(train, key), key


def tutorial_features(net: SmallCNN, x: torch.Tensor) -> torch.Tensor:
    """The tutorial's order, written out: Conv -> ReLU -> MaxPool, twice."""
    conv1, conv2 = net.features[0], net.features[3]
    x = F.max_pool2d(F.relu(conv1(x)), 2)
    return F.max_pool2d(F.relu(conv2(x)), 2)


@pytest.mark.parametrize("channels_last", [False, True])
def test_pool_before_relu_is_exactly_the_tutorials_order(channels_last: bool) -> None:
    torch.manual_seed(0)
    net = SmallCNN(image_size=48)
    x = torch.randn(4, 3, 48, 48)
    x[0, :, :8, :8] = -1.0  # whole pooling windows below zero: ties at 0 after ReLU
    if channels_last:
        net, x = (
            net.to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last),
        )
    ours, theirs = net.features(x), tutorial_features(net, x)
    assert torch.equal(ours, theirs)
    grad = torch.randn_like(ours)
    ours_grads = torch.autograd.grad(ours, list(net.features.parameters()), grad)
    theirs_grads = torch.autograd.grad(theirs, list(net.features.parameters()), grad)
    for a, b in zip(ours_grads, theirs_grads, strict=True):
        assert torch.equal(a, b)


def train_steps(net: torch.nn.Module, optimizer, channels_last: bool, steps: int = 3):
    """Losses and final weights of a few Adam steps on fixed batches."""
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = optimizer(net.parameters())
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.rand(8, 3, 32, 32, generator=gen)
        y = torch.randint(0, 4, (8,), generator=gen)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses), [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize(
    ("kwargs", "channels_last"),
    [({"fused": True}, False), ({"foreach": True}, False), ({}, True), ({"fused": True}, True)],
)
def test_speed_settings_train_the_same_weights(kwargs: dict, channels_last: bool) -> None:
    torch.manual_seed(0)
    net = SmallCNN(image_size=32)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    plain = train_steps(net, partial(torch.optim.Adam, lr=1e-3, foreach=False), False)
    net.load_state_dict(state)
    fast = train_steps(net, partial(torch.optim.Adam, lr=1e-3, **kwargs), channels_last)
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-4, atol=1e-5)
    for a, b in zip(fast[1], plain[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


REUSE = """
import resource, torch
from cellcls.hardware import reuse_freed_memory
def faults():
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        x = torch.empty(20_000_000).fill_(1.0)  # 80 MB, as a first-block activation
        del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
before = faults()
applied = reuse_freed_memory()
faults()  # the first block is faulted in once more, then kept
print(applied, before, faults())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings")
def test_reuse_freed_memory_stops_page_faults_per_step() -> None:
    out = subprocess.run([sys.executable, "-c", REUSE], capture_output=True, text=True, check=True)
    applied, before, after = out.stdout.split()
    assert applied == "True"
    assert int(before) > 8 * 10_000  # every 80 MB block faulted in afresh (4 KiB pages)
    assert int(after) < int(before) / 4  # kept and reused (now and then one is faulted in again)

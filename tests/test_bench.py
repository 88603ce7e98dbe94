"""cellcls.bench: its JSON, the Keras peer's protocol, and the speed changes' exactness."""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import sys
from functools import partial
from importlib.util import find_spec
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cellcls import bench
from cellcls.bench import inference, loops, peer
from cellcls.bench.peer import keras_train
from cellcls.data.datasets import store_bytes
from cellcls.data.device import DeviceBatches
from cellcls.models import SmallCNN
from tests.conftest import FAST, best_checkpoint, compose_run, make_dm, options, run_module

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

# The rows of the table, as their figures are keyed (`<row>_img_s`) and their data paths.
ROWS = (
    "imagefolder",
    "cached",
    "plain_torch_train",
    "lightning_train",
    "lightning_same_settings",
    "keras_train",
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


@pytest.mark.slow
def test_bench_on_kaggles_layout_with_measured_statistics_and_the_keras_peer(
    tmp_path: Path, synthetic_cache: Path, kaggle_root: Path
) -> None:
    """As docs/performance.md runs it: data=bloodcells (mean: auto) on Kaggle's nested layout,
    the tutorial's Keras model beside it (TensorFlow comes with the [peers] extra, in [dev])."""
    args = [
        f"data.root={kaggle_root}",
        "data.image_size=32",
        "data.num_workers=0",
        "trainer.accelerator=cpu",
        "bench.n_images=16",
        "hydra.run.dir=outputs/bench",
    ]
    result = run_module("cellcls.bench", args, tmp_path, synthetic_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(KEYS) <= set(figures)
    for key in KEYS[:6]:
        assert figures[key] > 0, key
    assert figures["keras_peer"].startswith("TensorFlow "), figures["keras_peer"]
    assert figures["lightning_over_keras"] > 0
    assert figures["n_images"] == 16 and figures["image_size"] == 32
    assert figures["batch_size"] == 16 and figures["peak_rss_mb"] > 0
    assert "cached / ImageFolder" in result.stdout and "Lightning / Keras: " in result.stdout
    # On a CPU (data.on_device=auto) every row builds its batches on the host, and says so.
    assert figures["data_path"] == {row: "host" for row in ROWS}
    lines = result.stdout.splitlines()
    top = lines.index(next(line for line in lines if line.split() == ["pipeline", "img/s", "data"]))
    for line in lines[top + 1 : top + 7]:
        assert line.endswith("  host, per batch"), line
    assert lines[top + 7].startswith("data: device store = ")
    assert "Normalisation measured on" in result.stdout + result.stderr


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


@pytest.mark.slow
def test_keras_peer_protocol_with_a_stand_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tutorial_cfg(tmp_path)
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    monkeypatch.setattr(peer, "KERAS_PEER", script)
    images = torch.full((5, 3, 32, 32), 2, dtype=torch.uint8)  # NCHW, as the store gives them
    images[0, :, 0, 0] = torch.tensor([7, 8, 9])
    img_s, what = keras_train(images, torch.arange(5), cfg)
    assert img_s == 7.0  # the best epoch after the first, from an NHWC copy of the images
    assert what == f"TensorFlow t, Keras k, {torch.get_num_threads()} threads"

    script.write_text("import sys; print('boom', file=sys.stderr); sys.exit(3)")
    img_s, what = keras_train(images, torch.arange(5), cfg)
    assert img_s is None and "exit status 3" in what and "boom" in what


@pytest.mark.slow
def test_keras_peer_skips_without_tensorflow(tmp_path: Path, no_tensorflow: None) -> None:
    images = torch.zeros((4, 3, 32, 32), dtype=torch.uint8)
    img_s, what = keras_train(images, torch.arange(4), tutorial_cfg(tmp_path), sys.executable)
    assert img_s is None
    assert what.startswith("skipped: No module named 'tensorflow'") and "[peers]" in what


@pytest.mark.slow
def test_keras_peer_only_for_the_tutorial_network(tmp_path: Path) -> None:
    cfg = tutorial_cfg(tmp_path, "model.net.hidden=64")
    img_s, what = keras_train(torch.zeros((2, 3, 32, 32), dtype=torch.uint8), [0, 1], cfg)
    assert img_s is None and "model=smallcnn" in what


@pytest.mark.parametrize("option", options("model"))
def test_bench_takes_every_model_option(option: str, tmp_path: Path) -> None:
    cfg = tutorial_cfg(tmp_path, f"model={option}")
    net = instantiate(cfg.model.net)
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, len(cfg.data.classes))


@pytest.mark.parametrize("name", options("experiment"))
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
from cellcls.core.hardware import reuse_freed_memory
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


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings")
def test_reuse_freed_memory_stops_page_faults_per_step() -> None:
    out = subprocess.run([sys.executable, "-c", REUSE], capture_output=True, text=True, check=True)
    applied, before, after = out.stdout.split()
    assert applied == "True"
    assert int(before) > 8 * 10_000  # every 80 MB block faulted in afresh (4 KiB pages)
    assert int(after) < int(before) / 4  # kept and reused (now and then one is faulted in again)


def fake_cuda_memory(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    """A CUDA device with `free` bytes free and nothing held by PyTorch's allocator (no GPU is
    used: only the datamodule's fit-or-not question is answered)."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)


def test_data_path_is_the_datamodules_own_rule(
    tiny_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    dm = make_dm(tiny_root)
    dm.setup("fit")
    need = store_bytes(dm.train_set)
    fake_cuda_memory(monkeypatch, free=4 * need)
    assert bench.data_path(dm, cuda) == bench.DEVICE  # fits in half the free memory
    assert bench.data_path(dm, cpu) == bench.HOST  # auto: the device store is for GPUs
    fake_cuda_memory(monkeypatch, free=need)
    assert bench.data_path(dm, cuda) == bench.HOST  # over half of it: a DataLoader
    assert dm.trainer is None  # the stand-in trainer is gone again
    fake_cuda_memory(monkeypatch, free=4 * need)
    dm.hparams.on_device = False
    assert bench.data_path(dm, cuda) == bench.HOST
    # Where a real trainer can run here, the answer is the loader Lightning gets.
    for want in (True, "auto", False):
        dm.hparams.on_device = want
        path = bench.data_path(dm, cpu)
        dm.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
        assert isinstance(dm.train_dataloader(), DeviceBatches) == (path == bench.DEVICE), want
        dm.trainer = None


@pytest.mark.slow
def test_plain_loop_indexes_the_device_store_on_the_device(
    tmp_path: Path, tiny_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the DEVICE path the batches the step gets are on the device already (here the meta
    device, which holds no data: no GPU needed); with HOST they come from the host, as before."""
    cfg = tutorial_cfg(tmp_path, "model.optimizer.fused=false")  # no fused Adam on meta
    dm = make_dm(tiny_root)
    dm.setup("fit")
    full, indices = dm.train_set.dataset, dm.train_set.indices[:10]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    timed_pass = loops.timed_pass

    def watched(batches, step, device) -> float:
        def recorded():
            for batch in batches():
                seen.append(batch)
                yield batch

        return timed_pass(recorded, step, device)

    monkeypatch.setattr(loops, "timed_pass", watched)
    meta = torch.device("meta")
    assert bench.plain_torch_train(cfg, full, indices, 4, meta, dm.statistics, bench.DEVICE) > 0
    assert len(seen) == bench.PASSES * 3 and [len(y) for _, y in seen[:3]] == [4, 4, 2]
    assert all(x.device == meta and y.device == meta for x, y in seen)
    seen.clear()
    assert bench.plain_torch_train(cfg, full, indices, 4, meta, dm.statistics, bench.HOST) > 0
    assert all(x.device.type == "cpu" and y.device.type == "cpu" for x, y in seen)

    # Both paths give the same images in the same order, every image once a pass.
    images, labels = full.images[full.rows[indices]], full.targets[indices]
    epochs = {}
    for path in (bench.HOST, bench.DEVICE):
        seen.clear()
        torch.manual_seed(0)
        bench.plain_torch_train(cfg, full, indices, 4, torch.device("cpu"), dm.statistics, path)
        epochs[path] = torch.cat([y for _, y in seen]), torch.cat([x for x, _ in seen])
    assert all(torch.equal(a, b) for a, b in zip(*epochs.values(), strict=True))
    for i in range(bench.PASSES):
        y, x = (t[i * len(indices) : (i + 1) * len(indices)] for t in epochs[bench.HOST])
        assert torch.equal(y.sort().values, labels.sort().values)
        assert torch.equal(
            x.flatten(1).sum(1).sort().values, images.flatten(1).sum(1).sort().values
        )


@pytest.mark.slow
def test_bench_plain_loop_follows_the_lightning_rows_onto_the_device_store(in_tmp: Path) -> None:
    """data.on_device=true puts the store on the training device, here the CPU: the Lightning
    rows get `DeviceBatches`, so the plain loop indexes its copy there too; the JSON and the
    table name every row's path."""
    overrides = [
        *(a for a in FAST if not a.startswith("callbacks.")),
        "data.n_train=16",
        "data.n_test=2",
        "data.image_size=32",
        "data.on_device=true",
        "bench.n_images=24",
        "bench.keras=false",
    ]
    r = bench.bench(compose_run(overrides, in_tmp, "bench"))
    host, device = bench.HOST, bench.DEVICE
    assert r["data_path"] == {
        "imagefolder": host,
        "cached": host,
        "plain_torch_train": device,
        "lightning_train": device,
        "lightning_same_settings": device,
        "keras_train": None,
    }
    assert json.loads(json.dumps(r))["data_path"] == r["data_path"]
    table = bench.format_results(r).splitlines()
    assert table[0].split() == ["pipeline", "img/s", "data"]
    assert [line.rsplit("  ", 1)[-1] for line in table[1:7]] == [
        *("host, per batch",) * 2,
        *("device store",) * 3,
        "-",
    ]
    on_gpu = bench.format_results(r | {"device": "NVIDIA H200"}).splitlines()
    assert on_gpu[1].endswith("host -> GPU per batch")  # ImageFolder: always a copy per batch
    assert on_gpu[3].endswith("device store")


@pytest.mark.slow
def test_inference_bench_times_every_backend_on_the_same_images(
    trained_run, tmp_path: Path
) -> None:
    run, _ = trained_run
    first = next(csv.DictReader((run / "predictions.csv").open()))["path"]
    test_split = Path(first).parents[1]  # TEST/<CLASS>/image
    overrides = [f"ckpt_path={best_checkpoint(run)}", f"inputs={test_split}", "device=cpu"]
    cfg = compose_run(
        [*overrides, "bench.n_images=12", "batch_size=5"], tmp_path, "bench_inference"
    )
    r = inference.bench(cfg, tmp_path)
    expected = ["torch fp32"] + (["onnxruntime fp32"] if find_spec("onnxruntime") else [])
    assert r["rows"][0] == "torch fp32" and set(expected) <= set(r["rows"])
    assert r["n_images"] == 12 and r["fastest"] in r["rows"] and r["decode_crop_img_s"] > 0
    for row in r["rows"]:
        assert r[f"{row} model_img_s"] > 0 and r[f"{row} end_to_end_img_s"] > 0
        assert row in inference.format_results(r)
    assert (tmp_path / "export" / "model.safetensors").is_file()
    assert (tmp_path / "export" / "model.onnx").is_file() == ("onnxruntime fp32" in r["rows"])

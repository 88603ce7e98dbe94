"""The GPU and Colab path, checked on the CPU: device properties are simulated (capability, bf16,
free memory), the maths runs on the CPU."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from cellcls.core.errors import CellclsError
from cellcls.core.hardware import auto_precision
from cellcls.data.device import DeviceBatches
from cellcls.eval import evaluate
from cellcls.models import CellClassifier, SmallCNN
from cellcls.run.callbacks import EpochSpeed
from cellcls.run.state import RngState
from cellcls.train import check_settings, train
from tests.conftest import CLASSES, FAST, best_checkpoint, compose_run, make_dm

GB = 10**9
EVAL_FAST = [a for a in FAST if not a.startswith(("data=", "data.image_size"))]


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch):
    """Simulate one CUDA GPU: `gpu(capability, free=..., reserved=..., allocated=...)`."""

    def simulate(capability=(7, 5), free=15 * GB, reserved=0, allocated=0) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        # As torch answers on every GPU by default (including_emulation=True), a T4 included.
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 16 * GB))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated)

    return simulate


@pytest.mark.parametrize(
    ("name", "capability", "precision"),
    [("T4", (7, 5), "16-mixed"), ("A100", (8, 0), "bf16-mixed"), ("H100", (9, 0), "bf16-mixed")],
)
def test_precision_follows_native_bf16(gpu, tmp_path: Path, name, capability, precision) -> None:
    gpu(capability)
    assert auto_precision("auto") == auto_precision("gpu") == precision, name
    cfg = compose_run(["trainer=gpu"], tmp_path)
    assert cfg.trainer.precision == precision
    assert auto_precision("cpu") in ("bf16-mixed", "32-true")  # the CPU's own rule


def test_fused_adam_with_scaled_clipping_is_refused(gpu, tmp_path: Path) -> None:
    gpu((7, 5))  # a T4: 16-mixed by default
    cfg = compose_run(["model=smallcnn", "trainer=gpu", "trainer.gradient_clip_val=1.0"], tmp_path)
    with pytest.raises(CellclsError) as err:
        check_settings(cfg)
    msg = str(err.value)
    assert "\n" not in msg
    for words in ("model.optimizer.fused=true", "trainer.precision=16-mixed"):
        assert words in msg, msg
    assert "trainer.gradient_clip_val=1.0" in msg and "model.optimizer.fused=false" in msg
    for fine in ("model.optimizer.fused=false", "trainer.precision=32-true"):
        check_settings(compose_run([*cfg_args(cfg), fine], tmp_path))


def cfg_args(cfg) -> list[str]:
    """The overrides a config was composed with."""
    return list(cfg.hydra.overrides.task)


def test_deterministic_true_is_refused_on_a_gpu(gpu, tmp_path: Path) -> None:
    cfg = compose_run(["experiment=best", "trainer.deterministic=true"], tmp_path)
    assert cfg.trainer.benchmark is False  # cuDNN ignores determinism while it benchmarks
    check_settings(cfg)  # no GPU: fine
    gpu((7, 5))
    with pytest.raises(CellclsError, match="Use trainer.deterministic=warn") as err:
        check_settings(cfg)
    assert "AdaptiveAvgPool2d" in str(err.value) and "\n" not in str(err.value)
    warn = compose_run(["experiment=best", "trainer.deterministic=warn"], tmp_path)
    check_settings(warn)
    assert warn.trainer.benchmark is False
    assert compose_run([], tmp_path).trainer.benchmark is True


@pytest.mark.slow
def test_ema_test_after_training_scores_the_averaged_weights(in_tmp: Path) -> None:
    """train's own test and cellcls.eval of the same checkpoint give the same probabilities:
    the averaged weights', which the checkpoint holds in `state_dict`."""
    args = [*FAST, "data.n_train=8", "data.n_test=3", "data.image_size=32"]
    args += ["data.batch_size=4", "trainer.max_epochs=2", "callbacks=[default,ema]"]
    run = in_tmp / "run"
    train(compose_run(args, run))
    ckpt = best_checkpoint(run)
    saved = torch.load(ckpt, weights_only=True)
    averaged, current = saved["state_dict"], saved["current_model_state"]
    assert any(not torch.equal(averaged[k], current[k]) for k in averaged)
    out = in_tmp / "eval"
    cfg = compose_run([f"ckpt_path={ckpt}", *EVAL_FAST], out, "eval")
    evaluate(cfg, cfg_args(cfg))
    trained, evaluated = (read_probs(d / "predictions.csv") for d in (run, out))
    assert trained.shape == (12, 4)
    assert torch.allclose(trained, evaluated, atol=1e-6)


def read_probs(path: Path) -> torch.Tensor:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return torch.tensor([[float(r[c]) for c in CLASSES] for r in rows])


class Batches(L.Callback):
    """The labels of every training batch, epoch by epoch."""

    def __init__(self) -> None:
        self.epochs: list[list[int]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epochs.append([])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.epochs[-1] += batch[1].tolist() + [int(batch[0].float().sum())]


@pytest.mark.slow
def test_overfit_on_the_device_store_repeats_its_batches(tiny_root: Path) -> None:
    dm = make_dm(tiny_root, on_device=True, batch_size=3, val_split="random")
    net = SmallCNN(num_classes=4, image_size=32, channels=4, hidden=8)
    model = CellClassifier(net, torch.optim.Adam, classes=dm.classes)
    seen = Batches()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=3,
        overfit_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[seen],
    )
    trainer.fit(model, datamodule=dm)
    assert isinstance(trainer.train_dataloader, DeviceBatches)
    assert len(seen.epochs) == 3 and seen.epochs[0] == seen.epochs[1] == seen.epochs[2]


def fake_trainer(rank: int, world_size: int) -> SimpleNamespace:
    return SimpleNamespace(global_rank=rank, world_size=world_size)


def test_ddp_ranks_draw_their_own_augmentation() -> None:
    def draws(rank: int, world_size: int) -> torch.Tensor:
        L.seed_everything(7)  # what every process does first, with the same seed
        RngState(7).setup(fake_trainer(rank, world_size), None, "fit")
        return torch.rand(5)

    rank0, rank1 = draws(0, 2), draws(1, 2)
    assert not torch.equal(rank0, rank1)  # before: every rank drew the same
    assert torch.equal(draws(1, 2), rank1)  # seeded, so repeatable
    L.seed_everything(7)
    assert torch.equal(torch.rand(5), draws(0, 1))  # one process: seed_everything's streams


def test_resume_across_a_change_of_devices(gpu, monkeypatch: pytest.MonkeyPatch) -> None:
    gpu((8, 0))
    own = torch.arange(16, dtype=torch.uint8)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": own)
    set_states: list[torch.Tensor] = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": set_states.append(s))
    state = RngState(0).state_dict()
    assert torch.equal(state["cuda"], own)  # this process's own GPU
    # A checkpoint of a machine with two GPUs (the older format: every GPU's state), on one.
    two = state | {"cuda": [own, own + 1]}
    one = RngState(0)
    one.setup(fake_trainer(0, 1), None, "fit")
    one.load_state_dict(two)
    assert len(set_states) == 1 and torch.equal(set_states[0], own)
    # Two processes resuming: rank 0 continues the saved streams, rank 1 draws its own.
    after = []
    for rank in (0, 1):
        cb = RngState(0)
        cb.setup(fake_trainer(rank, 2), None, "fit")
        cb.load_state_dict(state)
        after.append(torch.rand(3))
    torch.set_rng_state(state["torch"])
    assert torch.equal(after[0], torch.rand(3)) and not torch.equal(after[0], after[1])


def test_free_memory_counts_the_allocators_cache(gpu, tiny_root: Path, caplog) -> None:
    dm = make_dm(tiny_root, on_device="auto")
    dm.setup("fit")
    need = dm.train_set.dataset.images.nbytes  # more than the split: a safe bound
    trainer = SimpleNamespace(
        world_size=1, strategy=SimpleNamespace(root_device=torch.device("cuda")), overfit_batches=0
    )
    dm.trainer = trainer
    # The driver sees almost nothing free; PyTorch's cache holds plenty, reserved but unused.
    gpu((7, 5), free=need // 4, reserved=20 * need, allocated=need)
    assert dm._on_device(dm.train_set, "train")
    gpu((7, 5), free=need // 4, reserved=need, allocated=need)
    with caplog.at_level(logging.INFO):
        assert not dm._on_device(dm.train_set, "train")
    assert "train:" in caplog.text and "stay on the host" in caplog.text


def test_epoch_speed_waits_for_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    speed, cuda = EpochSpeed(), torch.device("cuda")
    trainer, module = SimpleNamespace(num_training_batches=2), SimpleNamespace(device=cuda)
    module.log = lambda *a, **k: None
    speed.on_train_epoch_start(trainer, module)
    assert synced == [cuda]  # the clock starts after the work queued before the epoch
    batch = (torch.zeros(4, 3, 2, 2), torch.zeros(4))
    speed.on_train_batch_end(trainer, module, None, batch, 0)
    assert len(synced) == 1  # not after every batch: that would stall the launch queue
    speed.on_train_batch_end(trainer, module, None, batch, 1)
    assert synced == [cuda, cuda]
    speed.on_train_epoch_end(trainer, module)
    assert speed.img_s and speed.img_s[0] > 0

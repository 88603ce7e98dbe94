"""Callbacks that keep a run's state in its checkpoints: the config, the weights where it was
interrupted, the random generators, the averaged weights."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cellcls.run.checkpoint import CONFIG_KEY, DATA_KEY

log = logging.getLogger(__name__)


class SaveConfig(L.Callback):
    """Store the run's resolved data and model config in every checkpoint.

    `cellcls.eval`, `predict` and `export` rebuild the model and data from it, so a checkpoint
    is enough on its own, wherever it travels.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[CONFIG_KEY] = self.config
        # Images and source cells on each side of the grouped split, for the model card.
        summary = getattr(trainer.datamodule, "summary", None)
        if summary is not None:
            checkpoint[DATA_KEY] = summary


class CheckpointOnInterrupt(L.Callback):
    """Write `last.ckpt` where Ctrl-C or SIGTERM stopped training, mid-epoch included.

    ModelCheckpoint writes `last.ckpt` only at the end of an epoch; with this callback an
    interrupted run loses nothing and `ckpt_path=last` resumes it (see the README).
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        if fitting and isinstance(exception, KeyboardInterrupt | SIGTERMException):
            path = self.dirpath / "last.ckpt"
            trainer.save_checkpoint(path, weights_only=False)  # the full state, to resume
            log.warning("Training interrupted at epoch %d; saved %s", trainer.current_epoch, path)


def seed_rank(seed: int, rank: int) -> None:
    """Seed torch (CPU and CUDA), numpy and Python from `(seed, rank)`: apart for each process,
    the same for the same pair (the rank-offset idiom of Lightning's `workers=True`)."""
    torch_seed, numpy_seed = np.random.SeedSequence([seed, rank]).generate_state(2, np.uint64)
    torch.manual_seed(int(torch_seed))
    np.random.seed(int(numpy_seed) % 2**32)
    random.seed(int(torch_seed))


class RngState(L.Callback):
    """Seed each DDP process's generators apart, and keep their states in checkpoints.

    `seed_everything` gives every process the same seed, so every rank would draw the same
    augmentation (it draws on the device's generator, not in DataLoader workers): with several
    processes each is re-seeded from (`seed`, rank) when fitting starts. One process keeps
    `seed_everything`'s streams, as before.

    Lightning restores weights, optimizer and loops but not the generators, so without this a
    resumed run would shuffle and augment differently from the run it continues. Checkpoints
    hold rank 0's states (only rank 0 writes them) and its own GPU's: a one-device run resumes
    its streams exactly; under DDP rank 0 does, and the other ranks draw new, distinct streams
    from them. Any number of devices can resume any checkpoint.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.rank, self.world_size = 0, 1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.rank, self.world_size = trainer.global_rank, trainer.world_size
        if stage == TrainerFn.FITTING and self.world_size > 1:
            seed_rank(self.seed, self.rank)

    def state_dict(self) -> dict[str, Any]:
        kind, keys, *rest = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            # This process's GPU's generator (one GPU per process).
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            # numpy's keys as a list: an ndarray would not load with weights_only=True.
            "numpy": [kind, keys.tolist(), *rest],
            "python": random.getstate(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        cuda = state_dict["cuda"]
        if isinstance(cuda, list):  # older checkpoints: every GPU of the machine
            cuda = cuda[0] if cuda else None
        if cuda is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda)
        kind, keys, *rest = state_dict["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
        random.setstate(state_dict["python"])
        if self.rank > 0:  # rank 0's states: draw this rank's own from them
            seed_rank(int(torch.randint(2**62, ())), self.rank)


class EMA(EMAWeightAveraging):
    """Lightning's EMA of the weights, but testing, validating or predicting from a checkpoint
    uses the averaged weights it holds in `state_dict`, as `cellcls.eval` does.

    Lightning's callback reloads the raw weights (`current_model_state`) whenever it loads a
    checkpoint after a fit, so `trainer.test(ckpt_path=best)` in the same run scored them. The
    raw weights are what a resumed fit continues from, so they are reloaded when fitting only.
    """

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)

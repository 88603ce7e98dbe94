"""LightningDataModules over ImageFolder-style blood-cell datasets (real or generated)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, random_split
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from cellcls.data.generate import generate_dataset
from cellcls.data.layout import check_classes, find_split_root
from cellcls.errors import CellclsError


class ClassFolder(ImageFolder):
    """ImageFolder whose class list and order come from the caller, not from sorting folders."""

    def __init__(self, root: Path, classes: Sequence[str], transform: Any = None) -> None:
        self._classes = list(classes)
        super().__init__(str(root), transform=transform)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        return self._classes, {c: i for i, c in enumerate(self._classes)}


class BloodCellsDataModule(L.LightningDataModule):
    """TRAIN minus a seeded validation fraction for fit, the official TEST folder for test.

    Images are resized to `image_size` x `image_size` and scaled to [0, 1], as in the tutorial.
    `mean` and `std` are the training images' per-channel statistics; the model normalises
    with them on its own device (see the model config), so they live with the data settings.
    """

    def __init__(
        self,
        root: str | Path,
        classes: Sequence[str],
        image_size: int = 200,
        val_fraction: float = 0.2,
        batch_size: int = 16,
        num_workers: int | None = None,
        seed: int = 42,
        train_split: str = "TRAIN",
        test_split: str = "TEST",
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.25, 0.25, 0.25),
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.root = Path(root)
        self.classes = list(classes)
        self.transform = v2.Compose(
            [
                v2.Resize((image_size, image_size)),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
            ]
        )
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if not 0 < hp.val_fraction < 1:
            raise CellclsError(f"data.val_fraction must be in (0, 1), got {hp.val_fraction}")
        split_root = find_split_root(self.root, [hp.train_split, hp.test_split])
        for split in (hp.train_split, hp.test_split):
            check_classes(split_root / split, self.classes)
        if stage in ("fit", "validate", None) and self.train_set is None:
            full = ClassFolder(split_root / hp.train_split, self.classes, self.transform)
            generator = torch.Generator().manual_seed(hp.seed)
            self.train_set, self.val_set = random_split(
                full, [1 - hp.val_fraction, hp.val_fraction], generator=generator
            )
        if stage in ("test", None) and self.test_set is None:
            self.test_set = ClassFolder(split_root / hp.test_split, self.classes, self.transform)

    def _loader(self, dataset: Dataset | None, shuffle: bool = False) -> DataLoader:
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        workers = self.hparams.num_workers
        if workers is None:
            # On a CPU the main process needs the cores for the maths; on a GPU it mostly waits.
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
            workers = min(8, cpus if on_gpu else cpus - 1)
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            num_workers=workers,
            pin_memory=on_gpu,
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)


class SyntheticDataModule(BloodCellsDataModule):
    """The same pipeline on generated images, written to `root` on first use and reused after."""

    def __init__(
        self,
        root: str | Path,
        n_train: int = 200,
        n_test: int = 50,
        generator_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, **kwargs)

    def prepare_data(self) -> None:
        if not self.root.exists():
            hp = self.hparams
            generate_dataset(self.root, hp.n_train, hp.n_test, seed=hp.generator_seed)

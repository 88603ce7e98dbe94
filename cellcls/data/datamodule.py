"""LightningDataModules over ImageFolder-style blood-cell datasets (real or generated)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets import ImageFolder

from cellcls.data.cache import (
    CachedImages,
    DecodeImage,
    DeviceBatches,
    check_images,
    cpu_count,
    load_images,
    store_bytes,
)
from cellcls.data.download import ensure_dataset
from cellcls.data.generate import generate_dataset
from cellcls.data.groups import grouped_split, load_groups, random_indices, shared_groups
from cellcls.data.layout import check_classes, find_split_root, warn_not_images
from cellcls.errors import CellclsError, is_number, is_whole, require
from cellcls.hardware import free_device_memory
from cellcls.report import list_unreadable, write_unreadable

log = logging.getLogger(__name__)
CACHE_MODES = ("disk", "memory", None)
# How validation images are held out of TRAIN: whole source cells, or images at random.
VAL_SPLITS = ("grouped", "random")
# With on_device="auto", a split's images go onto a GPU when they take less than this share of
# its free memory.
DEVICE_SHARE = 0.5


class ClassFolder(ImageFolder):
    """ImageFolder whose class list and order come from the caller, not from sorting folders."""

    def __init__(self, root: Path, classes: Sequence[str], loader: Any) -> None:
        self._classes = list(classes)
        super().__init__(str(root), loader=loader)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        return self._classes, {c: i for i, c in enumerate(self._classes)}


# `split` value that tests on the seeded validation part of TRAIN (the tutorial's protocol).
HOLDOUT = "val"


def batch_as_is(batch: Any) -> Any:
    """Collate for `CachedImages`, whose `__getitems__` already returns a whole batch."""
    return batch


class BloodCellsDataModule(L.LightningDataModule):
    """TRAIN minus a seeded validation fraction for fit; the `split` folder (TEST) for test.

    `val_split="grouped"` holds out whole source cells (see `cellcls.data.groups`): TRAIN holds
    many augmented copies of each cell, so `"random"` (the tutorial's protocol) validates on
    cells the model has trained on, and its `val/acc` is optimistic.

    With `crop`, a `crop`-pixel square around the white cell (the largest purple-stained region,
    see `cellcls.data.crop`) is cut out of each image first; images without one are
    centre-cropped and listed in `centred`.
    Images are resized to `image_size` x `image_size` and decoded once into a uint8 store
    (`cache`: `disk` under `cache_dir`, `memory`, or null to decode every image in every
    epoch). Batches stay uint8 (4x less to move); the model scales them to [0, 1], as in the
    tutorial, and normalises them in the same pass on the training device.
    `mean` and `std` are the training images' per-channel statistics; the model normalises
    with them on its own device (see the model config), so they live with the data settings.
    `split` names the folder that test and eval score, next to `train_split`; `split="val"`
    scores the validation part of TRAIN instead, as the tutorial does. With `download`, a
    `root` without the dataset gets Kaggle's, fetched with kagglehub (`prepare_data`).
    `on_device` copies each split's stored images onto the training device once, so batches
    are indexed there without a DataLoader (`DeviceBatches`; "auto": on one GPU, when they fit).
    """

    def __init__(
        self,
        root: str | Path,
        classes: Sequence[str],
        image_size: int = 200,
        crop: int | None = None,
        val_fraction: float = 0.2,
        val_split: str = "grouped",
        batch_size: int = 16,
        num_workers: int | None = None,
        seed: int = 42,
        train_split: str = "TRAIN",
        split: str = "TEST",
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.25, 0.25, 0.25),
        cache: str | None = "memory",
        cache_dir: str | Path | None = None,
        skip_bad_images: bool = False,
        download: bool = False,
        on_device: bool | str = "auto",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self._check_settings()
        self.root = Path(root)
        self.classes = list(classes)
        self.decode = DecodeImage(image_size, crop)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        # Unreadable image files left out with data.skip_bad_images=true: path -> reason.
        self.skipped: dict[str, str] = {}
        # With `crop`: the files of each folder in which no white cell was found (centre crop).
        self.centred: dict[str, list[str]] = {}

    def _check_settings(self) -> None:
        """Fail on a setting of the wrong type or range now, not deep inside training."""
        hp = self.hparams
        classes = hp.classes
        names_ok = not isinstance(classes, str) and all(isinstance(c, str) for c in classes)
        require(
            names_ok and len(set(classes)) == len(classes) >= 2,
            "data.classes",
            classes,
            "a list of at least two distinct class-folder names",
        )
        require(is_whole(hp.image_size, 1), "data.image_size", hp.image_size, "an integer >= 1")
        require(
            hp.crop is None or is_whole(hp.crop, 8),
            "data.crop",
            hp.crop,
            "null (whole image) or the side in pixels of the square cut around the white cell",
        )
        require(hp.val_split in VAL_SPLITS, "data.val_split", hp.val_split, "grouped or random")
        require(is_whole(hp.batch_size, 1), "data.batch_size", hp.batch_size, "an integer >= 1")
        require(
            is_number(hp.val_fraction) and 0 <= hp.val_fraction < 1,
            "data.val_fraction",
            hp.val_fraction,
            "a number from 0 (train on all of TRAIN, no validation) to 1 (exclusive), e.g. 0.2",
        )
        require(
            hp.val_fraction > 0 or hp.split != HOLDOUT,
            "data.split",
            hp.split,
            "a folder such as TEST: with data.val_fraction=0 no validation images are held out",
        )
        require(
            hp.num_workers is None or is_whole(hp.num_workers, 0),
            "data.num_workers",
            hp.num_workers,
            "null (automatic) or an integer >= 0",
        )
        require(hp.cache in CACHE_MODES, "data.cache", hp.cache, "disk, memory or null")
        require(
            hp.cache != "disk" or bool(hp.cache_dir),
            "data.cache_dir",
            hp.cache_dir,
            "a folder for the store when data.cache=disk",
        )
        require(
            isinstance(hp.skip_bad_images, bool),
            "data.skip_bad_images",
            hp.skip_bad_images,
            "true or false",
        )
        require(isinstance(hp.download, bool), "data.download", hp.download, "true or false")
        require(
            hp.on_device in (True, False, "auto"),
            "data.on_device",
            hp.on_device,
            "auto, true or false",
        )
        require(
            hp.on_device is not True or hp.cache is not None,
            "data.on_device",
            hp.on_device,
            "auto or false without the decoded-image store (data.cache=null)",
        )

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        fitting = stage in ("fit", "validate", None)
        testing = stage in ("test", "predict", None)
        needs_train = fitting or (testing and hp.split == HOLDOUT)
        splits = [hp.train_split] if needs_train else []
        if testing and hp.split != HOLDOUT:
            splits.append(hp.split)
        split_root = self.split_root = find_split_root(self.root, splits)
        for split in splits:
            check_classes(split_root / split, self.classes)
        if needs_train and self.train_set is None:
            full = self._dataset(split_root / hp.train_split)
            if hp.val_fraction == 0:  # refit on every cell once the recipe is chosen
                train, val = list(range(len(full))), []
                log.info(
                    "data.val_fraction=0: training on all %d images of %s, no validation",
                    len(full),
                    hp.train_split,
                )
            elif hp.val_split == "random":
                train, val = random_indices(len(full), hp.val_fraction, hp.seed)
            else:
                train, val = self._grouped_split(full.samples)
            self.train_set, self.val_set = Subset(full, train), Subset(full, val)
        if testing and self.test_set is None:
            self.test_set = (
                self.val_set if hp.split == HOLDOUT else self._dataset(split_root / hp.split)
            )

    def image_paths(self, split: str) -> list[str]:
        """The image files of folder `split`, class by class, as the datasets list them."""
        folder = find_split_root(self.root, [split]) / split
        check_classes(folder, self.classes)
        return [path for path, _ in ClassFolder(folder, self.classes, loader=None).samples]

    def source_groups(self, *splits: str) -> dict[str, int]:
        """path -> source group of every image in the folders `splits`, grouped together (see
        `cellcls.data.groups`); computed once and kept beside the decoded-image stores."""
        paths = [path for split in splits for path in self.image_paths(split)]
        groups = load_groups(paths, self.hparams.cache_dir, name="+".join(splits))
        return dict(zip(paths, groups.tolist(), strict=True))

    def _grouped_split(self, samples: Sequence[tuple[str, int]]) -> tuple[list[int], list[int]]:
        """Train and validation indices of `samples` (TRAIN) that share no source group."""
        hp = self.hparams
        groups = self.source_groups(hp.train_split)
        ids = [groups[path] for path, _ in samples]
        train, val = grouped_split(ids, [y for _, y in samples], hp.val_fraction, hp.seed)
        n_groups = len(set(ids))
        if not val:
            raise CellclsError(
                f"data.val_split=grouped: {hp.train_split} holds only {n_groups} source group(s) "
                "per class or too few to hold any out for validation. Add images of more "
                "cells, or use data.val_split=random (optimistic: copies of one cell fall on "
                "both sides)."
            )
        random_leak = shared_groups(ids, *random_indices(len(samples), hp.val_fraction, hp.seed))
        log.info(
            "Validation holds out %d of %d source groups of %s (%d of %d images); no group is on "
            "both sides. (A random split would put %d validation images in a group with a "
            "training image.)",
            len({ids[i] for i in val}),
            n_groups,
            hp.train_split,
            len(val),
            len(samples),
            random_leak,
        )
        return train, val

    def prepare_data(self) -> None:
        """With `download`, fetch the dataset if `root` lacks it. Under DDP, build the disk
        cache and the source groups in one process: Lightning runs this on one rank per machine
        and makes the others wait, so their `setup` reads them."""
        if self.hparams.download:
            ensure_dataset(self.root, [self.hparams.train_split])
        trainer = self.trainer
        hp = self.hparams
        shared = hp.cache == "disk" or (hp.val_split == "grouped" and hp.cache_dir)
        if shared and trainer is not None and trainer.world_size > 1:
            self.setup(trainer.state.fn)  # "fit", "test", ...: the stage about to run

    def _dataset(self, folder: Path) -> Dataset:
        """One split folder, read through the decoded-image cache unless it is off.

        Every image file is checked once, before training: building the cache decodes it, and
        without a cache a cheaper read does. Unreadable files stop the run, or are skipped.
        """
        files = ClassFolder(folder, self.classes, loader=self.decode)
        warn_not_images(folder, self.classes)
        paths = [path for path, _ in files.samples]
        if self.hparams.cache is None:
            bad = check_images(paths, desc=f"checking {folder.name}")
        else:
            cache_dir = self.hparams.cache_dir if self.hparams.cache == "disk" else None
            images, bad, centred = load_images(
                paths, self.hparams.image_size, cache_dir, name=folder.name, crop=self.hparams.crop
            )
            if centred:
                self.centred[folder.name] = centred
                log.warning(
                    "No white cell found in %d of %d images in '%s': centre-cropped (e.g. %s)",
                    *(len(centred), len(paths), folder, centred[0]),
                )
        self._skip(folder, bad)
        rows = [i for i, path in enumerate(paths) if path not in bad]
        samples = [files.samples[i] for i in rows]
        for label, c in enumerate(self.classes):
            if all(y != label for _, y in samples):
                raise CellclsError(f"class folder '{folder / c}' holds no readable images.")
        if self.hparams.cache is None:
            files.samples = files.imgs = samples
            files.targets = [label for _, label in samples]
            return files
        return CachedImages(images, samples, files.classes, rows)

    def _skip(self, folder: Path, bad: dict[str, str]) -> None:
        """Stop on unreadable images, or (data.skip_bad_images) record them in the run folder."""
        if not bad:
            return
        listing = list_unreadable(bad)
        if not self.hparams.skip_bad_images:
            raise CellclsError(
                f"{len(bad)} image file(s) in '{folder}' cannot be read:\n{listing}\n"
                "Fix or remove them, or pass data.skip_bad_images=true to train without them."
            )
        self.skipped |= bad
        log.warning("Skipping %d unreadable image file(s) in '%s':\n%s", len(bad), folder, listing)
        if self.trainer is not None and self.trainer.is_global_zero:
            out = Path(self.trainer.default_root_dir) / "skipped_images.csv"
            write_unreadable(out, self.skipped)

    @property
    def test_paths(self) -> list[str]:
        """The test images' file paths, in the order the test loader yields them."""
        if self.test_set is None:
            raise RuntimeError("call setup('test') first")
        if isinstance(self.test_set, Subset):
            samples = self.test_set.dataset.samples  # type: ignore[attr-defined]
            return [samples[i][0] for i in self.test_set.indices]
        return [path for path, _ in self.test_set.samples]  # type: ignore[attr-defined]

    def _on_device(self, dataset: Dataset, name: str = "images") -> bool:
        """Whether this split's images go onto the training device (`on_device`); logged."""
        want, trainer = self.hparams.on_device, self.trainer
        if want is False or self.hparams.cache is None or trainer is None or dataset is None:
            return False
        if trainer.world_size > 1:  # every process would see every image: keep the sampler
            if want is True:
                log.warning("data.on_device=true is ignored with %d processes", trainer.world_size)
            return False
        device = trainer.strategy.root_device
        if want is True:
            return True
        if device.type != "cuda":
            return False
        need, free = store_bytes(dataset), free_device_memory(device)
        fits = need < DEVICE_SHARE * free
        if not fits:
            log.info(
                "%s: %.2f GB of images would take over half of the %.2f GB free on %s: they stay "
                "on the host, batches come through a DataLoader",
                *(name, need / 1e9, free / 1e9, device),
            )
        return fits

    def _loader(
        self, dataset: Dataset | None, name: str, shuffle: bool = False
    ) -> DataLoader | DeviceBatches:
        if self._on_device(dataset, name):
            device = self.trainer.strategy.root_device  # type: ignore[union-attr]
            # Lightning's overfit_batches turns a DataLoader's shuffling off; this is not one.
            shuffle = shuffle and not getattr(self.trainer, "overfit_batches", 0)
            batches = DeviceBatches(dataset, self.hparams.batch_size, device, shuffle)
            log.info(
                "%s: %d images (%.2f GB) on %s: batches are indexed there, no DataLoader",
                *(name, len(batches.targets), batches.images.nbytes / 1e9, device),
            )
            return batches
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        cached = self.hparams.cache is not None
        workers = self.hparams.num_workers
        if workers is None:
            # Cached batches are one indexing operation: workers would only add copies. Else, on
            # a CPU the main process needs the cores for the maths; on a GPU it mostly waits.
            cpus = cpu_count()
            workers = 0 if cached else min(8, cpus if on_gpu else cpus - 1)
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            num_workers=workers,
            pin_memory=on_gpu,
            persistent_workers=workers > 0,
            collate_fn=batch_as_is if cached else None,
        )

    def train_dataloader(self) -> DataLoader | DeviceBatches:
        return self._loader(self.train_set, "train", shuffle=True)

    def val_dataloader(self) -> DataLoader | DeviceBatches:
        return self._loader(self.val_set, "val")

    def test_dataloader(self) -> DataLoader | DeviceBatches:
        return self._loader(self.test_set, "test")


class SyntheticDataModule(BloodCellsDataModule):
    """The same pipeline on generated images, written to `root` on first use and reused after.

    `n_train` and `n_test` are images per class, `copies` images per source cell (see
    `cellcls.data.generate`).
    """

    def __init__(
        self,
        root: str | Path,
        n_train: int = 200,
        n_test: int = 50,
        copies: int = 5,
        generator_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, **kwargs)
        require(is_whole(copies, 1), "data.copies", copies, "an integer >= 1")

    def prepare_data(self) -> None:
        if not self.root.exists():
            hp = self.hparams
            generate_dataset(
                self.root, hp.n_train, hp.n_test, seed=hp.generator_seed, copies=hp.copies
            )
        super().prepare_data()

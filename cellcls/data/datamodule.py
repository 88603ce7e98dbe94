"""LightningDataModules over ImageFolder-style blood-cell datasets (real or generated).

Over 300 lines: one LightningDataModule, whose hooks share its state, and its generated-data
subclass, which checkpoints name by this module's path.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from cellcls.core.errors import CellclsError, check_table, is_whole, require
from cellcls.data.datasets import CachedImages, batch_as_is
from cellcls.data.decode import (
    DecodeImage,
    check_images,
    cpu_count,
    list_unreadable,
    write_unreadable,
)
from cellcls.data.device import DeviceBatches, fits_on
from cellcls.data.download import ensure_dataset
from cellcls.data.generate import SOURCES_CSV, generate_dataset, read_sources
from cellcls.data.layout import ClassFolder, check_classes, find_split_root, warn_not_images
from cellcls.data.matching import load_groups
from cellcls.data.settings import SETTINGS
from cellcls.data.splits import (
    HOLDOUT,
    fold_indices,
    grouped_split,
    random_indices,
    shared_groups,
)
from cellcls.data.store import load_images

log = logging.getLogger(__name__)


class BloodCellsDataModule(L.LightningDataModule):
    """TRAIN minus a seeded validation fraction for fit; the `split` folder (TEST) for test.

    `val_split="grouped"` holds out whole source cells (see `cellcls.data.matching`): TRAIN holds
    many augmented copies of each cell, so `"random"` (the tutorial's protocol) validates on
    cells the model has trained on, and its `val/acc` is optimistic.

    Each image is cut to a `crop`-pixel square around the white cell (`cellcls.data.crop`;
    none found: a centre crop, listed in `centred`), resized to `image_size` and decoded once
    into a uint8 store (`cache`: `disk` under `cache_dir`, `memory`, or null to decode every
    epoch); the model scales and normalises batches (`mean`, `std`: the training images'
    statistics) on the training device. `split` is the folder test and eval score (`"val"`:
    TRAIN's held-out part, as the tutorial does); `download` fetches Kaggle's dataset into a
    `root` without it; `on_device` keeps a split's store on the training device
    (`DeviceBatches`). The settings are checked by `cellcls.data.settings.SETTINGS`.
    """

    def __init__(
        self,
        root: str | Path,
        classes: Sequence[str],
        image_size: int = 200,
        crop: int | None = None,
        val_fraction: float = 0.2,
        val_split: str = "grouped",
        folds: int | None = None,
        fold: int = 0,
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
        check_table(self.hparams, SETTINGS, "data.")

    def _splits(self, stage: str | None) -> list[str]:
        """The folders `stage` reads: TRAIN to fit (or to test on its held-out part), the
        `split` folder to test; every one for `None`."""
        hp = self.hparams
        testing = stage in ("test", "predict", None)
        needs_train = stage in ("fit", "validate", None) or (testing and hp.split == HOLDOUT)
        return [hp.train_split] * needs_train + [hp.split] * (testing and hp.split != HOLDOUT)

    def prepare_data(self) -> None:
        """Write what `setup` reads, and nothing else (no state: Lightning runs this in one
        process per machine and makes the others wait): the download (`download`), the disk
        stores (`cache=disk`) and TRAIN's source groups (grouped validation, with `cache_dir`)."""
        hp = self.hparams
        if hp.download:
            ensure_dataset(self.root, [hp.train_split])
        splits = self._splits(self.trainer.state.fn if self.trainer is not None else None)
        if hp.cache == "disk":
            for split in splits:
                paths = self.image_paths(split)
                load_images(paths, hp.image_size, hp.cache_dir, name=split, crop=hp.crop)
        held_out = hp.val_fraction > 0 or hp.folds
        grouped = hp.val_split == "grouped" and held_out and hp.cache_dir
        if grouped and hp.train_split in splits:
            self.source_groups(hp.train_split, write=True)

    def setup(self, stage: str | None = None) -> None:
        """Read the splits `stage` needs: from the files `prepare_data` wrote, or, when it has
        not run (outside a Trainer), by decoding and grouping in memory, writing nothing."""
        hp = self.hparams
        splits = self._splits(stage)
        needs_train = hp.train_split in splits
        testing = stage in ("test", "predict", None)
        split_root = self.split_root = find_split_root(self.root, splits)
        for split in splits:
            check_classes(split_root / split, self.classes)
        if needs_train and self.train_set is None:
            full = self._dataset(split_root / hp.train_split)
            if hp.val_fraction == 0 and not hp.folds:  # refit on every cell once chosen
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

    def source_groups(self, *splits: str, write: bool = False) -> dict[str, int]:
        """path -> source group of every image in the folders `splits`, grouped together (see
        `cellcls.data.matching`); read from beside the decoded-image stores when computed
        before, and with `write` kept there."""
        paths = [path for split in splits for path in self.image_paths(split)]
        groups = load_groups(paths, self.hparams.cache_dir, "+".join(splits), write=write)
        return dict(zip(paths, groups.tolist(), strict=True))

    def report_groups(self, paths: Sequence[str]) -> list[int]:
        """The source group of each of `paths` (the test images), for intervals over cells:
        TRAIN's groups for its held-out part (`split=val`), else the split folder's (computed
        once and, with `cache_dir`, kept beside the stores)."""
        hp = self.hparams
        folder = hp.train_split if hp.split == HOLDOUT else hp.split
        groups = self.source_groups(folder, write=hp.cache_dir is not None)
        return [groups[path] for path in paths]

    def _grouped_split(self, samples: Sequence[tuple[str, int]]) -> tuple[list[int], list[int]]:
        """Train and validation indices of `samples` (TRAIN) that share no source group."""
        hp = self.hparams
        groups = self.source_groups(hp.train_split)
        ids = [groups[path] for path, _ in samples]
        labels, n_groups = [y for _, y in samples], len(set(ids))
        enough = n_groups >= (hp.folds or 2)
        if enough and hp.folds:
            train, val = fold_indices(ids, labels, hp.folds, hp.fold, hp.seed)
        elif enough:
            train, val = grouped_split(ids, labels, hp.val_fraction, hp.seed)
        if not enough or not val:
            raise CellclsError(
                f"data.val_split=grouped: {hp.train_split} holds only {n_groups} source group(s) "
                "per class or too few to hold any out for validation"
                + (f" in {hp.folds} folds (data.folds)" if hp.folds else "")
                + ". Add images of more cells, or use data.val_split=random (optimistic: copies "
                "of one cell fall on both sides)."
            )
        if hp.folds:
            log.info(
                "Fold %d of %d: validation holds out %d of %d source groups of %s (%d of %d "
                "images); no group is on both sides.",
                *(hp.fold, hp.folds, len({ids[i] for i in val}), n_groups, hp.train_split),
                *(len(val), len(samples)),
            )
            return train, val
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
                *(paths, self.hparams.image_size, cache_dir, folder.name, self.hparams.crop),
                build=False,  # prepare_data builds it
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
        """Whether this split's images go onto the attached trainer's device; logged."""
        trainer = self.trainer
        if trainer is None:
            return False
        return self.keeps_on(dataset, trainer.strategy.root_device, trainer.world_size, name)

    def keeps_on(
        self, dataset: Dataset | None, device: torch.device, world_size: int, name: str = "images"
    ) -> bool:
        """The `on_device` rule: whether a split's images are kept on `device` when
        `world_size` processes train (the bench asks it too, to feed its plain loop alike)."""
        want = self.hparams.on_device
        if want is False or self.hparams.cache is None or dataset is None:
            return False
        if world_size > 1:  # every process would see every image: keep the sampler
            if want is True:
                log.warning("data.on_device=true is ignored with %d processes", world_size)
            return False
        return want is True or (device.type == "cuda" and fits_on(dataset, device, name))

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

    def report_groups(self, paths: Sequence[str]) -> list[int]:
        """The generator's recorded source cells (`sources.csv`): the truth, not a matching. A
        folder it did not write (another `data.root` or `data.split`) is matched as any other."""
        if not (self.root / SOURCES_CSV).is_file():
            return super().report_groups(paths)
        ids: dict[str, int] = {}
        source = {r["path"]: ids.setdefault(r["source"], len(ids)) for r in read_sources(self.root)}
        try:
            keys = [Path(p).relative_to(self.root).as_posix() for p in paths]
        except ValueError:  # not under root
            keys = []
        if not keys or not all(k in source for k in keys):
            return super().report_groups(paths)
        return [source[k] for k in keys]

    def prepare_data(self) -> None:
        if not self.root.exists():
            hp = self.hparams
            generate_dataset(
                self.root, hp.n_train, hp.n_test, seed=hp.generator_seed, copies=hp.copies
            )
        super().prepare_data()

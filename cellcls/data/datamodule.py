"""LightningDataModules over any folder of class folders (Kaggle's, PBC, Raabin, a lab's own;
real or generated).

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
from cellcls.data.grouping import source_groups
from cellcls.data.layout import (
    ClassFolder,
    check_classes,
    class_folders,
    find_split_root,
    warn_not_images,
)
from cellcls.data.settings import SETTINGS
from cellcls.data.splits import (
    DRAWN,
    HOLDOUT,
    fold_indices,
    grouped_split,
    random_indices,
    shared_groups,
    too_few_groups,
)
from cellcls.data.stats import channel_stats
from cellcls.data.store import load_images

log = logging.getLogger(__name__)


class ImageFolderDataModule(L.LightningDataModule):
    """TRAIN minus a seeded validation fraction for fit; the `split` folder (TEST) for test.

    The layout is `root/<train_split>/<class>/*` with test folders beside it (Kaggle's:
    TRAIN, TEST), or, with `train_split=None`, `root/<class>/*` alone: the test part is then
    drawn from it (`split="test"`: a seeded `test_fraction` of each class, in whole groups).
    `classes` (None: the class folders, sorted) are the labels, in order; a test folder may lack
    some of them. `groups` says which images share a source (`cellcls.data.grouping`).

    `val_split="grouped"` holds out whole source cells (see `cellcls.data.matching`): TRAIN holds
    many augmented copies of each cell, so `"random"` (the tutorial's protocol) validates on
    cells the model has trained on, and its `val/acc` is optimistic.

    Each image is cut to a `crop`-pixel square around the white cell (`cellcls.data.crop`;
    none found: a centre crop, listed in `centred`), resized to `image_size` and decoded once
    into a uint8 store (`cache`: `disk` under `cache_dir`, `memory`, or null to decode every
    epoch); the model scales and normalises batches (`mean`, `std`: the training images'
    statistics, measured on the training images for `"auto"`: `statistics`) on the training
    device. `split` is the folder test and eval score (`"val"`:
    TRAIN's held-out part, as the tutorial does); `download` fetches Kaggle's dataset into a
    `root` without it; `on_device` keeps a split's store on the training device
    (`DeviceBatches`). `ignore_classes`: class folders present but neither trained on nor
    scored (`cellcls.ood` leaves one out in turn). The settings are checked by
    `cellcls.data.settings.SETTINGS`.
    """

    def __init__(
        self,
        root: str | Path,
        classes: Sequence[str] | None = None,
        image_size: int = 200,
        crop: int | float | None = None,
        groups: str = "auto",
        test_fraction: float = 0.2,
        val_fraction: float = 0.2,
        val_split: str = "grouped",
        folds: int | None = None,
        fold: int | None = 0,
        batch_size: int = 16,
        num_workers: int | None = None,
        seed: int = 42,
        train_split: str | None = "TRAIN",
        split: str = "TEST",
        mean: Sequence[float] | str = "auto",
        std: Sequence[float] | str = "auto",
        cache: str | None = "memory",
        cache_dir: str | Path | None = None,
        skip_bad_images: bool = False,
        download: bool = False,
        on_device: bool | str = "auto",
        ignore_classes: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if classes is None:
            classes = class_folders(root, train_split)
        self.save_hyperparameters(logger=False)
        self._check_settings()
        self.root = Path(root)
        self.classes = list(classes)
        self.decode = DecodeImage(image_size, crop)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.val_groups: list[str] | None = None  # set by a grouped split
        self.test_set: Dataset | None = None
        # Unreadable image files left out with data.skip_bad_images=true: path -> reason.
        self.skipped: dict[str, str] = {}
        # With `crop`: the files of each folder in which no white cell was found (centre crop).
        self.centred: dict[str, list[str]] = {}
        # The normalisation the model takes, once fitting is set up: {"mean", "std", "images"}.
        self.statistics: dict[str, Any] | None = None
        # Training images per class (model.class_weights=balanced weighs the loss by them).
        self.class_counts: list[int] | None = None
        # Images and source cells on each side of a grouped split (set by setup), for model cards.
        self.summary: dict[str, Any] | None = None
        self._drawn: list[int] = []  # without a test folder: the drawn test part of the images

    def _check_settings(self) -> None:
        """Fail on a setting of the wrong type or range now, not deep inside training."""
        check_table(self.hparams, SETTINGS, "data.")

    def _splits(self, stage: str | None) -> list[str]:
        """The folders `stage` reads: TRAIN to fit (or to test on its held-out part), the
        `split` folder to test; every one for `None`."""
        hp = self.hparams
        testing = stage in ("test", "predict", None)
        if hp.train_split is None:  # one folder: the test part is drawn from it
            return [None]
        needs_train = stage in ("fit", "validate", None) or (testing and hp.split == HOLDOUT)
        return [hp.train_split] * needs_train + [hp.split] * (testing and hp.split != HOLDOUT)

    def folder(self, split: str | None) -> Path:
        """Split folder `split` (under `root`, or in Kaggle's nesting), or `root` for None."""
        return find_split_root(self.root, [split] if split else []) / (split or "")

    def _name(self, split: str | None) -> str:
        """The name of a split's store and groups: the folder's own name."""
        return split or self.root.expanduser().resolve().name

    def check_layout(self) -> None:
        """Refuse a missing `root` or a split folder without the classes now, before a run
        prints its config or starts (with `download`, `prepare_data` fetches it first)."""
        if self.hparams.download:
            return
        for split in self._splits(None):
            check_classes(
                self.folder(split),
                self.classes,
                allow_missing=split == self.hparams.split,
                ignored=self.hparams.ignore_classes,
            )

    def prepare_data(self) -> None:
        """Write what `setup` reads, and nothing else (no state: Lightning runs this in one
        process per machine and makes the others wait): the download (`download`), the disk
        stores (`cache=disk`) and TRAIN's source groups (grouped validation, with `cache_dir`)."""
        hp = self.hparams
        if hp.download:
            ensure_dataset(self.root, [hp.train_split])
        splits = self._splits(self.trainer.state.fn if self.trainer is not None else None)
        for split in splits:  # headers first: a bad file stops the run before anything is written
            paths = self.image_paths(split)
            scan = check_images(paths, desc=f"checking {self._name(split)}", decode=False)
            self._refuse(self.folder(split), scan)
            if hp.cache == "disk":  # decoding finds the rest (a truncated file), before grouping
                name = self._name(split)
                bad = load_images(paths, hp.image_size, hp.cache_dir, name=name, crop=hp.crop)[1]
                self._refuse(self.folder(split), bad)
        held_out = hp.val_fraction > 0 or hp.folds or hp.train_split is None
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
        self.split_root = find_split_root(self.root, [s for s in splits if s])
        for split in splits:
            check_classes(
                self.folder(split),
                self.classes,
                allow_missing=split == hp.split,
                ignored=hp.ignore_classes,
            )
        if needs_train and self.train_set is None:
            full = self._dataset(self.folder(hp.train_split))
            pool = self._draw_test(full.samples)  # every image, or all but the drawn test part
            if hp.val_fraction == 0 and not hp.folds:  # refit on every cell once chosen
                train, val = pool, []
                log.info(
                    "data.val_fraction=0: training on all %d images of %s, no validation",
                    len(pool),
                    self._name(hp.train_split),
                )
            elif hp.val_split == "random":
                train, val = random_indices(len(pool), hp.val_fraction, hp.seed)
                train, val = [pool[i] for i in train], [pool[i] for i in val]
            else:
                train, val = self._grouped_split(full.samples, pool)
            self.train_set, self.val_set = Subset(full, train), Subset(full, val)
            labels = [full.samples[i][1] for i in train]
            self.class_counts = [labels.count(c) for c in range(len(self.classes))]
            if stage in ("fit", None):
                self.statistics = self._statistics(full, train)
        if testing and self.test_set is None:
            if hp.split == HOLDOUT:
                self.test_set = self.val_set
            elif hp.train_split is None:
                self.test_set = Subset(self.train_set.dataset, self._drawn)
            else:
                self.test_set = self._dataset(self.folder(hp.split), test=True)

    def _statistics(self, full: Dataset, train: Sequence[int]) -> dict[str, Any]:
        """The normalisation for the model: `mean`/`std` as given, or (`"auto"`) measured on the
        training images (with the store, all of them; without, up to 2,000 decoded again)."""
        hp = self.hparams
        if hp.mean != "auto" and hp.std != "auto":
            return {"mean": list(hp.mean), "std": list(hp.std), "images": None}
        if isinstance(full, CachedImages):
            images, rows = full.images, full.rows[list(train)].tolist()
        else:
            step = max(1, len(train) // 2000)
            images = torch.stack([full[i][0] for i in train[::step]])
            rows = list(range(len(images)))
        mean, std = channel_stats(images, rows)
        mean = mean if hp.mean == "auto" else list(hp.mean)  # one may be given, the other auto
        std = std if hp.std == "auto" else list(hp.std)
        log.info(
            "Normalisation measured on %d training images (data.mean=auto): mean %s, std %s",
            len(rows),
            [round(m, 3) for m in mean],
            [round(v, 3) for v in std],
        )
        return {"mean": mean, "std": std, "images": len(rows)}

    def image_paths(self, split: str | None) -> list[str]:
        """The image files of folder `split`, class by class, as the datasets list them."""
        hp = self.hparams
        folder = self.folder(split)
        test = split == hp.split and split is not None
        check_classes(folder, self.classes, allow_missing=test, ignored=hp.ignore_classes)
        files = ClassFolder(folder, self.classes, loader=None, allow_empty=test)
        return [path for path, _ in files.samples]

    def source_groups(self, *splits: str | None, write: bool = False) -> dict[str, int]:
        """path -> source group of every image in the folders `splits`, grouped together as
        `groups` says (`cellcls.data.grouping`); with `auto`, read from beside the
        decoded-image stores when computed before, and with `write` kept there."""
        paths = [path for split in splits for path in self.image_paths(split)]
        name = "+".join(self._name(split) for split in splits)
        hp = self.hparams
        groups = source_groups(paths, hp.groups, self.root, hp.cache_dir, name, write=write)
        return dict(zip(paths, groups.tolist(), strict=True))

    def report_groups(self, paths: Sequence[str]) -> list[int]:
        """The source group of each of `paths` (the test images), for intervals over cells:
        TRAIN's groups for its held-out part (`split=val`), else the split folder's (computed
        once and, with `cache_dir`, kept beside the stores)."""
        hp = self.hparams
        folder = hp.train_split if hp.split in (HOLDOUT, DRAWN) else hp.split
        groups = self.source_groups(folder, write=hp.cache_dir is not None)
        return [groups[path] for path in paths]

    def _draw_test(self, samples: Sequence[tuple[str, int]]) -> list[int]:
        """Without a test folder (`train_split=None`), draw the test part (`test_fraction` of
        each class, whole groups, seeded) into `_drawn`; returns the indices left to train."""
        hp = self.hparams
        if hp.train_split is not None:
            return list(range(len(samples)))
        groups = self.source_groups(None)
        ids = [groups[path] for path, _ in samples]
        labels = [y for _, y in samples]
        few = too_few_groups(ids, labels, self.classes, 3)
        if few:
            raise CellclsError(
                f"data.root '{self.root}': {few}; drawing a test part and a validation part in "
                "whole groups needs at least 3 per class. Add images of that class, remove it "
                "(data.classes), or give a test folder (data.train_split, data.split)."
            )
        pool, self._drawn = grouped_split(ids, labels, hp.test_fraction, hp.seed + 1)
        log.info(
            "No test folder: the test part (data.split=%s) holds %d of %d source groups (%d of "
            "%d images), drawn by group with data.test_fraction=%s and data.seed.",
            *(DRAWN, len({ids[i] for i in self._drawn}), len(set(ids)), len(self._drawn)),
            *(len(samples), hp.test_fraction),
        )
        return pool

    def _grouped_split(
        self, samples: Sequence[tuple[str, int]], pool: Sequence[int]
    ) -> tuple[list[int], list[int]]:
        """Train and validation indices among `pool` (of TRAIN's `samples`) that share no
        source group."""
        hp = self.hparams
        groups = self.source_groups(hp.train_split)
        pool = list(pool)
        ids = [groups[samples[i][0]] for i in pool]
        labels, n_groups = [samples[i][1] for i in pool], len(set(ids))
        enough = n_groups >= (hp.folds or 2)
        few = too_few_groups(ids, labels, self.classes, 2)
        if few:
            raise CellclsError(
                f"data.val_split=grouped: in {self._name(hp.train_split)}, {few}; holding whole "
                "groups out for validation needs at least 2 per class. Add images of that class, "
                "remove it (data.classes), or use data.val_split=random (optimistic)."
            )
        if hp.folds and hp.fold is None:
            raise CellclsError(
                f"data.fold=null (every fold of data.folds={hp.folds}) is python -m cellcls.cv's; "
                "a single run holds out one: give data.fold=0 ... data.folds - 1."
            )
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
        name = self._name(hp.train_split)
        train_groups = {ids[i] for i in train}
        self.val_groups = [ids[i] for i in val]  # in val_set's order: calibration's cells
        self.summary = {  # for the model card (cellcls.run.state.SaveConfig keeps it)
            "split": name,
            "train_images": len(train),
            "train_cells": len(train_groups),
            "val_images": len(val),
            "val_cells": len({ids[i] for i in val}),
        }
        if hp.folds:
            log.info(
                "Fold %d of %d: validation holds out %d of %d source groups of %s (%d of %d "
                "images); no group is on both sides.",
                *(hp.fold, hp.folds, len({ids[i] for i in val}), n_groups, name),
                *(len(val), len(pool)),
            )
            return [pool[i] for i in train], [pool[i] for i in val]
        random_leak = shared_groups(ids, *random_indices(len(pool), hp.val_fraction, hp.seed))
        log.info(
            "Validation holds out %d of %d source groups of %s (%d of %d images); no group is on "
            "both sides. (A random split would put %d validation images in a group with a "
            "training image.)",
            len({ids[i] for i in val}),
            n_groups,
            name,
            len(val),
            len(pool),
            random_leak,
        )
        return [pool[i] for i in train], [pool[i] for i in val]

    def _dataset(self, folder: Path, test: bool = False) -> Dataset:
        """One split folder, read through the decoded-image cache unless it is off.

        Every image file is checked once, before training: building the cache decodes it, and
        without a cache a cheaper read does. Unreadable files stop the run, or are skipped. A
        `test` folder may lack classes.
        """
        files = ClassFolder(folder, self.classes, loader=self.decode, allow_empty=test)
        warn_not_images(folder, self.classes)
        paths = [path for path, _ in files.samples]
        if self.hparams.cache is None:
            bad = check_images(paths, desc=f"checking {folder.name}")
        else:
            cache_dir = self.hparams.cache_dir if self.hparams.cache == "disk" else None
            images, bad, centred = load_images(
                *(paths, self.hparams.image_size, cache_dir, self._name(folder.name or None)),
                crop=self.hparams.crop,
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
            if not test and all(y != label for _, y in samples):
                raise CellclsError(f"class folder '{folder / c}' holds no readable images.")
        if self.hparams.cache is None:
            files.samples = files.imgs = samples
            files.targets = [label for _, label in samples]
            return files
        return CachedImages(images, samples, files.classes, rows)

    def _refuse(self, folder: Path, bad: dict[str, str]) -> None:
        """Stop on unreadable images, listed, unless data.skip_bad_images."""
        if bad and not self.hparams.skip_bad_images:
            raise CellclsError(
                f"{len(bad)} image file(s) in '{folder}' cannot be read:\n{list_unreadable(bad)}"
                "\nFix or remove them, or pass data.skip_bad_images=true to train without them."
            )

    def _skip(self, folder: Path, bad: dict[str, str]) -> None:
        """Stop on unreadable images, or (data.skip_bad_images) record them in the run folder."""
        if not bad:
            return
        self._refuse(folder, bad)
        listing = list_unreadable(bad)
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


# The name that configs and checkpoints before `data=imagefolder` give it.
BloodCellsDataModule = ImageFolderDataModule


class SyntheticDataModule(ImageFolderDataModule):
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

    def check_layout(self) -> None:
        if self.root.exists():  # else generated by prepare_data
            super().check_layout()

    def prepare_data(self) -> None:
        if not self.root.exists():
            hp = self.hparams
            generate_dataset(
                self.root, hp.n_train, hp.n_test, seed=hp.generator_seed, copies=hp.copies
            )
        super().prepare_data()

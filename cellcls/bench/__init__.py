"""`python -m cellcls.bench`: input pipeline and training speed, measured side by side in one run.

Every figure is images per second over the same images, batch size and cores: the fastest of
two passes after a warm-up pass. The table is for people; the last line is one JSON object.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import Subset

from cellcls.bench.loops import (
    DEVICE,
    HOST,
    PASSES,
    data_path,
    lightning_train,
    plain_torch_train,
    timed_pass,
    tutorial_loader,
)
from cellcls.bench.peer import keras_train
from cellcls.core.errors import CellclsError
from cellcls.core.hardware import reuse_freed_memory, uses_cuda
from cellcls.data.datamodule import ImageFolderDataModule
from cellcls.data.decode import cpu_count
from cellcls.run.cli import entry

log = logging.getLogger(__name__)


def bench(cfg: DictConfig) -> dict[str, Any]:
    """Measure every figure on the same first `bench.n_images` images of the training split."""
    L.seed_everything(cfg.seed, workers=True)
    reuse_freed_memory()  # as cellcls.train does, for every figure of this process
    if cfg.data.get("cache") is None:
        raise CellclsError("cellcls.bench measures the cache against ImageFolder: set data.cache")
    if cfg.bench.n_images < 1:
        raise CellclsError(f"bench.n_images must be at least 1, got {cfg.bench.n_images}")
    dm: ImageFolderDataModule = instantiate(cfg.data, _convert_="object")
    dm.prepare_data()
    start = time.perf_counter()
    dm.setup("fit")  # decodes TRAIN into the cache, or opens the cache a run already built
    setup_s = time.perf_counter() - start
    n = min(cfg.bench.n_images, len(dm.train_set))
    full = dm.train_set.dataset  # all of TRAIN, behind the random split
    indices = [dm.train_set.indices[i] for i in range(n)]
    # setup() keeps it: train_set is set. One Subset of the store, not a Subset of the split's
    # Subset: the device store (`DeviceBatches`, `store_bytes`) reads rows of a store's Subset.
    dm.train_set = Subset(full, indices)
    gpu = uses_cuda(cfg.trainer.accelerator)
    device = torch.device("cuda" if gpu else "cpu")

    def to_device(batch: Any) -> Any:
        return batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)

    # The data path of every row, keyed as the rows' figures are (without "_img_s").
    r: dict[str, Any] = {"data_path": (paths := {})}
    log.info("ImageFolder, decode + resize every epoch (%d images) ...", n)
    folder_loader = tutorial_loader(dm, full, indices, workers=cpu_count())
    r["imagefolder_img_s"] = timed_pass(lambda: folder_loader, to_device, device)
    paths["imagefolder"] = HOST  # PIL decodes on the host: always a copy per batch
    log.info("cellcls's cached pipeline ...")
    r["cached_img_s"] = timed_pass(dm.train_dataloader, to_device, device)
    paths["cached"] = HOST  # no trainer yet: the DataLoader over the store, copied per batch
    # The plain loop takes the Lightning rows' path: the device store where they get it.
    paths["plain_torch_train"] = data_path(dm, device)
    log.info("plain PyTorch loop, fp32, data path: %s ...", paths["plain_torch_train"])
    batch_size = dm.hparams.batch_size
    r["plain_torch_train_img_s"] = plain_torch_train(
        cfg, full, indices, batch_size, device, dm.statistics, paths["plain_torch_train"]
    )
    log.info("Lightning with cellcls's defaults ...")
    r["lightning_train_img_s"], paths["lightning_train"] = lightning_train(cfg, dm)
    log.info("Lightning with the plain loop's settings ...")
    r["lightning_same_settings_img_s"], paths["lightning_same_settings"] = lightning_train(
        cfg, dm, precision="32-true", channels_last=False
    )
    for row in ("lightning_train", "lightning_same_settings"):
        if paths[row] != paths["plain_torch_train"]:
            log.warning(
                "%s took the %s path, the plain loop the %s one: not like with like",
                *(row, paths[row], paths["plain_torch_train"]),
            )
    r["keras_train_img_s"], r["keras_peer"] = None, "off (bench.keras=false)"
    paths["keras_train"] = None
    if cfg.bench.keras:
        log.info("the tutorial's Keras/TensorFlow, in a subprocess ...")
        images = full.images[full.rows[indices]]
        python = cfg.bench.get("peer_python")
        peer = keras_train(images, full.targets[indices], cfg, python, epochs=PASSES)
        r["keras_train_img_s"], r["keras_peer"] = peer
        # Keras batches the numpy arrays it is given on the host.
        paths["keras_train"] = HOST if peer[0] is not None else None
        if peer[0] is None:
            log.warning("Keras peer %s", peer[1])
    keras = r["keras_train_img_s"]
    r["lightning_over_keras"] = r["lightning_train_img_s"] / keras if keras else None
    r["lightning_same_settings_over_plain"] = (
        r["lightning_same_settings_img_s"] / r["plain_torch_train_img_s"]
    )
    return r | {
        "cache_setup_s": round(setup_s, 2),
        "precision": str(cfg.trainer.precision),
        "channels_last": bool(cfg.model.get("channels_last", False)),
        "device": torch.cuda.get_device_name(device) if gpu else f"cpu ({cpu_count()} cores)",
        "batch_size": dm.hparams.batch_size,
        "image_size": dm.hparams.image_size,
        "n_images": n,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "train_store_mb": round(full.images.numel() / 2**20),
    }


def data_path_label(path: str | None, gpu: bool) -> str:
    """The table's words for a row's data path (DEVICE, HOST, or None for a row not run)."""
    if path is None:
        return "-"
    if path == DEVICE:
        return "device store"
    return "host -> GPU per batch" if gpu else "host, per batch"


def format_results(r: dict[str, Any]) -> str:
    """The speeds as a table, with each row's data path and the ratios the README quotes."""
    rows = [
        ("ImageFolder + PIL, every epoch (data only)", "imagefolder"),
        ("cellcls cached pipeline (data only)", "cached"),
        ("plain PyTorch loop, fp32 (training)", "plain_torch_train"),
        (f"cellcls Lightning, {r['precision']} (training)", "lightning_train"),
        ("cellcls Lightning, plain loop's settings", "lightning_same_settings"),
        ("the tutorial's Keras/TensorFlow (training)", "keras_train"),
    ]
    gpu = not r["device"].startswith("cpu")
    lines = [f"{'pipeline':<46} {'img/s':>9}  data"]
    for name, row in rows:
        v, path = r[f"{row}_img_s"], data_path_label(r["data_path"][row], gpu)
        lines.append(f"{name:<46} {v:>9.1f}  {path}" if v else f"{name:<46} {'-':>9}  {path}")
    lines += [
        "data: device store = the images copied once onto the training device, every batch "
        "indexed there; host = every batch built on the host (ImageFolder always)",
        f"cached / ImageFolder: {r['cached_img_s'] / r['imagefolder_img_s']:.1f}x",
        f"Lightning / plain loop: {r['lightning_train_img_s'] / r['plain_torch_train_img_s']:.2f}x"
        f" (same settings: "
        f"{r['lightning_same_settings_img_s'] / r['plain_torch_train_img_s']:.2f}x)",
        f"Lightning / Keras: {r['lightning_over_keras']:.2f}x ({r['keras_peer']})"
        if r["lightning_over_keras"]
        else f"Keras peer {r['keras_peer']}",
        f"{r['device']}, batch {r['batch_size']}, {r['image_size']}px, {r['n_images']} images, "
        f"peak RSS {r['peak_rss_mb']} MB (decoded TRAIN store: {r['train_store_mb']} MB)",
    ]
    return "\n".join(lines)


# Trainer settings the bench sets itself (`cellcls_train`): given on its command line, refused.
OWN_TRAINER = ("max_epochs", "limit_val_batches", "num_sanity_val_steps", "logger")


def check(cfg: DictConfig) -> None:
    """Refuse a setting the bench would replace without a word."""
    given = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    for override in given:
        key = override.lstrip("+~").split("=", 1)[0]
        if key.removeprefix("trainer.") in OWN_TRAINER and key.startswith("trainer."):
            raise CellclsError(
                f"{key} is not used by cellcls.bench: it times {PASSES} passes of "
                "bench.n_images images without validation or logging; drop it."
            )


@entry("bench", check)
def main(cfg: DictConfig) -> dict[str, Any]:
    results = bench(cfg)
    print(format_results(results))
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in results.items()}))
    return results


if __name__ == "__main__":
    main()

"""cellcls: white-blood-cell image classifiers with PyTorch Lightning and Hydra."""

from pathlib import Path

from omegaconf import OmegaConf

__version__ = "0.1.0"

# The configs (conf/ beside the package), as an absolute path: `@hydra.main` finds them this way
# whether it runs as `python -m cellcls.train` or as the `cellcls-train` console script.
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def _auto_precision(accelerator: str) -> str:
    from cellcls.core.hardware import auto_precision  # imports torch: only when a config asks

    return auto_precision(accelerator)


def _class_folders(root: str, train_split: str | None) -> list[str]:
    from cellcls.data.layout import class_folders  # lists folders: only when a config asks

    return class_folders(root, train_split)


def _groups_help() -> str:
    from cellcls.run.cli import groups_help  # reads conf/: only for --help

    return groups_help()


def register_resolvers() -> None:
    """The resolvers cellcls's configs use.

    `${len:${data.classes}}` derives numbers from lists instead of repeating them;
    `${auto_precision:${trainer.accelerator}}` picks bf16/16-mixed or 32-true; `${not:...}`
    negates a setting (cuDNN's benchmark is off when determinism is asked for);
    `${class_folders:${.root},${.train_split}}` lists a dataset's classes; `${cellcls_groups:}`
    the options of every config group, for `--help`. Importing cellcls
    registers them, and so does Hydra itself when it starts: it imports every module under
    `hydra_plugins/`, cellcls's `hydra_plugins/cellcls_resolvers.py` included. So configs composed
    with Hydra's Compose API resolve without importing cellcls first.
    """
    OmegaConf.register_new_resolver("len", len, replace=True)
    OmegaConf.register_new_resolver("auto_precision", _auto_precision, replace=True)
    OmegaConf.register_new_resolver("not", lambda value: not value, replace=True)
    OmegaConf.register_new_resolver("class_folders", _class_folders, replace=True)
    OmegaConf.register_new_resolver("cellcls_groups", _groups_help, replace=True)


register_resolvers()


def __getattr__(name: str):
    """`from cellcls import load_classifier`: the Python API, imported (with torch) when asked."""
    if name in ("load_classifier", "Classifier", "Prediction"):
        from cellcls import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'cellcls' has no attribute {name!r}")

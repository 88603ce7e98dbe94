"""Every user error on the command line is one line, printed once, before the config tree and
before any work (cellcls.run.cli.entry); private configs are never offered."""

from pathlib import Path

import pytest

from cellcls.core.errors import CellclsError
from cellcls.run.cli import choices, preflight
from tests.conftest import FAST, run_module

MODEL = r"model=smallcn is not accepted: model must be one of .*smallcnn, smallcnn_bn.* \(did you"
BATCH = r"data.batchsize is not a setting of data \(did you mean data.batch_size\?\)"
MISSING = "data.root '/no/such/folder' does not exist"


@pytest.mark.parametrize(
    ("config", "argv", "message"),
    [
        (
            "train",
            ["model=smallcn"],
            MODEL,
        ),
        (
            "train",
            ["model=_classifier"],
            "model=_classifier is not accepted: a part other configs extend",
        ),
        ("train", ["-m", "model=smallcnn,nope"], "model=nope is not accepted"),
        (
            "train",
            ["data.batchsize=32"],
            r"data.batchsize is not a setting of data \(did you mean data.batch_size\?\)",
        ),
        ("train", ["dat.batch_size=32"], r"dat is not a setting \(did you mean data\?\)"),
        ("train", ["trainer.max_epoch=3"], r"did you mean trainer.max_epochs\?"),
        ("cv", ["cv.folds=3"], r"cv.folds is now data.folds: give data.folds=\.\.\. instead"),
        ("search", ["search.cv_folds=3"], "search.cv_folds is now data.folds"),
        (
            "train",
            ["data=imagefolder", "data.root=/no/such/folder"],
            "data.root '/no/such/folder' does not exist",
        ),
        ("train", ["seed=${nope}"], "seed: "),
    ],
)
def test_a_user_error_is_refused_in_one_line(config: str, argv: list[str], message: str) -> None:
    with pytest.raises(CellclsError, match=message) as err:
        preflight(config, argv)
    assert "\n" not in str(err.value) and "_torchvision" not in str(err.value)


def test_good_command_lines_pass(tmp_path: Path) -> None:
    preflight("train", [*FAST, "model=smallcnn_bn", "+note=hello", "~logger"])
    preflight("cv", ["-m", "data.fold=range(2)", "data.folds=2", "data=synthetic"])
    preflight("train", ["--help"])  # Hydra's own flags are Hydra's
    assert "_classifier" not in choices("model") and "smallcnn" in choices("model")


def test_an_image_folder_with_one_class_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "only" / "A").mkdir(parents=True)
    with pytest.raises(CellclsError, match="class") as err:
        preflight("train", ["data=imagefolder", f"data.root={tmp_path / 'only'}"])
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_errors_print_once_before_the_tree_and_help_hides_private_parts(
    tmp_path: Path, synthetic_cache: Path
) -> None:
    """As a user sees them: one `error:` line on stderr, no traceback, no config tree."""
    cases = {
        "model=smallcn": "did you mean smallcnn?",
        "data=imagefolder data.root=/no/such/folder": "data.root '/no/such/folder' does not exist",
        f"data.root={tmp_path / 'missing'}": "does not exist",  # found by the run, not a resolver
        "data.batch_size=0": "data.batch_size=0 is not accepted",  # the settings' own check
    }
    for args, message in cases.items():
        result = run_module("cellcls.train", args.split(), tmp_path, synthetic_cache)
        out = result.stdout + result.stderr
        assert result.returncode == 1, out[-2000:]
        assert out.count(message) == 1, out[-2000:]
        assert "Traceback" not in out and "CONFIG" not in out, out[-2000:]
        assert result.stderr.strip().splitlines()[-1].startswith("error: "), result.stderr
    bench = run_module(
        "cellcls.bench", ["data=synthetic", "trainer.max_epochs=3"], tmp_path, synthetic_cache
    )
    assert "trainer.max_epochs is not used by cellcls.bench" in bench.stderr, bench.stderr[-2000:]
    shown = run_module("cellcls.train", ["--help"], tmp_path, synthetic_cache).stdout
    assert "model: convnext_tiny" in shown and "_classifier" not in shown, shown[:2000]

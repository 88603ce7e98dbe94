"""Bad settings: one line that names the setting and what it accepts, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellcls.core.errors import exit_on_user_error
from cellcls.train import train
from tests.conftest import FAST, compose_run


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.batch_size=0", "data.batch_size=0 is not accepted: data.batch_size must be an int"),
        ("data.batch_size=abc", "data.batch_size='abc' is not accepted"),
        ("data.val_fraction=1.5", "data.val_fraction=1.5 is not accepted: data.val_fraction must"),
        ("data.val_fraction=-0.1", "data.val_fraction=-0.1 is not accepted"),
        ("data.val_fraction=0", "data.val_fraction must be > 0 while callbacks.model_checkpoint"),
        ("data.image_size=2", "data.image_size=2 is not accepted: data.image_size must be an int"),
        ("data.num_workers=-1", "data.num_workers=-1 is not accepted"),
        ("data.cache=ram", "data.cache='ram' is not accepted: data.cache must be disk, memory"),
        ("seed=abc", "seed='abc' is not accepted"),
        ("trainer.max_epochs=abc", "trainer.max_epochs='abc' is not accepted: trainer.max_epochs"),
        ("model.optimizer.lr=abc", "model.optimizer.lr='abc' is not accepted: model.optimizer.lr"),
        ("model.optimizer.lr=0", "model.optimizer.lr=0 is not accepted"),
        ("model.optimizer.weight_decay=-1", "model.optimizer.weight_decay=-1 is not accepted"),
        ("model.net.init=xavier", "model.net.init='xavier' is not accepted"),
        ("data.classes=[A,B,C,D]", "do not match data.classes=['A', 'B', 'C', 'D']"),
    ],
)
def test_bad_setting_is_one_line(
    tiny_root: Path, tmp_path: Path, override: str, message: str
) -> None:
    overrides = [f"data.root={tiny_root}", "data.cache=memory", *FAST[1:], override]
    cfg = compose_run(overrides, tmp_path)
    with pytest.raises(SystemExit) as stop:
        exit_on_user_error(train)(cfg)
    text = str(stop.value.code)
    assert message in text and "\n" not in text, text

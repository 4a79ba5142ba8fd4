"""matplotlib is in the `train` extra only: without it the loss plot is one clear line, and
training goes on without the plot."""

import json
import sys

import pytest

from anystory_cli.errors import AnyStoryError


def test_the_loss_plot_without_matplotlib_says_which_extra_to_install(tmp_path, monkeypatch):
    from anystory_cli.train import report as train_report

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 30)))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ModuleNotFoundError
    with pytest.raises(AnyStoryError, match=r"pip install 'anystory-cli\[train\]'"):
        train_report.plot_losses(log, tmp_path / "losses.png")
    assert not (tmp_path / "losses.png").exists()


def test_the_loss_plot_is_drawn_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    from anystory_cli.train import report as train_report

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 30)))
    out = train_report.plot_losses(log, tmp_path / "losses.png")
    assert out is not None and out.read_bytes().startswith(b"\x89PNG")

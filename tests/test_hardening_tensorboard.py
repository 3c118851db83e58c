"""A run folder deleted mid-training: TensorBoard's writer thread fails quietly (no thread traceback on
stderr) and the training loop's next write raises the OSError, which the CLI prints in one line."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest


def test_the_tensorboard_thread_fails_quietly_and_the_next_write_raises(tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    from tunelab.train.loop import _quiet_tensorboard_writer_thread

    folder = tmp_path / "run" / "train" / "tb"
    writer = SummaryWriter(str(folder))
    printed = []
    monkeypatch.setattr(threading, "excepthook", lambda args: printed.append(args.thread))
    _quiet_tensorboard_writer_thread()
    writer.add_scalar("loss", 1.0, 1)
    writer.flush()
    shutil.rmtree(tmp_path / "run")
    with pytest.raises(OSError):
        for step in range(2, 200):  # the thread fails on its next event; a later write re-raises that here
            writer.add_scalar("loss", 1.0, step)
            writer.flush()
            time.sleep(0.01)
    assert printed == []  # its thread failed, and was not printed


def test_other_threads_exceptions_are_printed_as_ever(monkeypatch):
    from tunelab.train.loop import _quiet_tensorboard_writer_thread

    printed = []
    monkeypatch.setattr(threading, "excepthook", lambda args: printed.append(args.exc_type))
    _quiet_tensorboard_writer_thread()
    for thread in (threading.Thread(target=lambda: 1 / 0), threading.Thread(target=Path("/no/such/file").read_text)):
        thread.start()
        thread.join()
    assert printed == [ZeroDivisionError, FileNotFoundError]


def test_the_cli_names_a_bytes_filename_as_text(monkeypatch, capsys):
    from tunelab import cli

    def fail() -> None:
        raise FileNotFoundError(2, "No such file or directory", b"/runs/x/train/tb/events")

    monkeypatch.setattr(cli, "app", fail)
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 2
    assert capsys.readouterr().err == "error: /runs/x/train/tb/events: No such file or directory\n"

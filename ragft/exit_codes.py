"""Exit codes of the ragft commands, and the one place that maps what a command raises to them.

0 done; 2 bad config or bad input (an `InputError`: nothing was started); 1 the job failed; 130 interrupted
(or any `exit_code` an exception carries, e.g. train's Interrupted with its resume command).
"""

from __future__ import annotations

import sys
from typing import Callable

from ragft.errors import InputError


def run_command(command: str, body: Callable[[], None], logs: str, bad_input_hint: str = "") -> int:
    """Run a command body; its exit code, with one message on stderr for what it raised."""
    try:
        body()
    except InputError as err:
        print(err.message(command, bad_input_hint), file=sys.stderr)
        return err.exit_code
    except Exception as err:
        code = getattr(err, "exit_code", 1)
        print(f"ragft {command}: {err}" if code != 1 else f"ragft {command}: the job failed: {err}\n  logs: {logs}",
              file=sys.stderr)
        return code
    return 0

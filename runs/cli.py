"""The example scripts' entry point: a user-facing error is one clear block and exit status 2.

    if __name__ == "__main__":
        cli.run(main)

`run(main)` calls `main(None)` (which reads sys.argv) and turns what a user can fix into a short
message on stderr without a traceback:

| raised | exit status | printed |
|---|---|---|
| invalid settings (pydantic ValidationError) | 2 | one line per setting: flag / env name and the problem |
| bad data (DatasetError), model, adapter, output dir or resume problems, any other ValueError / OSError | 2 | the message |
| runs.guards.Interrupted (SIGINT / SIGTERM during training) | 128 + signal (130, 143) | the checkpoint and the resume command |
| runs.guards.Diverged (non-finite loss or gradient norm) | 1 | the step, the value, the last good checkpoint |
| KeyboardInterrupt outside training | 130 | what that means for the run |

Anything else (a bug, out of memory) keeps its traceback. `FT_KIT_TRACEBACK=1` re-raises the
errors above too, to see where they came from. Library callers of `main(argv)` get the exceptions
themselves. Under several processes the main process prints the block; the others print the
first line of an error (it may be theirs alone) and nothing for a stop (every rank agreed on it).
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from pydantic import ValidationError

from config import format_settings_error
from data.errors import DatasetError
from runs.guards import RunStopped

#: What a user can fix: ValueError covers DatasetError, RunSetupError, UnicodeDecodeError and our
#: checks of settings against the model (target modules, templates, precision); OSError covers
#: models.ModelNotFoundError and missing / existing / unwritable files and folders.
USER_ERRORS = (ValidationError, ValueError, OSError)
TRACEBACK_ENV = "FT_KIT_TRACEBACK"


def run(main: Callable, argv: list[str] | None = None) -> None:
    """Call `main(argv)`; exit with the status above when it raises one of the errors above."""
    try:
        main(argv)
    except RunStopped as stop:
        _report(str(stop), "stopped")
        sys.exit(stop.exit_code)
    except KeyboardInterrupt:
        _report("interrupted (Ctrl-C) outside the training steps: checkpoints already written are complete; "
                "continue from the latest with RESUME_FROM_CHECKPOINT=auto")
        sys.exit(130)
    except USER_ERRORS as err:
        if os.environ.get(TRACEBACK_ENV):
            raise
        _report(describe(err) + f"\n({TRACEBACK_ENV}=1 shows where it was raised)")
        sys.exit(2)


def describe(err: BaseException) -> str:
    """The message of a user-facing error, as printed (without the "error:" prefix)."""
    if isinstance(err, ValidationError):
        return format_settings_error(err)
    if isinstance(err, DatasetError):
        return err.format_block()  # file, one line per malformed record and field, then how to fix it
    if isinstance(err, UnicodeDecodeError):
        return f"not UTF-8 text: {err}"
    return str(err) or type(err).__name__


def _report(message: str, kind: str = "error") -> None:
    rank = int(os.environ.get("RANK", "0"))  # no collective here: the process group may not exist yet
    if rank == 0:
        print(f"{kind}: {message}", file=sys.stderr, flush=True)
    elif kind == "error":  # a stop is agreed by every rank; an error may be this rank's own
        print(f"[rank {rank}] {kind}: {message.splitlines()[0]}", file=sys.stderr, flush=True)

"""Run example scripts as `python examples/x.py ...` would, each in a forked child of this process.

    python tests/forked_scripts.py JOBS.json RESULTS.json

JOBS.json lists `{"script", "argv", "cwd", "env", "log"}`. This process imports the examples once
(torch, transformers, TRL: the seconds a script spends starting), then forks one child per job,
which runs the script file as `__main__` (runpy) with its argv, working directory and environment,
its stdout and stderr going to `log`, and exits with the script's own status; an exception that
escapes is printed as the interpreter prints it (a traceback) with status 1. RESULTS.json gets
each child's exit status. tests/test_bad_input.py checks real exit statuses and stderr this way
without paying the start-up once per script.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(job: dict) -> None:
    fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.chdir(job["cwd"])
    os.environ.clear()
    os.environ.update(job["env"])
    sys.argv = [job["script"], *job["argv"]]
    code = 0
    try:
        runpy.run_path(job["script"], run_name="__main__")
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, (int, type(None))):
            print(stop.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(jobs_file: str, results_file: str) -> None:
    sys.path[:0] = [str(REPO), str(REPO / "examples")]
    import chat, dpo, finetune_llm_lora, full_finetune, merge_adapter  # noqa: E401, F401 - the start-up, once

    statuses = []
    for job in json.loads(Path(jobs_file).read_text()):
        pid = os.fork()
        if pid == 0:
            child(job)
        _, status = os.waitpid(pid, 0)
        statuses.append(os.waitstatus_to_exitcode(status))
    Path(results_file).write_text(json.dumps(statuses))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

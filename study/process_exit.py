"""Ending `python -m study` without tearing down the interpreter.

When Python exits normally it destroys every module and collects every object. With torch
loaded that is hundreds of thousands of objects, and it took 0.9 s on an idle 2-core
machine and 1.7-3.9 s under load, after the run had written everything. `exit_now` does
what a normal exit does that anyone can observe (flush stdout and stderr, run the `atexit`
handlers: logging's flush and close of the run's log file, multiprocessing's clean-up),
then ends the process with `os._exit`. The operating system releases memory, file
descriptors and locks. From its start Ctrl-C is ignored: everything is written by then.

It ends the process only when no other non-daemon thread is alive. Such a thread may still
have work to finish, and a normal exit waits for it: then `exit_now` exits normally too.
Daemon threads (tqdm's monitor, a lease's heartbeat) are not waited for by either.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
from typing import NoReturn


def exit_now(status: int | str | None) -> NoReturn:
    """`sys.exit(status)`, without the interpreter's teardown when that is safe."""
    if any(t is not threading.main_thread() and not t.daemon and t.is_alive()
           for t in threading.enumerate()):
        sys.exit(status)
    if threading.current_thread() is threading.main_thread():
        # Everything is written: a Ctrl-C now could only cut the clean-up short and print
        # a traceback from inside an atexit handler (torch's, at the end of a run).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if status is None:
        code = 0
    elif isinstance(status, int):
        code = status
    else:  # sys.exit's convention: a message goes to stderr, the status is 1
        print(status, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe, a full disk
            stream.flush()
    os._exit(code & 0xFF)

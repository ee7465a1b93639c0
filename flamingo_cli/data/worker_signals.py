"""DataLoader workers leave stop signals to the process that trains.

A SIGTERM, SIGINT or SIGUSR1 sent to a whole process group (systemd, `kill -- -PGID`, Ctrl-C,
Slurm's `scancel --signal`) reaches the loader workers too. By default they die of it, and the
trainer then fails on "DataLoader worker ... is killed by signal" instead of saving a
checkpoint at the next step boundary. `leave_stop_signals_to_parent` is the loaders'
`worker_init_fn`: workers ignore SIGINT and SIGUSR1, and end on a SIGTERM only when their
parent sent it (the DataLoader ends a worker that way at shutdown, as torch's own handler
does); a SIGTERM from anyone else is ignored. Workers still end when the trainer exits or dies.
"""

from __future__ import annotations

import os
import signal
import threading

IGNORED = (signal.SIGINT, signal.SIGUSR1)


def leave_stop_signals_to_parent(worker_id: int) -> None:
    """`worker_init_fn` for DataLoaders: see the module docstring."""
    for sig in IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    parent = os.getppid()
    # SIGTERM stays blocked in this thread and every thread it starts; one thread takes it
    # with its sender's pid, which a Python signal handler would not see
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(
        target=_end_on_parents_sigterm, args=(parent,), name="sigterm-from-parent", daemon=True
    ).start()


def _end_on_parents_sigterm(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent:
            os._exit(0)

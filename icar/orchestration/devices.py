"""One GPU per job when a sweep runs several jobs at once on one machine (`hydra/launcher=gpus`, joblib).

Each job holds a free device slot for its whole run through an exclusive file lock (one file per device, in the
sweep folder), so jobs of uneven length never share a GPU while another one idles. The operating system drops a
dead job's lock, so a crash frees its GPU.
"""

from __future__ import annotations

import contextlib
import fcntl
import random
import socket
import time
from pathlib import Path
from typing import IO, Iterator

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode


@contextlib.contextmanager
def claim_devices(n: int, total: int, lock_dir: Path, poll_s: float = 1.0,
                  timeout_s: float | None = None) -> Iterator[list[int]]:
    """Hold `n` of this machine's `total` devices (indices) for the duration, waiting while fewer are free.

    A job that cannot have all of them releases what it took before waiting, so two jobs that each want two of
    three devices do not deadlock.
    """
    if not 1 <= n <= total:
        raise ValueError(f"cannot claim {n} of {total} devices")
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    held: list[tuple[int, IO[str]]] = []
    try:
        while True:
            for index in range(total):
                f = open(lock_dir / f"device{index}.lock", "a")
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BaseException as err:
                    f.close()
                    if isinstance(err, BlockingIOError):
                        continue
                    raise
                held.append((index, f))
                if len(held) == n:
                    break
            if len(held) == n:
                break
            _release(held)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"no {n} free of {total} devices in {lock_dir} after {timeout_s} s")
            time.sleep(poll_s * (0.5 + random.random()))
        yield [index for index, _ in held]
    finally:
        _release(held)


def _release(held: list[tuple[int, IO[str]]]) -> None:
    for _, f in held:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
    held.clear()


def sweep_launcher() -> str | None:
    """The launcher (`_target_`) of the Hydra multirun this job belongs to; None outside a multirun."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return str(HydraConfig.get().launcher.get("_target_", ""))


def parallel_sweep_lock_dir() -> Path | None:
    """Where this job's device locks live when it runs under the joblib launcher (jobs in parallel on this
    machine): `<sweep dir>/.devices/<host>`; None for a single run or another launcher."""
    if "JoblibLauncher" not in (sweep_launcher() or ""):
        return None
    return Path(HydraConfig.get().sweep.dir).absolute() / ".devices" / socket.gethostname()

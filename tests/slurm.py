"""A throwaway single-node SLURM cluster for the tests: munged, slurmctld and slurmd from the Debian packages, run in
a temp folder of their own with a generated slurm.conf, stopped and deleted afterwards.

`slurm_cluster()` is a context manager yielding a `SlurmCluster`; tests/conftest.py wraps it in the session-scoped
`slurm` fixture. The node is this machine (its short hostname on 127.0.0.1) with the CPUs `nproc` reports and the
memory of /proc/meminfo less a margin, no GPUs, one partition `debug` and a high-priority partition `urgent` on the
same node whose jobs preempt (requeue) the others'. Everything the daemons write (state, spool, logs, pid files, the
munge key and socket) lives in the temp folder; the ports are free ones picked at start (outside the 15000-24999
range Lightning derives DDP ports from job ids in), so the cluster touches nothing of a system-wide SLURM or munge.

There is no accounting database (slurmdbd needs MySQL): a small `sacct` stand-in in the cluster's `bin/` answers the
one query submitit makes (`sacct -o JobID,State,NodeList --parsable2 -j ID`) from slurmctld's own job records, which
it keeps for `MinJobAge` seconds after a job ends. Clients find the cluster through `SlurmCluster.env` (SLURM_CONF
and PATH).

No SLURM or munge binaries: the tests that use the fixture are skipped, unless ICAR_REQUIRE_SLURM=1 (set by .ci/run),
where they fail instead.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

REQUIRE_ENV = "ICAR_REQUIRE_SLURM"
MUNGE_USER = "munge"  # the user the Debian package creates; munged refuses to run as root
_DAEMONS = ("munged", "slurmctld", "slurmd")
_CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
_DAEMON_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
MEMORY_MARGIN_MB = 1024  # RealMemory below MemTotal: slurmd drains a node that claims more than it has

# submitit polls `sacct -o JobID,State,NodeList --parsable2 -j ID [-j ID ...]`; without slurmdbd, answer it from
# slurmctld's job records (`scontrol show job --oneliner`), in sacct's format: JobID as 12 or 12_3 for array tasks.
SACCT_SHIM = r"""#!/usr/bin/env python3
# sacct stand-in for icar's throwaway test cluster (tests/slurm.py): no accounting database there.
import re, subprocess, sys

args, ids = sys.argv[1:], []
for i, a in enumerate(args):
    if a == "-j" and i + 1 < len(args):
        ids += args[i + 1].split(",")
    elif a.startswith("--jobs="):
        ids += a.split("=", 1)[1].split(",")
print("JobID|State|NodeList")
for jid in ids:
    out = subprocess.run(["scontrol", "show", "job", "--oneliner", jid], capture_output=True, text=True).stdout
    for line in out.splitlines():
        f = dict(re.findall(r"(\w+)=(\S*)", line))
        if "JobId" not in f:
            continue
        shown = f"{f['ArrayJobId']}_{f['ArrayTaskId']}" if f.get("ArrayTaskId") else f["JobId"]
        nodes = f.get("NodeList", "") if f.get("NodeList", "(null)") != "(null)" else "None assigned"
        print(f"{shown}|{f.get('JobState', 'UNKNOWN')}|{nodes}")
"""


class SlurmUnavailable(RuntimeError):
    """No SLURM or munge binaries on this machine."""


def find_binaries() -> dict[str, Path]:
    """Paths of munged, slurmctld, slurmd and the client commands. Raises SlurmUnavailable naming what is missing."""
    found: dict[str, Path] = {}
    for name in (*_DAEMONS, *_CLIENTS):
        path = shutil.which(name) or next(
            (os.path.join(d, name) for d in _DAEMON_DIRS if os.access(os.path.join(d, name), os.X_OK)), None
        )
        if path:
            found[name] = Path(path)
    missing = [n for n in (*_DAEMONS, *_CLIENTS) if n not in found]
    if missing:
        raise SlurmUnavailable(
            f"SLURM/munge binaries not found ({', '.join(missing)}); install them with"
            " `apt-get install --no-install-recommends slurm-wlm munge`"
        )
    if os.geteuid() != 0:
        raise SlurmUnavailable("the test SLURM cluster runs slurmd as root (it starts jobs as their user): run as root")
    try:
        pwd.getpwnam(MUNGE_USER)
    except KeyError:
        raise SlurmUnavailable(f"no `{MUNGE_USER}` user (the munge package creates it)") from None
    return found


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports from the ephemeral range (all held open until chosen, so they differ)."""
    socks = []
    try:
        while len(socks) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            if 15000 <= s.getsockname()[1] < 25000:  # Lightning's DDP port is 15000 + the job id's last 4 digits
                s.close()
                continue
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def machine_resources() -> tuple[int, int]:
    """(CPUs, MB of memory) to declare for the node: os.sched_getaffinity (what `nproc` reports) and MemTotal less
    a margin."""
    cpus = len(os.sched_getaffinity(0))
    with open("/proc/meminfo") as f:
        total_kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    return cpus, max(256, total_kb // 1024 - MEMORY_MARGIN_MB)


@dataclass
class SlurmCluster:
    bins: dict[str, Path]
    root: Path  # temp folder: slurm.conf, bin/, munge/, state/, spool/, logs
    node: str
    cpus: int
    memory_mb: int
    ctld_port: int
    slurmd_port: int
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    @property
    def env(self) -> dict[str, str]:
        """The environment for client commands and jobs: this process's, with SLURM_CONF and the sacct stand-in."""
        # not WANDB_SERVICE either: set once this process has used W&B, it would hand the jobs this process's
        # W&B service instead of their own (on a cluster, a service on another node)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "WANDB_SERVICE"}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = f"{self.root / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        return env

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """A client command (`sbatch ...`, `scontrol ...`) against this cluster."""
        proc = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        """slurmctld's record of a job (JobState, RunTime, Restarts, ExitCode, ...): `scontrol show job`."""
        out = self.run("scontrol", "show", "job", "--oneliner", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out.splitlines()[0])) if out.strip() else {}

    def jobs(self) -> list[dict[str, str]]:
        """Every job slurmctld still knows (running, pending, and those ended less than MinJobAge ago)."""
        out = self.run("scontrol", "show", "job", "--oneliner", check=False).stdout
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if "JobId=" in line]

    def wait_ended(self, job_id: str, timeout: float = 120) -> dict[str, str]:
        """The record of `job_id` once it has ended (submitit's result can arrive while the job is still exiting)."""
        ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                 "DEADLINE")
        return self.wait_for(lambda: (j := self.job(job_id)).get("JobState") in ended and j, timeout,
                             f"job {job_id} to end")

    def wait_for(self, predicate, timeout: float, what: str, poll: float = 0.5):
        """Poll `predicate()` until it returns something truthy (returned), or fail naming `what` and the logs."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f} s for {what}\n{self.logs()}")
            time.sleep(poll)

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munge/munged.log"):
            path = self.root / name
            if path.exists():
                parts.append(f"--- {path} ---\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    # -- set-up ------------------------------------------------------------------------------------------------
    def write_files(self) -> None:
        (self.root / "bin").mkdir()
        shim = self.root / "bin" / "sacct"
        shim.write_text(SACCT_SHIM)
        shim.chmod(0o755)
        for sub in ("state", "spool"):
            (self.root / sub).mkdir()
        munge = pwd.getpwnam(MUNGE_USER)
        mdir = self.root / "munge"
        mdir.mkdir()
        mdir.chmod(0o755)  # clients (root, job users) must reach the socket; the key itself stays 0400
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for p in (mdir, key):
            os.chown(p, munge.pw_uid, munge.pw_gid)
        r = self.root
        settings = {
            "ClusterName": "icartest",
            "SlurmctldHost": f"{self.node}(127.0.0.1)",
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={self.munge_socket}",
            "SlurmctldPort": str(self.ctld_port),
            "SlurmdPort": str(self.slurmd_port),
            "StateSaveLocation": str(r / "state"),
            "SlurmdSpoolDir": str(r / "spool"),
            "SlurmctldPidFile": str(r / "slurmctld.pid"),
            "SlurmdPidFile": str(r / "slurmd.pid"),
            "SlurmctldLogFile": str(r / "slurmctld.log"),
            "SlurmdLogFile": str(r / "slurmd.log"),
            "SlurmctldDebug": "info",
            "SlurmdDebug": "info",
            # no cgroups in a container: track processes by parent pid, bind nothing
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "JobAcctGatherType": "jobacct_gather/none",
            "AccountingStorageType": "accounting_storage/none",
            "JobCompType": "jobcomp/none",
            "MpiDefault": "none",
            "SwitchType": "switch/none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_Core",
            "SchedulerType": "sched/backfill",
            "SchedulerParameters": "sched_interval=2",
            "SlurmdParameters": "config_overrides",  # the node is what we declare (nproc), whatever the hardware says
            "ReturnToService": "2",
            "MinJobAge": "600",  # ended jobs stay visible to `scontrol show job` (and the sacct stand-in)
            "KillWait": "30",
            "InactiveLimit": "0",
            "SlurmctldTimeout": "30",
            "SlurmdTimeout": "30",
            "MessageTimeout": "20",
            "JobRequeue": "1",
            # a job in partition `urgent` preempts jobs of `debug` on the node by requeueing them
            "PreemptType": "preempt/partition_prio",
            "PreemptMode": "REQUEUE",
        }
        lines = [f"{k}={v}" for k, v in settings.items()]
        lines.append(f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb}"
                     " State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP PriorityTier=1")
        lines.append(f"PartitionName=urgent Nodes={self.node} MaxTime=INFINITE State=UP PriorityTier=2")
        self.conf.write_text("# icar's throwaway test cluster (tests/slurm.py)\n" + "\n".join(lines) + "\n")

    def _start(self, name: str, args: list[str], **kw) -> None:
        log = open(self.root / f"{name}.out", "w")
        self._procs[name] = subprocess.Popen([str(self.bins[name]), *args], stdout=log, stderr=subprocess.STDOUT,
                                             env=self.env, cwd=self.root, start_new_session=True, **kw)

    def start(self) -> None:
        munge = pwd.getpwnam(MUNGE_USER)
        mdir = self.root / "munge"
        self._start("munged", ["--foreground", "--force", f"--key-file={mdir / 'munge.key'}",
                               f"--socket={self.munge_socket}", f"--pid-file={mdir / 'munged.pid'}",
                               f"--log-file={mdir / 'munged.log'}", f"--seed-file={mdir / 'munged.seed'}"],
                    user=munge.pw_uid, group=munge.pw_gid, extra_groups=[])
        self.wait_for(lambda: self.munge_socket.exists() or self._died("munged"), 30, "munged's socket")
        self._start("slurmctld", ["-D", "-c", "-i", "-f", str(self.conf)])
        self._start("slurmd", ["-D", "-f", str(self.conf), "-N", self.node])
        self.wait_for(lambda: self._died("slurmctld") or self._died("slurmd") or self._node_state() == "idle", 60,
                      f"node {self.node} idle (sinfo)")
        for name in ("munged", "slurmctld", "slurmd"):
            if self._died(name):
                out = (self.root / f"{name}.out").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited (code {self._procs[name].returncode}):\n{out}\n{self.logs()}")

    def _died(self, name: str) -> bool:
        return self._procs[name].poll() is not None

    def _node_state(self) -> str:
        proc = self.run("sinfo", "-h", "-N", "-o", "%t", check=False, timeout=20)  # one line per partition
        states = {line.strip().rstrip("*~#!%$@^-") for line in proc.stdout.splitlines() if line.strip()}
        return states.pop() if len(states) == 1 else ",".join(sorted(states))

    def stop(self) -> None:
        """Cancel every job of this cluster, stop the daemons (SIGTERM, then SIGKILL) and delete the folder."""
        if self._procs.get("slurmctld") and not self._died("slurmctld"):
            with contextlib.suppress(Exception):
                self.run("scancel", "--full", "--user=root", check=False, timeout=20)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and any(j.get("JobState") in ("RUNNING", "COMPLETING")
                                                          for j in self.jobs()):
                    time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        shutil.rmtree(self.root, ignore_errors=True)


def _make_root() -> Path:
    """A fresh folder every parent of which the munge user can traverse (so not below pytest's 0700 basetemp)."""
    d = Path(tempfile.mkdtemp(prefix="icar-slurm-", dir="/tmp"))
    d.chmod(0o755)
    return d


@contextlib.contextmanager
def slurm_cluster(retries: int = 2) -> Iterator[SlurmCluster]:
    """Start the cluster (fresh ports each try), yield it, then stop it and delete its folder whatever happens.
    Raises SlurmUnavailable."""
    bins = find_binaries()
    cpus, memory_mb = machine_resources()
    node = socket.gethostname().split(".")[0]
    cluster: SlurmCluster | None = None
    for attempt in range(retries):
        ctld, slurmd = _free_ports(2)
        cluster = SlurmCluster(bins=bins, root=_make_root(), node=node, cpus=cpus, memory_mb=memory_mb,
                               ctld_port=ctld, slurmd_port=slurmd)
        atexit.register(cluster.stop)
        try:
            cluster.write_files()
            cluster.start()
            break
        except Exception:
            if attempt == retries - 1:
                logs = cluster.logs()
                cluster.stop()
                atexit.unregister(cluster.stop)
                raise RuntimeError(f"the test SLURM cluster did not start\n{logs}") from None
            cluster.stop()
            atexit.unregister(cluster.stop)
    assert cluster is not None
    try:
        yield cluster
    finally:
        cluster.stop()
        atexit.unregister(cluster.stop)


def require_slurm() -> bool:
    """Whether a missing SLURM must fail the tests rather than skip them (ICAR_REQUIRE_SLURM=1, set by CI)."""
    return os.environ.get(REQUIRE_ENV, "").strip().lower() in {"1", "true", "yes"}

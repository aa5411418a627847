"""A throwaway PostgreSQL server for the tests: initdb into a temp folder, pg_ctl start on a free port, stop and delete.

`postgres_server()` is a context manager yielding a `PostgresServer`; tests/conftest.py wraps it in the
session-scoped `postgres_url` fixture. The server trusts every local connection (no password), listens only on
127.0.0.1 and on a unix socket inside its temp folder, and runs with fsync off (it is thrown away).

PostgreSQL refuses to run as root: as root, initdb and pg_ctl run as the unprivileged `postgres` user (the one the
Debian package creates; created with `useradd --system` if missing), which owns the temp folder.

No server binaries (PATH, then /usr/lib/postgresql/*/bin): the tests that use the fixture are skipped, unless
ICAR_REQUIRE_POSTGRES=1 (set by .ci/run), where they fail instead.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
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

REQUIRE_ENV = "ICAR_REQUIRE_POSTGRES"
SERVER_USER = "postgres"  # who runs the server when we are root
DB_USER = "icar"  # the superuser initdb creates (trust auth, no password)
DB_NAME = "icar_test"
_BINARIES = ("initdb", "pg_ctl", "postgres")


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


def _is_bindir(d: str | Path) -> bool:
    return all(os.access(os.path.join(d, b), os.X_OK) and os.path.isfile(os.path.join(d, b)) for b in _BINARIES)


def _version_key(d: str) -> tuple[int, ...]:
    """/usr/lib/postgresql/15/bin -> (15,); 9.6 -> (9, 6); unparsable -> ()."""
    m = re.search(r"/postgresql/([0-9.]+)/bin/?$", d)
    return tuple(int(p) for p in m.group(1).split(".") if p) if m else ()


def find_bindir() -> Path:
    """The folder holding initdb, pg_ctl and postgres: PATH first (symlinks resolved), then the newest
    /usr/lib/postgresql/*/bin. Raises PostgresUnavailable."""
    initdb = shutil.which("initdb")
    if initdb:
        # Resolved, so a /usr/local/bin symlink leads to the folder that also holds postgres and pg_ctl.
        d = Path(os.path.realpath(initdb)).parent
        if _is_bindir(d):
            return d
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True):
        if _is_bindir(d):
            return Path(d)
    raise PostgresUnavailable(
        "PostgreSQL server binaries not found (initdb, pg_ctl and postgres on PATH or in /usr/lib/postgresql/*/bin);"
        " install them with e.g. `apt-get install postgresql`"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_user() -> pwd.struct_passwd | None:
    """As root: the unprivileged user to run the server as (created if missing). Otherwise None (run as ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVER_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVER_USER],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(SERVER_USER)


def _make_tempdir(user: pwd.struct_passwd | None) -> Path:
    """A fresh folder for the cluster. The unix socket path must stay short (~107 bytes) and, when the server
    runs as another user, every parent must be traversable by it: fall back to /tmp when the default is not."""
    base = tempfile.gettempdir()
    too_long = len(os.path.join(base, "icar-pg-XXXXXXXX", "sock", ".s.PGSQL.65535.lock")) > 100
    if too_long or (user is not None and not _traversable_by_others(base)):
        base = "/tmp"
    d = Path(tempfile.mkdtemp(prefix="icar-pg-", dir=base))
    if user is not None:
        os.chown(d, user.pw_uid, user.pw_gid)
    return d


def _traversable_by_others(path: str) -> bool:
    p = Path(path).resolve()
    for q in (p, *p.parents):
        if not os.stat(q).st_mode & 0o001:
            return False
    return True


@dataclass
class PostgresServer:
    bindir: Path
    root: Path  # temp folder: data/, sock/, server.log
    port: int
    user: pwd.struct_passwd | None  # who runs the server (None: ourselves)
    dbname: str = DB_NAME
    dbuser: str = DB_USER
    _running: bool = field(default=False, repr=False)

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def sockdir(self) -> Path:
        return self.root / "sock"

    @property
    def logfile(self) -> Path:
        return self.root / "server.log"

    @property
    def url(self) -> str:
        """SQLAlchemy URL over TCP, in the plain form users write (SQLAlchemy 2.1 reads it with psycopg 3)."""
        return f"postgresql://{self.dbuser}@127.0.0.1:{self.port}/{self.dbname}"

    @property
    def socket_url(self) -> str:
        """The same database through the unix socket."""
        return f"postgresql://{self.dbuser}@/{self.dbname}?host={self.sockdir}&port={self.port}"

    # -- running the binaries --------------------------------------------------------------------------------
    def _run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C", TZ="UTC")
        kw: dict = {}
        if self.user is not None:
            kw = dict(user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[])
            env.update(HOME=str(self.root), USER=self.user.pw_name, LOGNAME=self.user.pw_name)
        proc = subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            cwd=self.root,  # readable by the server user, unlike e.g. /root
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            **kw,
        )
        if check and proc.returncode != 0:
            log = self.logfile.read_text(errors="replace")[-4000:] if self.logfile.exists() else ""
            raise RuntimeError(
                f"{' '.join(args)} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n"
                f"--- {self.logfile} ---\n{log}"
            )
        return proc

    def init(self) -> None:
        self.sockdir.mkdir()
        if self.user is not None:
            os.chown(self.sockdir, self.user.pw_uid, self.user.pw_gid)
        initdb_args = ["-D", str(self.datadir), "-U", self.dbuser, "-A", "trust", "-E", "UTF8", "--no-locale"]
        self._run("initdb", *initdb_args, "--no-sync")
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": "'" + str(self.sockdir).replace("'", "''") + "'",
            # Throwaway data: durability off, small footprint, fast start and stop.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "32MB",
            "max_connections": "100",
            "max_wal_senders": "0",
            "wal_level": "minimal",
            "logging_collector": "off",
            "log_min_messages": "warning",
        }
        with open(self.datadir / "postgresql.conf", "a") as f:  # appended: later lines win
            f.write("\n# icar tests (tests/postgres.py)\n")
            f.writelines(f"{k} = {v}\n" for k, v in settings.items())

    def start(self) -> None:
        self._running = True  # before: a start that fails or times out may still leave a postmaster to stop
        self._run("pg_ctl", "-D", str(self.datadir), "-l", str(self.logfile), "-w", "-t", "60", "-s", "start")

    def create_database(self) -> None:
        import psycopg  # the URLs' driver; imported here so that conftest.py loads without it

        # autocommit: CREATE DATABASE cannot run in a transaction
        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.dbuser, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.dbname}"')

    def stop(self) -> None:
        """Stop the server (fast, then immediate, then SIGKILL) and delete the temp folder. Idempotent."""
        if self._running:
            self._running = False
            for mode, timeout in (("fast", "30"), ("immediate", "10")):
                with contextlib.suppress(Exception):
                    stop = ("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "-t", timeout, "-s", "stop")
                    if self._run(*stop, check=False).returncode == 0:
                        break
            self._kill_leftover()
        shutil.rmtree(self.root, ignore_errors=True)

    def _kill_leftover(self) -> None:
        pidfile = self.datadir / "postmaster.pid"
        with contextlib.suppress(Exception):
            pid = int(pidfile.read_text().split()[0])
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def postgres_server(retries: int = 3) -> Iterator[PostgresServer]:
    """Start a throwaway server (a free port is picked each try: another process may grab it first), yield it,
    then stop it and delete its folder, whatever happens in between. Raises PostgresUnavailable."""
    bindir = find_bindir()
    user = _server_user()
    server: PostgresServer | None = None
    for attempt in range(retries):
        server = PostgresServer(bindir=bindir, root=_make_tempdir(user), port=_free_port(), user=user)
        atexit.register(server.stop)  # even if the generator is never finalised (e.g. the session is killed by ^C)
        try:
            server.init()
            server.start()
            server.create_database()
            break
        except Exception:
            server.stop()
            atexit.unregister(server.stop)
            if attempt == retries - 1:
                raise
            time.sleep(0.2)
    assert server is not None
    try:
        yield server
    finally:
        server.stop()
        atexit.unregister(server.stop)


def require_postgres() -> bool:
    """Whether a missing PostgreSQL must fail the tests rather than skip them (ICAR_REQUIRE_POSTGRES=1, set by CI)."""
    return os.environ.get(REQUIRE_ENV, "").strip().lower() in {"1", "true", "yes"}

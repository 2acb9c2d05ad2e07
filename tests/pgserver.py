"""A private PostgreSQL server that a test owns: it can stop it, start it again, or freeze it.

The shared server (``MCPMETER_TEST_PG``, see ``stores.py``) must never be stopped by a test; this
one is the test's own: a fresh data directory, a free port on 127.0.0.1, and a ``postgres``
process that is a child of the test process (no ``pg_ctl`` daemon), so that a test can simulate
the database going away (:meth:`PrivatePostgres.stop`), coming back (:meth:`~PrivatePostgres.start`)
or hanging (:meth:`~PrivatePostgres.pause` / :meth:`~PrivatePostgres.resume`).

``initdb`` runs once per test session, into a template that every instance copies: an instance
is ready in ~0.3 s (copy ~0.15 s, start ~0.1 s) with its directory in /dev/shm, which is used when
it has room, else in the temp dir (``MCPMETER_PG_TMPDIR`` chooses). Running as root, ``initdb``
and ``postgres`` run as the ``postgres`` system user (``MCPMETER_PG_USER``), which owns the
directories. The binaries come from ``MCPMETER_PG_BINDIR``, else ``/usr/lib/postgresql/15/bin``,
else the newest ``/usr/lib/postgresql/*/bin``, else ``PATH``. When they are missing, the tests
that use this fail (they do not skip): CI installs what they need.

Use it with the ``private_postgres`` fixture (``pytest_plugins = ["pgserver"]`` in a test module,
like ``stores`` it is imported by its bare name) or as a context manager::

    with PrivatePostgres() as pg:
        psycopg.connect(pg.url)

A test module may both import names from here and list it in ``pytest_plugins``: pytest does not
rewrite this module's asserts (PYTEST_DONT_REWRITE), so it has no "already imported, cannot be
rewritten" warning to make (which ``filterwarnings = error`` would turn into a collection error).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import psycopg
import pytest

#: How often every bounded wait in this module looks again.
POLL_SECONDS = 0.05
#: How long a started server may take to accept connections.
READY_SECONDS = 30.0
#: How long a signalled server may take to exit.
STOP_SECONDS = 30.0
INITDB_SECONDS = 120.0
#: Extra attempts (each on another free port) when the port picked is taken before postgres binds it.
PORT_ATTEMPTS = 3

StopMode = Literal["fast", "immediate"]
_STOP_SIGNALS: dict[str, signal.Signals] = {"fast": signal.SIGINT, "immediate": signal.SIGQUIT}


class PostgresUnavailable(RuntimeError):
    """A private server could not be set up, started or stopped; the message says why."""


@functools.cache
def bindir() -> Path:
    """The directory holding ``initdb`` and ``postgres``."""
    override = os.environ.get("MCPMETER_PG_BINDIR")
    if override:
        candidates = [Path(override)]
    else:
        candidates = [Path("/usr/lib/postgresql/15/bin")]
        candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_major, reverse=True)
        on_path = shutil.which("postgres")
        if on_path:
            candidates.append(Path(on_path).resolve().parent)
    for directory in candidates:
        if all(os.access(directory / name, os.X_OK) for name in ("initdb", "postgres")):
            return directory
    looked = ", ".join(str(c) for c in dict.fromkeys(candidates)) or "nowhere"
    raise PostgresUnavailable(
        f"PostgreSQL server binaries (initdb, postgres) not found (looked in {looked}): "
        "install the PostgreSQL server (Debian: postgresql-15) or set MCPMETER_PG_BINDIR"
    )


def _major(path: Path) -> int:
    try:
        return int(path.parent.name)
    except ValueError:
        return -1


@functools.cache
def _owner() -> pwd.struct_passwd | None:
    """The user initdb and postgres run as: ``postgres`` when we are root, else None (ourselves)."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get("MCPMETER_PG_USER", "postgres")
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise PostgresUnavailable(
            f"running as root, and PostgreSQL refuses to run as root, but there is no {name!r} user "
            "to run initdb and postgres as (create it, or set MCPMETER_PG_USER)"
        ) from None


def _as_owner() -> dict[str, Any]:
    """Popen arguments that drop root's privileges to the owner (nothing when we are not root)."""
    owner = _owner()
    if owner is None:
        return {}
    return {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}


def _env() -> dict[str, str]:
    """The environment of initdb and postgres: ours, without libpq's or PGDATA's variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    owner = _owner()
    if owner is not None:
        env.update(HOME=owner.pw_dir, USER=owner.pw_name, LOGNAME=owner.pw_name)
    return env


#: /dev/shm is used only when it has at least this much room (Docker gives it 64 MB by default).
SHM_MIN_FREE = 2 << 30


@functools.cache
def _scratch_root() -> str:
    """Where private directories go: ``MCPMETER_PG_TMPDIR``, else /dev/shm when it is roomy, else
    the temp dir (``/tmp`` if the owner cannot reach that one).

    Memory first because copying a data directory (~1000 files, 40 MB) to disk took 0.7-2 s on
    a loaded VM and 0.1 s to /dev/shm."""
    override = os.environ.get("MCPMETER_PG_TMPDIR")
    if override:
        return override
    shm = Path("/dev/shm")
    with contextlib.suppress(OSError):
        free = os.statvfs(shm)
        if free.f_bavail * free.f_frsize >= SHM_MIN_FREE and os.access(shm, os.W_OK | os.X_OK):
            return str(shm)
    root = tempfile.gettempdir()
    if _owner() is None:
        return root
    path = Path(root).resolve()
    reachable = all(p.stat().st_mode & stat.S_IXOTH for p in (path, *path.parents))
    return str(path) if reachable else "/tmp"


def _private_dir(prefix: str) -> Path:
    """A new 0700 directory owned by the owner."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=_scratch_root()))
    _chown(path)
    return path


def _chown(path: Path) -> None:
    owner = _owner()
    if owner is not None:
        os.lchown(path, owner.pw_uid, owner.pw_gid)


def _chown_tree(top: Path) -> None:
    if _owner() is None:
        return
    _chown(top)
    for root, dirs, files in os.walk(top):
        for name in (*dirs, *files):
            _chown(Path(root, name))


_template_lock = threading.Lock()
_templates: dict[str, Path] = {}


def template_datadir() -> Path:
    """A data directory initdb made (once per process); copy it, never start it."""
    with _template_lock:
        cached = _templates.get("data")
        if cached is not None and (cached / "PG_VERSION").exists():
            return cached
        base = _private_dir("mcpmeter-pg-template-")
        atexit.register(shutil.rmtree, base, ignore_errors=True)
        data = base / "data"
        command = [
            str(bindir() / "initdb"),
            *("-D", str(data)),
            *("-A", "trust", "-U", "postgres"),
            *("-E", "UTF8", "--locale=C"),
            "--no-sync",
        ]
        try:
            done = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                cwd=base,
                env=_env(),
                timeout=INITDB_SECONDS,
                check=False,
                **_as_owner(),
            )
        except subprocess.TimeoutExpired:
            raise PostgresUnavailable(f"initdb did not finish within {INITDB_SECONDS:.0f} s") from None
        if done.returncode != 0:
            raise PostgresUnavailable(
                f"initdb failed (exit {done.returncode}): {' '.join(command)}\n{done.stdout}{done.stderr}"
            )
        _templates["data"] = data
        return data


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, …), found by their parent pids in /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            found = _proc_stat(int(entry.name))
            if found is not None:
                children.setdefault(found[1], []).append(int(entry.name))
    result: list[int] = []
    todo = [pid]
    while todo:
        below = children.get(todo.pop(), [])
        result += below
        todo += below
    return result


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


_live: set[PrivatePostgres] = set()


@atexit.register
def _close_live() -> None:
    """Servers a test left behind (interrupted before its teardown), in the process that made them."""
    for server in list(_live):
        if server.creator == os.getpid():
            server.close()


class PrivatePostgres:
    """One private server. ``with PrivatePostgres() as pg:`` starts it and always removes it after.

    ``settings`` are extra ``-c name=value`` server settings (e.g. ``{"max_connections": "20"}``).
    """

    def __init__(self, settings: Mapping[str, str] | None = None) -> None:
        self.settings = dict(settings or {})
        self.port: int | None = None
        self.base: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False
        #: The process that made this server: only it may remove it (a fork's atexit must not).
        self.creator = os.getpid()

    # ----- where it is

    @property
    def url(self) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/postgres`` (trust authentication, superuser)."""
        if self.port is None:
            raise RuntimeError("this PrivatePostgres has not been started")
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def datadir(self) -> Path:
        return self._base() / "data"

    @property
    def socket_dir(self) -> Path:
        return self._base() / "socket"

    @property
    def logfile(self) -> Path:
        """The server's stderr, across every start."""
        return self._base() / "postgres.log"

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def is_paused(self) -> bool:
        return self._paused

    def pids(self) -> list[int]:
        """The postmaster and every process below it (the backends, checkpointer, …)."""
        if self._proc is None or self._proc.poll() is not None:
            return []
        return [self._proc.pid, *descendants(self._proc.pid)]

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except (OSError, RuntimeError):
            return ""

    def _base(self) -> Path:
        if self.base is None:
            raise RuntimeError("this PrivatePostgres has no data directory (not started, or closed)")
        return self.base

    # ----- life cycle

    def start(self) -> None:
        """Start the server (the first time: on a copy of the template and a free port; after
        :meth:`stop`: on the same port and data) and return once it accepts connections."""
        if self.running:
            raise RuntimeError("this PrivatePostgres is already running")
        if self.base is None:
            self._prepare()
        if self.port is not None:
            try:
                self._launch_and_wait(self.port)
            except _PortTaken:
                raise PostgresUnavailable(
                    f"port {self.port} was taken while the server was stopped; log:\n{self._log_tail()}"
                ) from None
            return
        for attempt in range(PORT_ATTEMPTS):
            port = _free_port()
            try:
                self._launch_and_wait(port)
            except _PortTaken:
                if attempt == PORT_ATTEMPTS - 1:
                    raise PostgresUnavailable(
                        f"postgres could not bind a free port in {PORT_ATTEMPTS} attempts;"
                        f" log:\n{self._log_tail()}"
                    ) from None
                continue
            self.port = port
            return

    def stop(self, mode: StopMode = "fast") -> None:
        """Shut the server down, ``fast`` (SIGINT: clean) or ``immediate`` (SIGQUIT: no checkpoint,
        crash recovery at the next start), and wait until it has exited. A paused server is
        resumed first (stopped processes cannot shut down). Stopping a stopped server does nothing."""
        if mode not in _STOP_SIGNALS:
            raise ValueError(f"stop mode must be 'fast' or 'immediate', not {mode!r}")
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        self.resume()
        proc.send_signal(_STOP_SIGNALS[mode])
        try:
            proc.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self._kill()
            raise PostgresUnavailable(
                f"postgres did not exit within {STOP_SECONDS:.0f} s of a {mode} shutdown (killed it);"
                f" log:\n{self._log_tail()}"
            ) from None

    def pause(self) -> None:
        """SIGSTOP the postmaster and every process below it: connecting and queries hang (the
        kernel still accepts TCP connections) until :meth:`resume`. Returns once all are stopped."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise RuntimeError("cannot pause a PrivatePostgres that is not running")
        self._paused = True
        # The postmaster first, so that it forks no new backend; then what it had forked already
        # (twice: a fork under way when the postmaster stopped may have finished since).
        os.kill(proc.pid, signal.SIGSTOP)
        for _ in range(2):
            _signal(descendants(proc.pid), signal.SIGSTOP)
        deadline = time.monotonic() + STOP_SECONDS
        while True:
            states = [_proc_stat(pid) for pid in self.pids()]
            if all(s is None or s[0] in "TtZX" for s in states):
                return
            if time.monotonic() > deadline:
                raise PostgresUnavailable(f"postgres processes did not stop within {STOP_SECONDS:.0f} s")
            time.sleep(POLL_SECONDS)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """``with pg.paused():`` the server hangs for the body, and is resumed however it ends."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def resume(self) -> None:
        """SIGCONT everything :meth:`pause` stopped (harmless when not paused)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            _signal([*descendants(proc.pid), proc.pid], signal.SIGCONT)
        self._paused = False

    def close(self) -> None:
        """Kill the server, whatever state it is in, and remove its directory. Never raises for a
        server that will not die: it is killed."""
        try:
            proc = self._proc
            if proc is not None and proc.poll() is None:
                self.resume()
                with contextlib.suppress(PostgresUnavailable):  # stop() has killed it
                    self.stop("immediate")
        finally:
            _live.discard(self)
            if self.base is not None:
                shutil.rmtree(self.base, ignore_errors=True)
                self.base = None

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ----- internals

    def _prepare(self) -> None:
        template = template_datadir()
        self.base = _private_dir("mcpmeter-pg-")
        _live.add(self)
        shutil.copytree(template, self.datadir, symlinks=True)
        _chown_tree(self.datadir)
        self.socket_dir.mkdir(mode=0o700)
        _chown(self.socket_dir)

    def _command(self, port: int) -> list[str]:
        settings = {
            "listen_addresses": "127.0.0.1",
            "fsync": "off",
            "full_page_writes": "off",
            # Not "off": with fsync off a commit costs a write() to the page cache and nothing more
            # (measured: 66 µs on, 70 µs off), while "off" leaves the last ~200 ms of acknowledged
            # commits in shared memory, so that stop("immediate") loses them: a test of what
            # survives the database crashing would see rows vanish that a real server keeps.
            "synchronous_commit": "on",
            **self.settings,
        }
        command = [str(bindir() / "postgres"), "-D", str(self.datadir), "-k", str(self.socket_dir)]
        command += ["-p", str(port)]
        for name, value in settings.items():
            command += ["-c", f"{name}={value}"]
        return command

    def _launch_and_wait(self, port: int) -> None:
        with self.logfile.open("ab") as log:
            log_start = log.tell()
            self._proc = subprocess.Popen(
                self._command(port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._base(),
                env=_env(),
                start_new_session=True,  # the terminal's Ctrl-C is pytest's to handle, not postgres's
                **_as_owner(),
            )
        self._paused = False
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        deadline = time.monotonic() + READY_SECONDS
        last_error = "none yet"
        while True:
            proc = self._proc
            assert proc is not None
            code = proc.poll()
            if code is not None:
                since = self.logfile.read_bytes()[log_start:]
                if b"Address already in use" in since or b"could not bind" in since:
                    raise _PortTaken
                raise PostgresUnavailable(
                    f"postgres exited (code {code}) before accepting connections on port {port};"
                    f" log:\n{self._log_tail()}"
                )
            try:
                with psycopg.connect(url, connect_timeout=2, autocommit=True) as con:
                    row = con.execute("SHOW data_directory").fetchone()
                if row is not None and os.path.realpath(row[0]) == os.path.realpath(self.datadir):
                    return
                last_error = f"port {port} is answered by another server (data directory {row})"
            except psycopg.OperationalError as exc:
                last_error = str(exc).strip() or type(exc).__name__
            if time.monotonic() > deadline:
                self._kill()
                raise PostgresUnavailable(
                    f"postgres did not accept connections on port {port} within {READY_SECONDS:.0f} s"
                    f" (killed it); last error: {last_error}; log:\n{self._log_tail()}"
                )
            time.sleep(POLL_SECONDS)

    def _kill(self) -> None:
        """SIGKILL the postmaster and everything below it, and reap the postmaster."""
        proc = self._proc
        if proc is None:
            return
        _signal([proc.pid, *descendants(proc.pid)], signal.SIGKILL)
        _signal([proc.pid], signal.SIGCONT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_SECONDS)

    def _log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:]) or "(empty)"


class _PortTaken(Exception):
    """postgres could not bind the port: someone took it between picking and binding."""


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    """A started private server of this test's own; removed afterwards, whatever the test did to it."""
    server = PrivatePostgres()
    try:
        unavailable = None
        try:
            server.start()
        except PostgresUnavailable as exc:
            unavailable = str(exc)
        if unavailable is not None:
            pytest.fail(unavailable, pytrace=False)  # outside the except: no chained traceback
        yield server
    finally:
        server.close()

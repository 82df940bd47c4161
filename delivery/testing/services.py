"""Find or start PostgreSQL and RabbitMQ for the demo, the test suite and the chaos suite.

Order of preference: URLs from the environment, then containers when a Docker engine answers,
then throwaway local servers started from the installed binaries (own port, own directory, torn
down on exit). `LocalPostgres` and `LocalRabbitMQ` are also the handles the chaos suite uses to
stop, kill and restart a server.
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

__all__ = [
    "ENV_AMQP_URL",
    "ENV_DATABASE_URL",
    "LocalPostgres",
    "LocalRabbitMQ",
    "ProvisionError",
    "Services",
    "asyncpg_url",
    "create_database",
    "docker_engine_available",
    "drop_database",
    "find_postgres_bindir",
    "free_port",
    "provision_services",
]

Progress = Callable[[str], None]
StopMode = Literal["smart", "fast", "immediate"]

ENV_DATABASE_URL: Final = "DELIVERY_DATABASE_URL"
ENV_AMQP_URL: Final = "DELIVERY_AMQP_URL"

HOST: Final = "127.0.0.1"
POSTGRES_IMAGE: Final = "postgres:15"
RABBITMQ_IMAGE: Final = "rabbitmq:3.10-management"

PG_START_TIMEOUT_S: Final = 60.0
PG_STOP_TIMEOUT_S: Final = 60.0
RABBIT_START_TIMEOUT_S: Final = 60.0
RABBIT_STOP_TIMEOUT_S: Final = 60.0
RABBIT_POLL_S: Final = 0.2
CTL_TIMEOUT_S: Final = 30.0
PROCESS_EXIT_TIMEOUT_S: Final = 15.0
DOCKER_PING_TIMEOUT_S: Final = 2.0
DB_CONNECT_TIMEOUT_S: Final = 10.0

# A watermark this small trips the memory alarm at once; 0.4 is RabbitMQ's default.
MEMORY_ALARM_WATERMARK: Final = "0.0000001"
MEMORY_NORMAL_WATERMARK: Final = "0.4"

_PG_BIN_GLOB: Final = "/usr/lib/postgresql/*/bin"
_RABBIT_READY_LINE: Final = "Server startup complete"
# Where Debian's rabbitmq-server package puts its scripts when /usr/sbin is not on PATH.
_RABBIT_BIN_DIRS: Final = ("/usr/sbin", "/usr/lib/rabbitmq/bin")


class ProvisionError(RuntimeError):
    """A server could not be found or started: the message says which and where its log is."""


@dataclass(frozen=True)
class Services:
    """Where the platform's servers are; `source` is "env", "testcontainers" or "local"."""

    database_url: str
    amqp_url: str
    source: str


def _noop(_message: str) -> None:
    """Progress sink when the caller wants silence."""


# ---------------------------------------------------------------------------------------------
# Small helpers: ports, subprocesses, /proc
# ---------------------------------------------------------------------------------------------

_handed_out_ports: set[int] = set()
_ports_lock = threading.Lock()


def free_port(host: str = HOST) -> int:
    """A TCP port on `host` that nobody listens on now (never the same one twice per process)."""
    # The kernel may hand the same ephemeral port to two binds in a row once the first socket
    # is closed; remembering what we gave out keeps an AMQP and a dist port from colliding.
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        with _ports_lock:
            if port not in _handed_out_ports:
                _handed_out_ports.add(port)
                return port
    raise ProvisionError(f"no free TCP port found on {host}")


def _port_accepts(port: int, host: str = HOST, timeout_s: float = 0.5) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _is_root() -> bool:
    return os.geteuid() == 0


def _as_user(user: str, args: list[str]) -> list[str]:
    """The command line that runs `args` as `user` (unchanged unless we are root)."""
    if not _is_root():
        return args
    try:
        pwd.getpwnam(user)
    except KeyError:
        raise ProvisionError(f"user {user!r} does not exist; install the server package") from None
    if shutil.which("runuser"):
        return ["runuser", "-u", user, "--", *args]
    return ["su", user, "-s", "/bin/sh", "-c", shlex.join(args)]


def _run(
    args: list[str],
    *,
    what: str,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, capturing output; a missing binary or a hang is an error."""
    try:
        # A new session keeps Ctrl-C in the terminal from reaching the helpers (and the servers
        # they fork) before our own orderly teardown runs.
        return subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=None if env is None else dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            check=False,
        )
    except FileNotFoundError as exc:
        raise ProvisionError(f"{what}: {exc.filename or args[0]} not found") from None
    except subprocess.TimeoutExpired:
        raise ProvisionError(
            f"{what}: {shlex.join(args)} did not finish in {timeout_s:g} s"
        ) from None


def _one_line(text: str, limit: int = 400) -> str:
    """Collapse output into one line so error messages stay one line."""
    line = " | ".join(part.strip() for part in text.strip().splitlines() if part.strip())
    return line if len(line) <= limit else "..." + line[-limit:]


def _tail(path: Path, lines: int = 6) -> str:
    """The last lines of a log file as one line ("" when it cannot be read)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return _one_line("\n".join(text.splitlines()[-lines:]))


def _rabbit_error(path: Path, limit: int = 300) -> str:
    """The first [error] entry of a RabbitMQ log as one line, or its tail if there is none."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    # One entry spans many lines (an Erlang term), each with the same timestamp and pid prefix.
    entry = [line for line in lines if " [error] " in line]
    if not entry:
        return _tail(path)
    prefix = entry[0].split(" [error] ", 1)[0]
    parts = [line.split(" [error] ", 1)[1] for line in entry if line.startswith(prefix)]
    text = " ".join(" ".join(parts).split())
    if "eaddrinuse" in text:
        text = "address in use: " + text
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass(frozen=True)
class _Proc:
    pid: int
    ppid: int
    name: str
    cmdline: str
    environ: tuple[bytes, ...]


def _read_proc(pid: int) -> _Proc | None:
    """One process from /proc, or None when it is gone or a zombie."""
    base = Path("/proc") / str(pid)
    try:
        stat = (base / "stat").read_text()
        cmdline = (base / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    # comm may contain spaces and parentheses: the state and ppid follow the last ')'.
    name = stat[stat.find("(") + 1 : stat.rfind(")")]
    fields = stat[stat.rfind(")") + 2 :].split()
    if fields[0] == "Z":  # exited; init reaps it, nothing left to stop
        return None
    try:
        environ = tuple((base / "environ").read_bytes().split(b"\0"))
    except OSError:  # another user's process when we are not root
        environ = ()
    return _Proc(pid=pid, ppid=int(fields[1]), name=name, cmdline=cmdline, environ=environ)


def _processes() -> list[_Proc]:
    procs = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (proc := _read_proc(int(entry))) is not None:
            procs.append(proc)
    return procs


def _alive(pid: int) -> bool:
    return _read_proc(pid) is not None


def _descendants(roots: set[int], procs: list[_Proc]) -> set[int]:
    """`roots` and every process below them."""
    found = set(roots)
    grew = True
    while grew:
        grew = False
        for proc in procs:
            if proc.ppid in found and proc.pid not in found:
                found.add(proc.pid)
                grew = True
    return found


def _kill_and_wait(pids: set[int], timeout_s: float = PROCESS_EXIT_TIMEOUT_S) -> None:
    """SIGKILL the processes and wait until none is left."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _wait_gone(pids, timeout_s, what="killed processes")


def _wait_gone(pids: set[int], timeout_s: float, *, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while left := {pid for pid in pids if _alive(pid)}:
        if time.monotonic() > deadline:
            raise ProvisionError(f"{what} still running after {timeout_s:g} s: {sorted(left)}")
        time.sleep(0.05)


def _read_pid(path: Path) -> int | None:
    """The pid on the first line of a pid file, if there is one."""
    try:
        first = path.read_text().split("\n", 1)[0].strip()
    except OSError:
        return None
    return int(first) if first.isdigit() else None


def _clean_env(drop_prefixes: tuple[str, ...]) -> dict[str, str]:
    """Our environment minus variables that would silently override the server's settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith(drop_prefixes)}


# ---------------------------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------------------------


def _version_key(bindir: str) -> tuple[int, ...]:
    version = Path(bindir).parent.name
    return tuple(int(part) for part in re.findall(r"\d+", version)) or (0,)


def find_postgres_bindir() -> Path:
    """The directory of the newest installed PostgreSQL server binaries (pg_ctl, initdb)."""
    candidates = [d for d in glob.glob(_PG_BIN_GLOB) if Path(d, "pg_ctl").is_file()]
    if candidates:
        return Path(max(candidates, key=_version_key))
    if shutil.which("pg_config"):
        out = _run(["pg_config", "--bindir"], what="pg_config", timeout_s=10).stdout.strip()
        if out and Path(out, "pg_ctl").is_file():
            return Path(out)
    if pg_ctl := shutil.which("pg_ctl"):
        return Path(pg_ctl).resolve().parent
    raise ProvisionError(
        f"PostgreSQL server binaries not found (no pg_ctl in {_PG_BIN_GLOB}, "
        "pg_config --bindir or PATH); install postgresql-15"
    )


class _Server:
    """A throwaway server as a context manager: started on entry, stopped and removed on exit
    (also when the start itself fails half-way)."""

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

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


class LocalPostgres(_Server):
    """A throwaway PostgreSQL server on 127.0.0.1 with its own data directory.

    `fast=True` turns off fsync and full-page writes: committed data still survives a killed
    server (it is in the OS page cache), only a machine crash could lose it. Chaos runs that
    want the real thing pass `fast=False`.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        fast: bool = True,
        bindir: str | Path | None = None,
        base_dir: str | Path | None = None,
        settings: Mapping[str, str] | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.port = port if port is not None else free_port()
        self.fast = fast
        self.bindir = Path(bindir) if bindir is not None else find_postgres_bindir()
        self.settings = dict(settings or {})
        self.last_start_s: float | None = None
        self.last_stop_s: float | None = None
        self._base_dir = base_dir
        self._dir: Path | None = None
        self._progress = progress or _noop

    # -- where things are --------------------------------------------------------------------

    @property
    def url(self) -> str:
        """asyncpg URL of the `postgres` database as the `postgres` superuser (trust auth)."""
        return f"postgresql://postgres@{HOST}:{self.port}/postgres"

    @property
    def dir(self) -> Path:
        """The instance's temporary directory (created by the first `start`)."""
        if self._dir is None:
            raise ProvisionError("LocalPostgres has no directory yet: call start() first")
        return self._dir

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def log_path(self) -> Path:
        return self.dir / "postgres.log"

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the server (initialising the data directory the first time); wait until ready."""
        began = time.monotonic()
        if self._dir is None:
            self._init()
        self._progress(f"starting throwaway PostgreSQL on {HOST}:{self.port}")
        options = [
            f"-p {self.port}",
            f"-k {shlex.quote(str(self.dir))}",
            f"-c listen_addresses={HOST}",
            "-c max_connections=200",
        ]
        if self.fast:
            options += ["-c fsync=off", "-c synchronous_commit=on", "-c full_page_writes=off"]
        options += [f"-c {shlex.quote(f'{k}={v}')}" for k, v in self.settings.items()]
        result = self._pg(
            "pg_ctl",
            "-D", str(self.data_dir),
            "-l", str(self.log_path),
            "-w", "-t", str(int(PG_START_TIMEOUT_S)),
            "-o", " ".join(options),
            "start",
            timeout_s=PG_START_TIMEOUT_S + 10,
        )  # fmt: skip
        if result.returncode != 0:
            raise ProvisionError(
                f"PostgreSQL on {HOST}:{self.port} did not start (pg_ctl exit "
                f"{result.returncode}; log {self.log_path}): {_tail(self.log_path)}"
            )
        self.last_start_s = time.monotonic() - began
        self._progress(f"PostgreSQL ready on {HOST}:{self.port} in {self.last_start_s:.1f} s")

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server (`immediate` is a crash: the next start runs recovery)."""
        if not self.is_running():
            return
        began = time.monotonic()
        result = self._pg(
            "pg_ctl", "-D", str(self.data_dir), "-m", mode,
            "-w", "-t", str(int(PG_STOP_TIMEOUT_S)), "stop",
            timeout_s=PG_STOP_TIMEOUT_S + 10,
        )  # fmt: skip
        if result.returncode != 0 and self.is_running():
            raise ProvisionError(
                f"PostgreSQL on {HOST}:{self.port} did not stop ({mode}; log {self.log_path}): "
                f"{_one_line(result.stdout + result.stderr)}"
            )
        self.last_stop_s = time.monotonic() - began

    def kill(self) -> None:
        """SIGKILL the postmaster and all its children, as a crash of the whole server would."""
        pid = self.postmaster_pid()
        if pid is None:
            return
        # Children are collected before the kill: once the postmaster is gone they are
        # reparented and no longer findable by ppid. Orphaned backends would keep the old
        # shared memory attached and make the next start refuse to run.
        _kill_and_wait(_descendants({pid}, _processes()))
        # The dead postmaster can stay a zombie for a second or more (PID 1 here reaps
        # slowly), and a zombie's pid still passes PostgreSQL's "is the old postmaster alive"
        # test, so the next start would refuse. The process is gone: so are its locks.
        (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
        (self.dir / f".s.PGSQL.{self.port}.lock").unlink(missing_ok=True)

    def restart(self, mode: StopMode = "fast") -> None:
        """Stop and start again on the same port with the same data."""
        self.stop(mode)
        self.start()

    def postmaster_pid(self) -> int | None:
        """The running postmaster's pid, or None when the server is down."""
        if self._dir is None:
            return None
        pid = _read_pid(self.data_dir / "postmaster.pid")
        if pid is None or (proc := _read_proc(pid)) is None:
            return None
        # After a kill the pid file stays behind and its pid may belong to someone else now.
        return pid if proc.name in ("postgres", "postmaster") else None

    def is_running(self) -> bool:
        return self.postmaster_pid() is not None

    def cleanup(self) -> None:
        """Remove the temporary directory (killing the server first if it still runs)."""
        if self._dir is None:
            return
        if self.is_running():
            self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None

    def close(self) -> None:
        """Stop (fast, falling back to a kill) and remove everything; never raises."""
        try:
            self.stop("fast")
        except ProvisionError:
            with contextlib.suppress(ProvisionError):
                self.kill()
        with contextlib.suppress(ProvisionError):
            self.cleanup()

    # -- internals ---------------------------------------------------------------------------

    def _init(self) -> None:
        for tool in ("initdb", "pg_ctl"):
            self._binary(tool)  # fail before creating anything
        directory = Path(tempfile.mkdtemp(prefix="dlv-pg-", dir=self._base_dir))
        if _is_root():
            # PostgreSQL refuses to run as root, so the postgres user owns the directory.
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(directory, ignore_errors=True)
                raise ProvisionError(
                    "user 'postgres' does not exist; install postgresql-15"
                ) from None
            os.chown(directory, user.pw_uid, user.pw_gid)
        self._dir = directory
        args = ["initdb", "-D", str(self.data_dir), "-A", "trust", "-U", "postgres"]
        # C locale and UTF8: the same sort order and encoding on every machine.
        args += ["-E", "UTF8", "--locale=C"]
        if self.fast:
            args.append("--no-sync")
        result = self._pg(*args, timeout_s=120)
        if result.returncode != 0:
            raise ProvisionError(
                f"initdb failed in {self.data_dir} (exit {result.returncode}): "
                f"{_one_line(result.stdout + result.stderr)}"
            )

    def _binary(self, tool: str) -> Path:
        binary = self.bindir / tool
        if not binary.is_file():
            raise ProvisionError(f"PostgreSQL binary {binary} not found; install postgresql-15")
        return binary

    def _pg(self, tool: str, *args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
        binary = self._binary(tool)
        # cwd is our own directory: the postgres user may not be allowed into the caller's cwd.
        return _run(
            _as_user("postgres", [str(binary), *args]),
            what=tool,
            timeout_s=timeout_s,
            env=_clean_env(("PG",)),
            cwd=self._dir,
        )


# ---------------------------------------------------------------------------------------------
# RabbitMQ
# ---------------------------------------------------------------------------------------------


def _find_rabbit_script(name: str) -> str:
    if found := shutil.which(name):
        return found
    for directory in _RABBIT_BIN_DIRS:
        if (candidate := Path(directory, name)).is_file():
            return str(candidate)
    raise ProvisionError(
        f"{name} not found (PATH, {', '.join(_RABBIT_BIN_DIRS)}); install rabbitmq-server"
    )


def _rabbit_script(name: str) -> str:
    """The script to call: Debian's wrapper as root, the real script otherwise."""
    found = _find_rabbit_script(name)
    if _is_root() or _current_user() == "rabbitmq":
        # As root, Debian's wrapper re-runs the script as the rabbitmq user via `su`, which
        # keeps our RABBITMQ_* variables and sets HOME=/var/lib/rabbitmq: server and CLI then
        # share that home's Erlang cookie.
        return found
    # Any other user: the wrapper refuses, so call the real script (HOME is set by the caller).
    return str(Path(found).resolve().parent / name) if Path(found).is_symlink() else found


def _current_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return ""


class LocalRabbitMQ(_Server):
    """A throwaway RabbitMQ node on 127.0.0.1: own node name, ports, config and directory."""

    def __init__(
        self,
        *,
        port: int | None = None,
        dist_port: int | None = None,
        node_name: str | None = None,
        base_dir: str | Path | None = None,
        start_timeout_s: float = RABBIT_START_TIMEOUT_S,
        progress: Progress | None = None,
    ) -> None:
        self.port = port if port is not None else free_port()
        self.dist_port = dist_port if dist_port is not None else free_port()
        self.node = node_name or f"dlv{secrets.token_hex(4)}@localhost"
        self.start_timeout_s = start_timeout_s
        self.last_start_s: float | None = None
        self.last_stop_s: float | None = None
        self._base_dir = base_dir
        self._dir: Path | None = None
        self._progress = progress or _noop
        self._abort = threading.Event()

    # -- where things are --------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{HOST}:{self.port}/"

    @property
    def dir(self) -> Path:
        if self._dir is None:
            raise ProvisionError("LocalRabbitMQ has no directory yet: call start() first")
        return self._dir

    @property
    def log_path(self) -> Path:
        return self.dir / "log" / f"{self.node}.log"

    @property
    def pid_file(self) -> Path:
        return self.dir / "pid"

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the node detached and wait until AMQP accepts and the app has booted."""
        began = time.monotonic()
        self._abort.clear()
        if self._dir is None:
            self._init()
        self._progress(f"starting throwaway RabbitMQ {self.node} on {HOST}:{self.port}")
        startup_out = self.dir / "startup.out"
        with startup_out.open("ab") as out:
            # Output goes to a file, not a pipe: the detached VM inherits its stdout and
            # would keep a pipe open for its whole life.
            try:
                result = subprocess.run(
                    [_rabbit_script("rabbitmq-server"), "-detached"],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=self._server_env(),
                    cwd=self.dir,
                    timeout=CTL_TIMEOUT_S,
                    start_new_session=True,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise ProvisionError(f"rabbitmq-server -detached hung ({startup_out})") from None
        if result.returncode != 0:
            raise ProvisionError(
                f"rabbitmq-server for {self.node} exited {result.returncode} "
                f"({startup_out}): {_tail(startup_out)}"
            )
        self._wait_ready(began)
        self.last_start_s = time.monotonic() - began
        self._progress(f"RabbitMQ ready on {HOST}:{self.port} in {self.last_start_s:.1f} s")

    def stop(self) -> None:
        """Stop the node gracefully and wait until none of its processes is left."""
        pids = self.pids()
        if not pids:
            return
        began = time.monotonic()
        # `rabbitmqctl stop` + our own 50 ms polling instead of `shutdown`: the same graceful
        # stop, but `shutdown` waits for the VM with coarse polling (3.5 s instead of 1.8 s).
        result = self._ctl_raw("stop", timeout_s=RABBIT_STOP_TIMEOUT_S)
        if result.returncode != 0:
            # The CLI could not reach the node (half-started, hung); SIGTERM makes the VM
            # run the same graceful stop.
            for pid in pids:
                if (proc := _read_proc(pid)) is not None and proc.name.startswith("beam"):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
        with contextlib.suppress(ProvisionError):
            _wait_gone(pids, PROCESS_EXIT_TIMEOUT_S, what=f"RabbitMQ {self.node}")
        # Whatever is left (a hung VM, an inet_gethost that outlived it) is killed.
        if left := self.pids():
            _kill_and_wait(left)
        self.last_stop_s = time.monotonic() - began

    def kill(self) -> None:
        """kill -9 the node's VM and every helper process of it (a crash)."""
        pids = self.pids()
        if (pid := _read_pid(self.pid_file) if self._dir else None) is not None and _alive(pid):
            pids.add(pid)
        if pids:
            _kill_and_wait(pids)

    def restart(self) -> None:
        """Stop gracefully and start again with the same node name, port and data."""
        self.stop()
        self.start()

    def set_memory_alarm(self, on: bool) -> None:
        """Raise (publishers get blocked) or clear the node's memory alarm."""
        self.ctl(
            "set_vm_memory_high_watermark",
            MEMORY_ALARM_WATERMARK if on else MEMORY_NORMAL_WATERMARK,
        )

    def ctl(self, *args: str, timeout_s: float = CTL_TIMEOUT_S) -> str:
        """Run `rabbitmqctl -n NODE ARGS...`; its output, or ProvisionError on failure."""
        result = self._ctl_raw(*args, timeout_s=timeout_s)
        if result.returncode != 0:
            raise ProvisionError(
                f"rabbitmqctl -n {self.node} {shlex.join(args)} failed "
                f"(exit {result.returncode}): {_one_line(result.stdout + result.stderr)}"
            )
        return result.stdout

    def pids(self) -> set[int]:
        """Every live process of this node: the VM, erl_child_setup, inet_gethost, ..."""
        procs = _processes()
        marker = f"RABBITMQ_NODENAME={self.node}".encode()
        # The node name is not on the VM's command line (3.10 passes it in the environment),
        # so the environment is what identifies our processes; the command line catches
        # our own rabbitmqctl calls.
        ours = {
            p.pid
            for p in procs
            if (marker in p.environ or f" {self.node}" in p.cmdline) and p.pid != os.getpid()
        }
        ours = _descendants(ours, procs) - {os.getpid()}
        epmds = {p.pid for p in procs if p.pid in ours and p.name == "epmd"}
        if epmds:
            # epmd is shared by every Erlang node on the machine; ours started it only if none
            # ran. Leave it while any other VM (the shared rabbit@localhost, another test
            # node) exists, since that VM may be registered with it.
            others = [p for p in procs if p.name.startswith("beam") and p.pid not in ours]
            if others:
                ours -= epmds
        return ours

    def is_running(self) -> bool:
        return bool(self.pids())

    def cleanup(self) -> None:
        """Remove the temporary directory (killing the node first if it still runs)."""
        if self._dir is None:
            return
        if self.is_running():
            self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None

    def close(self) -> None:
        """Stop (falling back to a kill) and remove everything; never raises."""
        self._abort.set()
        try:
            self.stop()
        except ProvisionError:
            with contextlib.suppress(ProvisionError):
                self.kill()
        with contextlib.suppress(ProvisionError):
            self.cleanup()

    def abort_start(self) -> None:
        """Make a `start` running in another thread give up at its next poll."""
        self._abort.set()

    # -- internals ---------------------------------------------------------------------------

    def _init(self) -> None:
        directory = Path(tempfile.mkdtemp(prefix="dlv-rmq-", dir=self._base_dir))
        # The server runs as the rabbitmq user and creates mnesia/ and log/ in here.
        directory.chmod(0o777)
        self._dir = directory
        # Without its own listener the node tries 5672 (the shared node's) and dies.
        (directory / "rabbitmq.conf").write_text(f"listeners.tcp.local = {HOST}:{self.port}\n")
        plugins = directory / "enabled_plugins"
        plugins.write_text("[].\n")
        plugins.chmod(0o666)

    def _server_env(self) -> dict[str, str]:
        env = _clean_env(("RABBITMQ_",))
        env.update(
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_DIST_PORT=str(self.dist_port),
            # Given without the .conf suffix, as rabbitmq-server expects.
            RABBITMQ_CONFIG_FILE=str(self.dir / "rabbitmq"),
            RABBITMQ_MNESIA_BASE=str(self.dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.dir / "log"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.dir / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(self.pid_file),
        )
        if not _is_root():
            # Server and CLI find the Erlang cookie in $HOME; give both the same private one.
            env["HOME"] = str(self.dir)
        return env

    def _ctl_env(self) -> dict[str, str]:
        # No RABBITMQ_* here: the CLI would derive its own distribution port from
        # RABBITMQ_DIST_PORT (+10000, possibly past 65535) and its target from NODENAME.
        env = _clean_env(("RABBITMQ_",))
        if not _is_root():
            env["HOME"] = str(self.dir)
        return env

    def _ctl_raw(self, *args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
        return _run(
            [_rabbit_script("rabbitmqctl"), "-n", self.node, *args],
            what=f"rabbitmqctl {args[0] if args else ''}".strip(),
            timeout_s=timeout_s,
            env=self._ctl_env(),
            cwd=self._dir,
        )

    def _wait_ready(self, began: float) -> None:
        deadline = began + self.start_timeout_s
        seen_process = False
        missing_polls = 0
        port_open = False
        while True:
            if self._abort.is_set():
                raise ProvisionError(f"start of RabbitMQ {self.node} aborted")
            if self.pids():
                seen_process, missing_polls = True, 0
            else:
                missing_polls += 1
                # The VM vanished (a bad config, a port in use), or never appeared in 2 s.
                if seen_process or missing_polls >= 10:
                    raise ProvisionError(
                        f"RabbitMQ {self.node} exited during start (log {self.log_path}): "
                        f"{_rabbit_error(self.log_path) or _tail(self.dir / 'startup.out')}"
                    )
            port_open = port_open or _port_accepts(self.port)
            if port_open:
                remaining = max(1, int(deadline - time.monotonic()))
                result = self._ctl_raw(
                    "await_startup", "--timeout", str(remaining), timeout_s=remaining + 10
                )
                if result.returncode == 0:
                    return
            if time.monotonic() > deadline:
                raise ProvisionError(
                    f"RabbitMQ {self.node} not ready on {HOST}:{self.port} after "
                    f"{self.start_timeout_s:g} s (log {self.log_path}): "
                    f"{_rabbit_error(self.log_path)}"
                )
            time.sleep(RABBIT_POLL_S)


# ---------------------------------------------------------------------------------------------
# Databases for test isolation on one server
# ---------------------------------------------------------------------------------------------


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + quote(name, safe="")))


async def create_database(admin_url: str, name: str, template: str | None = None) -> str:
    """Create database `name` (optionally from `template`) and return its URL."""
    sql = f"CREATE DATABASE {_quote_ident(name)}"
    if template is not None:
        sql += f" TEMPLATE {_quote_ident(template)}"
    conn = await asyncpg.connect(admin_url, timeout=DB_CONNECT_TIMEOUT_S)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()
    return _with_database(admin_url, name)


async def drop_database(admin_url: str, name: str) -> None:
    """Drop database `name` if it exists, disconnecting whoever is still connected."""
    conn = await asyncpg.connect(admin_url, timeout=DB_CONNECT_TIMEOUT_S)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")
    finally:
        await conn.close()


# ---------------------------------------------------------------------------------------------
# Choosing and provisioning
# ---------------------------------------------------------------------------------------------


def docker_engine_available(timeout_s: float = DOCKER_PING_TIMEOUT_S) -> bool:
    """True when a Docker engine answers a ping (the docker client alone is not enough)."""
    try:
        docker: Any = importlib.import_module("docker")
        client = docker.from_env(timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # any failure (no package, no socket, no engine) means "no"
        return False


def asyncpg_url(url: str) -> str:
    """`postgresql+psycopg2://...` (SQLAlchemy style) -> `postgresql://...` for asyncpg."""
    return re.sub(r"^postgres(?:ql)?(?:\+\w+)?://", "postgresql://", url)


def _import_first(*modules: str) -> Any:
    """The first of `modules` that imports (testcontainers moved its modules in 4.x)."""
    error: ImportError | None = None
    for name in modules:
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            error = exc
    raise ProvisionError(f"cannot import {' or '.join(modules)}: {error}")


def _start_postgres_container(stack: contextlib.ExitStack, say: Progress) -> str:
    module = _import_first("testcontainers.community.postgres", "testcontainers.postgres")
    container = module.PostgresContainer(POSTGRES_IMAGE, driver=None)
    stack.callback(_quietly, container.stop)
    say(f"starting container {POSTGRES_IMAGE}")
    container.start()
    return asyncpg_url(str(container.get_connection_url()))


def _start_rabbitmq_container(stack: contextlib.ExitStack, say: Progress) -> str:
    say(f"starting container {RABBITMQ_IMAGE}")
    try:
        module = _import_first("testcontainers.community.rabbitmq", "testcontainers.rabbitmq")
        container = module.RabbitMqContainer(RABBITMQ_IMAGE)
    except ProvisionError:
        # RabbitMqContainer imports pika at module level for its readiness probe; without pika
        # a plain container waiting for the boot message does the same job.
        core = _import_first("testcontainers.core.container")
        container = core.DockerContainer(RABBITMQ_IMAGE).with_exposed_ports(5672)
        stack.callback(_quietly, container.stop)
        try:
            strategies = importlib.import_module("testcontainers.core.wait_strategies")
        except ImportError:  # older testcontainers: only the (now deprecated) wait_for_logs
            waits = _import_first("testcontainers.core.waiting_utils")
            container.start()
            waits.wait_for_logs(container, _RABBIT_READY_LINE, timeout=RABBIT_START_TIMEOUT_S)
        else:
            ready = strategies.LogMessageWaitStrategy(_RABBIT_READY_LINE)
            container.waiting_for(ready.with_startup_timeout(int(RABBIT_START_TIMEOUT_S)))
            container.start()
    else:
        stack.callback(_quietly, container.stop)
        container.start()
    host = str(container.get_container_host_ip())
    port = int(container.get_exposed_port(5672))
    return f"amqp://guest:guest@{host}:{port}/"


def _quietly(stop: Callable[[], object]) -> None:
    """Teardown must not hide the exception that caused it."""
    with contextlib.suppress(Exception):
        stop()


def _start_parallel(
    starts: list[Callable[[], str]], on_interrupt: list[Callable[[], None]]
) -> list[str]:
    """Run the start functions in threads; their results in order, or the first error."""
    if len(starts) == 1:
        return [starts[0]()]
    with ThreadPoolExecutor(max_workers=len(starts), thread_name_prefix="provision") as pool:
        futures: list[Future[str]] = [pool.submit(start) for start in starts]
        try:
            return [future.result() for future in futures]
        except BaseException:
            # Ctrl-C or one failed start: tell the others to give up rather than finish
            # booting a server that is about to be torn down.
            for abort in on_interrupt:
                abort()
            raise


def _start_local(
    stack: contextlib.ExitStack, need_db: bool, need_amqp: bool, say: Progress
) -> tuple[str | None, str | None]:
    starts: list[Callable[[], str]] = []
    aborts: list[Callable[[], None]] = []
    if need_db:
        pg = LocalPostgres(progress=say)
        stack.callback(pg.close)

        def start_pg() -> str:
            pg.start()
            return pg.url

        starts.append(start_pg)
    if need_amqp:
        rabbit = LocalRabbitMQ(progress=say)
        stack.callback(rabbit.close)
        aborts.append(rabbit.abort_start)

        def start_rabbit() -> str:
            rabbit.start()
            return rabbit.url

        starts.append(start_rabbit)
    urls = iter(_start_parallel(starts, aborts))
    return (next(urls) if need_db else None, next(urls) if need_amqp else None)


def _start_containers(
    stack: contextlib.ExitStack, need_db: bool, need_amqp: bool, say: Progress
) -> tuple[str | None, str | None]:
    starts: list[Callable[[], str]] = []
    if need_db:
        starts.append(lambda: _start_postgres_container(stack, say))
    if need_amqp:
        starts.append(lambda: _start_rabbitmq_container(stack, say))
    urls = iter(_start_parallel(starts, []))
    return (next(urls) if need_db else None, next(urls) if need_amqp else None)


@contextlib.contextmanager
def provision_services(
    *, use_env: bool = True, progress: Progress | None = None
) -> Iterator[Services]:
    """Yield URLs of a PostgreSQL and a RabbitMQ: from the environment, containers or local.

    What this started is torn down on exit, exceptions and Ctrl-C included. When only one of
    the two variables is set, it is used and only the other server is provisioned; `source`
    then names how that one was obtained.
    """
    say = progress or _noop
    env_db = (os.environ.get(ENV_DATABASE_URL) or None) if use_env else None
    env_amqp = (os.environ.get(ENV_AMQP_URL) or None) if use_env else None
    if env_db is not None and env_amqp is not None:
        say(f"using {ENV_DATABASE_URL} and {ENV_AMQP_URL} from the environment")
        yield Services(database_url=env_db, amqp_url=env_amqp, source="env")
        return
    for name, value in ((ENV_DATABASE_URL, env_db), (ENV_AMQP_URL, env_amqp)):
        if value is not None:
            say(f"using {name} from the environment")
    with contextlib.ExitStack() as stack:
        need_db, need_amqp = env_db is None, env_amqp is None
        if docker_engine_available():
            say("a Docker engine answers: using testcontainers")
            db, amqp = _start_containers(stack, need_db, need_amqp, say)
            source = "testcontainers"
        else:
            say("no Docker engine: starting throwaway servers from the installed binaries")
            db, amqp = _start_local(stack, need_db, need_amqp, say)
            source = "local"
        database_url = env_db or db
        amqp_url = env_amqp or amqp
        assert database_url is not None and amqp_url is not None  # one of each is always set
        yield Services(database_url=database_url, amqp_url=amqp_url, source=source)

"""What the throwaway servers are made of: free ports, subprocesses that cannot hang (and the
environment a child process gets), processes found and killed through /proc, the
server-as-context-manager base, and ``ProvisionError``."""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self

__all__ = ["ProvisionError", "free_port"]


Progress = Callable[[str], None]
HOST: Final = "127.0.0.1"
PROCESS_EXIT_TIMEOUT_S: Final = 15.0


class ProvisionError(RuntimeError):
    """A server could not be found or started: the message says which and where its log is."""


def _noop(_message: str) -> None:
    """Progress sink when the caller wants silence."""


_handed_out_ports: set[int] = set()
_ports_lock = threading.Lock()


def _ephemeral_port_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port(host: str = HOST) -> int:
    """A TCP port on `host` that nobody listens on now (never the same one twice per process).

    Drawn below the kernel's ephemeral range: a port from inside it can be taken as the source
    port of any outgoing connection (a POST, a database connect) between this check and the
    server's bind, which a loaded test run does hit ("address already in use")."""
    ephemeral_low, ephemeral_high = _ephemeral_port_range()
    if ephemeral_low > 11000:
        low, high = 10000, ephemeral_low - 1
    elif ephemeral_high < 64000:
        low, high = ephemeral_high + 1, 65535
    else:  # no room outside it: fall back to any unprivileged port
        low, high = 1024, 65535
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(low, high)
        with _ports_lock:
            if port in _handed_out_ports:
                continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
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

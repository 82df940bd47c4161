"""A throwaway PostgreSQL server: ``LocalPostgres``, started, stopped, killed and restarted by
the tests and the chaos suite."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Final, Literal

from delivery.testing.processes import (
    HOST,
    Progress,
    ProvisionError,
    _as_user,
    _clean_env,
    _descendants,
    _is_root,
    _kill_and_wait,
    _noop,
    _one_line,
    _processes,
    _read_pid,
    _read_proc,
    _run,
    _Server,
    _tail,
    free_port,
)

__all__ = ["LocalPostgres", "find_postgres_bindir"]


StopMode = Literal["smart", "fast", "immediate"]
PG_START_TIMEOUT_S: Final = 60.0
PG_STOP_TIMEOUT_S: Final = 60.0
_PG_BIN_GLOB: Final = "/usr/lib/postgresql/*/bin"


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

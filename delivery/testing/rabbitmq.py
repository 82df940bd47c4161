"""A throwaway RabbitMQ node (``LocalRabbitMQ``: own node name, ports, config and directory;
stopped, killed, restarted and put under a memory alarm by the tests and the chaos suite)."""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Final

from delivery.testing.processes import (
    HOST,
    PROCESS_EXIT_TIMEOUT_S,
    Progress,
    ProvisionError,
    _alive,
    _clean_env,
    _descendants,
    _is_root,
    _kill_and_wait,
    _noop,
    _one_line,
    _port_accepts,
    _processes,
    _read_pid,
    _read_proc,
    _run,
    _Server,
    _tail,
    _wait_gone,
    free_port,
)

__all__ = ["LocalRabbitMQ"]


RABBIT_START_TIMEOUT_S: Final = 60.0
RABBIT_STOP_TIMEOUT_S: Final = 60.0
RABBIT_POLL_S: Final = 0.2
CTL_TIMEOUT_S: Final = 30.0
# A watermark this small trips the memory alarm at once; 0.4 is RabbitMQ's default.
MEMORY_ALARM_WATERMARK: Final = "0.0000001"
MEMORY_NORMAL_WATERMARK: Final = "0.4"
# Where Debian's rabbitmq-server package puts its scripts when /usr/sbin is not on PATH.
_RABBIT_BIN_DIRS: Final = ("/usr/sbin", "/usr/lib/rabbitmq/bin")


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

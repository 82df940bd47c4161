"""A throwaway RabbitMQ node (``LocalRabbitMQ``: own node name, ports, config and directory;
stopped, killed, restarted and put under a memory alarm by the tests and the chaos suite). What
the node is made of: ``delivery.testing.rabbitmq_node``; whether it is up:
``delivery.testing.rabbitmq_probes``."""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from delivery.testing.processes import (
    HOST,
    PROCESS_EXIT_TIMEOUT_S,
    Progress,
    ProvisionError,
    _alive,
    _kill_and_wait,
    _noop,
    _one_line,
    _read_pid,
    _read_proc,
    _Server,
    _tail,
    _wait_gone,
    free_port,
)
from delivery.testing.rabbitmq_node import RabbitNode, rabbit_script
from delivery.testing.rabbitmq_probes import node_pids, wait_ready

__all__ = ["LocalRabbitMQ"]


RABBIT_START_TIMEOUT_S: Final = 60.0
RABBIT_STOP_TIMEOUT_S: Final = 60.0
CTL_TIMEOUT_S: Final = 30.0
# A watermark this small trips the memory alarm at once; 0.4 is RabbitMQ's default.
MEMORY_ALARM_WATERMARK: Final = "0.0000001"
MEMORY_NORMAL_WATERMARK: Final = "0.4"


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
        extra_conf: str = "",
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self._node = RabbitNode(
            node=node_name or f"dlv{secrets.token_hex(4)}@localhost",
            port=port if port is not None else free_port(),
            dist_port=dist_port if dist_port is not None else free_port(),
            base_dir=base_dir,
            extra_conf=extra_conf,
            extra_env=extra_env,
        )
        self.start_timeout_s = start_timeout_s
        self.last_start_s: float | None = None
        self.last_stop_s: float | None = None
        self._progress = progress or _noop
        self._abort = threading.Event()

    # -- where things are --------------------------------------------------------------------

    @property
    def node(self) -> str:
        return self._node.node

    @property
    def port(self) -> int:
        return self._node.port

    @property
    def dist_port(self) -> int:
        return self._node.dist_port

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{HOST}:{self.port}/"

    @property
    def dir(self) -> Path:
        return self._node.dir

    @property
    def log_path(self) -> Path:
        return self._node.log_path

    @property
    def pid_file(self) -> Path:
        return self._node.pid_file

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the node detached and wait until AMQP accepts and the app has booted."""
        began = time.monotonic()
        self._abort.clear()
        if not self._node.created:
            self._node.create()
        self._progress(f"starting throwaway RabbitMQ {self.node} on {HOST}:{self.port}")
        startup_out = self._node.startup_out
        with startup_out.open("ab") as out:
            # Output goes to a file, not a pipe: the detached VM inherits its stdout and
            # would keep a pipe open for its whole life.
            try:
                result = subprocess.run(
                    [rabbit_script("rabbitmq-server"), "-detached"],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=self._node.server_env(),
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
        wait_ready(self._node, began=began, timeout_s=self.start_timeout_s, abort=self._abort)
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
        result = self._node.run_ctl("stop", timeout_s=RABBIT_STOP_TIMEOUT_S)
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
        """kill -9 the node's VM and every helper process of it (a crash), listed again until
        none is left: a helper the VM started while the list was being read (its disk monitor's
        shell, an inet_gethost) would otherwise outlive it for a while."""
        deadline = time.monotonic() + PROCESS_EXIT_TIMEOUT_S
        while True:
            pids = self.pids()
            pid = _read_pid(self.pid_file) if self._node.created else None
            if pid is not None and _alive(pid):
                pids.add(pid)
            if not pids:
                return
            if time.monotonic() > deadline:
                raise ProvisionError(f"RabbitMQ {self.node} still running: {sorted(pids)}")
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
        result = self._node.run_ctl(*args, timeout_s=timeout_s)
        if result.returncode != 0:
            raise ProvisionError(
                f"rabbitmqctl -n {self.node} {shlex.join(args)} failed "
                f"(exit {result.returncode}): {_one_line(result.stdout + result.stderr)}"
            )
        return result.stdout

    def pids(self) -> set[int]:
        """Every live process of this node: the VM, erl_child_setup, inet_gethost, ..."""
        return node_pids(self.node)

    def is_running(self) -> bool:
        return bool(self.pids())

    def cleanup(self) -> None:
        """Remove the temporary directory (killing the node first if it still runs)."""
        if not self._node.created:
            return
        if self.is_running():
            self.kill()
        self._node.remove()

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

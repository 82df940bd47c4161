"""Is a throwaway RabbitMQ node there, and is it up: its processes (found through /proc), its
boot (the AMQP port accepts, then ``rabbitmqctl await_startup``), and why it is not (the first
error of its log)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Final

from delivery.testing.processes import (
    HOST,
    ProvisionError,
    _descendants,
    _port_accepts,
    _processes,
    _tail,
)
from delivery.testing.rabbitmq_node import RabbitNode

__all__ = ["node_pids", "rabbit_error", "wait_ready"]


RABBIT_POLL_S: Final = 0.2
# The VM must appear this soon after `rabbitmq-server -detached`: a count of polls was too short
# at load 50, where one poll of /proc takes a second and Debian's `su` wrapper many.
RABBIT_APPEAR_S: Final = 20.0


def node_pids(node: str) -> set[int]:
    """Every live process of the node named ``node``: the VM, erl_child_setup, inet_gethost..."""
    procs = _processes()
    marker = f"RABBITMQ_NODENAME={node}".encode()
    # The node name is not on the VM's command line (3.10 passes it in the environment),
    # so the environment is what identifies our processes; the command line catches
    # our own rabbitmqctl calls.
    ours = {
        p.pid
        for p in procs
        if (marker in p.environ or f" {node}" in p.cmdline) and p.pid != os.getpid()
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


def wait_ready(node: RabbitNode, *, began: float, timeout_s: float, abort: threading.Event) -> None:
    """Wait until the node started at ``began`` accepts AMQP and its app has booted; a
    ProvisionError when it exits, does not boot within ``timeout_s`` or ``abort`` is set."""
    deadline = began + timeout_s
    seen_process = False
    missing_polls = 0
    port_open = False
    while True:
        if abort.is_set():
            raise ProvisionError(f"start of RabbitMQ {node.node} aborted")
        if node_pids(node.node):
            seen_process, missing_polls = True, 0
        else:
            missing_polls += 1
            # The VM vanished (a bad config, a port in use), or never appeared.
            if seen_process or time.monotonic() - began > RABBIT_APPEAR_S:
                raise ProvisionError(
                    f"RabbitMQ {node.node} exited during start (log {node.log_path}): "
                    f"{rabbit_error(node.log_path) or _tail(node.startup_out)}"
                )
        port_open = port_open or _port_accepts(node.port)
        if port_open:
            remaining = max(1, int(deadline - time.monotonic()))
            result = node.run_ctl(
                "await_startup", "--timeout", str(remaining), timeout_s=remaining + 10
            )
            if result.returncode == 0:
                return
        if time.monotonic() > deadline:
            raise ProvisionError(
                f"RabbitMQ {node.node} not ready on {HOST}:{node.port} after "
                f"{timeout_s:g} s (log {node.log_path}): "
                f"{rabbit_error(node.log_path)}"
            )
        time.sleep(RABBIT_POLL_S)


def rabbit_error(path: Path, limit: int = 300) -> str:
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

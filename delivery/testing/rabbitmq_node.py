"""What one throwaway RabbitMQ node is made of (``RabbitNode``): its name and ports, its
directory and config files, the environments its server and CLI run in, the scripts to call and
how to reach the node with ``rabbitmqctl``. ``delivery.testing.rabbitmq`` runs it."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from delivery.testing.processes import HOST, ProvisionError, _clean_env, _is_root, _run

__all__ = ["RabbitNode", "rabbit_script"]


# Where Debian's rabbitmq-server package puts its scripts when /usr/sbin is not on PATH.
_RABBIT_BIN_DIRS: Final = ("/usr/sbin", "/usr/lib/rabbitmq/bin")


def _find_rabbit_script(name: str) -> str:
    if found := shutil.which(name):
        return found
    for directory in _RABBIT_BIN_DIRS:
        if (candidate := Path(directory, name)).is_file():
            return str(candidate)
    raise ProvisionError(
        f"{name} not found (PATH, {', '.join(_RABBIT_BIN_DIRS)}); install rabbitmq-server"
    )


def rabbit_script(name: str) -> str:
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


class RabbitNode:
    """The node name, AMQP and distribution ports, and files of one node; its directory exists
    from ``create()`` until ``remove()``."""

    def __init__(
        self,
        *,
        node: str,
        port: int,
        dist_port: int,
        base_dir: str | Path | None,
        extra_conf: str = "",
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.node = node
        self.port = port
        self.dist_port = dist_port
        self._base_dir = base_dir
        # More rabbitmq.conf lines (a cluster's partition handling), and variables for both the
        # server and the CLI (ERL_INETRC: how a cluster's nodes resolve each other's hosts).
        self.extra_conf = extra_conf
        self.extra_env = dict(extra_env or {})
        self._dir: Path | None = None

    @property
    def created(self) -> bool:
        return self._dir is not None

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

    @property
    def startup_out(self) -> Path:
        """Where ``rabbitmq-server -detached`` writes its output."""
        return self.dir / "startup.out"

    def create(self) -> None:
        directory = Path(tempfile.mkdtemp(prefix="dlv-rmq-", dir=self._base_dir))
        # The server runs as the rabbitmq user and creates mnesia/ and log/ in here.
        directory.chmod(0o777)
        self._dir = directory
        # Without its own listener the node tries 5672 (the shared node's) and dies.
        (directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = {HOST}:{self.port}\n{self.extra_conf}"
        )
        plugins = directory / "enabled_plugins"
        plugins.write_text("[].\n")
        plugins.chmod(0o666)

    def remove(self) -> None:
        """Remove the directory and everything in it (the node must not run)."""
        if self._dir is None:
            return
        shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None

    def server_env(self) -> dict[str, str]:
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
        env.update(self.extra_env)
        if not _is_root():
            # Server and CLI find the Erlang cookie in $HOME; give both the same private one.
            env["HOME"] = str(self.dir)
        return env

    def ctl_env(self) -> dict[str, str]:
        # No RABBITMQ_* here: the CLI would derive its own distribution port from
        # RABBITMQ_DIST_PORT (+10000, possibly past 65535) and its target from NODENAME.
        env = _clean_env(("RABBITMQ_",))
        env.update({k: v for k, v in self.extra_env.items() if not k.startswith("RABBITMQ_")})
        if not _is_root():
            env["HOME"] = str(self.dir)
        return env

    def run_ctl(self, *args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
        """Run `rabbitmqctl -n NODE ARGS...` to completion, whatever its exit status."""
        return _run(
            [rabbit_script("rabbitmqctl"), "-n", self.node, *args],
            what=f"rabbitmqctl {args[0] if args else ''}".strip(),
            timeout_s=timeout_s,
            env=self.ctl_env(),
            cwd=self._dir,
        )

"""A throwaway PostgreSQL primary and streaming-replication standby (``LocalPostgresPair``):
the standby is a ``pg_basebackup`` of the primary, ``promote()`` makes it the primary, and
``url(db)`` is the multi-host URL a platform process is given
(``target_session_attrs=read-write``)."""

from __future__ import annotations

import contextlib
import os
import pwd
import tempfile
from pathlib import Path
from typing import Final

from delivery.testing.postgres import PG_START_TIMEOUT_S, LocalPostgres
from delivery.testing.processes import (
    HOST,
    Progress,
    ProvisionError,
    _is_root,
    _one_line,
    _Server,
)

__all__ = ["LocalPostgresPair", "LocalStandby"]

STANDBY_NAME: Final = "standby1"


class LocalStandby(LocalPostgres):
    """A standby of ``primary``: its data directory is a base backup taken at first start."""

    def __init__(
        self,
        primary: LocalPostgres,
        *,
        fast: bool = True,
        base_dir: str | Path | None = None,
        settings: dict[str, str] | None = None,
        progress: Progress | None = None,
    ) -> None:
        super().__init__(fast=fast, base_dir=base_dir, settings=settings, progress=progress)
        self.primary = primary

    def _init(self) -> None:
        directory = Path(tempfile.mkdtemp(prefix="dlv-pg-standby-", dir=self._base_dir))
        if _is_root():
            user = pwd.getpwnam("postgres")
            os.chown(directory, user.pw_uid, user.pw_gid)
        self._dir = directory
        conninfo = (
            f"host={HOST} port={self.primary.port} user=postgres application_name={STANDBY_NAME}"
        )
        # -R: standby.signal and primary_conninfo (with our application_name, which the
        # primary's synchronous_standby_names names) written for us.
        result = self._pg(
            "pg_basebackup", "-d", conninfo, "-D", str(self.data_dir), "-R",
            "-X", "stream", "--no-sync",
            timeout_s=120,
        )  # fmt: skip
        if result.returncode != 0:
            raise ProvisionError(
                f"pg_basebackup from {HOST}:{self.primary.port} failed "
                f"(exit {result.returncode}): {_one_line(result.stdout + result.stderr)}"
            )

    def promote(self) -> None:
        """``pg_ctl promote`` and wait until it accepts writes."""
        result = self._pg(
            "pg_ctl", "-D", str(self.data_dir), "-w", "-t", str(int(PG_START_TIMEOUT_S)),
            "promote",
            timeout_s=PG_START_TIMEOUT_S + 10,
        )  # fmt: skip
        if result.returncode != 0:
            raise ProvisionError(
                f"pg_ctl promote on {HOST}:{self.port} failed: "
                f"{_one_line(result.stdout + result.stderr)}"
            )


class LocalPostgresPair(_Server):
    """A primary and its standby. ``synchronous=True`` makes every commit wait for the
    standby's flush (``synchronous_standby_names``): a commit acknowledged to the client is on
    both servers. ``fast=False`` keeps fsync on both (the chaos runs' real thing)."""

    def __init__(
        self,
        *,
        synchronous: bool = True,
        fast: bool = True,
        base_dir: str | Path | None = None,
        progress: Progress | None = None,
    ) -> None:
        settings = {"wal_level": "replica", "max_wal_senders": "5", "hot_standby": "on"}
        if synchronous:
            settings["synchronous_standby_names"] = STANDBY_NAME
        self.primary = LocalPostgres(
            fast=fast, base_dir=base_dir, settings=settings, progress=progress
        )
        self.standby = LocalStandby(
            self.primary,
            fast=fast,
            base_dir=base_dir,
            settings={"hot_standby": "on"},
            progress=progress,
        )

    def url(self, database: str = "postgres") -> str:
        """The multi-host URL: whichever of the two accepts writes."""
        return (
            f"postgresql://postgres@{HOST}:{self.primary.port},{HOST}:{self.standby.port}"
            f"/{database}?target_session_attrs=read-write"
        )

    def start(self) -> None:
        self.primary.start()
        self.standby.start()

    def close(self) -> None:
        for server in (self.standby, self.primary):
            with contextlib.suppress(Exception):
                server.close()

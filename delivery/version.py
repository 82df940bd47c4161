"""The installed version, read once from the package metadata: `delivery --version`, the
webhook User-Agent and the ``delivery_build_info`` metric all show this one string."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "delivery-webhooks"


def _installed_version() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "0+unknown"


VERSION = _installed_version()
USER_AGENT = f"{DISTRIBUTION}/{VERSION}"

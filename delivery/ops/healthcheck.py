"""``python -m delivery.ops.healthcheck``: the image's HEALTHCHECK (exit 0 healthy, 1 not).

It asks the admin server's /healthz on this host, at DELIVERY_ADMIN_HOST/DELIVERY_ADMIN_PORT
as the process reads them (set the port in the environment, not with --admin-port, or the two
disagree). With the admin port off (0) there is nothing to ask: it says so and exits 0, so the
container's liveness is its process alone (it stops when the process exits).
"""

from __future__ import annotations

import sys
import urllib.request

from delivery.errors import ConfigError
from delivery.settings import load_settings

_TIMEOUT_S = 2.0
# A server on every address answers on loopback; anything else is asked where it listens.
_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}  # noqa: S104


def probe_url(host: str, port: int) -> str:
    target = _LOOPBACK.get(host, f"[{host}]" if ":" in host else host)
    return f"http://{target}:{port}/healthz"


def main() -> int:
    try:
        settings = load_settings(require=())
    except ConfigError as exc:
        sys.stderr.write(f"healthcheck: {exc}\n")
        return 1
    if settings.admin_port == 0:
        sys.stdout.write("healthcheck: admin port off (DELIVERY_ADMIN_PORT=0); not probed\n")
        return 0
    url = probe_url(settings.admin_host, settings.admin_port)
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as answer:  # noqa: S310
            status = answer.status
    except OSError as exc:
        sys.stderr.write(f"healthcheck: {url}: {exc}\n")
        return 1
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())

"""Container health probe: exit 0 when Ember's /health answers 200, 1 otherwise.

Used by the image's HEALTHCHECK so the image needs no curl or wget. It reads the same EMBER_PORT
and EMBER_HOST settings as the server; a wildcard bind address is probed on loopback.
Standard library only.
"""
from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

WILDCARDS = {"", "0.0.0.0", "::", "[::]"}


def health_url(env: dict[str, str]) -> str:
    """The /health URL of the server configured by `env`."""
    host = env.get("EMBER_HOST", "").strip()
    if host in WILDCARDS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"  # a bare IPv6 address needs brackets in a URL
    port = env.get("EMBER_PORT", "8000").strip() or "8000"
    return f"http://{host}:{port}/health"


def main() -> int:
    """Probe once; print the reason on failure so `docker inspect` shows it."""
    url = health_url(dict(os.environ))
    timeout = float(os.environ.get("EMBER_HEALTHCHECK_TIMEOUT", "4"))
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 0 if response.status == 200 else 1
    except urllib.error.HTTPError as exc:  # 503 while starting or draining
        print(f"{url}: HTTP {exc.code}", file=sys.stderr)
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

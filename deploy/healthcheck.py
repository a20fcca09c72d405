"""The image's HEALTHCHECK: exit 0 when this container answers /healthz.

An api answers on FORGELINE_PORT; a worker on FORGELINE_METRICS_PORT, which
only workers read (set it for them). Liveness only (no dependency is
touched), so a database outage never gets a healthy container restarted.
Standard library only: the image has no curl.
"""

import os
import sys
import urllib.request

port = os.environ.get("FORGELINE_METRICS_PORT") or os.environ.get("FORGELINE_PORT", "8000")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError as exc:
    print(f"healthz: {exc}", file=sys.stderr)
    sys.exit(1)

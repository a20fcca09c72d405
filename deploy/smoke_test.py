#!/usr/bin/env python3
"""Smoke test of a deployed forgeline: probes, then one job end to end.

    FORGELINE_SMOKE_KEY=fl_... python3 deploy/smoke_test.py https://forgeline.example.com

Exit 0 when /healthz and /readyz answer 200 and an echo job submitted with
the key succeeds and its event stream ends with the final event, within
--timeout seconds; exit 1 with the reason otherwise. Standard library only,
so it runs on a CI runner, in the image, or on an operator's laptop. The
Cloud Run deploy script and the deploy workflow gate traffic on it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from typing import Any


class SmokeFailure(Exception):
    """The deployment is not fit for traffic; the message says why."""


def _request(
    method: str, url: str, key: str | None, body: dict[str, Any] | None = None, timeout: float = 10
) -> tuple[int, bytes]:
    headers = {"Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError as exc:
        raise SmokeFailure(f"{method} {url}: {exc}") from None


def check(base_url: str, key: str | None, timeout_s: float) -> str:
    """Run every check; returns the job id, raises SmokeFailure on the first failure."""
    base = base_url.rstrip("/")
    for probe in ("/healthz", "/readyz"):
        status, body = _request("GET", base + probe, None)
        if status != 200:
            raise SmokeFailure(f"{probe} answered {status}: {body[:300]!r}")
    marker = f"smoke-{uuid.uuid4().hex[:12]}"
    status, body = _request(
        "POST", f"{base}/api/v1/jobs", key, {"pipeline": "echo", "input": {"text": marker}}
    )
    if status not in (200, 201):
        raise SmokeFailure(f"submitting a job answered {status}: {body[:300]!r}")
    job_id = json.loads(body)["id"]
    deadline = time.monotonic() + timeout_s
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status, body = _request("GET", f"{base}/api/v1/jobs/{job_id}", key)
        if status != 200:
            raise SmokeFailure(f"reading job {job_id} answered {status}")
        job = json.loads(body)
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.5)
    if job.get("status") != "succeeded":
        raise SmokeFailure(f"job {job_id} is {job.get('status')} after {timeout_s:g} s")
    if json.dumps(job.get("result")).find(marker) < 0:
        raise SmokeFailure(f"job {job_id} succeeded with the wrong result: {job.get('result')}")
    # The stream of a finished job replays to its final event.
    status, body = _request("GET", f"{base}/api/v1/jobs/{job_id}/events", key, timeout=30)
    if status != 200 or b"event: final" not in body:
        raise SmokeFailure(f"the event stream of {job_id} did not end with a final event")
    return str(job_id)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base_url")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds for the job")
    args = parser.parse_args()
    try:
        job_id = check(args.base_url, os.environ.get("FORGELINE_SMOKE_KEY"), args.timeout)
    except SmokeFailure as exc:
        print(f"smoke test FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"smoke test passed: {args.base_url} (job {job_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

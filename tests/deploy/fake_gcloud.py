"""A stand-in for the few `gcloud run` commands deploy/cloudrun/deploy.sh uses.

It keeps a Cloud Run service's revisions and traffic in a JSON file, the way
Cloud Run reports them (`status.traffic`, `status.url`), so the deploy
script's blue/green logic can run here without a Google project. Each
revision "serves" at a URL the test chose (a real forgeline, or nothing).

    python3 fake_gcloud.py STATE_FILE run services describe|replace|update-traffic ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml


def _options(args: list[str]) -> tuple[list[str], dict[str, str]]:
    positional, options = [], {}
    i = 0
    while i < len(args):
        if args[i].startswith("--"):
            name, _, value = args[i][2:].partition("=")
            if not value and i + 1 < len(args) and not args[i + 1].startswith("--"):
                value = args[i + 1]
                i += 1
            options[name] = value or "true"
        else:
            positional.append(args[i])
        i += 1
    return positional, options


def _status(state: dict[str, Any]) -> dict[str, Any]:
    traffic = []
    for entry in state["traffic"]:
        item = {"revisionName": entry["revisionName"], "percent": entry["percent"]}
        if entry.get("tag"):
            item["tag"] = entry["tag"]
            item["url"] = state["urls"][entry["revisionName"]]
        traffic.append(item)
    serving = next(t["revisionName"] for t in state["traffic"] if t["percent"] == 100)
    return {"status": {"url": state["urls"][serving], "traffic": traffic}}


def main(argv: list[str]) -> int:
    state_file = Path(argv[0])
    state: dict[str, Any] = json.loads(state_file.read_text())
    state["calls"].append(argv[1:])
    positional, options = _options(argv[1:])
    code = 0
    match positional:
        case ["run", "services", "describe", _]:
            if not state["traffic"]:
                print("ERROR: service not found", file=sys.stderr)
                code = 1
            else:
                print(json.dumps(_status(state)))
        case ["run", "services", "replace", path]:
            service = yaml.safe_load(Path(path).read_text())
            revision = service["spec"]["template"]["metadata"]["name"]
            state["rendered"] = service
            if revision in state["never_ready"]:
                print(f"ERROR: revision {revision} is not ready", file=sys.stderr)
                code = 1
            else:
                state["revisions"].append(revision)
                traffic = []
                for entry in service["spec"]["traffic"]:
                    name = revision if entry.get("latestRevision") else entry["revisionName"]
                    traffic.append(
                        {"revisionName": name, "percent": entry["percent"], "tag": entry.get("tag")}
                    )
                state["traffic"] = traffic
        case ["run", "services", "update-traffic", _]:
            if "to-revisions" in options:
                name, _, percent = options["to-revisions"].partition("=")
                tags = [t for t in state["traffic"] if t.get("tag") and t["revisionName"] != name]
                state["traffic"] = [{"revisionName": name, "percent": int(percent)}]
                state["traffic"] += [{**t, "percent": 0} for t in tags]
            if "remove-tags" in options:
                for entry in state["traffic"]:
                    if entry.get("tag") == options["remove-tags"]:
                        entry["tag"] = None
                state["traffic"] = [t for t in state["traffic"] if t["percent"] or t.get("tag")]
        case _:
            print(f"fake gcloud: unsupported {positional}", file=sys.stderr)
            code = 2
    state_file.write_text(json.dumps(state, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

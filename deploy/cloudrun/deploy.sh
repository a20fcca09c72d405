#!/usr/bin/env bash
# Blue/green deploy of forgeline to Cloud Run, by revision tags.
#
#   deploy/cloudrun/deploy.sh api    REGION-docker.pkg.dev/PROJECT/forgeline/forgeline:SHA
#   deploy/cloudrun/deploy.sh worker REGION-docker.pkg.dev/PROJECT/forgeline/forgeline:SHA
#
# api: the new revision ("green") is created with no traffic and the tag
# `candidate`; deploy/smoke_test.py runs against the tagged URL; only then
# does traffic move to it, and the public URL is smoke-tested again. Any
# failure puts all traffic back on the revision that served before ("blue")
# and exits 1. worker: its service is internal and serves no users, so the
# new revision takes over as soon as Cloud Run reports it ready; a revision
# that never gets ready leaves the old one in place.
#
# Needs: gcloud (authenticated), python3. Variables: PROJECT_ID, REGION,
# CLOUDSQL_INSTANCE, BUCKET, VPC_NETWORK, VPC_SUBNET, and FORGELINE_SMOKE_KEY
# (an API key the smoke test submits its job with).
set -euo pipefail

usage() { echo "usage: $0 api|worker IMAGE" >&2; exit 2; }
[ $# -eq 2 ] || usage
kind=$1
image=$2
case "$kind" in api|worker) ;; *) usage ;; esac
: "${PROJECT_ID:?}" "${REGION:?}" "${CLOUDSQL_INSTANCE:?}" "${BUCKET:?}"
: "${VPC_NETWORK:?}" "${VPC_SUBNET:?}"

here=$(cd "$(dirname "$0")" && pwd)
gcloud_bin=${GCLOUD:-gcloud}
smoke_timeout=${SMOKE_TIMEOUT_S:-120}
export SERVICE=${SERVICE:-forgeline-$kind}
# Revision names must be unique: service name plus the image's tag or digest.
suffix=$(printf '%s' "${image##*[:@]}" | tr -c 'a-z0-9' '-' | cut -c1-12)
export REVISION="$SERVICE-$suffix"
export IMAGE=$image

run() { "$gcloud_bin" run "$@" --region "$REGION" --project "$PROJECT_ID" --quiet; }
say() { echo "deploy: $*" >&2; }

# Read a field of the service's JSON description (empty when it does not exist).
describe() {
    local json
    json=$(run services describe "$SERVICE" --format=json 2>/dev/null) || return 0
    python3 -c "$1" <<< "$json"
}
blue=$(describe 'import json, sys
d = json.load(sys.stdin)
print(next((t["revisionName"] for t in d.get("status", {}).get("traffic", [])
            if t.get("percent") == 100 and t.get("revisionName")), ""))')

# The service file with this deploy's values; for the api, all traffic stays
# on blue and green gets the candidate tag.
rendered=$(mktemp --suffix=.yaml)
trap 'rm -f "$rendered"' EXIT
BLUE=$blue KIND=$kind python3 - "$here/$kind.yaml" > "$rendered" <<'PY'
import os, re, sys
text = open(sys.argv[1]).read()
text = re.sub(r"\$\{([A-Z_]+)\}", lambda m: os.environ[m.group(1)], text)
blue, revision = os.environ["BLUE"], os.environ["REVISION"]
if os.environ["KIND"] == "api" and blue:
    traffic = (f"  traffic:\n    - revisionName: {blue}\n      percent: 100\n"
               f"    - revisionName: {revision}\n      percent: 0\n      tag: candidate\n")
else:
    traffic = "  traffic:\n    - latestRevision: true\n      percent: 100\n"
sys.stdout.write(text.rstrip("\n") + "\n" + traffic)
PY

rollback() {
    if [ -n "$blue" ]; then
        say "rolling back: all traffic to $blue"
        run services update-traffic "$SERVICE" --to-revisions "$blue=100" || true
        run services update-traffic "$SERVICE" --remove-tags candidate || true
    else
        say "first deploy failed; no earlier revision to roll back to"
    fi
}

smoke() {
    say "smoke test of $1"
    python3 "$here/../smoke_test.py" --timeout "$smoke_timeout" "$1"
}

say "deploying $REVISION (serving now: ${blue:-nothing})"
if ! run services replace "$rendered"; then
    say "revision $REVISION did not become ready"
    rollback
    exit 1
fi

if [ "$kind" = worker ]; then
    say "worker revision $REVISION serves"
    exit 0
fi

if [ -n "$blue" ]; then
    candidate_url=$(describe 'import json, sys
d = json.load(sys.stdin)
print(next((t["url"] for t in d.get("status", {}).get("traffic", [])
            if t.get("tag") == "candidate"), ""))')
    if [ -z "$candidate_url" ] || ! smoke "$candidate_url"; then
        rollback
        exit 1
    fi
    say "shifting all traffic to $REVISION"
    if ! run services update-traffic "$SERVICE" --to-revisions "$REVISION=100"; then
        rollback
        exit 1
    fi
fi

service_url=$(describe 'import json, sys; print(json.load(sys.stdin)["status"]["url"])')
if ! smoke "$service_url"; then
    rollback
    exit 1
fi
say "$REVISION serves all traffic"

#!/usr/bin/env bash
# Back up forgeline's PostgreSQL database (jobs, event logs, API keys, usage
# and the Procrastinate queue) to one custom-format dump file.
#
#   deploy/backup/backup-postgres.sh "$DATABASE_URL" backups/forgeline-$(date -u +%Y%m%dT%H%M%SZ).dump
#
# Consistent while forgeline runs (pg_dump reads one snapshot). Needs pg_dump
# of the server's major version or newer. docs/RUNBOOK.md#back-up-postgresql.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 DATABASE_URL DUMP_FILE" >&2; exit 2; }
url=$1
out=$2
mkdir -p "$(dirname "$out")"
# Written beside the target, renamed when complete: a failed run never
# leaves a truncated file under the final name.
partial="$out.partial"
trap 'rm -f "$partial"' EXIT
pg_dump --dbname="$url" --format=custom --compress=6 --no-owner --no-privileges \
    --file="$partial"
# A dump that pg_restore cannot list is not a backup.
pg_restore --list "$partial" > /dev/null
mv "$partial" "$out"
echo "backed up to $out ($(du -h "$out" | cut -f1))"

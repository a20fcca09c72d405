#!/usr/bin/env bash
# Restore a dump made by backup-postgres.sh into an EMPTY database.
#
#   createdb -h HOST -U USER forgeline_restored
#   deploy/backup/restore-postgres.sh backups/forgeline-....dump "$RESTORE_URL"
#
# Refuses a database that already has forgeline's tables, so a typo cannot
# overwrite production. Then point FORGELINE_DATABASE_URL at it and run
# `forgeline migrate` (a no-op unless the dump is older than the code).
# docs/RUNBOOK.md#restore-postgresql.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 DUMP_FILE DATABASE_URL" >&2; exit 2; }
dump=$1
url=$2
existing=$(psql "$url" --no-psqlrc --tuples-only --no-align \
    --command "SELECT count(*) FROM information_schema.tables WHERE table_name = 'jobs'")
if [ "$existing" != "0" ]; then
    echo "error: $url already has a jobs table; restore into an empty database" >&2
    exit 1
fi
pg_restore --dbname="$url" --no-owner --no-privileges --exit-on-error --single-transaction "$dump"
jobs=$(psql "$url" --no-psqlrc --tuples-only --no-align --command "SELECT count(*) FROM jobs")
echo "restored $dump: $jobs jobs"

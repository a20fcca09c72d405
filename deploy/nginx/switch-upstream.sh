#!/usr/bin/env bash
# Blue/green switch of the api behind nginx, on one server.
#
#   deploy/nginx/switch-upstream.sh 127.0.0.1:8101
#
# GREEN is a new api (e.g. `docker run -d -p 127.0.0.1:8101:8000 ... forgeline:NEW api`)
# running beside the current one (blue). Steps, each one gating the next:
#   1. smoke-test green directly (deploy/smoke_test.py: probes and a job);
#   2. point nginx's upstream at green, `nginx -t`, graceful reload;
#   3. smoke-test the public URL through nginx.
# If 1 fails, nothing changed; if 2 or 3 fails, the previous upstream file is
# put back and nginx reloaded. Either way the script exits 1 and blue keeps
# serving. On success, stop blue with SIGTERM: its open streams end with a
# "reconnect" event and clients resume on green from their Last-Event-ID.
#
# Variables: FORGELINE_SMOKE_KEY (API key for the smoke job), PUBLIC_URL
# (default https://localhost), NGINX_UPSTREAM_FILE (default
# deploy/nginx/upstream.conf), NGINX_TEST and NGINX_RELOAD (commands;
# default: through `docker compose -f compose.prod.yaml exec -T nginx`).
set -euo pipefail

[ $# -eq 1 ] || { echo "usage: $0 GREEN_HOST:PORT" >&2; exit 2; }
green=$1
here=$(cd "$(dirname "$0")" && pwd)
upstream_file=${NGINX_UPSTREAM_FILE:-$here/upstream.conf}
public_url=${PUBLIC_URL:-https://localhost}
compose_nginx="docker compose -f $here/../../compose.prod.yaml exec -T nginx"
nginx_test=${NGINX_TEST:-$compose_nginx nginx -t}
nginx_reload=${NGINX_RELOAD:-$compose_nginx nginx -s reload}
smoke_timeout=${SMOKE_TIMEOUT_S:-60}

say() { echo "switch: $*" >&2; }
smoke() { python3 "$here/../smoke_test.py" --timeout "$smoke_timeout" "$1"; }

say "smoke test of green at http://$green"
if ! smoke "http://$green"; then
    say "green failed its smoke test; traffic stays where it was"
    exit 1
fi

previous=$(cat "$upstream_file")
restore() {
    say "rolling back to the previous upstream"
    # Written in place, not replaced: a bind-mounted file keeps its inode.
    printf '%s\n' "$previous" > "$upstream_file"
    sh -c "$nginx_reload" || say "reload failed; check nginx now"
}

printf '%s\n' "# Switched by switch-upstream.sh at $(date -u +%FT%TZ)" \
    "server $green max_fails=3 fail_timeout=10s;" > "$upstream_file"
if ! sh -c "$nginx_test" || ! sh -c "$nginx_reload"; then
    restore
    exit 1
fi
say "nginx now sends new requests to $green"

if ! smoke "$public_url"; then
    restore
    exit 1
fi
say "green serves $public_url; stop blue with SIGTERM"

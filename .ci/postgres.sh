#!/usr/bin/env bash
# A throwaway PostgreSQL server on loopback, for the study's storage tests (.ci/run and the tests' fixture).
#   .ci/postgres.sh start DIR PORT   # initdb DIR/data, start it on 127.0.0.1:PORT, print its URL
#   .ci/postgres.sh stop DIR
# The server refuses to run as root: as root, it runs as the postgres user.
set -euo pipefail
cmd=$1 dir=$2
initdb=$(command -v initdb || ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | tail -n 1 || true)
if [ -z "$initdb" ]; then
  echo "postgres.sh: no initdb on PATH or in /usr/lib/postgresql/*/bin (install PostgreSQL)" >&2
  exit 1
fi
bin=$(dirname "$(readlink -f "$initdb")")
as_server() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
cd "$dir"  # the server's user may not enter the caller's working directory
case $cmd in
  start)
    port=$3
    if [ "$(id -u)" = 0 ]; then chown postgres "$dir"; fi
    as_server "$bin/initdb" -D "$dir/data" -A trust -U postgres --no-sync >"$dir/initdb.log"
    as_server "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
      -o "-h 127.0.0.1 -p $port -k $dir -c fsync=off" start >/dev/null
    as_server "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres vlfuse_test
    echo "postgresql://postgres@127.0.0.1:$port/vlfuse_test"
    ;;
  stop)
    as_server "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
    ;;
  *)
    echo "usage: $0 start DIR PORT | stop DIR" >&2
    exit 2
    ;;
esac

#!/bin/sh
# A private PostgreSQL cluster for the tests.
#   t/pgcluster.sh start DIR PORT   create (first time) and start it; prints the
#                                   apr_dbd pgsql params on the last stdout line
#   t/pgcluster.sh stop DIR         stop it (fast shutdown)
# Listens only on 127.0.0.1:PORT (its unix socket lives in DIR/run), trust auth,
# database and role "msoauth". As root, the server runs as the postgres user.
set -eu

die() { echo "pgcluster.sh: $*" >&2; exit 1; }
usage() { die "usage: $0 start DIR PORT | stop DIR"; }

find_bindir() {
    if [ -n "${PG_BINDIR:-}" ]; then
        echo "$PG_BINDIR"
        return
    fi
    # The newest installed major version (Debian installs side by side).
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

[ $# -ge 2 ] || usage
cmd=$1
case $2 in
    /*) dir=$2 ;;
    *) dir=$(pwd)/$2 ;;
esac

bindir=$(find_bindir)
if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ] || [ ! -x "$bindir/pg_ctl" ]; then
    die "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin: install the Debian package postgresql (apt-get install postgresql)"
fi

# Run a server command as the right user: postgres refuses to run as root.
if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || die "running as root but there is no postgres user: install the Debian package postgresql"
    as_pg() { runuser -u postgres -- "$@"; }
else
    as_pg() { "$@"; }
fi

data=$dir/data
run=$dir/run
log=$dir/server.log
# Neither root's nor the caller's working directory may be readable by postgres.
cd /

is_running() {
    [ -f "$data/PG_VERSION" ] && as_pg "$bindir/pg_ctl" -D "$data" status >/dev/null 2>&1
}

params() {
    echo "host=127.0.0.1 port=$1 dbname=msoauth user=msoauth"
}

case $cmd in
start)
    [ $# -eq 3 ] || usage
    port=$3
    case $port in
        ''|*[!0-9]*) die "PORT must be a number, not '$port'" ;;
    esac
    mkdir -p "$dir"
    if [ "$(id -u)" -eq 0 ]; then
        chown postgres: "$dir"
        # postgres must be able to reach DIR: temp dirs (pytest's, mktemp's)
        # are often 0700 root. Grant search (not listing) on such ancestors.
        p=$dir
        while [ "$p" != "/" ] && [ -n "$p" ]; do
            p=$(dirname "$p")
            if ! runuser -u postgres -- test -x "$p"; then
                echo "pgcluster.sh: granting search permission on $p to reach $dir" >&2
                chmod o+x "$p"
            fi
        done
    fi
    if is_running; then
        # Already up: report the port it was started with.
        port=$(cat "$dir/port" 2>/dev/null || echo "$port")
        params "$port"
        exit 0
    fi
    if [ ! -f "$data/PG_VERSION" ]; then
        as_pg mkdir -p "$data" "$run"
        as_pg "$bindir/initdb" -D "$data" -U postgres --auth=trust --encoding=UTF8 \
            --no-locale >"$dir/initdb.log" 2>&1 \
            || { cat "$dir/initdb.log" >&2; die "initdb failed in $data (log above)"; }
        {
            echo "listen_addresses = '127.0.0.1'"
            echo "unix_socket_directories = '$run'"
            echo "fsync = off"
            echo "max_connections = 50"
        } | as_pg sh -c "cat >> '$data/postgresql.conf'"
        # Only loopback and the private socket, both trusted: a test cluster.
        printf '%s\n' \
            'local all all trust' \
            'host all all 127.0.0.1/32 trust' \
            | as_pg sh -c "cat > '$data/pg_hba.conf'"
        fresh=1
    else
        fresh=0
    fi
    echo "$port" | as_pg sh -c "cat > '$dir/port'"
    as_pg "$bindir/pg_ctl" -D "$data" -l "$log" -o "-p $port" -w -t 60 start >/dev/null \
        || { tail -n 30 "$log" >&2 2>/dev/null; die "PostgreSQL did not start in $data on port $port (log above, full log in $log)"; }
    if [ "$fresh" -eq 1 ]; then
        psql_bin=$bindir/psql
        as_pg "$psql_bin" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres \
            -d postgres -c "CREATE ROLE msoauth LOGIN" \
            -c "CREATE DATABASE msoauth OWNER msoauth" >/dev/null \
            || die "cannot create the msoauth role and database (server log: $log)"
    fi
    params "$port"
    ;;
stop)
    [ $# -eq 2 ] || usage
    if is_running; then
        as_pg "$bindir/pg_ctl" -D "$data" -m fast -w stop >/dev/null \
            || die "pg_ctl stop failed for $data (server log: $log)"
    fi
    ;;
*)
    usage
    ;;
esac

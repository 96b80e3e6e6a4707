# A throwaway PostgreSQL server for one test run: its own data folder, a loopback port,
# run as an unprivileged user (root when CI runs as root is not allowed to start it).
# Sourced by .ci/run; exports FEDCARE_POSTGRES_URL for the tests.

start_postgres() {
    local bin port owner
    bin=$(dirname "$(ls /usr/lib/postgresql/*/bin/pg_ctl | sort -V | tail -n 1)")
    PG_DIR=$(mktemp -d /tmp/fedcare-pg.XXXXXX)
    owner=$(id -un)
    if [ "$(id -u)" = 0 ]; then
        owner=nobody
        chown "$owner" "$PG_DIR"
    fi
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    # From /: the unprivileged owner may not enter the checkout's folder.
    as_owner() { if [ "$(id -u)" = 0 ]; then (cd / && runuser -u "$owner" -- "$@"); else "$@"; fi; }
    as_owner "$bin/initdb" -D "$PG_DIR/data" -U fedcare --auth=trust -E UTF8 >/dev/null
    as_owner "$bin/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/log" -w \
        -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$PG_DIR -c max_connections=200 -c fsync=off" \
        start >/dev/null
    PG_STOP=("as_owner" "$bin/pg_ctl" -D "$PG_DIR/data" -m fast stop)
    export FEDCARE_POSTGRES_URL="postgresql+psycopg://fedcare@127.0.0.1:$port/postgres"
    echo "PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port"
}

stop_postgres() {
    if [ -n "${PG_DIR:-}" ]; then
        "${PG_STOP[@]}" >/dev/null 2>&1 || true
        rm -rf "$PG_DIR"
    fi
}

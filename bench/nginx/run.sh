#!/usr/bin/env bash
# Benchmark peer: nginx stream server that replies "x" to each connection and closes it.
#
# Usage: bench/nginx/run.sh PORT CORE
#
# Listens on 127.0.0.1:PORT (loopback only) with backlog 4096, as ONE process pinned to CPU
# CORE: `master_process off; daemon off;`, so the pid the caller gets (this script execs nginx)
# is the only process doing the work; CPU time from /proc/PID/stat and moving PID's threads
# into a cgroup then cover all of nginx. (worker_cpu_affinity only applies to workers under a
# master, so the pinning is done with taskset, which execs nginx in place.)
#
# Prints "LISTENING 127.0.0.1:PORT" on stdout once the port accepts (polled, at most ~5 s).
# The config, error log and pid file live in a temp dir that is removed after nginx exits.
# Stop it with SIGTERM/SIGINT (fast shutdown) or SIGQUIT (graceful).
set -euo pipefail

die() {
    echo "run.sh: $*" >&2
    exit 2
}

[ $# -eq 2 ] || die "usage: $0 PORT CORE"
port=$1
core=$2
[[ "$port" =~ ^[0-9]+$ ]] && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] ||
    die "PORT must be 1..65535, got '$port'"
[[ "$core" =~ ^[0-9]+$ ]] || die "CORE must be a CPU number, got '$core'"

nginx_bin=$(command -v nginx 2>/dev/null || true)
[ -n "$nginx_bin" ] || { [ -x /usr/sbin/nginx ] && nginx_bin=/usr/sbin/nginx; } ||
    die "nginx not found; run bench/nginx/install.sh"
command -v taskset >/dev/null 2>&1 || die "taskset (util-linux) not found"

# Stream module: built in, or a dynamic module to load (Debian: libnginx-mod-stream).
build=$("$nginx_bin" -V 2>&1)
load_stream=""
if grep -q -- '--with-stream=dynamic' <<<"$build"; then
    for so in /usr/lib/nginx/modules/ngx_stream_module.so /usr/share/nginx/modules/ngx_stream_module.so; do
        if [ -e "$so" ]; then
            load_stream="load_module $so;"
            break
        fi
    done
    [ -n "$load_stream" ] ||
        die "nginx's stream module is dynamic but ngx_stream_module.so is missing; install libnginx-mod-stream (bench/nginx/install.sh)"
elif ! grep -q -- '--with-stream\( \|$\)' <<<"$build"; then
    die "this nginx has no stream module; run bench/nginx/install.sh"
fi

# Refuse a port that something already accepts on (the probe below would be fooled).
if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "127.0.0.1:$port already accepts connections"
fi

dir=$(mktemp -d /tmp/floodgate-nginx.XXXXXX)
cat >"$dir/nginx.conf" <<CONF
$load_stream
worker_processes 1;
master_process off;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;

events {
    worker_connections 8192;
}

stream {
    server {
        listen 127.0.0.1:$port backlog=4096 reuseport;
        return "x";
    }
}
CONF

# After exec, $$ is nginx's pid. This background helper announces readiness, then removes the
# temp dir once nginx is gone. It holds no copy of the caller's stdout after announcing.
nginx_pid=$$
(
    ready=0
    for _ in $(seq 1 100); do
        kill -0 "$nginx_pid" 2>/dev/null || break
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            ready=1
            break
        fi
        sleep 0.05
    done
    if [ "$ready" -eq 1 ]; then
        echo "LISTENING 127.0.0.1:$port"
    else
        echo "run.sh: nginx did not accept on 127.0.0.1:$port within 5 s; its log:" >&2
        cat "$dir/error.log" >&2 2>/dev/null || true
    fi
    exec >/dev/null 2>&1 </dev/null
    while kill -0 "$nginx_pid" 2>/dev/null; do
        sleep 1
    done
    rm -rf "$dir"
) &

exec taskset -c "$core" "$nginx_bin" -p "$dir/" -c "$dir/nginx.conf" -e "$dir/error.log"

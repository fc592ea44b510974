#!/usr/bin/env bash
# Installs nginx with the stream module for the benchmark's nginx peer (bench/nginx/run.sh).
# Debian/Ubuntu only. Prints "SKIP nginx: <why>" and exits 0 when it cannot install, so a
# benchmark run can go on without the nginx peer.
set -u

skip() {
    echo "SKIP nginx: $*"
    exit 0
}

have_stream() {
    command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || return 1
    # Built in (nginx -V lists --with-stream without =dynamic) or shipped as a dynamic module.
    [ -e /usr/lib/nginx/modules/ngx_stream_module.so ] && return 0
    local nginx_bin
    nginx_bin=$(command -v nginx 2>/dev/null || echo /usr/sbin/nginx)
    "$nginx_bin" -V 2>&1 | grep -q -- '--with-stream\( \|$\)'
}

if have_stream; then
    echo "nginx with stream module already installed: $( (command -v nginx || echo /usr/sbin/nginx) | head -1)"
    exit 0
fi

command -v apt-get >/dev/null 2>&1 || skip "apt-get not found (not a Debian-like system)"
[ "$(id -u)" -eq 0 ] || skip "must run as root to apt-get install"

export DEBIAN_FRONTEND=noninteractive

candidate() {
    apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}'
}

if [ -z "$(candidate libnginx-mod-stream)" ] || [ "$(candidate libnginx-mod-stream)" = "(none)" ]; then
    apt-get update >/dev/null 2>&1 || skip "apt-get update failed"
fi

stream_cand=$(candidate libnginx-mod-stream)
[ -n "$stream_cand" ] && [ "$stream_cand" != "(none)" ] || skip "libnginx-mod-stream not available from apt"

light_cand=$(candidate nginx-light)
if [ -n "$light_cand" ] && [ "$light_cand" != "(none)" ]; then
    pkgs=(nginx-light libnginx-mod-stream)
else
    pkgs=(nginx libnginx-mod-stream)
fi

echo "installing: ${pkgs[*]}"
# policy-rc.d 101 keeps the package from starting the system nginx service on port 80.
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
fi
apt-get install -y --no-install-recommends "${pkgs[@]}" >/tmp/floodgate-nginx-install.log 2>&1
rc=$?
[ "$made_policy" -eq 1 ] && rm -f "$policy"
[ "$rc" -eq 0 ] || skip "apt-get install ${pkgs[*]} failed (log: /tmp/floodgate-nginx-install.log)"

have_stream || skip "nginx installed but the stream module was not found"
echo "nginx installed: $(/usr/sbin/nginx -v 2>&1)"

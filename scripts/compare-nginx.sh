#!/usr/bin/env bash
# Compare `parallel_sendfile serve` with nginx (sendfile on) on the same files,
# under the same wrk load, on loopback.
#
#   scripts/compare-nginx.sh            # ~2 minutes; needs root (or nginx+wrk+curl installed)
#   RUNS=3 scripts/compare-nginx.sh     # medians of 3 rounds
#
# Environment:
#   MODES="sendfile sfbuf lwbuf lwbuf-run"
#                          parallel_sendfile modes to run (space-separated: sendfile copy mmap
#                          sfbuf lwbuf lwbuf-run direct zerocopy)
#   FILES="f16k.bin f1m.bin random"
#                          what wrk requests: one file again and again, or "random": one of
#                          512 files of 512 KiB (256 MiB, four times the default cache of
#                          64 MiB) chosen at random per request (a wrk Lua script), or
#                          "disk2g": one of 2,048 files of 1 MiB (2 GiB) at random, served
#                          by parallel_sendfile from disk through a page cache of MEM_MIB
#   MEM_MIB=256            with disk2g: `serve --mem-mib` (every case is then served from
#                          disk through the page cache); the server's VmRSS, RssAnon,
#                          RssShmem and the bytes its memory file holds are sampled during
#                          each run and their peaks shown
#   SERVE_ARGS=""          extra options of `parallel_sendfile serve` (e.g. "--granule 16")
#   DURATION=5s            wrk duration per measurement
#   RUNS=1                 rounds; each round measures nginx and every mode once, in turn,
#                          and the table shows the median of each over the rounds
#   THREADS=2 CONNS=64     wrk -t / -c
#   NGINX_PORT=18480 LWBUF_PORT=18481
#
# Installs nginx, wrk and curl from Debian packages if missing (apt-get, without
# starting any service), serves a temporary directory with a 16 KiB and a 1 MiB
# file from both servers on 127.0.0.1 only, checks that both return the files
# byte for byte, runs `wrk -t2 -c64 -d5s` against each (nginx and the modes
# interleaved, RUNS times), prints the medians and the requests/s ratio, and
# stops both servers (also on error or Ctrl-C). Not part of CI.
set -euo pipefail

MODES=${MODES:-sendfile sfbuf lwbuf lwbuf-run}
FILES=${FILES:-f16k.bin f1m.bin random}
SERVE_ARGS=${SERVE_ARGS:-}
MEM_MIB=${MEM_MIB:-}
if [[ " ${FILES:-} " == *" disk2g "* ]]; then
    MEM_MIB=${MEM_MIB:-256}
fi
DURATION=${DURATION:-5s}
RUNS=${RUNS:-1}
THREADS=${THREADS:-2}
CONNS=${CONNS:-64}
NGINX_PORT=${NGINX_PORT:-18480}
LWBUF_PORT=${LWBUF_PORT:-18481}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

need=()
for tool in nginx wrk curl; do
    command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || need+=("$tool")
done
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing ${need[*]}: install them (apt-get install ${need[*]}) or run as root" >&2
        exit 1
    fi
    # Keep the package scripts from starting nginx as a system service.
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    echo "installing ${need[*]} ..."
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    [ "$made_policy" -eq 1 ] && rm -f /usr/sbin/policy-rc.d
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

WORK=$(mktemp -d /tmp/compare-nginx.XXXXXX)
NGINX_PID=""
LWBUF_PID=""
cleanup() {
    [ -n "$NGINX_PID" ] && kill "$NGINX_PID" 2>/dev/null && wait "$NGINX_PID" 2>/dev/null || true
    [ -n "$LWBUF_PID" ] && kill "$LWBUF_PID" 2>/dev/null && wait "$LWBUF_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

mkdir -p "$WORK/www" "$WORK/nginx"
head -c 16384 /dev/urandom > "$WORK/www/f16k.bin"
head -c 1048576 /dev/urandom > "$WORK/www/f1m.bin"
if [[ " $FILES " == *" random "* ]]; then
    mkdir -p "$WORK/www/r"
    for i in $(seq 0 511); do
        head -c 524288 /dev/urandom > "$WORK/www/r/$(printf 'r%03d.bin' "$i")"
    done
    # One of the 512 files at random per request.
    cat > "$WORK/random.lua" <<'LUA'
math.randomseed(os.time())
request = function()
    return wrk.format("GET", string.format("/r/r%03d.bin", math.random(0, 511)))
end
LUA
fi

if [[ " $FILES " == *" disk2g "* ]]; then
    mkdir -p "$WORK/www/d"
    echo "writing 2,048 files of 1 MiB ..." >&2
    for i in $(seq 0 2047); do
        head -c 1048576 /dev/urandom > "$WORK/www/d/$(printf 'd%04d.bin' "$i")"
    done
    cat > "$WORK/disk2g.lua" <<'LUA'
math.randomseed(os.time())
request = function()
    return wrk.format("GET", string.format("/d/d%04d.bin", math.random(0, 2047)))
end
LUA
fi

wait_port() { # port: wait until a server answers on 127.0.0.1:port
    local _i
    for _i in $(seq 1 100); do
        curl -s -o /dev/null "http://127.0.0.1:$1/" && return 0
        sleep 0.1
    done
    echo "nothing answers on 127.0.0.1:$1" >&2
    return 1
}

check_files() { # port name
    local f
    for f in f16k.bin f1m.bin r/r000.bin r/r511.bin r/r257.bin d/d0000.bin d/d2047.bin d/d1025.bin; do
        [ -e "$WORK/www/$f" ] || continue
        if ! curl -sf "http://127.0.0.1:$1/$f" | cmp -s - "$WORK/www/$f"; then
            echo "$2 did not return $f byte for byte" >&2
            exit 1
        fi
    done
}

# --- nginx: sendfile on, loopback, temp config, current user ---
user_line=""
[ "$(id -u)" -eq 0 ] && user_line="user $(id -un);"
cat > "$WORK/nginx/nginx.conf" <<EOF
$user_line
worker_processes $(nproc);
worker_cpu_affinity auto;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    default_type application/octet-stream;
    client_body_temp_path $WORK/nginx/body;
    proxy_temp_path $WORK/nginx/proxy;
    fastcgi_temp_path $WORK/nginx/fastcgi;
    uwsgi_temp_path $WORK/nginx/uwsgi;
    scgi_temp_path $WORK/nginx/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    keepalive_requests 1000000;
    open_file_cache max=1000 inactive=60s;
    server {
        listen 127.0.0.1:$NGINX_PORT;
        root $WORK/www;
    }
}
EOF
"$NGINX" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log" &
NGINX_PID=$!
wait_port "$NGINX_PORT"
check_files "$NGINX_PORT" nginx

# --- parallel_sendfile ---
(cd "$ROOT" && cargo build --release --quiet --example parallel_sendfile)
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/parallel_sendfile"

run_wrk() { # port file -> "req/s transfer/s"
    local out
    if [ "$2" = random ] || [ "$2" = disk2g ]; then
        out=$(timeout 120 wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" -s "$WORK/$2.lua" "http://127.0.0.1:$1/" 2>&1)
    else
        out=$(timeout 120 wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" "http://127.0.0.1:$1/$2" 2>&1)
    fi
    local rps tps errs
    rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
    tps=$(awk '/^Transfer\/sec:/ {print $2}' <<<"$out")
    errs=$(awk '/Socket errors|Non-2xx/ {printf "%s ", $0}' <<<"$out")
    echo "${rps:-0} ${tps:-?} ${errs}"
}

# Start `serve --mode $1` on LWBUF_PORT and check it; sets LWBUF_PID.
start_lwbuf() {
    # Bounded: the server stops by itself even if this script is killed.
    # shellcheck disable=SC2086
    local mem=()
    [ -n "$MEM_MIB" ] && mem=(--mem-mib "$MEM_MIB")
    "$BIN" serve --dir "$WORK/www" --port "$LWBUF_PORT" --mode "$1" --duration 600 "${mem[@]}" $SERVE_ARGS \
        >"$WORK/lwbuf-$1.log" 2>&1 &
    LWBUF_PID=$!
    wait_port "$LWBUF_PORT"
    check_files "$LWBUF_PORT" "parallel_sendfile ($1)"
}
stop_lwbuf() {
    kill "$LWBUF_PID" 2>/dev/null || true
    wait "$LWBUF_PID" 2>/dev/null || true
    LWBUF_PID=""
}

# Sample the server's memory every 0.2 s until killed; print the peaks (KiB):
# VmRSS RssAnon RssShmem and the bytes its memory file holds (st_blocks).
sample_mem() { # pid
    local vm=0 an=0 sh=0 mf=0 v a h fd b memfd=""
    trap 'echo "$vm $an $sh $mf"; exit 0' TERM
    # The memory file: found once (the server opens it at start).
    for fd in /proc/"$1"/fd/*; do
        [[ $(readlink "$fd" 2>/dev/null) == /memfd:* ]] && memfd=$fd && break
    done
    while kill -0 "$1" 2>/dev/null; do
        read -r v a h < <(awk '/^VmRSS:/ {v=$2} /^RssAnon:/ {a=$2} /^RssShmem:/ {h=$2} END {print v+0, a+0, h+0}' \
            "/proc/$1/status" 2>/dev/null || echo "0 0 0")
        ((v > vm)) && vm=$v
        ((a > an)) && an=$a
        ((h > sh)) && sh=$h
        if [ -n "$memfd" ]; then
            b=$(( $(stat -L -c %b "$memfd" 2>/dev/null || echo 0) / 2 ))
            ((b > mf)) && mf=$b
        fi
        sleep 0.2
    done
    echo "$vm $an $sh $mf"
}

median() { # numbers... -> the median (the lower middle one for an even count)
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)]; else print 0 }'
}

# Per file and server: requests/s of each round; transfer/s of the last one; any errors.
declare -A RPS TPS ERRS MEM
SERVERS=(nginx $MODES)
for round in $(seq 1 "$RUNS"); do
    [ "$RUNS" -gt 1 ] && echo "round $round of $RUNS ..." >&2
    for srv in "${SERVERS[@]}"; do
        if [ "$srv" = nginx ]; then
            port=$NGINX_PORT
        else
            start_lwbuf "$srv"
            port=$LWBUF_PORT
        fi
        for f in $FILES; do
            sampler=""
            if [ "$srv" != nginx ] && [ -n "$MEM_MIB" ]; then
                sample_mem "$LWBUF_PID" >"$WORK/mem-$f-$srv-$round" &
                sampler=$!
            fi
            read -r rps tps err < <(run_wrk "$port" "$f")
            if [ -n "$sampler" ]; then
                kill -TERM "$sampler" 2>/dev/null || true
                wait "$sampler" 2>/dev/null || true
                read -r vm an sh mf <"$WORK/mem-$f-$srv-$round" || true
                MEM[$f/$srv]="${MEM[$f/$srv]:-}  VmRSS $((vm / 1024)) RssAnon $((an / 1024)) RssShmem $((sh / 1024)) memfd $((mf / 1024)) MiB;"
            fi
            RPS[$f/$srv]="${RPS[$f/$srv]:-} $rps"
            TPS[$f/$srv]=$tps
            ERRS[$f/$srv]="${ERRS[$f/$srv]:-}${err}"
        done
        [ "$srv" = nginx ] || stop_lwbuf
    done
done

printf '\n%-10s %-28s %12s %12s  %-8s %s\n' file server "requests/s" "transfer/s" "vs nginx" "(each round's requests/s)"
printf '%-10s %-28s %12s %12s  %-8s %s\n' ---- ------ ---------- ---------- -------- ----------------
for f in $FILES; do
    # shellcheck disable=SC2086
    n_rps=$(median ${RPS[$f/nginx]})
    for srv in "${SERVERS[@]}"; do
        # shellcheck disable=SC2086
        rps=$(median ${RPS[$f/$srv]})
        ratio=$(awk -v a="$rps" -v b="$n_rps" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')
        name="parallel_sendfile $srv"
        [ "$srv" = nginx ] && name="nginx (sendfile on)"
        printf '%-10s %-28s %12s %12s  %-8s %s %s\n' "$f" "$name" "$rps" "${TPS[$f/$srv]}" "$ratio" \
            "(${RPS[$f/$srv]# })" "${ERRS[$f/$srv]}"
    done
done
if [ -n "$MEM_MIB" ]; then
    echo
    echo "parallel_sendfile memory, peaks sampled every 0.2 s during each run (per round):"
    for f in $FILES; do
        for srv in $MODES; do
            echo "  $f $srv:${MEM[$f/$srv]:-}"
        done
    done
    echo "(RssShmem counts a page once per mapping of it: the direct map and each window;"
    echo " memfd is the memory the server's frames take, which --mem-mib bounds.)"
fi
echo
echo "medians of $RUNS round(s); transfer/s of the last round."
echo "wrk -t$THREADS -c$CONNS -d$DURATION on 127.0.0.1; nginx: $("$NGINX" -v 2>&1 | sed 's/.*: //'), $(nproc) workers, open_file_cache on;"
if [ -n "$MEM_MIB" ]; then
    echo "parallel_sendfile: files on disk, read through its page cache of $MEM_MIB MiB (serve --mem-mib), one pinned worker per CPU. Both share $(nproc) cores with wrk."
else
    echo "parallel_sendfile: files preloaded into its page-cache stand-in, one pinned worker per CPU. Both share $(nproc) cores with wrk."
fi

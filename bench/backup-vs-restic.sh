#!/usr/bin/env bash
# backup-vs-restic.sh: PeerStore backup and restore beside restic, on one machine.
#
# What it does
#   1. Makes three data sets from a fixed seed (AES-256-CTR keystream from
#      openssl, so every run backs up the same, incompressible bytes):
#        small   1000 files x 4 KiB    (4,096,000 bytes)
#        medium   200 files x 1 MiB  (209,715,200 bytes)
#        large      1 file  x 256 MiB (268,435,456 bytes)
#        huge       1 file  x 1 GiB   (1,073,741,824 bytes; only when
#                                      BENCH_SETS names it: the memory check)
#   2. Starts a fresh 3-node PeerStore ring on 127.0.0.1 (ports chosen by the
#      OS, data in the bench directory, R = 3 so every block is on all three
#      nodes) and waits, bounded, until all three say they are joined and see
#      the other two among their successors (`peerstore ring --json`).
#   3. For each data set and each run: `peerstore backup` and
#      `peerstore restore` (client-side encryption is always on; a new user
#      key per run, so nothing is "unchanged"), then `restic backup` and
#      `restic restore latest` into a new local repository. Every restore
#      goes to a new directory and is compared with the source (`diff -r`).
#      Runs alternate which tool goes first, so a change in machine load
#      does not always fall on the same tool.
#      A step that fails (a command exiting non-zero, or a restore that
#      differs) does not stop the bench: it is marked FAIL in the table and
#      listed below it, and the script exits 1 at the end. A PeerStore backup
#      that failed part-way is completed by a second, untimed
#      `peerstore backup` (which sends only the files it missed), so that
#      the restore is still measured on the whole data set.
#   4. Prints a table (and writes it to $BENCH_OUT if set): MB/s for each
#      step (1 MB = 10^6 bytes of the data set, over the wall time of the
#      command), the ratio PeerStore / restic, the client's peak RSS
#      (/usr/bin/time), the largest peak RSS of the three nodes during the
#      step (VmHWM from /proc/PID/status, reset before each step through
#      /proc/PID/clear_refs; if the reset is refused the figure is the
#      running maximum since the node started, and the table says so), and
#      restic's peak RSS. Below it, the targets (backup >= restic, restore
#      >= 1.5 x restic) checked on the best run of each tool.
#   5. Stops the nodes (SIGTERM, then SIGKILL after 10 s) on any exit, removes
#      the bench directory (unless BENCH_KEEP=1; on failure the logs are kept),
#      and checks with pgrep that none of its processes is left.
#
# What it needs (it installs nothing and builds nothing):
#   - the release binaries: run first, from the repository root,
#       cargo build --release -p peerstore-node -p peerstore-client
#   - restic (Debian: apt-get install -y restic), GNU time (apt-get install -y
#     time), openssl, python3, diff, split; about 4 GB free in the bench
#     directory with the default two runs (the nodes keep every run's blocks,
#     three copies each), and about 12 GB more with the huge set.
#
# Usage
#   bench/backup-vs-restic.sh
#
# Environment (all optional)
#   BENCH_DIR        parent of the scratch directory (default /tmp)
#   BENCH_OUT        also write the table to this file
#   BENCH_RUNS       runs of every measurement (default 2)
#   BENCH_SETS       data sets to run, a subset of "small medium large huge"
#                    (default "small medium large")
#   BENCH_SEED       seed of the data (default peerstore-bench-1)
#   BENCH_BIN        where the binaries are (default <repo>/target/release)
#   BENCH_JOIN_SECS  how long to wait for the ring (default 120)
#   BENCH_KEEP=1     keep the scratch directory (data, repos, node logs)
#   RESTIC_PASSWORD  restic repository password (default peerstore-bench)
#
# The numbers are for this machine as it is when the script runs: data are
# read from the page cache (they were just written) by both tools, the
# nodes, the client and restic share the same cores and disk, and any other
# load on the machine counts against whoever runs at that moment.

set -euo pipefail

die() {
    echo "backup-vs-restic: error: $*" >&2
    exit 1
}
say() { echo "backup-vs-restic: $*" >&2; }

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${BENCH_BIN:-$REPO_ROOT/target/release}
RUNS=${BENCH_RUNS:-2}
SETS=${BENCH_SETS:-small medium large}
SEED=${BENCH_SEED:-peerstore-bench-1}
JOIN_SECS=${BENCH_JOIN_SECS:-120}
export RESTIC_PASSWORD=${RESTIC_PASSWORD:-peerstore-bench}
unset PEERSTORE_PASSPHRASE RESTIC_REPOSITORY RESTIC_PASSWORD_FILE RESTIC_PASSWORD_COMMAND

# ---- checks before anything starts ------------------------------------------

[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNS must be a positive integer, not '$RUNS'"
[[ $JOIN_SECS =~ ^[1-9][0-9]*$ ]] || die "BENCH_JOIN_SECS must be a positive integer, not '$JOIN_SECS'"
for s in $SETS; do
    case $s in small | medium | large | huge) ;; *) die "unknown data set '$s' in BENCH_SETS (small, medium, large, huge)" ;; esac
done
command -v restic >/dev/null || die "restic is not installed: apt-get install -y restic"
[[ -x /usr/bin/time ]] || die "GNU time (/usr/bin/time) is not installed: apt-get install -y time"
for tool in openssl python3 diff split sha256sum; do
    command -v "$tool" >/dev/null || die "$tool is not installed"
done
for b in peerstore-node peerstore; do
    [[ -x $BIN/$b ]] || die "$BIN/$b is missing: run 'cargo build --release -p peerstore-node -p peerstore-client' in $REPO_ROOT first (or set BENCH_BIN)"
done

PARENT=${BENCH_DIR:-/tmp}
mkdir -p "$PARENT" || die "cannot create $PARENT"
W=$(mktemp -d "$PARENT/peerstore-bench.XXXXXX") || die "cannot make a scratch directory in $PARENT"
W=$(realpath "$W")
export RESTIC_CACHE_DIR=$W/restic-cache

NODE_PIDS=()
NODE_ADDRS=()
OK=0

# ---- clean-up ---------------------------------------------------------------

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    local p alive
    for p in "${NODE_PIDS[@]}"; do
        kill -TERM "$p" 2>/dev/null || true
    done
    for _ in $(seq 1 100); do
        alive=0
        for p in "${NODE_PIDS[@]}"; do
            kill -0 "$p" 2>/dev/null && alive=1
        done
        ((alive)) || break
        sleep 0.1
    done
    for p in "${NODE_PIDS[@]}"; do
        if kill -0 "$p" 2>/dev/null; then
            say "node $p did not stop within 10 s of SIGTERM: killing it"
            kill -KILL "$p" 2>/dev/null || true
        fi
    done
    for p in "${NODE_PIDS[@]}"; do
        wait "$p" 2>/dev/null || true
    done
    if [[ ${BENCH_KEEP:-0} == 1 ]]; then
        say "kept $W"
    elif ((OK)); then
        rm -rf "$W"
    else
        # Keep the logs for a look, drop the bulk.
        rm -rf "$W/data" "$W/out" "$W/restic" "$W/restic-cache" "$W"/node*/store 2>/dev/null || true
        if ((status == 130 || status == 143)); then
            say "interrupted; logs kept in $W"
        else
            say "failed; logs kept in $W"
        fi
    fi
    local left
    left=$(pgrep -f -- "$W/" || true)
    if [[ -n $left ]]; then
        say "processes left behind: $left"
        status=1
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- data -------------------------------------------------------------------

# keystream NAME BYTES: BYTES deterministic pseudo-random bytes for NAME.
keystream() {
    local key
    key=$(printf '%s/%s' "$SEED" "$1" | sha256sum | cut -c1-64)
    head -c "$2" /dev/zero |
        openssl enc -aes-256-ctr -nosalt -K "$key" -iv 00000000000000000000000000000000
}

declare -A SET_BYTES SET_FILES
SET_BYTES[small]=$((1000 * 4096))
SET_FILES[small]=1000
SET_BYTES[medium]=$((200 * 1048576))
SET_FILES[medium]=200
SET_BYTES[large]=$((256 * 1048576))
SET_FILES[large]=1
SET_BYTES[huge]=$((1024 * 1048576))
SET_FILES[huge]=1

make_set() {
    local name=$1 dir=$W/data/$1
    mkdir -p "$dir"
    case $name in
        small) keystream small "${SET_BYTES[small]}" | split -b 4096 -a 4 -d - "$dir/f" ;;
        medium) keystream medium "${SET_BYTES[medium]}" | split -b 1048576 -a 3 -d - "$dir/f" ;;
        large) keystream large "${SET_BYTES[large]}" >"$dir/big.bin" ;;
        huge) keystream huge "${SET_BYTES[huge]}" >"$dir/huge.bin" ;;
    esac
    local n bytes
    n=$(find "$dir" -type f | wc -l)
    bytes=$(find "$dir" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')
    [[ $n == "${SET_FILES[$name]}" && $bytes == "${SET_BYTES[$name]}" ]] ||
        die "data set $name came out as $n files, $bytes bytes (wanted ${SET_FILES[$name]}, ${SET_BYTES[$name]})"
    local digest
    digest=$(cd "$dir" && find . -type f | sort | xargs cat | sha256sum | cut -c1-16)
    say "data set $name: $n files, $bytes bytes, sha256 of the concatenation ${digest}..."
}

# ---- the ring ---------------------------------------------------------------

ROOT_PEM=$W/node0/node.pub.pem
RING_KEY=$W/ring-user.pem

# start_node I ARGS...: starts node I, sets NODE_ADDRS[I] from its first line.
start_node() {
    local i=$1
    shift
    "$BIN/peerstore-node" --data-dir "$W/node$i" --listen 127.0.0.1:0 "$@" \
        >"$W/node$i.out" 2>"$W/node$i.err" &
    local pid=$!
    NODE_PIDS+=("$pid")
    local line=""
    for _ in $(seq 1 300); do
        line=$(head -n 1 "$W/node$i.out" 2>/dev/null || true)
        [[ $line == "listening on "* ]] && break
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "$W/node$i.err" >&2 || true
            die "node $i exited before it listened (log above, in $W/node$i.err)"
        fi
        sleep 0.1
    done
    [[ $line == "listening on "* ]] || die "node $i printed no 'listening on' line within 30 s (see $W/node$i.err)"
    NODE_ADDRS[i]=${line#listening on }
    say "node $i (pid $pid) listening on ${NODE_ADDRS[$i]}"
}

# ring_ready: every node joined and seeing the other two as successors.
ring_ready() {
    local i json
    for i in 0 1 2; do
        json=$("$BIN/peerstore" ring --json --key "$RING_KEY" --node "${NODE_ADDRS[$i]}" \
            --trust "$ROOT_PEM" 2>/dev/null) || return 1
        python3 - "$json" "${NODE_ADDRS[@]}" "$i" <<'EOF' || return 1
import json, sys
st = json.loads(sys.argv[1])
addrs, me = sys.argv[2:5], int(sys.argv[5])
succ = {p["addr"] for p in st.get("successors", [])}
others = {a for j, a in enumerate(addrs) if j != me}
sys.exit(0 if st.get("joined") and others <= succ else 1)
EOF
    done
}

start_ring() {
    local fp1 fp2
    fp1=$("$BIN/peerstore-node" id --data-dir "$W/node1" 2>>"$W/node1.err" | awk '/^fingerprint/ {print $2}')
    fp2=$("$BIN/peerstore-node" id --data-dir "$W/node2" 2>>"$W/node2.err" | awk '/^fingerprint/ {print $2}')
    [[ -n $fp1 && -n $fp2 ]] || die "peerstore-node id printed no fingerprint (see $W/node1.err, $W/node2.err)"
    start_node 0 --admit "$fp1" --admit "$fp2"
    [[ -s $ROOT_PEM ]] || die "node 0 wrote no $ROOT_PEM"
    start_node 1 --join "${NODE_ADDRS[0]}" --trust "$ROOT_PEM"
    start_node 2 --join "${NODE_ADDRS[0]}" --trust "$ROOT_PEM"
    "$BIN/peerstore" init --no-passphrase --key "$RING_KEY" >/dev/null 2>"$W/init.err" ||
        die "peerstore init failed: $(cat "$W/init.err")"
    local t0=$SECONDS
    until ring_ready; do
        if ((SECONDS - t0 >= JOIN_SECS)); then
            local i
            for i in 0 1 2; do
                echo "node $i:" >&2
                "$BIN/peerstore" ring --key "$RING_KEY" --node "${NODE_ADDRS[$i]}" --trust "$ROOT_PEM" >&2 || true
            done
            die "the ring did not form within $JOIN_SECS s (status above; logs in $W/node*.err)"
        fi
        local p
        for p in "${NODE_PIDS[@]}"; do
            kill -0 "$p" 2>/dev/null || die "node pid $p died while the ring formed (logs in $W/node*.err)"
        done
        sleep 1
    done
    say "ring of 3 joined after $((SECONDS - t0)) s"
}

# ---- measuring --------------------------------------------------------------

HWM_RESET=1
reset_node_peaks() {
    local p
    for p in "${NODE_PIDS[@]}"; do
        # "5" resets the peak RSS to the current RSS (Linux >= 4.0).
        if ! { echo 5 >"/proc/$p/clear_refs"; } 2>/dev/null; then
            HWM_RESET=0
        fi
    done
}

# node_peak_kb: the largest VmHWM of the nodes.
node_peak_kb() {
    local p v max=0
    for p in "${NODE_PIDS[@]}"; do
        v=$(awk '/^VmHWM:/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
        ((v > max)) && max=$v
    done
    echo "$max"
}

check_nodes_alive() {
    local p
    for p in "${NODE_PIDS[@]}"; do
        kill -0 "$p" 2>/dev/null || die "node pid $p has died (logs in $W/node*.err)"
    done
}

RESULTS=$W/results.tsv
: >"$RESULTS"

# measure SET RUN TOOL STEP NODES(0|1) LOG CMD...: runs CMD, records a row
# "set run tool step seconds client_rss_kb node_rss_kb ok" in $RESULTS.
# Returns CMD's failure (after recording it) rather than stopping the bench.
measure() {
    local set=$1 run=$2 tool=$3 step=$4 nodes=$5 log=$6
    shift 6
    sync
    if ((nodes)); then reset_node_peaks; fi
    local tf=$log.time t0 t1 ok=1
    t0=$(date +%s.%N)
    /usr/bin/time -v -o "$tf" "$@" >"$log.out" 2>"$log.err" || ok=0
    t1=$(date +%s.%N)
    local secs rss nrss=-
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}')
    rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$tf")
    if ((nodes)); then
        check_nodes_alive
        nrss=$(node_peak_kb)
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$set" "$run" "$tool" "$step" "$secs" "${rss:-0}" "$nrss" "$ok" >>"$RESULTS"
    say "$(printf '%-6s run %s  %-9s %-7s %8.2f s  %7.1f MB/s  rss %s KiB  nodes %s KiB%s' \
        "$set" "$run" "$tool" "$step" "$secs" \
        "$(awk -v b="${SET_BYTES[$set]}" -v s="$secs" 'BEGIN {printf "%.1f", b / s / 1e6}')" "$rss" "$nrss" \
        "$( ((ok)) || echo '  FAILED')")"
    if ((!ok)); then
        FAILURES+=("$tool $step of $set, run $run: $* (output in $log.out, $log.err)")
        echo "--- $tool $step of $set (run $run) failed; its output:" >&2
        tail -n 20 "$log.out" "$log.err" >&2 || true
        return 1
    fi
}

FAILURES=()

# same_tree SRC RESTORED WHAT: compares; if they differ, records a failure
# and marks the last row of $RESULTS (the restore's) as failed.
same_tree() {
    local a=$1 b=$2 what=$3
    if [[ ! -d $b ]]; then
        FAILURES+=("$what: $b was not restored")
        say "$what: $b was not restored"
    elif ! diff -r -q "$a" "$b" >"$W/diff.out" 2>&1; then
        FAILURES+=("$what: the restored tree differs from the source: $(head -n 3 "$W/diff.out" | tr '\n' ' ')")
        say "$what: the restored tree differs from the source:"
        head -n 10 "$W/diff.out" >&2
    else
        return 0
    fi
    sed -i '$ s/\t1$/\t0/' "$RESULTS"
}

run_peerstore() {
    local set=$1 run=$2 src=$W/data/$1
    local key=$W/user-$run.pem out=$W/out/peerstore-$set-$run log=$W/log/peerstore-$set-$run
    mkdir -p "$W/log" "$W/out"
    if [[ ! -s $key ]]; then
        "$BIN/peerstore" init --no-passphrase --key "$key" >/dev/null 2>"$W/init.err" ||
            die "peerstore init failed: $(cat "$W/init.err")"
    fi
    local conn=(--key "$key" --node "${NODE_ADDRS[0]}" --trust "$ROOT_PEM")
    if measure "$set" "$run" peerstore backup 1 "$log-backup" "$BIN/peerstore" backup "$src" "${conn[@]}"; then
        grep -q "^stored ${SET_FILES[$set]} files" "$log-backup.out" ||
            die "peerstore backup of $set stored other than ${SET_FILES[$set]} files: $(cat "$log-backup.out")"
    else
        # The backup is measured as failed; complete it (untimed: only the
        # files it missed are sent) so that the restore has all the data.
        say "completing the backup of $set (untimed) so that the restore can be measured"
        "$BIN/peerstore" backup "$src" "${conn[@]}" >"$log-complete.out" 2>"$log-complete.err" ||
            die "the completing peerstore backup of $set failed too: $(tail -n 5 "$log-complete.out" "$log-complete.err")"
        say "  $(cat "$log-complete.out")"
    fi
    if measure "$set" "$run" peerstore restore 1 "$log-restore" "$BIN/peerstore" restore "$src" --to "$out" "${conn[@]}"; then
        same_tree "$src" "$out/$set" "peerstore restore of $set (run $run)"
    fi
    rm -rf "$out"
}

run_restic() {
    local set=$1 run=$2 src=$W/data/$1
    local repo=$W/restic/$set-$run out=$W/out/restic-$set-$run log=$W/log/restic-$set-$run
    mkdir -p "$W/log" "$W/out" "$W/restic"
    restic init --repo "$repo" >"$log-init.out" 2>&1 || die "restic init failed: $(cat "$log-init.out")"
    measure "$set" "$run" restic backup 0 "$log-backup" restic backup --repo "$repo" --quiet "$src" ||
        die "restic backup failed (see above)"
    if measure "$set" "$run" restic restore 0 "$log-restore" restic restore latest --repo "$repo" --quiet --target "$out"; then
        same_tree "$src" "$out$src" "restic restore of $set (run $run)"
    fi
    rm -rf "$out" "$repo"
}

# ---- the run ----------------------------------------------------------------

say "scratch directory $W"
say "load average before: $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cores"
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
for s in $SETS; do make_set "$s"; done
start_ring
for s in $SETS; do
    for run in $(seq 1 "$RUNS"); do
        if ((run % 2)); then
            run_peerstore "$s" "$run"
            run_restic "$s" "$run"
        else
            run_restic "$s" "$run"
            run_peerstore "$s" "$run"
        fi
    done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- the table --------------------------------------------------------------

TABLE=$W/table.txt
python3 - "$RESULTS" "$HWM_RESET" "$LOAD_BEFORE" "$LOAD_AFTER" "$(nproc)" \
    "$(restic version | cut -d' ' -f1-2)" "$SETS" >"$TABLE" <<'EOF'
import sys, collections
path, hwm_reset, load0, load1, cores, restic_v, sets = sys.argv[1:8]
BYTES = {"small": 1000 * 4096, "medium": 200 * 1048576, "large": 256 * 1048576,
         "huge": 1024 * 1048576}
LABEL = {"small": "1000 x 4 KiB", "medium": "200 x 1 MiB", "large": "1 x 256 MiB",
         "huge": "1 x 1 GiB"}
rows = collections.defaultdict(dict)  # (set, run) -> {(tool, step): (secs, rss, nrss)}
for line in open(path):
    s, run, tool, step, secs, rss, nrss, ok = line.rstrip("\n").split("\t")
    rows[(s, int(run))][(tool, step)] = (float(secs), int(rss), None if nrss == "-" else int(nrss), ok == "1")

failed = False

def mbs(s, m):
    global failed
    if not m[3]:
        failed = True
    v = BYTES[s] / m[0] / 1e6
    return (f"{v:.2f}" if v < 1 else f"{v:.1f}") + ("" if m[3] else " FAIL")

def ratio(ps, restic):
    x = restic[0] / ps[0]
    return (f"{x:.3f}" if x < 0.1 else f"{x:.2f}") + ("" if ps[3] and restic[3] else " FAIL")

def mib(kb):
    return f"{kb / 1024:.0f}"

head = ("data set", "run", "ps bkp MB/s", "restic bkp", "ratio", "ps rst MB/s",
        "restic rst", "ratio", "client RSS MiB b/r", "node RSS MiB b/r", "restic RSS MiB b/r")
out = []
for s in sets.split():
    for run in sorted(r for (x, r) in rows if x == s):
        d = rows[(s, run)]
        pb, pr = d[("peerstore", "backup")], d[("peerstore", "restore")]
        rb, rr = d[("restic", "backup")], d[("restic", "restore")]
        out.append((LABEL[s], str(run),
                    mbs(s, pb), mbs(s, rb), ratio(pb, rb),
                    mbs(s, pr), mbs(s, rr), ratio(pr, rr),
                    f"{mib(pb[1])}/{mib(pr[1])}", f"{mib(pb[2])}/{mib(pr[2])}",
                    f"{mib(rb[1])}/{mib(rr[1])}"))
w = [max(len(r[i]) for r in [head] + out) for i in range(len(head))]
fmt = lambda r: "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r))
print(fmt(head))
print("  ".join("-" * x for x in w))
for r in out:
    print(fmt(r))
print()
print("ratio = PeerStore MB/s / restic MB/s; MB = 10^6 bytes of the data set over the command's wall time.")
print("RSS b/r = peak resident set during backup / during restore; node RSS = the largest of the three nodes'",
      "peaks during the step" if hwm_reset == "1" else
      "VmHWM (NOT reset between steps: a running maximum since the node started)")
if failed:
    print("FAIL: the command failed or its restore differed from the source (see the failures listed below);",
          "its time is shown but is not a valid result.")
print(f"{cores} cores; load average before {load0}, after {load1}; {restic_v}; R = 3, client encryption on.")
print()
print("targets, on the best run of each tool (backup >= 1.0 x restic, restore >= 1.5 x restic):")
for s in sets.split():
    runs = [rows[k] for k in rows if k[0] == s]
    def best(tool, step):
        ok = [d[(tool, step)][0] for d in runs if d[(tool, step)][3]]
        return min(ok) if ok else None
    def verdict(step, goal):
        p, r = best("peerstore", step), best("restic", step)
        if p is None or r is None:
            return f"{step} no successful run"
        x = r / p
        return f"{step} {x:5.2f} x restic  {'met' if x >= goal else 'MISSED'}"
    print(f"  {LABEL[s]:<13} {verdict('backup', 1.0)};  {verdict('restore', 1.5)}")
print("memory, on every run (client and each node under 100 MiB peak RSS during backup and restore):")
for s in sets.split():
    peaks = [(d[("peerstore", step)][1], d[("peerstore", step)][2])
             for k, d in rows.items() if k[0] == s for step in ("backup", "restore")]
    client = max(c for c, _ in peaks)
    nodes = [n for _, n in peaks if n is not None]
    node = max(nodes) if nodes else None
    ok = client < 100 * 1024 and node is not None and node < 100 * 1024
    node_s = "unknown" if node is None else f"{mib(node)} MiB"
    print(f"  {LABEL[s]:<13} client {mib(client)} MiB, node {node_s}  {'met' if ok else 'MISSED'}")
EOF
if ((${#FAILURES[@]})); then
    {
        echo
        echo "failures:"
        printf '  %s\n' "${FAILURES[@]}"
    } >>"$TABLE"
fi
cat "$TABLE"
if [[ -n ${BENCH_OUT:-} ]]; then
    cp "$TABLE" "$BENCH_OUT" || die "cannot write $BENCH_OUT"
    say "table written to $BENCH_OUT"
fi
if ((${#FAILURES[@]})); then
    die "${#FAILURES[@]} step(s) failed (listed above)"
fi
OK=1

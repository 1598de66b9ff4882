#!/bin/sh
# Runs inside xesp's test VM (Debian's 6.1 kernel under QEMU), started by
# tests/tests/root_vm.rs: xesp with datapath = "xfrm" (kernel ESP, set up by
# xesp's own XFRM backend) against xesp with datapath = "tun" (xesp's
# user-space ESP core), so each ESP implementation is checked against an
# independent one. Two namespaces joined by veth:
#
#   onprem 192.0.2.1 (xfrm, initiator, LAN 10.0.0.1) -- azure 203.0.113.11
#   (tun, responder, VNet 10.2.0.1), one tunnel, 172.16.0.1 <-> 172.16.0.2.
#
# Checks: the tunnel comes up on both sides; PINGS echo requests from
# 10.0.0.1 to 10.2.0.1 are all answered and counted by the kernel's SAs and
# by Tunnel0's statistics in `xesp status`; a TCP connection from 10.0.0.1
# to 10.2.0.1 arrives at azure with onprem's MSS clamp (MSS_ONPREM, done by
# xesp's nftables table inet xesp; azure's own clamp is MSS_AZURE, above
# what Tunnel0's MTU gives, so only onprem's can produce the value);
# an IKE_SA rekey and a CHILD_SA rekey under ping lose nothing; stopping
# xesp removes its SAs, policies and interface; after a SIGKILL, a new xesp
# removes what the dead one left, and leaves a foreign SA (reqid 5) alone;
# the nftables table is there while xesp runs, gone after a stop, and
# replaced (not doubled) by the start after a SIGKILL; `xesp reload` adds a
# second tunnel (its xfrm interface, if_id 2, in the table) and removes it,
# with no ping through Tunnel0 lost and Tunnel0's SAs kept.
#
# Environment: RESULTS (writable directory), XESP_BIN, PINGS, SUCCESS_STATUS,
# MSS_ONPREM, MSS_AZURE.
set -eu
: "${RESULTS:?}"
: "${XESP_BIN:?}"
PINGS=${PINGS:-5}
MSS_ONPREM=${MSS_ONPREM:-1200}
MSS_AZURE=${MSS_AZURE:-1460}
SUCCESS_STATUS=${SUCCESS_STATUS:-0}
ID="xx$$"
A="$ID-onprem"
B="$ID-azure"
NAMESPACES=""
PIDS=""
RUN=/tmp/$ID
mkdir -p "$RUN"

fail() {
    echo "FAIL: $*" >&2
    for f in "$RUN"/*.log; do echo "== $f"; tail -n 40 "$f"; done >&2
    exit 1
}
cleanup() {
    for p in $PIDS; do kill "$p" 2>/dev/null || true; done
    sleep 0.5
    for n in $NAMESPACES; do ip netns del "$n" 2>/dev/null || true; done
}
trap 'rc=$?; cleanup; exit $rc' EXIT
trap 'exit 130' INT TERM

wait_for() {
    what=$1; secs=$2; shift 2
    n=0
    while ! "$@" >/dev/null 2>&1; do
        n=$((n + 1))
        [ "$n" -le $((secs * 10)) ] || fail "timed out waiting for $what"
        sleep 0.1
    done
}

ip netns add "$A"; NAMESPACES="$NAMESPACES $A"
ip netns add "$B"; NAMESPACES="$NAMESPACES $B"
ip link add dmz0 netns "$A" type veth peer name dmz0 netns "$B"
for n in "$A" "$B"; do
    ip -n "$n" link set lo up
    ip -n "$n" link set dmz0 up
    ip netns exec "$n" sysctl -qw net.ipv6.conf.all.disable_ipv6=1
done
ip -n "$A" addr add 192.0.2.1/24 dev dmz0
ip -n "$B" addr add 203.0.113.11/24 dev dmz0
ip -n "$A" route add 203.0.113.0/24 dev dmz0
ip -n "$B" route add 192.0.2.0/24 dev dmz0
ip -n "$A" addr add 10.0.0.1/32 dev lo
ip -n "$B" addr add 10.2.0.1/32 dev lo

conf() { # NAME DATAPATH PUBLIC REMOTE ADDRESS INITIATOR MSS
    cat > "$RUN/$1.toml" <<CONF
[device]
public_address = "$3"
dmz_interface = "dmz0"
datapath = "$2"
mss_clamp = $7
control_socket = "$RUN/$1.sock"

[dmz]
allow = ["192.0.2.0/24", "203.0.113.0/24"]

[ike]
psk = "the lab's pre-shared key, long enough"
initiator = $6

[[tunnel]]
name = "Tunnel0"
remote = "$4"
address = "$5"
CONF
}
conf onprem xfrm 192.0.2.1 203.0.113.11 172.16.0.1 true "$MSS_ONPREM"
conf azure tun 203.0.113.11 192.0.2.1 172.16.0.2 false "$MSS_AZURE"

start() { # NAMESPACE NAME
    ip netns exec "$1" "$XESP_BIN" run -c "$RUN/$2.toml" >>"$RUN/$2.log" 2>&1 &
    PIDS="$PIDS $!"
    eval "PID_$2=$!"
}
up() { # NAME
    "$XESP_BIN" status --json -s "$RUN/$1.sock" | grep -q '"up": true'
}
nft_a() { # nft ARGS... in onprem's namespace
    ip netns exec "$A" nft "$@"
}

start "$B" azure
wait_for "azure's control socket" 60 test -S "$RUN/azure.sock"
start "$A" onprem
wait_for "the tunnel up on onprem" 90 up onprem
wait_for "the tunnel up on azure" 30 up azure
ip -n "$A" route add 10.2.0.0/24 dev Tunnel0 src 10.0.0.1
ip -n "$B" route add 10.0.0.0/24 dev Tunnel0 src 10.2.0.1
echo "== tunnel up"
nft_a list table inet xesp > "$RESULTS/nft-running.txt" || fail "no table inet xesp while xesp runs"

ip -n "$A" -s xfrm state > "$RESULTS/state-before.txt"
ip netns exec "$A" ping -c "$PINGS" -i 0.2 -W 3 -I 10.0.0.1 10.2.0.1 > "$RESULTS/ping.txt" \
    || fail "pings: $(cat "$RESULTS/ping.txt")"
ip -n "$A" -s xfrm state > "$RESULTS/state.txt"
ip -n "$A" xfrm policy > "$RESULTS/policy.txt"
"$XESP_BIN" status --json -s "$RUN/onprem.sock" > "$RESULTS/status-onprem.json"
"$XESP_BIN" status --json -s "$RUN/azure.sock" > "$RESULTS/status-azure.json"
"$XESP_BIN" status -s "$RUN/onprem.sock" > "$RESULTS/status-onprem.txt"
echo "== pinged"

# TCP from onprem's LAN address to azure's VNet address: the SYN azure's
# xesp writes to its Tunnel0 (decrypted, after its own clamp) is captured.
ip netns exec "$B" tcpdump -i Tunnel0 -n -v -l -c 1 \
    'tcp[tcpflags] & tcp-syn != 0 and tcp[tcpflags] & tcp-ack == 0' \
    > "$RESULTS/syn-azure.txt" 2> "$RUN/tcpdump.log" &
CAPTURE=$!
PIDS="$PIDS $CAPTURE"
wait_for "tcpdump on azure's Tunnel0" 30 grep -q "listening on" "$RUN/tcpdump.log"
ip netns exec "$B" iperf3 -s -1 -B 10.2.0.1 > "$RUN/iperf3-server.log" 2>&1 &
PIDS="$PIDS $!"
wait_for "iperf3 listening on azure" 30 sh -c "ip netns exec $B ss -Hltn | grep -q '10.2.0.1:5201'"
ip netns exec "$A" iperf3 -c 10.2.0.1 -B 10.0.0.1 -n 64K > "$RESULTS/iperf3.txt" 2>&1 \
    || fail "TCP through the tunnel: $(cat "$RESULTS/iperf3.txt")"
wait "$CAPTURE" || fail "no SYN captured on azure: $(cat "$RUN/tcpdump.log")"
nft_a list table inet xesp > "$RESULTS/nft-tcp.txt"
echo "== tcp"

# Rekeys under ping: 60 echo requests at 10 per second.
ip netns exec "$A" ping -c 60 -i 0.1 -W 3 -I 10.0.0.1 10.2.0.1 > "$RESULTS/ping-rekey.txt" &
PING=$!
sleep 1
"$XESP_BIN" tunnel rekey Tunnel0 -s "$RUN/onprem.sock" > "$RESULTS/rekey-child.txt"
sleep 2
"$XESP_BIN" tunnel rekey Tunnel0 --ike -s "$RUN/onprem.sock" > "$RESULTS/rekey-ike.txt"
wait "$PING" || fail "pings during the rekeys: $(cat "$RESULTS/ping-rekey.txt")"
# Both rekeys done (under TCG a loaded host can make the IKE_SA's DH take
# longer than the pings): wait for the count, not for time.
rekeyed() {
    "$XESP_BIN" status --json -s "$RUN/onprem.sock" | grep -Eq '"rekeys": ([2-9]|[1-9][0-9]+),'
}
wait_for "both rekeys counted" 60 rekeyed
"$XESP_BIN" status --json -s "$RUN/onprem.sock" > "$RESULTS/status-rekeyed.json"
ip -n "$A" -s xfrm state > "$RESULTS/state-rekeyed.txt"
echo "== rekeyed"

# Reload: a tunnel added (to a peer that never answers) and removed again,
# each under 40 pings through Tunnel0 at 20 per second, none lost; Tunnel0
# keeps its SAs.
spis() { ip -n "$A" xfrm state | grep -o 'spi 0x[0-9a-f]*' | sort; }
spis > "$RESULTS/spis-before-reload.txt"
cp "$RUN/onprem.toml" "$RUN/onprem-one.toml"
cat >> "$RUN/onprem.toml" <<CONF

[[tunnel]]
name = "Tunnel1"
remote = "203.0.113.99"
address = "172.16.0.3"
CONF
reload_under_ping() { # NAME
    ip netns exec "$A" ping -c 40 -i 0.05 -W 3 -I 10.0.0.1 10.2.0.1 > "$RESULTS/ping-$1.txt" &
    PING=$!
    sleep 0.5
    "$XESP_BIN" reload -s "$RUN/onprem.sock" > "$RESULTS/$1.txt" 2>&1 || fail "$1: $(cat "$RESULTS/$1.txt")"
    wait "$PING" || fail "pings during $1: $(cat "$RESULTS/ping-$1.txt")"
}
reload_under_ping reload-add
ip -d -n "$A" link show Tunnel1 > "$RESULTS/tunnel1-added.txt" || fail "no Tunnel1 after the reload"
nft_a list table inet xesp > "$RESULTS/nft-added.txt"
cp "$RUN/onprem-one.toml" "$RUN/onprem.toml"
reload_under_ping reload-remove
ip -n "$A" link show Tunnel1 > /dev/null 2>&1 && fail "Tunnel1 is left after its removal"
nft_a list table inet xesp > "$RESULTS/nft-removed.txt"
spis > "$RESULTS/spis-after-reload.txt"
echo "== reloaded"

# Stop: nothing of xesp's is left.
kill -TERM "$PID_onprem"
wait "$PID_onprem" || true
ip -n "$A" xfrm state > "$RESULTS/state-stopped.txt"
ip -n "$A" xfrm policy > "$RESULTS/policy-stopped.txt"
ip -n "$A" link show Tunnel0 > /dev/null 2>&1 && fail "Tunnel0 is left after the stop"
nft_a list tables > "$RESULTS/nft-stopped.txt"
echo "== stopped"

# Crash: a foreign SA survives the next start's cleanup, ours do not.
ip -n "$A" xfrm state add src 192.0.2.1 dst 192.0.2.99 proto esp spi 0x00001234 reqid 5 \
    mode tunnel aead 'rfc4106(gcm(aes))' 0x0102030405060708090a0b0c0d0e0f1011121314 128
start "$A" onprem
wait_for "the tunnel up again" 90 up onprem
kill -KILL "$PID_onprem"
wait "$PID_onprem" 2>/dev/null || true
ip -n "$A" -s xfrm state > "$RESULTS/state-crashed.txt"
nft_a list tables > "$RESULTS/nft-crashed.txt"
start "$A" onprem
wait_for "the tunnel up after the crash" 90 up onprem
ip -n "$A" -s xfrm state > "$RESULTS/state-restarted.txt"
nft_a list tables > "$RESULTS/nft-restarted-tables.txt"
nft_a list table inet xesp > "$RESULTS/nft-restarted.txt"
kill -TERM "$PID_onprem"
wait "$PID_onprem" || true
ip -n "$A" -s xfrm state > "$RESULTS/state-final.txt"
nft_a list tables > "$RESULTS/nft-final.txt"
cp "$RUN/onprem.log" "$RESULTS/onprem.log"
echo "== all checks passed"
exit "$SUCCESS_STATUS"

#!/bin/sh
# Runs inside xesp's test VM (xtask::vm: Debian's 6.1 kernel under QEMU, the
# host's root read-only), started by tests/tests/root_vm.rs. Checks, in order:
#
#   1. the XFRM, ESP and cipher modules are loaded, and others load on demand;
#   2. the host's tools run here: strongSwan's charon starts (its pid file and
#      vici socket on the guest's tmpfs /run) and answers swanctl; an xesp
#      binary, if given, answers --version;
#   3. kernel ESP: two namespaces joined by veth (192.0.2.1 <-> 192.0.2.2), an
#      xfrm interface with if_id 42 on each side, ESP SAs rfc4106(gcm(aes))
#      in UDP 4500/4500 with ESN and a replay window of 128; PINGS echo
#      requests from 10.0.0.1 to 10.2.0.4 through the tunnel all answered.
#
# Writes what the host test reads into $RESULTS: ip -s xfrm state of each
# side (xfrm-onprem.txt, xfrm-azure.txt), the xfrm interfaces' counters, the
# ping output, the loaded modules, swanctl's answer.
#
# Environment:
#   RESULTS         a writable directory (the VM's work directory)
#   ENCAP_HOLDER    a command (no spaces inside its words) that holds a UDP
#                   socket on 4500 marked UDP_ENCAP_ESPINUDP, which the kernel
#                   needs to take ESP out of UDP; it is started in each
#                   namespace with ENCAP_READY (a file to write once the socket
#                   is set) and ENCAP_STOP (a file whose creation ends it)
#   PINGS           echo requests (default 5)
#   SUCCESS_STATUS  exit status when every check passed (default 0)
#   XESP_BIN        optional: an xesp binary to start
set -eu
: "${RESULTS:?RESULTS must name a writable directory}"
: "${ENCAP_HOLDER:?ENCAP_HOLDER must name a command}"
PINGS=${PINGS:-5}
SUCCESS_STATUS=${SUCCESS_STATUS:-0}

# Namespace names unique to this run.
ID="xesp-vm$$"
A="$ID-onprem"
B="$ID-azure"
C="$ID-charon"
NAMESPACES=""
PIDS=""

fail() {
    echo "FAIL: $*" >&2
    exit 1
}

cleanup() {
    touch "$RESULTS/encap.stop" 2>/dev/null || true
    for p in $PIDS; do kill "$p" 2>/dev/null || true; done
    for n in $NAMESPACES; do ip netns del "$n" 2>/dev/null || true; done
}
trap 'rc=$?; cleanup; exit $rc' EXIT
trap 'exit 130' INT TERM

# wait_for WHAT SECONDS COMMAND...: polls COMMAND every 0.1 s.
wait_for() {
    what=$1
    secs=$2
    shift 2
    n=0
    until "$@"; do
        n=$((n + 1))
        [ "$n" -le $((secs * 10)) ] || fail "waited ${secs} s for $what"
        sleep 0.1
    done
}

netns() {
    ip netns add "$1"
    NAMESPACES="$NAMESPACES $1"
    ip -n "$1" link set lo up
    # IPv4 only: no router solicitations or MLD through the tunnel.
    ip netns exec "$1" sh -c 'echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6;
        echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6'
}

echo "== 1. kernel $(uname -r): modules"
cut -d' ' -f1 /proc/modules | sort > "$RESULTS/modules.txt"
for m in xfrm_user xfrm_interface esp4 esp6 veth tun aesni_intel gcm ghash_clmulni_intel authencesn 9p; do
    grep -qx "$m" "$RESULTS/modules.txt" || fail "module $m is not loaded"
done
echo "xfrm_user xfrm_interface esp4 esp6 veth tun aesni_intel gcm authencesn: loaded"
# A module not loaded at boot comes when the kernel asks for it.
netns "$C"
ip -n "$C" link add gnv0 type geneve id 1 remote 192.0.2.9 || fail "no geneve link (module autoload)"
grep -q '^geneve ' /proc/modules || fail "geneve is not loaded"
echo "geneve: loaded on demand"

echo "== 2. the host's tools"
mkdir -p /tmp/charon
cat > /tmp/charon/strongswan.conf <<EOF
charon {
    load = random nonce openssl pem pkcs1 x509 pubkey kernel-netlink socket-default vici
    plugins {
        vici {
            socket = unix:///run/xesp-vm-charon.vici
        }
    }
    filelog {
        log {
            path = /tmp/charon/charon.log
            default = 1
        }
    }
}
EOF
STRONGSWAN_CONF=/tmp/charon/strongswan.conf ip netns exec "$C" /usr/lib/ipsec/charon \
    > /tmp/charon/stdout 2>&1 &
PIDS="$PIDS $!"
wait_for "charon's vici socket" 60 test -S /run/xesp-vm-charon.vici
swanctl --stats --uri unix:///run/xesp-vm-charon.vici > "$RESULTS/swanctl-stats.txt" 2>/dev/null \
    || fail "swanctl --stats: $(cat "$RESULTS/swanctl-stats.txt")"
head -2 "$RESULTS/swanctl-stats.txt"
test -s /run/charon.pid || fail "charon wrote no /run/charon.pid"
echo "charon started (pid $(cat /run/charon.pid)) and answered swanctl"
if [ -n "${XESP_BIN:-}" ]; then
    "$XESP_BIN" --version > "$RESULTS/xesp-version.txt" 2>&1 \
        || fail "$XESP_BIN --version: $(cat "$RESULTS/xesp-version.txt")"
    echo "xesp: $(cat "$RESULTS/xesp-version.txt")"
fi

echo "== 3. ESP in UDP through xfrm interfaces"
netns "$A"
netns "$B"
ip link add ul0 netns "$A" type veth peer name ul0 netns "$B"
ip -n "$A" addr add 192.0.2.1/24 dev ul0
ip -n "$B" addr add 192.0.2.2/24 dev ul0
for ns in "$A" "$B"; do
    ip -n "$ns" link set ul0 up
    ip -n "$ns" link add ipsec0 type xfrm dev ul0 if_id 42
    ip -n "$ns" link set ipsec0 up
done
ip -n "$A" addr add 10.0.0.1/32 dev lo
ip -n "$B" addr add 10.2.0.4/32 dev lo
ip -n "$A" route add 10.2.0.0/24 dev ipsec0 src 10.0.0.1
ip -n "$B" route add 10.0.0.0/24 dev ipsec0 src 10.2.0.4

# AES-256-GCM-16: 32 octets of key and 4 of salt, one key per direction.
KEY_AB=0x000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20212223
KEY_BA=0xf0f1f2f3f4f5f6f7f8f9fafbfcfdfeff000102030405060708090a0b0c0d0e0f10111213
sa() { # namespace source destination spi key
    ip -n "$1" xfrm state add src "$2" dst "$3" proto esp spi "$4" reqid 42 mode tunnel \
        aead 'rfc4106(gcm(aes))' "$5" 128 \
        encap espinudp 4500 4500 0.0.0.0 \
        flag esn replay-window 128 if_id 42
}
policy() { # namespace direction source destination
    ip -n "$1" xfrm policy add src 0.0.0.0/0 dst 0.0.0.0/0 dir "$2" \
        tmpl src "$3" dst "$4" proto esp reqid 42 mode tunnel if_id 42
}
for ns in "$A" "$B"; do
    sa "$ns" 192.0.2.1 192.0.2.2 0xa0000001 "$KEY_AB"
    sa "$ns" 192.0.2.2 192.0.2.1 0xb0000001 "$KEY_BA"
done
policy "$A" out 192.0.2.1 192.0.2.2
policy "$A" in 192.0.2.2 192.0.2.1
policy "$B" out 192.0.2.2 192.0.2.1
policy "$B" in 192.0.2.1 192.0.2.2

rm -f "$RESULTS/encap.stop"
for side in onprem azure; do
    ns="$ID-$side"
    # shellcheck disable=SC2086 # ENCAP_HOLDER is a command with arguments
    ENCAP_READY="$RESULTS/encap-$side.ready" ENCAP_STOP="$RESULTS/encap.stop" \
        ip netns exec "$ns" $ENCAP_HOLDER > "$RESULTS/encap-$side.log" 2>&1 &
    PIDS="$PIDS $!"
done
for side in onprem azure; do
    wait_for "the UDP_ENCAP socket on 4500 in $side ($(cat "$RESULTS/encap-$side.log"))" 60 \
        test -s "$RESULTS/encap-$side.ready"
done
echo "UDP_ENCAP_ESPINUDP sockets on 4500 in both namespaces"

if ! ip netns exec "$A" ping -n -c "$PINGS" -i 0.2 -W 5 -I 10.0.0.1 10.2.0.4 > "$RESULTS/ping.txt" 2>&1; then
    cat "$RESULTS/ping.txt"
    ip -n "$A" -s xfrm state
    fail "ping 10.0.0.1 -> 10.2.0.4 through the tunnel failed"
fi
tail -2 "$RESULTS/ping.txt"
ip -n "$A" -s xfrm state > "$RESULTS/xfrm-onprem.txt"
ip -n "$B" -s xfrm state > "$RESULTS/xfrm-azure.txt"
ip -n "$A" -s link show ipsec0 > "$RESULTS/link-onprem.txt"
ip -n "$B" -s link show ipsec0 > "$RESULTS/link-azure.txt"
cat "$RESULTS/xfrm-onprem.txt"
echo "== all checks passed: exit $SUCCESS_STATUS"
exit "$SUCCESS_STATUS"

#!/bin/bash
# Provisions the agent-vm VM. agent-vm uploads it with common/ and runs it as
# root after creating the VM and on `agent-vm provision`:
#   lima-provision.sh STAGE_DIR USER guard|open
# STAGE_DIR holds common/ (package lists, scripts); `guard` blocks the VM
# from reaching the host, `open` (opt-out) removes that rule. Idempotent.
# Secrets never come through here: agent-vm copies credentials over SSH stdin
# separately.
set -euo pipefail
trap 'echo "lima-provision: failed at line $LINENO: $BASH_COMMAND" >&2' ERR
stage=$1
user=$2
host_access=${3:-guard}
common=$stage/common

step() { echo "==> $*"; }
fail() { echo "lima-provision: $*" >&2; exit 1; }

# install_if_changed DEST MODE: replace DEST with stdin only if it differs.
install_if_changed() {
    local tmp
    tmp=$(mktemp)
    cat > "$tmp"
    if [ -f "$1" ] && cmp -s "$tmp" "$1"; then
        rm -f "$tmp"
        return 1
    fi
    install -D -m "$2" "$tmp" "$1"
    rm -f "$tmp"
}

bash "$common/scripts/install-tools.sh" "$common" "$user"

step "ssh: accept the agent environment variables"
names=$(sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' "$common/packages/envvars.txt" | tr '\n' ' ')
for n in $names; do
    [[ $n =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || fail "envvars.txt: invalid variable name $n"
done
if printf 'AcceptEnv %s\n' "$names" | install_if_changed /etc/ssh/sshd_config.d/agent-vm.conf 0644; then
    sshd -t || fail "sshd rejected /etc/ssh/sshd_config.d/agent-vm.conf"
    systemctl reload ssh 2>/dev/null || systemctl reload sshd
    echo "updated"
fi
# In Lima's user-mode network the host's loopback is reachable from the guest
# as 192.168.5.2 (host.lima.internal), and with other network modes the host
# answers on the guest's default gateway. Refuse new connections from the
# guest to those addresses; replies to the host's own connections (SSH,
# sshfs) and DNS still pass. The agent has sudo in the VM and could remove
# this: it keeps host services out of reach of everything the agent runs,
# it does not bind a root-level attacker.
guard_unit=/etc/systemd/system/agent-vm-guard.service
guard_rules=/etc/agent-vm/guard.nft
if [ "$host_access" = guard ]; then
    step "network: block the VM from reaching the host"
    addrs="192.168.5.2"
    gw=$(ip -4 route show default 2>/dev/null | awk '{ print $3; exit }' || true)
    lima=$(getent ahostsv4 host.lima.internal 2>/dev/null | awk '{ print $1; exit }' || true)
    for a in $gw $lima; do
        [[ $a =~ ^[0-9.]+$ ]] && [[ " $addrs " != *" $a "* ]] && addrs="$addrs, $a"
    done
    install_if_changed "$guard_rules" 0644 <<EOF || true
# Written by agent-vm provisioning: the VM may not open connections to the host.
table inet agent_vm_guard
delete table inet agent_vm_guard
table inet agent_vm_guard {
    chain output {
        type filter hook output priority filter; policy accept;
        ct state established,related accept
        ip daddr { $addrs } udp dport 53 accept
        ip daddr { $addrs } tcp dport 53 accept
        ip daddr { $addrs } counter reject
        ip6 daddr fec0::2 counter reject
    }
}
EOF
    install_if_changed "$guard_unit" 0644 <<EOF || true
[Unit]
Description=agent-vm: block the VM from reaching the host
DefaultDependencies=no
Before=network-pre.target
Wants=network-pre.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/sbin/nft -f $guard_rules
ExecStop=/usr/sbin/nft delete table inet agent_vm_guard

[Install]
WantedBy=sysinit.target
EOF
    systemctl daemon-reload
    systemctl enable --quiet agent-vm-guard.service
    # Load the rules now, replacing any older version.
    nft -f "$guard_rules" || fail "nft rejected $guard_rules"
    systemctl start agent-vm-guard.service
else
    step "network: the VM may reach the host (opted out of the guard)"
    if [ -f "$guard_unit" ]; then
        systemctl disable --quiet --now agent-vm-guard.service || true
        rm -f "$guard_unit" "$guard_rules"
        systemctl daemon-reload
    fi
    nft delete table inet agent_vm_guard 2>/dev/null || true
fi

echo "lima-provision: done"

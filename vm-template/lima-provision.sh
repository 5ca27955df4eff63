#!/bin/bash
# Provisions the agent-vm VM. agent-vm uploads it with common/ and runs it as
# root after creating the VM and on `agent-vm provision`:
#   lima-provision.sh STAGE_DIR USER
# STAGE_DIR holds common/ (package lists, scripts). Idempotent. Secrets never
# come through here: agent-vm copies credentials over SSH stdin separately.
set -euo pipefail
stage=$1
user=$2
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
echo "lima-provision: done"

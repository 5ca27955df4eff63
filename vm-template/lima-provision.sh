#!/bin/bash
# Provisions the agent-vm VM. agent-vm uploads it with common/ and runs it as
# root after creating the VM and on `agent-vm provision`:
#   lima-provision.sh STAGE_DIR USER guard|open contained|sudo
# STAGE_DIR holds common/ (package lists, scripts); USER is the admin (Lima's
# user, with sudo). `guard` blocks the VM from reaching the host, `open`
# (opt-out) removes that rule. The agent runs as the user `agent`: without
# sudo or a root-equivalent group, and with egress only through agent-vm's
# gateway (127.0.0.1:3128, forwarded to the host) unless `sudo` (opt-out)
# gives it root back. Idempotent.
# Secrets never come through here: agent-vm copies credentials over SSH stdin
# separately.
set -euo pipefail
trap 'echo "lima-provision: failed at line $LINENO: $BASH_COMMAND" >&2' ERR
stage=$1
user=$2
host_access=${3:-guard}
agent_mode=${4:-contained}
agent=agent
gateway_port=3128
proxy=http://127.0.0.1:$gateway_port
no_proxy=localhost,127.0.0.1,::1
# What points a program at the gateway: agent sessions and the agent's
# Podman service get the same.
proxy_env="HTTP_PROXY=$proxy HTTPS_PROXY=$proxy http_proxy=$proxy https_proxy=$proxy NO_PROXY=$no_proxy no_proxy=$no_proxy"
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

# nft_unit NAME DESCRIPTION RULES [STOP]: a boot-time unit that loads the
# nftables file RULES before the network comes up; enabled and loaded now,
# replacing any older version of the rules.
nft_unit() {
    install_if_changed "/etc/systemd/system/$1.service" 0644 <<EOF || true
[Unit]
Description=agent-vm: $2
DefaultDependencies=no
Before=network-pre.target
Wants=network-pre.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/sbin/nft -f $3
${4:+ExecStop=/usr/sbin/$4}

[Install]
WantedBy=sysinit.target
EOF
    systemctl daemon-reload
    systemctl enable --quiet "$1.service"
    nft -f "$3" || fail "nft rejected $3"
    systemctl start "$1.service"
}

step "agent user: $agent ($agent_mode)"
if ! id "$agent" >/dev/null 2>&1; then
    useradd --create-home --shell /bin/bash --user-group "$agent"
    echo "created"
fi
# agent-vm's command lines are read by the agent's own shell: a POSIX one.
if [ "$(getent passwd "$agent" | cut -d: -f7)" != /bin/bash ]; then
    usermod --shell /bin/bash "$agent" && echo "shell: /bin/bash"
fi
# No way to root: no root-equivalent group, no sudo unless asked for.
for g in sudo wheel admin adm disk docker kvm libvirt lxd root shadow; do
    if id -nG "$agent" | tr ' ' '\n' | grep -qx "$g"; then gpasswd -d "$agent" "$g" >/dev/null && echo "removed from $g"; fi
done
if [ "$agent_mode" = sudo ]; then
    if printf '%s ALL=(ALL) NOPASSWD:ALL\n' "$agent" | install_if_changed /etc/sudoers.d/agent-vm-agent 0440; then
        echo "sudo: granted (the agent is not contained)"
    fi
    visudo -cq || fail "visudo rejected /etc/sudoers.d/agent-vm-agent"
else
    rm -f /etc/sudoers.d/agent-vm-agent
fi
agent_home=$(getent passwd "$agent" | cut -d: -f6)
admin_home=$(getent passwd "$user" | cut -d: -f6)
# agent-vm logs in as the agent with the admin's key. The files are root's:
# the agent cannot add keys of its own.
install -d -m 0755 -o root -g root "$agent_home/.ssh"
install -m 0644 -o root -g root "$admin_home/.ssh/authorized_keys" "$agent_home/.ssh/authorized_keys"
# Workspaces of a VM provisioned before the agent user existed move over.
for d in workspace .agent-vm/cache .agent-vm/template; do
    if [ -d "$admin_home/$d" ] && [ ! -e "$agent_home/$d" ]; then
        install -d -o "$agent" -g "$agent" "$(dirname "$agent_home/$d")"
        mv "$admin_home/$d" "$agent_home/$d"
        chown -R "$agent:$agent" "$agent_home/$d"
        echo "moved ~$user/$d to ~$agent/$d"
    fi
done

# The agent's traffic leaves only through the gateway: its sockets may
# reach loopback (the gateway's port, its own servers) but not DNS there,
# and nothing beyond. Enforced by uid in the kernel: without root the agent
# cannot undo it. Loaded at boot before the network comes up.
step "network: the agent's egress only through the gateway"
agent_uid=$(id -u "$agent")
agent_rules=/etc/agent-vm/agent.nft
install_if_changed "$agent_rules" 0644 <<EOF || true
# Written by agent-vm provisioning: user $agent (uid $agent_uid) reaches only loopback.
table inet agent_vm_agent
delete table inet agent_vm_agent
table inet agent_vm_agent {
    chain output {
        type filter hook output priority filter - 10; policy accept;
        meta skuid $agent_uid jump agent
    }
    chain agent {
        oifname "lo" meta l4proto { tcp, udp } th dport 53 counter reject
        oifname "lo" accept
        meta l4proto tcp counter reject with tcp reset
        counter reject with icmpx type admin-prohibited
    }
}
EOF
nft_unit agent-vm-agent-net "the agent user reaches the network only through the gateway" "$agent_rules"

# The host's extra CA certificates (a TLS-inspecting proxy's, say), staged
# by agent-vm one per file in $stage/ca: into the system trust store before
# anything is downloaded; Node and Python's certifi-based tools are pointed
# at the system bundle (for them, and for agent sessions).
ca_dir=/usr/local/share/ca-certificates/agent-vm
ca_changed=0
if [ -d "$stage/ca" ] && compgen -G "$stage/ca/*.crt" >/dev/null; then
    if ! diff -rq "$stage/ca" "$ca_dir" >/dev/null 2>&1; then
        rm -rf "$ca_dir"
        install -d -m 0755 "$ca_dir"
        install -m 0644 "$stage"/ca/*.crt "$ca_dir/"
        ca_changed=1
    fi
    step "trusting $(ls "$ca_dir" | wc -l) extra CA certificate(s) from the host"
elif [ -d "$ca_dir" ]; then
    rm -rf "$ca_dir"
    ca_changed=1
fi
if [ "$ca_changed" = 1 ]; then
    update-ca-certificates --fresh >/dev/null
fi
ca_env=""
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    ca_env="NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt"
    # Provisioning's own downloads (npm, pipx's pip) trust what the system does.
    export NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt PIP_CERT=/etc/ssl/certs/ca-certificates.crt
fi

bash "$common/scripts/install-tools.sh" "$common" "$agent" "$agent_mode"

# Containers for a contained agent: rootless Podman (its containers run
# under the agent's uid, so the firewall above binds them too), with the
# Docker API on a socket of the agent's own, which `docker` is pointed at.
docker_host=""
if [ "$agent_mode" = contained ] && command -v podman >/dev/null; then
    step "containers: rootless Podman for $agent"
    for f in /etc/subuid /etc/subgid; do
        touch "$f"
        if ! grep -q "^$agent:" "$f"; then
            # A range of its own, after every range already handed out.
            start=$(awk -F: 'BEGIN { m = 524288 } $2 + $3 > m { m = $2 + $3 } END { print m }' "$f")
            echo "$agent:$start:65536" >> "$f"
            echo "$f: $agent:$start:65536"
        fi
    done
    # The Podman service behind the socket pulls images through the gateway
    # (it gets no session's environment).
    printf '[Service]\nEnvironment=%s\n' "$proxy_env" | install_if_changed /etc/systemd/user/podman.service.d/agent-vm-proxy.conf 0644 || true
    # The agent's systemd (and so its Podman socket) runs while the VM runs.
    loginctl enable-linger "$agent"
    systemctl --global enable --quiet podman.socket
    systemctl --user -M "$agent@" daemon-reload 2>/dev/null || true
    systemctl --user -M "$agent@" start podman.socket 2>/dev/null || echo "podman.socket starts at the agent's next login"
    docker_host=unix:///run/user/$agent_uid/podman/podman.sock
fi

step "ssh: accept the agent environment variables"
names=$(sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' "$common/packages/envvars.txt" | tr '\n' ' ')
for n in $names; do
    [[ $n =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || fail "envvars.txt: invalid variable name $n"
done
if {
    printf 'AcceptEnv %s\n' "$names"
    # agent-vm's commands share one connection per user: room for many
    # sessions on it (a terminal, a `run` of many branches) at once.
    printf 'MaxSessions 64\n'
    # Every connection comes from the host through Lima's forwarded port, so
    # sshd sees one source: a penalty for a failed attempt (a replaced key,
    # a command cut short) would shut out all of the user's commands, and
    # the port only listens on the host's loopback.
    if sshd -T 2>/dev/null | grep -q '^persourcepenalties '; then printf 'PerSourcePenalties no\n'; fi
    # Agent sessions find the gateway through the usual variables (set by
    # sshd, so a session cannot be handed others); no forwarding of any kind.
    printf 'Match User %s\n' "$agent"
    printf '    SetEnv %s NODE_USE_ENV_PROXY=1%s%s\n' "$proxy_env" "${docker_host:+ DOCKER_HOST=$docker_host}" "${ca_env:+ $ca_env}"
    printf '    AllowTcpForwarding no\n    AllowStreamLocalForwarding no\n    X11Forwarding no\n    PermitTunnel no\n'
} | install_if_changed /etc/ssh/sshd_config.d/agent-vm.conf 0644; then
    sshd -t || fail "sshd rejected /etc/ssh/sshd_config.d/agent-vm.conf"
    systemctl reload ssh 2>/dev/null || systemctl reload sshd
    echo "updated"
fi
step "sessions: a login profile without its processes"
# agent-vm's sessions read this in place of a login shell's startup: the same
# files a login bash reads, without the two processes Debian's /etc/profile
# starts (`id`, `run-parts`: 160 ms of a 380 ms `connect -- true` on the
# test guest). Only while /etc/profile is the one it stands for (Debian 13's,
# kept beside it to compare: a package upgrade keeps the new file's old
# time, so times cannot tell); otherwise sessions start a real login shell.
login_profile=/etc/agent-vm/login.sh
if [ "$(sha256sum < /etc/profile)" = "8fec28102e0c371e6f2ecb949b95c1ba802260766b18c2445882b082418428b9  -" ]; then
    install_if_changed /etc/agent-vm/profile.debian 0644 < /etc/profile || true
    install_if_changed "$login_profile" 0644 <<'EOF' && echo "updated" || true
# Written by `agent-vm provision`: what a login bash reads, for agent-vm's
# sessions. Returns 1 where it does not apply (the session then starts a
# real login shell).
[ -n "${BASH_VERSION-}" ] || return 1
IFS= read -r -d '' _p < /etc/profile
IFS= read -r -d '' _d < /etc/agent-vm/profile.debian
[ "${_p-}" = "${_d-}" ] || { unset _p _d; return 1; }
unset _p _d
if [ "${EUID:-0}" -eq 0 ]; then
  PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
else
  PATH=/usr/local/bin:/usr/bin:/bin:/usr/local/games:/usr/games
fi
export PATH
# What run-parts would list: regular files, names of its pattern.
for i in /etc/profile.d/*.sh; do
  case ${i##*/} in [!a-zA-Z0-9_]*|*[!a-zA-Z0-9._-]*) continue ;; esac
  [ -f "$i" ] && [ -r "$i" ] && . "$i"
done
unset i
if [ -f ~/.bash_profile ]; then . ~/.bash_profile
elif [ -f ~/.bash_login ]; then . ~/.bash_login
elif [ -f ~/.profile ]; then . ~/.profile
fi
return 0
EOF
else
    rm -f "$login_profile" /etc/agent-vm/profile.debian
    echo "/etc/profile is not Debian 13's: sessions start a login shell"
fi

step "status: the workspace watcher"
# Keeps each workspace's answer for `agent-vm status` and probes again only
# where something changed (inotify), so a listing starts no process in the
# VM. It runs as the agent: its answers are the agent's own data, for
# display. Without python3, status lists by itself.
if [ -x /usr/bin/python3 ] && [ -f "$stage/watch/probe.sh" ]; then
    # Room for it and for the agent's own file watchers (Debian's default
    # is 1% of the memory's worth); memory is used only by watches made.
    if printf 'fs.inotify.max_user_watches = 524288\n' | install_if_changed /etc/sysctl.d/60-agent-vm-inotify.conf 0644; then
        sysctl -q -p /etc/sysctl.d/60-agent-vm-inotify.conf
    fi
    watch_changed=
    install_if_changed /usr/local/lib/agent-vm/workspace-watch.py 0644 < "$stage/vm-template/workspace-watch.py" && watch_changed=1
    install_if_changed /usr/local/lib/agent-vm/workspace-probe.sh 0644 < "$stage/watch/probe.sh" && watch_changed=1
    install_if_changed /etc/systemd/system/agent-vm-watch.service 0644 <<EOF && watch_changed=1
[Unit]
Description=agent-vm: workspace watcher for status
After=local-fs.target
StartLimitIntervalSec=0

[Service]
User=$agent
WorkingDirectory=~
ExecStart=/usr/bin/python3 /usr/local/lib/agent-vm/workspace-watch.py /usr/local/lib/agent-vm/workspace-probe.sh
Restart=always
RestartSec=2
Nice=5

[Install]
WantedBy=multi-user.target
EOF
    systemctl daemon-reload
    systemctl enable --quiet agent-vm-watch.service
    if [ -n "$watch_changed" ]; then systemctl restart agent-vm-watch.service; echo "updated"; else systemctl start agent-vm-watch.service; fi
else
    echo "no python3: status lists the workspaces by itself"
fi

# In Lima's user-mode network the host's loopback is reachable from the guest
# as 192.168.5.2 (host.lima.internal), and with other network modes the host
# answers on the guest's default gateway. Refuse new connections from the
# guest to those addresses; replies to the host's own connections (SSH,
# sshfs) and DNS still pass. It binds every VM user; only an agent given
# sudo (the opt-out) could remove it.
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
        # Lima's resolver (192.168.5.3:53), which Lima's own NAT rule sends
        # to the host agent on a port of its own: filtered after the NAT.
        ct status dnat ct original ip daddr 192.168.5.3 ct original proto-dst 53 meta l4proto { tcp, udp } accept
        ip daddr { $addrs } counter reject
        ip6 daddr fec0::2 counter reject
    }
}
EOF
    nft_unit agent-vm-guard "block the VM from reaching the host" "$guard_rules" "nft delete table inet agent_vm_guard"
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

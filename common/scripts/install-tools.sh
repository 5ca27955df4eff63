#!/bin/bash
# Installs the VM's tools from the lists in COMMON/packages. Run as root:
#   install-tools.sh COMMON_DIR USER [contained|sudo]
# USER is the agent's user. A contained
# agent joins no container group (docker's is root-equivalent).
# Idempotent: what is already installed at the pinned version is left alone,
# so a second run changes nothing. A failure names the step and the package.
set -euo pipefail
common=$1
user=$2
agent_mode=${3:-sudo}
packages=$common/packages
export DEBIAN_FRONTEND=noninteractive
t0=$SECONDS

step() { echo "==> $*"; }
fail() { echo "install-tools: $*" >&2; exit 1; }
# list FILE: the entries of a package list, without comments and blanks.
list() { [ -f "$1" ] || return 0; sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e '/^$/d' "$1"; }
# version NAME: the pinned version from versions.txt (empty if none).
version() { list "$packages/versions.txt" | awk -F= -v n="$1" '$1 == n { print substr($0, length(n) + 2); exit }'; }
as_user() { runuser -u "$user" -- env HOME="$(getent passwd "$user" | cut -d: -f6)" PATH="/usr/local/bin:/usr/bin:/bin:$(getent passwd "$user" | cut -d: -f6)/.local/bin" "$@"; }

# apt_install_all TOTAL PKG…: one apt run for every package (far faster than
# one run each), its progress shown as one line per package set up.
apt_install_all() {
    local total=$1 n=0 start=$SECONDS line
    shift
    apt-get install -y -q --no-install-recommends -o Dpkg::Use-Pty=0 "$@" 2>"$apt_err" | while IFS= read -r line; do
        case $line in
        "Setting up "*)
            n=$((n + 1))
            line=${line#Setting up }
            printf '  [%d/%s, %ds] %s\n' "$n" "$total" $((SECONDS - start)) "${line% ...}"
            ;;
        esac
    done
    return "${PIPESTATUS[0]}"
}

step "apt packages"
missing=()
while read -r pkg; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done < <(list "$packages/apt-packages.txt")
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${#missing[@]} listed package(s): ${missing[*]}"
    apt-get update -q >/dev/null || fail "apt-get update failed"
    apt_err=$(mktemp)
    # With their dependencies: what `Setting up` lines will count to.
    total=$(apt-get install -s -y -q --no-install-recommends "${missing[@]}" 2>/dev/null | grep -c '^Inst ') || total="?"
    echo "downloading and setting up $total package(s) with their dependencies"
    if ! apt_install_all "$total" "${missing[@]}"; then
        # Find the culprit: one at a time (those that work get installed).
        for pkg in "${missing[@]}"; do
            apt-get install -y -q --no-install-recommends "$pkg" >/dev/null 2>"$apt_err" ||
                fail "apt: installing $pkg failed: $(grep -v '^W:' "$apt_err" | tail -n 3 | tr '\n' ' ')"
        done
        fail "apt: installing the packages failed: $(tail -n 3 "$apt_err" | tr '\n' ' ')"
    fi
    rm -f "$apt_err"
else
    echo "all present"
fi

step "npm packages"
npm_list=$(list "$packages/npm-packages.txt")
if [ -n "$npm_list" ]; then
    command -v npm >/dev/null || fail "npm: not installed (add nodejs and npm to apt-packages.txt)"
    i=0
    n_total=$(wc -l <<< "$npm_list")
    while read -r pkg; do
        i=$((i + 1))
        v=$(version "$pkg")
        [ -n "$v" ] || fail "npm: $pkg has no version in versions.txt"
        have=$(npm ls -g --depth=0 --json 2>/dev/null | PKG="$pkg" python3 -c 'import json,os,sys; print(json.load(sys.stdin).get("dependencies",{}).get(os.environ["PKG"],{}).get("version",""))' || true)
        if [ "$have" != "$v" ]; then
            echo "  [$i/$n_total, $((SECONDS - t0))s] installing $pkg@$v"
            npm install -g --no-fund --no-audit "$pkg@$v" >/dev/null || fail "npm: installing $pkg@$v failed"
        fi
    done <<< "$npm_list"
fi

step "python tools"
py_list=$(list "$packages/python-packages.txt")
if [ -n "$py_list" ]; then
    command -v pipx >/dev/null || fail "pipx: not installed (add pipx to apt-packages.txt)"
    i=0
    n_total=$(wc -l <<< "$py_list")
    # For every user (/opt/pipx, commands in /usr/local/bin), installed by
    # root: a contained agent has no egress but the gateway's, and cannot
    # change the tools. An older provisioning installed them in the agent's
    # home, whose copies would come first on its PATH: they go.
    have=$(pipx list --global --short 2>/dev/null || true)
    user_have=$(as_user pipx list --short 2>/dev/null || true)
    while read -r pkg; do
        i=$((i + 1))
        v=$(version "$pkg")
        [ -n "$v" ] || fail "pipx: $pkg has no version in versions.txt"
        if ! grep -qx "$pkg $v" <<< "$have"; then
            echo "  [$i/$n_total, $((SECONDS - t0))s] installing $pkg==$v"
            pipx install --global --force "$pkg==$v" >/dev/null || fail "pipx: installing $pkg==$v failed"
        fi
        if grep -q "^$pkg " <<< "$user_have"; then
            as_user pipx uninstall "$pkg" >/dev/null && echo "  removed $user's own copy of $pkg"
        fi
    done <<< "$py_list"
fi

step "container groups"
groups=docker
[ "$agent_mode" = contained ] && groups=""
for group in $groups; do
    if getent group "$group" >/dev/null && ! id -nG "$user" | tr ' ' '\n' | grep -qx "$group"; then
        usermod -aG "$group" "$user"
        echo "added $user to $group"
    fi
done

step "lima (nested VMs)"
lima=$(version lima)
if [ -n "$lima" ] && ! limactl --version 2>/dev/null | grep -q " $lima\$"; then
    case "$(uname -m)" in x86_64) arch=x86_64 ;; aarch64) arch=aarch64 ;; *) fail "lima: unsupported $(uname -m)" ;; esac
    url="https://github.com/lima-vm/lima/releases/download/v$lima/lima-$lima-Linux-$arch.tar.gz"
    echo "installing lima $lima"
    curl -fsSL "$url" | tar -xz -C /usr/local || fail "lima: downloading $url failed"
fi
echo "install-tools: done"

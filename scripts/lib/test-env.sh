# Sourced by scripts/test and scripts/bench: installs what driving real
# guests needs, builds (cached) the guest image and the real Lima, and
# defines how to run a command as the user that runs limactl.
#
# After it: AGENT_VM_TEST_IMAGE, AGENT_VM_TEST_LIMA and AGENT_VM_TEST_QEMU are
# exported, and `as_test_user CMD…` runs CMD as the unprivileged test user
# (as root) or as is (as anyone else), with the environment that needs.

sudo=""
[ "$(id -u)" = 0 ] || sudo=sudo

packages=(qemu-system-x86 mmdebstrap e2fsprogs sshfs fuse3 openssh-client openssh-server util-linux python3 git bc)
tools=(qemu-system-x86_64 qemu-img mmdebstrap mkfs.ext4 sshfs fusermount3 ssh ssh-keygen flock python3 git bc script)
missing=()
for t in "${tools[@]}"; do command -v "$t" >/dev/null || missing+=("$t"); done
if [ ${#missing[@]} -gt 0 ]; then
    echo "$0: installing test dependencies (missing: ${missing[*]})" >&2
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq "${packages[@]}" >/dev/null
    # qemu-utils is installed on its own afterwards: a qemu-utils from another
    # release (a backport) Breaks the release's qemu-system-common, so asking
    # for both at once is unsatisfiable, while asking for qemu-system-x86 alone
    # lets apt remove it, and the line below installs the matching one.
    command -v qemu-img >/dev/null || $sudo apt-get install -y -qq qemu-utils >/dev/null
    for t in "${tools[@]}"; do command -v "$t" >/dev/null || { echo "$0: $t still missing" >&2; exit 1; }; done
fi
command -v go >/dev/null || { echo "$0: Go (1.25 or later) is needed to build Lima for the tests" >&2; exit 1; }

# The guest image needs root; Lima is built by whoever runs this.
AGENT_VM_TEST_IMAGE=$($sudo env ${AGENT_VM_TEST_CACHE:+AGENT_VM_TEST_CACHE=$AGENT_VM_TEST_CACHE} scripts/build-test-image </dev/null | tail -n1)
AGENT_VM_TEST_LIMA=$(scripts/build-lima </dev/null | tail -n1)
# Lima leaves -machine/-cpu/-accel/-smp/-m to these leading arguments: TCG
# (KVM hangs guests on the test machines; QEMU 7.2's multi-threaded TCG
# panics SMP guests), one vCPU and 1.5 GiB a guest.
AGENT_VM_TEST_QEMU="qemu-system-x86_64 -machine q35 -accel tcg,thread=single -cpu qemu64,-cx16 -smp 1 -m 1536"
export AGENT_VM_TEST_IMAGE AGENT_VM_TEST_LIMA AGENT_VM_TEST_QEMU

test_user=""
if [ "$(id -u)" = 0 ]; then
    # limactl exits at once as root: the guests are run by a user of our own.
    test_user=${AGENT_VM_TEST_USER:-avmtest}
    id "$test_user" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$test_user"
    test_home=$(getent passwd "$test_user" | cut -d: -f6)
    # The user mounts the VM with sshfs: FUSE must be open to it, as on a desktop.
    [ -c /dev/fuse ] && chmod 0666 /dev/fuse
    # It reads the checkout (fixtures, scripts) and the built binaries.
    dir=$PWD
    while [ "$dir" != / ]; do
        runuser -u "$test_user" -- test -x "$dir" || chmod o+x "$dir"
        dir=$(dirname "$dir")
    done
    chmod -R o+rX "$PWD"
fi

# as_test_user CMD…: CMD in this checkout, as the test user when root.
as_test_user() {
    if [ -z "$test_user" ]; then
        "$@"
        return
    fi
    local var pass=()
    for var in CI RUST_BACKTRACE RUST_TEST_THREADS AGENT_VM_TEST_IMAGE AGENT_VM_TEST_LIMA AGENT_VM_TEST_QEMU \
        AGENT_VM_ADVERSARIAL_TABLE AGENT_VM_ADVERSARIAL_ONLY AGENT_VM_FULL_CORPUS $(compgen -v BENCH_); do
        [ -n "${!var:-}" ] && pass+=("$var=${!var}")
    done
    runuser -u "$test_user" -- env -i PATH="$PATH" HOME="$test_home" USER="$test_user" LOGNAME="$test_user" \
        TMPDIR=/tmp LANG=C.UTF-8 "${pass[@]}" sh -c 'cd "$1" && shift && exec "$@"' sh "$PWD" "$@"
}

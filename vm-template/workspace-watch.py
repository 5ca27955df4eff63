#!/usr/bin/python3
"""agent-vm's workspace watcher, run as the agent by agent-vm-watch.service.

Keeps what `agent-vm status` says of each workspace in ~/workspace and
probes again only those where something changed (inotify), so a listing
starts no process in the VM. A listing is asked for on loopback (the port
and the probe's token in ~/.agent-vm/watch.port); before it answers, the
watcher reads every change event already queued, and the kernel queues an
event before the change's system call returns: a change made before the
listing began is in it.

Its answers are the agent's own data, for display, as the shell listing's
kept answers are; agent-vm decides nothing on them.

    workspace-watch.py PROBE_SCRIPT
PROBE_SCRIPT prints one workspace's record (agent-vm's WATCH_PROBE).
Python 3 standard library only.
"""

import ctypes
import errno
import hashlib
import os
import select
import socket
import struct
import subprocess
import sys
import time

IN_MODIFY, IN_ATTRIB = 0x2, 0x4
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF = 0x400, 0x800
IN_Q_OVERFLOW, IN_IGNORED, IN_ISDIR = 0x4000, 0x8000, 0x40000000
IN_ONLYDIR, IN_DONT_FOLLOW, IN_EXCL_UNLINK = 0x01000000, 0x02000000, 0x04000000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
# What changes a file's ctime or a directory's entries: what the shell
# listing's `find -newerct` sees.
MASK = (IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
        | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW | IN_EXCL_UNLINK)
END = b"agent-vm-watch: end"
EVENT = struct.Struct("iIII")

libc = ctypes.CDLL("libc.so.6", use_errno=True)


class Watcher:
    def __init__(self, home, probe):
        self.home = home
        self.root = os.path.join(home, b"workspace")
        self.probe = probe
        self.fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.paths = {}        # watch descriptor -> path under root (b"" is root)
        self.dirty = set()     # workspaces changed since their answer
        self.unwatched = set()  # workspaces not fully watched: probed every time
        self.answers = {}      # workspace -> its record (b"": not one of ours)
        self.config = None     # git's global config files, as last seen
        self.reply = None      # the last answer, while no event came since
        # Watches count against the agent's own limit, which its tools (file
        # watchers of dev servers, editors) need too: a quarter at most.
        try:
            with open("/proc/sys/fs/inotify/max_user_watches") as f:
                self.budget = int(f.read()) // 4
        except (OSError, ValueError):
            self.budget = 2048
        self.budget = int(os.environ.get("AGENT_VM_WATCH_BUDGET", self.budget))  # for tests
        os.makedirs(self.root, exist_ok=True)
        self.add_tree(b"")

    def add_tree(self, rel):
        """Watches rel and every directory below it (not .git/objects: new
        objects change nothing a listing shows until a ref does)."""
        stack = [rel]
        while stack:
            rel = stack.pop()
            parts = rel.split(b"/")
            if len(parts) >= 3 and parts[1:3] == [b".git", b"objects"]:
                continue
            if rel and len(self.paths) >= self.budget:
                self.unwatched.add(parts[0])
                continue
            wd = libc.inotify_add_watch(self.fd, os.path.join(self.root, rel) if rel else self.root, MASK)
            if wd < 0:
                err = ctypes.get_errno()
                if err in (errno.ENOENT, errno.ENOTDIR):
                    continue
                if not rel:
                    raise OSError(err, "inotify_add_watch")
                self.unwatched.add(parts[0])  # ENOSPC: out of watches
                continue
            self.paths[wd] = rel
            try:
                with os.scandir(os.path.join(self.root, rel) if rel else self.root) as it:
                    for e in it:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(rel + b"/" + e.name if rel else e.name)
            except OSError:
                pass

    def forget(self, rel):
        for wd, p in list(self.paths.items()):
            if p == rel or p.startswith(rel + b"/"):
                libc.inotify_rm_watch(self.fd, wd)
                del self.paths[wd]

    def drain(self):
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return
            off = 0
            while off + EVENT.size <= len(data):
                wd, mask, _cookie, size = EVENT.unpack_from(data, off)
                name = data[off + EVENT.size:off + EVENT.size + size].rstrip(b"\0")
                off += EVENT.size + size
                self.event(wd, mask, name)

    def event(self, wd, mask, name):
        self.reply = None
        if mask & IN_Q_OVERFLOW:
            # Events were lost: everything may have changed, and directories
            # made meanwhile are not watched yet.
            self.dirty.update(self.answers)
            self.add_tree(b"")
            return
        rel = self.paths.get(wd)
        if rel is None:
            return
        if mask & IN_IGNORED:
            del self.paths[wd]
            if not rel:
                sys.exit("~/workspace went away")  # systemd starts a new watcher
            return
        if not rel and mask & (IN_MOVE_SELF | IN_DELETE_SELF):
            # The watch would follow it elsewhere, the new ~/workspace unwatched.
            sys.exit("~/workspace was moved or removed")  # systemd starts a new watcher
        if not rel:
            ws, path = name, name  # an entry of ~/workspace: a workspace
        else:
            ws, path = rel.split(b"/", 1)[0], rel + b"/" + name
        if not ws:
            return
        self.dirty.add(ws)
        if mask & IN_ISDIR and name:
            if mask & (IN_MOVED_FROM | IN_DELETE):
                self.forget(path)
            if mask & (IN_CREATE | IN_MOVED_TO):
                self.add_tree(path)
                # What was made in it before its watch existed: the probe,
                # which runs after this, sees it.
                self.dirty.add(ws)

    def git_config(self):
        """Git's global and system config as stat results: a change there
        can change every workspace's answer."""
        seen = []
        paths = [os.path.join(self.home, b".gitconfig"), b"/etc/gitconfig"]
        conf = os.path.join(self.home, b".config/git")
        try:
            paths += [os.path.join(conf, n) for n in sorted(os.listdir(conf))]
            paths.append(conf)
        except OSError:
            pass
        for p in paths:
            try:
                st = os.lstat(p)
                seen.append((p, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
            except OSError:
                seen.append((p, None))
        return seen

    def listing(self):
        """The escaped answer for every workspace."""
        self.drain()
        config = self.git_config()
        if config != self.config:
            self.config = config
            self.dirty.update(self.answers)
            self.reply = None
        if self.reply is not None and not self.unwatched:
            return self.reply
        try:
            names = sorted(e.name for e in os.scandir(self.root)
                           if e.is_dir(follow_symlinks=False) and os.path.isdir(os.path.join(e.path, b".git")))
        except OSError:
            names = []
        for gone in set(self.answers) - set(names):
            del self.answers[gone]
        out = []
        for n in names:
            if n in self.dirty or n in self.unwatched or n not in self.answers:
                # Clean before the probe: a change while it runs is seen next time.
                self.dirty.discard(n)
                self.answers[n] = self.run_probe(b"workspace/" + n)
            out.append(self.answers[n])
        # Kept only if nothing happened while the probes ran.
        self.drain()
        reply = escape(b"".join(out))
        if not self.dirty:
            self.reply = reply
        return reply

    def run_probe(self, d):
        try:
            r = subprocess.run(["sh", self.probe, d], cwd=self.home, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=300)
            return r.stdout
        except (OSError, subprocess.SubprocessError):
            return b""


def escape(data):
    """For bash's `printf %b`: backslashes doubled, NULs as \\0000 (an octal
    escape of three digits, so a digit after it stays a digit)."""
    return data.replace(b"\\", b"\\\\").replace(b"\0", b"\\0000")


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: workspace-watch.py PROBE_SCRIPT")
    probe = sys.argv[1]
    with open(probe, "rb") as f:
        token = hashlib.sha1(f.read()).hexdigest()[:16]
    home = os.fsencode(os.path.expanduser("~"))
    os.chdir(home)
    try:
        w = Watcher(home, probe)
    except OSError as e:
        # ~/workspace is not a directory it can watch (the agent made it
        # something else): status lists by itself; try again later, not in
        # a tight loop of restarts.
        print(f"workspace-watch: {e}", file=sys.stderr)
        time.sleep(60)
        sys.exit(1)
    w.listing()  # the first answers, before anyone asks
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    port = server.getsockname()[1]
    state = os.path.join(home, b".agent-vm")
    os.makedirs(state, exist_ok=True)
    tmp = os.path.join(state, b"watch.port.%d" % os.getpid())
    with open(tmp, "w") as f:
        f.write(f"{port} {token}\n")
    os.replace(tmp, os.path.join(state, b"watch.port"))
    while True:
        ready, _, _ = select.select([w.fd, server], [], [])
        if w.fd in ready:
            w.drain()
        if server in ready:
            conn, _ = server.accept()
            with conn:
                serve(conn, w, token)


def serve(conn, w, token):
    deadline = time.monotonic() + 5  # for the whole question: one client holds no one up
    try:
        line = b""
        while not line.endswith(b"\n") and len(line) < 256:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            conn.settimeout(left)
            chunk = conn.recv(256)
            if not chunk:
                return
            line += chunk
        if line.split() != [b"list", token.encode()]:
            return  # another version's client: it lists by itself
        conn.settimeout(60)
        conn.sendall(w.listing() + END)
    except OSError:
        pass


if __name__ == "__main__":
    main()

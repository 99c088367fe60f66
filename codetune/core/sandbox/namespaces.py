"""Root's confinement: the launcher enters new mount, PID and network namespaces, with every file system read-only
and a private /tmp, before it starts the program as a user id of its own."""

from __future__ import annotations

import ctypes
import os
import sys

CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18


class Refused(OSError):
    """The kernel refused new namespaces (a container's root without CAP_SYS_ADMIN): nothing has changed."""


def enter(libc) -> str:
    """New mount, PID and network namespaces with tmpfs over the world-writable directories; returns the program's
    directory, inside the new /tmp. The program's first process, forked next, is PID 1 of the new PID namespace."""
    if libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET) != 0:
        raise Refused(ctypes.get_errno(), f"unshare: {os.strerror(ctypes.get_errno())}")
    check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
    _read_only_filesystems(libc)
    for directory in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(directory):
            check(libc.mount(b"tmpfs", directory.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=64m"), directory)
    _expose_interpreter(libc)
    workdir = "/tmp/program"
    os.mkdir(workdir, 0o700)
    return workdir


def check(result: int, what: str) -> None:
    if result != 0:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")


def _read_only_filesystems(libc) -> None:
    """Every file system read-only in this mount namespace (a world-writable directory anywhere stays unchanged),
    but the kernel's own (/proc, /sys, /dev)."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].replace("\\040", " ") for line in f]
    for point in points:
        if point.startswith(("/proc", "/sys", "/dev")):
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
        if libc.mount(None, point.encode(), None, flags, None) != 0 and point == "/":
            check(-1, "remount / read-only")


def _expose_interpreter(libc) -> None:
    """Make the interpreter reachable for the program's user id where a directory above it is closed to others
    (pyenv under /root): that directory becomes an empty tmpfs holding only the path down to the interpreter, which
    also hides the rest of it (~/.aws, ~/.cache/huggingface) from the program."""
    prefix = os.path.realpath(sys.base_prefix)
    parts = prefix.strip("/").split("/")
    closed = next(
        ("/" + "/".join(parts[:i]) for i in range(1, len(parts)) if not os.stat("/" + "/".join(parts[:i])).st_mode & 1),
        None,
    )
    if closed is None:
        return
    stash = "/tmp/.interpreter"
    os.mkdir(stash)
    check(libc.mount(prefix.encode(), stash.encode(), None, MS_BIND | MS_REC, None), f"bind {prefix}")
    check(libc.mount(b"tmpfs", closed.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=755,size=1m"), closed)
    os.makedirs(prefix, 0o755)
    check(libc.mount(stash.encode(), prefix.encode(), None, MS_BIND | MS_REC, None), f"bind back {prefix}")

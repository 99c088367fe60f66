"""Landlock (Linux 5.13+): the kernel limits which files a process and its descendants may read, write or run,
and (ABI 4, 6) its TCP ports and the signals it may send. Any user may confine itself; nothing lifts it afterwards."""

from __future__ import annotations

import ctypes
import os

# New system calls have the same number on every architecture.
CREATE_RULESET, ADD_RULE, RESTRICT_SELF = 444, 445, 446
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH = 1

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
MAKE_CHAR, MAKE_BLOCK, TRUNCATE, IOCTL_DEV = 1 << 6, 1 << 11, 1 << 14, 1 << 15
# Every file system right each ABI knows: 13 in ABI 1, then REFER (2), TRUNCATE (3), IOCTL_DEV (5).
FS_RIGHTS = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
"""The rights a rule on a file (not a directory) may carry."""
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1

READ = EXECUTE | READ_FILE | READ_DIR
WRITE = (1 << 16) - 1 & ~(MAKE_CHAR | MAKE_BLOCK | IOCTL_DEV)
"""Everything in its own directory but creating device nodes or driving devices."""


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]  # fmt: skip


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def abi(libc) -> int:
    """The Landlock ABI this kernel offers; 0 where it has none, or a seccomp profile (a container's) refuses it."""
    return max(libc.syscall(ctypes.c_long(CREATE_RULESET), None, ctypes.c_size_t(0), ctypes.c_uint32(1)), 0)


def restrict(libc, readable: list[str], writable: list[str]) -> None:
    """From now on this process and its descendants may read and run files only under readable, and change files
    only under writable; with ABI 4 they may bind or connect no TCP port, with ABI 6 signal no process outside their
    own domain. Paths that do not exist are skipped. Needs no_new_privs (prctl) set first."""
    version = abi(libc)
    if version < 1:
        raise OSError("Landlock is not available")
    handled = FS_RIGHTS[min(version, 5)]
    attr = _RulesetAttr(
        handled,
        NET_BIND_TCP | NET_CONNECT_TCP if version >= 4 else 0,
        SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if version >= 6 else 0,
    )
    ruleset = _syscall(libc, "landlock_create_ruleset", CREATE_RULESET, ctypes.byref(attr), ctypes.sizeof(attr), 0)
    try:
        for paths, rights in ((readable, READ), (writable, READ | WRITE)):
            for path in paths:
                try:
                    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue
                try:
                    allowed = rights if os.path.isdir(path) else rights & FILE_RIGHTS
                    rule = _PathBeneath(allowed & handled, fd)
                    _syscall(libc, f"landlock_add_rule {path}", ADD_RULE, ruleset, RULE_PATH_BENEATH,
                             ctypes.byref(rule), 0)  # fmt: skip
                finally:
                    os.close(fd)
        _syscall(libc, "landlock_restrict_self", RESTRICT_SELF, ruleset, 0)
    finally:
        os.close(ruleset)


def _syscall(libc, what: str, number: int, *args) -> int:
    as_c = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    result = libc.syscall(ctypes.c_long(number), *as_c)
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")
    return result

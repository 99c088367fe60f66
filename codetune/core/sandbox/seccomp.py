"""A seccomp filter, built with libseccomp: the system calls a program may not make, whatever its user id may do.

Landlock decides which files a program touches; this filter closes what Landlock does not see: sockets, other
processes (signals, ptrace, their limits and priorities), file metadata (mode, owner, times, truncation by path),
namespaces and mounts, and kernel interfaces a test never needs (io_uring, BPF, perf, keyrings). A refused call
fails with EPERM, so a program that tries one gets an ordinary Python error.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno

ALLOW = 0x7FFF0000
REFUSE = 0x00050000 | errno.EPERM  # SCMP_ACT_ERRNO(EPERM)
# clone3 passes its flags in a struct a filter cannot read: ENOSYS makes the C library fall back to clone.
UNSUPPORTED = 0x00050000 | errno.ENOSYS
NOT_EQUAL, MASKED_EQUAL = 1, 7  # enum scmp_compare

REFUSED = (
    "socket",  # socketpair (multiprocessing's pipes) stays
    # other processes
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_send_signal", "pidfd_getfd",
    "process_madvise", "process_mrelease", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo",
    "ioprio_set", "migrate_pages", "move_pages",
    # metadata of files that Landlock (which governs opening, creating and removing them) leaves alone
    "chmod", "fchmodat", "chown", "lchown", "fchownat", "setxattr", "lsetxattr", "removexattr",
    "lremovexattr", "utime", "utimes", "futimesat", "utimensat", "truncate",
    # namespaces and mounts
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr",
    # kernel interfaces no test needs
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "keyctl", "add_key", "request_key",
)  # fmt: skip
# Newer than libseccomp 2.5 knows; numbers above 423 are the same on every architecture.
REFUSED_BY_NUMBER = {"fchmodat2": 452}
# Calls that name a process: allowed on the caller itself (0), refused on any other. Argument index of the target.
ONLY_ON_ITSELF = {
    "kill": 0,  # kill(0, sig) reaches the program's own process group
    "prlimit64": 0,
    "setpriority": 1,
    "sched_setaffinity": 0,
    "sched_setscheduler": 0,
    "sched_setparam": 0,
    "sched_setattr": 0,
}
PRIO_PROCESS = 0
NEW_NAMESPACES = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
"""CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET."""


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]  # fmt: skip


def library():
    """libseccomp, or None where it is not installed (it is wherever apt or systemd is)."""
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_ArgCmp)
    ]  # fmt: skip
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def load(lib) -> None:
    """Install the filter on this process; its children and whatever it executes inherit it."""
    ctx = lib.seccomp_init(ALLOW)
    if not ctx:
        raise OSError("seccomp_init failed")
    try:

        def rule(action: int, name: str, *conditions: tuple[int, int, int, int], number: int | None = None) -> None:
            syscall = lib.seccomp_syscall_resolve_name(name.encode()) if number is None else number
            if syscall < 0:
                return  # not a system call on this architecture
            array = (_ArgCmp * len(conditions))(*[_ArgCmp(*c) for c in conditions]) if conditions else None
            result = lib.seccomp_rule_add_array(ctx, action, syscall, len(conditions), array)
            if result < 0:
                raise OSError(-result, f"seccomp rule for {name}")

        for name in REFUSED:
            rule(REFUSE, name)
        for name, number in REFUSED_BY_NUMBER.items():
            rule(REFUSE, name, number=number)
        for name, target in ONLY_ON_ITSELF.items():
            rule(REFUSE, name, (target, NOT_EQUAL, 0, 0))
        rule(REFUSE, "setpriority", (0, NOT_EQUAL, PRIO_PROCESS, 0))  # a process group's or the whole user's
        for flag in NEW_NAMESPACES:
            rule(REFUSE, "clone", (0, MASKED_EQUAL, flag, flag))
        rule(UNSUPPORTED, "clone3")
        result = lib.seccomp_load(ctx)
        if result < 0:
            raise OSError(-result, "seccomp_load")
    finally:
        lib.seccomp_release(ctx)

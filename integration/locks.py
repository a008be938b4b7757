"""fcntl and flock locks between two mounts of one volume: python3 locks.py PATH_A PATH_B.

A helper process holds locks through mount A on command; this process tries through mount
B (locks of one process never conflict with each other, so the two sides are processes).
Other lock tests import the helpers (`Holder`, `getlk`, `check`, `interrupted_lockf`).
"""
import fcntl
import os
import signal
import struct
import sys
import time
from multiprocessing import Process, Queue

# struct flock on x86_64: l_type, l_whence (short), l_start, l_len (off_t), l_pid (pid_t)
FLOCK = "hhqqi4x"


def getlk(fd, typ, start, length):
    r = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack(FLOCK, typ, 0, start, length, 0))
    t, _, s, l, pid = struct.unpack(FLOCK, r)
    return t, s, l, pid


def holder(path, q_cmd, q_out):
    fd = os.open(path, os.O_RDWR)
    while True:
        op, *args = q_cmd.get()
        if op == "exit":
            return
        try:
            if op == "lock":
                fcntl.lockf(fd, *args)
            elif op == "flock":
                fcntl.flock(fd, *args)
            q_out.put(("ok", os.getpid()))
        except OSError as e:
            q_out.put(("err", e.errno))


def check(cond, what):
    if not cond:
        print("FAIL:", what, file=sys.stderr)
        sys.exit(1)


class Alarm(Exception):
    """What the SIGALRM handler of `interrupted_lockf` raises."""


def interrupted_lockf(fd, what):
    """A blocking F_SETLKW on `fd` that another process's lock holds up, ended after 1 s by
    a signal whose handler raises: fails the test with `what` if the lock is granted."""

    def on_alarm(*_):
        raise Alarm()

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(1)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        check(False, what)
    except Alarm:
        pass


class Holder:
    """A process of its own holding locks on `path` on command: h("lock", fcntl.LOCK_EX,
    0, 0) or h("flock", fcntl.LOCK_UN) answers ("ok", its pid) or ("err", errno)."""

    def __init__(self, path):
        self.q_cmd, self.q_out = Queue(), Queue()
        # A daemon process: a failed check exits without waiting for it.
        self.p = Process(target=holder, args=(path, self.q_cmd, self.q_out), daemon=True)
        self.p.start()

    def __call__(self, *cmd):
        self.q_cmd.put(cmd)
        return self.q_out.get(timeout=30)

    def exit(self):
        self.q_cmd.put(("exit",))
        self.p.join()


def main():
    A, B = sys.argv[1], sys.argv[2]
    a = Holder(A)

    fd = os.open(B, os.O_RDWR)
    # Byte ranges: A holds [0, 10); [10, 20) is free; [5, 15) conflicts.
    st, apid = a("lock", fcntl.LOCK_EX, 10, 0)
    check(st == "ok", "A locks bytes 0-9")
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 10)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 5)
        check(False, "B locked [5, 15) over A's lock")
    except OSError:
        pass
    t, s, l, pid = getlk(fd, fcntl.F_WRLCK, 0, 1)
    check(t == fcntl.F_WRLCK and s == 0 and l == 10 and pid == apid,
          f"F_GETLK on B names A's lock: {(t, s, l, pid)}, A is pid {apid}")
    fcntl.lockf(fd, fcntl.LOCK_UN, 10, 10)

    # A blocking F_SETLKW on B is woken when A unlocks.
    st, _ = a("lock", fcntl.LOCK_EX, 0, 0)
    check(st == "ok", "A locks the whole file")
    t0 = time.time()
    child = os.fork()
    if child == 0:
        f2 = os.open(B, os.O_RDWR)
        fcntl.lockf(f2, fcntl.LOCK_EX)
        os._exit(0)
    time.sleep(1.0)
    check(os.waitpid(child, os.WNOHANG) == (0, 0), "B's F_SETLKW returned while A held the lock")
    t_unlock = time.time()
    a("lock", fcntl.LOCK_UN, 0, 0)
    deadline = time.time() + 10
    while True:
        pid, status = os.waitpid(child, os.WNOHANG)
        if pid:
            check(os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"waiter status {status}")
            break
        check(time.time() < deadline, "B's F_SETLKW was not woken within 10 s of A's unlock")
        time.sleep(0.005)
    print(f"  F_SETLKW on B woken {time.time() - t_unlock:.3f} s after A's unlock")

    # A waiter interrupted by a signal gets EINTR instead of waiting on.
    st, _ = a("lock", fcntl.LOCK_EX, 0, 0)
    check(st == "ok", "A locks again")

    t1 = time.time()
    interrupted_lockf(fd, "B got the lock A holds")
    check(time.time() - t1 < 10, "the interrupted wait took over 10 s")
    a("lock", fcntl.LOCK_UN, 0, 0)

    # flock: exclusive across mounts; shared locks coexist; no upgrade past a sharer.
    st, _ = a("flock", fcntl.LOCK_EX)
    check(st == "ok", "A flock exclusive")
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        check(False, "B flock shared while A holds it exclusively")
    except OSError:
        pass
    a("flock", fcntl.LOCK_UN)
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    st, _ = a("flock", fcntl.LOCK_SH | fcntl.LOCK_NB)
    check(st == "ok", "shared flock on both mounts")
    st, _ = a("flock", fcntl.LOCK_EX | fcntl.LOCK_NB)
    check(st == "err", "A upgraded to exclusive while B shares")
    fcntl.flock(fd, fcntl.LOCK_UN)
    a("flock", fcntl.LOCK_UN)
    # Closing B's descriptor drops its POSIX locks: A can then lock everything.
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 5, 100)
    os.close(fd)
    st, _ = a("lock", fcntl.LOCK_EX | fcntl.LOCK_NB, 0, 0)
    check(st == "ok", "A locks after B closed its descriptor")
    a("lock", fcntl.LOCK_UN, 0, 0)

    # A lock taken anew through another descriptor outlives the last close of the first
    # one by a child that inherited it (the handle's release must not drop it again).
    fd1 = os.open(B, os.O_RDWR)
    fcntl.lockf(fd1, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(w)
        os.read(r, 1)  # keeps fd1 open until told
        os._exit(0)
    os.close(r)
    os.close(fd1)  # drops this process's lock; the child still has the file open
    fd2 = os.open(B, os.O_RDWR)
    fcntl.lockf(fd2, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
    os.close(w)  # the child exits: the last close of fd1's file
    os.waitpid(child, 0)
    time.sleep(0.5)
    st, _ = a("lock", fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
    check(st == "err", "A locked what B holds through its second descriptor")
    os.close(fd2)
    a.exit()


if __name__ == "__main__":
    main()

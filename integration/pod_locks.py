"""Blocking locks from processes the daemon cannot see: python3 pod_locks.py FILE.

Run with the mount's daemon in a PID namespace of its own (t_pod_locks.sh), as a node
daemon runs in a pod of its own under Kubernetes: every request of these processes reaches
the daemon with pid 0. A blocking lock must wait until granted, end with EINTR only when
the waiting task gets a signal, and leave no lock behind when it does.
"""
import fcntl
import os
import signal
import subprocess
import sys
import threading
import time

from locks import Holder, check, getlk, interrupted_lockf

PATH = sys.argv[1]


def waiter(lock):
    """A process of its own blocking in `lock(fd)`: its pid. It exits 0 once granted, or
    1 with the error on stderr."""
    pid = os.fork()
    if pid == 0:
        fd = os.open(PATH, os.O_RDWR)
        try:
            lock(fd)
            os._exit(0)
        except OSError as e:
            print(f"waiter: {e}", file=sys.stderr)
            os._exit(1)
    return pid


def still_waiting(pid, what):
    # The fix cannot make a waiter return early however long this is; on a daemon that
    # ends waits at once the waiter has long returned.
    time.sleep(1.0)
    got, status = os.waitpid(pid, os.WNOHANG)
    check(got == 0, f"{what} returned while the lock was held "
          f"({'failed' if status else 'granted'})")


def granted(pid, what):
    _, status = os.waitpid(pid, 0)
    check(os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0,
          f"{what} failed after the holder released")


def free_for_others():
    """Whether a new process gets an exclusive lock (fcntl and flock) at once."""
    r = subprocess.run(["flock", "-n", "-x", PATH, "python3", "-c",
                        f"import fcntl, os; fcntl.lockf(os.open({PATH!r}, os.O_RDWR), "
                        "fcntl.LOCK_EX | fcntl.LOCK_NB)"])
    return r.returncode == 0


def main():
    h = Holder(PATH)
    fd = os.open(PATH, os.O_RDWR)

    # The setup: the holder's pid is not one the daemon can see. The kernel reports a lock
    # pid the daemon could not name as 0.
    st, hpid = h("lock", fcntl.LOCK_EX, 0, 0)
    check(st == "ok", "the holder locks the file")
    t, _, _, pid = getlk(fd, fcntl.F_WRLCK, 0, 0)
    check(t == fcntl.F_WRLCK and pid == 0,
          f"F_GETLK finds the holder's lock with pid 0 (the daemon sees no pid): "
          f"type {t}, pid {pid}, holder {hpid}; is the daemon in a PID namespace of its own?")

    print("  F_SETLKW waits until the holder unlocks, then gets the lock")
    w = waiter(lambda f: fcntl.lockf(f, fcntl.LOCK_EX))
    still_waiting(w, "F_SETLKW")
    h("lock", fcntl.LOCK_UN, 0, 0)
    granted(w, "F_SETLKW")

    print("  flock -x waits until the holder unlocks, then gets the lock")
    st, _ = h("flock", fcntl.LOCK_EX)
    check(st == "ok", "the holder flocks the file")
    fl = subprocess.Popen(["flock", "-x", PATH, "true"])
    still_waiting_popen(fl, "flock -x")
    h("flock", fcntl.LOCK_UN)
    check(fl.wait(timeout=30) == 0, "flock -x failed after the holder released")

    print("  a signal handler that raises ends F_SETLKW with EINTR; no lock is left")
    st, _ = h("lock", fcntl.LOCK_EX, 0, 0)
    check(st == "ok", "the holder locks again")

    try:
        interrupted_lockf(fd, "F_SETLKW got the lock the holder holds")
    except OSError as e:
        check(False, f"F_SETLKW failed without a signal: {e}")
    t, _, _, _ = getlk(fd, fcntl.F_WRLCK, 0, 0)
    check(t == fcntl.F_WRLCK, "the holder's lock is still there after the interrupted wait")
    h("lock", fcntl.LOCK_UN, 0, 0)
    # Were the interrupted wait still asking, it would take the lock now.
    time.sleep(0.3)
    check(free_for_others(), "a new process cannot lock after the holder released: the "
          "interrupted wait took the lock")

    print("  a signal with SA_RESTART: the wait goes on and gets the lock")
    st, _ = h("lock", fcntl.LOCK_EX, 0, 0)
    check(st == "ok", "the holder locks again")
    calls = []
    signal.signal(signal.SIGALRM, lambda *_: calls.append(1))
    signal.siginterrupt(signal.SIGALRM, False)
    main_thread = threading.get_ident()

    def signal_then_unlock():
        time.sleep(1.0)
        signal.pthread_kill(main_thread, signal.SIGALRM)
        # Unlock once the signal has come and gone: the restarted wait must be granted.
        time.sleep(1.0)
        h("lock", fcntl.LOCK_UN, 0, 0)

    t = threading.Thread(target=signal_then_unlock)
    t.start()
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
    except OSError as e:
        check(False, f"F_SETLKW with an SA_RESTART signal failed: {e}")
    t.join()
    check(calls, "the signal was not delivered during the wait")
    fcntl.lockf(fd, fcntl.LOCK_UN)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)

    print("  flock -x killed by SIGINT while waiting; no lock is left")
    st, _ = h("flock", fcntl.LOCK_EX)
    check(st == "ok", "the holder flocks again")
    r = subprocess.run(["timeout", "-s", "INT", "1", "flock", "-x", PATH, "true"])
    check(r.returncode == 124, f"flock -x under timeout ended with {r.returncode}, not "
          "124 (killed while waiting)")
    h("flock", fcntl.LOCK_UN)
    time.sleep(0.3)
    check(free_for_others(), "a new process cannot lock after the holder released: the "
          "killed waiter took the lock")
    h.exit()


def still_waiting_popen(p, what):
    time.sleep(1.0)
    check(p.poll() is None, f"{what} returned while the lock was held (exit status {p.returncode})")


if __name__ == "__main__":
    main()

"""Lock holder and lock prober for t_redis.sh.

  hold.py LOCKED HELD READY   take an fcntl write lock and a shared flock on LOCKED, keep HELD
                              open, touch READY, then sleep (until killed)
  hold.py --try PATH          exit 0 when an fcntl write lock and an exclusive flock on PATH
                              are both had at once without waiting, 1 otherwise
"""
import fcntl
import os
import sys
import time

if sys.argv[1] == "--try":
    fd = os.open(sys.argv[2], os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(os.open(sys.argv[2], os.O_RDONLY), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        sys.exit(1)
    sys.exit(0)

locked, held, ready = sys.argv[1:4]
fd = os.open(locked, os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX)
fl = os.open(locked, os.O_RDONLY)
fcntl.flock(fl, fcntl.LOCK_SH)
h = os.open(held, os.O_RDONLY)
open(ready, "w").close()
time.sleep(600)

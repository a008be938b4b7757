#!/usr/bin/env python3
"""A writer that remembers what the filesystem acknowledged, and a checker.

    ack_workload.py run DIR TAG STOPFILE LOG PHASE_FILE   until STOPFILE exists: append a line to
        DIR/TAG-log (open, write, close: one slice each, so the chunk is compacted again and
        again), write whole files (fsync, close), rename, mkdir and unlink them, then fsync
        the directory. Each change whose close or fsync returned is written to LOG (JSON
        lines); an error too, with the test's phase (the content of PHASE_FILE), and the
        writer goes on.
    ack_workload.py check DIR PHASES LOG...    every acknowledged byte reads back, every
        acknowledged name is where it was left, and no call failed outside the PHASES
        (comma-separated) in which failures are allowed; exit 1 with what differs.
"""
import hashlib
import json
import os
import sys


def fsync_dir(d):
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run(d, tag, stop, log, phase_file=None):
    """Until STOP exists. An error is logged with the test's phase then (PHASE_FILE) and the
    step is not acknowledged; the checker decides which phases may fail."""
    out = open(log, "w", buffering=1)
    app = os.path.join(d, f"{tag}-log")
    n = 0
    errors = 0

    def phase():
        try:
            return open(phase_file).read().strip() if phase_file else ""
        except OSError:
            return ""

    while not os.path.exists(stop):
        try:
            line = f"{tag} line {n} " + "x" * (n % 97) + "\n"
            with open(app, "a") as f:
                f.write(line)
            out.write(json.dumps({"append": app, "line": line}) + "\n")
            if n % 5 == 0:
                name = os.path.join(d, f"{tag}-f{n}")
                data = os.urandom(4096 + (n * 7919) % 300_000)
                with open(name, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                moved = os.path.join(d, f"{tag}-g{n}")
                os.rename(name, moved)
                out.write(json.dumps({"maybe": moved}) + "\n")
                sub = os.path.join(d, f"{tag}-d{n}")
                os.mkdir(sub)
                out.write(json.dumps({"maybe": sub}) + "\n")
                if n >= 25:
                    for old in (os.path.join(d, f"{tag}-g{n - 25}"), os.path.join(d, f"{tag}-d{n - 25}")):
                        if os.path.isdir(old):
                            os.rmdir(old)
                        elif os.path.lexists(old):
                            os.unlink(old)
                        out.write(json.dumps({"maybe": old}) + "\n")
                # Names are durable once their directory is fsynced.
                fsync_dir(d)
                out.write(json.dumps({"file": moved, "sha": hashlib.sha256(data).hexdigest()}) + "\n")
                out.write(json.dumps({"dir": sub}) + "\n")
                if n >= 25:
                    out.write(json.dumps({"gone": os.path.join(d, f"{tag}-g{n - 25}")}) + "\n")
                    out.write(json.dumps({"gone": os.path.join(d, f"{tag}-d{n - 25}")}) + "\n")
        except OSError as e:
            errors += 1
            out.write(json.dumps({"error": f"{type(e).__name__}: {e}", "at": n, "phase": phase()}) + "\n")
            if errors > 1000:
                break
        n += 1
    print(f"{tag}: {n} steps, {errors} errors")


def check(d, logs, allowed_phases):
    bad = []
    steps = 0
    for log in logs:
        appended = {}
        files, gone, dirs, maybe = {}, set(), set(), set()
        for l in open(log):
            r = json.loads(l)
            steps += 1
            if "error" in r:
                if r.get("phase") not in allowed_phases:
                    bad.append(f"{log}: {r['error']} (phase {r.get('phase')!r})")
            elif "append" in r:
                appended.setdefault(r["append"], []).append(r["line"])
            elif "file" in r:
                files[r["file"]] = r["sha"]
                maybe.discard(r["file"])
            elif "dir" in r:
                dirs.add(r["dir"])
                maybe.discard(r["dir"])
            elif "gone" in r:
                gone.add(r["gone"])
                maybe.discard(r["gone"])
            elif "maybe" in r:
                maybe.add(r["maybe"])
        rebase = lambda p: os.path.join(d, os.path.basename(p))
        for path, lines in appended.items():
            try:
                got = open(rebase(path)).read().splitlines(keepends=True)
            except OSError as e:
                bad.append(f"{path}: {e}")
                continue
            # Every acknowledged line, in order (a line whose close failed may be there too).
            acked = set(lines)
            if [l for l in got if l in acked] != lines:
                bad.append(f"{path}: {len(got)} lines, {len(lines)} acknowledged, not all there in order")
        for path, sha in files.items():
            if path in maybe:
                continue
            if path in gone:
                if os.path.exists(rebase(path)):
                    bad.append(f"{path}: unlinked but still there")
                continue
            try:
                got = hashlib.sha256(open(rebase(path), "rb").read()).hexdigest()
            except OSError as e:
                bad.append(f"{path}: {e}")
                continue
            if got != sha:
                bad.append(f"{path}: content differs")
        for path in dirs:
            if path in maybe:
                continue
            if (path in gone) == os.path.isdir(rebase(path)):
                bad.append(f"{path}: directory {'still there' if path in gone else 'missing'}")
    for b in bad[:20]:
        print("  " + b, file=sys.stderr)
    if bad:
        sys.exit(1)
    print(f"  {steps} acknowledged changes read back")


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(*sys.argv[2:7])
    else:
        # check DIR ALLOWED_PHASES LOG...: errors are allowed in the phases listed (a,b,c).
        check(sys.argv[2], sys.argv[4:], set(filter(None, sys.argv[3].split(","))))

/* POSIX locks and descriptors shared through clone(CLONE_FILES): clonefiles FILE.
 *
 * Parent and child of clone(CLONE_FILES) share one descriptor table, so one lock owner:
 * close(2) of any descriptor of the file by either of them drops the POSIX locks that
 * owner holds on the file. Each case takes a lock, lets the child close a descriptor and
 * then asks, from a process of its own (another lock owner), what F_GETLK finds.
 * Prints one line per case; exits 1 if any case finds the lock still held.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *path;
static int lock_fd;          /* the descriptor the lock is taken through */
static int close_which;      /* what the child closes: 0 lock_fd, 1 a new read-only one,
                                2 a new read-write one */
static int child_locks;      /* the child takes the lock (through the shared lock_fd) */

static void die(const char *what) {
    fprintf(stderr, "clonefiles: %s: %s\n", what, strerror(errno));
    exit(2);
}

static int set_lock(int fd, short type) {
    struct flock fl = {.l_type = type, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0};
    return fcntl(fd, F_SETLK, &fl);
}

/* F_GETLK from a new process (its own descriptor table): the type of the lock found. */
static short probe(void) {
    int pipefd[2];
    if (pipe(pipefd) != 0) die("pipe");
    pid_t pid = fork();
    if (pid < 0) die("fork");
    if (pid == 0) {
        struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0};
        int fd = open(path, O_RDONLY);
        if (fd < 0 || fcntl(fd, F_GETLK, &fl) != 0) _exit(3);
        if (write(pipefd[1], &fl.l_type, sizeof fl.l_type) != sizeof fl.l_type) _exit(3);
        _exit(0);
    }
    short type = -1;
    int status;
    if (read(pipefd[0], &type, sizeof type) != sizeof type) die("probe");
    waitpid(pid, &status, 0);
    close(pipefd[0]);
    close(pipefd[1]);
    return type;
}

static int child(void *arg) {
    (void)arg;
    if (child_locks && set_lock(lock_fd, F_WRLCK) != 0) _exit(4);
    int fd = lock_fd;
    if (close_which == 1) fd = open(path, O_RDONLY);
    if (close_which == 2) fd = open(path, O_RDWR);
    if (fd < 0 || close(fd) != 0) _exit(5);
    _exit(0);
}

static int run(const char *name, int which, int by_child) {
    static char stack[256 * 1024];
    close_which = which;
    child_locks = by_child;
    lock_fd = open(path, O_RDWR);
    if (lock_fd < 0) die("open");
    if (!by_child && set_lock(lock_fd, F_WRLCK) != 0) die("F_SETLK");
    if (!by_child && probe() != F_WRLCK) {
        fprintf(stderr, "clonefiles: %s: another process does not see the lock\n", name);
        exit(2);
    }
    pid_t pid = clone(child, stack + sizeof stack, CLONE_FILES | SIGCHLD, NULL);
    if (pid < 0) die("clone");
    int status;
    if (waitpid(pid, &status, 0) != pid) die("waitpid");
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fprintf(stderr, "clonefiles: %s: child failed (status %d)\n", name, status);
        exit(2);
    }
    short found = probe();
    printf("%s: %s\n", name, found == F_UNLCK ? "released" : "STILL LOCKED");
    /* Start the next case with nothing held: drop what may be left. */
    if (which != 0) {
        set_lock(lock_fd, F_UNLCK);
        close(lock_fd);
    }
    return found == F_UNLCK ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: clonefiles FILE\n");
        return 2;
    }
    path = argv[1];
    int bad = 0;
    bad |= run("child closes the shared descriptor the parent locked through", 0, 0);
    bad |= run("child closes another read-only descriptor of the file", 1, 0);
    bad |= run("child closes another read-write descriptor of the file", 2, 0);
    bad |= run("child locks through the shared descriptor and closes another read-only one", 1, 1);
    return bad;
}

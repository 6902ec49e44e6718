/* runtime_reach: what a process of a container can reach of isobox's own processes that live
 * in (or are born into) its pid namespace (tests/integration/test_security_runtime_procs.py).
 *
 *   runtime_reach reach PID
 *       tries, on PID of this pid namespace: PTRACE_SEIZE, PTRACE_ATTACH, and opening
 *       /proc/PID/{mem,environ}, the directories /proc/PID/{root,cwd,fd} and /proc/PID/fd/0..63.
 *       One line per attempt: "<what> ok" or "<what> errno=N"; fd/N lines only for N that
 *       opened or failed with something else than ENOENT.
 *   runtime_reach hunt SECONDS
 *       new pids in a pid namespace are sequential: spins PTRACE_SEIZE on the next few pids
 *       after the highest seen, for SECONDS. A process attached is stopped at once
 *       (PTRACE_INTERRUPT), so what it is cannot change while it is described:
 *         ATTACHED pid=N exe=<readlink exe> uid=<status Uid> fds=<count> root=<readlink root>
 *       then detached (each pid once). Ends with "hunt attached=N tried=N".
 *   runtime_reach sleep MS
 *       sleeps: a program with an exe of its own (a hook, say).
 *
 * Static (the busybox rootfs has no libc); exit 0 unless the arguments are wrong.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "procpeek.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void result(const char *what, int ok) {
    if (ok) printf("%s ok\n", what);
    else printf("%s errno=%d\n", what, errno);
}

static int reach(int pid) {
    char path[96];
    int fd;
    errno = 0;
    if (ptrace(PTRACE_SEIZE, pid, 0, 0) == 0) {
        result("seize", 1);
        ptrace(PTRACE_INTERRUPT, pid, 0, 0);
        waitpid(pid, NULL, __WALL);
        ptrace(PTRACE_DETACH, pid, 0, 0);
    } else result("seize", 0);
    if (ptrace(PTRACE_ATTACH, pid, 0, 0) == 0) {
        result("attach", 1);
        waitpid(pid, NULL, __WALL);
        ptrace(PTRACE_DETACH, pid, 0, 0);
    } else result("attach", 0);
    const char *files[] = {"mem", "environ"};
    for (int i = 0; i < 2; i++) {
        snprintf(path, sizeof path, "/proc/%d/%s", pid, files[i]);
        fd = open(path, O_RDONLY);
        result(files[i], fd >= 0);
        if (fd >= 0) close(fd);
    }
    const char *dirs[] = {"root", "cwd", "fd"};
    for (int i = 0; i < 3; i++) {
        snprintf(path, sizeof path, "/proc/%d/%s/", pid, dirs[i]);
        fd = open(path, O_RDONLY | O_DIRECTORY);
        result(dirs[i], fd >= 0);
        if (fd >= 0) close(fd);
    }
    for (int n = 0; n < 64; n++) {
        char what[32];
        snprintf(path, sizeof path, "/proc/%d/fd/%d", pid, n);
        fd = open(path, O_RDONLY | O_NONBLOCK);
        if (fd < 0 && errno == ENOENT) continue;
        snprintf(what, sizeof what, "fd/%d", n);
        result(what, fd >= 0);
        if (fd >= 0) close(fd);
    }
    return 0;
}


#define MAX_SEEN 4096

static int hunt(double seconds) {
    static int seen[MAX_SEEN];
    int nseen = 0;
    double until = now() + seconds;
    int self = getpid();
    int base = max_pid();
    long attached = 0, tried = 0;
    while (now() < until) {
        /* the window follows the highest pid seen alive: isobox's helpers live for milliseconds */
        for (int p = base - 1; p <= base + 8; p++) {
            if (p <= 1 || p == self) continue;
            int known = 0;
            for (int i = 0; i < nseen; i++) if (seen[i] == p) { known = 1; break; }
            if (known) { if (p > base) base = p; continue; }
            tried++;
            if (ptrace(PTRACE_SEIZE, p, 0, 0) == 0) {
                int st;
                attached++;
                ptrace(PTRACE_INTERRUPT, p, 0, 0);
                if (waitpid(p, &st, __WALL) == p && !WIFEXITED(st) && !WIFSIGNALED(st)) {
                    describe(p);
                    ptrace(PTRACE_DETACH, p, 0, 0);
                } else {
                    printf("ATTACHED pid=%d exe=gone\n", p);
                }
                if (nseen < MAX_SEEN) seen[nseen++] = p;
            } else if (errno == ESRCH) {
                continue;
            }
            if (p > base) base = p;
        }
    }
    printf("hunt attached=%ld tried=%ld\n", attached, tried);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 3 && !strcmp(argv[1], "reach")) return reach(atoi(argv[2]));
    if (argc == 3 && !strcmp(argv[1], "hunt")) return hunt(atof(argv[2]));
    if (argc == 3 && !strcmp(argv[1], "sleep")) {
        usleep(atoi(argv[2]) * 1000);
        return 0;
    }
    fprintf(stderr, "usage: runtime_reach reach PID | hunt SECONDS | sleep MS\n");
    return 2;
}

/* ptrace_hunt: try to attach to every process that appears in this pid namespace while a
 * trigger makes isoboxd (or the runtime) start helpers here.
 *
 *   ptrace_hunt SECONDS MODE [ARG]
 *     MODE proc    : a child loops mount("proc", "/tmp/hunt-proc") + umount (isoboxd's
 *                    proc mount helper is born in this pid namespace)
 *     MODE sysctl  : a child loops writing ARG (a /proc/sys path) with its current value
 *                    (isoboxd's sysctl write helper is born here)
 *     MODE wait    : no trigger: something outside makes the processes (exec, create)
 *   Env NESTED=1: first unshare a user + mount namespace (root inside, full capabilities
 *   there), as `unshare -U -r -m` would.
 *
 * New pids in a pid namespace are sequential, so the hunter spins PTRACE_SEIZE on the next
 * few pids after the highest it has seen. Every successful attach prints one line
 *   ATTACHED pid=N exe=... uid=a,b,c,d fds=N root=...
 * (then detaches), and at the end "attached=N tried=N triggers=N". Exit 0.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/stat.h>
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

static void write_file(const char *path, const char *data) {
    int fd = open(path, O_WRONLY);
    if (fd >= 0) {
        if (write(fd, data, strlen(data)) < 0) { /* reported by the caller's behaviour */ }
        close(fd);
    }
}


static void trigger(const char *mode, const char *arg, double until, int report_fd) {
    long n = 0;
    if (!strcmp(mode, "proc")) {
        mkdir("/tmp/hunt-proc", 0700);
        while (now() < until) {
            if (mount("proc", "/tmp/hunt-proc", "proc", 0, NULL) == 0) umount2("/tmp/hunt-proc", MNT_DETACH);
            n++;
        }
    } else if (!strcmp(mode, "sysctl")) {
        char val[256] = "";
        int fd = open(arg, O_RDONLY);
        if (fd >= 0) {
            ssize_t r = read(fd, val, sizeof val - 1);
            if (r > 0) val[r] = 0;
            close(fd);
        }
        while (now() < until) {
            write_file(arg, val);
            n++;
        }
    }
    if (write(report_fd, &n, sizeof n) < 0) _exit(1);
    _exit(0);
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: ptrace_hunt SECONDS proc|sysctl|wait [ARG]\n");
        return 2;
    }
    double until = now() + atof(argv[1]);
    const char *mode = argv[2], *arg = argc > 3 ? argv[3] : "";
    if (getenv("NESTED")) {
        uid_t uid = getuid();
        gid_t gid = getgid();
        char map[64];
        if (unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0) {
            printf("unshare failed errno=%d\n", errno);
            return 1;
        }
        write_file("/proc/self/setgroups", "deny");
        snprintf(map, sizeof map, "0 %u 1", uid);
        write_file("/proc/self/uid_map", map);
        snprintf(map, sizeof map, "0 %u 1", gid);
        write_file("/proc/self/gid_map", map);
    }
    int pipefd[2];
    if (pipe(pipefd) != 0) return 1;
    pid_t trig = 0;
    if (strcmp(mode, "wait")) {
        trig = fork();
        if (trig == 0) {
            close(pipefd[0]);
            trigger(mode, arg, until, pipefd[1]);
        }
    }
    close(pipefd[1]);
    pid_t self = getpid();
    int base = max_pid();
    if (trig > base) base = trig;
    long attached = 0, tried = 0;
    while (now() < until) {
        /* the window follows the highest pid seen alive: helpers live for milliseconds */
        for (int p = base - 1; p <= base + 8; p++) {
            if (p <= 1 || p == self || p == trig) continue;
            tried++;
            if (ptrace(PTRACE_SEIZE, p, 0, 0) == 0) {
                attached++;
                describe(p);
                ptrace(PTRACE_DETACH, p, 0, 0);
            } else if (errno == ESRCH) {
                continue;
            }
            if (p > base) base = p;
        }
    }
    long triggers = 0;
    if (trig > 0) {
        if (read(pipefd[0], &triggers, sizeof triggers) != sizeof triggers) triggers = -1;
        waitpid(trig, NULL, 0);
    }
    printf("attached=%ld tried=%ld triggers=%ld\n", attached, tried, triggers);
    return 0;
}

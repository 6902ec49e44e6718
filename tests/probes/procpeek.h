/* procpeek.h: what the ptrace probes report of a process they reached (static functions,
 * included by ptrace_hunt.c and runtime_reach.c). */
#ifndef PROCPEEK_H
#define PROCPEEK_H
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

/* the highest pid of this pid namespace */
static int max_pid(void) {
    int top = 1;
    DIR *d = opendir("/proc");
    struct dirent *e;
    if (!d) return top;
    while ((e = readdir(d))) {
        int p = atoi(e->d_name);
        if (p > top) top = p;
    }
    closedir(d);
    return top;
}

/* one line: ATTACHED pid=N exe=... uid=a,b,c,d fds=N root=... */
static void describe(int pid) {
    char path[64], buf[160], exe[256] = "?", root[256] = "?", uid[160] = "?";
    int fds = 0;
    ssize_t n;
    snprintf(path, sizeof path, "/proc/%d/exe", pid);
    if ((n = readlink(path, exe, sizeof exe - 1)) >= 0) exe[n] = 0;
    snprintf(path, sizeof path, "/proc/%d/root", pid);
    if ((n = readlink(path, root, sizeof root - 1)) >= 0) root[n] = 0;
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    FILE *f = fopen(path, "r");
    if (f) {
        while (fgets(buf, sizeof buf, f))
            if (!strncmp(buf, "Uid:", 4)) {
                buf[strcspn(buf, "\n")] = 0;
                for (char *c = buf; *c; c++) if (*c == '\t') *c = ',';
                snprintf(uid, sizeof uid, "%s", buf + 5);
            }
        fclose(f);
    }
    snprintf(path, sizeof path, "/proc/%d/fd", pid);
    DIR *d = opendir(path);
    if (d) {
        struct dirent *e;
        while ((e = readdir(d))) if (e->d_name[0] != '.') fds++;
        closedir(d);
    } else fds = -errno;
    printf("ATTACHED pid=%d exe=%s uid=%s fds=%d root=%s\n", pid, exe, uid, fds, root);
    fflush(stdout);
}
#endif

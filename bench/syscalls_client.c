/* Round trip of one syscall, N times after a warm-up; prints the median and p99 in ns.
 * usage: syscalls_client KIND N   KIND: refused-mount | bind-mount | sysinfo | getppid */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysinfo.h>
#include <time.h>
#include <unistd.h>

static long long now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static int cmp(const void *a, const void *b) {
    long long x = *(const long long *)a, y = *(const long long *)b;
    return x < y ? -1 : x > y;
}

static int one(const char *kind) {
    if (!strcmp(kind, "refused-mount"))        /* a host filesystem: isoboxd says EPERM */
        return mount("/dev/null", "/mnt", "ext4", 0, NULL) == 0 ? 0 : errno;
    if (!strcmp(kind, "bind-mount")) {         /* a bind inside the container: allowed */
        if (mount("/tmp/a", "/tmp/b", NULL, MS_BIND, NULL) != 0) return errno;
        return umount2("/tmp/b", 0) == 0 ? 0 : errno;
    }
    if (!strcmp(kind, "sysinfo")) {
        struct sysinfo si;
        return sysinfo(&si) == 0 ? 0 : errno;
    }
    syscall(SYS_getppid);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    const char *kind = argv[1];
    int n = atoi(argv[2]);
    mkdir("/mnt", 0755);
    mkdir("/tmp/a", 0755);
    mkdir("/tmp/b", 0755);
    long long *t = calloc(n, sizeof *t);
    int first = -1;
    for (int i = 0; i < n / 10 + 10; i++) one(kind);     /* warm-up */
    for (int i = 0; i < n; i++) {
        long long s = now();
        int e = one(kind);
        t[i] = now() - s;
        if (first < 0) first = e;
    }
    qsort(t, n, sizeof *t, cmp);
    printf("%s median_ns=%lld p99_ns=%lld errno=%d\n", kind, t[n / 2], t[n * 99 / 100], first);
    return 0;
}

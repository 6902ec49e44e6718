/* Fairness probe: a flood of slow trapped calls, and a victim that times its own.

   fairness flood THREADS chmod|mount COUNTER
       THREADS threads, each looping one slow trapped call on its own target for ever:
       chmod(file, 04755) (isoboxd's set-id helper) or mount("proc", dir) + umount (isoboxd
       builds the proc). After each completed call a thread adds 1 to the shared counter
       (COUNTER: a file both containers see, u64[0]); u64[1] counts threads started, u64[3]
       failed calls and u64[2] the last one's errno.
   fairness victim chmod|mount|sysinfo N COUNTER
       N timed calls of the same kind, one after the other (sysinfo: a fast call, answered
       inline by isoboxd's loop). Prints one line: "lat_ns=L,L,...
       ahead=A,A,..." (per call), then "kind=K n=N errno=E median_ns= p90_ns= max_ns=
       ahead_max= ahead_median=". ahead is how many flood calls completed while one victim
       call was waiting (the counter's delta across the call): the ordering isoboxd gave it,
       whatever the machine's speed.

   Each target is the probe's own (in the container's rootfs, not a host bind, so chmod is
   performed rather than refused). Static: the rootfs is busybox without a libc. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysinfo.h>
#include <time.h>
#include <unistd.h>

static volatile uint64_t *counter;
static int mount_kind, sysinfo_kind;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void target(char *buf, size_t len, const char *who, long i) {
    /* by kind too: a file left by a chmod run must not become a later run's mount point */
    snprintf(buf, len, "/tmp/fair-%s-%s-%d-%ld", mount_kind ? "mount" : "chmod", who, (int)getpid(), i);
    if (mount_kind) {
        if (mkdir(buf, 0755) < 0 && errno != EEXIST) { perror(buf); exit(2); }
    } else {
        int fd = open(buf, O_CREAT | O_WRONLY, 0644);
        if (fd < 0) { perror(buf); exit(2); }
        close(fd);
    }
}

/* One slow trapped call; 0 or the errno. The umount after a mount is trapped too but answered
   inline (isoboxd lets the kernel do it): not part of the timed call. */
static int slow_call(const char *path, uint64_t *took) {
    uint64_t t0 = now_ns();
    struct sysinfo si;
    int r = mount_kind ? mount("proc", path, "proc", 0, NULL) : sysinfo_kind ? sysinfo(&si) : chmod(path, 04755);
    int err = r < 0 ? errno : 0;
    if (took) *took = now_ns() - t0;
    if (mount_kind && r == 0) umount2(path, MNT_DETACH);
    return err;
}

static void *flooder(void *arg) {
    char path[128];
    target(path, sizeof path, "flood", (long)arg);
    __atomic_fetch_add(&counter[1], 1, __ATOMIC_SEQ_CST);
    for (;;) {
        int e = slow_call(path, NULL);
        if (e == 0) {
            __atomic_fetch_add(&counter[0], 1, __ATOMIC_SEQ_CST);
        } else {
            counter[2] = (uint64_t)e;           /* for the test's message */
            __atomic_fetch_add(&counter[3], 1, __ATOMIC_SEQ_CST);
        }
    }
    return NULL;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void map_counter(const char *path) {
    int fd = open(path, O_RDWR);
    if (fd < 0) { perror(path); exit(2); }
    counter = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (counter == MAP_FAILED) { perror("mmap"); exit(2); }
    close(fd);
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: fairness flood THREADS chmod|mount COUNTER | victim chmod|mount|sysinfo N COUNTER\n");
        return 2;
    }
    int flood = strcmp(argv[1], "flood") == 0;
    const char *kind = flood ? argv[3] : argv[2];
    long n = atol(flood ? argv[2] : argv[3]);
    mount_kind = strcmp(kind, "mount") == 0;
    sysinfo_kind = strcmp(kind, "sysinfo") == 0;
    map_counter(argv[4]);
    if (flood) {
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setstacksize(&attr, 64 * 1024);
        for (long i = 0; i < n; i++) {
            pthread_t t;
            if (pthread_create(&t, &attr, flooder, (void *)i) != 0) { perror("pthread_create"); return 2; }
        }
        for (;;) pause();
    }
    char path[128];
    target(path, sizeof path, "victim", 0);
    uint64_t *lat = calloc(n, sizeof *lat), *ahead = calloc(n, sizeof *ahead);
    int err = 0;
    for (long i = 0; i < n; i++) {
        uint64_t before = __atomic_load_n(&counter[0], __ATOMIC_SEQ_CST);
        int e = slow_call(path, &lat[i]);
        ahead[i] = __atomic_load_n(&counter[0], __ATOMIC_SEQ_CST) - before;
        if (e) err = e;
    }
    printf("lat_ns=");                      /* every call, in order, for bench/fairness */
    for (long i = 0; i < n; i++) printf("%s%llu", i ? "," : "", (unsigned long long)lat[i]);
    printf(" ahead=");
    for (long i = 0; i < n; i++) printf("%s%llu", i ? "," : "", (unsigned long long)ahead[i]);
    printf(" ");
    qsort(lat, n, sizeof *lat, cmp_u64);
    qsort(ahead, n, sizeof *ahead, cmp_u64);
    printf("kind=%s n=%ld errno=%d median_ns=%llu p90_ns=%llu max_ns=%llu ahead_max=%llu ahead_median=%llu\n",
           kind, n, err, (unsigned long long)lat[n / 2], (unsigned long long)lat[n * 9 / 10],
           (unsigned long long)lat[n - 1], (unsigned long long)ahead[n - 1], (unsigned long long)ahead[n / 2]);
    return 0;
}

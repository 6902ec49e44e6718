/* bench/procfs's reader, run inside the containers (built with gcc -static -O2).
 *
 *   procfs_client lat N WARMUP AT_NS FILE...
 *       For each FILE in turn: WARMUP untimed, then N timed iterations of
 *       open(O_RDONLY) + read(64 KiB) until EOF + close(). Waits until CLOCK_REALTIME
 *       reaches AT_NS first (0: start at once), so readers in several containers start
 *       together, and then prints "S <ns after AT_NS it started>". Prints, per FILE, one line:
 *           L <file> <bytes of last read> <ns> <ns> ...      (N per-op latencies)
 *   procfs_client fresh FILE
 *       /proc/uptime freshness: reads FILE (first field, seconds) once, then every 10 ms
 *       for 1 s (open+read+close each time), and prints
 *           F <first> <value 150 ms later> <max lag in ms>
 *       where lag is how far a value trails the freshest one read, after subtracting the
 *       monotonic time elapsed between the reads (includes /proc/uptime's 10 ms steps).
 *   procfs_client head FILE
 *       Prints the first line of FILE ("H <line>"), as a value check.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static char buf[65536], spare[65536];

static uint64_t now_ns(clockid_t clk)
{
	struct timespec ts;
	clock_gettime(clk, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static ssize_t read_file(const char *path)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		fprintf(stderr, "open %s: %s\n", path, strerror(errno));
		exit(2);
	}
	ssize_t total = 0, n;
	/* 64 KiB reads until EOF; the small files bench/procfs checks fit the first one,
	 * which is what fresh/head look at (later reads, if any, are 0 bytes: EOF) */
	while ((n = read(fd, total ? spare : buf, sizeof(buf))) > 0)
		total += n;
	if (n < 0) {
		fprintf(stderr, "read %s: %s\n", path, strerror(errno));
		exit(2);
	}
	close(fd);
	return total;
}

static double uptime_value(const char *path)
{
	ssize_t n = read_file(path);
	buf[n < (ssize_t)sizeof(buf) ? n : (ssize_t)sizeof(buf) - 1] = 0; /* n >= 64 KiB never happens here */
	return strtod(buf, NULL);
}

static void sleep_ns(uint64_t ns)
{
	struct timespec ts = {(time_t)(ns / 1000000000ull), (long)(ns % 1000000000ull)};
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

int main(int argc, char **argv)
{
	if (argc >= 3 && !strcmp(argv[1], "fresh")) {
		/* d = value - elapsed is constant for a value that is always current (up to the
		 * 10 ms resolution of /proc/uptime); a value served from a cache lags, so d drops.
		 * max(d) - min(d) bounds how old any value read was compared with the freshest. */
		uint64_t t0 = now_ns(CLOCK_MONOTONIC);
		double first = uptime_value(argv[2]), at150 = 0, dmax = first, dmin = first;
		for (int i = 1; i <= 100; i++) {
			uint64_t target = t0 + (uint64_t)i * 10000000ull, t = now_ns(CLOCK_MONOTONIC);
			if (target > t)
				sleep_ns(target - t);
			double v = uptime_value(argv[2]);
			double d = v - (now_ns(CLOCK_MONOTONIC) - t0) / 1e9;
			if (d > dmax)
				dmax = d;
			if (d < dmin)
				dmin = d;
			if (i == 15)
				at150 = v;
		}
		printf("F %.2f %.2f %.1f\n", first, at150, (dmax - dmin) * 1000);
		return 0;
	}
	if (argc >= 3 && !strcmp(argv[1], "head")) {
		ssize_t n = read_file(argv[2]);
		buf[n < (ssize_t)sizeof(buf) ? n : (ssize_t)sizeof(buf) - 1] = 0; /* n >= 64 KiB never happens here */
		buf[strcspn(buf, "\n")] = 0;
		printf("H %s\n", buf);
		return 0;
	}
	if (argc < 6 || strcmp(argv[1], "lat")) {
		fprintf(stderr, "usage: %s lat N WARMUP AT_NS FILE... | fresh FILE | head FILE\n", argv[0]);
		return 1;
	}
	int n = atoi(argv[2]), warm = atoi(argv[3]);
	uint64_t at = strtoull(argv[4], NULL, 10);
	uint64_t *lat = calloc((size_t)n, sizeof(*lat));
	if (!lat)
		return 1;
	uint64_t t = now_ns(CLOCK_REALTIME);
	if (at > t)
		sleep_ns(at - t);
	if (at)	/* how late this reader started after the release time (it missed it if > 0) */
		printf("S %lld\n", (long long)(now_ns(CLOCK_REALTIME) - at));
	for (int f = 5; f < argc; f++) {
		ssize_t bytes = 0;
		for (int i = 0; i < warm; i++)
			bytes = read_file(argv[f]);
		for (int i = 0; i < n; i++) {
			uint64_t a = now_ns(CLOCK_MONOTONIC);
			bytes = read_file(argv[f]);
			lat[i] = now_ns(CLOCK_MONOTONIC) - a;
		}
		printf("L %s %zd", argv[f], bytes);
		for (int i = 0; i < n; i++)
			printf(" %llu", (unsigned long long)lat[i]);
		printf("\n");
	}
	fflush(stdout);
	return 0;
}

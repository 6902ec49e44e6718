/* devopen: open device nodes and report what the kernel said.
 *
 *   devopen PATH...            for each PATH one line "PATH r=RES w=RES": RES is OK or the
 *                              errno name of open(O_RDONLY) and open(O_WRONLY)
 *   devopen -w MARKER PATH     open(PATH, O_WRONLY) and write MARKER: one line "write=RES"
 *   devopen -p                 a new pty pair from /dev/ptmx, then its slave opened by the
 *                              path ptsname gives: one line "pty=RES PTSNAME"
 *
 * Opens are O_NONBLOCK | O_NOCTTY (a serial port must neither wait for carrier nor become
 * the controlling terminal) and the descriptor is closed at once: nothing is read or
 * written except the marker. Exit 0 unless the arguments are wrong.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *try_open(const char *path, int mode) {
    int fd = open(path, mode | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
    if (fd < 0)
        return strerrorname_np(errno);
    close(fd);
    return "OK";
}

int main(int argc, char **argv) {
    if (argc >= 4 && !strcmp(argv[1], "-w")) {
        int fd = open(argv[3], O_WRONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
        if (fd < 0) {
            printf("write=%s\n", strerrorname_np(errno));
            return 0;
        }
        ssize_t n = write(fd, argv[2], strlen(argv[2]));
        printf("write=%s\n", n < 0 ? strerrorname_np(errno) : "OK");
        close(fd);
        return 0;
    }
    if (argc == 2 && !strcmp(argv[1], "-p")) {
        int m = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (m < 0 || grantpt(m) < 0 || unlockpt(m) < 0) {
            printf("pty=%s master\n", strerrorname_np(errno));
            return 0;
        }
        const char *name = ptsname(m);
        printf("pty=%s %s\n", try_open(name ? name : "?", O_RDWR), name ? name : "?");
        close(m);
        return 0;
    }
    if (argc < 2)
        return 2;
    for (int i = 1; i < argc; i++) {
        const char *r = try_open(argv[i], O_RDONLY);
        printf("%s r=%s w=%s\n", argv[i], r, try_open(argv[i], O_WRONLY));
    }
    return 0;
}

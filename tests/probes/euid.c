/* euid: what a planted set-id binary would give whoever runs it. Prints "uid=R euid=E" and,
 * when the effective uid is 0, whether /etc/shadow opens ("shadow=open" or "shadow=errno N"). */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

int main(void) {
    printf("uid=%d euid=%d", (int)getuid(), (int)geteuid());
    if (geteuid() == 0) {
        int fd = open("/etc/shadow", O_RDONLY);
        if (fd >= 0) printf(" shadow=open");
        else printf(" shadow=errno %d", errno);
    }
    printf("\n");
    return 0;
}

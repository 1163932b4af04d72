/* stdin/stdout helpers shared by the arm64 test drivers (binary data, native endianness). */
#ifndef RUSTANE_TEST_DRIVER_IO_H
#define RUSTANE_TEST_DRIVER_IO_H

#include <stdio.h>
#include <stdlib.h>

/* All of stdin in one malloc'd buffer (NULL when out of memory); *len gets its size. */
static unsigned char *read_all(size_t *len)
{
    size_t cap = 1 << 20, n = 0;
    unsigned char *buf = malloc(cap);
    for (;;) {
        if (!buf)
            return NULL;
        size_t got = fread(buf + n, 1, cap - n, stdin);
        n += got;
        if (got == 0)
            break;
        if (n == cap) {
            unsigned char *grown = realloc(buf, cap * 2);
            if (!grown) {
                free(buf);
                return NULL;
            }
            buf = grown;
            cap *= 2;
        }
    }
    *len = n;
    return buf;
}

/* 0 when all bytes were written. */
static int write_all(const void *p, size_t bytes)
{
    return fwrite(p, 1, bytes, stdout) == bytes ? 0 : 1;
}

#endif

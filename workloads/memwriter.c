/*
 * Memory writer: allocates SIZE_MB, writes every byte (the thesis' Allocator), then keeps
 * rewriting that memory at RATE_MBPS for SECONDS, so that a live migration has a known
 * dirty rate to chase. Bounded in time by SECONDS.
 *
 * usage: memwriter SIZE_MB RATE_MBPS SECONDS
 *
 * Prints "allocated N", then "written M" (total MB rewritten) once a second, then "done M".
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "workload.h"

int main(int argc, char **argv)
{
    struct dirtier args = parse_dirtier("memwriter", argc, argv);
    size_t size = args.size;
    double rate = args.rate, seconds = args.seconds;
    unsigned char *area = malloc(size);
    if (area == NULL) {
        fprintf(stderr, "memwriter: cannot allocate %zu bytes\n", size);
        return 1;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    memset(area, 1, size);
    printf("allocated %zu\n", size >> 20);

    size_t slice = (size_t)(rate * (1 << 20) / TICKS_PER_S);
    size_t offset = 0;
    double written = 0, start = now_s(), next_report = start + 1;
    unsigned char value = 2;
    struct timespec due;
    clock_gettime(CLOCK_MONOTONIC, &due);
    while (now_s() - start < seconds) {
        for (size_t left = slice; left > 0;) {
            size_t chunk = size - offset < left ? size - offset : left;
            memset(area + offset, value, chunk);
            offset = (offset + chunk) % size;
            if (offset == 0)
                value++;
            left -= chunk;
        }
        written += (double)slice / (1 << 20);
        if (now_s() >= next_report) {
            printf("written %.0f\n", written);
            next_report += 1;
        }
        next_tick(&due);
    }
    printf("done %.0f\n", written);
    return 0;
}

/*
 * Memory checker: fills SIZE_MB with pseudo-random bytes, keeps their checksum, and re-reads
 * the whole buffer every half second for SECONDS, so that a migration that lost or damaged a
 * page shows as a "bad" check (and exit 1). The check counter is also a progress counter: after
 * a migration that kept the process, it goes on from where it was instead of starting again.
 *
 * usage: memcheck SIZE_MB SECONDS
 *
 * Prints "filled MB SUM", then "check N ok" (or "check N bad SUM") per pass, then "done N".
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "workload.h"

static uint64_t checksum(const uint64_t *words, size_t count)
{
    uint64_t sum = 0;
    for (size_t i = 0; i < count; i++)
        sum = (sum << 7 | sum >> 57) ^ words[i]; /* order-sensitive: a moved page shows */
    return sum;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: memcheck SIZE_MB SECONDS\n");
        return 2;
    }
    size_t count = ((size_t)parse_number("memcheck", argv[1], "SIZE_MB", 1) << 20) / sizeof(uint64_t);
    double seconds = parse_number("memcheck", argv[2], "SECONDS", 0);
    uint64_t *words = malloc(count * sizeof(uint64_t));
    if (words == NULL) {
        fprintf(stderr, "memcheck: cannot allocate %s MB\n", argv[1]);
        return 1;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    uint64_t state = 0x9e3779b97f4a7c15ULL ^ (uint64_t)time(NULL);
    for (size_t i = 0; i < count; i++) { /* xorshift64: incompressible, unlike a memset */
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        words[i] = state;
    }
    uint64_t expected = checksum(words, count);
    printf("filled %s %016llx\n", argv[1], (unsigned long long)expected);

    long n = 0;
    double start = now_s();
    struct timespec half = {0, 500000000L};
    while (now_s() - start < seconds) {
        uint64_t sum = checksum(words, count);
        n++;
        if (sum != expected) {
            printf("check %ld bad %016llx\n", n, (unsigned long long)sum);
            return 1;
        }
        printf("check %ld ok\n", n);
        nanosleep(&half, NULL);
    }
    printf("done %ld\n", n);
    return 0;
}

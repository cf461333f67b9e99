/*
 * Synthetic1, the thesis' CPU hog (from the `stress` project's hogcpu):
 * sqrt(rand()) in a loop, usleep(10) every 19,000 iterations, stop after B such blocks.
 *
 * usage: synthetic1 [BLOCKS [REPORT_EVERY]]   (defaults 18000 and 1000)
 *
 * It prints "block N" every REPORT_EVERY blocks so that a host watching the console can
 * check that the run continued across a migration (N keeps climbing, never restarts),
 * then "done N" when it finishes.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define ITERATIONS_PER_BLOCK 19000

static long parse_positive(const char *text, const char *what)
{
    char *end;
    long value = strtol(text, &end, 10);
    if (*end != '\0' || value <= 0) {
        fprintf(stderr, "synthetic1: %s must be a positive integer, got '%s'\n", what, text);
        exit(2);
    }
    return value;
}

int main(int argc, char **argv)
{
    long blocks = argc > 1 ? parse_positive(argv[1], "BLOCKS") : 18000;
    long report_every = argc > 2 ? parse_positive(argv[2], "REPORT_EVERY") : 1000;
    volatile double sink = 0.0; /* keeps the compiler from dropping the loop */

    setvbuf(stdout, NULL, _IOLBF, 0);
    for (long block = 1; block <= blocks; block++) {
        for (int i = 0; i < ITERATIONS_PER_BLOCK; i++)
            sink += sqrt((double)rand());
        usleep(10);
        if (block % report_every == 0)
            printf("block %ld\n", block);
    }
    printf("done %ld\n", blocks);
    return 0;
}

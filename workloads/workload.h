/*
 * What the memory workloads share: their numeric arguments, checked the same way (a bad one
 * is a usage error, exit 2, with the program's name), the monotonic clock that bounds
 * their runs, and the ticks that pace the dirtiers' writes. Header-only (static functions): each workload still builds from its one .c file.
 */
#ifndef TESTBED_WORKLOAD_H
#define TESTBED_WORKLOAD_H

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double parse_number(const char *program, const char *text, const char *what, double minimum)
{
    char *end;
    double value = strtod(text, &end);
    if (*end != '\0' || value < minimum) {
        fprintf(stderr, "%s: %s must be a number >= %g, got '%s'\n", program, what, minimum, text);
        exit(2);
    }
    return value;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* The dirtiers' command line, SIZE_MB RATE_MBPS SECONDS: how much memory they allocate (bytes),
 * rewrite per second (MB) and for how long (s). Anything else is a usage error (exit 2). */
struct dirtier {
    size_t size;
    double rate, seconds;
};

static inline struct dirtier parse_dirtier(const char *program, int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s SIZE_MB RATE_MBPS SECONDS\n", program);
        exit(2);
    }
    struct dirtier d = {(size_t)parse_number(program, argv[1], "SIZE_MB", 1) << 20,
                        parse_number(program, argv[2], "RATE_MBPS", 0),
                        parse_number(program, argv[3], "SECONDS", 0)};
    return d;
}

/* The dirtiers write in TICKS_PER_S slices a second, to keep their rate smooth. */
#define TICKS_PER_S 10

/* Sleep until the next tick's absolute deadline: the time the writes took does not slow the
 * rate down. */
static inline void next_tick(struct timespec *due)
{
    due->tv_nsec += 1000000000L / TICKS_PER_S;
    if (due->tv_nsec >= 1000000000L) {
        due->tv_sec++;
        due->tv_nsec -= 1000000000L;
    }
    clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, due, NULL);
}

#endif

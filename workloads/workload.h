/*
 * What the memory workloads share: their numeric arguments, checked the same way (a bad one
 * is a usage error, exit 2, with the program's name), and the monotonic clock that bounds
 * their runs. Header-only (static functions): each workload still builds from its one .c file.
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

#endif

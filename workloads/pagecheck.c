/*
 * Page checker: a memory dirtier that checks its own pages, so that a migration which lost a
 * dirty page (the destination holds an older copy of it) is seen from inside the guest, without
 * trusting the hypervisor. SIZE_MB is cut into 4 KiB pages; each page holds its index, its
 * generation and words derived from both. Every tick the next pages (round robin, RATE_MBPS in
 * all) are first checked against the generation this program last wrote there, then rewritten
 * with the next generation. A page with another index, generation or content is "bad": it is
 * reported and rewritten, and the run goes on (to count how many were lost), exiting 1 at the
 * end. Bounded in time by SECONDS; a full check of every page ends the run.
 *
 * usage: pagecheck SIZE_MB RATE_MBPS SECONDS
 *
 * Prints "allocated N", then "checked C bad B" once a second (pages checked so far, bad pages so
 * far), "bad page I generation G found index X generation Y" for each of the first bad pages,
 * then "done C bad B".
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "workload.h"

#define PAGE_WORDS (4096 / sizeof(uint64_t))
#define REPORTED_BAD 20 /* detail lines for the first bad pages; the count goes on */

/* A page's expected word k: cheap (a multiply per word, as fast as a memset under TCG within a
 * few times) and different for every page, generation and offset, so no stale copy passes. */
static uint64_t word(uint64_t index, uint64_t generation, uint64_t k)
{
    uint64_t x = (index << 32 ^ generation) * 0x9e3779b97f4a7c15ULL + k * 0xbf58476d1ce4e5b9ULL;
    return x ^ x >> 29;
}

static void fill(uint64_t *page, uint64_t index, uint64_t generation)
{
    page[0] = index;
    page[1] = generation;
    for (size_t k = 2; k < PAGE_WORDS; k++)
        page[k] = word(index, generation, k);
}

static int intact(const uint64_t *page, uint64_t index, uint64_t generation)
{
    if (page[0] != index || page[1] != generation)
        return 0;
    for (size_t k = 2; k < PAGE_WORDS; k++)
        if (page[k] != word(index, generation, k))
            return 0;
    return 1;
}

struct pages {
    uint64_t *words;
    uint32_t *generation; /* what this program last wrote in each page */
    size_t count;
    long checked, bad;
};

/* Check page i against its generation, then write the next one. */
static void step(struct pages *p, size_t i)
{
    uint64_t *page = p->words + i * PAGE_WORDS;
    if (!intact(page, i, p->generation[i])) {
        if (p->bad++ < REPORTED_BAD)
            printf("bad page %zu generation %u found index %llu generation %llu\n", i, p->generation[i],
                   (unsigned long long)page[0], (unsigned long long)page[1]);
    }
    p->checked++;
    fill(page, i, ++p->generation[i]);
}

int main(int argc, char **argv)
{
    struct dirtier args = parse_dirtier("pagecheck", argc, argv);
    struct pages p = {malloc(args.size), calloc(args.size / 4096, sizeof(uint32_t)), args.size / 4096, 0, 0};
    if (p.words == NULL || p.generation == NULL) {
        fprintf(stderr, "pagecheck: cannot allocate %zu bytes\n", args.size);
        return 1;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (size_t i = 0; i < p.count; i++)
        fill(p.words + i * PAGE_WORDS, i, 0);
    printf("allocated %zu\n", args.size >> 20);

    size_t per_tick = (size_t)(args.rate * (1 << 20) / 4096 / TICKS_PER_S), cursor = 0;
    double start = now_s(), next_report = start + 1;
    struct timespec due;
    clock_gettime(CLOCK_MONOTONIC, &due);
    while (now_s() - start < args.seconds) {
        for (size_t n = 0; n < per_tick; n++, cursor = (cursor + 1) % p.count)
            step(&p, cursor);
        if (now_s() >= next_report) {
            printf("checked %ld bad %ld\n", p.checked, p.bad);
            next_report += 1;
        }
        next_tick(&due);
    }
    for (size_t n = 0; n < p.count; n++, cursor = (cursor + 1) % p.count)
        step(&p, cursor); /* a last check of every page, written since or not */
    printf("done %ld bad %ld\n", p.checked, p.bad);
    return p.bad ? 1 : 0;
}

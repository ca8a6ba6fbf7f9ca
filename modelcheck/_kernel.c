/* One pass over a float32 activation for modelcheck's statistics (see modelcheck/kernel.py).
 *
 * The activation is a contiguous (outer, units, inner) block. In a single read it yields, per
 * unit, the sum of x, the sum of (x - shift)^2, and the count of values that are positive
 * (activity) or at or beyond the flat regions of a bounded activation (saturation); and the
 * block's minimum and maximum. Eager PyTorch needs five or six passes for the same results.
 *
 * Values are summed in float32 vector lanes over short runs, and the runs in double, so the
 * rounding stays at float32's own (~1e-7 relative), as with PyTorch's pairwise sums.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

enum { SATURATION_NONE = 0, SATURATION_ABOVE = 1, SATURATION_AWAY = 2 };

/* Rows (or values of one unit's run) summed in float32 before being added in double. */
#define RUN 256
#define MAX_THREADS 64

typedef struct {
    const float *x;
    int64_t first, last; /* rows of the outer axis */
    int64_t units, inner;
    const float *shift;
    int saturation;
    float centre, bound;
    double *sum, *dsumsq, *active, *saturated; /* per unit; active/saturated may be NULL */
    float low, high;
    int nan; /* a NaN was seen */
    int failed;
} Part;

/* Built for AVX2 as well as the baseline where the compiler can pick at load time: the
 * passes are twice as fast with 8-value lanes. */
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define VECTOR_VARIANTS __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_VARIANTS
#endif
#define INLINE static inline __attribute__((always_inline))

/* 1 where v is at or beyond the flat regions; `saturation` is a constant in each caller, so
 * the compiler writes one loop per kind. */
INLINE float saturated_flag(float v, int saturation, float centre, float bound) {
    if (saturation == SATURATION_NONE) return 0.0f;
    if (saturation == SATURATION_ABOVE) return v >= bound ? 1.0f : 0.0f;
    return fabsf(v - centre) >= bound ? 1.0f : 0.0f;
}

/* inner == 1 (a Linear's or a sequence's outputs): units lie side by side in a row. Sums go
 * straight into double; counts stay exact in float32 (under 2^24 rows: see kernel.py). */
INLINE int rows_of_kind(Part *p, const int saturation) {
    int64_t units = p->units;
    float *counts = calloc((size_t)(2 * units), sizeof(float));
    if (counts == NULL) return 1;
    float *a = counts, *t = counts + units;
    double *s = p->sum, *q = p->dsumsq;
    const float *shift = p->shift;
    float low = INFINITY, high = -INFINITY, nan = 0.0f, centre = p->centre, bound = p->bound;
    for (int64_t r = p->first; r < p->last; r++) {
        const float *row = p->x + r * units;
#pragma omp simd reduction(min : low) reduction(max : high, nan)
        for (int64_t u = 0; u < units; u++) {
            float v = row[u], d = v - shift[u];
            s[u] += v;
            q[u] += d * d;
            a[u] += v > 0.0f ? 1.0f : 0.0f;
            t[u] += saturated_flag(v, saturation, centre, bound);
            low = v < low ? v : low;
            high = v > high ? v : high;
            nan = v != v ? 1.0f : nan;
        }
    }
    for (int64_t u = 0; u < units; u++) {
        if (p->active) p->active[u] = a[u];
        if (p->saturated) p->saturated[u] = t[u];
    }
    free(counts);
    p->low = low, p->high = high, p->nan = nan != 0.0f;
    return 0;
}

/* inner > 1 (a convolution's channels): each unit's values lie in runs of `inner`. */
INLINE int runs_of_kind(Part *p, const int saturation) {
    int64_t units = p->units, inner = p->inner;
    float low = INFINITY, high = -INFINITY, nan = 0.0f, centre = p->centre, bound = p->bound;
    for (int64_t r = p->first; r < p->last; r++) {
        for (int64_t u = 0; u < units; u++) {
            const float *values = p->x + (r * units + u) * inner;
            float shift = p->shift[u];
            for (int64_t start = 0; start < inner; start += RUN) {
                int64_t stop = start + RUN < inner ? start + RUN : inner;
                float s = 0.0f, q = 0.0f, a = 0.0f, t = 0.0f;
#pragma omp simd reduction(+ : s, q, a, t) reduction(min : low) reduction(max : high, nan)
                for (int64_t i = start; i < stop; i++) {
                    float v = values[i], d = v - shift;
                    s += v;
                    q += d * d;
                    a += v > 0.0f ? 1.0f : 0.0f;
                    t += saturated_flag(v, saturation, centre, bound);
                    low = v < low ? v : low;
                    high = v > high ? v : high;
                    nan = v != v ? 1.0f : nan;
                }
                p->sum[u] += s;
                p->dsumsq[u] += q;
                if (p->active) p->active[u] += a;
                if (p->saturated) p->saturated[u] += t;
            }
        }
    }
    p->low = low, p->high = high, p->nan = nan != 0.0f;
    return 0;
}

VECTOR_VARIANTS static int reduce_rows(Part *p) {
    switch (p->saturation) {
    case SATURATION_NONE: return rows_of_kind(p, SATURATION_NONE);
    case SATURATION_ABOVE: return rows_of_kind(p, SATURATION_ABOVE);
    default: return rows_of_kind(p, SATURATION_AWAY);
    }
}

VECTOR_VARIANTS static int reduce_runs(Part *p) {
    switch (p->saturation) {
    case SATURATION_NONE: return runs_of_kind(p, SATURATION_NONE);
    case SATURATION_ABOVE: return runs_of_kind(p, SATURATION_ABOVE);
    default: return runs_of_kind(p, SATURATION_AWAY);
    }
}

static void *reduce_part(void *arg) {
    Part *p = arg;
    p->failed = p->inner == 1 ? reduce_rows(p) : reduce_runs(p);
    return NULL;
}

/* Reduce x into the float32 outputs (each of `units` values; low and high one each; active
 * and saturated may be NULL). The outer axis is split between `threads` threads. Returns 0,
 * or 1 when memory ran out (the outputs are then unspecified). */
int modelcheck_reduce_f32(const float *x, int64_t outer, int64_t units, int64_t inner,
                          const float *shift, float *sum, float *dsumsq, float *low,
                          float *high, float *active, float *saturated, int saturation,
                          float centre, float bound, int threads) {
    if (threads > outer) threads = (int)outer;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads < 1) threads = 1;
    double *totals = calloc((size_t)(4 * threads * units), sizeof(double));
    if (totals == NULL) return 1;
    Part parts[MAX_THREADS];
    pthread_t started[MAX_THREADS];
    int running[MAX_THREADS] = {0};
    for (int k = 0; k < threads; k++) {
        double *mine = totals + (size_t)(4 * k * units);
        parts[k] = (Part){
            .x = x, .first = outer * k / threads, .last = outer * (k + 1) / threads,
            .units = units, .inner = inner, .shift = shift, .saturation = saturation,
            .centre = centre, .bound = bound, .sum = mine, .dsumsq = mine + units,
            .active = active ? mine + 2 * units : NULL,
            .saturated = saturated ? mine + 3 * units : NULL,
        };
    }
    for (int k = 1; k < threads; k++)
        running[k] = pthread_create(&started[k], NULL, reduce_part, &parts[k]) == 0;
    for (int k = 0; k < threads; k++)
        if (k == 0 || !running[k]) reduce_part(&parts[k]); /* a thread that failed to start */
    int failed = 0;
    for (int k = 1; k < threads; k++)
        if (running[k]) pthread_join(started[k], NULL);
    float lo = INFINITY, hi = -INFINITY;
    int nan = 0;
    for (int k = 0; k < threads; k++) {
        failed |= parts[k].failed;
        lo = parts[k].low < lo ? parts[k].low : lo;
        hi = parts[k].high > hi ? parts[k].high : hi;
        nan |= parts[k].nan;
    }
    for (int64_t u = 0; u < units; u++) {
        double s = 0.0, q = 0.0, a = 0.0, t = 0.0;
        for (int k = 0; k < threads; k++) {
            s += parts[k].sum[u];
            q += parts[k].dsumsq[u];
            if (active) a += parts[k].active[u];
            if (saturated) t += parts[k].saturated[u];
        }
        sum[u] = (float)s, dsumsq[u] = (float)q;
        if (active) active[u] = (float)a;
        if (saturated) saturated[u] = (float)t;
    }
    /* Like torch.aminmax: a NaN anywhere makes both extremes NaN. */
    *low = nan ? NAN : lo;
    *high = nan ? NAN : hi;
    free(totals);
    return failed;
}

/* One pass over a float32 activation, and one over its sample, for modelcheck's statistics
 * (loaded by modelcheck/kernel.py).
 *
 * The activation is a contiguous (outer, units, inner) block. In a single read it yields, per
 * unit, the sum of x, the sum of (x - shift)^2, and the count of values that are positive
 * (activity) or at or beyond the flat regions of a bounded activation (saturation); and the
 * block's minimum and maximum. Eager PyTorch needs five or six passes for the same results.
 * The same pass copies the activation's sample (values at fixed random positions) while each
 * row is still in cache. The sample's pass yields its power sums to the fourth and its count of
 * nonzero values. A model's parameters are summarised in one call for all of them.
 *
 * Where units lie side by side, eight rows are added in float32 and those sums in double; where
 * each unit's values lie in runs, they are summed in float32 vector lanes 256 at a time and
 * those sums in double.
 * Either way the rounding is no worse than PyTorch's pairwise float32 sums (~1e-7 relative).
 *
 * Built with OpenMP, a large activation is split between threads by its outer rows. Loaded
 * after PyTorch, this library shares PyTorch's own OpenMP runtime (the same libgomp.so.1), so
 * the threads that just ran the layer take the parts at once; kernel.py asks for more than one
 * thread only when that runtime is the one loaded.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

enum { SATURATION_NONE = 0, SATURATION_ABOVE = 1, SATURATION_AWAY = 2 };

/* Raised with every change to a signature below: kernel.py loads only the version it calls,
 * so a library left from an older checkout (an editable install not rebuilt) is not called
 * with the wrong arguments. */
int modelcheck_kernel_version(void) { return 5; }

/* Whether this build can run a reduction on more than one thread. */
int modelcheck_kernel_threaded(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Values of one unit's run summed in float32 before being added in double. */
#define RUN 256
/* Runs shorter than this are reduced row by row instead: vector lanes over runs of 4 or 16
 * values spend more time starting and ending than summing (64x512x4: 1.4 ms by runs). */
#define ROWS_BELOW 64
/* Activations smaller than this (in values) take one thread: waking a second costs more. */
#define PARALLEL_FROM (1 << 18)

typedef struct {
    const float *x;
    int64_t outer, units, inner;
    const float *shift;
    int saturation;
    float centre, bound;
    double *sum, *dsumsq, *active, *saturated; /* per unit; active/saturated may be NULL */
    float low, high;
    int nan; /* a NaN was seen */
    /* The sample: out[to[k]] = value at flat position at[k] (ascending) of the whole
     * activation, for k from `next` on while at[k] lies in this part, which starts at
     * flat position `offset`. */
    const int64_t *at, *to;
    int64_t count, next, offset;
    float *out;
} Reduction;

/* Copy the sampled values among the part's first `end` values not copied yet: called as
 * each row is reduced, while it is still in cache. */
static inline void gather(Reduction *p, int64_t end) {
    const int64_t *restrict at = p->at, *restrict to = p->to;
    const float *restrict x = p->x - p->offset; /* indexed by whole-activation positions */
    float *restrict out = p->out;
    int64_t k = p->next, count = p->count, stop = p->offset + end;
    for (; k < count && at[k] < stop; k++) out[to[k]] = x[at[k]];
    p->next = k;
}

/* The first k with at[k] >= position. */
static int64_t first_at(const int64_t *at, int64_t count, int64_t position) {
    int64_t low = 0, high = count;
    while (low < high) {
        int64_t middle = low + (high - low) / 2;
        if (at[middle] < position) low = middle + 1;
        else high = middle;
    }
    return low;
}

/* Built for AVX2 as well as the baseline where the compiler can pick at load time: the
 * passes are twice as fast with 8-value lanes. */
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define VECTOR_VARIANTS __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_VARIANTS
#endif
#define INLINE static inline __attribute__((always_inline))

INLINE float positive(float v) { return v > 0.0f ? 1.0f : 0.0f; }
INLINE float lesser(float a, float b) { return a < b ? a : b; }
INLINE float greater(float a, float b) { return a > b ? a : b; }

/* 1 where v is at or beyond the flat regions; `saturation` is a constant in each caller, so
 * the compiler writes one loop per kind. */
INLINE float saturated_flag(float v, int saturation, float centre, float bound) {
    if (saturation == SATURATION_NONE) return 0.0f;
    if (saturation == SATURATION_ABOVE) return v >= bound ? 1.0f : 0.0f;
    return fabsf(v - centre) >= bound ? 1.0f : 0.0f;
}

/* Each unit's value repeated over its `inner` positions. */
static void spread(float *restrict to, const float *restrict from, int64_t units, int64_t inner) {
    for (int64_t u = 0; u < units; u++)
        for (int64_t i = 0; i < inner; i++) to[u * inner + i] = from[u];
}

/* total[u] += the sum of unit u's `inner` per-position sums. The loops over units are kept
 * free of divisions and of pointers that might alias: written as one loop (u = c / inner),
 * they took 11 us for 1,024 units, half the time of reducing a 64x1024 activation. */
static void add_sums(double *restrict total, const double *restrict sums, int64_t units,
                     int64_t inner) {
    if (inner == 1) {
        for (int64_t u = 0; u < units; u++) total[u] += sums[u];
        return;
    }
    for (int64_t u = 0; u < units; u++) {
        double sum = 0.0;
        for (int64_t i = 0; i < inner; i++) sum += sums[u * inner + i];
        total[u] += sum;
    }
}

/* The same for counts kept in float32. */
static void add_counts(double *restrict total, const float *restrict counts, int64_t units,
                       int64_t inner) {
    if (inner == 1) {
        for (int64_t u = 0; u < units; u++) total[u] += counts[u];
        return;
    }
    for (int64_t u = 0; u < units; u++) {
        double sum = 0.0;
        for (int64_t i = 0; i < inner; i++) sum += counts[u * inner + i];
        total[u] += sum;
    }
}

/* Rows of (units x inner) values reduced position by position, each position's sums in
 * double, its counts exact in float32 (under 2^24 rows: see stats._flags_dtype), then the
 * positions of each unit added up. For a Linear's outputs (inner == 1) and channels with few
 * positions each, where a unit's run is too short to fill vector lanes. */
INLINE int rows_of_kind(Reduction *p, const int saturation) {
    int64_t units = p->units, inner = p->inner, columns = units * inner;
    double *sums = calloc((size_t)(2 * columns), sizeof(double));
    float *floats = calloc((size_t)(3 * columns), sizeof(float));
    if (sums == NULL || floats == NULL) {
        free(sums), free(floats);
        return 1;
    }
    double *s = sums, *q = sums + columns;
    float *a = floats, *t = floats + columns, *shift = floats + 2 * columns;
    spread(shift, p->shift, units, inner);
    float low = INFINITY, high = -INFINITY, nan = 0.0f, centre = p->centre, bound = p->bound;
    int64_t r = 0;
    /* Eight rows at a time, added pairwise in float32 (as exact as PyTorch's float32 sums)
     * before their sums go to double: one conversion per eight values, not per value. */
    for (; r + 8 <= p->outer; r += 8) {
        const float *b = p->x + r * columns;
#pragma omp simd reduction(min : low) reduction(max : high, nan)
        for (int64_t c = 0; c < columns; c++) {
            float v0 = b[c], v1 = b[c + columns], v2 = b[c + 2 * columns],
                  v3 = b[c + 3 * columns], v4 = b[c + 4 * columns], v5 = b[c + 5 * columns],
                  v6 = b[c + 6 * columns], v7 = b[c + 7 * columns], m = shift[c];
            float d0 = v0 - m, d1 = v1 - m, d2 = v2 - m, d3 = v3 - m;
            float d4 = v4 - m, d5 = v5 - m, d6 = v6 - m, d7 = v7 - m;
            s[c] += (double)(((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7)));
            q[c] += (double)(((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)) +
                             ((d4 * d4 + d5 * d5) + (d6 * d6 + d7 * d7)));
            a[c] += ((positive(v0) + positive(v1)) + (positive(v2) + positive(v3))) +
                    ((positive(v4) + positive(v5)) + (positive(v6) + positive(v7)));
            t[c] += ((saturated_flag(v0, saturation, centre, bound) +
                      saturated_flag(v1, saturation, centre, bound)) +
                     (saturated_flag(v2, saturation, centre, bound) +
                      saturated_flag(v3, saturation, centre, bound))) +
                    ((saturated_flag(v4, saturation, centre, bound) +
                      saturated_flag(v5, saturation, centre, bound)) +
                     (saturated_flag(v6, saturation, centre, bound) +
                      saturated_flag(v7, saturation, centre, bound)));
            float least = lesser(lesser(lesser(v0, v1), lesser(v2, v3)),
                                 lesser(lesser(v4, v5), lesser(v6, v7)));
            float most = greater(greater(greater(v0, v1), greater(v2, v3)),
                                 greater(greater(v4, v5), greater(v6, v7)));
            low = least < low ? least : low;
            high = most > high ? most : high;
            nan = (v0 != v0 || v1 != v1 || v2 != v2 || v3 != v3 || v4 != v4 || v5 != v5 ||
                   v6 != v6 || v7 != v7) ? 1.0f : nan;
        }
        gather(p, (r + 8) * columns);
    }
    for (; r < p->outer; r++) {
        const float *row = p->x + r * columns;
#pragma omp simd reduction(min : low) reduction(max : high, nan)
        for (int64_t c = 0; c < columns; c++) {
            float v = row[c], d = v - shift[c];
            s[c] += v;
            q[c] += d * d;
            a[c] += positive(v);
            t[c] += saturated_flag(v, saturation, centre, bound);
            low = v < low ? v : low;
            high = v > high ? v : high;
            nan = v != v ? 1.0f : nan;
        }
        gather(p, (r + 1) * columns);
    }
    add_sums(p->sum, s, units, inner);
    add_sums(p->dsumsq, q, units, inner);
    if (p->active) add_counts(p->active, a, units, inner);
    if (p->saturated) add_counts(p->saturated, t, units, inner);
    free(sums), free(floats);
    p->low = low, p->high = high, p->nan = nan != 0.0f;
    return 0;
}

/* Long runs (a convolution's channels): each unit's values lie in runs of `inner`. */
INLINE int runs_of_kind(Reduction *p, const int saturation) {
    int64_t units = p->units, inner = p->inner;
    float low = INFINITY, high = -INFINITY, nan = 0.0f, centre = p->centre, bound = p->bound;
    for (int64_t r = 0; r < p->outer; r++) {
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
                    a += positive(v);
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
        gather(p, (r + 1) * units * inner);
    }
    p->low = low, p->high = high, p->nan = nan != 0.0f;
    return 0;
}

VECTOR_VARIANTS static int reduce_rows(Reduction *p) {
    switch (p->saturation) {
    case SATURATION_NONE: return rows_of_kind(p, SATURATION_NONE);
    case SATURATION_ABOVE: return rows_of_kind(p, SATURATION_ABOVE);
    default: return rows_of_kind(p, SATURATION_AWAY);
    }
}

VECTOR_VARIANTS static int reduce_runs(Reduction *p) {
    switch (p->saturation) {
    case SATURATION_NONE: return runs_of_kind(p, SATURATION_NONE);
    case SATURATION_ABOVE: return runs_of_kind(p, SATURATION_ABOVE);
    default: return runs_of_kind(p, SATURATION_AWAY);
    }
}

/* Add x's reduction to the float64 accumulators of a summary: per unit the sums (`active` and
 * `saturated` may be NULL: not kept), and the extremes into *low and *high (one value each; a
 * NaN anywhere makes both NaN for good, as torch.minimum and torch.maximum keep it). The work
 * is shared between up to `threads` threads, each taking a share of the outer rows into
 * totals of its own, added up in a fixed order. With `batch`, this batch's own results also
 * go there, as (sum, dsumsq, active, saturated) of `units` values each (zeros where not kept),
 * then low and high, for a summary of the very same tensor to add instead of reading it again.
 * The same pass copies x's sample: sample[to[k]] = x[at[k]] for the `count` ascending flat
 * positions at (count 0: none). Returns 0, or 1 when memory ran out (nothing is added then). */
int modelcheck_reduce_f32(const float *x, int64_t outer, int64_t units, int64_t inner,
                          const float *shift, double *sum, double *dsumsq, double *active,
                          double *saturated, double *low, double *high, double *batch,
                          int saturation, float centre, float bound, const int64_t *at,
                          const int64_t *to, int64_t count, float *sample, int threads) {
    if (threads < 1 || outer < threads || outer * units * inner < PARALLEL_FROM) threads = 1;
    double *totals = calloc((size_t)(4 * units * threads), sizeof(double));
    Reduction *parts = calloc((size_t)threads, sizeof(Reduction));
    if (totals == NULL || parts == NULL) {
        free(totals), free(parts);
        return 1;
    }
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(static, 1) reduction(| : failed)
    for (int i = 0; i < threads; i++) {
        int64_t first = outer * i / threads, last = outer * (i + 1) / threads;
        double *mine = totals + 4 * units * i;
        int64_t offset = first * units * inner;
        parts[i] = (Reduction){
            .x = x + offset, .outer = last - first, .units = units,
            .inner = inner, .shift = shift, .saturation = saturation, .centre = centre,
            .bound = bound, .sum = mine, .dsumsq = mine + units,
            .active = active ? mine + 2 * units : NULL,
            .saturated = saturated ? mine + 3 * units : NULL,
            .at = at, .to = to, .count = count, .next = first_at(at, count, offset),
            .offset = offset, .out = sample,
        };
        failed |= inner < ROWS_BELOW ? reduce_rows(&parts[i]) : reduce_runs(&parts[i]);
    }
    for (int i = 1; i < threads; i++)
        for (int64_t j = 0; j < 4 * units; j++) totals[j] += totals[4 * units * i + j];
    double least = INFINITY, most = -INFINITY;
    int nan = 0;
    for (int i = 0; i < threads; i++) {
        least = parts[i].low < least ? parts[i].low : least;
        most = parts[i].high > most ? parts[i].high : most;
        nan |= parts[i].nan;
    }
    if (nan) least = most = NAN;
    if (!failed) {
        double *kept[4] = {sum, dsumsq, active, saturated};
        for (int row = 0; row < 4; row++)
            if (kept[row])
                for (int64_t u = 0; u < units; u++) kept[row][u] += totals[row * units + u];
        *low = nan || *low != *low ? NAN : (least < *low ? least : *low);
        *high = nan || *high != *high ? NAN : (most > *high ? most : *high);
        if (batch) {
            for (int64_t j = 0; j < 4 * units; j++) batch[j] = totals[j];
            batch[4 * units] = least, batch[4 * units + 1] = most;
        }
    }
    free(totals), free(parts);
    return failed;
}

VECTOR_VARIANTS static void power_sums(const float *values, int64_t n, double shift, double *sums,
                                       int64_t *nonzero) {
    double s1 = 0.0, s2 = 0.0, s3 = 0.0, s4 = 0.0;
    int64_t counted = 0;
#pragma omp simd reduction(+ : s1, s2, s3, s4, counted)
    for (int64_t i = 0; i < n; i++) {
        double d = (double)values[i] - shift, d2 = d * d;
        s1 += d;
        s2 += d2;
        s3 += d2 * d;
        s4 += d2 * d2;
        counted += values[i] != 0.0f;
    }
    sums[0] += s1, sums[1] += s2, sums[2] += s3, sums[3] += s4;
    if (nonzero) *nonzero += counted;
}

/* Add the sums of (v - shift)^k for k = 1..4, taken in double, to sums[0..3], and the count
 * of nonzero values (NaN included, as torch.count_nonzero counts it) to *nonzero unless it is
 * NULL: a batch's moment sample in one pass, instead of a conversion to double, two
 * elementwise operations, two matrix-vector products and a count. */
void modelcheck_power_sums_f32(const float *values, int64_t n, double shift, double *sums,
                               int64_t *nonzero) {
    power_sums(values, n, shift, sums, nonzero);
}

/* Values of a parameter reduced by one thread at a time: large parameters are split. */
#define BLOCK (1 << 16)

/* out = (sum of d, sum of d^2, minimum, maximum) of n values, d = x - shift: in float32 runs
 * of RUN values (as exact as PyTorch's pairwise float32 sums), added up in double. */
VECTOR_VARIANTS static void deviations(const float *x, int64_t n, float shift, double *out) {
    double sum = 0.0, squares = 0.0;
    float low = INFINITY, high = -INFINITY, nan = 0.0f;
    for (int64_t start = 0; start < n; start += RUN) {
        int64_t stop = start + RUN < n ? start + RUN : n;
        float s = 0.0f, q = 0.0f;
#pragma omp simd reduction(+ : s, q) reduction(min : low) reduction(max : high, nan)
        for (int64_t i = start; i < stop; i++) {
            float v = x[i], d = v - shift;
            s += d;
            q += d * d;
            low = v < low ? v : low;
            high = v > high ? v : high;
            nan = v != v ? 1.0f : nan;
        }
        sum += s, squares += q;
    }
    out[0] = sum, out[1] = squares;
    out[2] = nan != 0.0f ? NAN : low, out[3] = nan != 0.0f ? NAN : high;
}

/* For each of `count` float32 parameters (data[i], sizes[i] > 0 values): its first value,
 * then the sums of the deviations from it and of their squares, the minimum and the maximum
 * (both NaN when a value is NaN, as torch.aminmax) into out[5 i .. 5 i + 4]. The blocks of
 * every parameter are shared between up to `threads` threads and added up in a fixed order.
 * One call for a whole model: a few small operations per parameter cost more than their
 * passes. Returns 0, or 1 when memory ran out. */
int modelcheck_parameters_f32(int64_t count, const float *const *data, const int64_t *sizes,
                              double *out, int threads) {
    int64_t blocks = 0, values = 0;
    for (int64_t i = 0; i < count; i++)
        blocks += (sizes[i] + BLOCK - 1) / BLOCK, values += sizes[i];
    double *parts = malloc((size_t)(4 * blocks) * sizeof(double));
    int64_t *owner = malloc((size_t)(2 * blocks) * sizeof(int64_t)), *start = owner + blocks;
    if (parts == NULL || owner == NULL) {
        free(parts), free(owner);
        return 1;
    }
    for (int64_t i = 0, b = 0; i < count; i++)
        for (int64_t at = 0; at < sizes[i]; at += BLOCK, b++) owner[b] = i, start[b] = at;
    if (threads < 1 || values < PARALLEL_FROM) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 4)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t i = owner[b], left = sizes[i] - start[b];
        deviations(data[i] + start[b], left < BLOCK ? left : BLOCK, data[i][0], parts + 4 * b);
    }
    for (int64_t i = 0, b = 0; i < count; i++) {
        double sum = 0.0, squares = 0.0, low = INFINITY, high = -INFINITY;
        int nan = 0;
        for (; b < blocks && owner[b] == i; b++) {
            const double *part = parts + 4 * b;
            sum += part[0], squares += part[1];
            nan |= part[2] != part[2];
            low = part[2] < low ? part[2] : low;
            high = part[3] > high ? part[3] : high;
        }
        double *mine = out + 5 * i;
        mine[0] = data[i][0], mine[1] = sum, mine[2] = squares;
        mine[3] = nan ? NAN : low, mine[4] = nan ? NAN : high;
    }
    free(parts), free(owner);
    return 0;
}

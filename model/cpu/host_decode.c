/* One GPT-2 decode step for a few rows, in one call: the lean host path of model/cpu/host_decode.py.
 *
 * A decode step of MLX on the CPU dispatches some 300 kernels, each costing more to schedule
 * than the arithmetic of a few rows, and the BLAS libraries run products of 2-8 rows far below
 * what the memory allows. This file runs the same step (embeddings, pre-LayerNorm blocks,
 * attention over each row's own cached length, exact erf GELU, final LayerNorm, LM head) as
 * plain loops on a small pool of threads, writing each new key and value into the KV cache
 * arrays that MLX owns (their memory is shared, see host_decode.py), so prefills in MLX and
 * decode steps here read and write one cache.
 *
 * Weights come packed in panels of PANEL output columns: panel p holds, for every input k,
 * the PANEL weights of outputs p*PANEL.. (zero past the last output), contiguous, so one pass
 * streams each weight from memory once for all B rows (GROUP rows at a time, the later groups
 * finding the panel in cache) and the rows' sums stay in registers.
 *
 * Threads: the caller's thread and n-1 workers share each phase (a layer is five: q/k/v,
 * attention, attention projection, MLP in, MLP out) by claiming its chunks (output panels, or
 * (row, head) pairs) one at a time, so the caller never waits for a worker that lost its core
 * to another process before claiming anything; a worker spins briefly between phases and sleeps
 * on a condition variable between steps, so it holds no core while the process does other work.
 *
 * The cache of each layer is (rows, H, S, D): row b's keys of head h at position p are at
 * ((b * H + h) * S + p) * D. Compiled on first use (host_decode.py), never at import.
 */

#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define PANEL 32
#define MAX_ROWS 64 /* rows a step may hold (the caller decides how many pay) */
#define GROUP 8      /* rows whose sums a panel's pass keeps in registers */
#define MAX_THREADS 16
#define SPIN_US 100.0 /* a worker's busy-wait before it sleeps: longer than the gap between phases, shorter than the host's work between steps */

typedef float v16 __attribute__((vector_size(64)));

static inline v16 load16(const float *p) {
    v16 v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

static inline void store16(float *p, v16 v) { __builtin_memcpy(p, &v, sizeof v); }

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Per layer, in this order (what host_decode.py hands in). Packed: QKV_P, PROJ_P, FC_P, OUT_P. */
enum { LN1_W, LN1_B, QKV_P, QKV_B, PROJ_P, PROJ_B, LN2_W, LN2_B, FC_P, FC_B, OUT_P, OUT_B, PER_LAYER };

typedef struct hd_model hd_model;
/* One chunk of a phase's work on thread `t`; `first`: the thread's first chunk of this phase. */
typedef void (*chunk_fn)(hd_model *m, int t, int chunk, int first);

typedef struct {
    hd_model *m;
    int id;
} worker_arg;

struct hd_model {
    int n_layer, n_head, head_dim, n_embd, n_inner, vocab, max_len, n_threads;
    float eps;
    const float *wte, *wpe, *ln_f_w, *ln_f_b, *head_p;
    const float **layers;
    /* the current step */
    int B, layer, S;
    const int *positions;
    float *const *keys, *const *values;
    float *logits;
    /* scratch */
    float *x, *qkv, *att, *ff;
    float *normed[MAX_THREADS]; /* each thread's LayerNorm output (B, C) */
    float *scores[MAX_THREADS];
    /* the pool: a phase is `chunks` pieces of work that the threads claim one at a time */
    pthread_t threads[MAX_THREADS];
    worker_arg args[MAX_THREADS];
    int started;
    chunk_fn fn;
    int chunks;
    unsigned generation;
    _Atomic unsigned long long work; /* generation << 32 | next unclaimed chunk */
    atomic_int done, sleepers, quit;
    pthread_mutex_t mutex;
    pthread_cond_t wake;
};

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec * 1e-3;
}

/* Claim and run chunks of generation `gen` until none is left. A claim can only succeed while
 * the phase is unfinished, so `fn` and `chunks` read after it belong to that phase. */
static void claim(hd_model *m, int t, unsigned gen) {
    int first = 1;
    for (;;) {
        unsigned long long w = atomic_load(&m->work);
        if ((unsigned)(w >> 32) != gen || (unsigned)w >= (unsigned)m->chunks) return;
        if (!atomic_compare_exchange_weak(&m->work, &w, w + 1)) continue;
        m->fn(m, t, (int)(unsigned)w, first);
        first = 0;
        atomic_fetch_add(&m->done, 1);
    }
}

static void *worker(void *p) {
    worker_arg *a = p;
    hd_model *m = a->m;
    unsigned seen = 0, now; /* generation 0 has no work: a worker that starts late still sees every later one, quit included */
    for (;;) {
        double since = now_us();
        int spins = 0;
        while ((now = (unsigned)(atomic_load(&m->work) >> 32)) == seen) {
            relax();
            if (++spins % 64 || now_us() - since < SPIN_US) continue;
            pthread_mutex_lock(&m->mutex);
            atomic_fetch_add(&m->sleepers, 1);
            while ((now = (unsigned)(atomic_load(&m->work) >> 32)) == seen) pthread_cond_wait(&m->wake, &m->mutex);
            atomic_fetch_sub(&m->sleepers, 1);
            pthread_mutex_unlock(&m->mutex);
            break;
        }
        seen = now;
        if (atomic_load(&m->quit)) return NULL;
        claim(m, a->id, seen);
    }
}

static void publish(hd_model *m, chunk_fn fn, int chunks) {
    /* Close the finished phase before touching `fn` and `chunks`: a worker still in claim() for
     * it may read the new chunk count beside its old work word, and its compare-exchange must then
     * fail (the word moved on) rather than run a chunk of the next phase before it is published
     * (run twice, it would add a residual twice). The closing generation has nothing to claim. */
    atomic_store(&m->work, ((unsigned long long)(++m->generation) << 32) | 0xFFFFFFFFull);
    m->fn = fn;
    m->chunks = chunks;
    atomic_store(&m->done, 0);
    atomic_store(&m->work, (unsigned long long)(++m->generation) << 32);
    if (atomic_load(&m->sleepers)) {
        pthread_mutex_lock(&m->mutex);
        pthread_cond_broadcast(&m->wake);
        pthread_mutex_unlock(&m->mutex);
    }
}

/* Run a phase of `chunks` chunks on the pool; the caller's thread works too and never waits for
 * a worker that has not claimed anything (one that lost its core to another process). */
static void run(hd_model *m, chunk_fn fn, int chunks) {
    publish(m, fn, chunks);
    claim(m, 0, m->generation);
    int spins = 0;
    while (atomic_load(&m->done) < chunks)
        if (++spins % 256 == 0)
            sched_yield(); /* a worker holding the last chunk gets its core back sooner */
        else
            relax();
}

static void *aligned(size_t floats) {
    void *p = NULL;
    if (posix_memalign(&p, 64, floats * sizeof(float) + 64) != 0) return NULL;
    return p;
}

void hd_free(hd_model *m) {
    if (!m) return;
    if (m->started) {
        atomic_store(&m->quit, 1);
        publish(m, NULL, 0);
        for (int t = 1; t < m->started; t++) pthread_join(m->threads[t], NULL);
    }
    free(m->layers);
    free(m->x);
    free(m->qkv);
    free(m->att);
    free(m->ff);
    for (int t = 0; t < MAX_THREADS; t++) {
        free(m->normed[t]);
        free(m->scores[t]);
    }
    pthread_mutex_destroy(&m->mutex);
    pthread_cond_destroy(&m->wake);
    free(m);
}

int hd_max_rows(void) { return MAX_ROWS; }
int hd_panel(void) { return PANEL; }

/* dims: n_layer, n_head, n_embd, n_inner, vocab, max_len, threads; globals: wte, wpe, ln_f_w, ln_f_b, head panels. */
hd_model *hd_create(const int *dims, float eps, const float *const *globals, const float *const *layers) {
    hd_model *m = calloc(1, sizeof(hd_model));
    if (!m) return NULL;
    pthread_mutex_init(&m->mutex, NULL);
    pthread_cond_init(&m->wake, NULL);
    m->n_layer = dims[0];
    m->n_head = dims[1];
    m->n_embd = dims[2];
    m->head_dim = dims[2] / dims[1];
    m->n_inner = dims[3];
    m->vocab = dims[4];
    m->max_len = dims[5];
    m->n_threads = dims[6] < 1 ? 1 : dims[6] > MAX_THREADS ? MAX_THREADS : dims[6];
    m->eps = eps;
    m->wte = globals[0];
    m->wpe = globals[1];
    m->ln_f_w = globals[2];
    m->ln_f_b = globals[3];
    m->head_p = globals[4];
    m->layers = malloc(sizeof(float *) * (size_t)m->n_layer * PER_LAYER);
    size_t R = MAX_ROWS, C = (size_t)m->n_embd;
    m->x = aligned(R * C);
    m->qkv = aligned(R * 3 * C);
    m->att = aligned(R * C);
    m->ff = aligned(R * (size_t)m->n_inner);
    int ok = m->layers && m->x && m->qkv && m->att && m->ff;
    for (int t = 0; t < m->n_threads && ok; t++) {
        m->normed[t] = aligned(R * C);
        m->scores[t] = aligned((size_t)m->max_len);
        ok = m->normed[t] && m->scores[t];
    }
    if (!ok) {
        hd_free(m);
        return NULL;
    }
    memcpy(m->layers, layers, sizeof(float *) * (size_t)m->n_layer * PER_LAYER);
    m->started = 1;
    for (int t = 1; t < m->n_threads; t++) {
        worker_arg *a = &m->args[t];
        a->m = m;
        a->id = t;
        if (pthread_create(&m->threads[t], NULL, worker, a) != 0) break;
        m->started = t + 1;
    }
    m->n_threads = m->started;
    return m;
}

/* ---- arithmetic ------------------------------------------------------------------------------ */

typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));
typedef int i16v __attribute__((vector_size(64)));

static inline float hsum(v16 v) {
    v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

/* e^x for x <= 0 (softmax after subtracting the maximum), within ~2 ulp: x = n ln2 + r with
 * |r| <= ln2 / 2, e^r by its Taylor polynomial to r^7, 2^n put into the exponent bits. Inputs
 * below -87 give e^-87 (~2e-38): weights that small add nothing to a softmax. */
static inline v16 exp_nonpositive(v16 x) {
    const v16 lo = (v16){0} - 87.0f;
    i16v below = x < lo;
    x = (v16)(((i16v)x & ~below) | ((i16v)lo & below));
    const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    v16 t = x * 1.44269504088896341f + shifter;
    v16 n = t - shifter;
    v16 r = x - n * 0.693145751953125f - n * 1.42860682030941723212e-6f;
    v16 p = (v16){0} + 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    i16v bits = ((i16v)t - 0x4B400000 + 127) << 23;
    return p * (v16)bits;
}

static void layer_norm(const float *x, float *out, int rows, int C, const float *w, const float *b, float eps) {
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * C;
        float *o = out + (size_t)r * C;
        float mean = 0.f;
        for (int i = 0; i < C; i++) mean += xr[i];
        mean /= (float)C;
        float var = 0.f;
        for (int i = 0; i < C; i++) {
            float d = xr[i] - mean;
            var += d * d;
        }
        var /= (float)C;
        float inv = 1.0f / sqrtf(var + eps);
        for (int i = 0; i < C; i++) o[i] = (xr[i] - mean) * inv * w[i] + b[i];
    }
}

/* acc (B x PANEL) = x (B x in, rows ldx apart) times one panel (in x PANEL). B is a constant
 * where this is inlined, so the B x 2 sums live in registers. */
static inline __attribute__((always_inline)) void panel_product(int B, const float *restrict x, int ldx, const float *restrict P, int in,
                                                                 float *restrict acc) {
    v16 s0[GROUP], s1[GROUP];
    for (int b = 0; b < B; b++) s0[b] = s1[b] = (v16){0};
    for (int k = 0; k < in; k++) {
        v16 w0 = load16(P + (size_t)k * PANEL), w1 = load16(P + (size_t)k * PANEL + 16);
        for (int b = 0; b < B; b++) {
            float xb = x[(size_t)b * ldx + k];
            s0[b] += xb * w0;
            s1[b] += xb * w1;
        }
    }
    for (int b = 0; b < B; b++) {
        store16(acc + b * PANEL, s0[b]);
        store16(acc + b * PANEL + 16, s1[b]);
    }
}

enum { OUT_SET, OUT_ADD, OUT_GELU };

/* y[:, cols of panels p0..p1) = x W (+ bias); OUT_ADD adds to y (the residual), OUT_GELU applies GELU.
 * Rows go GROUP at a time through a panel: the first group streams it from memory, the others
 * find it in cache. */
static void linear_panels(int B, const float *x, int in, const float *panels, const float *bias, int out, float *y, int ldy, int p0, int p1,
                          int mode) {
    float acc[GROUP * PANEL] __attribute__((aligned(64)));
    for (int p = p0; p < p1; p++) {
        const float *P = panels + (size_t)p * in * PANEL;
        int j0 = p * PANEL, n = out - j0 < PANEL ? out - j0 : PANEL;
        for (int r0 = 0; r0 < B; r0 += GROUP) {
            const float *xg = x + (size_t)r0 * in;
            int rows = B - r0 < GROUP ? B - r0 : GROUP;
            switch (rows) {
                case 1: panel_product(1, xg, in, P, in, acc); break;
                case 2: panel_product(2, xg, in, P, in, acc); break;
                case 3: panel_product(3, xg, in, P, in, acc); break;
                case 4: panel_product(4, xg, in, P, in, acc); break;
                case 5: panel_product(5, xg, in, P, in, acc); break;
                case 6: panel_product(6, xg, in, P, in, acc); break;
                case 7: panel_product(7, xg, in, P, in, acc); break;
                default: panel_product(8, xg, in, P, in, acc); break;
            }
            for (int b = 0; b < rows; b++) {
                float *yr = y + (size_t)(r0 + b) * ldy + j0;
                const float *a = acc + b * PANEL;
                if (mode == OUT_ADD)
                    for (int j = 0; j < n; j++) yr[j] += a[j] + bias[j0 + j];
                else if (mode == OUT_GELU)
                    for (int j = 0; j < n; j++) {
                        float u = a[j] + bias[j0 + j];
                        yr[j] = 0.5f * u * (1.0f + erff(u * 0.70710678118654752f));
                    }
                else if (bias)
                    for (int j = 0; j < n; j++) yr[j] = a[j] + bias[j0 + j];
                else
                    for (int j = 0; j < n; j++) yr[j] = a[j];
            }
        }
    }
}

static inline int panels_of(int n) { return (n + PANEL - 1) / PANEL; }

static float dot(const float *a, const float *b, int n) {
    v16 s = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16) s += load16(a + i) * load16(b + i);
    float t = hsum(s);
    for (; i < n; i++) t += a[i] * b[i];
    return t;
}

/* ---- the phases of a layer, as chunks ------------------------------------------------------- */

#define HEAD_CHUNK 16 /* LM head panels per chunk: few claims, still fine enough to balance */

static inline const float *const *layer_weights(const hd_model *m) { return m->layers + (size_t)m->layer * PER_LAYER; }

static void chunk_qkv(hd_model *m, int t, int p, int first) {
    const float *const *w = layer_weights(m);
    int C = m->n_embd;
    if (first) layer_norm(m->x, m->normed[t], m->B, C, w[LN1_W], w[LN1_B], m->eps);
    linear_panels(m->B, m->normed[t], C, w[QKV_P], w[QKV_B], 3 * C, m->qkv, 3 * C, p, p + 1, OUT_SET);
}

/* Row b, head h: write the new key and value into the cache, attend over positions 0..pos. */
static void chunk_attention(hd_model *m, int t, int i, int first) {
    (void)first;
    int C = m->n_embd, H = m->n_head, D = m->head_dim, S = m->S;
    int b = i / H, hh = i % H, pos = m->positions[b], len = pos + 1;
    float scale = 1.0f / sqrtf((float)D);
    float *scores = m->scores[t];
    const float *q = m->qkv + (size_t)b * 3 * C + hh * D;
    float *K = m->keys[m->layer] + ((size_t)b * H + hh) * S * D, *V = m->values[m->layer] + ((size_t)b * H + hh) * S * D;
    memcpy(K + (size_t)pos * D, q + C, sizeof(float) * D);
    memcpy(V + (size_t)pos * D, q + 2 * C, sizeof(float) * D);
    float top = -INFINITY;
    for (int p = 0; p < len; p++) {
        float s = dot(q, K + (size_t)p * D, D) * scale;
        scores[p] = s;
        top = s > top ? s : top;
    }
    v16 sums = {0};
    int p = 0;
    for (; p + 16 <= len; p += 16) {
        v16 e = exp_nonpositive(load16(scores + p) - top);
        store16(scores + p, e);
        sums += e;
    }
    float total = hsum(sums);
    for (; p < len; p++) {
        float e = expf(scores[p] - top);
        scores[p] = e;
        total += e;
    }
    float inv = 1.0f / total;
    float *out = m->att + (size_t)b * C + hh * D;
    for (int d = 0; d < D; d++) out[d] = 0.f;
    for (int p = 0; p < len; p++) {
        const float *v = V + (size_t)p * D;
        float wgt = scores[p] * inv;
        for (int d = 0; d < D; d++) out[d] += wgt * v[d];
    }
}

static void chunk_proj(hd_model *m, int t, int p, int first) {
    (void)t, (void)first;
    const float *const *w = layer_weights(m);
    int C = m->n_embd;
    linear_panels(m->B, m->att, C, w[PROJ_P], w[PROJ_B], C, m->x, C, p, p + 1, OUT_ADD);
}

static void chunk_fc(hd_model *m, int t, int p, int first) {
    const float *const *w = layer_weights(m);
    int C = m->n_embd, F = m->n_inner;
    if (first) layer_norm(m->x, m->normed[t], m->B, C, w[LN2_W], w[LN2_B], m->eps);
    linear_panels(m->B, m->normed[t], C, w[FC_P], w[FC_B], F, m->ff, F, p, p + 1, OUT_GELU);
}

static void chunk_out(hd_model *m, int t, int p, int first) {
    (void)t, (void)first;
    const float *const *w = layer_weights(m);
    int C = m->n_embd, F = m->n_inner;
    linear_panels(m->B, m->ff, F, w[OUT_P], w[OUT_B], C, m->x, C, p, p + 1, OUT_ADD);
}

static void chunk_head(hd_model *m, int t, int c, int first) {
    int C = m->n_embd, panels = panels_of(m->vocab);
    if (first) layer_norm(m->x, m->normed[t], m->B, C, m->ln_f_w, m->ln_f_b, m->eps);
    int p1 = (c + 1) * HEAD_CHUNK < panels ? (c + 1) * HEAD_CHUNK : panels;
    linear_panels(m->B, m->normed[t], C, m->head_p, NULL, m->vocab, m->logits, m->vocab, c * HEAD_CHUNK, p1, OUT_SET);
}

/* One decode step for rows 0..B-1 of the cache: token b at position positions[b].
 * keys / values: per layer the base of its (rows, H, S, D) cache array. logits: (B, vocab). */
int hd_step(hd_model *m, int B, const int *tokens, const int *positions, float *const *keys, float *const *values, int S, float *logits) {
    if (B < 1 || B > MAX_ROWS || S > m->max_len) return 1;
    const int C = m->n_embd;
    for (int b = 0; b < B; b++) {
        if (positions[b] < 0 || positions[b] >= S || tokens[b] < 0 || tokens[b] >= m->vocab) return 2;
        const float *te = m->wte + (size_t)tokens[b] * C, *pe = m->wpe + (size_t)positions[b] * C;
        for (int i = 0; i < C; i++) m->x[(size_t)b * C + i] = te[i] + pe[i];
    }
    m->B = B;
    m->S = S;
    m->positions = positions;
    m->keys = keys;
    m->values = values;
    m->logits = logits;
    for (int l = 0; l < m->n_layer; l++) {
        m->layer = l;
        run(m, chunk_qkv, panels_of(3 * C));
        run(m, chunk_attention, B * m->n_head);
        run(m, chunk_proj, panels_of(C));
        run(m, chunk_fc, panels_of(m->n_inner));
        run(m, chunk_out, panels_of(C));
    }
    run(m, chunk_head, (panels_of(m->vocab) + HEAD_CHUNK - 1) / HEAD_CHUNK);
    return 0;
}

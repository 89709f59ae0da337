/* One GPT-2 decode step for a few rows, in one call: the lean host path of model/cpu/host_decode.py.
 *
 * A decode step of MLX on the CPU dispatches some 300 kernels, each costing more to schedule
 * than the arithmetic of a few rows; this file runs the same step (embeddings, pre-LayerNorm
 * blocks, attention over each row's own cached length, exact erf GELU, final LayerNorm, LM head)
 * as plain loops around the process's BLAS, writing each new key and value into the KV cache
 * arrays that MLX owns (their memory is shared, see host_decode.py), so prefills in MLX and
 * decode steps here read and write one cache.
 *
 * Layouts (all float32, row-major):
 *   linear weights (out, in) as MLX holds them: y = x W^T + b;
 *   the LM head (C, V): logits = x H;
 *   the cache of each layer (rows, H, S, D): row b's keys of head h at position p are at
 *   ((b * H + h) * S + p) * D.
 * The BLAS functions are handed in as pointers (the ones the process already loaded).
 * Compiled on first use (host_decode.py), never at import.
 */

#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { CblasRowMajor = 101, CblasNoTrans = 111, CblasTrans = 112 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int, float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float, float *, int);

/* Per layer, in this order (what host_decode.py hands in). */
enum { LN1_W, LN1_B, ATTN_W, ATTN_B, ATTN_PROJ_W, ATTN_PROJ_B, LN2_W, LN2_B, FC_W, FC_B, MLP_PROJ_W, MLP_PROJ_B, PER_LAYER };

typedef struct {
    int n_layer, n_head, head_dim, n_embd, n_inner, vocab, max_rows;
    float eps;
    const float *wte, *wpe, *ln_f_w, *ln_f_b, *head;
    const float **layers; /* n_layer * PER_LAYER pointers */
    sgemm_fn sgemm;
    sgemv_fn sgemv;
    /* scratch for max_rows rows */
    float *x, *h, *qkv, *att, *ff, *scores;
} hd_model;

static void *aligned(size_t floats) {
    void *p = NULL;
    if (posix_memalign(&p, 64, floats * sizeof(float) + 64) != 0) return NULL;
    return p;
}

void hd_free(hd_model *m) {
    if (!m) return;
    free(m->layers);
    free(m->x);
    free(m->h);
    free(m->qkv);
    free(m->att);
    free(m->ff);
    free(m->scores);
    free(m);
}

/* dims: n_layer, n_head, n_embd, n_inner, vocab, max_rows, max_len; globals: wte, wpe, ln_f_w, ln_f_b, head. */
hd_model *hd_create(const int *dims, float eps, const float *const *globals, const float *const *layers, void *sgemm, void *sgemv) {
    hd_model *m = calloc(1, sizeof(hd_model));
    if (!m) return NULL;
    m->n_layer = dims[0];
    m->n_head = dims[1];
    m->n_embd = dims[2];
    m->head_dim = dims[2] / dims[1];
    m->n_inner = dims[3];
    m->vocab = dims[4];
    m->max_rows = dims[5];
    int max_len = dims[6];
    m->eps = eps;
    m->wte = globals[0];
    m->wpe = globals[1];
    m->ln_f_w = globals[2];
    m->ln_f_b = globals[3];
    m->head = globals[4];
    m->layers = malloc(sizeof(float *) * (size_t)m->n_layer * PER_LAYER);
    if (m->layers) memcpy(m->layers, layers, sizeof(float *) * (size_t)m->n_layer * PER_LAYER);
    m->sgemm = (sgemm_fn)sgemm;
    m->sgemv = (sgemv_fn)sgemv;
    size_t R = (size_t)m->max_rows, C = (size_t)m->n_embd;
    m->x = aligned(R * C);
    m->h = aligned(R * C);
    m->qkv = aligned(R * 3 * C);
    m->att = aligned(R * C);
    m->ff = aligned(R * (size_t)m->n_inner);
    m->scores = aligned((size_t)max_len);
    if (!m->layers || !m->x || !m->h || !m->qkv || !m->att || !m->ff || !m->scores) {
        hd_free(m);
        return NULL;
    }
    return m;
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

/* y (rows, out) = x (rows, in) W^T (+ bias) (+ y when accumulate: the residual add). */
static void linear(const hd_model *m, const float *x, int rows, int in, const float *W, const float *bias, int out, float *y, int accumulate) {
    if (rows == 1)
        m->sgemv(CblasRowMajor, CblasNoTrans, out, in, 1.0f, W, in, x, 1, accumulate ? 1.0f : 0.0f, y, 1);
    else
        m->sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, out, in, 1.0f, x, in, W, in, accumulate ? 1.0f : 0.0f, y, out);
    for (int r = 0; r < rows; r++) {
        float *yr = y + (size_t)r * out;
        for (int j = 0; j < out; j++) yr[j] += bias[j];
    }
}

/* Scaled dot-product attention of one query over `len` cached positions of one head. */
static void attend(const float *q, const float *K, const float *V, int len, int D, float scale, float *scores, float *out) {
    float top = -INFINITY;
    for (int p = 0; p < len; p++) {
        const float *k = K + (size_t)p * D;
        float s = 0.f;
        for (int d = 0; d < D; d++) s += q[d] * k[d];
        s *= scale;
        scores[p] = s;
        if (s > top) top = s;
    }
    float total = 0.f;
    for (int p = 0; p < len; p++) {
        float e = expf(scores[p] - top);
        scores[p] = e;
        total += e;
    }
    float inv = 1.0f / total;
    for (int d = 0; d < D; d++) out[d] = 0.f;
    for (int p = 0; p < len; p++) {
        const float *v = V + (size_t)p * D;
        float w = scores[p] * inv;
        for (int d = 0; d < D; d++) out[d] += w * v[d];
    }
}

/* One decode step for rows 0..B-1 of the cache: token b at position positions[b].
 * keys / values: per layer the base of its (rows, H, S, D) cache array. logits: (B, vocab). */
int hd_step(hd_model *m, int B, const int *tokens, const int *positions, float *const *keys, float *const *values, int S, float *logits) {
    if (B < 1 || B > m->max_rows) return 1;
    const int C = m->n_embd, H = m->n_head, D = m->head_dim, F = m->n_inner;
    const float scale = 1.0f / sqrtf((float)D);
    for (int b = 0; b < B; b++) {
        if (positions[b] < 0 || positions[b] >= S || tokens[b] < 0 || tokens[b] >= m->vocab) return 2;
        const float *te = m->wte + (size_t)tokens[b] * C, *pe = m->wpe + (size_t)positions[b] * C;
        for (int i = 0; i < C; i++) m->x[(size_t)b * C + i] = te[i] + pe[i];
    }
    for (int l = 0; l < m->n_layer; l++) {
        const float *const *w = m->layers + (size_t)l * PER_LAYER;
        layer_norm(m->x, m->h, B, C, w[LN1_W], w[LN1_B], m->eps);
        linear(m, m->h, B, C, w[ATTN_W], w[ATTN_B], 3 * C, m->qkv, 0);
        for (int b = 0; b < B; b++) {
            const float *q = m->qkv + (size_t)b * 3 * C, *k = q + C, *v = q + 2 * C;
            int pos = positions[b];
            for (int hh = 0; hh < H; hh++) {
                size_t base = ((size_t)b * H + hh) * S * D;
                memcpy(keys[l] + base + (size_t)pos * D, k + hh * D, sizeof(float) * D);
                memcpy(values[l] + base + (size_t)pos * D, v + hh * D, sizeof(float) * D);
                attend(q + hh * D, keys[l] + base, values[l] + base, pos + 1, D, scale, m->scores, m->att + (size_t)b * C + hh * D);
            }
        }
        linear(m, m->att, B, C, w[ATTN_PROJ_W], w[ATTN_PROJ_B], C, m->x, 1);
        layer_norm(m->x, m->h, B, C, w[LN2_W], w[LN2_B], m->eps);
        linear(m, m->h, B, C, w[FC_W], w[FC_B], F, m->ff, 0);
        for (size_t i = 0; i < (size_t)B * F; i++) {
            float u = m->ff[i];
            m->ff[i] = 0.5f * u * (1.0f + erff(u * 0.70710678118654752f));
        }
        linear(m, m->ff, B, F, w[MLP_PROJ_W], w[MLP_PROJ_B], C, m->x, 1);
    }
    layer_norm(m->x, m->h, B, C, m->ln_f_w, m->ln_f_b, m->eps);
    if (B == 1)
        m->sgemv(CblasRowMajor, CblasTrans, C, m->vocab, 1.0f, m->head, m->vocab, m->h, 1, 0.0f, logits, 1);
    else
        m->sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, B, m->vocab, C, 1.0f, m->h, C, m->head, m->vocab, 0.0f, logits, m->vocab);
    return 0;
}

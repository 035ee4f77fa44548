/* The book's tanh GELU and its backward as diygpt.lean computes them, bit for bit, in one pass.
 *
 * The book's GELU, 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))), is eight
 * elementwise torch ops, and diygpt.lean's backward (autograd's formulas, in its order) a
 * dozen more, each a pass over a (B, T, 4C) tensor through freshly allocated memory: for
 * book-124m, 1.5M elements per block and layer, a few hundred ms of a CPU training step.
 * Here the same float32 operations, rounded where torch rounds them, run over blocks that
 * stay in cache, shared among torch's OpenMP threads (see adamw_step.c and diygpt/native.py).
 *
 * Per element, each line rounding to float32 (S = sqrt(2/pi) as a float, K = 0.044715f):
 *   forward:  t = tanh(((x * x * x) * K + x) * S)    h = x * 0.5    y = h * (t + 1)
 *   backward: gt = (g * h) * fma(-t, t, 1)           torch's tanh_backward
 *             gi = gt * S
 *             dx = (gi + (gi * K) * ((x * x) * 3)) + (g * (t + 1)) * 0.5
 * torch's tanh on x86 is MKL's vmsTanh (high-accuracy mode); the caller passes it from
 * torch's own library, or NULL for C's tanhf, whichever agrees with torch at load time
 * (diygpt/fast_gelu.py). Built with -ffp-contract=off: only the fma above is fused.
 *
 * As in adamw_step.c, with flush-to-zero on in the calling thread (torch.set_flush_denormal,
 * which sets it there only) torch's result depends on how its threads split the work, so
 * both functions then refuse (return 1, nothing written) and torch's ops run instead.
 */
#include <math.h>
#include <stdint.h>

#include "native_fp.h"

enum { BLOCK = 2048, MIN_PER_THREAD = 1 << 15 };

typedef void (*vml_fn)(int n, const float *in, float *out, int64_t mode);

static void tanh_block(vml_fn vtanh, int64_t mode, const float *in, float *out, int64_t n) {
    if (vtanh) {
        vtanh((int)n, in, out, mode);
    } else {
        for (int64_t i = 0; i < n; i++) out[i] = tanhf(in[i]);
    }
}

/* tanh's input, then t, for one block of x. */
static void block_t(const float *x, float *t, int64_t n, float s, float k, vml_fn vtanh,
                    int64_t mode) {
    float inner[BLOCK];
    for (int64_t i = 0; i < n; i++) inner[i] = ((x[i] * x[i] * x[i]) * k + x[i]) * s;
    tanh_block(vtanh, mode, inner, t, n);
}

static int thread_count(int threads, int64_t n) {
    if (threads > n / MIN_PER_THREAD) threads = (int)(n / MIN_PER_THREAD);
    return threads < 1 ? 1 : threads;
}

/* y = GELU(x); with `half` and `tanh_out` not NULL, also 0.5 x and t (diygpt.lean's parts).
 * Returns 0, or 1 when refused. */
int diygpt_gelu_forward(const float *x, float *y, float *half, float *tanh_out, int64_t n,
                        float s, float k, vml_fn vtanh, int64_t mode, int threads) {
    if (diygpt_flushing_denormals()) return 1;
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
    threads = thread_count(threads, n);
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t start = b * BLOCK, m = n - start < BLOCK ? n - start : BLOCK;
        float own[BLOCK];
        float *t = tanh_out ? tanh_out + start : own;
        block_t(x + start, t, m, s, k, vtanh, mode);
        for (int64_t i = 0; i < m; i++) {
            float h = x[start + i] * 0.5f;
            if (half) half[start + i] = h;
            y[start + i] = h * (t[i] + 1.0f);
        }
    }
    return 0;
}

/* dx from the output's gradient g; t (tanh's output) recomputed from x when NULL.
 * Returns 0, or 1 when refused. */
int diygpt_gelu_backward(const float *g, const float *x, const float *tanh_in, float *dx,
                         int64_t n, float s, float k, vml_fn vtanh, int64_t mode, int threads) {
    if (diygpt_flushing_denormals()) return 1;
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
    threads = thread_count(threads, n);
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t start = b * BLOCK, m = n - start < BLOCK ? n - start : BLOCK;
        float own[BLOCK];
        const float *t = tanh_in ? tanh_in + start : own;
        if (!tanh_in) block_t(x + start, own, m, s, k, vtanh, mode);
        for (int64_t i = 0; i < m; i++) {
            float xi = x[start + i], gi_out = g[start + i], ti = t[i];
            float h = xi * 0.5f;
            float grad_half = gi_out * (ti + 1.0f);
            float grad_t = (gi_out * h) * fmaf(-ti, ti, 1.0f);
            float grad_inner = grad_t * s;
            float grad_cube = grad_inner * k;
            dx[start + i] = (grad_inner + grad_cube * ((xi * xi) * 3.0f)) + grad_half * 0.5f;
        }
    }
    return 0;
}

/* torch's single-tensor AdamW update for one float32 parameter, bit for bit, in one pass.
 *
 * On the CPU, torch.optim.AdamW (torch 2.13 here; foreach and fused off, as they are by
 * default there) updates each parameter with eight elementwise ops, each a full pass over
 * memory: mul_ (weight decay), lerp_ (first moment), mul_ and addcmul_ (second moment),
 * sqrt, a division and add_ (denominator), addcdiv_ (the step). For book-124m that is 400 to
 * 700 ms a training step on two cores. Here the same float32 operations, rounded where torch
 * rounds them, run over blocks small enough to stay in cache: one trip to memory instead
 * of eight, and with OpenMP the blocks are shared among torch's threads.
 *
 * What torch computes, per element (each line rounds to float32):
 *   p = p * decay                         decay = 1 - lr * weight_decay
 *   m = fma(w, g - m, m)                  lerp_ with weight w = 1 - beta1 < 0.5
 *     = fma(w - 1, g - m, g)              ... and with w >= 0.5
 *   v = fma(c * g, g, v * beta2)          addcmul_ after mul_, c = 1 - beta2
 *   d = sqrt(v) / bc2 + eps               bc2 = sqrt(1 - beta2^step)
 *   p = p + (s * m) / d                   addcdiv_, s = -lr / (1 - beta1^step)
 * torch's sqrt on x86 is MKL's vmsSqrt in its high-accuracy mode, which is not always the
 * correctly rounded square root: the caller passes that function (from torch's own
 * library) or NULL where torch's sqrt is the exact one. Build with -ffp-contract=off so
 * that no other product and sum fuse. diygpt/fast_adamw.py builds this file, checks it
 * against torch at load time, and uses it only if they agree.
 *
 * torch.set_flush_denormal(True) sets the calling thread's flush-to-zero modes only, so
 * torch's own result then depends on which of its threads computes an element; with those
 * modes on, the update is refused (returns 1) and left to torch.
 */
#include <math.h>
#include <stdint.h>

#include "native_fp.h"

enum { BLOCK = 2048, MIN_PER_THREAD = 1 << 16 };

typedef void (*sqrt_fn)(int n, const float *in, float *out, int64_t mode);

/* The scalars in the order the caller passes them (float64, converted as torch does). */
typedef struct {
    float decay, w, beta2, c, bc2, eps, s;
    int small; /* w < 0.5: lerp_'s first form */
    sqrt_fn vsqrt;
    int64_t mode;
} update;

static void run_block(const update *u, float *restrict p, const float *restrict g,
                      float *restrict m, float *restrict v, int64_t n) {
    float root[BLOCK];
    for (int64_t i = 0; i < n; i++) {
        float gi = g[i], mi = m[i];
        p[i] = p[i] * u->decay;
        m[i] = u->small ? fmaf(u->w, gi - mi, mi) : fmaf(u->w - 1.0f, gi - mi, gi);
        v[i] = fmaf(u->c * gi, gi, v[i] * u->beta2);
    }
    if (u->vsqrt) {
        u->vsqrt((int)n, v, root, u->mode);
    } else {
        for (int64_t i = 0; i < n; i++) root[i] = sqrtf(v[i]);
    }
    for (int64_t i = 0; i < n; i++) {
        float d = root[i] / u->bc2 + u->eps;
        p[i] = p[i] + (u->s * m[i]) / d;
    }
}

/* One parameter's update; `scalars` = decay, w, beta2, c, bc2, eps, s (see above).
 * Returns 0 when done, 1 when refused (nothing written). */
int diygpt_adamw_f32(float *p, const float *g, float *m, float *v, int64_t n,
                     const double *scalars, sqrt_fn vsqrt, int64_t mode, int threads) {
    if (diygpt_flushing_denormals()) return 1;
    update u = {(float)scalars[0], (float)scalars[1], (float)scalars[2], (float)scalars[3],
                (float)scalars[4], (float)scalars[5], (float)scalars[6],
                0, vsqrt, mode};
    u.small = fabsf(u.w) < 0.5f; /* torch tests the weight as a float */
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
    if (threads > n / MIN_PER_THREAD) threads = (int)(n / MIN_PER_THREAD);
    if (threads < 1) threads = 1;
    /* Built with -fopenmp, this runs on torch's own OpenMP threads (the process has loaded
     * torch's libgomp, which this library then shares): they are awake between torch's ops,
     * where threads of our own would wait for a core that one of them spins on. */
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t start = b * BLOCK;
        run_block(&u, p + start, g + start, m + start, v + start,
                  n - start < BLOCK ? n - start : BLOCK);
    }
    return 0;
}

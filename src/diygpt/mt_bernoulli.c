/* torch's CPU `Tensor.bernoulli_(p)`, draw for draw, vectorizable.
 *
 * torch (2.13 here) draws a CPU tensor's Bernoulli(p) values one element at a time from its
 * generator's MT19937 engine (aten's bernoulli_scalar_kernel_default): two 32-bit outputs
 * make a 53-bit uniform double, and the element is 1 where that double is below p. That
 * loop is serial and scalar: about 150 ms a training step for book-124m's dropout masks.
 * Here the engine's 624-word state is regenerated and tempered in plain loops the compiler
 * vectorizes, and the comparison is done in integers, for the same values and the same
 * final engine state. diygpt/fast_draws.py builds this file, checks it against torch at
 * load time, and uses it only if they agree.
 *
 * `raw` is the generator's state as torch.Generator.get_state() returns it (aten's
 * CPUGeneratorImplState): int32 `left` at byte 8, uint64 `next` at byte 16, and the 624
 * engine words, each stored as a uint64, from byte 24. They are read and written back.
 */
#include <stdint.h>
#include <string.h>

enum { N = 624, M = 397, CHUNK = 4096 };

typedef struct {
    uint32_t words[N];
    int32_t left;  /* the engine regenerates when a draw takes it from 1 to 0 */
    uint32_t next; /* index of the next word to temper */
} engine;

static inline uint32_t twist(uint32_t u, uint32_t v) {
    uint32_t mixed = (u & 0x80000000u) | (v & 0x7fffffffu);
    return (mixed >> 1) ^ (-(v & 1u) & 0x9908b0dfu);
}

/* Three loops as in aten's mt19937::next_state; each reads only words that are final. */
static void regenerate(uint32_t *s) {
    for (int i = 0; i < N - M; i++) s[i] = s[i + M] ^ twist(s[i], s[i + 1]);
    for (int i = N - M; i < N - 1; i++) s[i] = s[i + M - N] ^ twist(s[i], s[i + 1]);
    s[N - 1] = s[M - 1] ^ twist(s[N - 1], s[0]);
}

static inline uint32_t temper(uint32_t y) {
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    return y ^ (y >> 18);
}

/* The engine's next `count` outputs into dst. */
static void draw_words(engine *e, uint32_t *dst, int64_t count) {
    while (count > 0) {
        if (e->left == 1) {
            regenerate(e->words);
            e->left = N + 1;
            e->next = 0;
        }
        int64_t take = e->left - 1;
        if (take > count) take = count;
        const uint32_t *src = e->words + e->next;
        for (int64_t i = 0; i < take; i++) dst[i] = temper(src[i]);
        dst += take;
        count -= take;
        e->next += (uint32_t)take;
        e->left -= (int32_t)take;
    }
}

/* Element i of out is 1 where draw i is below p, else 0: a float, or one byte (bool, uint8,
 * int8). threshold = ceil(p * 2^53), so that (v / 2^53 < p) <=> (v < threshold) for the
 * 53-bit integer v of each draw. */
static void bernoulli(uint8_t *raw, void *out, int64_t n, uint64_t threshold, int bytes) {
    engine e;
    uint64_t stored[N], next;
    memcpy(&e.left, raw + 8, sizeof e.left);
    memcpy(&next, raw + 16, sizeof next);
    memcpy(stored, raw + 24, sizeof stored);
    e.next = (uint32_t)next;
    for (int i = 0; i < N; i++) e.words[i] = (uint32_t)stored[i];

    uint32_t w[2 * CHUNK];
    for (int64_t start = 0; start < n; start += CHUNK) {
        int64_t len = n - start < CHUNK ? n - start : CHUNK;
        draw_words(&e, w, 2 * len);
        /* random64(): the first output is the high half; 53 bits are kept */
        if (bytes) {
            uint8_t *o = (uint8_t *)out + start;
            for (int64_t i = 0; i < len; i++)
                o[i] = (((uint64_t)(w[2 * i] & 0x1fffffu) << 32) | w[2 * i + 1]) < threshold;
        } else {
            float *o = (float *)out + start;
            for (int64_t i = 0; i < len; i++)
                o[i] = (((uint64_t)(w[2 * i] & 0x1fffffu) << 32) | w[2 * i + 1]) < threshold
                           ? 1.0f : 0.0f;
        }
    }

    memcpy(raw + 8, &e.left, sizeof e.left);
    next = e.next;
    memcpy(raw + 16, &next, sizeof next);
    for (int i = 0; i < N; i++) stored[i] = e.words[i];
    memcpy(raw + 24, stored, sizeof stored);
}

void diygpt_bernoulli_f32(uint8_t *raw, float *out, int64_t n, uint64_t threshold) {
    bernoulli(raw, out, n, threshold, 0);
}

void diygpt_bernoulli_u8(uint8_t *raw, uint8_t *out, int64_t n, uint64_t threshold) {
    bernoulli(raw, out, n, threshold, 1);
}

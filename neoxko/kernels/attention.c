#include "common.h"

/* Attention of one query per (batch row, head) over a key/value cache, as decoding needs it: scores in fp32 from
 * the cache as stored (bf16 or fp32), softmax in fp32, the weighted sum of values in fp32. Each (row, head) reads its
 * keys and values once; slots the mask hides are not read at all. q and out (B, H, D) contiguous; k and v with
 * strides (row, head, slot) in elements and contiguous D; mask (B or 1, S) bytes, row stride mstride (0: shared).
 * D must be a multiple of the vector width (16 floats with AVX-512, 8 with AVX2). */
#ifdef NK_AVX512
#define VW 16
typedef __m512 vf;
static inline vf vload(const void *p, int type, int64_t i) {
    return type ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                      _mm256_loadu_si256((const void *)((const uint16_t *)p + i))), 16))
                : _mm512_loadu_ps((const float *)p + i);
}
#define vfma _mm512_fmadd_ps
#define vzero _mm512_setzero_ps
#define vset1 _mm512_set1_ps
#define vsum hsum512
#define vstore _mm512_storeu_ps
#else
#define VW 8
typedef __m256 vf;
static inline vf vload(const void *p, int type, int64_t i) {
    return type ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(
                      _mm_loadu_si128((const void *)((const uint16_t *)p + i))), 16))
                : _mm256_loadu_ps((const float *)p + i);
}
#define vfma _mm256_fmadd_ps
#define vzero _mm256_setzero_ps
#define vset1 _mm256_set1_ps
#define vsum hsum256
#define vstore _mm256_storeu_ps
#endif
#define MAXD 256 /* head sizes up to this many values */

int nk_attend_one(const void *q, const void *k, const void *v, int type, int64_t B, int64_t H, int64_t S,
                  int64_t D, int64_t kb, int64_t kh, int64_t ks, int64_t vb, int64_t vh, int64_t vs,
                  const uint8_t *mask, int64_t mstride, float scale, void *out) {
    if (D % VW || D > MAXD) return -2;
    int failed = 0;
#pragma omp parallel
    {
        float *p = malloc(sizeof(float) * (size_t)S);
        if (!p) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            if (!p) continue;
            int64_t b = bh / H, h = bh % H;
            const uint8_t *m = mask + b * mstride;
            vf qv[MAXD / VW];
            for (int64_t d = 0; d < D; d += VW) qv[d / VW] = vload(q, type, bh * D + d);
            float top = -INFINITY;
            int64_t s = 0;
            for (; s + 4 <= S; s += 4) { /* four keys at once: four independent chains of FMAs */
                if (!(m[s] & m[s + 1] & m[s + 2] & m[s + 3])) break;
                int64_t at = b * kb + h * kh + s * ks;
                vf a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
                for (int64_t d = 0; d < D; d += VW) {
                    a0 = vfma(qv[d / VW], vload(k, type, at + d), a0);
                    a1 = vfma(qv[d / VW], vload(k, type, at + ks + d), a1);
                    a2 = vfma(qv[d / VW], vload(k, type, at + 2 * ks + d), a2);
                    a3 = vfma(qv[d / VW], vload(k, type, at + 3 * ks + d), a3);
                }
                p[s] = vsum(a0) * scale, p[s + 1] = vsum(a1) * scale;
                p[s + 2] = vsum(a2) * scale, p[s + 3] = vsum(a3) * scale;
                for (int j = 0; j < 4; j++) top = p[s + j] > top ? p[s + j] : top;
            }
            for (; s < S; s++) { /* the rest, and wherever the mask has holes */
                if (!m[s]) continue;
                int64_t at = b * kb + h * kh + s * ks;
                vf acc = vzero();
                for (int64_t d = 0; d < D; d += VW) acc = vfma(qv[d / VW], vload(k, type, at + d), acc);
                p[s] = vsum(acc) * scale;
                top = p[s] > top ? p[s] : top;
            }
            float total = 0.f;
            for (s = 0; s < S; s++) {
                p[s] = m[s] ? expf(p[s] - top) : 0.f;
                total += p[s];
            }
            float inv = total > 0.f ? 1.f / total : 0.f;
            vf acc[MAXD / VW];
            for (int64_t d = 0; d < D; d += VW) acc[d / VW] = vzero();
            for (s = 0; s < S; s++) {
                if (!m[s]) continue;
                vf w = vset1(p[s] * inv);
                int64_t at = b * vb + h * vh + s * vs;
                for (int64_t d = 0; d < D; d += VW) acc[d / VW] = vfma(w, vload(v, type, at + d), acc[d / VW]);
            }
            float row[MAXD];
            for (int64_t d = 0; d < D; d += VW) vstore(row + d, acc[d / VW]);
            for (int64_t d = 0; d < D; d++) store_f(out, type, bh * D + d, row[d]);
        }
        free(p);
    }
    return failed ? -1 : 0;
}

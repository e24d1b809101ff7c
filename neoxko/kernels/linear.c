/* Matrix-vector and small matrix products for CPU decoding: y (M, N) = x (M, K) @ W.T + bias.
 *
 * Built at first use for the CPU it runs on (cc -O3 -march=native -fopenmp, neoxko/kernels/__init__.py) and
 * called through ctypes, on torch's OpenMP threads (the libgomp torch has loaded). Three weight formats:
 *   bf16  W (N, K) as stored (row-major), read a row at a time; AVX512_BF16 dot products, else bf16 -> fp32 by a
 *         shift and fp32 FMAs.
 *   int8  w = q * scale[n], symmetric per output row.
 *   int4  w = (q - 8) * scale[g] + zero[g] per group of G inputs, q in 0..15, bf16 scales and zeros (N, K / G);
 *         a 64-byte chunk holds 128 inputs of a row: input j in the low nibble of byte j, j + 64 in the high one.
 * int8 and int4 weights are tile-major: the NT rows a tile reads side by side are interleaved block by block
 * (QB inputs of int8, one 64-byte chunk of int4), so each thread reads one sequential stream; row-major, short
 * rows of 1-2 KB ran at half the bandwidth. N must be a multiple of NT there (the caller checks).
 * Their activations are quantized to int8 per block of QB inputs (scale = max |x| / 127, as llama.cpp's q8_0
 * does per 32) and multiplied int8 by int8 (VNNI vpdpbusd, or AVX2 vpmaddubsw), rescaled per block in fp32.
 * K must be a multiple of QB. Types: 0 float32, 1 bfloat16 (x, bias, y, int8 scales).
 */
#include "common.h"

#define QB 128  /* activation block: one scale per 128 inputs */
#define NT 4    /* output rows per tile */
#define MT 4    /* activation rows per tile */

/* Activations quantized per block of QB: xq (M, K) int8, xs (M, K / QB) scales, and per row
 * xsum[b] = xs[b] * sum(xq over block b), the block's sum as the products see it. */
typedef struct {
    int8_t *q;
    float *s;
    float *sum;
} qact;

/* Written for the auto-vectorizer (branch-free loops over one block): max |x| through the float bits, which
 * order as integers for non-negative floats, and rounding to nearest even by the CPU's default mode. */
static void quantize_block(const float *x, int8_t *q, float *scale, float *sum) {
    uint32_t bits[QB], amax = 0;
    memcpy(bits, x, sizeof bits);
    for (int i = 0; i < QB; i++) {
        uint32_t v = bits[i] & 0x7fffffffu;
        amax = v > amax ? v : amax;
    }
    float m;
    memcpy(&m, &amax, 4);
    float inv = m > 0.f ? 127.f / m : 0.f;
    int total = 0;
    for (int i = 0; i < QB; i++) {
        int v = (int)nearbyintf(x[i] * inv);
        v = v > 127 ? 127 : v < -127 ? -127 : v;
        q[i] = (int8_t)v;
        total += v;
    }
    *scale = m / 127.f;
    *sum = *scale * (float)total;
}

static int quantize_rows(const void *x, int xtype, int64_t M, int64_t K, qact *a) {
    int64_t nb = K / QB;
    a->q = aligned_alloc(64, (size_t)((M * K + 63) / 64 * 64));
    a->s = malloc(sizeof(float) * (size_t)(M * nb));
    a->sum = malloc(sizeof(float) * (size_t)(M * nb));
    if (!a->q || !a->s || !a->sum) return -1;
    float buf[QB];
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < nb; b++) {
            const float *src = buf;
            if (xtype) {
                const uint16_t *h = (const uint16_t *)x + m * K + b * QB;
                for (int i = 0; i < QB; i++) buf[i] = bf16_to_f32(h[i]);
            } else {
                src = (const float *)x + m * K + b * QB;
            }
            quantize_block(src, a->q + m * K + b * QB, a->s + m * nb + b, a->sum + m * nb + b);
        }
    return 0;
}

static void free_qact(qact *a) {
    free(a->q);
    free(a->s);
    free(a->sum);
}

static inline void finish_row(void *y, int ytype, int64_t N, int64_t m, int64_t n, float v, const void *bias,
                              int btype) {
    if (bias) v += load_f(bias, btype, n);
    store_f(y, ytype, m * N + n, v);
}


/* Tiles specialized on their row counts (compile-time constants), so the unrolled accumulators live in
 * registers: NT output rows by 1-4 activation rows, or a last partial tile one output row at a time. */
#define RUN_TILE(tile, nn, mm, n0, out, ...)                                                                   \
    do {                                                                                                       \
        if ((nn) == NT) {                                                                                      \
            switch (mm) {                                                                                      \
            case 1: tile(__VA_ARGS__, n0, out, NT, 1); break;                                                  \
            case 2: tile(__VA_ARGS__, n0, out, NT, 2); break;                                                  \
            case 3: tile(__VA_ARGS__, n0, out, NT, 3); break;                                                  \
            default: tile(__VA_ARGS__, n0, out, NT, 4); break;                                                 \
            }                                                                                                  \
        } else {                                                                                               \
            for (int r = 0; r < (nn); r++) {                                                                   \
                float one[NT][MT];                                                                             \
                switch (mm) {                                                                                  \
                case 1: tile(__VA_ARGS__, (n0) + r, one, 1, 1); break;                                         \
                case 2: tile(__VA_ARGS__, (n0) + r, one, 1, 2); break;                                         \
                case 3: tile(__VA_ARGS__, (n0) + r, one, 1, 3); break;                                         \
                default: tile(__VA_ARGS__, (n0) + r, one, 1, 4); break;                                        \
                }                                                                                              \
                memcpy(out[r], one[0], sizeof one[0]);                                                         \
            }                                                                                                  \
        }                                                                                                      \
    } while (0)

/* ---------------------------------------------------------------------------------------------- int8 */

#ifdef NK_AVX512
/* vpdpbusd multiplies unsigned by signed bytes: the weights go in as q + 128 (q ^ 0x80), and
 * 128 * sum(x) comes off afterwards (xsum). A block of 128 inputs is two 64-byte vectors, summed in int32 and
 * rescaled once. */
static inline __attribute__((always_inline)) void int8_tile(const qact *a, int64_t K, const int8_t *w, int64_t m0,
                                                            int64_t n0, float out[NT][MT], int nn, int mm) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512 acc[NT][MT];
    for (int i = 0; i < NT; i++)
        for (int j = 0; j < MT; j++) acc[i][j] = _mm512_setzero_ps();
    int64_t nb = K / QB;
    for (int64_t b = 0; b < nb; b++) {
        __m512i w0[NT], w1[NT];
        for (int i = 0; i < nn; i++) {
            const int8_t *row = w + n0 * K + b * QB * NT + i * QB;
            w0[i] = _mm512_xor_si512(_mm512_loadu_si512((const void *)row), flip);
            w1[i] = _mm512_xor_si512(_mm512_loadu_si512((const void *)(row + 64)), flip);
        }
        for (int j = 0; j < mm; j++) {
            const int8_t *xb = a->q + (m0 + j) * K + b * QB;
            __m512i x0 = _mm512_loadu_si512((const void *)xb), x1 = _mm512_loadu_si512((const void *)(xb + 64));
            __m512 xs = _mm512_set1_ps(a->s[(m0 + j) * nb + b]);
            for (int i = 0; i < nn; i++) {
                __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w0[i], x0), w1[i], x1);
                acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), xs, acc[i][j]);
            }
        }
    }
    for (int j = 0; j < mm; j++) {
        float corr = 0.f;
        const float *sum = a->sum + (m0 + j) * nb;
        for (int64_t b = 0; b < nb; b++) corr += sum[b];
        for (int i = 0; i < nn; i++) out[i][j] = hsum512(acc[i][j]) - 128.f * corr;
    }
}
#else
/* vpmaddubsw multiplies unsigned by signed bytes into saturating int16 pairs: |w| by x with w's sign, so
 * no pair exceeds 2 * 127 * 127. */
static inline __m256i dot32(__m256i w, __m256i x) {
#ifdef __AVXVNNI__
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), _mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
#else
    __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
#endif
}

static inline __attribute__((always_inline)) void int8_tile(const qact *a, int64_t K, const int8_t *w, int64_t m0,
                                                            int64_t n0, float out[NT][MT], int nn, int mm) {
    __m256 acc[NT][MT];
    for (int i = 0; i < NT; i++)
        for (int j = 0; j < MT; j++) acc[i][j] = _mm256_setzero_ps();
    int64_t nb = K / QB;
    for (int64_t b = 0; b < nb; b++) {
        for (int j = 0; j < mm; j++) {
            const int8_t *xb = a->q + (m0 + j) * K + b * QB;
            __m256 xs = _mm256_set1_ps(a->s[(m0 + j) * nb + b]);
            for (int i = 0; i < nn; i++) {
                const int8_t *row = w + n0 * K + b * QB * NT + i * QB;
                __m256i d = _mm256_setzero_si256();
                for (int c = 0; c < QB; c += 32)
                    d = _mm256_add_epi32(d, dot32(_mm256_loadu_si256((const void *)(row + c)),
                                                  _mm256_loadu_si256((const void *)(xb + c))));
                acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), xs, acc[i][j]);
            }
        }
    }
    for (int j = 0; j < mm; j++)
        for (int i = 0; i < nn; i++) out[i][j] = hsum256(acc[i][j]);
}
#endif

int nk_int8_linear(const void *x, int xtype, int64_t M, int64_t K, const int8_t *w, const void *scale, int stype,
                   int64_t N, const void *bias, int btype, void *y, int ytype) {
    qact a;
    if (quantize_rows(x, xtype, M, K, &a)) {
        free_qact(&a);
        return -1;
    }
    int64_t tiles = (N + NT - 1) / NT;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        int64_t n0 = t * NT;
        int nn = N - n0 < NT ? (int)(N - n0) : NT;
        float out[NT][MT];
        for (int64_t m0 = 0; m0 < M; m0 += MT) {
            int mm = M - m0 < MT ? (int)(M - m0) : MT;
            RUN_TILE(int8_tile, nn, mm, n0, out, &a, K, w, m0);
            for (int i = 0; i < nn; i++)
                for (int j = 0; j < mm; j++)
                    finish_row(y, ytype, N, m0 + j, n0 + i, out[i][j] * load_f(scale, stype, n0 + i), bias, btype);
        }
    }
    free_qact(&a);
    return 0;
}

/* ---------------------------------------------------------------------------------------------- int4 */

/* x summed over each group of G inputs, as the products see it: (M, K / G). */
static float *group_sums(const qact *a, int64_t M, int64_t K, int64_t G) {
    int64_t nb = K / QB, ng = K / G;
    float *gs = calloc((size_t)(M * ng), sizeof(float));
    if (!gs) return NULL;
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < ng; g++) {
            if (G >= QB) {
                for (int64_t b = g * G / QB; b < (g + 1) * G / QB; b++) gs[m * ng + g] += a->sum[m * nb + b];
            } else {
                const int8_t *q = a->q + m * K + g * G;
                int total = 0;
                for (int64_t k = 0; k < G; k++) total += q[k];
                gs[m * ng + g] = a->s[m * nb + g * G / QB] * (float)total;
            }
        }
    return gs;
}

/* The groups' offsets, w = (q - 8) * scale + zero: sum over groups of (zero - 8 * scale) * (x summed over the
 * group), from the bf16 scales and zeros as stored (no rounded copy of zero - 8 * scale). */
static inline float zeros_dot(const float *gsum, const uint16_t *scales, const uint16_t *zeros, int64_t ng) {
    int64_t g = 0;
    float total = 0.f;
#ifdef NK_AVX512
    __m512 acc = _mm512_setzero_ps(), eight = _mm512_set1_ps(8.f);
    for (; g + 16 <= ng; g += 16) {
        __m512 z = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)(zeros + g))), 16));
        __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)(scales + g))), 16));
        acc = _mm512_fmadd_ps(_mm512_fnmadd_ps(eight, sc, z), _mm512_loadu_ps(gsum + g), acc);
    }
    total = hsum512(acc);
#else
    __m256 acc = _mm256_setzero_ps(), eight = _mm256_set1_ps(8.f);
    for (; g + 8 <= ng; g += 8) {
        __m256 z = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const void *)(zeros + g))), 16));
        __m256 sc = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const void *)(scales + g))), 16));
        acc = _mm256_fmadd_ps(_mm256_fnmadd_ps(eight, sc, z), _mm256_loadu_ps(gsum + g), acc);
    }
    total = hsum256(acc);
#endif
    for (; g < ng; g++) total += (bf16_to_f32(zeros[g]) - 8.f * bf16_to_f32(scales[g])) * gsum[g];
    return total;
}

#ifdef NK_AVX512
/* One chunk of 128 inputs (one activation block) is 64 bytes: input j in the low nibble of byte j, j + 64 in the
 * high one, so one load and two masks give two vectors of 0..15 for vpdpbusd (unsigned by signed, no offset). */
static inline __attribute__((always_inline)) void int4_tile(const qact *a, int64_t K, const uint8_t *q,
                                                            const uint16_t *scales, int gshift, int64_t m0,
                                                            int64_t n0, float out[NT][MT], int nn, int mm) {
    const __m512i low = _mm512_set1_epi8(0x0f), high = _mm512_set1_epi32((int)0xffff0000);
    __m512 acc[NT][MT];
    for (int i = 0; i < NT; i++)
        for (int j = 0; j < MT; j++) acc[i][j] = _mm512_setzero_ps();
    int64_t nb = K / QB, ng = K >> gshift;
    for (int64_t c = 0; c < nb; c++) {
        __m512i lo[NT], hi[NT];
        __m512 slo[NT], shi[NT];
        for (int i = 0; i < nn; i++) {
            __m512i v = _mm512_loadu_si512((const void *)(q + n0 * (K / 2) + c * 64 * NT + i * 64));
            lo[i] = _mm512_and_si512(v, low);
            hi[i] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            const uint16_t *s = scales + (n0 + i) * ng;
            if (gshift == 6) { /* two groups in the chunk */
                uint32_t pair;
                memcpy(&pair, s + 2 * c, 4);
                __m512i p = _mm512_set1_epi32((int)pair);
                slo[i] = _mm512_castsi512_ps(_mm512_slli_epi32(p, 16));
                shi[i] = _mm512_castsi512_ps(_mm512_and_si512(p, high));
            } else {
                slo[i] = shi[i] = _mm512_set1_ps(bf16_to_f32(s[(c * 128) >> gshift]));
            }
        }
        for (int j = 0; j < mm; j++) {
            const int8_t *xb = a->q + (m0 + j) * K + c * 128;
            __m512i x0 = _mm512_loadu_si512((const void *)xb), x1 = _mm512_loadu_si512((const void *)(xb + 64));
            __m512 xs = _mm512_set1_ps(a->s[(m0 + j) * nb + c]);
            for (int i = 0; i < nn; i++) {
                __m512 d0 = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[i], x0));
                __m512 d1 = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), hi[i], x1));
                acc[i][j] = _mm512_fmadd_ps(_mm512_fmadd_ps(d0, slo[i], _mm512_mul_ps(d1, shi[i])), xs, acc[i][j]);
            }
        }
    }
    for (int i = 0; i < nn; i++)
        for (int j = 0; j < mm; j++) out[i][j] = hsum512(acc[i][j]);
}
#else
static inline __m256i dotq32(__m256i q, __m256i x) { /* q in 0..15: no pair saturates */
#ifdef __AVXVNNI__
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), q, x);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), _mm256_set1_epi16(1));
#endif
}

static inline __attribute__((always_inline)) void int4_tile(const qact *a, int64_t K, const uint8_t *q,
                                                            const uint16_t *scales, int gshift, int64_t m0,
                                                            int64_t n0, float out[NT][MT], int nn, int mm) {
    const __m256i low = _mm256_set1_epi8(0x0f);
    __m256 acc[NT][MT];
    for (int i = 0; i < NT; i++)
        for (int j = 0; j < MT; j++) acc[i][j] = _mm256_setzero_ps();
    int64_t nb = K / QB, ng = K >> gshift;
    for (int64_t c = 0; c < nb; c++) {
        for (int j = 0; j < mm; j++) {
            const int8_t *xb = a->q + (m0 + j) * K + c * 128;
            __m256 xs = _mm256_set1_ps(a->s[(m0 + j) * nb + c]);
            for (int i = 0; i < nn; i++) {
                const uint8_t *row = q + n0 * (K / 2) + c * 64 * NT + i * 64;
                const uint16_t *s = scales + (n0 + i) * ng;
                __m256 t = _mm256_setzero_ps();
                for (int h = 0; h < 2; h++) { /* bytes 32h..32h+31: inputs 32h.. (low), 64 + 32h.. (high) */
                    __m256i v = _mm256_loadu_si256((const void *)(row + 32 * h));
                    __m256i dlo = dotq32(_mm256_and_si256(v, low), _mm256_loadu_si256((const void *)(xb + 32 * h)));
                    __m256i dhi = dotq32(_mm256_and_si256(_mm256_srli_epi16(v, 4), low),
                                         _mm256_loadu_si256((const void *)(xb + 64 + 32 * h)));
                    __m256 slo = _mm256_set1_ps(bf16_to_f32(s[(c * 128 + 32 * h) >> gshift]));
                    __m256 shi = _mm256_set1_ps(bf16_to_f32(s[(c * 128 + 64 + 32 * h) >> gshift]));
                    t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dlo), slo, _mm256_fmadd_ps(_mm256_cvtepi32_ps(dhi), shi, t));
                }
                acc[i][j] = _mm256_fmadd_ps(t, xs, acc[i][j]);
            }
        }
    }
    for (int i = 0; i < nn; i++)
        for (int j = 0; j < mm; j++) out[i][j] = hsum256(acc[i][j]);
}
#endif

int nk_int4_linear(const void *x, int xtype, int64_t M, int64_t K, const uint8_t *q, const uint16_t *scales,
                   const uint16_t *zeros, int64_t G, int64_t N, const void *bias, int btype, void *y, int ytype) {
    qact a;
    if (quantize_rows(x, xtype, M, K, &a)) {
        free_qact(&a);
        return -1;
    }
    int64_t tiles = (N + NT - 1) / NT, ng = K / G;
    int gshift = __builtin_ctzll((unsigned long long)G);
    float *gsum = group_sums(&a, M, K, G);
    if (!gsum) {
        free_qact(&a);
        return -1;
    }
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        int64_t n0 = t * NT;
        int nn = N - n0 < NT ? (int)(N - n0) : NT;
        float out[NT][MT];
        for (int64_t m0 = 0; m0 < M; m0 += MT) {
            int mm = M - m0 < MT ? (int)(M - m0) : MT;
            RUN_TILE(int4_tile, nn, mm, n0, out, &a, K, q, scales, gshift, m0);
            for (int i = 0; i < nn; i++)
                for (int j = 0; j < mm; j++)
                    finish_row(y, ytype, N, m0 + j, n0 + i,
                               out[i][j] + zeros_dot(gsum + (m0 + j) * ng, scales + (n0 + i) * ng, zeros + (n0 + i) * ng, ng),
                               bias, btype);
        }
    }
    free(gsum);
    free_qact(&a);
    return 0;
}

/* The int4 weights as floats (w = (q - 8) * scale + zero, in the tile-major nibble layout above) into out (N, K),
 * float32 or bf16: for many rows at once (a long prefill), a dense matrix product on them beats the int4 tiles. */
int nk_int4_dequantize(const uint8_t *q, const uint16_t *scales, const uint16_t *zeros, int64_t G, int64_t N,
                       int64_t K, void *out, int otype) {
    int64_t nb = K / QB, ng = K / G;
    int failed = 0;
#pragma omp parallel
    { /* loops over one row at a time, each simple enough for the auto-vectorizer */
        float *row = malloc(sizeof(float) * (size_t)K);
        if (!row) failed = 1;
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            if (!row) continue;
            const uint8_t *tile = q + (n / NT) * NT * (K / 2) + (n % NT) * 64;
            for (int64_t c = 0; c < nb; c++) {
                const uint8_t *chunk = tile + c * 64 * NT;
                for (int j = 0; j < 64; j++) {
                    row[c * QB + j] = (float)(chunk[j] & 15);
                    row[c * QB + 64 + j] = (float)(chunk[j] >> 4);
                }
            }
            for (int64_t g = 0; g < ng; g++) {
                float sc = bf16_to_f32(scales[n * ng + g]), z = bf16_to_f32(zeros[n * ng + g]) - 8.f * sc;
                for (int64_t i = g * G; i < (g + 1) * G; i++) row[i] = row[i] * sc + z;
            }
            if (otype) { /* round to nearest even (the values are finite) */
                uint16_t *o = (uint16_t *)out + n * K;
                for (int64_t k = 0; k < K; k++) {
                    uint32_t u;
                    memcpy(&u, row + k, 4);
                    o[k] = (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
                }
            } else {
                memcpy((float *)out + n * K, row, sizeof(float) * (size_t)K);
            }
        }
        free(row);
    }
    return failed ? -1 : 0;
}

/* ---------------------------------------------------------------------------------------------- bf16 */

/* bf16 weights are nn.Linear's own (row-major, shared with training). For one or two activation rows each thread
 * takes a contiguous run of weight rows and reads each once, start to end: one sequential stream per thread reads
 * faster than a tile of NT rows side by side (32 against 27 GB/s on the 1.3B shapes, 2 threads, one run). */
#if defined(NK_AVX512) && defined(__AVX512BF16__)
#define BF16_X_IS_BF16 1
#define BK 64 /* inputs per step: two vdpbf16ps chains per activation row */
static inline __attribute__((always_inline)) void bf16_row(const uint16_t *x, int64_t K, const uint16_t *row,
                                                           int64_t m0, float out[MT], int mm) {
    __m512 acc[MT][2];
    for (int j = 0; j < MT; j++) acc[j][0] = acc[j][1] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + BK <= K; k += BK) {
        __m512bh w0 = (__m512bh)_mm512_loadu_si512((const void *)(row + k));
        __m512bh w1 = (__m512bh)_mm512_loadu_si512((const void *)(row + k + 32));
        for (int j = 0; j < mm; j++) {
            const uint16_t *xr = x + (m0 + j) * K + k;
            acc[j][0] = _mm512_dpbf16_ps(acc[j][0], w0, (__m512bh)_mm512_loadu_si512((const void *)xr));
            acc[j][1] = _mm512_dpbf16_ps(acc[j][1], w1, (__m512bh)_mm512_loadu_si512((const void *)(xr + 32)));
        }
    }
    if (k < K) { /* K is a multiple of 32 */
        __m512bh w0 = (__m512bh)_mm512_loadu_si512((const void *)(row + k));
        for (int j = 0; j < mm; j++)
            acc[j][0] = _mm512_dpbf16_ps(acc[j][0], w0, (__m512bh)_mm512_loadu_si512((const void *)(x + (m0 + j) * K + k)));
    }
    for (int j = 0; j < mm; j++) out[j] = hsum512(_mm512_add_ps(acc[j][0], acc[j][1]));
}
/* Three or more activation rows (batched decoding): NT weight rows side by side, each loaded vector used for every
 * activation row, so the activations are loaded once per NT weight rows. */
static inline __attribute__((always_inline)) void bf16_tile(const uint16_t *x, int64_t K, const uint16_t *w,
                                                            int64_t m0, int64_t n0, float out[NT][MT], int nn, int mm) {
    __m512 acc[NT][MT];
    for (int i = 0; i < NT; i++)
        for (int j = 0; j < MT; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        __m512bh wv[NT];
        for (int i = 0; i < nn; i++) wv[i] = (__m512bh)_mm512_loadu_si512((const void *)(w + (n0 + i) * K + k));
        for (int j = 0; j < mm; j++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(x + (m0 + j) * K + k));
            for (int i = 0; i < nn; i++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv[i], xv);
        }
    }
    for (int i = 0; i < nn; i++)
        for (int j = 0; j < mm; j++) out[i][j] = hsum512(acc[i][j]);
}
#else
#define BF16_X_IS_BF16 0
#define BK 16 /* inputs per step: two FMA chains per activation row */
static inline __m256 widen(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const void *)p)), 16));
}

static inline __attribute__((always_inline)) void bf16_row(const float *x, int64_t K, const uint16_t *row,
                                                           int64_t m0, float out[MT], int mm) {
    __m256 acc[MT][2];
    for (int j = 0; j < MT; j++) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + BK <= K; k += BK) {
        __m256 w0 = widen(row + k), w1 = widen(row + k + 8);
        for (int j = 0; j < mm; j++) {
            const float *xr = x + (m0 + j) * K + k;
            acc[j][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc[j][0]);
            acc[j][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), acc[j][1]);
        }
    }
    for (; k < K; k += 8) { /* K is a multiple of 8 */
        __m256 w0 = widen(row + k);
        for (int j = 0; j < mm; j++) acc[j][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + (m0 + j) * K + k), acc[j][0]);
    }
    for (int j = 0; j < mm; j++) out[j] = hsum256(_mm256_add_ps(acc[j][0], acc[j][1]));
}
static inline __attribute__((always_inline)) void bf16_tile(const float *x, int64_t K, const uint16_t *w, int64_t m0,
                                                            int64_t n0, float out[NT][MT], int nn, int mm) {
    __m256 acc[NT][MT];
    for (int i = 0; i < NT; i++)
        for (int j = 0; j < MT; j++) acc[i][j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
        __m256 wv[NT];
        for (int i = 0; i < nn; i++) wv[i] = widen(w + (n0 + i) * K + k);
        for (int j = 0; j < mm; j++) {
            __m256 xv = _mm256_loadu_ps(x + (m0 + j) * K + k);
            for (int i = 0; i < nn; i++) acc[i][j] = _mm256_fmadd_ps(wv[i], xv, acc[i][j]);
        }
    }
    for (int i = 0; i < nn; i++)
        for (int j = 0; j < mm; j++) out[i][j] = hsum256(acc[i][j]);
}
#endif

int nk_bf16_linear(const void *x, int xtype, int64_t M, int64_t K, const uint16_t *w, int64_t N, const void *bias,
                   int btype, void *y, int ytype) {
    /* the activations in the row kernel's type: bf16 pairs for vdpbf16ps, else float32 (converted once if need be) */
    const void *xt = x;
    void *xc = NULL;
    if (xtype != BF16_X_IS_BF16) {
        xc = malloc((size_t)(M * K) * (BF16_X_IS_BF16 ? 2 : 4));
        if (!xc) return -1;
        for (int64_t i = 0; i < M * K; i++) {
            if (BF16_X_IS_BF16) ((uint16_t *)xc)[i] = f32_to_bf16(((const float *)x)[i]);
            else ((float *)xc)[i] = bf16_to_f32(((const uint16_t *)x)[i]);
        }
        xt = xc;
    }
    if (M <= 2) {
#pragma omp parallel for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            float out[MT];
            if (M == 1) bf16_row(xt, K, w + n * K, 0, out, 1); /* row counts as constants: registers */
            else bf16_row(xt, K, w + n * K, 0, out, 2);
            for (int j = 0; j < M; j++) finish_row(y, ytype, N, j, n, out[j], bias, btype);
        }
        free(xc);
        return 0;
    }
    int64_t tiles = (N + NT - 1) / NT;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        int64_t n0 = t * NT;
        int nn = N - n0 < NT ? (int)(N - n0) : NT;
        float out[NT][MT];
        for (int64_t m0 = 0; m0 < M; m0 += MT) {
            int mm = M - m0 < MT ? (int)(M - m0) : MT;
            RUN_TILE(bf16_tile, nn, mm, n0, out, xt, K, w, m0);
            for (int i = 0; i < nn; i++)
                for (int j = 0; j < mm; j++) finish_row(y, ytype, N, m0 + j, n0 + i, out[i][j], bias, btype);
        }
    }
    free(xc);
    return 0;
}

/* What the library was built with, for `neoxko info --hardware`. */
const char *nk_isa(void) {
#if defined(NK_AVX512) && defined(__AVX512BF16__)
    return "AVX-512 VNNI + AVX512_BF16";
#elif defined(NK_AVX512)
    return "AVX-512 VNNI (bf16 through fp32)";
#elif defined(__AVXVNNI__)
    return "AVX2 + AVX-VNNI (bf16 through fp32)";
#else
    return "AVX2 (int8 through vpmaddubsw, bf16 through fp32)";
#endif
}

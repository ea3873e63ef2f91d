/* How fast a random selection of neuron rows streams from memory, against every row in order.

   A nested MGS layer at batch 1 reads, per selected neuron, its gate and up low nibbles (K/2 bytes
   each), its int8 down row (K bytes) and three rows of bf16 scales (K/64 each). This reads exactly
   those bytes (summing them: no kernel math) for a random selection at `density`, in two layouts:
   the kernel's (three arrays: [gate; up] low nibbles, down rows, scales) and one chunk per neuron
   (the same bytes adjacent), and every neuron's chunk in order. Each thread takes a fixed range of
   the selection, as the kernel does; the row two ahead is prefetched, as the kernel does. Layers
   are distinct buffers summing past 128 MiB, so every read comes from DRAM.

   usage: gather_stream K I DENSITY ROUNDS  -> one JSON line (seconds per layer, bytes per layer) */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { AHEAD = 2, THREADS = 2 };

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static inline __m512i sum_bytes(const uint8_t *p, int n, __m512i acc) {
    for (int b = 0; b < n; b += 64) {
        const __mmask64 m = n - b >= 64 ? ~0ULL : (1ULL << (n - b)) - 1;
        acc = _mm512_add_epi64(acc, _mm512_sad_epu8(_mm512_maskz_loadu_epi8(m, p + b), _mm512_setzero_si512()));
    }
    return acc;
}

static inline void prefetch(const uint8_t *p, int n) {
    for (int b = 0; b < n; b += 64) _mm_prefetch((const char *)(p + b), _MM_HINT_T0);
}

typedef struct {
    int K, I, layers, chunk, scale_bytes;
    uint8_t *lo, *down, *scales, *chunks;
} Buffers;

/* One layer's selected rows (mode 0: three arrays, 1: chunks) or every chunk (mode 2); returns a checksum. */
static long read_layer(const Buffers *B, int l, const int32_t *rows, int U, int mode) {
    const int K = B->K, I = B->I, half = K / 2, bytes = 2 * half + K + B->scale_bytes;
    long total = 0;
#pragma omp parallel num_threads(THREADS) reduction(+ : total)
    {
        const int id = omp_get_thread_num(), first = U * id / THREADS, last = U * (id + 1) / THREADS;
        __m512i acc = _mm512_setzero_si512();
        for (int u = first; u < last; ++u) {
            const int i = mode == 2 ? u : rows[u], next = u + AHEAD < last ? (mode == 2 ? u + AHEAD : rows[u + AHEAD]) : -1;
            if (mode == 0) {
                const uint8_t *lo = B->lo + (size_t)l * 2 * I * half, *down = B->down + (size_t)l * I * K;
                const uint8_t *scales = B->scales + (size_t)l * I * B->scale_bytes;
                if (next >= 0) {
                    prefetch(lo + (size_t)next * half, half);
                    prefetch(lo + (size_t)(I + next) * half, half);
                    prefetch(down + (size_t)next * K, K);
                }
                acc = sum_bytes(lo + (size_t)i * half, half, acc);
                acc = sum_bytes(lo + (size_t)(I + i) * half, half, acc);
                acc = sum_bytes(down + (size_t)i * K, K, acc);
                acc = sum_bytes(scales + (size_t)i * B->scale_bytes, B->scale_bytes, acc);
            } else {
                const uint8_t *chunks = B->chunks + (size_t)l * I * B->chunk;
                if (next >= 0) prefetch(chunks + (size_t)next * B->chunk, bytes);
                acc = sum_bytes(chunks + (size_t)i * B->chunk, bytes, acc);
            }
        }
        total += _mm512_reduce_add_epi64(acc);
    }
    return total;
}

static uint8_t *filled(size_t bytes) {
    uint8_t *p = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    memset(p, 1, bytes);
    return p;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: gather_stream K I DENSITY ROUNDS\n");
        return 2;
    }
    Buffers B = {.K = atoi(argv[1]), .I = atoi(argv[2])};
    const double density = atof(argv[3]);
    const int rounds = atoi(argv[4]);
    B.scale_bytes = 3 * 2 * (B.K / 64);
    const int bytes = B.K * 2 + B.scale_bytes;
    B.chunk = (bytes + 63) / 64 * 64;
    B.layers = (int)((128L << 20) / ((long)B.I * B.chunk)) + 1;
    B.lo = filled((size_t)B.layers * B.I * B.K);
    B.down = filled((size_t)B.layers * B.I * B.K);
    B.scales = filled((size_t)B.layers * B.I * B.scale_bytes);
    B.chunks = filled((size_t)B.layers * B.I * B.chunk);
    int32_t *rows = malloc(sizeof(int32_t) * (size_t)B.layers * B.I);
    int *count = calloc((size_t)B.layers, sizeof(int));
    srand(1);
    for (int l = 0; l < B.layers; ++l)
        for (int i = 0; i < B.I; ++i)
            if ((double)rand() < density * (double)RAND_MAX) rows[(size_t)l * B.I + count[l]++] = i;
    double best[3] = {1e30, 1e30, 1e30};
    long checksum = 0;
    for (int round = 0; round < rounds; ++round)
        for (int mode = 0; mode < 3; ++mode) {
            const double start = now();
            for (int l = 0; l < B.layers; ++l)
                checksum += read_layer(&B, l, rows + (size_t)l * B.I, mode == 2 ? B.I : count[l], mode);
            const double seconds = (now() - start) / B.layers;
            if (seconds < best[mode]) best[mode] = seconds;
        }
    long selected = 0;
    for (int l = 0; l < B.layers; ++l) selected += count[l];
    printf("{\"K\": %d, \"I\": %d, \"density\": %.4f, \"layers\": %d, \"bytes_per_neuron\": %d, "
           "\"selected_bytes_per_layer\": %.1f, \"every_bytes_per_layer\": %ld, \"seconds_per_layer\": "
           "{\"three arrays\": %.9f, \"one chunk per neuron\": %.9f, \"every neuron in order\": %.9f}, \"checksum\": %ld}\n",
           B.K, B.I, (double)selected / ((double)B.layers * B.I), B.layers, bytes,
           (double)selected / B.layers * bytes, (long)B.I * bytes, best[0], best[1], best[2], checksum);
    return 0;
}

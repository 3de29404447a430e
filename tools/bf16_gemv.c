/* How fast one row streams through a bfloat16 weight: widened to float32 and multiplied (what the native
 * kernels did before), with the CPU's bfloat16 pair dot products (vdpbf16ps, what they do now on CPUs with
 * AVX512-BF16), and a plain read of the same bytes; 2 threads give the machine's two cores.
 *
 *     cc -O3 -march=native -fopenmp tools/bf16_gemv.c -o bf16_gemv && OMP_NUM_THREADS=2 ./bf16_gemv
 *
 * Six rounds, each timing the three over one 184 MB weight ([90112, 1024] bfloat16 on huge pages), GB/s.
 * Needs a compiler and CPU with AVX512-BF16 (the program does not build or run elsewhere).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <omp.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
/* y[o] = sum_k W[o,k] x[k], W bf16 [O,K], x float32 (a) or bf16 (b) */
static void gemv_widen(const uint16_t* W, const float* x, float* y, long O, long K) {
  #pragma omp parallel for schedule(static)
  for (long o = 0; o < O; o++) {
    const uint16_t* w = W + o*K;
    __m512 a0=_mm512_setzero_ps(),a1=a0,a2=a0,a3=a0;
    for (long k = 0; k < K; k += 64) {
      __m512 w0=_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(w+k))),16));
      __m512 w1=_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(w+k+16))),16));
      __m512 w2=_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(w+k+32))),16));
      __m512 w3=_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(w+k+48))),16));
      a0=_mm512_fmadd_ps(w0,_mm512_loadu_ps(x+k),a0); a1=_mm512_fmadd_ps(w1,_mm512_loadu_ps(x+k+16),a1);
      a2=_mm512_fmadd_ps(w2,_mm512_loadu_ps(x+k+32),a2); a3=_mm512_fmadd_ps(w3,_mm512_loadu_ps(x+k+48),a3);
    }
    y[o] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0,a1),_mm512_add_ps(a2,a3)));
  }
}
static void gemv_dp(const uint16_t* W, const uint16_t* xb, float* y, long O, long K) {
  #pragma omp parallel for schedule(static)
  for (long o = 0; o < O; o++) {
    const uint16_t* w = W + o*K;
    __m512 a0=_mm512_setzero_ps(),a1=a0;
    for (long k = 0; k < K; k += 64) {
      a0=_mm512_dpbf16_ps(a0,(__m512bh)_mm512_loadu_si512(w+k),(__m512bh)_mm512_loadu_si512(xb+k));
      a1=_mm512_dpbf16_ps(a1,(__m512bh)_mm512_loadu_si512(w+k+32),(__m512bh)_mm512_loadu_si512(xb+k+32));
    }
    y[o] = _mm512_reduce_add_ps(_mm512_add_ps(a0,a1));
  }
}
static void readonly(const uint16_t* W, long n, float* out) {
  __m512i acc = _mm512_setzero_si512();
  #pragma omp parallel
  { __m512i a=_mm512_setzero_si512();
  #pragma omp for schedule(static)
  for (long i = 0; i < n; i += 32) a=_mm512_xor_si512(a,_mm512_loadu_si512(W+i));
  #pragma omp critical
  acc=_mm512_xor_si512(acc,a);}
  *out = (float)_mm512_reduce_add_epi32(acc);
}
int main() {
  long K=1024, O=5632*16*8; /* ~ 16 experts x 8 layers of w_in rows: 738 MB? reduce */
  O = 5632*16; long bytes = O*K*2;
  uint16_t* W; posix_memalign((void**)&W, 1<<21, bytes); madvise(W, bytes, MADV_HUGEPAGE);
  for (long i=0;i<O*K;i++) W[i]=(uint16_t)(0x3f80 + (i&63));
  float* x = malloc(K*4); uint16_t* xb = malloc(K*2); float* y = malloc(O*4);
  for (long k=0;k<K;k++){x[k]=1.0f/(k+1); uint32_t b; memcpy(&b,&x[k],4); xb[k]=b>>16;}
  float sink=0;
  for (int rep=0; rep<6; rep++) {
    double t0=now(); gemv_widen(W,x,y,O,K); double t1=now(); gemv_dp(W,xb,y,O,K); double t2=now(); readonly(W,O*K,&sink); double t3=now();
    printf("widen %.1f GB/s  dpbf16 %.1f GB/s  read %.1f GB/s\n", bytes/(t1-t0)/1e9, bytes/(t2-t1)/1e9, bytes/(t3-t2)/1e9);
  }
  return (int)sink & 1;
}

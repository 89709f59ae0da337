/* cblas_sgemm for MLX that sends one-row products to MKL and all the others to OpenBLAS.
 *
 * MLX's CPU backend calls `cblas_sgemm` through the global symbol scope, so a library loaded
 * with RTLD_GLOBAL before libmlx serves every fp32 matmul. On AMD CPUs neither BLAS is best at
 * every shape: MKL runs the 1-row products of a batch-1 decode step quicker, OpenBLAS the larger
 * ones (measured in benchmarks/README.md). This file forwards by the row count M. Both BLAS
 * libraries are loaded privately (RTLD_LOCAL) by nanogpt_mlx.model.cpu.blas and handed in as
 * function pointers.
 *
 * Built at install time as a setuptools extension (setup.py), so importing the package never
 * compiles anything. It is a plain shared library, not a Python module: it is loaded with ctypes.
 * The two counters let tests see the dispatch work.
 */

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int,
                         const float *, int, float, float *, int);
static sgemm_fn one_row_sgemm, other_sgemm;
unsigned long long nanogpt_mlx_sgemm_calls[2];

void nanogpt_mlx_set_sgemm(void *one_row, void *other) {
    one_row_sgemm = (sgemm_fn)one_row;
    other_sgemm = (sgemm_fn)other;
}

void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc) {
    int side = m == 1 ? 0 : 1;
    __atomic_fetch_add(&nanogpt_mlx_sgemm_calls[side], 1, __ATOMIC_RELAXED);
    (side == 0 ? one_row_sgemm : other_sgemm)(layout, trans_a, trans_b, m, n, k, alpha, a, lda,
                                              b, ldb, beta, c, ldc);
}

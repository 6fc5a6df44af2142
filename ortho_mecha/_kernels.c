/* The analysis pass's per-chunk reduction (ortho_mecha.analysis), in one pass over the chunk.

   A chunk is R rows × n columns of deltas X: either float32 deltas already formed, or every file's stored
   values (F32, F16 or BF16 bytes) from which X = stored − base is formed here, a tile at a time. Then,
   for some rows a (h_rows) against every row b of X, and for some rows a (stat_rows) against the first
   R' rows b (the analysed rows):

     gram[i, b]  += Σ_k X[a,k] X[b,k]                                   a = h_rows[i]
     agree[a, b] += Σ_k s(X[a,k]) s(X[b,k]),   both[a, b] += Σ_k |s(X[a,k]) s(X[b,k])|   a in stat_rows
     peaks[i]     = max(peaks[i], max_k |X[a,k]|)                       a = stat_rows[i]

   with s = sign ∈ {−1, 0, 1}. BLAS is at its worst on such products (a few rows, many columns: a tiny
   output whose accumulators do not fit in registers). Here the columns go a tile at a time, a tile of
   every row stays in the core's cache, and each pass over a tile multiplies one row by a group of up to
   GROUP rows held in registers; products are summed in float32 lanes within a tile (TILE / LANES terms
   per lane) and the lanes in float64 across tiles. Signs are packed into bits as the tiles pass and the
   pairs counted at the end with popcounts: exact integers. The GIL is released while the kernel runs, so
   two threads reduce two chunks at once. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define LANES 8
#define BLOCK 256  /* columns packed into one sign block: LANES lanes × 32 bits */
#define TILE 512   /* columns per tile, a multiple of BLOCK */
#define GROUP 8    /* partner rows per pass over a tile: GROUP accumulators + 2 operands in 16 registers */
#define WORDS_PER_BLOCK (BLOCK / 64)

typedef float v8f __attribute__((vector_size(LANES * sizeof(float))));
typedef uint32_t v8u __attribute__((vector_size(LANES * sizeof(uint32_t))));

/* On x86-64, an AVX2+FMA copy of each hot function is chosen at load time where the CPU has it. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CLONES
#endif
#define INLINE static inline __attribute__((always_inline))

enum kind { DELTAS, F32, F16, BF16 };

INLINE v8f load8(const float *p)
{
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

INLINE float bits_float(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

INLINE uint32_t float_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* IEEE half → float: the exponent and mantissa moved into place and rebased by a multiplication, which
   also normalises subnormals; infinities and NaNs (exponent 31) get the float's all-ones exponent. */
INLINE float half_float(uint16_t h)
{
    float f = bits_float((uint32_t)(h & 0x7fff) << 13) * 0x1p112f;
    uint32_t u = float_bits(f) | ((uint32_t)(h & 0x8000) << 16);
    return bits_float(f >= 0x1p16f ? u | 0x7f800000u : u);
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define F16C_PATH 1
/* Whether the CPU converts halves itself (F16C, with AVX2), found when the module loads, and whether that is
   used (use_f16c() may turn it off). */
static int f16c_available, f16c;

/* out[k] = half h[k] as float (− base[k]) by the CPU's conversion, 8 at a time (~5× half_float's loop, which
   GCC does not vectorise); the same values bit for bit, NaN payloads included. The tail goes by half_float. */
__attribute__((target("avx2,f16c"))) static void convert_f16c(const uint16_t *h, const float *base, Py_ssize_t len,
                                                               float *out)
{
    Py_ssize_t k = 0;
    for (; k + 8 <= len; k += 8) {
        __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + k)));
        _mm256_storeu_ps(out + k, base ? _mm256_sub_ps(v, _mm256_loadu_ps(base + k)) : v);
    }
    for (; k < len; k++)
        out[k] = base ? half_float(h[k]) - base[k] : half_float(h[k]);
}
#endif

/* out[k] = stored[k] − base[k] for k < len, as float32 (stored[k] alone when base is NULL). */
#define CONVERT_LOOP(value)                                                                                           \
    do {                                                                                                              \
        if (base)                                                                                                     \
            for (Py_ssize_t k = 0; k < len; k++)                                                                      \
                out[k] = (value) - base[k];                                                                           \
        else                                                                                                          \
            for (Py_ssize_t k = 0; k < len; k++)                                                                      \
                out[k] = (value);                                                                                     \
    } while (0)

CLONES static void convert(const void *stored, enum kind kind, const float *base, Py_ssize_t len, float *out)
{
    const uint16_t *h = stored;
    const float *f = stored;
#ifdef F16C_PATH
    if (kind == F16 && f16c)
        convert_f16c(h, base, len, out);
    else
#endif
    if (kind == F16)
        CONVERT_LOOP(half_float(h[k]));
    else if (kind == BF16)
        CONVERT_LOOP(bits_float((uint32_t)h[k] << 16));
    else
        CONVERT_LOOP(f[k]);
}

/* acc[j*LANES + l] += lane l of Σ_k a[k] p[j][k], for j < g, over len columns (a multiple of LANES). */
INLINE void dot_group(const float *a, const float *const *p, int g, Py_ssize_t len, double *acc)
{
    v8f s[GROUP] = {0};
    for (Py_ssize_t k = 0; k < len; k += LANES) {
        v8f x = load8(a + k);
        for (int j = 0; j < g; j++)
            s[j] += x * load8(p[j] + k);
    }
    for (int j = 0; j < g; j++)
        for (int l = 0; l < LANES; l++)
            acc[j * LANES + l] += s[j][l];
}

/* For i < nr and partner j ≥ first(i) of the np rows of the tile (first(i) = rows[i] when upper, else 0):
   acc[(i*np + j)*LANES + l] += lanes of Σ_k tile[rows[i]][k] tile[j][k]. */
CLONES static void tile_products(const float *const *tile, Py_ssize_t np, const int64_t *rows, Py_ssize_t nr,
                                 int upper, Py_ssize_t len, double *acc)
{
    for (Py_ssize_t i = 0; i < nr; i++) {
        const float *a = tile[rows[i]];
        for (Py_ssize_t j = upper ? rows[i] : 0; j < np; j += GROUP) {
            const float *const *p = tile + j;
            double *out = acc + (i * np + j) * LANES;
            switch (np - j < GROUP ? (int)(np - j) : GROUP) {
            case 8: dot_group(a, p, 8, len, out); break;
            case 7: dot_group(a, p, 7, len, out); break;
            case 6: dot_group(a, p, 6, len, out); break;
            case 5: dot_group(a, p, 5, len, out); break;
            case 4: dot_group(a, p, 4, len, out); break;
            case 3: dot_group(a, p, 3, len, out); break;
            case 2: dot_group(a, p, 2, len, out); break;
            default: dot_group(a, p, 1, len, out); break;
            }
        }
    }
}

/* Sign bits of len values of x (a multiple of BLOCK) into pos (x > 0) and neg (x < 0), a block of BLOCK
   columns per WORDS_PER_BLOCK words: lane l's bit j is column j·LANES + l. Any fixed order serves, as the
   bits are only ever counted against another row's in the same order. Raises *peak to max |x|. */
CLONES static void pack_signs(const float *x, Py_ssize_t len, uint64_t *pos, uint64_t *neg, float *peak)
{
    const v8f zero = {0};
    const v8u magnitude = (v8u){0} + 0x7fffffffu;
    v8f m = zero;
    for (Py_ssize_t k = 0; k < len; k += BLOCK) {
        v8u p = {0}, q = {0};
        for (int j = 0; j < 32; j++) {
            v8f v = load8(x + k + j * LANES);
            v8u bit = (v8u){0} + (1u << j);
            p |= (v8u)(v > zero) & bit;
            q |= (v8u)(v < zero) & bit;
            v8f a = (v8f)((v8u)v & magnitude);
            v8u bigger = (v8u)(a > m);
            m = (v8f)(((v8u)a & bigger) | ((v8u)m & ~bigger));
        }
        memcpy(pos + k / 64, &p, sizeof p);
        memcpy(neg + k / 64, &q, sizeof q);
    }
    for (int l = 0; l < LANES; l++)
        if (m[l] > *peak)
            *peak = m[l];
}

/* For i < nr and partner j ≥ first(i) of np rows of `words` sign words each (first(i) = rows[i] when upper,
   else 0): conflicts[i*np + j] = popcount((P_a & N_j) | (N_a & P_j)), overlap[i*np + j] = popcount(Z_a & Z_j)
   with Z = P | N, a = rows[i]. */
CLONES static void count_signs(const uint64_t *pos, const uint64_t *neg, Py_ssize_t words, Py_ssize_t np,
                               const int64_t *rows, Py_ssize_t nr, int upper, int64_t *conflicts, int64_t *overlap)
{
    for (Py_ssize_t i = 0; i < nr; i++) {
        const uint64_t *pa = pos + rows[i] * words, *na = neg + rows[i] * words;
        for (Py_ssize_t j = upper ? rows[i] : 0; j < np; j++) {
            const uint64_t *pb = pos + j * words, *nb = neg + j * words;
            int64_t c = 0, o = 0;
            for (Py_ssize_t w = 0; w < words; w++) {
                c += __builtin_popcountll((pa[w] & nb[w]) | (na[w] & pb[w]));
                o += __builtin_popcountll((pa[w] | na[w]) & (pb[w] | nb[w]));
            }
            conflicts[i * np + j] = c;
            overlap[i * np + j] = o;
        }
    }
}

/* out[row(i)*np + j] += sums[i*np + j] for i < nr, j < np, where row(i) is rows[i] when rows_out, else i.
   When upper (every row against every row, rows[i] = i), only j ≥ i was computed: the triangle is mirrored. */
static void add_pairs(const double *sums, const int64_t *rows, Py_ssize_t nr, Py_ssize_t np, int upper, int rows_out,
                      double *out)
{
    for (Py_ssize_t i = 0; i < nr; i++) {
        double *row = out + (rows_out ? rows[i] : i) * np;
        for (Py_ssize_t j = 0; j < np; j++)
            row[j] += upper && j < i ? sums[j * np + i] : sums[i * np + j];
    }
}

/* ---- a chunk's reduction ---- */

typedef struct {
    Py_buffer src, base, h_rows, stat_rows, gram, agree, both, peaks;
} Args;

static void release(Args *a)
{
    Py_buffer *views[] = {&a->src, &a->base, &a->h_rows, &a->stat_rows, &a->gram, &a->agree, &a->both, &a->peaks};
    for (size_t i = 0; i < sizeof views / sizeof *views; i++)
        if (views[i]->obj)
            PyBuffer_Release(views[i]);
}

/* A C-contiguous ndim-d buffer of one of the struct formats in `formats`, each of `itemsize` bytes (−1:
   the format's); None leaves the view empty (obj NULL) when `optional`. */
static int get(PyObject *obj, Py_buffer *view, const char *formats, Py_ssize_t itemsize, int ndim, int writable,
               int optional, const char *what)
{
    if (optional && obj == Py_None)
        return 0;
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0)
        return -1;
    const char *format = view->format[0] == '=' || view->format[0] == '@' ? view->format + 1 : view->format;
    if (view->ndim != ndim || (itemsize >= 0 && view->itemsize != itemsize) || strlen(format) != 1 || !strchr(formats, format[0])) {
        PyErr_Format(PyExc_TypeError, "%s: expected a %d-d C-contiguous array of %zd-byte '%s'", what, ndim,
                     itemsize, formats);
        PyBuffer_Release(view);
        view->obj = NULL;
        return -1;
    }
    return 0;
}

static int rows_in_range(const Py_buffer *rows, Py_ssize_t np)
{
    const int64_t *r = rows->buf;
    for (Py_ssize_t i = 0; i < rows->shape[0]; i++)
        if (r[i] < 0 || r[i] >= np)
            return 0;
    return 1;
}

/* True when rows is 0, 1, …, np − 1: every row against every row, computed as an upper triangle. */
static int all_rows(const Py_buffer *rows, Py_ssize_t np)
{
    const int64_t *r = rows->buf;
    if (rows->shape[0] != np)
        return 0;
    for (Py_ssize_t i = 0; i < np; i++)
        if (r[i] != i)
            return 0;
    return 1;
}

typedef struct {
    enum kind kind;
    Py_ssize_t nf, ns, nh, nstat, n, words;  /* rows of X, sign rows, gram rows, stat rows, columns, sign words */
    int upper_h, upper_s;
} Shape;

static Py_ssize_t kind_size(enum kind kind) { return kind == F16 || kind == BF16 ? 2 : 4; }

static int parse_kind(PyObject *name, enum kind *kind)
{
    const char *s = PyUnicode_AsUTF8(name);
    if (!s)
        return -1;
    if (!strcmp(s, "F32") || !strcmp(s, "F16") || !strcmp(s, "BF16")) {
        *kind = !strcmp(s, "F32") ? F32 : !strcmp(s, "F16") ? F16 : BF16;
        return 0;
    }
    PyErr_Format(PyExc_ValueError, "unsupported kind '%s' (F32, F16 or BF16)", s);
    return -1;
}

static int check(PyObject *kind_name, Args *a, Shape *sh)
{
    if (parse_kind(kind_name, &sh->kind) < 0)
        return -1;
    if (!a->base.obj) {
        if (sh->kind != F32) {
            PyErr_SetString(PyExc_ValueError, "deltas (no base) are float32: kind 'F32'");
            return -1;
        }
        sh->kind = DELTAS;
    }
    Py_ssize_t itemsize = kind_size(sh->kind);
    /* stored bytes are uint8 rows; deltas float32 rows */
    Py_ssize_t width = sh->kind == DELTAS ? a->src.shape[1] : a->src.shape[1] / itemsize;
    if ((sh->kind == DELTAS) != (a->src.itemsize == 4)) {
        PyErr_SetString(PyExc_TypeError, "src: float32 deltas, or uint8 stored bytes with a base");
        return -1;
    }
    sh->nf = a->src.shape[0];
    sh->nh = a->h_rows.shape[0];
    sh->nstat = a->stat_rows.shape[0];
    sh->ns = a->agree.obj ? a->agree.shape[0] : 0;
    sh->words = (sh->n + BLOCK - 1) / BLOCK * WORDS_PER_BLOCK;
    int ok = sh->n > 0 && sh->n <= width && (!a->base.obj || a->base.shape[0] >= sh->n);
    ok = ok && (sh->nh == 0 || (a->gram.obj && a->gram.shape[0] == sh->nh && a->gram.shape[1] == sh->nf));
    ok = ok && rows_in_range(&a->h_rows, sh->nf);
    ok = ok && (sh->nstat == 0 || (a->agree.obj && a->both.obj && a->peaks.obj));
    ok = ok && (!a->agree.obj || (sh->ns <= sh->nf && a->agree.shape[1] == sh->ns && a->both.shape[0] == sh->ns &&
                                  a->both.shape[1] == sh->ns && a->peaks.shape[0] == sh->nstat));
    ok = ok && rows_in_range(&a->stat_rows, sh->ns);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "column count, row index or output shape out of range");
        return -1;
    }
    sh->upper_h = all_rows(&a->h_rows, sh->nf);
    sh->upper_s = all_rows(&a->stat_rows, sh->ns);
    return 0;
}

/* Scratch of one call. */
typedef struct {
    double *gram_acc, *sums;
    int64_t *conflicts, *overlap;
    float *tile_buf, *peak;
    uint64_t *pos, *neg;
    const float **tile;
} Scratch;

static void scratch_free(Scratch *w)
{
    free(w->gram_acc), free(w->sums), free(w->conflicts), free(w->overlap);
    free(w->tile_buf), free(w->peak), free(w->pos), free(w->neg), free(w->tile);
}

static int scratch_alloc(Scratch *w, const Shape *sh)
{
    Py_ssize_t pairs = (sh->nh * sh->nf > sh->nstat * sh->ns ? sh->nh * sh->nf : sh->nstat * sh->ns) + 1;
    memset(w, 0, sizeof *w);
    w->gram_acc = calloc((size_t)(sh->nh * sh->nf * LANES + 1), sizeof(double));
    w->sums = malloc((size_t)pairs * sizeof(double));
    w->conflicts = malloc((size_t)pairs * sizeof(int64_t));
    w->overlap = malloc((size_t)pairs * sizeof(int64_t));
    w->tile_buf = malloc((size_t)(sh->nf * TILE) * sizeof(float));
    w->peak = calloc((size_t)(sh->ns + 1), sizeof(float));
    w->pos = malloc((size_t)(sh->ns * sh->words + 1) * sizeof(uint64_t));
    w->neg = malloc((size_t)(sh->ns * sh->words + 1) * sizeof(uint64_t));
    w->tile = malloc((size_t)sh->nf * sizeof(float *));
    if (w->gram_acc && w->sums && w->conflicts && w->overlap && w->tile_buf && w->peak && w->pos && w->neg && w->tile)
        return 0;
    scratch_free(w);
    PyErr_NoMemory();
    return -1;
}

/* Point tile[r] at columns [t, t + len) of every row of X, len = min(TILE, n − t) rounded up to BLOCK with
   zeros: formed from the stored values in the tile buffer, or, for deltas, read in place (copied when the
   tile is short and needs the padding). Returns the padded length. */
static Py_ssize_t load_tile(const Args *a, const Shape *sh, Py_ssize_t t, Scratch *w)
{
    Py_ssize_t len = sh->n - t < TILE ? sh->n - t : TILE;
    Py_ssize_t padded = (len + BLOCK - 1) / BLOCK * BLOCK;
    Py_ssize_t row_bytes = a->src.shape[1];
    for (Py_ssize_t r = 0; r < sh->nf; r++) {
        const char *row = (const char *)a->src.buf + r * row_bytes * (sh->kind == DELTAS ? 4 : 1);
        float *buf = w->tile_buf + r * TILE;
        if (sh->kind == DELTAS && len == TILE) {
            w->tile[r] = (const float *)row + t;
            continue;
        }
        if (sh->kind == DELTAS)
            memcpy(buf, (const float *)row + t, (size_t)len * sizeof(float));
        else
            convert(row + t * kind_size(sh->kind), sh->kind, (const float *)a->base.buf + t, len, buf);
        memset(buf + len, 0, (size_t)(padded - len) * sizeof(float));
        w->tile[r] = buf;
    }
    return padded;
}

static void reduce(const Args *a, const Shape *sh, Scratch *w)
{
    const int64_t *h_rows = a->h_rows.buf, *stat_rows = a->stat_rows.buf;
    for (Py_ssize_t t = 0; t < sh->n; t += TILE) {
        Py_ssize_t len = load_tile(a, sh, t, w);
        if (sh->nh)
            tile_products(w->tile, sh->nf, h_rows, sh->nh, sh->upper_h, len, w->gram_acc);
        if (sh->nstat)
            for (Py_ssize_t r = 0; r < sh->ns; r++)
                pack_signs(w->tile[r], len, w->pos + r * sh->words + t / 64, w->neg + r * sh->words + t / 64,
                           w->peak + r);
    }
    if (sh->nh) {
        for (Py_ssize_t p = 0; p < sh->nh * sh->nf; p++) {
            double total = 0.0;
            for (int l = 0; l < LANES; l++)
                total += w->gram_acc[p * LANES + l];
            w->sums[p] = total;
        }
        add_pairs(w->sums, h_rows, sh->nh, sh->nf, sh->upper_h, 0, a->gram.buf);
    }
    if (sh->nstat) {
        count_signs(w->pos, w->neg, sh->words, sh->ns, stat_rows, sh->nstat, sh->upper_s, w->conflicts, w->overlap);
        Py_ssize_t pairs = sh->nstat * sh->ns;
        for (Py_ssize_t p = 0; p < pairs; p++)  /* agreeing minus disagreeing signs */
            w->sums[p] = (double)(w->overlap[p] - 2 * w->conflicts[p]);
        add_pairs(w->sums, stat_rows, sh->nstat, sh->ns, sh->upper_s, 1, a->agree.buf);
        for (Py_ssize_t p = 0; p < pairs; p++)
            w->sums[p] = (double)w->overlap[p];
        add_pairs(w->sums, stat_rows, sh->nstat, sh->ns, sh->upper_s, 1, a->both.buf);
        double *peaks = a->peaks.buf;
        for (Py_ssize_t i = 0; i < sh->nstat; i++)
            if (w->peak[stat_rows[i]] > peaks[i])
                peaks[i] = w->peak[stat_rows[i]];
    }
}

/* The chunk's buffers (src, base, h_rows, gram, stat_rows, agree, both, peaks, in that order), checked into a
   and sh, and the scratch for them; 0, or −1 with an error set and nothing held. */
static int chunk_args(PyObject *const objs[8], PyObject *kind, int src_writable, Args *a, Shape *sh, Scratch *w)
{
    if (get(objs[0], &a->src, src_writable ? "B" : "fB", -1, 2, src_writable, 0, "src") < 0 ||
        get(objs[1], &a->base, "f", 4, 1, src_writable, !src_writable, "base") < 0 ||
        get(objs[2], &a->h_rows, "lq", 8, 1, 0, 0, "h_rows") < 0 || get(objs[3], &a->gram, "d", 8, 2, 1, 1, "gram") < 0 ||
        get(objs[4], &a->stat_rows, "lq", 8, 1, 0, 0, "stat_rows") < 0 ||
        get(objs[5], &a->agree, "d", 8, 2, 1, 1, "agree") < 0 || get(objs[6], &a->both, "d", 8, 2, 1, 1, "both") < 0 ||
        get(objs[7], &a->peaks, "d", 8, 1, 1, 1, "peaks") < 0 || check(kind, a, sh) < 0 || scratch_alloc(w, sh) < 0) {
        release(a);
        return -1;
    }
    return 0;
}

static PyObject *reduce_chunk(PyObject *self, PyObject *args)
{
    PyObject *o[8], *kind;
    Args a = {0};
    Shape sh = {0};
    Scratch w;
    (void)self;
    if (!PyArg_ParseTuple(args, "OUOnOOOOOO", &o[0], &kind, &o[1], &sh.n, &o[2], &o[3], &o[4], &o[5], &o[6], &o[7]) ||
        chunk_args(o, kind, 0, &a, &sh, &w) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    reduce(&a, &sh, &w);
    Py_END_ALLOW_THREADS
    scratch_free(&w);
    release(&a);
    Py_RETURN_NONE;
}

/* nbytes from fd at offset into buf: 0, or −1 when the file ends first or a read fails (errno set). */
static int read_full(int fd, char *buf, size_t nbytes, off_t offset)
{
    while (nbytes) {
        ssize_t got = pread(fd, buf, nbytes, offset);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0) {
            if (got == 0)
                errno = 0;
            return -1;
        }
        buf += got, nbytes -= (size_t)got, offset += got;
    }
    return 0;
}

/* Σ x[k]² in float64: eight partial sums (a serial sum waits on each addition, ~7× slower), added in a fixed
   order. */
CLONES static double sum_squares(const float *x, Py_ssize_t n)
{
    double partial[LANES] = {0};
    Py_ssize_t k = 0;
    for (; k + LANES <= n; k += LANES)
        for (int l = 0; l < LANES; l++)
            partial[l] += (double)x[k + l] * x[k + l];
    double total = 0.0;
    for (; k < n; k++)
        total += (double)x[k] * x[k];
    for (int l = 0; l < LANES; l++)
        total += partial[l];
    return total;
}

static PyObject *read_reduce_chunk(PyObject *self, PyObject *args)
{
    PyObject *fds_obj, *offsets_obj, *base_kind_obj, *o[8], *kind;
    long long base_fd, base_offset;
    Py_buffer fds = {0}, offsets = {0};
    enum kind base_kind;
    Args a = {0};
    Shape sh = {0};
    Scratch w;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOLLUOUOnOOOOOO", &fds_obj, &offsets_obj, &base_fd, &base_offset, &base_kind_obj,
                          &o[0], &kind, &o[1], &sh.n, &o[2], &o[3], &o[4], &o[5], &o[6], &o[7]))
        return NULL;
    if (parse_kind(base_kind_obj, &base_kind) < 0 || get(fds_obj, &fds, "lq", 8, 1, 0, 0, "fds") < 0)
        return NULL;
    if (get(offsets_obj, &offsets, "lq", 8, 1, 0, 0, "offsets") < 0) {
        PyBuffer_Release(&fds);
        return NULL;
    }
    if (chunk_args(o, kind, 1, &a, &sh, &w) < 0) {
        PyBuffer_Release(&fds), PyBuffer_Release(&offsets);
        return NULL;
    }
    char *staged = malloc((size_t)(sh.n * kind_size(base_kind)));
    if (fds.shape[0] != sh.nf || offsets.shape[0] != sh.nf || !staged) {
        if (staged)
            PyErr_SetString(PyExc_ValueError, "one file descriptor and offset per row expected");
        else
            PyErr_NoMemory();
        free(staged), scratch_free(&w), release(&a), PyBuffer_Release(&fds), PyBuffer_Release(&offsets);
        return NULL;
    }
    const int64_t *fd = fds.buf, *offset = offsets.buf;
    Py_ssize_t row_bytes = sh.n * kind_size(sh.kind), bad = -2;  /* the row whose read failed; −1: the base */
    double base_sq = 0.0;
    int error = 0;
    Py_BEGIN_ALLOW_THREADS
    if (read_full((int)base_fd, staged, (size_t)(sh.n * kind_size(base_kind)), (off_t)base_offset) < 0)
        bad = -1, error = errno;
    for (Py_ssize_t r = 0; bad == -2 && r < sh.nf; r++)
        if (read_full((int)fd[r], (char *)a.src.buf + r * a.src.shape[1], (size_t)row_bytes, (off_t)offset[r]) < 0)
            bad = r, error = errno;
    if (bad == -2) {
        float *b = a.base.buf;
        convert(staged, base_kind, NULL, sh.n, b);
        base_sq = sum_squares(b, sh.n);
        reduce(&a, &sh, &w);
    }
    Py_END_ALLOW_THREADS
    free(staged), scratch_free(&w), release(&a), PyBuffer_Release(&fds), PyBuffer_Release(&offsets);
    if (bad != -2) {  /* (errno, message, row): the caller names the file */
        PyObject *exc = Py_BuildValue("(isn)", error, error ? strerror(error) : "file ends early", bad);
        if (exc) {
            PyErr_SetObject(PyExc_OSError, exc);
            Py_DECREF(exc);
        }
        return NULL;
    }
    return PyFloat_FromDouble(base_sq);
}

/* ---- eigenvalues without the GIL ---- */

/* LAPACK's ?syevr as scipy.linalg.cython_lapack exports it (scipy's own OpenBLAS): s and d differ only in
   the element type behind the pointers. scipy's Python wrappers hold the GIL for the whole call, which
   stalls the pass's other threads for the ~0.1 s of each signal's eigenvalues. */
typedef void syevr_t(char *jobz, char *range, char *uplo, int *n, void *a, int *lda, void *vl, void *vu, int *il,
                     int *iu, void *abstol, int *m, void *w, void *z, int *ldz, int *isuppz, void *work, int *lwork,
                     int *iwork, int *liwork, int *info);

static syevr_t *lapack_syevr(const char *name)
{
    PyObject *module = PyImport_ImportModule("scipy.linalg.cython_lapack");
    if (!module)
        return NULL;
    PyObject *capi = PyObject_GetAttrString(module, "__pyx_capi__");
    Py_DECREF(module);
    if (!capi)
        return NULL;
    PyObject *capsule = PyDict_GetItemString(capi, name);  /* borrowed */
    void *f = capsule ? PyCapsule_GetPointer(capsule, PyCapsule_GetName(capsule)) : NULL;
    if (!capsule && !PyErr_Occurred())
        PyErr_Format(PyExc_ImportError, "scipy.linalg.cython_lapack has no %s", name);
    Py_DECREF(capi);
    return (syevr_t *)f;
}

typedef union {
    float f;
    double d;
} Scalar;

static PyObject *eigvalsh(PyObject *self, PyObject *args)
{
    static syevr_t *syevr[2];
    PyObject *matrix, *values;
    Py_buffer a = {0}, w = {0};
    (void)self;
    if (!PyArg_ParseTuple(args, "OO", &matrix, &values))
        return NULL;
    if (get(matrix, &a, "fd", -1, 2, 1, 0, "a") < 0)
        return NULL;
    int dbl = a.itemsize == 8;
    if (get(values, &w, dbl ? "d" : "f", a.itemsize, 1, 1, 0, "w") < 0) {
        PyBuffer_Release(&a);
        return NULL;
    }
    if (a.shape[0] != a.shape[1] || w.shape[0] != a.shape[0] || a.shape[0] > 46340 || a.shape[0] < 1) {
        PyErr_SetString(PyExc_ValueError, "a: a square matrix (n ≥ 1) and w: n values expected");
        PyBuffer_Release(&a), PyBuffer_Release(&w);
        return NULL;
    }
    if (!syevr[dbl] && !(syevr[dbl] = lapack_syevr(dbl ? "dsyevr" : "ssyevr"))) {
        PyBuffer_Release(&a), PyBuffer_Release(&w);
        return NULL;
    }
    int n = (int)a.shape[0], lda = n, il = 1, iu = n, m = 0, ldz = 1, lwork = -1, liwork = -1, info = 0, iwork_size;
    Scalar vl = {0}, vu = {0}, abstol = {0}, work_size = {0}, z = {0};
    char jobz = 'N', range = 'A', uplo = 'L';
    syevr[dbl](&jobz, &range, &uplo, &n, a.buf, &lda, &vl, &vu, &il, &iu, &abstol, &m, w.buf, &z, &ldz, NULL,
               &work_size, &lwork, &iwork_size, &liwork, &info);
    lwork = (int)(dbl ? work_size.d : work_size.f) + 1;
    liwork = iwork_size;
    void *work = malloc((size_t)lwork * (size_t)a.itemsize);
    int *iwork = malloc((size_t)liwork * sizeof(int));
    int *isuppz = malloc(2 * (size_t)n * sizeof(int));
    if (!work || !iwork || !isuppz) {
        free(work), free(iwork), free(isuppz), PyBuffer_Release(&a), PyBuffer_Release(&w);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    syevr[dbl](&jobz, &range, &uplo, &n, a.buf, &lda, &vl, &vu, &il, &iu, &abstol, &m, w.buf, &z, &ldz, isuppz, work,
               &lwork, iwork, &liwork, &info);
    Py_END_ALLOW_THREADS
    free(work), free(iwork), free(isuppz), PyBuffer_Release(&a), PyBuffer_Release(&w);
    if (info != 0 || m != n) {
        PyErr_Format(PyExc_ArithmeticError, "?syevr failed (info %d, %d of %d eigenvalues)", info, m, n);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *use_f16c(PyObject *self, PyObject *arg)
{
    (void)self;
    int wanted = PyObject_IsTrue(arg);
    if (wanted < 0)
        return NULL;
#ifdef F16C_PATH
    f16c = wanted && f16c_available;
    return PyBool_FromLong(f16c);
#else
    return PyBool_FromLong(0);
#endif
}

static PyMethodDef methods[] = {
    {"reduce_chunk", reduce_chunk, METH_VARARGS,
     "reduce_chunk(src, kind, base, n, h_rows, gram, stat_rows, agree, both, peaks)\n\n"
     "Add one chunk's figures. src: float32 deltas (rows × columns, kind 'F32', base None), or every file's\n"
     "stored bytes (uint8 rows, kind 'F32', 'F16' or 'BF16') with the base's float32 values; the first n\n"
     "columns are used. gram (len(h_rows) × rows) += rows h_rows against all; agree, both (R' × R') and\n"
     "peaks (len(stat_rows)) for rows stat_rows against the first R' rows. An output may be None when its\n"
     "rows are empty."},
    {"read_reduce_chunk", read_reduce_chunk, METH_VARARGS,
     "read_reduce_chunk(fds, offsets, base_fd, base_offset, base_kind, src, kind, base, n, h_rows, gram, stat_rows,\n"
     "                  agree, both, peaks) -> base_sq\n\n"
     "reduce_chunk on n values of each row read here (GIL released): row r's stored bytes from file descriptor\n"
     "fds[r] at byte offsets[r] into src's row r, the base's (of base_kind) into base as float32. Returns the\n"
     "sum of the base values' squares; a failed or short read raises OSError(errno, message, row): the row\n"
     "(−1: the base) is its filename."},
    {"eigvalsh", eigvalsh, METH_VARARGS,
     "eigvalsh(a, w)\n\n"
     "The eigenvalues of the symmetric float32 or float64 matrix a (overwritten), ascending, into w: LAPACK's\n"
     "?syevr from scipy.linalg.cython_lapack, called with the GIL released."},
    {"use_f16c", use_f16c, METH_O,
     "use_f16c(enabled) -> bool\n\n"
     "Convert F16 values by the CPU's F16C instructions where it has them (the default), or by the portable\n"
     "bit manipulation (tests compare the two); returns whether F16C is now in use."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "The analysis pass's per-chunk reduction.",
                                    -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernels(void)
{
#ifdef F16C_PATH
    f16c = f16c_available = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#endif
    return PyModule_Create(&module);
}

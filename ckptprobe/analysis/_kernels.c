/* Compiled loops for the bitwise comparison of 16-bit floats (bf16, fp16): `count16` counts
a pair of tensors for `sparsity`; `mark16` and `tally8` set each run's bit of a byte per entry
and take the histogram of these bytes for `consensus` and `profile` (`mask_scan._code_block`);
`mark16` with one run is also `update.update_mask`'s bool mask. `count32` and
`count_bf16_f32` (`mark32`, `mark_bf16_f32`) count (mark) a float32 checkpoint against another,
bitwise, or against a bf16 one, rounded to bf16 (`--mode bf16`). `count16_files` and
`mark16_files` are `count16` and `mark16` reading local files themselves (POSIX `pread`),
chunk by chunk, for the workers of `sparsity` and `mask_scan`. `norms_files` reads a base and a
series of checkpoints the same way and sums, in float64, the squared norms `drift` reports.

Optional: without a C compiler the package installs all the same, and `update` and
`mask_scan` compute the same results in numpy passes. Each numpy pass is fast; the cost is
their number (xor, proof, compare, pack, add, count: one pass each over the same bytes). Here
they are one pass, on a vector of values held in registers.

The rule is `update.update_mask`'s for bitwise mode, entry by entry: a pair holding an inf
or NaN (every exponent bit set, on either side) is non-finite; else it changed iff the bits
differ and it is not a +0/-0 pair (all bits but the sign zero on both sides).

Buffers arrive through the buffer protocol (numpy arrays, memory maps) and are only read
or written in place; the GIL is released while a loop runs.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#ifndef _WIN32
#include <errno.h>
#include <unistd.h>
#endif

/* Loops are written for the compiler's vectorizer; on x86-64 GCC also builds an AVX2
   (x86-64-v3) copy of each and picks one at load time. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define VECTOR_CLONES
#endif
#if defined(_MSC_VER)
#define restrict __restrict
#endif

#define TILE 4096 /* entries per step: a tile with an inf or NaN is counted again, entry by entry */
#define WIDE 8192 /* 8 runs x (WIDE - 1) < 2^16: counts summed in 16 bits, WIDE - 1 at a time */

/* Changed (1) or not (0) for one pair, non-finite pairs excluded. */
#define CHANGED(a, b, e) \
    ((uint8_t)(((a) != (b)) & ((((a) | (b)) & 0x7FFF) != 0) & (((a) & (e)) != (e)) & (((b) & (e)) != (e))))
#define NONFINITE(a, b, e) ((uint8_t)((((a) & (e)) == (e)) | (((b) & (e)) == (e))))

/* Helpers for the vector loops, on 16-bit lanes throughout (no C integer promotion to
   32 bits, which would halve the lanes). CHANGED16 is 0xFFFF where the bits differ and the
   pair is not +0/-0, else 0; MAGNITUDE is a value's bits without the sign. Any inf/NaN in a
   tile shows as a magnitude at or above the exponent mask `e`: such a tile is counted again
   entry by entry (CHANGED, NONFINITE). */
#define CHANGED16(a, b) ((uint16_t)(-(uint16_t)((a) != (b)) & -(uint16_t)((((a) | (b)) & 0x7FFF) != 0)))
#define MAGNITUDE(a) ((uint16_t)((a) & 0x7FFF))
#define MAX16(p, q) ((p) > (q) ? (p) : (q))

/* The bf16 bits of float32 bits u, as `bf16.float32_to_bf16_bits`: rounded to nearest, ties to
   even; a NaN stays a (quiet) NaN; a value that rounds past the largest bf16 becomes inf. */
#define BF16_OF(u) ((uint16_t)(((u) & 0x7FFFFFFFu) > 0x7F800000u ? ((u) >> 16) | 0x40u \
                                                                 : ((u) + 0x7FFFu + (((u) >> 16) & 1u)) >> 16))

/* The body of the (changed, non-finite) count of n pairs of 16-bit bits: x[i] against LOAD(y[i]). */
#define COUNT16_BODY(LOAD)                                                                    \
    uint64_t c = 0, f = 0;                                                                    \
    for (Py_ssize_t lo = 0; lo < n; lo += TILE) {                                             \
        Py_ssize_t hi = n - lo < TILE ? n : lo + TILE;                                        \
        uint16_t cs = 0, top = 0; /* TILE < 2^16: the tile's count fits in 16 bits */         \
        for (Py_ssize_t i = lo; i < hi; i++) {                                                \
            uint16_t a = x[i], b = LOAD(y[i]), ma = MAGNITUDE(a), mb = MAGNITUDE(b);          \
            cs -= CHANGED16(a, b); /* 0xFFFF is -1 */                                         \
            top = MAX16(top, MAX16(ma, mb));                                                  \
        }                                                                                     \
        if (top >= e) {                                                                       \
            cs = 0;                                                                           \
            for (Py_ssize_t i = lo; i < hi; i++) {                                            \
                uint16_t a = x[i], b = LOAD(y[i]);                                            \
                cs += CHANGED(a, b, e);                                                       \
                f += NONFINITE(a, b, e);                                                      \
            }                                                                                 \
        }                                                                                     \
        c += cs;                                                                              \
    }                                                                                         \
    *changed = c;                                                                             \
    *nonfinite = f;

#define AS_IS(v) (v)

/* (changed, non-finite) counts of n pairs. */
VECTOR_CLONES
static void count16_loop(const uint16_t *restrict x, const uint16_t *restrict y, Py_ssize_t n, uint16_t e,
                         uint64_t *changed, uint64_t *nonfinite) {
    COUNT16_BODY(AS_IS)
}

/* The same for bf16 bits x against float32 bits y rounded to bf16: `--mode bf16` (the default
   for a bf16 checkpoint against a float32 one). */
VECTOR_CLONES
static void count_bf16_f32_loop(const uint16_t *restrict x, const uint32_t *restrict y, Py_ssize_t n,
                                uint64_t *changed, uint64_t *nonfinite) {
    const uint16_t e = 0x7F80;
    COUNT16_BODY(BF16_OF)
}

/* The same for two float32 checkpoints compared bitwise, on 32-bit lanes: changed iff the bits
   differ and the pair is not +0/-0; a pair holding an inf or NaN is non-finite. */
#define E32 0x7F800000u
#define CHANGED32(a, b) ((uint32_t)(-(uint32_t)((a) != (b)) & -(uint32_t)((((a) | (b)) & 0x7FFFFFFFu) != 0)))
VECTOR_CLONES
static void count32_loop(const uint32_t *restrict x, const uint32_t *restrict y, Py_ssize_t n, uint64_t *changed,
                         uint64_t *nonfinite) {
    uint64_t c = 0, f = 0;
    for (Py_ssize_t lo = 0; lo < n; lo += TILE) {
        Py_ssize_t hi = n - lo < TILE ? n : lo + TILE;
        uint32_t cs = 0, top = 0;
        for (Py_ssize_t i = lo; i < hi; i++) {
            uint32_t a = x[i], b = y[i], ma = a & 0x7FFFFFFFu, mb = b & 0x7FFFFFFFu;
            cs -= CHANGED32(a, b);
            top = ma > top ? ma : top;
            top = mb > top ? mb : top;
        }
        if (top >= E32) {
            cs = 0;
            for (Py_ssize_t i = lo; i < hi; i++) {
                uint32_t a = x[i], b = y[i];
                uint32_t bad = ((a & E32) == E32) | ((b & E32) == E32);
                cs += (uint32_t)((a != b) & (((a | b) & 0x7FFFFFFFu) != 0) & !bad);
                f += bad;
            }
        }
        c += cs;
    }
    *changed = c;
    *nonfinite = f;
}

/* The body of a mark: bit `bit` of codes[i] := x[i] against LOAD(y[i]) changed; the non-finite count. */
#define MARK16_BODY(LOAD)                                                                     \
    uint64_t nonfinite = 0;                                                                   \
    uint8_t set = (uint8_t)(1u << bit), keep = (uint8_t)~set;                                 \
    for (Py_ssize_t lo = 0; lo < n; lo += TILE) {                                             \
        Py_ssize_t hi = n - lo < TILE ? n : lo + TILE;                                        \
        uint16_t top = 0;                                                                     \
        for (Py_ssize_t i = lo; i < hi; i++) {                                                \
            uint16_t a = x[i], b = LOAD(y[i]), ma = MAGNITUDE(a), mb = MAGNITUDE(b);          \
            codes[i] = (uint8_t)((codes[i] & keep) | ((uint8_t)CHANGED16(a, b) & set));       \
            top = MAX16(top, MAX16(ma, mb));                                                  \
        }                                                                                     \
        if (top < e)                                                                          \
            continue;                                                                         \
        for (Py_ssize_t i = lo; i < hi; i++) {                                                \
            if (NONFINITE(x[i], LOAD(y[i]), e)) {                                             \
                codes[i] &= keep;                                                             \
                nonfinite++;                                                                  \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
    return nonfinite;

/* Bit `bit` of codes[i] := pair i changed; returns the non-finite count. */
VECTOR_CLONES
static uint64_t mark16_loop(const uint16_t *restrict x, const uint16_t *restrict y, Py_ssize_t n, uint16_t e,
                            int bit, uint8_t *restrict codes) {
    MARK16_BODY(AS_IS)
}

/* The same for bf16 bits x against float32 bits y rounded to bf16 (`count_bf16_f32`'s rule). */
VECTOR_CLONES
static uint64_t mark_bf16_f32_loop(const uint16_t *restrict x, const uint32_t *restrict y, Py_ssize_t n, int bit,
                                   uint8_t *restrict codes) {
    const uint16_t e = 0x7F80;
    MARK16_BODY(BF16_OF)
}

/* The same for two float32 sides compared bitwise (`count32`'s rule). */
VECTOR_CLONES
static uint64_t mark32_loop(const uint32_t *restrict x, const uint32_t *restrict y, Py_ssize_t n, int bit,
                            uint8_t *restrict codes) {
    uint64_t nonfinite = 0;
    uint8_t set = (uint8_t)(1u << bit), keep = (uint8_t)~set;
    for (Py_ssize_t lo = 0; lo < n; lo += TILE) {
        Py_ssize_t hi = n - lo < TILE ? n : lo + TILE;
        uint32_t top = 0;
        for (Py_ssize_t i = lo; i < hi; i++) {
            uint32_t a = x[i], b = y[i], ma = a & 0x7FFFFFFFu, mb = b & 0x7FFFFFFFu;
            codes[i] = (uint8_t)((codes[i] & keep) | ((uint8_t)CHANGED32(a, b) & set));
            top = ma > top ? ma : top;
            top = mb > top ? mb : top;
        }
        if (top < E32)
            continue;
        for (Py_ssize_t i = lo; i < hi; i++) {
            if (((x[i] & E32) == E32) | ((y[i] & E32) == E32)) {
                codes[i] &= keep;
                nonfinite++;
            }
        }
    }
    return nonfinite;
}

/* The histogram of the codes (256 bins); with `counts`, each entry's number of runs (the
   popcount of its code) and, with `row_sums`, their sums by row and by column. */
VECTOR_CLONES
static void tally8_loop(const uint8_t *restrict codes, Py_ssize_t rows, Py_ssize_t cols, int64_t *restrict hist,
                        uint8_t *restrict counts, int64_t *restrict row_sums, int64_t *restrict col_sums) {
    uint32_t h[4][256];  /* four histograms: no increment waits on the one before */
    Py_ssize_t n = rows * cols, i = 0;
    while (i < n) {
        /* in pieces of 2^31 entries, so that a 32-bit bin counts at most 2^29 */
        Py_ssize_t stop = n - i < (Py_ssize_t)1 << 31 ? n : i + ((Py_ssize_t)1 << 31);
        memset(h, 0, sizeof h);
        for (; i + 4 <= stop; i += 4) {
            h[0][codes[i]]++;
            h[1][codes[i + 1]]++;
            h[2][codes[i + 2]]++;
            h[3][codes[i + 3]]++;
        }
        for (; i < stop; i++)
            h[0][codes[i]]++;
        for (int v = 0; v < 256; v++)
            hist[v] += (int64_t)h[0][v] + h[1][v] + h[2][v] + h[3][v];
    }
    if (!counts)
        return;
    for (i = 0; i < n; i++) {  /* popcount of a byte, in steps the vectorizer takes */
        uint8_t v = codes[i];
        v = v - ((v >> 1) & 0x55);
        v = (v & 0x33) + ((v >> 2) & 0x33);
        counts[i] = (v + (v >> 4)) & 0x0F;
    }
    if (!row_sums)
        return;
    /* Sums in 16-bit lanes, which take 16 entries a vector, over strips of at most WIDE - 1
       columns: a row's strip holds at most 8 (WIDE - 1) < 2^16, and the column sums are added
       out every WIDE - 1 rows. */
    uint16_t acc[WIDE];
    memset(row_sums, 0, (size_t)rows * sizeof *row_sums);
    for (Py_ssize_t j0 = 0; j0 < cols; j0 += WIDE - 1) {
        Py_ssize_t w = cols - j0 < WIDE - 1 ? cols - j0 : WIDE - 1;
        memset(acc, 0, sizeof acc);
        for (Py_ssize_t r = 0; r < rows; r++) {
            const uint8_t *c = counts + r * cols + j0;
            uint16_t s = 0;
            for (Py_ssize_t j = 0; j < w; j++) {
                s += c[j];
                acc[j] += c[j];
            }
            row_sums[r] += s;
            if (r % (WIDE - 1) == WIDE - 2 || r == rows - 1)
                for (Py_ssize_t j = 0; j < w; j++) {
                    col_sums[j0 + j] += acc[j];
                    acc[j] = 0;
                }
        }
    }
}

/* Float32 values of n entries of one kind of float: bf16, fp16 or float32 bits, all exactly
   representable. fp16: a normal value's exponent is rebiased (15 -> 127), a subnormal one is its
   mantissa times 2^-24 (a normal float32: no subnormal is computed, so a flush-to-zero mode
   set elsewhere in the process cannot change it), inf and NaN keep every exponent bit. */
VECTOR_CLONES
static void widen_bf16(const uint16_t *restrict x, Py_ssize_t n, float *restrict out) {
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t u = (uint32_t)x[i] << 16;
        memcpy(out + i, &u, 4);
    }
}

VECTOR_CLONES
static void widen_f16(const uint16_t *restrict x, Py_ssize_t n, float *restrict out) {
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t h = x[i], e = h & 0x7C00u, m = h & 0x3FFu, u;
        float sub = (float)m * 0x1p-24f;
        memcpy(&u, &sub, 4);
        u = e == 0 ? u : e == 0x7C00u ? 0x7F800000u | m << 13 : ((h & 0x7FFFu) + (112u << 10)) << 13;
        u |= (h & 0x8000u) << 16;
        memcpy(out + i, &u, 4);
    }
}

/* Squared norms over n entries, in float64, in LANES independent sums (a few vectors' worth:
   one running sum would wait on each add): *sq += ||cur||^2, *to_base += ||cur - w0||^2 and
   *step += ||cur - prev||^2 (w0: the base; prev: the checkpoint before). `sq_sum` is ||x||^2 alone. */
#define LANES 16
VECTOR_CLONES
static void sq_sums(const float *restrict cur, const float *restrict w0, const float *restrict prev, Py_ssize_t n,
                    double *sq, double *to_base, double *step) {
    double s[LANES] = {0}, b[LANES] = {0}, t[LANES] = {0};
    Py_ssize_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) {
            double c = cur[i + j], d0 = c - w0[i + j], d1 = c - prev[i + j];
            s[j] += c * c;
            b[j] += d0 * d0;
            t[j] += d1 * d1;
        }
    for (; i < n; i++) {
        double c = cur[i], d0 = c - w0[i], d1 = c - prev[i];
        s[0] += c * c;
        b[0] += d0 * d0;
        t[0] += d1 * d1;
    }
    for (int j = 0; j < LANES; j++) {
        *sq += s[j];
        *to_base += b[j];
        *step += t[j];
    }
}

VECTOR_CLONES
static double sq_sum(const float *restrict x, Py_ssize_t n) {
    double s[LANES] = {0}, sum = 0;
    Py_ssize_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++)
            s[j] += (double)x[i + j] * x[i + j];
    for (; i < n; i++)
        s[0] += (double)x[i] * x[i];
    for (int j = 0; j < LANES; j++)
        sum += s[j];
    return sum;
}

#ifndef _WIN32
/* Reading the files here, chunk by chunk, into one small buffer that stays in cache: the
   Python-side read of a chunk cost 20-30 us more than the copy itself (opening the file,
   slicing), which decided the chunk size. Sources arrive as (file descriptor, byte offset
   of the first entry) pairs; a read error raises OSError whose `filename` is the index of
   the source that failed. */
#define SLACK 4096 /* bytes a buffer holds beyond its data, to place it at the file's offset in a page */

/* Bytes [offset, offset + len) of fd, copied into `buf` at the file's offset within a page
   (the kernel copies page-cached data several times faster when source and destination
   share it); `buf` holds len + SLACK bytes. Where they are, or NULL with errno set
   (ENODATA, or EIO where there is none: the file ended first). */
static const uint16_t *read_at(int fd, int64_t offset, size_t len, char *buf) {
    char *dst = buf + (size_t)(((uint64_t)offset - (uint64_t)(uintptr_t)buf) % SLACK), *p = dst;
    while (len) {
        ssize_t got = pread(fd, p, len, (off_t)offset);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0) {
            if (got == 0) /* the file is shorter than its header said when it was opened */
#ifdef ENODATA
                errno = ENODATA;
#else
                errno = EIO;
#endif
            return NULL;
        }
        p += got;
        offset += got;
        len -= (size_t)got;
    }
    return (const uint16_t *)dst;
}

static PyObject *read_error(int err, Py_ssize_t source) {
    PyObject *args = Py_BuildValue("(isn)", err, strerror(err), source);
    if (args) {
        PyErr_SetObject(PyExc_OSError, args);
        Py_DECREF(args);
    }
    return NULL;
}

/* (fd, offset) pairs of a sequence of at most `most` sources; their number, or -1 with an error set. */
static Py_ssize_t get_sources(PyObject *seq, int *fds, int64_t *offsets, Py_ssize_t most) {
    PyObject *fast = PySequence_Fast(seq, "sources: a sequence of (fd, offset) pairs");
    if (!fast)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n < 2 || n > most) {
        PyErr_Format(PyExc_ValueError, "sources: %zd given, 2 to %zd expected", n, most);
        n = -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long long off;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "iL", &fds[i], &off)) {
            n = -1;
            break;
        }
        offsets[i] = off;
    }
    Py_DECREF(fast);
    return n;
}

/* Get a buffer of at least `min_len` bytes (writable or not), or set an error. */
static int get_buffer(PyObject *obj, Py_buffer *view, int writable, Py_ssize_t min_len, const char *what) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    if (view->len < min_len) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, %zd needed", what, view->len, min_len);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* x and y: buffers of 16-bit float bits, y at least as long as x. */
static int get_pair(PyObject *xo, PyObject *yo, Py_buffer *x, Py_buffer *y) {
    if (get_buffer(xo, x, 0, 0, "x") < 0)
        return -1;
    if (get_buffer(yo, y, 0, x->len, "y") < 0) {
        PyBuffer_Release(x);
        return -1;
    }
    return 0;
}

static PyObject *count16(PyObject *self, PyObject *args) {
    PyObject *xo, *yo;
    unsigned int e;
    Py_buffer x, y;
    if (!PyArg_ParseTuple(args, "OOI", &xo, &yo, &e) || get_pair(xo, yo, &x, &y) < 0)
        return NULL;
    uint64_t changed, nonfinite;
    Py_BEGIN_ALLOW_THREADS
    count16_loop(x.buf, y.buf, x.len / 2, (uint16_t)e, &changed, &nonfinite);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&x);
    PyBuffer_Release(&y);
    return Py_BuildValue("KK", (unsigned long long)changed, (unsigned long long)nonfinite);
}

/* count16's counterparts for float32 sides: `n` pairs, y holding `y_size` bytes an entry. */
static PyObject *count_wide(PyObject *args, Py_ssize_t x_size, Py_ssize_t y_size) {
    PyObject *xo, *yo;
    Py_buffer x, y;
    if (!PyArg_ParseTuple(args, "OO", &xo, &yo) || get_buffer(xo, &x, 0, 0, "x") < 0)
        return NULL;
    Py_ssize_t n = x.len / x_size;
    if (get_buffer(yo, &y, 0, n * y_size, "y") < 0) {
        PyBuffer_Release(&x);
        return NULL;
    }
    uint64_t changed, nonfinite;
    Py_BEGIN_ALLOW_THREADS
    if (x_size == 4)
        count32_loop(x.buf, y.buf, n, &changed, &nonfinite);
    else
        count_bf16_f32_loop(x.buf, y.buf, n, &changed, &nonfinite);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&x);
    PyBuffer_Release(&y);
    return Py_BuildValue("KK", (unsigned long long)changed, (unsigned long long)nonfinite);
}

static PyObject *count32(PyObject *self, PyObject *args) {
    return count_wide(args, 4, 4);
}

static PyObject *count_bf16_f32(PyObject *self, PyObject *args) {
    return count_wide(args, 2, 4);
}

static PyObject *mark16(PyObject *self, PyObject *args) {
    PyObject *xo, *yo, *co;
    unsigned int e;
    int bit;
    Py_buffer x, y, codes;
    if (!PyArg_ParseTuple(args, "OOIiO", &xo, &yo, &e, &bit, &co))
        return NULL;
    if (bit < 0 || bit > 7) {
        PyErr_SetString(PyExc_ValueError, "bit must be in 0..7");
        return NULL;
    }
    if (get_pair(xo, yo, &x, &y) < 0)
        return NULL;
    if (get_buffer(co, &codes, 1, x.len / 2, "codes") < 0) {
        PyBuffer_Release(&y);
        PyBuffer_Release(&x);
        return NULL;
    }
    uint64_t nonfinite;
    Py_BEGIN_ALLOW_THREADS
    nonfinite = mark16_loop(x.buf, y.buf, x.len / 2, (uint16_t)e, bit, codes.buf);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&codes);
    PyBuffer_Release(&y);
    PyBuffer_Release(&x);
    return PyLong_FromUnsignedLongLong(nonfinite);
}

/* mark16's counterparts for float32 runs: x holds `x_size` bytes an entry, y 4. */
static PyObject *mark_wide(PyObject *args, Py_ssize_t x_size) {
    PyObject *xo, *yo, *co;
    int bit;
    Py_buffer x, y, codes;
    if (!PyArg_ParseTuple(args, "OOiO", &xo, &yo, &bit, &co))
        return NULL;
    if (bit < 0 || bit > 7) {
        PyErr_SetString(PyExc_ValueError, "bit must be in 0..7");
        return NULL;
    }
    if (get_buffer(xo, &x, 0, 0, "x") < 0)
        return NULL;
    Py_ssize_t n = x.len / x_size;
    if (get_buffer(yo, &y, 0, n * 4, "y") < 0) {
        PyBuffer_Release(&x);
        return NULL;
    }
    if (get_buffer(co, &codes, 1, n, "codes") < 0) {
        PyBuffer_Release(&y);
        PyBuffer_Release(&x);
        return NULL;
    }
    uint64_t nonfinite;
    Py_BEGIN_ALLOW_THREADS
    if (x_size == 4)
        nonfinite = mark32_loop(x.buf, y.buf, n, bit, codes.buf);
    else
        nonfinite = mark_bf16_f32_loop(x.buf, y.buf, n, bit, codes.buf);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&codes);
    PyBuffer_Release(&y);
    PyBuffer_Release(&x);
    return PyLong_FromUnsignedLongLong(nonfinite);
}

static PyObject *mark32(PyObject *self, PyObject *args) {
    return mark_wide(args, 4);
}

static PyObject *mark_bf16_f32(PyObject *self, PyObject *args) {
    return mark_wide(args, 2);
}

static PyObject *tally8(PyObject *self, PyObject *args) {
    PyObject *co, *ho, *no, *ro, *so;
    Py_ssize_t cols;
    Py_buffer codes, hist, counts = {0}, rs = {0}, cs = {0};
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "OnOOOO", &co, &cols, &ho, &no, &ro, &so))
        return NULL;
    if (cols < 1) {
        PyErr_SetString(PyExc_ValueError, "cols must be at least 1");
        return NULL;
    }
    if (get_buffer(co, &codes, 0, 0, "codes") < 0)
        return NULL;
    Py_ssize_t n = codes.len, rows = n / cols;
    int with_counts = no != Py_None, with_sums = with_counts && ro != Py_None;
    if (with_sums && rows * cols != n) {
        PyErr_SetString(PyExc_ValueError, "codes do not hold whole rows");
        goto done_codes;
    }
    if (get_buffer(ho, &hist, 1, 256 * 8, "hist") < 0)
        goto done_codes;
    if (with_counts && get_buffer(no, &counts, 1, n, "counts") < 0)
        goto done_hist;
    if (with_sums && get_buffer(ro, &rs, 1, rows * 8, "row_sums") < 0)
        goto done_counts;
    if (with_sums && get_buffer(so, &cs, 1, cols * 8, "col_sums") < 0)
        goto done_rs;
    Py_BEGIN_ALLOW_THREADS
    tally8_loop(codes.buf, with_sums ? rows : 1, with_sums ? cols : n, hist.buf, with_counts ? counts.buf : NULL,
                with_sums ? rs.buf : NULL, with_sums ? cs.buf : NULL);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
    if (with_sums)
        PyBuffer_Release(&cs);
done_rs:
    if (with_sums)
        PyBuffer_Release(&rs);
done_counts:
    if (with_counts)
        PyBuffer_Release(&counts);
done_hist:
    PyBuffer_Release(&hist);
done_codes:
    PyBuffer_Release(&codes);
    return result;
}

static PyObject *count16_files(PyObject *self, PyObject *args) {
    PyObject *so, *bo;
    Py_ssize_t n;
    unsigned int e;
    int fds[2];
    int64_t offsets[2];
    Py_buffer buf;
    if (!PyArg_ParseTuple(args, "OnIO", &so, &n, &e, &bo) || get_sources(so, fds, offsets, 2) < 0)
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "n must be at least 0");
        return NULL;
    }
    if (get_buffer(bo, &buf, 1, 2 * (SLACK + 2), "buf") < 0)
        return NULL;
    size_t half = (size_t)buf.len / 2, chunk = (half - SLACK) / 2; /* entries a side per read */
    uint64_t changed = 0, nonfinite = 0;
    int err = 0;
    Py_ssize_t failed = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t lo = 0; lo < n && !err; lo += (Py_ssize_t)chunk) {
        size_t m = (size_t)(n - lo) < chunk ? (size_t)(n - lo) : chunk;
        const uint16_t *x = read_at(fds[0], offsets[0] + 2 * (int64_t)lo, 2 * m, buf.buf);
        const uint16_t *y = x ? read_at(fds[1], offsets[1] + 2 * (int64_t)lo, 2 * m, (char *)buf.buf + half) : NULL;
        if (!y) {
            err = errno;
            failed = x ? 1 : 0;
            break;
        }
        uint64_t c, f;
        count16_loop(x, y, (Py_ssize_t)m, (uint16_t)e, &c, &f);
        changed += c;
        nonfinite += f;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    if (err)
        return read_error(err, failed);
    return Py_BuildValue("KK", (unsigned long long)changed, (unsigned long long)nonfinite);
}

static PyObject *mark16_files(PyObject *self, PyObject *args) {
    PyObject *so, *bo, *co;
    Py_ssize_t n;
    unsigned int e;
    int fds[9];
    int64_t offsets[9];
    Py_buffer buf, codes;
    if (!PyArg_ParseTuple(args, "OnIOO", &so, &n, &e, &bo, &co))
        return NULL;
    Py_ssize_t sources = get_sources(so, fds, offsets, 9);
    if (sources < 0)
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "n must be at least 0");
        return NULL;
    }
    if (get_buffer(bo, &buf, 1, 2 * (2 * n + SLACK), "buf") < 0)
        return NULL;
    if (get_buffer(co, &codes, 1, n, "codes") < 0) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    uint64_t nonfinite[8] = {0};
    int err = 0;
    Py_ssize_t k = 0;
    char *other = (char *)buf.buf + 2 * n + SLACK;
    Py_BEGIN_ALLOW_THREADS
    memset(codes.buf, 0, (size_t)n);
    const uint16_t *x = read_at(fds[0], offsets[0], 2 * (size_t)n, buf.buf);
    for (k = 1; x && k < sources; k++) {
        const uint16_t *y = read_at(fds[k], offsets[k], 2 * (size_t)n, other);
        if (!y)
            break;
        nonfinite[k - 1] = mark16_loop(x, y, n, (uint16_t)e, (int)(k - 1), codes.buf);
    }
    if (!x) {
        err = errno;
        k = 0;
    } else if (k < sources) {
        err = errno;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&codes);
    PyBuffer_Release(&buf);
    if (err)
        return read_error(err, k);
    PyObject *out = PyTuple_New(sources - 1);
    for (Py_ssize_t i = 0; out && i < sources - 1; i++) {
        PyObject *count = PyLong_FromUnsignedLongLong(nonfinite[i]);
        if (!count) {
            Py_CLEAR(out);
            break;
        }
        PyTuple_SET_ITEM(out, i, count);
    }
    return out;
}

static PyObject *norms_files(PyObject *self, PyObject *args) {
    PyObject *so, *bo, *oo;
    const char *kinds;
    Py_ssize_t n, n_kinds;
    Py_buffer buf, out;
    if (!PyArg_ParseTuple(args, "Os#nOO", &so, &kinds, &n_kinds, &n, &bo, &oo))
        return NULL;
    Py_ssize_t count = PySequence_Size(so);
    if (count < 0)
        return NULL;
    if (count < 2 || n_kinds != count || strspn(kinds, "bef") != (size_t)count || n < 0) {
        PyErr_SetString(PyExc_ValueError, "norms_files: 2 or more sources, one kind each (b, e or f), n >= 0");
        return NULL;
    }
    int *fds = PyMem_Malloc((size_t)count * sizeof *fds);
    int64_t *offsets = PyMem_Malloc((size_t)count * sizeof *offsets);
    PyObject *result = NULL;
    if (!fds || !offsets) {
        PyErr_NoMemory();
        goto done;
    }
    if (get_sources(so, fds, offsets, count) < 0 || get_buffer(bo, &buf, 1, 16 + 64 + SLACK, "buf") < 0)
        goto done;
    if (get_buffer(oo, &out, 1, (3 * count - 2) * (Py_ssize_t)sizeof(double), "out") < 0) {
        PyBuffer_Release(&buf);
        goto done;
    }
    /* buf: three float32 chunks (the base, and the two latest checkpoints in turn), then the raw bytes */
    size_t skip = (size_t)(-(uintptr_t)buf.buf % 64), chunk = ((size_t)buf.len - skip - SLACK) / 16;
    float *w0 = (float *)((char *)buf.buf + skip), *prev = w0 + chunk, *cur = prev + chunk;
    char *raw = (char *)(cur + chunk);
    double *sums = out.buf, *to_base = sums + count, *step = to_base + count - 1;
    int err = 0;
    Py_ssize_t k = 0;
    Py_BEGIN_ALLOW_THREADS
    memset(sums, 0, (size_t)(3 * count - 2) * sizeof *sums);
    for (Py_ssize_t lo = 0; lo < n && !err; lo += (Py_ssize_t)chunk) {
        size_t m = (size_t)(n - lo) < chunk ? (size_t)(n - lo) : chunk;
        for (k = 0; k < count; k++) {
            size_t size = kinds[k] == 'f' ? 4 : 2;
            const uint16_t *x = read_at(fds[k], offsets[k] + (int64_t)(size * (size_t)lo), size * m, raw);
            if (!x) {
                err = errno;
                break;
            }
            float *dst = k == 0 ? w0 : cur;
            if (kinds[k] == 'b')
                widen_bf16(x, (Py_ssize_t)m, dst);
            else if (kinds[k] == 'e')
                widen_f16(x, (Py_ssize_t)m, dst);
            else
                memcpy(dst, x, 4 * m);
            if (k == 0) {
                sums[0] += sq_sum(w0, (Py_ssize_t)m);
                continue;
            }
            sq_sums(cur, w0, k == 1 ? w0 : prev, (Py_ssize_t)m, sums + k, to_base + k - 1, step + k - 1);
            float *t = prev;
            prev = cur;
            cur = t;
        }
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&out);
    PyBuffer_Release(&buf);
    result = err ? read_error(err, k) : Py_NewRef(Py_None);
done:
    PyMem_Free(fds);
    PyMem_Free(offsets);
    return result;
}
#endif

static PyMethodDef methods[] = {
    {"count16", count16, METH_VARARGS,
     "count16(x, y, exp) -> (changed, nonfinite): the counts over two buffers of 16-bit float bits "
     "(exponent mask exp)."},
    {"count32", count32, METH_VARARGS,
     "count32(x, y) -> (changed, nonfinite): count16's rule for two buffers of float32 bits."},
    {"count_bf16_f32", count_bf16_f32, METH_VARARGS,
     "count_bf16_f32(x, y) -> (changed, nonfinite): count16 of bf16 bits x against float32 bits y "
     "rounded to bf16 (nearest, ties to even), as `--mode bf16` compares them."},
    {"mark16", mark16, METH_VARARGS,
     "mark16(x, y, exp, bit, codes) -> nonfinite: writes whether pair i changed into bit `bit` (0..7) of "
     "codes[i] (uint8); returns the non-finite count."},
    {"mark32", mark32, METH_VARARGS,
     "mark32(x, y, bit, codes) -> nonfinite: mark16 for two buffers of float32 bits (count32's rule)."},
    {"mark_bf16_f32", mark_bf16_f32, METH_VARARGS,
     "mark_bf16_f32(x, y, bit, codes) -> nonfinite: mark16 of bf16 bits x against float32 bits y rounded "
     "to bf16 (count_bf16_f32's rule)."},
    {"tally8", tally8, METH_VARARGS,
     "tally8(codes, cols, hist, counts, row_sums, col_sums): adds the histogram of the uint8 codes into "
     "hist (256 int64); unless counts is None, writes each code's popcount there (uint8) and, unless "
     "row_sums is None, sets row_sums (rows int64) and adds into col_sums (cols int64) the counts' sums "
     "of the codes seen as (rows, cols)."},
#ifndef _WIN32
    {"count16_files", count16_files, METH_VARARGS,
     "count16_files(sources, n, exp, buf) -> (changed, nonfinite): count16 over n entries of two files, "
     "sources ((fd, byte offset), (fd, byte offset)), read in turn into the two halves of buf (writable)."},
    {"mark16_files", mark16_files, METH_VARARGS,
     "mark16_files(sources, n, exp, buf, codes) -> nonfinite per run: codes[:n] := 0, then mark16 of n "
     "entries of the base (sources[0], an (fd, byte offset) pair) against each run (sources[1:], at most "
     "8) into bit k - 1 of codes; buf holds 2 (2 n + 4096) bytes."},
    {"norms_files", norms_files, METH_VARARGS,
     "norms_files(sources, kinds, n, buf, out): squared norms in float64 over n entries of a base "
     "(sources[0]) and checkpoints W_1..W_T (sources[1:], (fd, byte offset) pairs), each of a kind: 'b' "
     "bf16, 'e' fp16, 'f' float32. Writes out[0..T] := ||W_t||^2, out[T+1..2T] := ||W_t - W_0||^2 and "
     "out[2T+1..3T] := ||W_t - W_{t-1}||^2; buf (writable) holds 16 bytes an entry of a chunk + 4160."},
#endif
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

/* VERSION changes with any function's signature or meaning: `kernels.py` takes only the
   version it was written for, so a module left from an older build is never called. */
PyMODINIT_FUNC PyInit__kernels(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "VERSION", 5) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

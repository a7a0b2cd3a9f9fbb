/* ddb_cdc_speedups._canonical — an experiment (issue 16): the canonical AttributeValue JSON of
 * one image, written in C.
 *
 * canonical_json(image) returns either None ("not sure: take the Python path") or bytes that are
 * exactly orjson.dumps(pipeline.avjson.canonical_item(image)). It never raises (except
 * MemoryError) and runs no Python code: it only reads exact dict / list / str / bool objects with
 * the C API, writes into a growable buffer and builds the bytes once at the end. Anything it does
 * not recognise as one of the fast shapes below gives None, so the caller's Python path (which
 * decides every error) runs instead.
 *
 * Fast shapes, both functions (every AttributeValue an exact dict with exactly one key, an exact
 * str tag; attribute names exact str; attribute order as in the dict, which is orjson's):
 *
 *   S     an exact str, escaped as orjson escapes (\" \\ \b \t \n \f \r, other characters below
 *         0x20 as \u00XX with lower-case hex, everything else as raw UTF-8; a str with a lone
 *         surrogate cannot be UTF-8 and gives None — orjson would raise for it);
 *   N     an exact ASCII str for which pipeline.avjson._plain_number_text is True (written as is);
 *   BOOL  a bool;  NULL  only True;
 *   M     an exact dict of exact-str names -> AttributeValues; L an exact list; both at most
 *         MAX_NESTING_DEPTH (pipeline.codec's 32) levels, counted as pipeline.codec counts them
 *         (a value more deeply nested gives None: the codec raises its DecodeError for it);
 *   SS    an exact list of exact str, strictly ascending (PyUnicode_Compare), written as is;
 *   B     an exact ASCII str in canonical base64 (the rule of pipeline.avjson._canonical_base64:
 *         standard alphabet, padding, zero trailing bits), written as is.
 *
 * canonical_json_basic() stops there (the shapes issue 16's brief named). canonical_json() also
 * writes, as canonical_item does:
 *
 *   N     any number in the ASCII syntax [+-]? (digits [. digits?] | . digits) ([eE] [+-]? digits)?
 *         with at most 38 significant digits (leading zeros do not count, trailing ones do) and an
 *         adjusted exponent within -128..126 (a zero: its exponent within -128..126) — there
 *         DYNAMODB_CONTEXT.create_decimal(text) is exact and raises nothing — as the text
 *         str(Decimal) gives (Python's to-scientific-string rule: "1e2" -> "1E+2",
 *         "0.0000001" -> "1E-7", "007" -> "7"; capital E, as the default decimal context writes it);
 *   NS    a non-empty exact list of such numbers: the distinct values (the first text of equal
 *         ones, as a set keeps it) in ascending numeric order, each as str(Decimal);
 *   SS    not ascending: sorted, duplicates dropped (sorted(set(value)));
 *   BS    a non-empty exact list of canonical base64 texts: distinct, sorted by their bytes.
 *
 * Everything else (B bytes, BS with a non-canonical member, NULL false, {} for an empty map, two
 * tags, unknown tags, subclasses, ...) gives None.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdlib.h>
#include <string.h>

#define MAX_NESTING_DEPTH 32 /* pipeline.codec.MAX_NESTING_DEPTH (the tests check it is the same) */
#define MAX_DIGITS 38        /* DYNAMODB_CONTEXT.prec */
#define MIN_ADJUSTED (-128)  /* DYNAMODB_CONTEXT.Emin */
#define MAX_ADJUSTED 126     /* DYNAMODB_CONTEXT.Emax */

/* Results of the writers: written, not a fast shape (-> None), or an error (MemoryError) set. */
#define OK 1
#define NOT_SURE 0
#define FAILED (-1)

/* ---- the output buffer -------------------------------------------------------------------- */

typedef struct {
    char *p;
    Py_ssize_t len, cap;
    char stack[8192];
} Buf;

static int
buf_grow(Buf *b, Py_ssize_t extra)
{
    if (extra > PY_SSIZE_T_MAX - b->len) {
        PyErr_NoMemory();
        return FAILED;
    }
    Py_ssize_t need = b->len + extra, cap = b->cap;
    while (cap < need)
        cap = cap > PY_SSIZE_T_MAX / 2 ? need : cap * 2;
    char *p;
    if (b->p == b->stack) {
        p = PyMem_Malloc(cap);
        if (p != NULL)
            memcpy(p, b->stack, b->len);
    }
    else
        p = PyMem_Realloc(b->p, cap);
    if (p == NULL) {
        PyErr_NoMemory();
        return FAILED;
    }
    b->p = p;
    b->cap = cap;
    return OK;
}

static inline int
reserve(Buf *b, Py_ssize_t extra)
{
    return b->cap - b->len >= extra ? OK : buf_grow(b, extra);
}

static inline int
put(Buf *b, const char *s, Py_ssize_t n)
{
    if (reserve(b, n) != OK)
        return FAILED;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    return OK;
}

#define PUT(b, lit) put((b), (lit), (Py_ssize_t)(sizeof(lit) - 1))

/* ---- strings, escaped as orjson escapes them ---------------------------------------------- */

/* For a character below 0x80: 0 = written as is; 'u' = \u00XX; else the letter after the \. */
static unsigned char ESCAPE[128];
static const char HEX[] = "0123456789abcdef"; /* orjson writes \u001f, lower case */

static void
init_escapes(void)
{
    for (int c = 0; c < 0x20; c++)
        ESCAPE[c] = 'u';
    ESCAPE['\b'] = 'b';
    ESCAPE['\t'] = 't';
    ESCAPE['\n'] = 'n';
    ESCAPE['\f'] = 'f';
    ESCAPE['\r'] = 'r';
    ESCAPE['"'] = '"';
    ESCAPE['\\'] = '\\';
}

/* Extra output bytes of one character beyond one byte; -1 for a surrogate (not UTF-8). */
#define EXTRA(c)                                                                                   \
    ((c) < 0x80 ? (ESCAPE[(c)] == 0 ? 0 : ESCAPE[(c)] == 'u' ? 5 : 1)                              \
     : (c) < 0x800 ? 1                                                                             \
     : (c) < 0x10000 ? (((c) >= 0xD800 && (c) <= 0xDFFF) ? -1 : 2)                                 \
     : 3)

#define COUNT_LOOP(T)                                                                              \
    do {                                                                                           \
        const T *s = (const T *)data;                                                              \
        for (Py_ssize_t i = 0; i < n; i++) {                                                       \
            Py_UCS4 c = s[i];                                                                      \
            int x = EXTRA(c);                                                                      \
            if (x < 0)                                                                             \
                return NOT_SURE;                                                                   \
            extra += x;                                                                            \
        }                                                                                          \
    } while (0)

#define WRITE_LOOP(T)                                                                              \
    do {                                                                                           \
        const T *s = (const T *)data;                                                              \
        for (Py_ssize_t i = 0; i < n; i++) {                                                       \
            Py_UCS4 c = s[i];                                                                      \
            if (c < 0x80) {                                                                        \
                unsigned char e = ESCAPE[c];                                                       \
                if (e == 0)                                                                        \
                    *o++ = (unsigned char)c;                                                       \
                else {                                                                             \
                    *o++ = '\\';                                                                   \
                    if (e == 'u') {                                                                \
                        *o++ = 'u';                                                                \
                        *o++ = '0';                                                                \
                        *o++ = '0';                                                                \
                        *o++ = HEX[c >> 4];                                                        \
                        *o++ = HEX[c & 15];                                                        \
                    }                                                                              \
                    else                                                                           \
                        *o++ = e;                                                                  \
                }                                                                                  \
            }                                                                                      \
            else if (c < 0x800) {                                                                  \
                *o++ = (unsigned char)(0xC0 | (c >> 6));                                           \
                *o++ = (unsigned char)(0x80 | (c & 0x3F));                                         \
            }                                                                                      \
            else if (c < 0x10000) {                                                                \
                *o++ = (unsigned char)(0xE0 | (c >> 12));                                          \
                *o++ = (unsigned char)(0x80 | ((c >> 6) & 0x3F));                                  \
                *o++ = (unsigned char)(0x80 | (c & 0x3F));                                         \
            }                                                                                      \
            else {                                                                                 \
                *o++ = (unsigned char)(0xF0 | (c >> 18));                                          \
                *o++ = (unsigned char)(0x80 | ((c >> 12) & 0x3F));                                 \
                *o++ = (unsigned char)(0x80 | ((c >> 6) & 0x3F));                                  \
                *o++ = (unsigned char)(0x80 | (c & 0x3F));                                         \
            }                                                                                      \
        }                                                                                          \
    } while (0)

/* An exact str as a JSON string (with its quotes). NOT_SURE for a str that is not ready or holds
 * a surrogate. Two passes: the exact output length, then the bytes. */
static int
write_str(Buf *b, PyObject *str)
{
    if (!PyUnicode_IS_READY(str))
        return NOT_SURE;
    Py_ssize_t n = PyUnicode_GET_LENGTH(str);
    int kind = PyUnicode_KIND(str);
    const void *data = PyUnicode_DATA(str);
    if (n > (PY_SSIZE_T_MAX - 2) / 6)
        return NOT_SURE; /* the length computation below could overflow (not on a 64-bit machine) */
    Py_ssize_t extra = 0;
    if (kind == PyUnicode_1BYTE_KIND)
        COUNT_LOOP(Py_UCS1);
    else if (kind == PyUnicode_2BYTE_KIND)
        COUNT_LOOP(Py_UCS2);
    else
        COUNT_LOOP(Py_UCS4);
    if (reserve(b, n + 2 + extra) != OK)
        return FAILED;
    unsigned char *o = (unsigned char *)b->p + b->len;
    *o++ = '"';
    if (extra == 0 && kind == PyUnicode_1BYTE_KIND) { /* ASCII without escapes: most strings */
        memcpy(o, data, n);
        o += n;
    }
    else if (kind == PyUnicode_1BYTE_KIND)
        WRITE_LOOP(Py_UCS1);
    else if (kind == PyUnicode_2BYTE_KIND)
        WRITE_LOOP(Py_UCS2);
    else
        WRITE_LOOP(Py_UCS4);
    *o++ = '"';
    b->len = (char *)o - b->p;
    return OK;
}

/* ASCII text that needs no escape (numbers, base64) with its quotes. */
static inline int
write_plain_text(Buf *b, const char *s, Py_ssize_t n)
{
    if (n > PY_SSIZE_T_MAX - 2) {
        PyErr_NoMemory();
        return FAILED;
    }
    if (reserve(b, n + 2) != OK)
        return FAILED;
    char *o = b->p + b->len;
    *o++ = '"';
    memcpy(o, s, n);
    o[n] = '"';
    b->len += n + 2;
    return OK;
}

/* ---- type tags ---------------------------------------------------------------------------- */

#include "_tags.h"

/* The text of an exact, ready, compact-ASCII str; NULL for any other str. */
static inline const char *
ascii_text(PyObject *str, Py_ssize_t *n)
{
    if (!PyUnicode_IS_READY(str) || !PyUnicode_IS_COMPACT_ASCII(str))
        return NULL;
    *n = PyUnicode_GET_LENGTH(str);
    return (const char *)PyUnicode_DATA(str);
}

/* ---- numbers ------------------------------------------------------------------------------ */

#define IS_DIGIT(c) ((c) >= '0' && (c) <= '9')

/* pipeline.avjson._plain_number_text: [-]digits[.digits] in ASCII, at most 38 digits, no leading
 * zero but a lone 0, and 0.xxx with at most 5 zeros before the first non-zero digit (at most 6
 * when all are zeros): str(Decimal(text)) is the text itself. */
static int
plain_number_text(const char *s, Py_ssize_t n)
{
    const char *p = s, *end = s + n;
    if (p < end && *p == '-')
        p++;
    const char *whole = p;
    while (p < end && IS_DIGIT(*p))
        p++;
    Py_ssize_t wl = p - whole;
    if (wl == 0 || (whole[0] == '0' && wl > 1))
        return 0;
    if (p == end)
        return wl <= MAX_DIGITS;
    if (*p != '.')
        return 0;
    const char *frac = ++p;
    while (p < end && IS_DIGIT(*p))
        p++;
    Py_ssize_t fl = p - frac;
    if (p != end || fl == 0 || wl + fl > MAX_DIGITS)
        return 0;
    if (!(wl == 1 && whole[0] == '0'))
        return 1;
    Py_ssize_t zeros = 0;
    while (zeros < fl && frac[zeros] == '0')
        zeros++;
    return zeros < fl ? zeros <= 5 : fl <= 6;
}

/* A finite Decimal that DYNAMODB_CONTEXT.create_decimal makes exactly, without a signal:
 * (-1)**neg * int(dig) * 10**exp, dig without leading zeros ("0" for a zero). */
typedef struct {
    char dig[MAX_DIGITS];
    int ndig;
    int neg;
    int exp;
    Py_ssize_t index; /* position in an NS list (which text of equal numbers a set keeps) */
} Num;

/* Parse a number text in the syntax of the module doc; 0 when it is not one, or not one that
 * create_decimal takes exactly (too many digits, exponent out of range). */
static int
parse_number(const char *s, Py_ssize_t n, Num *num)
{
    const char *p = s, *end = s + n;
    int neg = 0;
    if (p < end && (*p == '+' || *p == '-')) {
        neg = *p == '-';
        p++;
    }
    const char *ip = p;
    while (p < end && IS_DIGIT(*p))
        p++;
    Py_ssize_t il = p - ip, fl = 0;
    const char *fp = p;
    if (p < end && *p == '.') {
        fp = ++p;
        while (p < end && IS_DIGIT(*p))
            p++;
        fl = p - fp;
    }
    if (il + fl == 0)
        return 0;
    long long e = 0;
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        int eneg = 0;
        if (p < end && (*p == '+' || *p == '-')) {
            eneg = *p == '-';
            p++;
        }
        if (p == end || !IS_DIGIT(*p))
            return 0;
        while (p < end && IS_DIGIT(*p)) {
            if (e < 100000000)
                e = e * 10 + (*p - '0');
            p++;
        }
        if (eneg)
            e = -e;
    }
    if (p != end)
        return 0;
    Py_ssize_t total = il + fl, k = 0;
#define DIGIT_AT(j) ((j) < il ? ip[(j)] : fp[(j) - il])
    while (k < total && DIGIT_AT(k) == '0')
        k++;
    long long exp = e - (long long)fl;
    num->neg = neg;
    if (k == total) { /* a zero: create_decimal clamps (and traps) an exponent out of range */
        if (exp < MIN_ADJUSTED || exp > MAX_ADJUSTED)
            return 0;
        num->dig[0] = '0';
        num->ndig = 1;
        num->exp = (int)exp;
        return 1;
    }
    Py_ssize_t nd = total - k;
    if (nd > MAX_DIGITS)
        return 0; /* rounded (Inexact is trapped; trailing zeros dropped change the text) */
    long long adjusted = exp + nd - 1;
    if (adjusted < MIN_ADJUSTED || adjusted > MAX_ADJUSTED)
        return 0; /* subnormal or overflow: left to decimal */
    for (Py_ssize_t j = 0; j < nd; j++)
        num->dig[j] = DIGIT_AT(k + j);
#undef DIGIT_AT
    num->ndig = (int)nd;
    num->exp = (int)exp;
    return 1;
}

/* str(Decimal): Python's to-scientific-string (decimal.Decimal.__str__, capitals). Writes at most
 * 1 + 2 + 5 + 38 + 1 + 5 bytes into o; returns the count. */
static int
format_number(const Num *x, char *o)
{
    char *start = o;
    int left = x->exp + x->ndig;
    int dot = (x->exp <= 0 && left > -6) ? left : 1;
    if (x->neg)
        *o++ = '-';
    if (dot <= 0) {
        *o++ = '0';
        *o++ = '.';
        for (int i = 0; i < -dot; i++)
            *o++ = '0';
        memcpy(o, x->dig, x->ndig);
        o += x->ndig;
    }
    else if (dot >= x->ndig) {
        memcpy(o, x->dig, x->ndig);
        o += x->ndig;
        for (int i = x->ndig; i < dot; i++)
            *o++ = '0';
    }
    else {
        memcpy(o, x->dig, dot);
        o += dot;
        *o++ = '.';
        memcpy(o, x->dig + dot, x->ndig - dot);
        o += x->ndig - dot;
    }
    if (left != dot) {
        int e = left - dot;
        *o++ = 'E';
        *o++ = e < 0 ? '-' : '+';
        if (e < 0)
            e = -e;
        char tmp[12];
        int t = 0;
        do {
            tmp[t++] = (char)('0' + e % 10);
            e /= 10;
        } while (e);
        while (t)
            *o++ = tmp[--t];
    }
    return (int)(o - start);
}

#define NUMBER_TEXT_MAX 64

/* Numeric order of two parsed numbers (-0 == 0). */
static int
num_cmp_value(const Num *a, const Num *b)
{
    int az = a->dig[0] == '0', bz = b->dig[0] == '0';
    int as = az ? 0 : (a->neg ? -1 : 1), bs = bz ? 0 : (b->neg ? -1 : 1);
    if (as != bs)
        return as < bs ? -1 : 1;
    if (as == 0)
        return 0;
    int adj_a = a->exp + a->ndig - 1, adj_b = b->exp + b->ndig - 1, mag = 0;
    if (adj_a != adj_b)
        mag = adj_a < adj_b ? -1 : 1;
    else {
        int m = a->ndig < b->ndig ? a->ndig : b->ndig, i;
        for (i = 0; i < m && mag == 0; i++)
            if (a->dig[i] != b->dig[i])
                mag = a->dig[i] < b->dig[i] ? -1 : 1;
        for (i = m; mag == 0 && i < a->ndig; i++)
            if (a->dig[i] != '0')
                mag = 1;
        for (i = m; mag == 0 && i < b->ndig; i++)
            if (b->dig[i] != '0')
                mag = -1;
    }
    return as > 0 ? mag : -mag;
}

static int
num_cmp_sort(const void *pa, const void *pb)
{
    const Num *a = pa, *b = pb;
    int c = num_cmp_value(a, b);
    if (c)
        return c;
    return a->index < b->index ? -1 : a->index > b->index; /* equal: the first one first */
}

static int
write_number(Buf *b, const Num *x)
{
    char text[NUMBER_TEXT_MAX];
    return write_plain_text(b, text, format_number(x, text));
}

/* ---- base64 ------------------------------------------------------------------------------- */

static signed char B64[256]; /* the 6-bit value of a base64 character, -1 for any other byte */

static void
init_base64(void)
{
    static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    memset(B64, -1, sizeof(B64));
    for (int i = 0; i < 64; i++)
        B64[(unsigned char)alphabet[i]] = (signed char)i;
}

/* pipeline.avjson._canonical_base64: standard alphabet, padded, zero trailing bits. */
static int
canonical_base64(const char *text, Py_ssize_t n)
{
    const unsigned char *s = (const unsigned char *)text;
    if (n % 4)
        return 0;
    if (n == 0)
        return 1;
    Py_ssize_t last = n - 4;
    for (Py_ssize_t i = 0; i < last; i++)
        if (B64[s[i]] < 0)
            return 0;
    const unsigned char *q = s + last;
    if (B64[q[0]] < 0 || B64[q[1]] < 0)
        return 0;
    if (q[2] == '=')
        return q[3] == '=' && (B64[q[1]] & 0x0F) == 0;
    if (B64[q[2]] < 0)
        return 0;
    if (q[3] == '=')
        return (B64[q[2]] & 0x03) == 0;
    return B64[q[3]] >= 0;
}

/* The bytes of a canonical base64 text into out (3 * n / 4 bytes at most); returns their count. */
static Py_ssize_t
decode_base64(const char *text, Py_ssize_t n, unsigned char *out)
{
    const unsigned char *s = (const unsigned char *)text;
    Py_ssize_t o = 0;
    for (Py_ssize_t i = 0; i < n; i += 4) {
        unsigned v0 = B64[s[i]], v1 = B64[s[i + 1]];
        out[o++] = (unsigned char)(v0 << 2 | v1 >> 4);
        if (s[i + 2] == '=')
            break;
        unsigned v2 = B64[s[i + 2]];
        out[o++] = (unsigned char)((v1 & 15) << 4 | v2 >> 2);
        if (s[i + 3] == '=')
            break;
        out[o++] = (unsigned char)((v2 & 3) << 6 | B64[s[i + 3]]);
    }
    return o;
}

typedef struct {
    const char *text;
    Py_ssize_t tlen;
    const unsigned char *bytes;
    Py_ssize_t blen;
} Blob;

static int
blob_cmp(const void *pa, const void *pb)
{
    const Blob *a = pa, *b = pb;
    Py_ssize_t m = a->blen < b->blen ? a->blen : b->blen;
    int c = m ? memcmp(a->bytes, b->bytes, m) : 0;
    if (c)
        return c;
    return a->blen < b->blen ? -1 : a->blen > b->blen;
}

/* ---- sets --------------------------------------------------------------------------------- */

static int
str_cmp(const void *pa, const void *pb)
{
    /* exact str objects: PyUnicode_Compare cannot fail and runs no Python code */
    return PyUnicode_Compare(*(PyObject *const *)pa, *(PyObject *const *)pb);
}

/* SS: an exact list of exact str. */
static int
write_ss(Buf *b, PyObject *list, int extended)
{
    Py_ssize_t n = PyList_GET_SIZE(list), i;
    PyObject **items = ((PyListObject *)list)->ob_item;
    int ascending = 1;
    for (i = 0; i < n; i++) {
        if (!PyUnicode_CheckExact(items[i]))
            return NOT_SURE;
        if (i && ascending && PyUnicode_Compare(items[i - 1], items[i]) >= 0)
            ascending = 0;
    }
    PyObject **order = items, **heap = NULL;
    if (!ascending) {
        if (!extended)
            return NOT_SURE;
        heap = PyMem_Malloc(n * sizeof(PyObject *));
        if (heap == NULL) {
            PyErr_NoMemory();
            return FAILED;
        }
        memcpy(heap, items, n * sizeof(PyObject *));
        qsort(heap, n, sizeof(PyObject *), str_cmp);
        order = heap;
    }
    int r = PUT(b, "{\"SS\":[");
    for (i = 0; i < n && r == OK; i++) {
        if (i && !ascending && PyUnicode_Compare(order[i - 1], order[i]) == 0)
            continue; /* a duplicate */
        if (i)
            r = PUT(b, ","); /* order[0] is always written */
        if (r == OK)
            r = write_str(b, order[i]);
    }
    PyMem_Free(heap);
    return r == OK ? PUT(b, "]}") : r;
}

/* NS (canonical_json only): a non-empty exact list of number texts. */
static int
write_ns(Buf *b, PyObject *list)
{
    Py_ssize_t n = PyList_GET_SIZE(list), i;
    if (n == 0)
        return NOT_SURE; /* canonical_item writes an empty NS as {"SS": []}: left to it */
    Num small[16], *nums = small;
    if (n > 16) {
        if ((size_t)n > PY_SSIZE_T_MAX / sizeof(Num)) {
            PyErr_NoMemory();
            return FAILED;
        }
        nums = PyMem_Malloc(n * sizeof(Num));
        if (nums == NULL) {
            PyErr_NoMemory();
            return FAILED;
        }
    }
    int r = OK, ascending = 1;
    for (i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(list, i);
        Py_ssize_t len;
        const char *text = PyUnicode_CheckExact(item) ? ascii_text(item, &len) : NULL;
        if (text == NULL || !parse_number(text, len, &nums[i])) {
            r = NOT_SURE;
            break;
        }
        nums[i].index = i;
        if (i && ascending && num_cmp_value(&nums[i - 1], &nums[i]) >= 0)
            ascending = 0;
    }
    if (r == OK) {
        if (!ascending)
            qsort(nums, n, sizeof(Num), num_cmp_sort);
        r = PUT(b, "{\"NS\":[");
        for (i = 0; i < n && r == OK; i++) {
            if (i && !ascending && num_cmp_value(&nums[i - 1], &nums[i]) == 0)
                continue; /* equal to the one before: the set kept that one (the first) */
            if (i)
                r = PUT(b, ",");
            if (r == OK)
                r = write_number(b, &nums[i]);
        }
        if (r == OK)
            r = PUT(b, "]}");
    }
    if (nums != small)
        PyMem_Free(nums);
    return r;
}

/* BS (canonical_json only): a non-empty exact list of canonical base64 texts. */
static int
write_bs(Buf *b, PyObject *list)
{
    Py_ssize_t n = PyList_GET_SIZE(list), i, total = 0;
    if (n == 0)
        return NOT_SURE;
    for (i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(list, i);
        Py_ssize_t len;
        const char *text = PyUnicode_CheckExact(item) ? ascii_text(item, &len) : NULL;
        if (text == NULL || !canonical_base64(text, len))
            return NOT_SURE;
        total += len / 4 * 3;
    }
    if ((size_t)n > PY_SSIZE_T_MAX / sizeof(Blob)) {
        PyErr_NoMemory();
        return FAILED;
    }
    Blob *blobs = PyMem_Malloc(n * sizeof(Blob));
    unsigned char *arena = PyMem_Malloc(total ? total : 1);
    if (blobs == NULL || arena == NULL) {
        PyMem_Free(blobs);
        PyMem_Free(arena);
        PyErr_NoMemory();
        return FAILED;
    }
    int ascending = 1;
    unsigned char *o = arena;
    for (i = 0; i < n; i++) {
        Blob *x = &blobs[i];
        x->text = ascii_text(PyList_GET_ITEM(list, i), &x->tlen);
        x->bytes = o;
        x->blen = decode_base64(x->text, x->tlen, o);
        o += x->blen;
        if (i && ascending && blob_cmp(&blobs[i - 1], x) >= 0)
            ascending = 0;
    }
    if (!ascending)
        qsort(blobs, n, sizeof(Blob), blob_cmp);
    int r = PUT(b, "{\"BS\":[");
    for (i = 0; i < n && r == OK; i++) {
        if (i && !ascending && blob_cmp(&blobs[i - 1], &blobs[i]) == 0)
            continue; /* the same bytes: the same canonical text */
        if (i)
            r = PUT(b, ",");
        if (r == OK)
            r = write_plain_text(b, blobs[i].text, blobs[i].tlen);
    }
    PyMem_Free(blobs);
    PyMem_Free(arena);
    return r == OK ? PUT(b, "]}") : r;
}

/* ---- values and maps ---------------------------------------------------------------------- */

static int write_attributes(Buf *b, PyObject *attrs, int depth, int extended);

/* One AttributeValue at nesting level depth (pipeline.codec's count: a top-level attribute's
 * value is at 0). */
static int
write_value(Buf *b, PyObject *av, int depth, int extended)
{
    if (!PyDict_CheckExact(av) || PyDict_GET_SIZE(av) != 1)
        return NOT_SURE;
    Py_ssize_t pos = 0, len;
    PyObject *tag, *value;
    if (!PyDict_Next(av, &pos, &tag, &value))
        return NOT_SURE;
    int r;
    const char *text;
    switch (tag_of(tag)) {
    case T_S:
        if (!PyUnicode_CheckExact(value))
            return NOT_SURE;
        if ((r = PUT(b, "{\"S\":")) != OK || (r = write_str(b, value)) != OK)
            return r;
        return PUT(b, "}");
    case T_N:
        if (!PyUnicode_CheckExact(value) || (text = ascii_text(value, &len)) == NULL)
            return NOT_SURE;
        if (plain_number_text(text, len)) {
            if ((r = PUT(b, "{\"N\":")) != OK || (r = write_plain_text(b, text, len)) != OK)
                return r;
        }
        else {
            Num num;
            if (!extended || !parse_number(text, len, &num))
                return NOT_SURE;
            if ((r = PUT(b, "{\"N\":")) != OK || (r = write_number(b, &num)) != OK)
                return r;
        }
        return PUT(b, "}");
    case T_BOOL:
        if (value == Py_True)
            return PUT(b, "{\"BOOL\":true}");
        if (value == Py_False)
            return PUT(b, "{\"BOOL\":false}");
        return NOT_SURE;
    case T_NULL:
        return value == Py_True ? PUT(b, "{\"NULL\":true}") : NOT_SURE;
    case T_M:
        if (!PyDict_CheckExact(value) || depth > MAX_NESTING_DEPTH)
            return NOT_SURE;
        if ((r = PUT(b, "{\"M\":")) != OK || (r = write_attributes(b, value, depth + 1, extended)) != OK)
            return r;
        return PUT(b, "}");
    case T_L: {
        if (!PyList_CheckExact(value) || depth > MAX_NESTING_DEPTH)
            return NOT_SURE;
        if ((r = PUT(b, "{\"L\":[")) != OK)
            return r;
        Py_ssize_t n = PyList_GET_SIZE(value);
        for (Py_ssize_t i = 0; i < n; i++) {
            if (i && (r = PUT(b, ",")) != OK)
                return r;
            if ((r = write_value(b, PyList_GET_ITEM(value, i), depth + 1, extended)) != OK)
                return r;
        }
        return PUT(b, "]}");
    }
    case T_SS:
        if (!PyList_CheckExact(value))
            return NOT_SURE;
        return write_ss(b, value, extended);
    case T_B:
        if (!PyUnicode_CheckExact(value) || (text = ascii_text(value, &len)) == NULL
                || !canonical_base64(text, len))
            return NOT_SURE;
        if ((r = PUT(b, "{\"B\":")) != OK || (r = write_plain_text(b, text, len)) != OK)
            return r;
        return PUT(b, "}");
    case T_NS:
        if (!extended || !PyList_CheckExact(value))
            return NOT_SURE;
        return write_ns(b, value);
    case T_BS:
        if (!extended || !PyList_CheckExact(value))
            return NOT_SURE;
        return write_bs(b, value);
    }
    return NOT_SURE;
}

/* An exact dict of name -> AttributeValue (an image, or an M's value) as a JSON object. */
static int
write_attributes(Buf *b, PyObject *attrs, int depth, int extended)
{
    int r = PUT(b, "{");
    Py_ssize_t pos = 0;
    PyObject *name, *av;
    int first = 1;
    while (r == OK && PyDict_Next(attrs, &pos, &name, &av)) {
        if (!PyUnicode_CheckExact(name))
            return NOT_SURE;
        if (!first && (r = PUT(b, ",")) != OK)
            return r;
        first = 0;
        if ((r = write_str(b, name)) != OK || (r = PUT(b, ":")) != OK)
            return r;
        r = write_value(b, av, depth, extended);
    }
    return r == OK ? PUT(b, "}") : r;
}

static PyObject *
canonical(PyObject *image, int extended)
{
    if (!PyDict_CheckExact(image))
        Py_RETURN_NONE; /* None, other Mappings, anything else: the Python path decides */
    Buf b;
    b.p = b.stack;
    b.len = 0;
    b.cap = sizeof(b.stack);
    int r = write_attributes(&b, image, 0, extended);
    PyObject *out;
    if (r == OK)
        out = PyBytes_FromStringAndSize(b.p, b.len);
    else if (r == NOT_SURE) {
        out = Py_None;
        Py_INCREF(out);
    }
    else
        out = NULL;
    if (b.p != b.stack)
        PyMem_Free(b.p);
    return out;
}

static PyObject *
canonical_json(PyObject *self, PyObject *image)
{
    return canonical(image, 1);
}

static PyObject *
canonical_json_basic(PyObject *self, PyObject *image)
{
    return canonical(image, 0);
}

static PyMethodDef methods[] = {
    {"canonical_json", canonical_json, METH_O,
     "canonical_json(image) -> bytes | None\n\n"
     "orjson.dumps(pipeline.avjson.canonical_item(image)) written in C, or None when the image is "
     "not in the fast shapes (then take the Python path). Never raises but MemoryError. Fast "
     "shapes: exact dict/list/str/bool; S, BOOL, NULL true, M, L (at most 32 levels), B in "
     "canonical base64, N in the plain syntax with at most 38 digits (rewritten as str(Decimal)), "
     "SS, NS (sorted, distinct) and BS of canonical base64 texts (sorted by their bytes, distinct). "
     "See ddb_cdc_speedups/_canonical.c."},
    {"canonical_json_basic", canonical_json_basic, METH_O,
     "canonical_json_basic(image) -> bytes | None\n\n"
     "canonical_json restricted to the shapes that are written as they are read: S, BOOL, NULL "
     "true, M, L, N in plain text (pipeline.avjson._plain_number_text), B in canonical base64 and "
     "strictly ascending SS; None for everything else (NS, BS, other numbers, unsorted SS, ...)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "ddb_cdc_speedups._canonical",
    "Canonical AttributeValue JSON of an image in C (an experiment; see ddb_cdc_speedups).", -1, methods,
};

PyMODINIT_FUNC
PyInit__canonical(void)
{
    init_escapes();
    init_base64();
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "MAX_NESTING_DEPTH", MAX_NESTING_DEPTH) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

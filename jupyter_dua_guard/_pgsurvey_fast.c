/* Optional fast path for a report over a PostgreSQL ledger: verify and tally in one pass.
 *
 * Hashing and grouping inside PostgreSQL cost about 3 and 4 CPU-seconds per million
 * records; streaming the records out with COPY (binary) costs the server well under one.
 * So each seq range is streamed over its own libpq connection (all in one exported
 * snapshot), with the GIL released, and this module checks every record (seq contiguous,
 * prev linked, hash = sha256(prev + "\n" + body)) and tallies the report's figures from the
 * body's JSON exactly as PostgreSQL's ``body::jsonb ->> key`` would read them. Any value it
 * cannot read with certainty (numbers other than plain integers, nested values read as
 * scalars, unusual escapes, malformed JSON) marks the record "odd": Python then reads that
 * record's columns with the SQL expressions and adds them (tally_add). Naming what is wrong
 * with a chain stays in Python, which re-runs the ordinary verification on any failure.
 */
#define PY_SSIZE_T_CLEAN
#define OPENSSL_SUPPRESS_DEPRECATED
#include <Python.h>
#include <libpq-fe.h>
#include <openssl/sha.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#define HASH_HEX 64
#define MAX_RANGES 8

static const char HEX[] = "0123456789abcdef";
static PyObject *survey_error;

/* ------------------------------------------------------------------ fields of a record */

enum {
    F_TIME, F_KIND,
    C_USER, C_HOST, C_PLATFORM, C_KERNEL, C_NOTEBOOK,
    D_DISTRIBUTION, D_NAME, D_HOST, D_PATH, D_RULE, D_REVIEWER, D_KERNEL_NAME, D_VERSION,
    D_PORT, D_LIBRARY, D_FORMAT, D_NOTEBOOK, D_CATEGORY, D_SCOPE, D_SIZE,
    N_FIELDS
};

typedef struct {
    const char *p;
    Py_ssize_t n;
    int set; /* 0: SQL NULL */
} fld;

typedef struct {
    const char *name;
    Py_ssize_t len;
    int slot;
} keyslot;

#define KS(name, slot) {name, sizeof(name) - 1, slot}

static const keyslot CONTEXT_KEYS[] = {
    KS("user", C_USER), KS("host", C_HOST), KS("platform", C_PLATFORM),
    KS("kernel_id", C_KERNEL), KS("notebook", C_NOTEBOOK), {NULL, 0, 0},
};
static const keyslot DATA_KEYS[] = {
    KS("distribution", D_DISTRIBUTION), KS("name", D_NAME), KS("host", D_HOST),
    KS("path", D_PATH), KS("rule", D_RULE), KS("reviewer", D_REVIEWER),
    KS("kernel_name", D_KERNEL_NAME), KS("version", D_VERSION), KS("port", D_PORT),
    KS("library", D_LIBRARY), KS("format", D_FORMAT), KS("notebook", D_NOTEBOOK),
    KS("category", D_CATEGORY), KS("scope", D_SCOPE), KS("size", D_SIZE), {NULL, 0, 0},
};

/* ------------------------------------------------------------------ JSON reading */

typedef struct {
    const char *s, *e;
    char *scratch; /* decoded strings with escapes; as long as the body */
    size_t used;
    int odd;
    int depth;
} parser;

static inline void ws(parser *p)
{
    while (p->s < p->e && (*p->s == ' ' || *p->s == '\t' || *p->s == '\n' || *p->s == '\r'))
        p->s++;
}

/* The first '"' or '\\' in s..e (e when none). */
static inline const char *quote_or_escape(const char *s, const char *e)
{
#ifdef __SSE2__
    const __m128i quote = _mm_set1_epi8('"'), escape = _mm_set1_epi8('\\');
    while (e - s >= 16) {
        __m128i v = _mm_loadu_si128((const __m128i *)s);
        int m = _mm_movemask_epi8(_mm_or_si128(_mm_cmpeq_epi8(v, quote), _mm_cmpeq_epi8(v, escape)));
        if (m)
            return s + __builtin_ctz((unsigned)m);
        s += 16;
    }
#endif
    while (s < e && *s != '"' && *s != '\\')
        s++;
    return s;
}

static int hex4(const char *s, unsigned *out)
{
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = s[i];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f')
            v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            v |= (unsigned)(c - 'A' + 10);
        else
            return 0;
    }
    *out = v;
    return 1;
}

/* A string at p->s (on the quote). With out, its text (unescaped) is stored; escapes that
 * PostgreSQL treats specially (\u0000, surrogates) or malformed text make the record odd. */
static int read_escaped(parser *p, fld *out, const char *start);

/* Most strings have no escape: found and taken in place, without a call. */
static inline __attribute__((always_inline)) int read_string(parser *p, fld *out)
{
    const char *s = p->s + 1;
    s = quote_or_escape(s, p->e);
    if (s < p->e && *s == '"') {
        if (out) {
            out->p = p->s + 1;
            out->n = s - (p->s + 1);
            out->set = 1;
        }
        p->s = s + 1;
        return 1;
    }
    return read_escaped(p, out, p->s + 1);
}

static int read_escaped(parser *p, fld *out, const char *start)
{
    const char *s = start;
    /* The closing quote: the first one not escaped (the body is valid JSON: PostgreSQL
     * parsed it when it computed the generated columns, which verify checks are intact). */
    for (;;) {
        s = quote_or_escape(s, p->e);
        if (s >= p->e)
            return 0;
        if (*s == '"')
            break;
        s += 2;
        if (s > p->e)
            return 0;
    }
    p->s = s + 1;
    char *d = p->scratch + p->used, *d0 = d;
    for (const char *q = start; q < s;) {
        if (*q != '\\') {
            *d++ = *q++;
            continue;
        }
        q++;
        switch (*q) {
        case '"': *d++ = '"'; q++; break;
        case '\\': *d++ = '\\'; q++; break;
        case '/': *d++ = '/'; q++; break;
        case 'b': *d++ = '\b'; q++; break;
        case 'f': *d++ = '\f'; q++; break;
        case 'n': *d++ = '\n'; q++; break;
        case 'r': *d++ = '\r'; q++; break;
        case 't': *d++ = '\t'; q++; break;
        case 'u': {
            unsigned cp;
            if (s - q < 5 || !hex4(q + 1, &cp))
                return 0;
            q += 5;
            if (cp >= 0xD800 && cp <= 0xDBFF && s - q >= 6 && q[0] == '\\' && q[1] == 'u') {
                unsigned lo;
                if (hex4(q + 2, &lo) && lo >= 0xDC00 && lo <= 0xDFFF) {
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    q += 6;
                    *d++ = (char)(0xF0 | (cp >> 18));
                    *d++ = (char)(0x80 | ((cp >> 12) & 0x3F));
                    *d++ = (char)(0x80 | ((cp >> 6) & 0x3F));
                    *d++ = (char)(0x80 | (cp & 0x3F));
                    break;
                }
            }
            if (cp == 0 || (cp >= 0xD800 && cp <= 0xDFFF)) {
                /* \u0000 and lone surrogates: PostgreSQL refuses them; leave it to it */
                p->odd = 1;
                break;
            }
            if (cp < 0x80)
                *d++ = (char)cp;
            else if (cp < 0x800) {
                *d++ = (char)(0xC0 | (cp >> 6));
                *d++ = (char)(0x80 | (cp & 0x3F));
            } else {
                *d++ = (char)(0xE0 | (cp >> 12));
                *d++ = (char)(0x80 | ((cp >> 6) & 0x3F));
                *d++ = (char)(0x80 | (cp & 0x3F));
            }
            break;
        }
        default:
            return 0;
        }
    }
    p->used += (size_t)(d - d0);
    if (out) {
        out->p = d0;
        out->n = d - d0;
        out->set = 1;
    } else {
        p->used -= (size_t)(d - d0); /* skipped: the space is reused */
    }
    return 1;
}

static int read_number(parser *p, fld *out)
{
    const char *s = p->s, *start = s;
    int plain = 1;
    if (s < p->e && *s == '-')
        s++;
    if (s >= p->e)
        return 0;
    if (*s == '0') {
        s++;
        if (start[0] == '-')
            plain = 0; /* -0 reads back as 0 */
    } else if (*s >= '1' && *s <= '9') {
        while (s < p->e && *s >= '0' && *s <= '9')
            s++;
    } else
        return 0;
    if (s < p->e && *s == '.') {
        plain = 0;
        s++;
        const char *f = s;
        while (s < p->e && *s >= '0' && *s <= '9')
            s++;
        if (s == f)
            return 0;
    }
    if (s < p->e && (*s == 'e' || *s == 'E')) {
        plain = 0;
        s++;
        if (s < p->e && (*s == '+' || *s == '-'))
            s++;
        const char *x = s;
        while (s < p->e && *s >= '0' && *s <= '9')
            s++;
        if (s == x)
            return 0;
        if (s - x > 4)
            p->odd = 1; /* PostgreSQL's numeric may refuse it */
    }
    if (s - start > 1000)
        p->odd = 1;
    p->s = s;
    if (out) {
        if (!plain)
            p->odd = 1;
        out->p = start;
        out->n = s - start;
        out->set = 1;
    }
    return 1;
}

static int skip_value(parser *p);

/* true / false: read as jsonb's ->> gives them, the word itself */
static int read_word(parser *p, fld *out, const char *word, Py_ssize_t n)
{
    if (p->e - p->s < n || memcmp(p->s, word, (size_t)n) != 0)
        return 0;
    p->s += n;
    if (out) {
        out->p = word;
        out->n = n;
        out->set = 1;
    }
    return 1;
}

static int read_scalar(parser *p, fld *out)
{
    ws(p);
    if (p->s >= p->e)
        return 0;
    switch (*p->s) {
    case '"':
        return read_string(p, out);
    case 'n':
        if (p->e - p->s >= 4 && memcmp(p->s, "null", 4) == 0) {
            p->s += 4;
            if (out)
                out->set = 0;
            return 1;
        }
        return 0;
    case 't':
        return read_word(p, out, "true", 4);
    case 'f':
        return read_word(p, out, "false", 5);
    case '{':
    case '[':
        if (out) {
            p->odd = 1; /* jsonb's text form of a nested value: left to PostgreSQL */
            out->set = 0;
        }
        return skip_value(p);
    default:
        return read_number(p, out);
    }
}

static int skip_value(parser *p)
{
    ws(p);
    if (p->s >= p->e)
        return 0;
    char open = *p->s;
    if (open != '{' && open != '[')
        return read_scalar(p, NULL);
    if (++p->depth > 200) {
        p->odd = 1;
        return 0;
    }
    char close = open == '{' ? '}' : ']';
    p->s++;
    ws(p);
    if (p->s < p->e && *p->s == close) {
        p->s++;
        p->depth--;
        return 1;
    }
    for (;;) {
        if (open == '{') {
            ws(p);
            if (p->s >= p->e || *p->s != '"' || !read_string(p, NULL))
                return 0;
            ws(p);
            if (p->s >= p->e || *p->s != ':')
                return 0;
            p->s++;
        }
        if (!skip_value(p))
            return 0;
        ws(p);
        if (p->s >= p->e)
            return 0;
        if (*p->s == ',') {
            p->s++;
            continue;
        }
        if (*p->s == close) {
            p->s++;
            p->depth--;
            return 1;
        }
        return 0;
    }
}

/* The key at p->s (on the quote), raw; keys with escapes make the record odd. */
static int read_key(parser *p, const char **k, Py_ssize_t *n)
{
    fld f;
    size_t before = p->used;
    if (p->s >= p->e || *p->s != '"' || !read_string(p, &f))
        return 0;
    if (p->used != before) {
        p->odd = 1;
        p->used = before;
    }
    *k = f.p;
    *n = f.n;
    ws(p);
    if (p->s >= p->e || *p->s != ':')
        return 0;
    p->s++;
    return 1;
}

static int slot_of(const keyslot *keys, const char *k, Py_ssize_t n)
{
    for (const keyslot *ks = keys; ks->name; ks++)
        if (ks->len == n && ks->name[0] == k[0] && memcmp(ks->name, k, (size_t)n) == 0)
            return ks->slot;
    return -1;
}

static int read_members(parser *p, const keyslot *keys, fld *f)
{
    /* p->s on '{' */
    p->s++;
    ws(p);
    if (p->s < p->e && *p->s == '}') {
        p->s++;
        return 1;
    }
    for (;;) {
        const char *k;
        Py_ssize_t n;
        ws(p);
        if (!read_key(p, &k, &n))
            return 0;
        int slot = slot_of(keys, k, n);
        if (!(slot >= 0 ? read_scalar(p, &f[slot]) : skip_value(p)))
            return 0;
        ws(p);
        if (p->s >= p->e)
            return 0;
        if (*p->s == ',') {
            p->s++;
            continue;
        }
        if (*p->s == '}') {
            p->s++;
            return 1;
        }
        return 0;
    }
}

/* The record's fields as PostgreSQL reads them; returns 0 when the record is odd. */
static int read_body(const char *body, Py_ssize_t len, char *scratch, fld *f)
{
    parser p = {body, body + len, scratch, 0, 0, 0};
    for (int i = 0; i < N_FIELDS; i++)
        f[i].set = 0;
    ws(&p);
    if (p.s >= p.e || *p.s != '{')
        return 0;
    p.s++;
    ws(&p);
    if (p.s < p.e && *p.s == '}') {
        p.s++;
        goto end;
    }
    for (;;) {
        const char *k;
        Py_ssize_t n;
        ws(&p);
        if (!read_key(&p, &k, &n))
            return 0;
        int ok;
        if (n == 4 && memcmp(k, "time", 4) == 0)
            ok = read_scalar(&p, &f[F_TIME]);
        else if (n == 4 && memcmp(k, "kind", 4) == 0)
            ok = read_scalar(&p, &f[F_KIND]);
        else if ((n == 7 && memcmp(k, "context", 7) == 0) || (n == 4 && memcmp(k, "data", 4) == 0)) {
            int ctx = n == 7;
            int lo = ctx ? C_USER : D_DISTRIBUTION, hi = ctx ? C_NOTEBOOK : D_SIZE;
            for (int i = lo; i <= hi; i++)
                f[i].set = 0; /* a repeated key: the last one counts */
            ws(&p);
            if (p.s < p.e && *p.s == '{')
                ok = read_members(&p, ctx ? CONTEXT_KEYS : DATA_KEYS, f);
            else
                ok = skip_value(&p); /* -> 'key' of a non-object is NULL */
        } else
            ok = skip_value(&p);
        if (!ok)
            return 0;
        ws(&p);
        if (p.s >= p.e)
            return 0;
        if (*p.s == ',') {
            p.s++;
            continue;
        }
        if (*p.s == '}') {
            p.s++;
            break;
        }
        return 0;
    }
end:
    ws(&p);
    return p.s == p.e && !p.odd;
}

/* ------------------------------------------------------------------ hash tables */

/* Interned strings (and the groups) live in entries; slots keep each entry's hash, so that
 * probing touches one array. Entries are numbered in order of insertion (id). */
typedef struct entry_ {
    uint64_t h;
    uint32_t id;
    uint32_t minlen, maxlen, mincap, maxcap;
    int64_t count, count2;
    char *min, *max; /* groups: first and last time (NULL: none) */
    char inl[2][32]; /* where min and max live while they fit */
    struct entry_ *tool; /* groups: the tool entry of the same tally, once looked up */
    uint32_t klen;   /* next to the key: a lookup reads both from one cache line */
    char key[];
} entry;

/* Entries are carved out of large blocks, so that a table's entries lie close together. */
typedef struct block {
    struct block *next;
    size_t used, cap;
    char data[];
} block;

typedef struct {
    uint32_t tag; /* high half of the hash */
    uint32_t ref; /* id + 1; 0: free */
} slot;

typedef struct {
    slot *slots;
    size_t cap, len;
    entry **list;
    size_t listcap;
    block *blocks;
} table;

static void *table_carve(table *t, size_t bytes)
{
    bytes = (bytes + 15) & ~(size_t)15;
    block *b = t->blocks;
    if (!b || b->cap - b->used < bytes) {
        size_t cap = bytes > (256u << 10) ? bytes : (256u << 10);
        b = calloc(1, sizeof *b + cap);
        if (!b)
            return NULL;
        b->cap = cap;
        b->next = t->blocks;
        t->blocks = b;
    }
    void *p = b->data + b->used;
    b->used += bytes;
    return p;
}

/* A set of (id, id) pairs packed in 64 bits (stored + 1, so that 0 marks a free slot). */
typedef struct {
    uint64_t *slots;
    size_t cap, len;
} set64;

static inline uint64_t mix64(uint64_t h)
{
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
}

static uint64_t hash_bytes(const char *s, size_t n)
{
    uint64_t h = 0x9E3779B97F4A7C15ULL ^ ((uint64_t)n * 0x100000001b3ULL);
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, s, 8);
        h = (h ^ v) * 0xff51afd7ed558ccdULL;
        h = (h << 31) | (h >> 33);
        s += 8;
        n -= 8;
    }
    uint64_t v = 0;
    memcpy(&v, s, n);
    return mix64(h ^ v);
}

static int table_grow(table *t)
{
    size_t cap = t->cap ? t->cap * 2 : 256;
    slot *slots = calloc(cap, sizeof *slots);
    if (!slots)
        return 0;
    for (size_t i = 0; i < t->len; i++) {
        size_t j = t->list[i]->h & (cap - 1);
        while (slots[j].ref)
            j = (j + 1) & (cap - 1);
        slots[j].tag = (uint32_t)(t->list[i]->h >> 32);
        slots[j].ref = (uint32_t)i + 1;
    }
    free(t->slots);
    t->slots = slots;
    t->cap = cap;
    return 1;
}

/* Room for one more entry, and the slot where a hash's probe starts brought into cache:
 * a record's lookups then wait for memory together rather than one after another. */
static int table_prefetch(table *t, uint64_t h)
{
    if ((t->len + 1) * 2 > t->cap && !table_grow(t))
        return 0;
    __builtin_prefetch(&t->slots[h & (t->cap - 1)]);
    return 1;
}

/* Once the slots have arrived: the first entry whose tag matches h brought into cache, so
 * that the entries of a record's lookups are fetched together as well. */
static void table_prefetch_entry(const table *t, uint64_t h)
{
    uint32_t tag = (uint32_t)(h >> 32);
    for (size_t j = h & (t->cap - 1); t->slots[j].ref; j = (j + 1) & (t->cap - 1))
        if (t->slots[j].tag == tag) {
            __builtin_prefetch(&t->list[t->slots[j].ref - 1]->klen);
            return;
        }
}

/* The entry for key with hash h (created empty when new); NULL when out of memory. */
static entry *table_get_h(table *t, const char *key, size_t klen, uint64_t h)
{
    if ((t->len + 1) * 2 > t->cap && !table_grow(t))
        return NULL;
    uint32_t tag = (uint32_t)(h >> 32);
    size_t j = h & (t->cap - 1);
    entry *e;
    while (t->slots[j].ref) {
        if (t->slots[j].tag == tag) {
            e = t->list[t->slots[j].ref - 1];
            if (e->klen == klen && memcmp(e->key, key, klen) == 0)
                return e;
        }
        j = (j + 1) & (t->cap - 1);
    }
    if (t->len == t->listcap) {
        size_t cap = t->listcap ? t->listcap * 2 : 256;
        entry **list = realloc(t->list, cap * sizeof *list);
        if (!list)
            return NULL;
        t->list = list;
        t->listcap = cap;
    }
    e = table_carve(t, sizeof *e + klen);
    if (!e)
        return NULL;
    memcpy(e->key, key, klen);
    e->h = h;
    e->klen = (uint32_t)klen;
    e->id = (uint32_t)t->len;
    t->slots[j].tag = tag;
    t->slots[j].ref = (uint32_t)t->len + 1;
    t->list[t->len++] = e;
    return e;
}

/* The entry for key, or NULL; never adds one (the filter sets are shared by the threads). */
static entry *table_find(const table *t, const char *key, size_t klen)
{
    if (!t->cap)
        return NULL;
    uint64_t h = hash_bytes(key, klen);
    uint32_t tag = (uint32_t)(h >> 32);
    for (size_t j = h & (t->cap - 1); t->slots[j].ref; j = (j + 1) & (t->cap - 1)) {
        if (t->slots[j].tag == tag) {
            entry *e = t->list[t->slots[j].ref - 1];
            if (e->klen == klen && memcmp(e->key, key, klen) == 0)
                return e;
        }
    }
    return NULL;
}

static entry *table_get(table *t, const char *key, size_t klen)
{
    return table_get_h(t, key, klen, hash_bytes(key, klen));
}

static void table_free(table *t)
{
    for (size_t i = 0; i < t->len; i++) {
        entry *e = t->list[i];
        if (e->min != e->inl[0])
            free(e->min);
        if (e->max != e->inl[1])
            free(e->max);
    }
    while (t->blocks) {
        block *next = t->blocks->next;
        free(t->blocks);
        t->blocks = next;
    }
    free(t->slots);
    free(t->list);
    memset(t, 0, sizeof *t);
}

/* Zeroed memory for a large table; on huge pages where the kernel offers them, since the
 * pair sets are probed at random and 4 KB pages make each probe a TLB miss as well. */
static void *table_alloc(size_t bytes)
{
    if (bytes < (4u << 20))
        return calloc(1, bytes);
    void *p = NULL;
    size_t huge = (size_t)2 << 20;
    if (posix_memalign(&p, huge, (bytes + huge - 1) & ~(huge - 1)) != 0)
        return NULL;
#ifdef MADV_HUGEPAGE
    madvise(p, (bytes + huge - 1) & ~(huge - 1), MADV_HUGEPAGE);
#endif
    memset(p, 0, bytes);
    return p;
}

static int set64_grow(set64 *s)
{
    if ((s->len + 1) * 2 > s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 1024;
        uint64_t *slots = table_alloc(cap * sizeof *slots);
        if (!slots)
            return 0;
        for (size_t i = 0; i < s->cap; i++) {
            uint64_t x = s->slots[i];
            if (!x)
                continue;
            size_t j = mix64(x) & (cap - 1);
            while (slots[j])
                j = (j + 1) & (cap - 1);
            slots[j] = x;
        }
        free(s->slots);
        s->slots = slots;
        s->cap = cap;
    }
    return 1;
}

static void set64_prefetch(const set64 *s, uint64_t v)
{
    if (s->cap)
        __builtin_prefetch(&s->slots[mix64(v + 1) & (s->cap - 1)]);
}

static int set64_add(set64 *s, uint64_t v)
{
    if (!set64_grow(s))
        return 0;
    uint64_t x = v + 1;
    size_t j = mix64(x) & (s->cap - 1);
    while (s->slots[j]) {
        if (s->slots[j] == x)
            return 1;
        j = (j + 1) & (s->cap - 1);
    }
    s->slots[j] = x;
    s->len++;
    return 1;
}

/* Pairs (tool id, other id): the first PAIR_TOOLS tools as one bit row per other id, the
 * rest in a set64. A ledger has few tools and many kernels; rows of 32 bytes stay in cache
 * where a hash set of every pair would be probed at random. */
#define PAIR_WORDS 4
#define PAIR_TOOLS (PAIR_WORDS * 64)

typedef struct {
    uint64_t *rows;
    size_t nrows;
    set64 rest;
} pairset;

static uint64_t *pair_word(pairset *s, uint32_t tool, uint32_t other)
{
    if (other >= s->nrows) {
        size_t n = s->nrows ? s->nrows : 1024;
        while (n <= other)
            n *= 2;
        uint64_t *rows = realloc(s->rows, n * PAIR_WORDS * sizeof *rows);
        if (!rows)
            return NULL;
        memset(rows + s->nrows * PAIR_WORDS, 0, (n - s->nrows) * PAIR_WORDS * sizeof *rows);
        s->rows = rows;
        s->nrows = n;
    }
    return &s->rows[(size_t)other * PAIR_WORDS + tool / 64];
}

static int pair_add(pairset *s, uint64_t pair)
{
    uint32_t tool = (uint32_t)(pair >> 32), other = (uint32_t)pair;
    if (tool >= PAIR_TOOLS)
        return set64_add(&s->rest, pair);
    uint64_t *w = pair_word(s, tool, other);
    if (!w)
        return 0;
    *w |= (uint64_t)1 << (tool % 64);
    return 1;
}

static void pair_prefetch(pairset *s, uint64_t pair)
{
    uint32_t tool = (uint32_t)(pair >> 32), other = (uint32_t)pair;
    if (tool >= PAIR_TOOLS) {
        set64_prefetch(&s->rest, pair);
    } else if (other < s->nrows) {
        __builtin_prefetch(&s->rows[(size_t)other * PAIR_WORDS]);
    }
}

/* Calls fn(arg, pair) for every pair in s; stops at the first 0 it returns. */
static int pair_each(const pairset *s, int (*fn)(void *, uint64_t), void *arg)
{
    for (size_t r = 0; r < s->nrows; r++)
        for (int w = 0; w < PAIR_WORDS; w++)
            for (uint64_t bits = s->rows[r * PAIR_WORDS + w]; bits; bits &= bits - 1) {
                uint64_t tool = (uint64_t)(w * 64 + __builtin_ctzll(bits));
                if (!fn(arg, (tool << 32) | r))
                    return 0;
            }
    for (size_t i = 0; i < s->rest.cap; i++)
        if (s->rest.slots[i] && !fn(arg, s->rest.slots[i] - 1))
            return 0;
    return 1;
}

static void pair_free(pairset *s)
{
    free(s->rows);
    free(s->rest.slots);
    memset(s, 0, sizeof *s);
}

/* ------------------------------------------------------------------ tallies */

typedef struct {
    table groups;    /* kind, subject, detail, extra, host, platform, user -> times, count */
    table notebooks; /* non-empty notebooks of the records counted */
    table tools;     /* kind, subject, detail, extra (per-tool kinds: NULL, NULL) */
    table kernels;   /* report kinds' kernels; count: of a per-tool kind; count2: started */
    pairset tool_kernels, tool_notebooks; /* (tool id, kernel / notebook id) */
    /* A record's pairs are added with the next record's, once their slots are in cache. */
    uint64_t pending_kernel, pending_notebook;
    int has_pending_kernel, has_pending_notebook;
    char *key;       /* key buffer */
    size_t keycap;
} tally;

static int flush_pairs(tally *t)
{
    if (t->has_pending_kernel && !pair_add(&t->tool_kernels, t->pending_kernel))
        return 0;
    if (t->has_pending_notebook && !pair_add(&t->tool_notebooks, t->pending_notebook))
        return 0;
    t->has_pending_kernel = t->has_pending_notebook = 0;
    return 1;
}

static int key_reserve(tally *t, size_t n)
{
    if (n <= t->keycap)
        return 1;
    size_t cap = n * 2 + 256;
    char *k = realloc(t->key, cap);
    if (!k)
        return 0;
    t->key = k;
    t->keycap = cap;
    return 1;
}

/* Appends one value (NULL or text) to a composite key at off; returns the new length. */
static size_t key_put(char *k, size_t off, const fld *f)
{
    if (!f->set) {
        k[off] = 0;
        return off + 1;
    }
    uint32_t n = (uint32_t)f->n;
    k[off] = 1;
    memcpy(k + off + 1, &n, 4);
    memcpy(k + off + 5, f->p, (size_t)f->n);
    return off + 5 + (size_t)f->n;
}

static int set_time(char **slot, uint32_t *len, uint32_t *cap, char *inl, const char *p,
                    size_t n)
{
    if (!*slot && n <= sizeof((entry *)0)->inl[0]) {
        *slot = inl;
        *cap = (uint32_t)sizeof((entry *)0)->inl[0];
    }
    if (!*slot || n > *cap) {
        char *c = malloc(n + 32);
        if (!c)
            return 0;
        if (*slot && *slot != inl)
            free(*slot);
        *slot = c;
        *cap = (uint32_t)n + 32;
    }
    memcpy(*slot, p, n);
    *len = (uint32_t)n;
    return 1;
}

static int cmp_text(const char *a, size_t an, const char *b, size_t bn)
{
    int c = memcmp(a, b, an < bn ? an : bn);
    if (c)
        return c;
    return an < bn ? -1 : an > bn;
}

/* The event kinds a report reads; K_OTHER for any other kind (or none). */
enum { K_OTHER, K_AI, K_STARTED, K_BLOCKED, K_ALLOWED, K_FLAGGED, K_READ, K_MODEL, K_REVIEW,
       K_DEFAULTS };

#define IS(k, lit)                                                                            \
    ((k)->n == sizeof(lit) - 1 && (k)->p[0] == (lit)[0] && memcmp((k)->p, lit, sizeof(lit) - 1) == 0)

static int kind_id(const fld *k)
{
    if (!k->set)
        return K_OTHER;
    if (IS(k, "ai_ml_import"))
        return K_AI;
    if (IS(k, "data_read"))
        return K_READ;
    if (IS(k, "egress_blocked"))
        return K_BLOCKED;
    if (IS(k, "kernel_started"))
        return K_STARTED;
    if (IS(k, "egress_allowed_ai"))
        return K_ALLOWED;
    if (IS(k, "output_flagged"))
        return K_FLAGGED;
    if (IS(k, "model_artifact_written"))
        return K_MODEL;
    if (IS(k, "review_signed"))
        return K_REVIEW;
    if (IS(k, "guard_defaults_used"))
        return K_DEFAULTS;
    return K_OTHER;
}

/* The report's columns of one record: time, kind, subject, detail, extra, host, platform,
 * user, kernel, notebook (the SQL's CASE expressions over the kind). */
enum { R_TIME, R_KIND, R_SUBJECT, R_DETAIL, R_EXTRA, R_HOST, R_PLATFORM, R_USER, R_KERNEL,
       R_NOTEBOOK, R_N };

static int columns(const fld *f, fld *r)
{
    static const fld null = {NULL, 0, 0};
    const fld *k = &f[F_KIND];
    int kid = kind_id(k);
    r[R_TIME] = f[F_TIME];
    r[R_KIND] = *k;
    r[R_HOST] = f[C_HOST];
    r[R_PLATFORM] = f[C_PLATFORM];
    r[R_USER] = f[C_USER];
    r[R_KERNEL] = f[C_KERNEL];
    r[R_NOTEBOOK] = f[C_NOTEBOOK];
    r[R_SUBJECT] = r[R_DETAIL] = r[R_EXTRA] = null;
    switch (kid) {
    case K_AI:
        r[R_SUBJECT] = f[D_DISTRIBUTION].set ? f[D_DISTRIBUTION] : f[D_NAME];
        r[R_DETAIL] = f[D_VERSION];
        r[R_EXTRA] = f[D_CATEGORY];
        break;
    case K_BLOCKED:
    case K_ALLOWED:
        r[R_SUBJECT] = f[D_HOST];
        r[R_DETAIL] = f[D_PORT];
        r[R_EXTRA] = f[D_RULE];
        break;
    case K_MODEL:
        r[R_SUBJECT] = f[D_PATH];
        r[R_DETAIL] = f[D_LIBRARY];
        r[R_EXTRA] = f[D_SIZE];
        break;
    case K_READ:
        r[R_SUBJECT] = f[D_PATH];
        r[R_DETAIL] = f[D_FORMAT];
        break;
    case K_FLAGGED:
        r[R_SUBJECT] = f[D_RULE];
        break;
    case K_REVIEW:
        r[R_SUBJECT] = f[D_REVIEWER];
        r[R_DETAIL] = f[D_NOTEBOOK];
        r[R_EXTRA] = f[D_SCOPE];
        break;
    case K_STARTED:
        r[R_SUBJECT] = f[D_KERNEL_NAME];
        break;
    }
    return kid;
}

static int add_record(tally *t, const fld *r, int kid)
{
    size_t need = 64;
    for (int i = 0; i < R_N; i++)
        need += 5 + (r[i].set ? (size_t)r[i].n : 0);
    if (!key_reserve(t, 2 * need))
        return 0;
    static const fld null = {NULL, 0, 0};
    const fld *kern = &r[R_KERNEL], *nb = &r[R_NOTEBOOK];
    int has_kernel = kid != K_OTHER && kern->set && kern->n > 0, has_nb = nb->set && nb->n > 0;
    int per_tool = kid == K_AI || kid == K_STARTED;
    /* the group key: kind, subject, detail, extra, host, platform, user */
    char *gk = t->key;
    size_t gn = 0;
    for (int i = R_KIND; i <= R_USER; i++)
        gn = key_put(gk, gn, &r[i]);
    uint64_t gh = hash_bytes(gk, gn), kh = 0, nh = 0;
    if (!table_prefetch(&t->groups, gh))
        return 0;
    if (has_kernel) {
        kh = hash_bytes(kern->p, (size_t)kern->n);
        if (!table_prefetch(&t->kernels, kh))
            return 0;
    }
    if (has_nb) {
        nh = hash_bytes(nb->p, (size_t)nb->n);
        if (!table_prefetch(&t->notebooks, nh))
            return 0;
    }
    table_prefetch_entry(&t->groups, gh);
    if (has_kernel)
        table_prefetch_entry(&t->kernels, kh);
    if (has_nb)
        table_prefetch_entry(&t->notebooks, nh);
    entry *g = table_get_h(&t->groups, gk, gn, gh);
    if (!g)
        return 0;
    entry *nbe = NULL, *tool = NULL, *ke = NULL;
    if (has_nb && !(nbe = table_get_h(&t->notebooks, nb->p, (size_t)nb->n, nh)))
        return 0;
    if (has_kernel && !(ke = table_get_h(&t->kernels, kern->p, (size_t)kern->n, kh)))
        return 0;
    if (kid != K_OTHER) {
        /* the tool (kind, subject, detail, extra; per-tool kinds without the last two)
         * follows from the group: looked up once per group */
        if (!(tool = g->tool)) {
            char *tk = t->key + need;
            size_t tn = key_put(tk, 0, &r[R_KIND]);
            tn = key_put(tk, tn, &r[R_SUBJECT]);
            tn = key_put(tk, tn, per_tool ? &null : &r[R_DETAIL]);
            tn = key_put(tk, tn, per_tool ? &null : &r[R_EXTRA]);
            if (!(tool = g->tool = table_get(&t->tools, tk, tn)))
                return 0;
        }
    }
    g->count++;
    const fld *tm = &r[R_TIME];
    if (tm->set) {
        if (!g->min || cmp_text(tm->p, (size_t)tm->n, g->min, g->minlen) < 0)
            if (!set_time(&g->min, &g->minlen, &g->mincap, g->inl[0], tm->p, (size_t)tm->n))
                return 0;
        if (!g->max || cmp_text(tm->p, (size_t)tm->n, g->max, g->maxlen) > 0)
            if (!set_time(&g->max, &g->maxlen, &g->maxcap, g->inl[1], tm->p, (size_t)tm->n))
                return 0;
    }
    if (!flush_pairs(t))
        return 0;
    if (!tool)
        return 1;
    if (ke) {
        t->pending_kernel = ((uint64_t)tool->id << 32) | ke->id;
        t->has_pending_kernel = 1;
        pair_prefetch(&t->tool_kernels, t->pending_kernel);
        if (per_tool)
            ke->count = 1;
        if (kid == K_STARTED)
            ke->count2 = 1;
    }
    if (nbe) {
        t->pending_notebook = ((uint64_t)tool->id << 32) | nbe->id;
        t->has_pending_notebook = 1;
        pair_prefetch(&t->tool_notebooks, t->pending_notebook);
    }
    return 1;
}

static void tally_free(tally *t)
{
    table_free(&t->groups);
    table_free(&t->notebooks);
    table_free(&t->tools);
    table_free(&t->kernels);
    pair_free(&t->tool_kernels);
    pair_free(&t->tool_notebooks);
    free(t->key);
    memset(t, 0, sizeof *t);
}

/* Adds from's entries to into; *ids (when asked) maps from's ids to into's. */
static int merge_table(table *into, table *from, int groups, uint32_t **ids)
{
    uint32_t *map = NULL;
    if (ids && !(map = *ids = malloc((from->len + 1) * sizeof *map)))
        return 0;
    for (size_t i = 0; i < from->len; i++) {
        entry *e = from->list[i];
        entry *d = table_get(into, e->key, e->klen);
        if (!d)
            return 0;
        if (map)
            map[i] = d->id;
        if (!groups) {
            d->count |= e->count;
            d->count2 |= e->count2;
            continue;
        }
        d->count += e->count;
        if (e->min && (!d->min || cmp_text(e->min, e->minlen, d->min, d->minlen) < 0)
            && !set_time(&d->min, &d->minlen, &d->mincap, d->inl[0], e->min, e->minlen))
            return 0;
        if (e->max && (!d->max || cmp_text(e->max, e->maxlen, d->max, d->maxlen) > 0)
            && !set_time(&d->max, &d->maxlen, &d->maxcap, d->inl[1], e->max, e->maxlen))
            return 0;
    }
    return 1;
}

typedef struct {
    pairset *into;
    const uint32_t *a, *b; /* from's tool and other ids -> into's */
} remap;

static int add_remapped(void *arg, uint64_t pair)
{
    remap *m = arg;
    return pair_add(m->into, ((uint64_t)m->a[pair >> 32] << 32) | m->b[pair & 0xFFFFFFFFu]);
}

static int merge_pairs(pairset *into, const pairset *from, const uint32_t *a, const uint32_t *b)
{
    remap m = {into, a, b};
    return pair_each(from, add_remapped, &m);
}

static int tally_merge(tally *into, tally *from)
{
    uint32_t *tools = NULL, *kernels = NULL, *notebooks = NULL;
    int ok = flush_pairs(into) && flush_pairs(from) && merge_table(&into->groups, &from->groups, 1, NULL)
        && merge_table(&into->notebooks, &from->notebooks, 0, &notebooks)
        && merge_table(&into->tools, &from->tools, 0, &tools)
        && merge_table(&into->kernels, &from->kernels, 0, &kernels)
        && merge_pairs(&into->tool_kernels, &from->tool_kernels, tools, kernels)
        && merge_pairs(&into->tool_notebooks, &from->tool_notebooks, tools, notebooks);
    free(tools);
    free(kernels);
    free(notebooks);
    return ok;
}

/* ------------------------------------------------------------------ one range */

typedef struct {
    long long seq;
    char hex[HASH_HEX];
} link_end;

typedef struct {
    link_end *items;
    size_t len, cap;
} link_list;

static int link_push(link_list *l, long long seq, const char *hex)
{
    if (l->len == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 16;
        link_end *items = realloc(l->items, cap * sizeof *items);
        if (!items)
            return 0;
        l->items = items;
        l->cap = cap;
    }
    l->items[l->len].seq = seq;
    memcpy(l->items[l->len].hex, hex, HASH_HEX);
    l->len++;
    return 1;
}

static int link_cmp(const void *a, const void *b)
{
    long long x = ((const link_end *)a)->seq, y = ((const link_end *)b)->seq;
    return x < y ? -1 : x > y;
}

typedef struct {
    /* in */
    const char *conninfo, *snapshot;
    long long lo, hi; /* seq after lo up to hi, or (by_block) heap blocks lo up to hi */
    int first, last;  /* the range opens at the ledger's start / ends at its head */
    int by_block;
    int timeout_ms;
    const char *since, *until;
    Py_ssize_t since_n, until_n;
    const table *users, *hosts; /* the users / hosts a report covers (NULL: all) */
    int until_inclusive, tallying;
    /* out */
    tally t;
    int intact; /* every record of the range checked out */
    long long rows, last_seq, min_seq, max_seq;
    char last_hash[HASH_HEX];
    int seen_first;
    /* Where the stream is not in seq order (heap order after concurrent inserts or an
     * edit): the records that open a run (seq, prev) and that close one (seq, hash); the
     * runs' links are checked across all ranges at the end. */
    link_list heads, tails;
    long long *odd;
    size_t nodd, capodd;
    char error[512];
    int connect_failed;
} range_job;

static void job_error(range_job *j, PGconn *conn, const char *doing)
{
    const char *msg = conn ? PQerrorMessage(conn) : "out of memory";
    char line[400];
    size_t n = 0;
    while (msg[n] && msg[n] != '\n' && n < sizeof line - 1) {
        line[n] = msg[n];
        n++;
    }
    line[n] = 0;
    if (!n)
        snprintf(line, sizeof line, "the server closed the connection");
    snprintf(j->error, sizeof j->error, "%s: %s", doing, line);
}

static int exec_ok(range_job *j, PGconn *conn, const char *sql)
{
    PGresult *res = PQexec(conn, sql);
    int ok = PQresultStatus(res) == PGRES_COMMAND_OK || PQresultStatus(res) == PGRES_TUPLES_OK;
    if (!ok) {
        const char *m = PQresultErrorMessage(res);
        snprintf(j->error, sizeof j->error, "%.*s", (int)strcspn(m, "\n"), m);
        if (!j->error[0])
            job_error(j, conn, "query failed");
    }
    PQclear(res);
    return ok;
}

static inline int32_t be32(const unsigned char *p)
{
    return (int32_t)(((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8)
                     | (uint32_t)p[3]);
}

static inline long long be64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | p[i];
    return (long long)v;
}

static int note_odd(range_job *j, long long seq)
{
    if (j->nodd == j->capodd) {
        size_t cap = j->capodd ? j->capodd * 2 : 64;
        long long *o = realloc(j->odd, cap * sizeof *o);
        if (!o)
            return 0;
        j->odd = o;
        j->capodd = cap;
    }
    j->odd[j->nodd++] = seq;
    return 1;
}

static int passes(range_job *j, const fld *r)
{
    const fld *t = &r[R_TIME];
    if (j->since && (!t->set || cmp_text(t->p, (size_t)t->n, j->since, (size_t)j->since_n) < 0))
        return 0;
    if (j->until) {
        if (!t->set)
            return 0;
        int c = cmp_text(t->p, (size_t)t->n, j->until, (size_t)j->until_n);
        if (c > 0 || (c == 0 && !j->until_inclusive))
            return 0;
    }
    if (j->users && (!r[R_USER].set || !table_find(j->users, r[R_USER].p, (size_t)r[R_USER].n)))
        return 0;
    if (j->hosts && (!r[R_HOST].set || !table_find(j->hosts, r[R_HOST].p, (size_t)r[R_HOST].n)))
        return 0;
    return 1;
}

/* One streamed row: 4 fields seq, prev, hash, body. Returns 0 on a fatal error. */
static int take_row(range_job *j, const unsigned char *p, size_t n, char **scratch,
                    size_t *scratch_cap)
{
    const unsigned char *end = p + n;
    const unsigned char *val[4];
    int32_t len[4];
    if (n < 2 || ((p[0] << 8) | p[1]) != 4) {
        snprintf(j->error, sizeof j->error, "unexpected COPY row layout");
        return 0;
    }
    p += 2;
    for (int i = 0; i < 4; i++) {
        if (end - p < 4) {
            snprintf(j->error, sizeof j->error, "truncated COPY row");
            return 0;
        }
        len[i] = be32(p);
        p += 4;
        if (len[i] > end - p) {
            snprintf(j->error, sizeof j->error, "truncated COPY row");
            return 0;
        }
        val[i] = p;
        if (len[i] > 0)
            p += len[i];
    }
    if (len[0] != 8) {
        snprintf(j->error, sizeof j->error, "unexpected COPY row layout");
        return 0;
    }
    long long seq = be64(val[0]);
    j->rows++;
    const char *prev = (const char *)val[1], *hash = (const char *)val[2],
               *body = (const char *)val[3];
    if (j->intact) {
        int good = len[1] == HASH_HEX && len[2] == HASH_HEX && len[3] >= 0;
        if (good) {
            SHA256_CTX ctx;
            unsigned char digest[SHA256_DIGEST_LENGTH];
            SHA256_Init(&ctx);
            SHA256_Update(&ctx, prev, HASH_HEX);
            SHA256_Update(&ctx, "\n", 1);
            SHA256_Update(&ctx, body, (size_t)len[3]);
            SHA256_Final(digest, &ctx);
            for (int i = 0; i < SHA256_DIGEST_LENGTH && good; i++)
                good = hash[2 * i] == HEX[digest[i] >> 4] && hash[2 * i + 1] == HEX[digest[i] & 15];
        }
        if (good && j->seen_first && seq == j->last_seq + 1) {
            good = memcmp(prev, j->last_hash, HASH_HEX) == 0;
        } else if (good) { /* a run ends before this record, another starts with it */
            if ((j->seen_first && !link_push(&j->tails, j->last_seq, j->last_hash))
                || !link_push(&j->heads, seq, prev)) {
                snprintf(j->error, sizeof j->error, "out of memory");
                return 0;
            }
        }
        if (good)
            memcpy(j->last_hash, hash, HASH_HEX);
        else
            j->intact = 0;
    }
    if (!j->seen_first || seq < j->min_seq)
        j->min_seq = seq;
    if (!j->seen_first || seq > j->max_seq)
        j->max_seq = seq;
    j->seen_first = 1;
    j->last_seq = seq;
    if (!j->tallying)
        return 1;
    if (len[3] < 0)
        return note_odd(j, seq);
    if ((size_t)len[3] + 16 > *scratch_cap) {
        size_t cap = (size_t)len[3] * 2 + 1024;
        char *s = realloc(*scratch, cap);
        if (!s) {
            snprintf(j->error, sizeof j->error, "out of memory");
            return 0;
        }
        *scratch = s;
        *scratch_cap = cap;
    }
    fld f[N_FIELDS], r[R_N];
    if (!read_body(body, len[3], *scratch, f))
        return note_odd(j, seq) ? 1 : (snprintf(j->error, sizeof j->error, "out of memory"), 0);
    int kid = columns(f, r);
    if (!passes(j, r))
        return 1;
    if (!add_record(&j->t, r, kid)) {
        snprintf(j->error, sizeof j->error, "out of memory");
        return 0;
    }
    return 1;
}

static const unsigned char COPY_SIGNATURE[11] = "PGCOPY\n\377\r\n";

static void *run_range(void *arg)
{
    range_job *j = arg;
    char sql[512];
    char *scratch = NULL;
    size_t scratch_cap = 0;
    j->intact = 1;
    PGconn *conn = PQconnectdb(j->conninfo);
    if (!conn || PQstatus(conn) != CONNECTION_OK) {
        j->connect_failed = 1;
        job_error(j, conn, "cannot connect");
        goto out;
    }
    /* no JIT: compiling the scan costs more than it saves on one pass */
    snprintf(sql, sizeof sql, "SET statement_timeout = %d; SET jit = off", j->timeout_ms);
    if (!exec_ok(j, conn, "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
        goto out;
    if (j->snapshot) {
        char snap[256];
        snprintf(snap, sizeof snap, "SET TRANSACTION SNAPSHOT '%s'", j->snapshot);
        if (!exec_ok(j, conn, snap))
            goto out;
    }
    if (!exec_ok(j, conn, sql))
        goto out;
    char where[160] = "";
    if (j->by_block) { /* heap order: a TID range scan, the cheapest read of the table */
        if (!j->first && !j->last)
            snprintf(where, sizeof where, "WHERE ctid >= '(%lld,0)' AND ctid < '(%lld,0)'",
                     j->lo, j->hi);
        else if (!j->first)
            snprintf(where, sizeof where, "WHERE ctid >= '(%lld,0)'", j->lo);
        else if (!j->last)
            snprintf(where, sizeof where, "WHERE ctid < '(%lld,0)'", j->hi);
    } else if (!j->first && !j->last)
        snprintf(where, sizeof where, "WHERE seq > %lld AND seq <= %lld ORDER BY seq", j->lo,
                 j->hi);
    else if (!j->first)
        snprintf(where, sizeof where, "WHERE seq > %lld ORDER BY seq", j->lo);
    else if (!j->last)
        snprintf(where, sizeof where, "WHERE seq <= %lld ORDER BY seq", j->hi);
    else
        snprintf(where, sizeof where, "ORDER BY seq");
    snprintf(sql, sizeof sql,
             "COPY (SELECT seq, prev, hash, body FROM dua_guard.ledger_records %s) "
             "TO STDOUT (FORMAT binary)",
             where);
    PGresult *res = PQexec(conn, sql);
    if (PQresultStatus(res) != PGRES_COPY_OUT) {
        const char *m = PQresultErrorMessage(res);
        snprintf(j->error, sizeof j->error, "%.*s", (int)strcspn(m, "\n"), m);
        if (!j->error[0])
            job_error(j, conn, "COPY failed");
        PQclear(res);
        goto out;
    }
    PQclear(res);
    int header = 1;
    for (;;) {
        char *buf = NULL;
        int n = PQgetCopyData(conn, &buf, 0);
        if (n == -1)
            break;
        if (n < 0) {
            job_error(j, conn, "reading the records failed");
            goto out;
        }
        const unsigned char *p = (const unsigned char *)buf;
        size_t len = (size_t)n;
        int fine = 1;
        if (header) {
            header = 0;
            if (len < 19 || memcmp(p, COPY_SIGNATURE, 11) != 0) {
                snprintf(j->error, sizeof j->error, "unexpected COPY header");
                fine = 0;
            } else {
                size_t ext = (size_t)be32(p + 15);
                p += 19 + ext;
                len = len >= 19 + ext ? len - 19 - ext : 0;
            }
        }
        if (fine && len >= 2 && !(p[0] == 0xFF && p[1] == 0xFF))
            fine = take_row(j, p, len, &scratch, &scratch_cap);
        PQfreemem(buf);
        if (!fine)
            goto out;
    }
    res = PQgetResult(conn);
    if (PQresultStatus(res) != PGRES_COMMAND_OK) {
        const char *m = PQresultErrorMessage(res);
        snprintf(j->error, sizeof j->error, "%.*s", (int)strcspn(m, "\n"), m);
        if (!j->error[0])
            job_error(j, conn, "reading the records failed");
    }
    PQclear(res);
    while ((res = PQgetResult(conn)) != NULL)
        PQclear(res);
    if (!j->error[0])
        exec_ok(j, conn, "COMMIT");
    if (j->intact && j->seen_first && !link_push(&j->tails, j->last_seq, j->last_hash))
        snprintf(j->error, sizeof j->error, "out of memory");
out:
    free(scratch);
    PQfinish(conn);
    return NULL;
}

/* Whether the ranges' records are exactly 1..top, each linked to the one before: every
 * record was hashed and linked within its run; a run's first record must link to the last
 * record of the run that holds its predecessor (seq are unique: the primary key). 1: yes,
 * 0: no, -1: out of memory. */
static int chain_complete(range_job *jobs, int nr, long long top, long long rows)
{
    long long lo = 0, hi = 0;
    int any = 0;
    for (int i = 0; i < nr; i++) {
        if (!jobs[i].rows)
            continue;
        if (!any || jobs[i].min_seq < lo)
            lo = jobs[i].min_seq;
        if (!any || jobs[i].max_seq > hi)
            hi = jobs[i].max_seq;
        any = 1;
    }
    if (rows != top || (any && (lo != 1 || hi != top)))
        return 0; /* seq unique, top of them, all within 1..top: exactly 1..top */
    size_t n = 0;
    for (int i = 0; i < nr; i++)
        n += jobs[i].tails.len;
    link_end *tails = malloc((n ? n : 1) * sizeof *tails);
    if (!tails)
        return -1;
    n = 0;
    for (int i = 0; i < nr; i++) {
        memcpy(tails + n, jobs[i].tails.items, jobs[i].tails.len * sizeof *tails);
        n += jobs[i].tails.len;
    }
    qsort(tails, n, sizeof *tails, link_cmp);
    int ok = 1;
    for (int i = 0; i < nr && ok; i++) {
        for (size_t k = 0; k < jobs[i].heads.len && ok; k++) {
            const link_end *h = &jobs[i].heads.items[k];
            if (h->seq == 1) {
                for (int c = 0; c < HASH_HEX && ok; c++)
                    ok = h->hex[c] == '0'; /* the genesis link */
                continue;
            }
            link_end want = {h->seq - 1, {0}};
            const link_end *t = bsearch(&want, tails, n, sizeof *tails, link_cmp);
            ok = t != NULL && memcmp(t->hex, h->hex, HASH_HEX) == 0;
        }
    }
    free(tails);
    return ok;
}

/* ------------------------------------------------------------------ Python interface */

static void tally_capsule_free(PyObject *cap)
{
    tally *t = PyCapsule_GetPointer(cap, "pgsurvey.tally");
    if (t) {
        tally_free(t);
        free(t);
    }
}

static const char *opt_text(PyObject *o, Py_ssize_t *n)
{
    if (o == Py_None)
        return NULL;
    return PyUnicode_AsUTF8AndSize(o, n);
}

/* A filter's values (None: no filter) as a set; *active says whether it filters at all. */
static int filter_set(PyObject *o, table *t, int *active)
{
    *active = o != Py_None;
    if (o == Py_None)
        return 1;
    PyObject *seq = PySequence_Fast(o, "user / host: None or a sequence of str");
    if (!seq)
        return 0;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        Py_ssize_t n;
        const char *v = PyUnicode_AsUTF8AndSize(PySequence_Fast_GET_ITEM(seq, i), &n);
        if (!v || !table_get(t, v, (size_t)n)) {
            if (v)
                PyErr_NoMemory();
            Py_DECREF(seq);
            return 0;
        }
    }
    Py_DECREF(seq);
    return 1;
}

PyDoc_STRVAR(survey_doc,
"survey(conninfo, snapshot, bounds, by_block, top, timeout_ms, since, until, until_inclusive,\n"
"       users, hosts, tallying) -> (intact, rows, odd_seqs, tally)\n\n"
"bounds: seq bounds, or heap block bounds (by_block: TID range scans, PostgreSQL 14+);\n"
"top: the head's seq, which the records must reach from 1 without a gap.\n"
"users / hosts: None (everyone) or the names a report covers.\n"
"Stream the records of each range bounds[i]..bounds[i+1] on its own connection (in the\n"
"exported snapshot), verify them and tally the report figures of those passing the filters.");

static PyObject *survey(PyObject *self, PyObject *args)
{
    const char *conninfo, *snapshot;
    PyObject *bounds, *o_since, *o_until, *o_user, *o_host;
    int timeout_ms, until_inclusive, tallying, by_block;
    long long top;
    if (!PyArg_ParseTuple(args, "szOpLiOOpOOp", &conninfo, &snapshot, &bounds, &by_block, &top,
                          &timeout_ms, &o_since, &o_until, &until_inclusive, &o_user, &o_host,
                          &tallying))
        return NULL;
    Py_ssize_t nb = PySequence_Size(bounds);
    if (nb < 2 || nb - 1 > MAX_RANGES) {
        PyErr_SetString(PyExc_ValueError, "bounds: 2 to 9 seq bounds");
        return NULL;
    }
    long long b[MAX_RANGES + 1];
    for (Py_ssize_t i = 0; i < nb; i++) {
        PyObject *item = PySequence_GetItem(bounds, i);
        if (!item)
            return NULL;
        b[i] = PyLong_AsLongLong(item);
        Py_DECREF(item);
        if (b[i] == -1 && PyErr_Occurred())
            return NULL;
    }
    Py_ssize_t since_n = 0, until_n = 0;
    const char *since = opt_text(o_since, &since_n), *until = opt_text(o_until, &until_n);
    if (PyErr_Occurred())
        return NULL;
    table users = {0}, hosts = {0};
    int by_user, by_host;
    int nr = (int)(nb - 1);
    range_job *jobs = NULL;
    PyObject *result = NULL;
    if (!filter_set(o_user, &users, &by_user) || !filter_set(o_host, &hosts, &by_host))
        goto done;
    jobs = calloc((size_t)nr, sizeof *jobs);
    if (!jobs) {
        PyErr_NoMemory();
        goto done;
    }
    for (int i = 0; i < nr; i++) {
        range_job *j = &jobs[i];
        j->conninfo = conninfo;
        j->snapshot = snapshot;
        j->lo = b[i];
        j->hi = b[i + 1];
        j->first = i == 0;
        j->last = i == nr - 1;
        j->timeout_ms = timeout_ms;
        j->since = since, j->since_n = since_n;
        j->until = until, j->until_n = until_n;
        j->users = by_user ? &users : NULL;
        j->hosts = by_host ? &hosts : NULL;
        j->until_inclusive = until_inclusive;
        j->tallying = tallying;
        j->by_block = by_block;
    }
    pthread_t threads[MAX_RANGES];
    int started[MAX_RANGES] = {0};
    Py_BEGIN_ALLOW_THREADS
    for (int i = 1; i < nr; i++)
        started[i] = pthread_create(&threads[i], NULL, run_range, &jobs[i]) == 0;
    run_range(&jobs[0]);
    for (int i = 1; i < nr; i++) {
        if (started[i])
            pthread_join(threads[i], NULL);
        else
            run_range(&jobs[i]);
    }
    Py_END_ALLOW_THREADS

    int intact = 1;
    long long rows = 0;
    for (int i = 0; i < nr; i++) {
        range_job *j = &jobs[i];
        if (j->error[0]) {
            PyObject *err = Py_BuildValue("(ss)", j->connect_failed ? "connect" : "read",
                                          j->error);
            PyErr_SetObject(survey_error, err);
            Py_XDECREF(err);
            goto done;
        }
        rows += j->rows;
        intact &= j->intact;
    }
    int linked;
    Py_BEGIN_ALLOW_THREADS
    linked = intact && chain_complete(jobs, nr, top, rows);
    Py_END_ALLOW_THREADS
    if (linked < 0) {
        PyErr_NoMemory();
        goto done;
    }
    intact = linked;
    tally *t = malloc(sizeof *t);
    if (!t) {
        PyErr_NoMemory();
        goto done;
    }
    *t = jobs[0].t;
    memset(&jobs[0].t, 0, sizeof jobs[0].t);
    int merged = 1;
    Py_BEGIN_ALLOW_THREADS
    for (int i = 1; i < nr && merged; i++)
        merged = tally_merge(t, &jobs[i].t);
    Py_END_ALLOW_THREADS
    PyObject *cap = PyCapsule_New(t, "pgsurvey.tally", tally_capsule_free);
    if (!cap) {
        tally_free(t);
        free(t);
        goto done;
    }
    if (!merged) {
        Py_DECREF(cap);
        PyErr_NoMemory();
        goto done;
    }
    PyObject *odd = PyList_New(0);
    for (int i = 0; odd && i < nr; i++)
        for (size_t k = 0; k < jobs[i].nodd; k++) {
            PyObject *v = PyLong_FromLongLong(jobs[i].odd[k]);
            if (!v || PyList_Append(odd, v) < 0) {
                Py_XDECREF(v);
                Py_CLEAR(odd);
                break;
            }
            Py_DECREF(v);
        }
    if (odd)
        result = Py_BuildValue("(OLNN)", intact ? Py_True : Py_False, rows, odd, cap);
    else
        Py_DECREF(cap);
done:
    for (int i = 0; jobs && i < nr; i++) {
        tally_free(&jobs[i].t);
        free(jobs[i].odd);
        free(jobs[i].heads.items);
        free(jobs[i].tails.items);
    }
    free(jobs);
    table_free(&users);
    table_free(&hosts);
    return result;
}

static int text_field(PyObject *o, fld *f)
{
    if (o == Py_None) {
        f->set = 0;
        return 1;
    }
    if (!PyUnicode_Check(o)) {
        PyErr_SetString(PyExc_TypeError, "tally_add: columns must be str or None");
        return 0;
    }
    f->p = PyUnicode_AsUTF8AndSize(o, &f->n);
    f->set = 1;
    return f->p != NULL;
}

PyDoc_STRVAR(tally_add_doc,
"tally_add(tally, rows)\n\n"
"Add records read by SQL (time, kind, subject, detail, extra, host, platform, user, kernel,\n"
"notebook), already filtered.");

static PyObject *tally_add(PyObject *self, PyObject *args)
{
    PyObject *cap, *rows;
    if (!PyArg_ParseTuple(args, "OO", &cap, &rows))
        return NULL;
    tally *t = PyCapsule_GetPointer(cap, "pgsurvey.tally");
    if (!t)
        return NULL;
    PyObject *it = PyObject_GetIter(rows);
    if (!it)
        return NULL;
    PyObject *row;
    while ((row = PyIter_Next(it)) != NULL) {
        fld r[R_N];
        int ok = PySequence_Check(row) && PySequence_Size(row) == R_N;
        if (!ok)
            PyErr_SetString(PyExc_ValueError, "tally_add: rows of 10 columns");
        for (int i = 0; ok && i < R_N; i++) {
            PyObject *v = PySequence_GetItem(row, i);
            ok = v && text_field(v, &r[i]);
            Py_XDECREF(v); /* the row keeps the str alive */
        }
        if (ok && !add_record(t, r, kind_id(&r[R_KIND]))) {
            PyErr_NoMemory();
            ok = 0;
        }
        Py_DECREF(row);
        if (!ok) {
            Py_DECREF(it);
            return NULL;
        }
    }
    Py_DECREF(it);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

/* A composite key's values back as Python objects (str or None). */
static int unpack_key(const char *k, size_t klen, PyObject **out, int n)
{
    size_t off = 0;
    for (int i = 0; i < n; i++) {
        if (off >= klen)
            return 0;
        if (!k[off]) {
            out[i] = Py_NewRef(Py_None);
            off++;
            continue;
        }
        uint32_t len;
        memcpy(&len, k + off + 1, 4);
        out[i] = PyUnicode_DecodeUTF8(k + off + 5, len, "surrogateescape");
        if (!out[i])
            return 0;
        off += 5 + len;
    }
    return 1;
}

static PyObject *time_or_none(const char *s, uint32_t n)
{
    if (!s)
        Py_RETURN_NONE;
    return PyUnicode_DecodeUTF8(s, n, "surrogateescape");
}

PyDoc_STRVAR(tally_result_doc,
"tally_result(tally) -> (groups, distinct, kernels, kernels_started, notebooks)\n\n"
"groups: (kind, subject, detail, extra, host, platform, user, first, last, count) tuples;\n"
"distinct: (kind, subject, detail, extra, kernels, notebooks) tuples.");

typedef struct {
    table *tools;
    int second;
} counting;

static int count_pair(void *arg, uint64_t pair)
{
    counting *c = arg;
    entry *tool = c->tools->list[pair >> 32];
    if (c->second)
        tool->count2++;
    else
        tool->count++;
    return 1;
}

static void count_pairs(const pairset *pairs, table *tools, int second)
{
    counting c = {tools, second};
    pair_each(pairs, count_pair, &c);
}

/* Append a tuple of the n new references in v to list (ok: all of them were made); the
   references are stolen or released either way. */
static int append_tuple(PyObject *list, PyObject **v, int n, int ok)
{
    PyObject *tup = ok ? PyTuple_New(n) : NULL;
    if (!tup) {
        for (int k = 0; k < n; k++)
            Py_XDECREF(v[k]);
        return -1;
    }
    for (int k = 0; k < n; k++)
        PyTuple_SET_ITEM(tup, k, v[k]);
    int rc = PyList_Append(list, tup);
    Py_DECREF(tup);
    return rc;
}

static PyObject *tally_result(PyObject *self, PyObject *args)
{
    PyObject *cap;
    if (!PyArg_ParseTuple(args, "O", &cap))
        return NULL;
    tally *t = PyCapsule_GetPointer(cap, "pgsurvey.tally");
    if (!t)
        return NULL;
    for (size_t i = 0; i < t->tools.len; i++)
        t->tools.list[i]->count = t->tools.list[i]->count2 = 0;
    if (!flush_pairs(t))
        return PyErr_NoMemory();
    count_pairs(&t->tool_kernels, &t->tools, 0);
    count_pairs(&t->tool_notebooks, &t->tools, 1);
    PyObject *groups = PyList_New(0), *distinct = PyList_New(0), *notebooks = PyList_New(0);
    if (!groups || !distinct || !notebooks)
        goto fail;
    for (size_t i = 0; i < t->groups.len; i++) {
        entry *e = t->groups.list[i];
        PyObject *v[10] = {NULL};
        int ok = unpack_key(e->key, e->klen, v, 7);
        if (ok) {
            v[7] = time_or_none(e->min, e->minlen);
            v[8] = time_or_none(e->max, e->maxlen);
            v[9] = PyLong_FromLongLong(e->count);
            ok = v[7] && v[8] && v[9];
        }
        if (append_tuple(groups, v, 10, ok) < 0)
            goto fail;
    }
    for (size_t i = 0; i < t->tools.len; i++) {
        entry *e = t->tools.list[i];
        PyObject *v[6] = {NULL};
        int ok = unpack_key(e->key, e->klen, v, 4);
        if (ok) {
            v[4] = PyLong_FromLongLong(e->count);
            v[5] = PyLong_FromLongLong(e->count2);
            ok = v[4] && v[5];
        }
        if (append_tuple(distinct, v, 6, ok) < 0)
            goto fail;
    }
    for (size_t i = 0; i < t->notebooks.len; i++) {
        entry *e = t->notebooks.list[i];
        PyObject *s = PyUnicode_DecodeUTF8(e->key, e->klen, "surrogateescape");
        if (!s || PyList_Append(notebooks, s) < 0) {
            Py_XDECREF(s);
            goto fail;
        }
        Py_DECREF(s);
    }
    long long kernels = 0, started = 0;
    for (size_t i = 0; i < t->kernels.len; i++) {
        entry *e = t->kernels.list[i];
        if (e->count) {
            kernels++;
            started += e->count2 != 0;
        }
    }
    return Py_BuildValue("(NNLLN)", groups, distinct, kernels, started, notebooks);
fail:
    Py_XDECREF(groups);
    Py_XDECREF(distinct);
    Py_XDECREF(notebooks);
    return NULL;
}

static PyMethodDef methods[] = {
    {"survey", survey, METH_VARARGS, survey_doc},
    {"tally_add", tally_add, METH_VARARGS, tally_add_doc},
    {"tally_result", tally_result, METH_VARARGS, tally_result_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_pgsurvey_fast",
    "Streams a PostgreSQL ledger's records to verify them and tally a report.", -1, methods,
};

PyMODINIT_FUNC PyInit__pgsurvey_fast(void)
{
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    survey_error = PyErr_NewException("jupyter_dua_guard._pgsurvey_fast.Error", NULL, NULL);
    if (!survey_error || PyModule_AddObjectRef(m, "Error", survey_error) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

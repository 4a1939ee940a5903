/* The append fast paths, and the fast walk of the SQLite ledger's hash chain.
 *
 * A records report closes with a full verification of the chain, and at a million records
 * the Python walk spends most of its time turning rows into Python objects. This module
 * reads the rows with SQLite's C API and hashes them with OpenSSL (the same libraries
 * Python's sqlite3 and hashlib use), with the GIL released, so two threads check two
 * halves of the chain on two cores. It only answers "is this range intact, and where does
 * it stop being so"; naming what is wrong stays in Python (ledger.diagnose_rows).
 *
 * It also tallies a report's usage figures along the report index (tally), does the
 * locked part of a SQLite append (Appender) and a kernel's whole append through the
 * PostgreSQL ledger's relay (relay_store): each is where Python's per-row and per-call
 * costs outweighed the database's own work.
 */
#define PY_SSIZE_T_CLEAN
#define OPENSSL_SUPPRESS_DEPRECATED
#include <Python.h>
#include <errno.h>
#include <openssl/sha.h>
#include <sqlite3.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <unistd.h>

#define HASH_HEX 64

static const char HEX[] = "0123456789abcdef";

static PyObject *sqlite_error; /* sqlite3.OperationalError, so callers handle one kind */

/* A record's hash, as ledger.record_hash computes it: lower-case hex of
 * sha256(prev + "\n" + body). The low-level interface: OpenSSL 3's one-shot SHA256() looks
 * the digest up in its provider tables on every call, which costs more than hashing a
 * record. */
static void record_hash_hex_n(const void *prev, size_t prev_len, const void *body,
                              size_t body_len, char *hex)
{
    SHA256_CTX ctx;
    unsigned char digest[SHA256_DIGEST_LENGTH];
    SHA256_Init(&ctx);
    SHA256_Update(&ctx, prev, prev_len);
    SHA256_Update(&ctx, "\n", 1);
    SHA256_Update(&ctx, body, body_len);
    SHA256_Final(digest, &ctx);
    for (int i = 0; i < SHA256_DIGEST_LENGTH; i++) {
        hex[2 * i] = HEX[digest[i] >> 4];
        hex[2 * i + 1] = HEX[digest[i] & 15];
    }
}

static void record_hash_hex(const void *prev, const void *body, size_t body_len, char *hex)
{
    record_hash_hex_n(prev, HASH_HEX, body, body_len, hex);
}

typedef struct {
    int ok;
    sqlite3_int64 last_seq;
    char last_hash[HASH_HEX + 1];
    int rc;
    char errmsg[256];
} scan_state;

static void set_error(scan_state *st, sqlite3 *db, int rc)
{
    st->rc = rc;
    snprintf(st->errmsg, sizeof st->errmsg, "%s", db ? sqlite3_errmsg(db) : sqlite3_errstr(rc));
}

/* Check records after+1..top: seq consecutive, prev links to the record before, hash equals
 * sha256(prev + "\n" + body) in lower-case hex. Runs without the GIL. */
static void scan_range(const char *path, int timeout_ms, sqlite3_int64 after,
                       sqlite3_int64 top, scan_state *st)
{
    sqlite3 *db = NULL;
    sqlite3_stmt *stmt = NULL;
    int rc = sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL);
    if (rc != SQLITE_OK) {
        sqlite3_close(db);
        db = NULL;
        rc = sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX, NULL);
    }
    if (rc != SQLITE_OK) {
        set_error(st, db, rc);
        goto done;
    }
    sqlite3_busy_timeout(db, timeout_ms);
    /* No mmap: for one pass over the file, faulting each page into this process's
     * mapping (and unmapping it at close) costs more than pread copying it. */
    sqlite3_exec(db, "PRAGMA mmap_size = 0", NULL, NULL, NULL);
    rc = sqlite3_prepare_v2(db,
                            "SELECT seq, prev, hash, body FROM ledger_records "
                            "WHERE seq > ?1 AND seq <= ?2 ORDER BY seq",
                            -1, &stmt, NULL);
    if (rc != SQLITE_OK) {
        set_error(st, db, rc);
        goto done;
    }
    sqlite3_bind_int64(stmt, 1, after);
    sqlite3_bind_int64(stmt, 2, top);
    st->ok = 1;
    while ((rc = sqlite3_step(stmt)) == SQLITE_ROW) {
        /* sqlite3_value_* on each column's value skip the statement checks that every
         * sqlite3_column_* call repeats (the connection belongs to this thread alone) */
        sqlite3_value *v_seq = sqlite3_column_value(stmt, 0), *v_prev = sqlite3_column_value(stmt, 1),
                      *v_hash = sqlite3_column_value(stmt, 2), *v_body = sqlite3_column_value(stmt, 3);
        sqlite3_int64 seq = sqlite3_value_int64(v_seq);
        if (sqlite3_value_type(v_seq) != SQLITE_INTEGER || seq != st->last_seq + 1 ||
            sqlite3_value_type(v_prev) != SQLITE_TEXT ||
            sqlite3_value_type(v_hash) != SQLITE_TEXT ||
            sqlite3_value_type(v_body) != SQLITE_TEXT) {
            st->ok = 0;
            break;
        }
        const unsigned char *prev = sqlite3_value_text(v_prev);
        int prev_len = sqlite3_value_bytes(v_prev);
        const unsigned char *hash = sqlite3_value_text(v_hash);
        int hash_len = sqlite3_value_bytes(v_hash);
        const unsigned char *body = sqlite3_value_text(v_body);
        int body_len = sqlite3_value_bytes(v_body);
        if (prev_len != HASH_HEX || hash_len != HASH_HEX ||
            memcmp(prev, st->last_hash, HASH_HEX) != 0) {
            st->ok = 0;
            break;
        }
        char hex[HASH_HEX];
        record_hash_hex(prev, body, (size_t)body_len, hex);
        if (memcmp(hex, hash, HASH_HEX) != 0) {
            st->ok = 0;
            break;
        }
        st->last_seq = seq;
        memcpy(st->last_hash, hash, HASH_HEX);
    }
    if (st->ok && rc != SQLITE_DONE) {
        st->ok = 0;
        set_error(st, db, rc);
    }
    if (st->ok && st->last_seq != top)
        st->ok = 0; /* records missing at the end of the range */
done:
    sqlite3_finalize(stmt);
    sqlite3_close(db);
}

/* ------------------------------------------------------------------ report tallies
 * Values are kept in SQLite's terms, a type tag and the bytes, so that 443 and '443' stay
 * apart as they do in SQL and keys made of several columns never run into each other. */

#define TAG_NULL 'N'
#define TAG_INT 'I'
#define TAG_REAL 'F'
#define TAG_TEXT 'T'
#define TAG_BLOB 'B'

typedef struct {
    char *p;
    size_t n, cap;
} buf_t;

static inline int buf_put(buf_t *b, const void *data, size_t len)
{
    if (b->n + len > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->n + len)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (p == NULL)
            return -1;
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, data, len);
    b->n += len;
    return 0;
}

/* Append column `col` of the current row to `b` as tag + payload. The column's value is
 * fetched once and read with the sqlite3_value_* calls, which skip the per-call statement
 * checks of sqlite3_column_* (the connection belongs to this thread alone). */
static int enc_column(buf_t *b, sqlite3_stmt *stmt, int col)
{
    sqlite3_value *value = sqlite3_column_value(stmt, col);
    char tag;
    switch (sqlite3_value_type(value)) {
    case SQLITE_NULL:
        tag = TAG_NULL;
        return buf_put(b, &tag, 1);
    case SQLITE_INTEGER: {
        sqlite3_int64 v = sqlite3_value_int64(value);
        tag = TAG_INT;
        return buf_put(b, &tag, 1) || buf_put(b, &v, sizeof v);
    }
    case SQLITE_FLOAT: {
        double v = sqlite3_value_double(value);
        tag = TAG_REAL;
        return buf_put(b, &tag, 1) || buf_put(b, &v, sizeof v);
    }
    case SQLITE_BLOB: {
        const void *v = sqlite3_value_blob(value);
        uint32_t n = (uint32_t)sqlite3_value_bytes(value);
        tag = TAG_BLOB;
        return buf_put(b, &tag, 1) || buf_put(b, &n, sizeof n) || buf_put(b, v, n);
    }
    default: {
        const void *v = sqlite3_value_text(value);
        uint32_t n = (uint32_t)sqlite3_value_bytes(value);
        tag = TAG_TEXT;
        return buf_put(b, &tag, 1) || buf_put(b, &n, sizeof n) || buf_put(b, v, n);
    }
    }
}

/* Length of one encoded value starting at p. */
static size_t enc_len(const char *p)
{
    switch (p[0]) {
    case TAG_INT:
    case TAG_REAL:
        return 9;
    case TAG_TEXT:
    case TAG_BLOB: {
        uint32_t n;
        memcpy(&n, p + 1, sizeof n);
        return 5 + n;
    }
    default:
        return 1;
    }
}

/* An encoded INTEGER or REAL as a double, for comparing the two. */
static double enc_number(const char *p)
{
    if (p[0] == TAG_INT) {
        sqlite3_int64 v;
        memcpy(&v, p + 1, 8);
        return (double)v;
    }
    double d;
    memcpy(&d, p + 1, 8);
    return d;
}

/* SQLite's order for min()/max(): NULL < numbers < text (BINARY) < blobs. */
static int enc_cmp(const char *a, const char *b)
{
    static const int rank[256] = {[TAG_NULL] = 0, [TAG_INT] = 1, [TAG_REAL] = 1,
                                  [TAG_TEXT] = 2, [TAG_BLOB] = 3};
    int ra = rank[(unsigned char)a[0]], rb = rank[(unsigned char)b[0]];
    if (ra != rb)
        return ra < rb ? -1 : 1;
    if (ra == 1) {
        double x = enc_number(a), y = enc_number(b);
        return x < y ? -1 : x > y;
    }
    if (ra >= 2) {
        uint32_t na, nb;
        memcpy(&na, a + 1, 4);
        memcpy(&nb, b + 1, 4);
        int c = memcmp(a + 5, b + 5, na < nb ? na : nb);
        return c ? c : (na < nb ? -1 : na > nb);
    }
    return 0;
}

static PyObject *enc_to_python(const char *p)
{
    switch (p[0]) {
    case TAG_INT: {
        sqlite3_int64 v;
        memcpy(&v, p + 1, 8);
        return PyLong_FromLongLong(v);
    }
    case TAG_REAL: {
        double v;
        memcpy(&v, p + 1, 8);
        return PyFloat_FromDouble(v);
    }
    case TAG_TEXT:
    case TAG_BLOB: {
        uint32_t n;
        memcpy(&n, p + 1, 4);
        if (p[0] == TAG_BLOB)
            return PyBytes_FromStringAndSize(p + 5, n);
        return PyUnicode_DecodeUTF8(p + 5, n, "replace");
    }
    default:
        Py_RETURN_NONE;
    }
}

static uint64_t mix64(uint64_t h)
{
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    return h ^ (h >> 33);
}

static uint64_t hash_bytes(const char *p, size_t n)
{
    uint64_t h = 0x9e3779b97f4a7c15ULL ^ n;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        h = (h ^ v) * 0x100000001b3ULL;
        h ^= h >> 31;
        p += 8;
        n -= 8;
    }
    uint64_t v = 0;
    memcpy(&v, p, n);
    return mix64(h ^ v);
}

/* A distinct-set member: not NULL and not the empty string (as ledger.py's `values`). */
static int countable(const char *enc)
{
    return !(enc[0] == TAG_NULL || (enc[0] == TAG_TEXT && enc_len(enc) == 5));
}


/* A set of encoded values, emptied in O(1) by moving to a new generation: a slot of an
 * older generation counts as empty. */
typedef struct {
    uint64_t hash;
    size_t off;
    uint32_t len;
    uint32_t gen;
} slot_t;

typedef struct {
    slot_t *slots;
    size_t mask;
    size_t count;
    uint32_t gen;
    buf_t keys;
} vset_t;

static void vset_clear(vset_t *s)
{
    s->gen++;
    s->count = 0;
    s->keys.n = 0;
}

static int vset_grow(vset_t *s)
{
    size_t size = s->slots ? (s->mask + 1) * 2 : 256;
    slot_t *slots = calloc(size, sizeof *slots);
    if (slots == NULL)
        return -1;
    for (size_t i = 0; s->slots && i <= s->mask; i++) {
        if (s->slots[i].gen != s->gen)
            continue;
        size_t j = s->slots[i].hash & (size - 1);
        while (slots[j].gen == s->gen)
            j = (j + 1) & (size - 1);
        slots[j] = s->slots[i];
    }
    free(s->slots);
    s->slots = slots;
    s->mask = size - 1;
    return 0;
}

/* Add an encoded value: returns its slot, *added = 1 when new, NULL when out of memory. */
static slot_t *vset_add(vset_t *s, const char *v, uint32_t n, int *added)
{
    *added = 0;
    if (s->gen == 0)
        s->gen = 1;
    if (s->slots == NULL || (s->count + 1) * 2 > s->mask + 1) {
        if (vset_grow(s))
            return NULL;
    }
    uint64_t h = hash_bytes(v, n);
    size_t j = h & s->mask;
    while (s->slots[j].gen == s->gen) {
        slot_t *t = &s->slots[j];
        if (t->hash == h && t->len == n && memcmp(s->keys.p + t->off, v, n) == 0)
            return t;
        j = (j + 1) & s->mask;
    }
    slot_t *t = &s->slots[j];
    t->hash = h;
    t->off = s->keys.n;
    t->len = n;
    t->gen = s->gen;
    if (buf_put(&s->keys, v, n))
        return NULL;
    s->count++;
    *added = 1;
    return t;
}

/* Which distinct counts a kind feeds, as the SQL fallback in ledger.py: AI/ML tools and
 * kernel starts per (kind, subject); the other listed kinds per (kind, subject, detail,
 * extra). */
enum { KIND_NONE, KIND_TOOL, KIND_STARTED, KIND_OTHER };

static int kind_class(const char *enc)
{
    static const char *others[] = {"egress_blocked", "egress_allowed_ai", "output_flagged",
                                   "data_read", "model_artifact_written", "review_signed",
                                   "guard_defaults_used", NULL};
    if (enc[0] != TAG_TEXT)
        return KIND_NONE;
    uint32_t n;
    memcpy(&n, enc + 1, 4);
    const char *k = enc + 5;
    if (n == 12 && memcmp(k, "ai_ml_import", 12) == 0)
        return KIND_TOOL;
    if (n == 14 && memcmp(k, "kernel_started", 14) == 0)
        return KIND_STARTED;
    for (int i = 0; others[i]; i++)
        if (n == strlen(others[i]) && memcmp(k, others[i], n) == 0)
            return KIND_OTHER;
    return KIND_NONE;
}

typedef struct {
    buf_t row;       /* the current row, encoded */
    buf_t group;     /* key of the open group, then its first and last time */
    size_t group_key; /* length of that key; 0: no open group */
    sqlite3_int64 group_count;
    buf_t first, last;
    buf_t groups;    /* finished groups: key, first, last, i64 count */
    buf_t run;       /* key of the open distinct run */
    int run_open;
    buf_t seen;      /* kernel and notebook of the run's previous row: sorted within a group,
                        so repeats come together and need no lookup */
    uint32_t seen_kernel; /* length of the kernel part of `seen` */
    buf_t distinct;  /* finished runs: u32 key length, key, i64 kernels, i64 notebooks */
    vset_t run_kernels, run_notebooks, kernels, started, notebooks;
    int rc;
    char errmsg[256];
} tally_t;

static void tally_free(tally_t *t)
{
    buf_t *bufs[] = {&t->row, &t->group, &t->first, &t->last, &t->groups, &t->run,
                     &t->distinct, &t->seen};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++)
        free(bufs[i]->p);
    vset_t *sets[] = {&t->run_kernels, &t->run_notebooks, &t->kernels, &t->started,
                      &t->notebooks};
    for (size_t i = 0; i < sizeof sets / sizeof *sets; i++) {
        free(sets[i]->slots);
        free(sets[i]->keys.p);
    }
}

static int put_time(buf_t *b, const char *enc, int later)
{
    if (b->n && (later ? enc_cmp(enc, b->p) <= 0 : enc_cmp(enc, b->p) >= 0))
        return 0;
    b->n = 0;
    return buf_put(b, enc, enc_len(enc));
}

static int close_group(tally_t *t)
{
    static const char null = TAG_NULL;
    if (!t->group_key)
        return 0;
    int rc = buf_put(&t->groups, t->group.p, t->group_key) ||
             (t->first.n ? buf_put(&t->groups, t->first.p, t->first.n)
                         : buf_put(&t->groups, &null, 1)) ||
             (t->last.n ? buf_put(&t->groups, t->last.p, t->last.n)
                        : buf_put(&t->groups, &null, 1)) ||
             buf_put(&t->groups, &t->group_count, sizeof t->group_count);
    t->group_key = 0;
    return rc ? -1 : 0;
}

static int close_run(tally_t *t)
{
    if (!t->run_open)
        return 0;
    uint32_t n = (uint32_t)t->run.n;
    sqlite3_int64 k = (sqlite3_int64)t->run_kernels.count;
    sqlite3_int64 nb = (sqlite3_int64)t->run_notebooks.count;
    t->run_open = 0;
    vset_clear(&t->run_kernels);
    vset_clear(&t->run_notebooks);
    return (buf_put(&t->distinct, &n, sizeof n) || buf_put(&t->distinct, t->run.p, n) ||
            buf_put(&t->distinct, &k, sizeof k) || buf_put(&t->distinct, &nb, sizeof nb))
               ? -1
               : 0;
}

/* Columns of the tally query, in this order, sorted by the first seven. */
enum { T_KIND, T_SUBJECT, T_DETAIL, T_EXTRA, T_HOST, T_PLATFORM, T_USER, T_KERNEL, T_NOTEBOOK,
       T_TIME, T_END };

static int tally_row(tally_t *t, sqlite3_stmt *stmt)
{
    size_t at[T_END + 1];
    buf_t *r = &t->row;
    r->n = 0;
    for (int col = 0; col < T_END; col++) {
        at[col] = r->n;
        if (enc_column(r, stmt, col))
            return -1;
    }
    at[T_END] = r->n;
    const char *p = r->p;
    /* groups arrive one after another: no lookup, just "same key as the last row?" */
    size_t key = at[T_KERNEL];
    if (!t->group_key || t->group_key != key || memcmp(t->group.p, p, key) != 0) {
        if (close_group(t))
            return -1;
        t->group.n = t->first.n = t->last.n = 0;
        if (buf_put(&t->group, p, key))
            return -1;
        t->group_key = key;
        t->group_count = 0;
    }
    t->group_count++;
    const char *time = p + at[T_TIME];
    if (time[0] != TAG_NULL && (put_time(&t->first, time, 0) || put_time(&t->last, time, 1)))
        return -1;

    int cls = kind_class(p);
    size_t run = cls == KIND_OTHER ? at[T_HOST] : at[T_DETAIL];
    if (cls == KIND_NONE) {
        return close_run(t);
    }
    if (!t->run_open || t->run.n != run || memcmp(t->run.p, p, run) != 0) {
        if (close_run(t))
            return -1;
        t->run.n = 0;
        if (buf_put(&t->run, p, run))
            return -1;
        t->run_open = 1;
        t->seen.n = t->seen_kernel = 0;
    }
    int added;
    const char *kernel = p + at[T_KERNEL], *notebook = p + at[T_NOTEBOOK];
    uint32_t kernel_n = (uint32_t)(at[T_NOTEBOOK] - at[T_KERNEL]);
    uint32_t notebook_n = (uint32_t)(at[T_TIME] - at[T_NOTEBOOK]);
    int same_kernel = t->seen_kernel == kernel_n && memcmp(t->seen.p, kernel, kernel_n) == 0;
    int same_notebook = t->seen.n - t->seen_kernel == notebook_n &&
                        memcmp(t->seen.p + t->seen_kernel, notebook, notebook_n) == 0;
    if (!(same_kernel && same_notebook)) {
        t->seen.n = 0;
        if (buf_put(&t->seen, kernel, kernel_n + notebook_n))
            return -1;
        t->seen_kernel = kernel_n;
    }
    /* a value already counted in this run is already in the overall sets too */
    if (!same_kernel && countable(kernel)) {
        int fresh;
        if (!vset_add(&t->run_kernels, kernel, kernel_n, &fresh))
            return -1;
        if (fresh && cls != KIND_OTHER && !vset_add(&t->kernels, kernel, kernel_n, &added))
            return -1;
        if (fresh && cls == KIND_STARTED && !vset_add(&t->started, kernel, kernel_n, &added))
            return -1;
    }
    if (!same_notebook && countable(notebook)) {
        if (!vset_add(&t->run_notebooks, notebook, notebook_n, &added))
            return -1;
        if (added && !vset_add(&t->notebooks, notebook, notebook_n, &added))
            return -1;
    }
    return 0;
}

typedef struct {
    int type; /* SQLITE_INTEGER, SQLITE_FLOAT, SQLITE_TEXT or SQLITE_NULL */
    sqlite3_int64 i;
    double d;
    const char *s; /* UTF-8 kept alive by the caller's str objects */
    Py_ssize_t n;
} bind_t;

typedef struct {
    const char *sql;
    bind_t *binds;
    int nbinds;
} query_t;

/* Run the queries one after another into one tally: together they must return the rows in
 * report-index order, so that a group never spans two of them unless they are adjacent. */
static void tally_run(const char *path, int timeout_ms, const query_t *queries, int nqueries,
                      tally_t *t)
{
    sqlite3 *db = NULL;
    sqlite3_stmt *stmt = NULL;
    int rc = sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX, NULL);
    if (rc != SQLITE_OK)
        goto fail;
    sqlite3_busy_timeout(db, timeout_ms);
    sqlite3_exec(db, "PRAGMA mmap_size = 0", NULL, NULL, NULL); /* see scan_range */
    for (int q = 0; q < nqueries; q++) {
        rc = sqlite3_prepare_v2(db, queries[q].sql, -1, &stmt, NULL);
        if (rc != SQLITE_OK)
            goto fail;
        if (sqlite3_column_count(stmt) != T_END) {
            rc = SQLITE_MISUSE;
            snprintf(t->errmsg, sizeof t->errmsg, "a tally query must return %d columns",
                     T_END);
            t->rc = rc;
            goto done;
        }
        for (int i = 0; i < queries[q].nbinds; i++) {
            const bind_t *b = &queries[q].binds[i];
            if (b->type == SQLITE_INTEGER)
                rc = sqlite3_bind_int64(stmt, i + 1, b->i);
            else if (b->type == SQLITE_FLOAT)
                rc = sqlite3_bind_double(stmt, i + 1, b->d);
            else if (b->type == SQLITE_TEXT)
                rc = sqlite3_bind_text(stmt, i + 1, b->s, (int)b->n, SQLITE_STATIC);
            else
                rc = sqlite3_bind_null(stmt, i + 1);
            if (rc != SQLITE_OK)
                goto fail;
        }
        while ((rc = sqlite3_step(stmt)) == SQLITE_ROW) {
            if (tally_row(t, stmt)) {
                t->rc = SQLITE_NOMEM;
                snprintf(t->errmsg, sizeof t->errmsg, "out of memory");
                goto done;
            }
        }
        if (rc != SQLITE_DONE)
            goto fail;
        sqlite3_finalize(stmt);
        stmt = NULL;
    }
    if (close_group(t) || close_run(t)) {
        t->rc = SQLITE_NOMEM;
        snprintf(t->errmsg, sizeof t->errmsg, "out of memory");
    }
    goto done;
fail:
    t->rc = rc ? rc : SQLITE_ERROR;
    snprintf(t->errmsg, sizeof t->errmsg, "%s", db ? sqlite3_errmsg(db) : sqlite3_errstr(rc));
done:
    sqlite3_finalize(stmt);
    sqlite3_close(db);
}

/* A tuple of `size` items, the first `want` of them encoded values read from *p onwards
 * (advancing *p); the caller fills the rest. */
static PyObject *decode_values(const char **p, int want, int size)
{
    PyObject *tuple = PyTuple_New(size);
    if (tuple == NULL)
        return NULL;
    for (int i = 0; i < want; i++) {
        PyObject *v = enc_to_python(*p);
        if (v == NULL) {
            Py_DECREF(tuple);
            return NULL;
        }
        *p += enc_len(*p);
        PyTuple_SET_ITEM(tuple, i, v);
    }
    return tuple;
}

/* The values of a set, as a list. */
static PyObject *vset_list(vset_t *s)
{
    PyObject *list = PyList_New(0);
    for (size_t j = 0; list && s->slots && j <= s->mask; j++) {
        if (s->slots[j].gen != s->gen)
            continue;
        PyObject *v = enc_to_python(s->keys.p + s->slots[j].off);
        if (v == NULL || PyList_Append(list, v))
            Py_CLEAR(list);
        Py_XDECREF(v);
    }
    return list;
}

static PyObject *tally_result(tally_t *t)
{
    PyObject *groups = PyList_New(0), *distinct = PyList_New(0);
    PyObject *kernels = NULL, *started = NULL, *notebooks = NULL, *out = NULL;
    if (groups == NULL || distinct == NULL)
        goto done;
    for (const char *p = t->groups.p, *end = p + t->groups.n; p < end;) {
        PyObject *row = decode_values(&p, 9, 10); /* seven key columns, first, last, count */
        if (row == NULL)
            goto done;
        sqlite3_int64 count;
        memcpy(&count, p, sizeof count);
        p += sizeof count;
        PyObject *n = PyLong_FromLongLong(count);
        if (n == NULL) {
            Py_DECREF(row);
            goto done;
        }
        PyTuple_SET_ITEM(row, 9, n);
        if (PyList_Append(groups, row)) {
            Py_DECREF(row);
            goto done;
        }
        Py_DECREF(row);
    }
    for (const char *p = t->distinct.p, *end = p + t->distinct.n; p < end;) {
        uint32_t len;
        memcpy(&len, p, sizeof len);
        p += sizeof len;
        const char *key_end = p + len;
        PyObject *vals[4] = {NULL, NULL, NULL, NULL};
        int i = 0, bad = 0;
        for (; i < 4; i++) {
            if (p < key_end) {
                vals[i] = enc_to_python(p);
                p += enc_len(p);
            } else {
                Py_INCREF(Py_None);
                vals[i] = Py_None;
            }
            bad |= vals[i] == NULL;
        }
        sqlite3_int64 k, nb;
        memcpy(&k, p, sizeof k);
        memcpy(&nb, p + sizeof k, sizeof nb);
        p += sizeof k + sizeof nb;
        PyObject *row = bad ? NULL
                            : Py_BuildValue("(OOOOLL)", vals[0], vals[1], vals[2], vals[3],
                                            (long long)k, (long long)nb);
        for (i = 0; i < 4; i++)
            Py_XDECREF(vals[i]);
        if (row == NULL || PyList_Append(distinct, row)) {
            Py_XDECREF(row);
            goto done;
        }
        Py_DECREF(row);
    }
    kernels = vset_list(&t->kernels);
    started = vset_list(&t->started);
    notebooks = vset_list(&t->notebooks);
    if (kernels && started && notebooks)
        out = PyTuple_Pack(5, groups, distinct, kernels, started, notebooks);
done:
    Py_XDECREF(groups);
    Py_XDECREF(distinct);
    Py_XDECREF(kernels);
    Py_XDECREF(started);
    Py_XDECREF(notebooks);
    return out;
}

PyDoc_STRVAR(tally_doc,
             "tally(path, queries, timeout_ms) -> (groups, distinct, kernels, "
             "kernels_started, notebooks)\n\n"
             "Run the queries, (sql, params) pairs, one after the other (together: columns\n"
             "kind, subject, detail, extra, host, platform, user, kernel, notebook, time,\n"
             "ordered by the first seven) and tally what a report shows:\n"
             "groups (seven key columns, first, last, count), distinct kernels and notebooks\n"
             "per tool or per other listed kind (kind, subject, detail, extra, kernels,\n"
             "notebooks), and the lists of kernels that imported a tool or started, of those\n"
             "that started, and of the notebooks seen. Rows of a group arrive together, so\n"
             "only the sets need hashing; the GIL is released while rows are read.");

/* Fill a query from (sql, params); the strings stay owned by the Python objects. */
static int parse_query(PyObject *item, query_t *q)
{
    PyObject *params;
    if (!PyArg_ParseTuple(item, "sO", &q->sql, &params))
        return -1;
    PyObject *seq = PySequence_Fast(params, "params must be a sequence");
    if (seq == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    q->binds = calloc(n ? (size_t)n : 1, sizeof *q->binds);
    q->nbinds = (int)n;
    if (q->binds == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PySequence_Fast_GET_ITEM(seq, i);
        bind_t *b = &q->binds[i];
        if (v == Py_None) {
            b->type = SQLITE_NULL;
        } else if (PyLong_Check(v)) {
            b->type = SQLITE_INTEGER;
            b->i = PyLong_AsLongLong(v);
        } else if (PyFloat_Check(v)) {
            b->type = SQLITE_FLOAT;
            b->d = PyFloat_AsDouble(v);
        } else if (PyUnicode_Check(v)) {
            b->type = SQLITE_TEXT;
            b->s = PyUnicode_AsUTF8AndSize(v, &b->n);
        } else {
            PyErr_Format(PyExc_TypeError, "cannot bind a %s", Py_TYPE(v)->tp_name);
        }
        if (PyErr_Occurred()) {
            Py_DECREF(seq);
            return -1;
        }
    }
    Py_DECREF(seq); /* the values live on in the caller's params list */
    return 0;
}

static PyObject *tally(PyObject *self, PyObject *args)
{
    (void)self;
    const char *path;
    PyObject *queries_arg;
    int timeout_ms;
    if (!PyArg_ParseTuple(args, "sOi", &path, &queries_arg, &timeout_ms))
        return NULL;
    PyObject *list = PySequence_Fast(queries_arg, "queries must be a sequence");
    if (list == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(list);
    query_t *queries = calloc(n ? (size_t)n : 1, sizeof *queries);
    PyObject *out = NULL;
    if (queries == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (parse_query(PySequence_Fast_GET_ITEM(list, i), &queries[i]))
            goto done;
    tally_t t;
    memset(&t, 0, sizeof t);
    Py_BEGIN_ALLOW_THREADS
    tally_run(path, timeout_ms, queries, (int)n, &t);
    Py_END_ALLOW_THREADS
    if (t.rc == SQLITE_NOMEM)
        PyErr_NoMemory();
    else if (t.rc)
        PyErr_SetString(sqlite_error, t.errmsg);
    else
        out = tally_result(&t);
    tally_free(&t);
done:
    for (Py_ssize_t i = 0; queries && i < n; i++)
        free(queries[i].binds);
    free(queries);
    Py_DECREF(list);
    return out;
}

/* ------------------------------------------------------------------ appends
 * On two shared CPUs every microsecond a writer spends beside the lock slows the writer that
 * holds it, and Python's sqlite3 glue costs more than SQLite itself for a one-row append.
 * An Appender does the whole locked part of SQLiteLedger._store in C, without the GIL:
 * the same statements (BEGIN IMMEDIATE, read the head, INSERT, COMMIT), the same body and
 * hash as Ledger._chain, on its own connection with the same settings. */

typedef struct {
    PyObject_HEAD
    sqlite3 *db;
    sqlite3_stmt *begin, *head, *insert, *commit, *rollback;
    pid_t pid;
} AppenderObject;

static void appender_close(AppenderObject *a)
{
    if (a->db == NULL)
        return;
    if (a->pid == getpid()) { /* a forked child leaves its parent's handle alone */
        sqlite3_finalize(a->begin);
        sqlite3_finalize(a->head);
        sqlite3_finalize(a->insert);
        sqlite3_finalize(a->commit);
        sqlite3_finalize(a->rollback);
        sqlite3_close_v2(a->db);
    }
    a->db = NULL;
}

static void appender_dealloc(AppenderObject *a)
{
    appender_close(a);
    Py_TYPE(a)->tp_free((PyObject *)a);
}

static PyObject *appender_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"path", "timeout_ms", "synchronous", NULL};
    const char *path, *synchronous;
    int timeout_ms;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "sis", kwlist, &path, &timeout_ms,
                                     &synchronous))
        return NULL;
    if (strcmp(synchronous, "OFF") && strcmp(synchronous, "NORMAL") &&
        strcmp(synchronous, "FULL") && strcmp(synchronous, "EXTRA")) {
        PyErr_Format(PyExc_ValueError, "unknown synchronous setting %s", synchronous);
        return NULL;
    }
    AppenderObject *a = (AppenderObject *)type->tp_alloc(type, 0);
    if (a == NULL)
        return NULL;
    a->pid = getpid();
    char pragma[64];
    snprintf(pragma, sizeof pragma, "PRAGMA synchronous = %s", synchronous);
    int rc = sqlite3_open_v2(path, &a->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL);
    if (rc == SQLITE_OK) {
        sqlite3_busy_timeout(a->db, timeout_ms);
        rc = sqlite3_exec(a->db, pragma, NULL, NULL, NULL);
    }
    if (rc == SQLITE_OK)
        rc = sqlite3_exec(a->db, "PRAGMA wal_autocheckpoint = 0", NULL, NULL, NULL);
    struct {
        sqlite3_stmt **stmt;
        const char *sql;
    } stmts[] = {
        {&a->begin, "BEGIN IMMEDIATE"},
        {&a->head, "SELECT seq, hash FROM ledger_records ORDER BY seq DESC LIMIT 1"},
        {&a->insert, "INSERT INTO ledger_records (seq, prev, hash, body) VALUES (?, ?, ?, ?)"},
        {&a->commit, "COMMIT"},
        {&a->rollback, "ROLLBACK"},
    };
    for (size_t i = 0; rc == SQLITE_OK && i < sizeof stmts / sizeof *stmts; i++)
        rc = sqlite3_prepare_v3(a->db, stmts[i].sql, -1, SQLITE_PREPARE_PERSISTENT,
                                stmts[i].stmt, NULL);
    if (rc != SQLITE_OK) {
        PyErr_SetString(sqlite_error, a->db ? sqlite3_errmsg(a->db) : sqlite3_errstr(rc));
        Py_DECREF(a);
        return NULL;
    }
    return (PyObject *)a;
}

typedef struct {
    const char *head, *time;
    Py_ssize_t head_len, time_len;
    sqlite3_int64 seq;
    char prev[HASH_HEX], hash[HASH_HEX];
    char *body;
    size_t body_len;
} pending_t;

/* Step a statement that returns no row; SQLITE_OK or the error code. */
static int run(sqlite3_stmt *stmt)
{
    int rc = sqlite3_step(stmt);
    sqlite3_reset(stmt);
    return rc == SQLITE_DONE || rc == SQLITE_ROW ? SQLITE_OK : rc;
}

/* The locked part of an append, without the GIL. Returns SQLITE_OK or an error code. */
static int append_locked(AppenderObject *a, int lockfd, pending_t *ev, Py_ssize_t n)
{
    if (lockfd >= 0) {
        while (flock(lockfd, LOCK_EX) != 0) {
            if (errno != EINTR)
                return SQLITE_IOERR_LOCK;
        }
    }
    int rc = run(a->begin);
    if (rc != SQLITE_OK)
        goto unlock;
    sqlite3_int64 seq = 0;
    char prev[HASH_HEX];
    memset(prev, '0', HASH_HEX);
    rc = sqlite3_step(a->head);
    if (rc == SQLITE_ROW) {
        seq = sqlite3_column_int64(a->head, 0);
        const unsigned char *h = sqlite3_column_text(a->head, 1);
        if (h == NULL || sqlite3_column_bytes(a->head, 1) != HASH_HEX) {
            rc = SQLITE_CORRUPT;
        } else {
            memcpy(prev, h, HASH_HEX);
            rc = SQLITE_OK;
        }
    } else if (rc == SQLITE_DONE) {
        rc = SQLITE_OK;
    }
    sqlite3_reset(a->head);
    for (Py_ssize_t i = 0; rc == SQLITE_OK && i < n; i++) {
        pending_t *e = &ev[i];
        e->seq = ++seq;
        char tail[64];
        int tail_len = snprintf(tail, sizeof tail, ",\"seq\":%lld,\"time\":\"", (long long)seq);
        e->body_len = (size_t)e->head_len + (size_t)tail_len + (size_t)e->time_len + 2;
        e->body = malloc(e->body_len);
        if (e->body == NULL) {
            rc = SQLITE_NOMEM;
            break;
        }
        char *p = e->body;
        memcpy(p, e->head, (size_t)e->head_len);
        p += e->head_len;
        memcpy(p, tail, (size_t)tail_len);
        p += tail_len;
        memcpy(p, e->time, (size_t)e->time_len);
        p += e->time_len;
        memcpy(p, "\"}", 2);
        memcpy(e->prev, prev, HASH_HEX);
        record_hash_hex(prev, e->body, e->body_len, e->hash);
        memcpy(prev, e->hash, HASH_HEX);
        sqlite3_bind_int64(a->insert, 1, seq);
        sqlite3_bind_text(a->insert, 2, e->prev, HASH_HEX, SQLITE_STATIC);
        sqlite3_bind_text(a->insert, 3, e->hash, HASH_HEX, SQLITE_STATIC);
        sqlite3_bind_text(a->insert, 4, e->body, (int)e->body_len, SQLITE_STATIC);
        rc = run(a->insert);
        sqlite3_clear_bindings(a->insert);
    }
    if (rc == SQLITE_OK)
        rc = run(a->commit);
    if (rc != SQLITE_OK && !sqlite3_get_autocommit(a->db))
        run(a->rollback);
unlock:
    if (lockfd >= 0)
        flock(lockfd, LOCK_UN);
    return rc;
}

PyDoc_STRVAR(append_doc,
             "append(lockfd, events) -> [(seq, prev, hash, body), ...]\n\n"
             "Chain events, a list of (head, time) as Ledger._prepare makes them, after the\n"
             "head and commit them in one transaction, holding flock(lockfd) (none if < 0).");

static PyObject *appender_append(AppenderObject *a, PyObject *args)
{
    int lockfd;
    PyObject *events;
    if (!PyArg_ParseTuple(args, "iO", &lockfd, &events))
        return NULL;
    if (a->db == NULL || a->pid != getpid()) {
        PyErr_SetString(sqlite_error, "this appender is closed (or belongs to the parent)");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(events, "events must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    pending_t *ev = calloc(n ? (size_t)n : 1, sizeof *ev);
    if (ev == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    PyObject *out = NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            PyErr_SetString(PyExc_TypeError, "each event must be a (head, time) tuple");
            goto done;
        }
        ev[i].head = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(item, 0), &ev[i].head_len);
        ev[i].time = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(item, 1), &ev[i].time_len);
        if (ev[i].head == NULL || ev[i].time == NULL)
            goto done;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = append_locked(a, lockfd, ev, n);
    Py_END_ALLOW_THREADS
    if (rc != SQLITE_OK) {
        const char *msg = rc == SQLITE_IOERR_LOCK ? "cannot lock the ledger's lock file"
                          : rc == SQLITE_NOMEM     ? "out of memory"
                                                   : sqlite3_errmsg(a->db);
        PyErr_SetString(sqlite_error, msg && *msg ? msg : sqlite3_errstr(rc));
        goto done;
    }
    out = PyList_New(n);
    for (Py_ssize_t i = 0; out && i < n; i++) {
        PyObject *row = Py_BuildValue("(Ls#s#s#)", (long long)ev[i].seq, ev[i].prev,
                                      (Py_ssize_t)HASH_HEX, ev[i].hash, (Py_ssize_t)HASH_HEX,
                                      ev[i].body, (Py_ssize_t)ev[i].body_len);
        if (row == NULL)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, i, row);
    }
done:
    for (Py_ssize_t i = 0; i < n; i++)
        free(ev[i].body);
    free(ev);
    Py_DECREF(seq);
    return out;
}

static PyObject *appender_close_py(AppenderObject *a, PyObject *Py_UNUSED(ignored))
{
    appender_close(a);
    Py_RETURN_NONE;
}

static PyMethodDef appender_methods[] = {
    {"append", (PyCFunction)appender_append, METH_VARARGS, append_doc},
    {"close", (PyCFunction)appender_close_py, METH_NOARGS, "Close the connection."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject AppenderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "jupyter_dua_guard._chain_fast.Appender",
    .tp_basicsize = sizeof(AppenderObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Appender(path, timeout_ms, synchronous): SQLiteLedger's locked append in C.",
    .tp_new = appender_new,
    .tp_dealloc = (destructor)appender_dealloc,
    .tp_methods = appender_methods,
};

/* ------------------------------------------------------------------ relayed appends
 * A kernel's append through the server's relay (ledger_relay.RelayClient) in one call: the
 * frame out, the answer in, its rows parsed, every hash checked and the records built. In
 * Python this path runs several hundred bytecodes per event; between appends the relay and
 * PostgreSQL evict them from the caches, so a writer spent ~100 µs of CPU on what takes
 * ~20 µs warm. The wire format is ledger_relay's: a 4-byte big-endian length, then lines
 * "time\thead" joined by "\n"; the answer is lines "seq\tprev\thash", or "!message". */

#define RELAY_MAX_ANSWER (64u * 1024 * 1024) /* as ledger_relay._MAX_MESSAGE */
#define RELAY_FIRST_READ 16384                /* one event's answer is ~150 bytes */

/* Record keys and event fields, interned once. */
static PyObject *k_head, *k_time, *k_parts, *k_context, *k_data, *k_kind, *k_seq, *k_prev,
    *k_hash;

typedef struct {
    PyObject *head, *time, *parts; /* strong references; parts NULL when absent or empty */
    const char *head_s, *time_s;
    Py_ssize_t head_len, time_len;
    long long seq;
    const char *prev, *hash; /* the answer's fields (not NUL-terminated) */
    size_t prev_len, hash_len;
} relayed_t;

/* One send() (sending) or recv() on fd, the GIL released around it. A signal (EINTR) runs
 * Python's handlers first, as socket.sendall does; an exception from one ends the call.
 * -1 with an exception set (OSError with EAGAIN: SO_SNDTIMEO / SO_RCVTIMEO ran out). */
static ssize_t relay_io(int fd, char *p, size_t n, int sending)
{
    for (;;) {
        ssize_t k;
        int err = 0;
        Py_BEGIN_ALLOW_THREADS
        /* MSG_NOSIGNAL: EPIPE as an error, never SIGPIPE */
        k = sending ? send(fd, p, n, MSG_NOSIGNAL) : recv(fd, p, n, 0);
        if (k < 0)
            err = errno; /* before taking the GIL back */
        Py_END_ALLOW_THREADS
        if (k >= 0)
            return k;
        if (err == EINTR) {
            if (PyErr_CheckSignals() < 0)
                return -1;
            continue;
        }
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
}

/* send() all of p. */
static int relay_send_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t k = relay_io(fd, (char *)p, n, 1);
        if (k < 0)
            return -1;
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

/* One recv() of up to n bytes (>0); 0 when the peer closed, which is an error here
 * (ConnectionError, as ledger_relay says it). */
static ssize_t relay_recv(int fd, char *p, size_t n)
{
    ssize_t k = relay_io(fd, p, n, 0);
    if (k == 0) {
        PyErr_SetString(PyExc_ConnectionError, "connection closed");
        return -1;
    }
    return k;
}

static int relay_recv_exact(int fd, char *p, size_t n)
{
    while (n > 0) {
        ssize_t k = relay_recv(fd, p, n);
        if (k < 0)
            return -1;
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

/* Read one answer frame. Returns its payload, in `first` when it fits there, else in a
 * buffer put in *owned (the caller frees it); NULL with an exception set on failure. */
static const char *relay_read_frame(int fd, char *first, size_t *size, char **owned)
{
    ssize_t got = relay_recv(fd, first, RELAY_FIRST_READ);
    if (got < 0)
        return NULL;
    if (got < 4 && relay_recv_exact(fd, first + got, 4 - (size_t)got) < 0)
        return NULL;
    if (got < 4)
        got = 4;
    const unsigned char *h = (const unsigned char *)first;
    uint32_t n = (uint32_t)h[0] << 24 | (uint32_t)h[1] << 16 | (uint32_t)h[2] << 8 | h[3];
    if (n > RELAY_MAX_ANSWER) {
        PyErr_Format(PyExc_ConnectionError, "message of %u bytes", (unsigned)n);
        return NULL;
    }
    *size = n;
    size_t have = (size_t)got - 4; /* anything past this frame is the peer's error: dropped */
    if (have >= n)
        return first + 4;
    char *buf = malloc(n);
    if (buf == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    memcpy(buf, first + 4, have);
    if (relay_recv_exact(fd, buf + have, n - have) < 0) {
        free(buf);
        return NULL;
    }
    *owned = buf;
    return buf;
}

/* Split the answer into ev[i]'s seq/prev/hash: exactly n lines of exactly three
 * tab-separated fields, seq in decimal digits. 0, or -1 when malformed. */
static int relay_parse(const char *p, size_t size, relayed_t *ev, Py_ssize_t n)
{
    const char *end = p + size;
    for (Py_ssize_t i = 0; i < n; i++) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        if (eol == NULL)
            eol = end;
        if ((eol == end) != (i == n - 1))
            return -1; /* fewer or more lines than events */
        const char *t1 = memchr(p, '\t', (size_t)(eol - p));
        const char *t2 = t1 ? memchr(t1 + 1, '\t', (size_t)(eol - t1 - 1)) : NULL;
        if (t2 == NULL || memchr(t2 + 1, '\t', (size_t)(eol - t2 - 1)) != NULL)
            return -1;
        if (t1 == p || t1 - p > 18)
            return -1; /* no seq, or more digits than a bigint has */
        long long seq = 0;
        for (const char *d = p; d < t1; d++) {
            if (*d < '0' || *d > '9')
                return -1;
            seq = seq * 10 + (*d - '0');
        }
        ev[i].seq = seq;
        ev[i].prev = t1 + 1;
        ev[i].prev_len = (size_t)(t2 - t1 - 1);
        ev[i].hash = t2 + 1;
        ev[i].hash_len = (size_t)(eol - t2 - 1);
        p = eol + 1;
    }
    return 0;
}

/* The stored body, as Ledger._chain writes it: head + ',"seq":N,"time":"T"}'. */
static int relay_body(buf_t *b, const relayed_t *e)
{
    char tail[48];
    int tail_len = snprintf(tail, sizeof tail, ",\"seq\":%lld,\"time\":\"", e->seq);
    b->n = 0;
    return buf_put(b, e->head_s, (size_t)e->head_len) || buf_put(b, tail, (size_t)tail_len) ||
           buf_put(b, e->time_s, (size_t)e->time_len) || buf_put(b, "\"}", 2);
}

static int set_item_steal(PyObject *dict, PyObject *key, PyObject *value)
{
    if (value == NULL)
        return -1;
    int rc = PyDict_SetItem(dict, key, value);
    Py_DECREF(value);
    return rc;
}

/* The record as Ledger._stored builds it: from the event's parts (ctx, data_json, kind)
 * when it has them, else from its body. */
static PyObject *relay_record(const relayed_t *e, PyObject *prev, PyObject *hash,
                              PyObject *loads, buf_t *body)
{
    PyObject *rec;
    if (e->parts != NULL) {
        if (!PyTuple_Check(e->parts) || PyTuple_GET_SIZE(e->parts) != 3) {
            PyErr_SetString(PyExc_TypeError, "an event's parts must be (ctx, data_json, kind)");
            return NULL;
        }
        PyObject *ctx = PyTuple_GET_ITEM(e->parts, 0);
        rec = PyDict_New();
        if (rec == NULL)
            return NULL;
        if (set_item_steal(rec, k_context,
                           PyDict_CheckExact(ctx)
                               ? PyDict_Copy(ctx)
                               : PyObject_CallOneArg((PyObject *)&PyDict_Type, ctx)) ||
            set_item_steal(rec, k_data, PyObject_CallOneArg(loads, PyTuple_GET_ITEM(e->parts, 1))) ||
            PyDict_SetItem(rec, k_kind, PyTuple_GET_ITEM(e->parts, 2)) ||
            set_item_steal(rec, k_seq, PyLong_FromLongLong(e->seq)) ||
            PyDict_SetItem(rec, k_time, e->time))
            goto fail;
    } else {
        if (relay_body(body, e))
            return PyErr_NoMemory();
        PyObject *text = PyUnicode_DecodeUTF8(body->p, (Py_ssize_t)body->n, "strict");
        if (text == NULL)
            return NULL;
        rec = PyObject_CallOneArg(loads, text);
        Py_DECREF(text);
        if (rec == NULL)
            return NULL;
        if (!PyDict_Check(rec)) {
            PyErr_SetString(PyExc_TypeError, "a record's body must be a JSON object");
            goto fail;
        }
    }
    if (PyDict_SetItem(rec, k_prev, prev) || PyDict_SetItem(rec, k_hash, hash))
        goto fail;
    return rec;
fail:
    Py_DECREF(rec);
    return NULL;
}

/* A field of the answer as str; NULL without an exception set when it is not UTF-8
 * (a malformed answer, as ledger_relay's decode() failing). */
static PyObject *relay_field(const char *p, size_t n)
{
    PyObject *s = PyUnicode_DecodeUTF8(p, (Py_ssize_t)n, "strict");
    if (s == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
        PyErr_Clear();
    return s;
}

static PyObject *relay_malformed(void)
{
    Py_RETURN_NONE;
}

/* After the round trip: parse, check every hash, build the records (GIL held). */
static PyObject *relay_answer(const char *ans, size_t size, relayed_t *ev, Py_ssize_t n,
                              PyObject *loads)
{
    if (size > 0 && ans[0] == '!')
        return PyUnicode_DecodeUTF8(ans + 1, (Py_ssize_t)size - 1, "replace");
    if (n == 0) /* as ledger_relay: no events, and an empty answer, is no rows */
        return size == 0 ? PyList_New(0) : relay_malformed();
    if (relay_parse(ans, size, ev, n) < 0)
        return relay_malformed();
    PyObject **fields = calloc(2 * (size_t)n, sizeof *fields); /* prev, hash of each row */
    if (fields == NULL)
        return PyErr_NoMemory();
    PyObject *out = NULL;
    buf_t body = {0};
    /* Decode every row before checking any hash: a malformed answer is told apart from a
     * wrong hash exactly as ledger_relay's parse-then-verify does. */
    for (Py_ssize_t i = 0; i < n; i++) {
        fields[2 * i] = relay_field(ev[i].prev, ev[i].prev_len);
        fields[2 * i + 1] = fields[2 * i] ? relay_field(ev[i].hash, ev[i].hash_len) : NULL;
        if (fields[2 * i + 1] == NULL) {
            if (!PyErr_Occurred())
                out = relay_malformed();
            goto done;
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        char hex[HASH_HEX];
        if (relay_body(&body, &ev[i])) {
            PyErr_NoMemory();
            goto done;
        }
        record_hash_hex_n(ev[i].prev, ev[i].prev_len, body.p, body.n, hex);
        if (ev[i].hash_len != HASH_HEX || memcmp(hex, ev[i].hash, HASH_HEX) != 0) {
            out = PyLong_FromLongLong(ev[i].seq);
            goto done;
        }
    }
    out = PyList_New(n);
    for (Py_ssize_t i = 0; out != NULL && i < n; i++) {
        PyObject *rec = relay_record(&ev[i], fields[2 * i], fields[2 * i + 1], loads, &body);
        if (rec == NULL)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, i, rec);
    }
done:
    for (Py_ssize_t i = 0; i < 2 * n; i++)
        Py_XDECREF(fields[i]);
    free(fields);
    free(body.p);
    return out;
}

/* Take each prepared event's head, time and parts (new references). */
static int relay_events(PyObject *seq, relayed_t *ev, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *event = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyDict_Check(event)) {
            PyErr_SetString(PyExc_TypeError, "each prepared event must be a dict");
            return -1;
        }
        PyObject *key[2] = {k_head, k_time}, *val[2];
        for (int j = 0; j < 2; j++) {
            val[j] = PyDict_GetItemWithError(event, key[j]);
            if (val[j] == NULL) {
                if (!PyErr_Occurred())
                    PyErr_SetObject(PyExc_KeyError, key[j]);
                return -1;
            }
        }
        Py_INCREF(val[0]);
        Py_INCREF(val[1]);
        ev[i].head = val[0];
        ev[i].time = val[1];
        ev[i].head_s = PyUnicode_AsUTF8AndSize(val[0], &ev[i].head_len);
        ev[i].time_s = PyUnicode_AsUTF8AndSize(val[1], &ev[i].time_len);
        if (ev[i].head_s == NULL || ev[i].time_s == NULL)
            return -1;
        PyObject *parts = PyDict_GetItemWithError(event, k_parts);
        if (parts == NULL && PyErr_Occurred())
            return -1;
        int truth = parts == NULL ? 0 : PyObject_IsTrue(parts);
        if (truth < 0)
            return -1;
        if (truth) {
            Py_INCREF(parts);
            ev[i].parts = parts;
        }
    }
    return 0;
}

PyDoc_STRVAR(relay_store_doc,
             "relay_store(fd, prepared, loads) -> list[dict] | str | int | None\n\n"
             "Send prepared events (dicts with head, time and maybe parts) to the relay on the\n"
             "connected socket fd, read its answer and check every hash. Returns the records\n"
             "as Ledger._stored builds them (loads is json.loads); the relay's message for a\n"
             "'!' answer; the seq of the first record whose hash is not the client's; or\n"
             "None for a malformed answer. Socket errors, timeouts (the socket's\n"
             "SO_RCVTIMEO/SO_SNDTIMEO) and a closed connection raise OSError. The GIL is\n"
             "released around each send() and recv().");

static PyObject *relay_store(PyObject *self, PyObject *args)
{
    (void)self;
    int fd;
    PyObject *prepared, *loads;
    if (!PyArg_ParseTuple(args, "iOO", &fd, &prepared, &loads))
        return NULL;
    PyObject *seq = PySequence_Fast(prepared, "prepared must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    relayed_t *ev = calloc(n ? (size_t)n : 1, sizeof *ev);
    char *payload = NULL, *owned = NULL, *first = NULL;
    PyObject *out = NULL;
    if (ev == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (relay_events(seq, ev, n) < 0)
        goto done;
    /* The frame: length, then "time\thead" lines joined by "\n". */
    size_t len = n > 0 ? (size_t)n - 1 : 0;
    for (Py_ssize_t i = 0; i < n; i++)
        len += (size_t)ev[i].time_len + 1 + (size_t)ev[i].head_len;
    if (len > UINT32_MAX) {
        errno = EMSGSIZE;
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    payload = malloc(4 + len);
    first = malloc(RELAY_FIRST_READ);
    if (payload == NULL || first == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    unsigned char *p = (unsigned char *)payload;
    *p++ = (unsigned char)(len >> 24);
    *p++ = (unsigned char)(len >> 16);
    *p++ = (unsigned char)(len >> 8);
    *p++ = (unsigned char)len;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i > 0)
            *p++ = '\n';
        memcpy(p, ev[i].time_s, (size_t)ev[i].time_len);
        p += ev[i].time_len;
        *p++ = '\t';
        memcpy(p, ev[i].head_s, (size_t)ev[i].head_len);
        p += ev[i].head_len;
    }
    if (relay_send_all(fd, payload, 4 + len) < 0)
        goto done;
    size_t size = 0;
    const char *ans = relay_read_frame(fd, first, &size, &owned);
    if (ans == NULL)
        goto done;
    out = relay_answer(ans, size, ev, n, loads);
done:
    for (Py_ssize_t i = 0; ev != NULL && i < n; i++) {
        Py_XDECREF(ev[i].head);
        Py_XDECREF(ev[i].time);
        Py_XDECREF(ev[i].parts);
    }
    free(ev);
    free(payload);
    free(first);
    free(owned);
    Py_DECREF(seq);
    return out;
}

/* ------------------------------------------------------------------ module */

PyDoc_STRVAR(scan_doc,
             "scan(path, after, top, prev_hash, timeout_ms) -> (ok, last_seq, last_hash)\n\n"
             "Check ledger records after+1..top, the first linking to prev_hash; on a break,\n"
             "ok is False and last_seq/last_hash name the last good record.");

static PyObject *scan(PyObject *self, PyObject *args)
{
    const char *path, *prev_hash;
    Py_ssize_t prev_len;
    long long after, top;
    int timeout_ms;
    if (!PyArg_ParseTuple(args, "sLLs#i", &path, &after, &top, &prev_hash, &prev_len,
                          &timeout_ms))
        return NULL;
    if (prev_len != HASH_HEX) {
        PyErr_SetString(PyExc_ValueError, "prev_hash must be 64 hex digits");
        return NULL;
    }
    scan_state st;
    memset(&st, 0, sizeof st);
    st.last_seq = after;
    memcpy(st.last_hash, prev_hash, HASH_HEX);
    Py_BEGIN_ALLOW_THREADS
    scan_range(path, timeout_ms, after, top, &st);
    Py_END_ALLOW_THREADS
    if (st.rc != 0 && st.rc != SQLITE_DONE) {
        PyErr_SetString(sqlite_error, st.errmsg);
        return NULL;
    }
    return Py_BuildValue("(OLs#)", st.ok ? Py_True : Py_False, (long long)st.last_seq,
                         st.last_hash, (Py_ssize_t)HASH_HEX);
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, scan_doc},
    {"tally", tally, METH_VARARGS, tally_doc},
    {"relay_store", relay_store, METH_VARARGS, relay_store_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_chain_fast", "The append fast paths and the SQLite ledger's fast chain walk.", -1,
    methods,
};

PyMODINIT_FUNC PyInit__chain_fast(void)
{
    PyObject *sqlite3_mod = PyImport_ImportModule("sqlite3");
    if (sqlite3_mod == NULL)
        return NULL;
    sqlite_error = PyObject_GetAttrString(sqlite3_mod, "OperationalError");
    Py_DECREF(sqlite3_mod);
    if (sqlite_error == NULL)
        return NULL;
    if (PyType_Ready(&AppenderType) < 0)
        return NULL;
    struct {
        PyObject **key;
        const char *name;
    } keys[] = {{&k_head, "head"}, {&k_time, "time"}, {&k_parts, "parts"},
                {&k_context, "context"}, {&k_data, "data"}, {&k_kind, "kind"},
                {&k_seq, "seq"}, {&k_prev, "prev"}, {&k_hash, "hash"}};
    for (size_t i = 0; i < sizeof keys / sizeof *keys; i++)
        if ((*keys[i].key = PyUnicode_InternFromString(keys[i].name)) == NULL)
            return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&AppenderType);
    if (PyModule_AddObject(m, "Appender", (PyObject *)&AppenderType) < 0) {
        Py_DECREF(&AppenderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

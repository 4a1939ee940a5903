/* Optional fast path for walking the SQLite ledger's hash chain.
 *
 * A records report closes with a full verification of the chain, and at a million records
 * the Python walk spends most of its time turning rows into Python objects. This module
 * reads the rows with SQLite's C API and hashes them with OpenSSL (the same libraries
 * Python's sqlite3 and hashlib use), with the GIL released, so two threads check two
 * halves of the chain on two cores. It only answers "is this range intact, and where does
 * it stop being so"; naming what is wrong stays in Python (ledger.diagnose_rows).
 */
#define PY_SSIZE_T_CLEAN
#define OPENSSL_SUPPRESS_DEPRECATED
#include <Python.h>
#include <openssl/sha.h>
#include <sqlite3.h>
#include <string.h>

#define HASH_HEX 64

static const char HEX[] = "0123456789abcdef";

static PyObject *sqlite_error; /* sqlite3.OperationalError, so callers handle one kind */

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
    /* Read pages in place instead of copying each one out of the page cache. */
    sqlite3_exec(db, "PRAGMA mmap_size = 1073741824", NULL, NULL, NULL);
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
        sqlite3_int64 seq = sqlite3_column_int64(stmt, 0);
        if (sqlite3_column_type(stmt, 0) != SQLITE_INTEGER || seq != st->last_seq + 1 ||
            sqlite3_column_type(stmt, 1) != SQLITE_TEXT ||
            sqlite3_column_type(stmt, 2) != SQLITE_TEXT ||
            sqlite3_column_type(stmt, 3) != SQLITE_TEXT) {
            st->ok = 0;
            break;
        }
        const unsigned char *prev = sqlite3_column_text(stmt, 1);
        int prev_len = sqlite3_column_bytes(stmt, 1);
        const unsigned char *hash = sqlite3_column_text(stmt, 2);
        int hash_len = sqlite3_column_bytes(stmt, 2);
        const unsigned char *body = sqlite3_column_text(stmt, 3);
        int body_len = sqlite3_column_bytes(stmt, 3);
        if (prev_len != HASH_HEX || hash_len != HASH_HEX ||
            memcmp(prev, st->last_hash, HASH_HEX) != 0) {
            st->ok = 0;
            break;
        }
        /* The low-level interface: OpenSSL 3's one-shot SHA256() looks the digest up in
         * its provider tables on every call, which costs more than hashing a record. */
        SHA256_CTX ctx;
        unsigned char digest[SHA256_DIGEST_LENGTH];
        SHA256_Init(&ctx);
        SHA256_Update(&ctx, prev, HASH_HEX);
        SHA256_Update(&ctx, "\n", 1);
        SHA256_Update(&ctx, body, (size_t)body_len);
        SHA256_Final(digest, &ctx);
        char hex[HASH_HEX];
        for (int i = 0; i < SHA256_DIGEST_LENGTH; i++) {
            hex[2 * i] = HEX[digest[i] >> 4];
            hex[2 * i + 1] = HEX[digest[i] & 15];
        }
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
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_chain_fast", "Fast hash-chain walk for SQLite ledgers.", -1,
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
    return PyModule_Create(&module);
}

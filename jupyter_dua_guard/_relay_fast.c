/* The append relay's loop in C (see ledger_relay.py, which keeps the same loop in Python).
 *
 * The Python loop costs 65-100 microseconds of interpretation per event, more than the
 * database spends storing it; this one costs a few. It is the same loop: one pthread around
 * epoll, reading kernels' frames from the Unix socket that Python made (and checked), and
 * handing everything queued to whichever libpq connection is free as ONE ``submit`` call
 * with two text[] parameters, then answering each kernel with its slice of the three result
 * arrays. The thread never holds the GIL on this path. It takes it only to have Python word
 * a failure (explain(): connection errors, an error result, the schema check after each
 * (re)connect), so messages stay the ones ledger_pg writes, in one place.
 *
 * Every buffer is bounded: a frame above 64 MiB drops its client, and a request arriving
 * while 256 MiB wait already is answered with an error (its kernel spools). Clients may go
 * away while their requests wait; they are reference-counted and freed only after the
 * current round of epoll events, so no event ever points at freed memory.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <libpq-fe.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define MAX_MESSAGE (64u * 1024 * 1024) /* as _MAX_MESSAGE in ledger_relay.py */
#define MAX_BATCH 1000                  /* events per database call */
#define MAX_QUEUED ((size_t)256 * 1024 * 1024)
#define READ_CHUNK 65536
#define KEEP_CAPACITY (1u << 20) /* larger buffers are freed once used */
#define DOWN_SECONDS 5.0
#define REASON_MAX 1024
#define SEND_TIMEOUT_S 5

enum { T_LISTEN, T_WAKE, T_CLIENT, T_LINK };

typedef struct {
    char *p;
    size_t len, cap;
} buf;

typedef struct client {
    int type; /* T_CLIENT: first member of everything registered with epoll */
    int fd;
    int refs; /* the loop's own (until dropped) + one per request waiting */
    int dead;
    buf in;
    struct client *prev, *next; /* live clients, for shutdown */
    struct client *grave;       /* freed after the current epoll round */
} client;

typedef struct req {
    struct req *next;
    client *c;
    uint32_t n; /* events */
    size_t size;
    char payload[]; /* "time\thead" lines joined by "\n" */
} req;

typedef struct relay relay;

typedef struct {
    int type; /* T_LINK */
    int fd;
    PGconn *conn;
    req *head, *tail; /* the batch in flight; head == NULL: free */
    size_t events;
    int flushing;
    int decided;        /* an outcome of the call in flight is known */
    PGresult *rows;     /* the result carrying submit's arrays */
    int link_failed;
    char error[REASON_MAX];
    buf heads, times; /* the two text[] literals */
} link_t;

struct relay {
    PyObject_HEAD
    int type_listen, type_wake; /* epoll tags */
    int listen_fd, wake_fd, ep;
    pthread_t thread;
    int started;
    int stopping;
    char *conninfo, *setup_sql, *meta_sql, *call_sql;
    PyObject *explain; /* explain(kind, message, sqlstate) -> (text, link_failed) */
    link_t *links;
    int nlinks;
    req *qhead, *qtail;
    size_t queued_bytes;
    double down_until;
    char down_why[REASON_MAX];
    uint64_t calls, events; /* read by Python without a lock (atomic loads) */
    client *clients, *graveyard;
    buf out;
    /* the parsed result arrays of one call */
    const char **cell;
    size_t *cell_len;
    size_t cells_cap;
};

static uid_t my_uid;

/* ------------------------------------------------------------------ small helpers */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static int buf_reserve(buf *b, size_t extra) {
    if (b->len + extra <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

/* After a batch: keep the usual capacity, give back what one huge request made us take. */
static void buf_reset(buf *b) {
    b->len = 0;
    if (b->cap > KEEP_CAPACITY) {
        free(b->p);
        b->p = NULL;
        b->cap = 0;
    }
}

static void copy_reason(char *dst, const char *src) {
    snprintf(dst, REASON_MAX, "%s", src ? src : "");
}

/* ------------------------------------------------------------------ wording (Python) */

/* Python words a failure; the fallback (Python unusable) is libpq's first line. Sets
 * *link_failed when Python says the link itself failed. Holds the GIL only here. */
static void explain(relay *r, const char *kind, const char *message, PyObject *rows,
                    const char *state, char *out, int *link_failed) {
    const char *msg = message ? message : "the relay could not word what failed";
    size_t n = strcspn(msg, "\n");
    snprintf(out, REASON_MAX, "%.*s", (int)(n < REASON_MAX ? n : REASON_MAX - 1), msg);
    if (link_failed) *link_failed = 1;
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *arg = rows;
    if (!arg) arg = message ? PyBytes_FromString(message) : (Py_INCREF(Py_None), Py_None);
    else Py_INCREF(arg);
    PyObject *res = arg ? PyObject_CallFunction(r->explain, "sOs", kind, arg, state ? state : "")
                        : NULL;
    Py_XDECREF(arg);
    const char *text;
    if (res && PyTuple_Check(res) && PyTuple_GET_SIZE(res) == 2 &&
        (text = PyUnicode_AsUTF8(PyTuple_GET_ITEM(res, 0))) != NULL) {
        snprintf(out, REASON_MAX, "%s", text);
        if (link_failed) *link_failed = PyObject_IsTrue(PyTuple_GET_ITEM(res, 1)) == 1;
    }
    Py_XDECREF(res);
    PyErr_Clear(); /* a wording bug must not stop the relay: the fallback is said */
    PyGILState_Release(g);
}

/* ------------------------------------------------------------------ clients */

static void client_unref(relay *r, client *c) {
    if (--c->refs == 0) {
        c->grave = r->graveyard;
        r->graveyard = c;
    }
}

static void drop_client(relay *r, client *c) {
    if (c->dead) return;
    c->dead = 1;
    epoll_ctl(r->ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    free(c->in.p);
    c->in.p = NULL;
    c->in.len = c->in.cap = 0;
    if (c->prev) c->prev->next = c->next;
    else r->clients = c->next;
    if (c->next) c->next->prev = c->prev;
    client_unref(r, c);
}

static void bury(relay *r) {
    while (r->graveyard) {
        client *c = r->graveyard;
        r->graveyard = c->grave;
        free(c);
    }
}

/* One framed answer, sent whole (blocking, bounded by SO_SNDTIMEO) or the client dropped. */
static void send_frame(relay *r, client *c, const char *payload, size_t size) {
    if (c->dead) return;
    unsigned char head[4] = {(unsigned char)(size >> 24), (unsigned char)(size >> 16),
                             (unsigned char)(size >> 8), (unsigned char)size};
    struct iovec iov[2] = {{head, 4}, {(void *)payload, size}};
    struct msghdr mh = {0};
    mh.msg_iov = iov;
    mh.msg_iovlen = 2;
    while (mh.msg_iovlen) {
        ssize_t sent = sendmsg(c->fd, &mh, MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR) continue;
            drop_client(r, c);
            return;
        }
        while (mh.msg_iovlen && (size_t)sent >= mh.msg_iov[0].iov_len) {
            sent -= (ssize_t)mh.msg_iov[0].iov_len;
            mh.msg_iov++;
            mh.msg_iovlen--;
        }
        if (mh.msg_iovlen) {
            mh.msg_iov[0].iov_base = (char *)mh.msg_iov[0].iov_base + sent;
            mh.msg_iov[0].iov_len -= (size_t)sent;
        }
    }
}

static void send_text(relay *r, client *c, const char *text) {
    send_frame(r, c, text, strlen(text));
}

static void accept_clients(relay *r) {
    for (;;) {
        int fd = accept4(r->listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) return; /* EAGAIN (the listener is non-blocking) or a transient error */
        struct ucred cred;
        socklen_t len = sizeof cred;
        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || cred.uid != my_uid) {
            close(fd); /* only this user's processes may append through the relay */
            continue;
        }
        /* Blocking with a send timeout: a kernel that stops reading is dropped. */
        struct timeval tv = {SEND_TIMEOUT_S, 0};
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        client *c = calloc(1, sizeof *c);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (!c || epoll_ctl(r->ep, EPOLL_CTL_ADD, fd, &ev) != 0) {
            free(c);
            close(fd);
            continue;
        }
        c->type = T_CLIENT;
        c->fd = fd;
        c->refs = 1;
        c->next = r->clients;
        if (r->clients) r->clients->prev = c;
        r->clients = c;
    }
}

/* A request's events, or 0 when a line has no tab (malformed). */
static uint32_t count_events(const char *p, size_t size) {
    uint32_t n = 0;
    const char *end = p + size;
    for (;;) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *line_end = nl ? nl : end;
        if (!memchr(p, '\t', (size_t)(line_end - p))) return 0;
        n++;
        if (!nl) return n;
        p = nl + 1;
    }
}

static void enqueue(relay *r, client *c, const char *payload, size_t size) {
    uint32_t n = count_events(payload, size);
    if (n == 0) {
        send_text(r, c, "!malformed request");
        return;
    }
    req *q = r->queued_bytes + size <= MAX_QUEUED ? malloc(sizeof *q + size) : NULL;
    if (!q) {
        send_text(r, c, "!the relay could not store the events: the relay is overloaded");
        return;
    }
    memcpy(q->payload, payload, size);
    q->next = NULL;
    q->c = c;
    q->n = n;
    q->size = size;
    c->refs++;
    r->queued_bytes += size;
    if (r->qtail) r->qtail->next = q;
    else r->qhead = q;
    r->qtail = q;
}

static void read_client(relay *r, client *c) {
    buf *b = &c->in;
    if (buf_reserve(b, READ_CHUNK) != 0) {
        drop_client(r, c);
        return;
    }
    ssize_t got = recv(c->fd, b->p + b->len, READ_CHUNK, MSG_DONTWAIT);
    if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return;
    if (got <= 0) {
        drop_client(r, c);
        return;
    }
    b->len += (size_t)got;
    size_t at = 0;
    while (b->len - at >= 4) {
        const unsigned char *h = (const unsigned char *)b->p + at;
        uint32_t size = (uint32_t)h[0] << 24 | (uint32_t)h[1] << 16 | (uint32_t)h[2] << 8 | h[3];
        if (size > MAX_MESSAGE) {
            drop_client(r, c);
            return;
        }
        if (b->len - at < 4 + (size_t)size) break;
        enqueue(r, c, b->p + at + 4, size);
        if (c->dead) return;
        at += 4 + (size_t)size;
    }
    if (at) {
        memmove(b->p, b->p + at, b->len - at);
        b->len -= at;
    }
    if (b->len == 0 && b->cap > KEEP_CAPACITY) buf_reset(b);
}

/* ------------------------------------------------------------------ database links */

static void ignore_notice(void *arg, const char *message) {
    (void)arg;
    (void)message; /* libpq's default would print to the server's stderr */
}

static void drop_link(relay *r, link_t *l) {
    if (!l->conn) return;
    if (l->fd >= 0) epoll_ctl(r->ep, EPOLL_CTL_DEL, l->fd, NULL);
    PQfinish(l->conn);
    l->conn = NULL;
    l->fd = -1;
    l->flushing = 0;
}

static void note_down(relay *r, const char *why) {
    copy_reason(r->down_why, why);
    r->down_until = now_s() + DOWN_SECONDS;
}

#define SUBMIT_STATEMENT "dua_guard_submit" /* prepared on each connection */

/* Connect, bound the statements' waits, check the schema (Python words the verdict).
 * 0, or -1 with the reason in ``why``. */
static int connect_link(relay *r, link_t *l, char *why) {
    PGconn *conn = PQconnectdb(r->conninfo);
    if (!conn || PQstatus(conn) != CONNECTION_OK) {
        explain(r, "connect", conn ? PQerrorMessage(conn) : "out of memory", NULL, NULL, why,
                NULL);
        PQfinish(conn);
        return -1;
    }
    PQsetNoticeProcessor(conn, ignore_notice, NULL);
    PGresult *res = PQexec(conn, r->setup_sql); /* timeouts, and whether the schema exists */
    int ok = PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1 &&
             PQnfields(res) == 3;
    if (!ok) {
        explain(r, "connect", PQerrorMessage(conn), NULL, NULL, why, NULL);
        PQclear(res);
        PQfinish(conn);
        return -1;
    }
    int has_schema = strcmp(PQgetvalue(res, 0, 2), "t") == 0;
    PQclear(res);
    PGresult *meta = has_schema ? PQexec(conn, r->meta_sql) : NULL;
    int failed = 0;
    if (meta && PQresultStatus(meta) != PGRES_TUPLES_OK) {
        explain(r, "schema_unreadable", PQerrorMessage(conn), NULL, NULL, why, NULL);
        failed = 1;
    } else {
        PyGILState_STATE g = PyGILState_Ensure();
        PyObject *rows = meta ? PyList_New(0) : (Py_INCREF(Py_None), Py_None);
        for (int i = 0; rows && meta && i < PQntuples(meta) && PQnfields(meta) == 2; i++) {
            PyObject *row = Py_BuildValue("(yy)", PQgetvalue(meta, i, 0), PQgetvalue(meta, i, 1));
            if (!row || PyList_Append(rows, row) != 0) Py_CLEAR(rows);
            Py_XDECREF(row);
        }
        PyErr_Clear();
        PyGILState_Release(g);
        if (!rows) {
            copy_reason(why, "out of memory");
            failed = 1;
        } else {
            explain(r, "schema", NULL, rows, NULL, why, NULL);
            failed = why[0] != '\0';
            g = PyGILState_Ensure();
            Py_DECREF(rows);
            PyGILState_Release(g);
        }
    }
    PQclear(meta);
    if (!failed && has_schema) { /* parsed and resolved once per connection, not per call */
        PGresult *prep = PQprepare(conn, SUBMIT_STATEMENT, r->call_sql, 2, NULL);
        if (PQresultStatus(prep) != PGRES_COMMAND_OK) {
            explain(r, "connect", PQerrorMessage(conn), NULL, NULL, why, NULL);
            failed = 1;
        }
        PQclear(prep);
    }
    if (failed) {
        PQfinish(conn);
        return -1;
    }
    l->conn = conn;
    l->fd = PQsocket(conn);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = l};
    if (PQsetnonblocking(conn, 1) != 0 || epoll_ctl(r->ep, EPOLL_CTL_ADD, l->fd, &ev) != 0) {
        copy_reason(why, "the relay could not watch its database connection");
        PQfinish(conn);
        l->conn = NULL;
        l->fd = -1;
        return -1;
    }
    return 0;
}

/* ``{"a","b"}`` with backslash and double quote escaped: a text[] literal. */
static int array_open(buf *b) {
    if (buf_reserve(b, 1) != 0) return -1;
    b->p[b->len++] = '{';
    return 0;
}

static int array_add(buf *b, const char *p, size_t n) {
    if (buf_reserve(b, 2 * n + 4) != 0) return -1;
    char *o = b->p + b->len;
    if (o[-1] != '{') *o++ = ',';
    *o++ = '"';
    for (size_t i = 0; i < n; i++) {
        char ch = p[i];
        if (ch == '\\' || ch == '"') *o++ = '\\';
        *o++ = ch;
    }
    *o++ = '"';
    b->len = (size_t)(o - b->p);
    return 0;
}

static int array_close(buf *b) {
    if (buf_reserve(b, 2) != 0) return -1;
    b->p[b->len++] = '}';
    b->p[b->len] = '\0'; /* libpq takes text parameters as C strings */
    return 0;
}

static int build_params(link_t *l) {
    buf_reset(&l->heads);
    buf_reset(&l->times);
    if (array_open(&l->heads) || array_open(&l->times)) return -1;
    for (req *q = l->head; q; q = q->next) {
        const char *p = q->payload, *end = q->payload + q->size;
        for (;;) {
            const char *nl = memchr(p, '\n', (size_t)(end - p));
            const char *line_end = nl ? nl : end;
            const char *tab = memchr(p, '\t', (size_t)(line_end - p));
            if (array_add(&l->times, p, (size_t)(tab - p)) ||
                array_add(&l->heads, tab + 1, (size_t)(line_end - tab - 1)))
                return -1;
            if (!nl) break;
            p = nl + 1;
        }
    }
    return array_close(&l->heads) || array_close(&l->times) ? -1 : 0;
}

static void fail_reqs(relay *r, req *q, const char *why) {
    char message[REASON_MAX + 64];
    snprintf(message, sizeof message, "!the relay could not store the events: %s", why);
    while (q) {
        req *next = q->next;
        send_text(r, q->c, message);
        client_unref(r, q->c);
        free(q);
        q = next;
    }
}

static void watch_link(relay *r, link_t *l, int out) {
    struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.ptr = l};
    epoll_ctl(r->ep, EPOLL_CTL_MOD, l->fd, &ev);
}

/* Send the batch now on l (l->head..tail) as one submit call, or answer it with why not. */
static void start_call(relay *r, link_t *l) {
    char why[REASON_MAX];
    req *batch = l->head;
    if (now_s() < r->down_until) {
        l->head = l->tail = NULL;
        fail_reqs(r, batch, r->down_why);
        return;
    }
    if (!l->conn && connect_link(r, l, why) != 0) {
        note_down(r, why);
        l->head = l->tail = NULL;
        fail_reqs(r, batch, why);
        return;
    }
    if (build_params(l) != 0) {
        l->head = l->tail = NULL;
        fail_reqs(r, batch, "the relay ran out of memory");
        return;
    }
    const char *values[2] = {l->heads.p, l->times.p};
    int rc = PQsendQueryPrepared(l->conn, SUBMIT_STATEMENT, 2, values, NULL, NULL, 0);
    int flushed = rc ? PQflush(l->conn) : -1;
    if (flushed < 0) {
        explain(r, "lost", PQerrorMessage(l->conn), NULL, NULL, why, NULL);
        drop_link(r, l); /* the next call connects afresh */
        l->head = l->tail = NULL;
        fail_reqs(r, batch, why);
        return;
    }
    l->flushing = flushed == 1; /* the rest of a large batch goes out when writable */
    if (l->flushing) watch_link(r, l, 1);
    l->decided = 0;
    l->rows = NULL;
    l->link_failed = 0;
    l->error[0] = '\0';
    buf_reset(&l->heads);
    buf_reset(&l->times);
}

/* Give every free connection what has queued (all of it, up to a batch); a batch answered
 * at once (database down) leaves its connection free for the next one. */
static void dispatch(relay *r) {
    for (int i = 0; i < r->nlinks; i++) {
        link_t *l = &r->links[i];
        while (!l->head && r->qhead) {
            size_t events = 0;
            while (r->qhead && (events == 0 || events + r->qhead->n <= MAX_BATCH)) {
                req *q = r->qhead;
                r->qhead = q->next;
                if (!r->qhead) r->qtail = NULL;
                r->queued_bytes -= q->size;
                q->next = NULL;
                if (l->tail) l->tail->next = q;
                else l->head = q;
                l->tail = q;
                events += q->n;
            }
            l->events = events;
            start_call(r, l);
        }
    }
}

/* ``{a,b,c}`` split in place into r->cell[from..from+count); the count, or -1. */
static long split_array(relay *r, const char *text, size_t from, size_t limit) {
    size_t n = strlen(text);
    if (n < 2 || text[0] != '{' || text[n - 1] != '}') return -1;
    if (n == 2) return 0;
    const char *p = text + 1, *end = text + n - 1;
    long count = 0;
    for (;;) {
        const char *comma = memchr(p, ',', (size_t)(end - p));
        const char *e = comma ? comma : end;
        if ((size_t)count >= limit) return -1;
        r->cell[from + count] = p;
        r->cell_len[from + count] = (size_t)(e - p);
        count++;
        if (!comma) return count;
        p = comma + 1;
    }
}

static int is_integer(const char *p, size_t n) {
    if (n && *p == '-') p++, n--;
    if (!n) return 0;
    for (size_t i = 0; i < n; i++)
        if (p[i] < '0' || p[i] > '9') return 0;
    return 1;
}

/* Answer every request of the finished call on l, in order, from submit's three arrays. */
static void answer(relay *r, link_t *l) {
    req *batch = l->head;
    size_t events = l->events;
    PGresult *rows = l->rows;
    l->head = l->tail = NULL;
    l->rows = NULL;
    const char *error = l->error[0] ? l->error : NULL;
    long counts[3] = {-1, -1, -1};
    if (rows) {
        size_t need = 3 * (events + 1);
        if (r->cells_cap < need) {
            const char **cell = realloc(r->cell, need * sizeof *cell);
            if (cell) r->cell = cell;
            size_t *len = realloc(r->cell_len, need * sizeof *len);
            if (len) r->cell_len = len;
            if (cell && len) r->cells_cap = need;
        }
        for (int k = 0; k < 3 && r->cells_cap >= need; k++) {
            const char *v = PQgetisnull(rows, 0, k) ? "{}" : PQgetvalue(rows, 0, k);
            counts[k] = split_array(r, v, (size_t)k * (events + 1), events + 1);
        }
        int ok = counts[0] >= 0 && counts[0] == counts[1] && counts[1] == counts[2];
        for (long i = 0; ok && i < counts[0]; i++) ok = is_integer(r->cell[i], r->cell_len[i]);
        if (!ok) error = "the submit procedure answered in an unexpected form";
        else if ((size_t)counts[0] != events) error = "the submit procedure answered for other events";
    } else if (!error) {
        error = "the submit procedure answered for other events";
    }
    if (error) {
        char why[REASON_MAX];
        copy_reason(why, error);
        if (!rows && l->link_failed) {
            note_down(r, why);
            drop_link(r, l);
        }
        PQclear(rows);
        fail_reqs(r, batch, why);
        return;
    }
    __atomic_add_fetch(&r->calls, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&r->events, events, __ATOMIC_RELAXED);
    /* The next batch goes to the database before these kernels are woken: on a loaded
     * machine a woken kernel may take the CPU before the loop gets back to dispatching. */
    dispatch(r);
    size_t at = 0, base1 = events + 1, base2 = 2 * (events + 1);
    for (req *q = batch; q;) {
        buf *o = &r->out;
        o->len = 0;
        for (uint32_t i = 0; i < q->n; i++, at++) {
            size_t a = r->cell_len[at], b = r->cell_len[base1 + at], c = r->cell_len[base2 + at];
            if (buf_reserve(o, a + b + c + 3) != 0) {
                o->len = 0;
                break;
            }
            char *w = o->p + o->len;
            if (i) *w++ = '\n';
            memcpy(w, r->cell[at], a), w += a;
            *w++ = '\t';
            memcpy(w, r->cell[base1 + at], b), w += b;
            *w++ = '\t';
            memcpy(w, r->cell[base2 + at], c), w += c;
            o->len = (size_t)(w - o->p);
        }
        if (o->len) send_frame(r, q->c, o->p, o->len);
        else send_text(r, q->c, "!the relay could not store the events: out of memory");
        req *next = q->next;
        client_unref(r, q->c);
        free(q);
        q = next;
    }
    buf_reset(&r->out);
    PQclear(rows);
}

/* One result of the call in flight: the first usable one decides, as _parse_submit_result. */
static void take_result(relay *r, link_t *l, PGresult *res) {
    ExecStatusType st = PQresultStatus(res);
    if (!l->decided && st == PGRES_TUPLES_OK && PQntuples(res) == 1 && PQnfields(res) == 3) {
        l->decided = 1;
        l->rows = res;
        return;
    }
    if (!l->decided && st == PGRES_FATAL_ERROR) {
        l->decided = 1;
        const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
        explain(r, "error", PQresultErrorMessage(res), NULL, state ? state : "", l->error,
                &l->link_failed);
    }
    PQclear(res);
}

static void link_event(relay *r, link_t *l, uint32_t events) {
    char why[REASON_MAX];
    if (l->flushing && (events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) {
        int rc = PQflush(l->conn);
        if (rc == 0) {
            l->flushing = 0;
            watch_link(r, l, 0);
        } else if (rc < 0) {
            goto lost;
        }
    }
    if (!(events & (EPOLLIN | EPOLLERR | EPOLLHUP))) return;
    if (!l->head) {
        /* Idle: a server going away says so here; take the link down quietly, and the
         * next call connects afresh. */
        if (!PQconsumeInput(l->conn) || PQstatus(l->conn) != CONNECTION_OK) drop_link(r, l);
        else
            while (!PQisBusy(l->conn)) {
                PGresult *res = PQgetResult(l->conn);
                if (!res) break;
                PQclear(res);
            }
        return;
    }
    if (!PQconsumeInput(l->conn)) goto lost;
    while (!PQisBusy(l->conn)) {
        PGresult *res = PQgetResult(l->conn);
        if (!res) {
            if (!l->decided) {
                copy_reason(l->error, "the database closed the connection");
                l->link_failed = 1;
            }
            answer(r, l);
            return;
        }
        take_result(r, l, res);
    }
    return;
lost:
    explain(r, "lost", PQerrorMessage(l->conn), NULL, NULL, why, NULL);
    PQclear(l->rows);
    l->rows = NULL;
    copy_reason(l->error, why);
    l->link_failed = 1;
    answer(r, l);
}

/* ------------------------------------------------------------------ the loop */

static void shutdown_relay(relay *r) {
    for (int i = 0; i < r->nlinks; i++) {
        link_t *l = &r->links[i];
        req *batch = l->head;
        l->head = l->tail = NULL;
        PQclear(l->rows);
        l->rows = NULL;
        fail_reqs(r, batch, "the relay stopped");
        drop_link(r, l);
        free(l->heads.p);
        free(l->times.p);
        l->heads = l->times = (buf){0};
    }
    req *queued = r->qhead;
    r->qhead = r->qtail = NULL;
    fail_reqs(r, queued, "the relay stopped");
    while (r->clients) drop_client(r, r->clients);
    bury(r);
    free(r->out.p);
    r->out = (buf){0};
}

static void *run(void *arg) {
    relay *r = arg;
    struct epoll_event evs[64];
    char why[REASON_MAX];
    for (int i = 0; i < r->nlinks; i++)
        if (connect_link(r, &r->links[i], why) != 0) break; /* retried on first use */
    while (!__atomic_load_n(&r->stopping, __ATOMIC_ACQUIRE)) {
        int n = epoll_wait(r->ep, evs, 64, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            break; /* cannot happen with a valid epoll fd */
        }
        for (int i = 0; i < n; i++) {
            int type = *(int *)evs[i].data.ptr;
            if (type == T_LISTEN) {
                accept_clients(r);
            } else if (type == T_WAKE) {
                uint64_t v;
                if (read(r->wake_fd, &v, sizeof v) < 0) { /* nothing to do: level-triggered */
                }
            } else if (type == T_CLIENT) {
                client *c = evs[i].data.ptr;
                if (!c->dead) read_client(r, c);
            } else {
                link_t *l = evs[i].data.ptr;
                if (l->conn) link_event(r, l, evs[i].events);
            }
        }
        dispatch(r);
        bury(r);
    }
    shutdown_relay(r);
    return NULL;
}

/* ------------------------------------------------------------------ Python type */

static char *dup_str(const char *s) {
    size_t n = strlen(s) + 1;
    char *p = malloc(n);
    if (p) memcpy(p, s, n);
    return p;
}

static void relay_stop(relay *r) {
    if (!r->started) return;
    __atomic_store_n(&r->stopping, 1, __ATOMIC_RELEASE);
    uint64_t one = 1;
    if (write(r->wake_fd, &one, sizeof one) < 0) { /* the flag is checked each round anyway */
    }
    Py_BEGIN_ALLOW_THREADS /* the loop may need the GIL to word a last failure */
    pthread_join(r->thread, NULL);
    Py_END_ALLOW_THREADS
    r->started = 0;
}

static void relay_dealloc(relay *r) {
    relay_stop(r);
    if (r->ep >= 0) close(r->ep);
    if (r->wake_fd >= 0) close(r->wake_fd);
    free(r->links);
    free(r->conninfo);
    free(r->setup_sql);
    free(r->meta_sql);
    free(r->call_sql);
    free(r->cell);
    free(r->cell_len);
    Py_XDECREF(r->explain);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static PyObject *relay_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"listen_fd", "conninfo", "setup_sql", "meta_sql", "call_sql",
                             "connections", "explain", NULL};
    int listen_fd, connections;
    const char *conninfo, *setup_sql, *meta_sql, *call_sql;
    PyObject *explain_cb;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "issssiO", kwlist, &listen_fd, &conninfo,
                                     &setup_sql, &meta_sql, &call_sql, &connections,
                                     &explain_cb))
        return NULL;
    if (!PyCallable_Check(explain_cb)) return PyErr_Format(PyExc_TypeError, "explain: callable");
    if (connections < 1 || connections > 64)
        return PyErr_Format(PyExc_ValueError, "connections must be between 1 and 64");
    relay *r = (relay *)type->tp_alloc(type, 0);
    if (!r) return NULL;
    r->ep = r->wake_fd = -1;
    r->type_listen = T_LISTEN;
    r->type_wake = T_WAKE;
    r->listen_fd = listen_fd;
    Py_INCREF(explain_cb);
    r->explain = explain_cb;
    r->nlinks = connections;
    r->links = calloc((size_t)connections, sizeof *r->links);
    r->conninfo = dup_str(conninfo);
    r->setup_sql = dup_str(setup_sql);
    r->meta_sql = dup_str(meta_sql);
    r->call_sql = dup_str(call_sql);
    if (!r->links || !r->conninfo || !r->setup_sql || !r->meta_sql || !r->call_sql) {
        Py_DECREF(r);
        return PyErr_NoMemory();
    }
    for (int i = 0; i < connections; i++) {
        r->links[i].type = T_LINK;
        r->links[i].fd = -1;
    }
    r->ep = epoll_create1(EPOLL_CLOEXEC);
    r->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    struct epoll_event el = {.events = EPOLLIN, .data.ptr = &r->type_listen};
    struct epoll_event ew = {.events = EPOLLIN, .data.ptr = &r->type_wake};
    if (r->ep < 0 || r->wake_fd < 0 || epoll_ctl(r->ep, EPOLL_CTL_ADD, listen_fd, &el) != 0 ||
        epoll_ctl(r->ep, EPOLL_CTL_ADD, r->wake_fd, &ew) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(r);
        return NULL;
    }
    int err = pthread_create(&r->thread, NULL, run, r);
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(r);
        return NULL;
    }
    r->started = 1;
    return (PyObject *)r;
}

static PyObject *relay_stats(relay *r, PyObject *unused) {
    (void)unused;
    return Py_BuildValue("{sKsK}", "calls",
                         (unsigned long long)__atomic_load_n(&r->calls, __ATOMIC_RELAXED),
                         "events",
                         (unsigned long long)__atomic_load_n(&r->events, __ATOMIC_RELAXED));
}

static PyObject *relay_close(relay *r, PyObject *unused) {
    (void)unused;
    relay_stop(r);
    Py_RETURN_NONE;
}

static PyMethodDef relay_methods[] = {
    {"stats", (PyCFunction)relay_stats, METH_NOARGS,
     "{'calls', 'events'} stored through the relay so far."},
    {"close", (PyCFunction)relay_close, METH_NOARGS,
     "Stop the loop: waiting kernels are told, connections closed (not the listener)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RelayType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "jupyter_dua_guard._relay_fast.Relay",
    .tp_basicsize = sizeof(relay),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Relay(listen_fd, conninfo, setup_sql, meta_sql, call_sql, connections, explain)"
              ": serve the listening socket from a C thread until close().",
    .tp_new = relay_new,
    .tp_dealloc = (destructor)relay_dealloc,
    .tp_methods = relay_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_relay_fast",
    "The PostgreSQL ledger's append relay loop in C (see ledger_relay.py).", -1, NULL,
};

PyMODINIT_FUNC PyInit__relay_fast(void) {
    my_uid = getuid();
    if (PyType_Ready(&RelayType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&RelayType);
    if (PyModule_AddObject(m, "Relay", (PyObject *)&RelayType) < 0) {
        Py_DECREF(&RelayType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

/*
 * mirror/_fastpath.c: the mirror's data-path hot loops (docs/mirror.md, "Fast path").
 *
 * Only bytes move here; policy stays in Python (core.py, replica_server.py):
 *
 * DataPath (frontend): reads FUSE requests, fans plain WRITEs out to the replica
 *   connections of the write set with request ids, sends plain READs to the read
 *   replica, matches replies (in order per connection, ids checked) and answers
 *   FUSE. It keeps the bookkeeping every write needs: the in-flight ranges
 *   (overlap serialisation), the activity-log counters, the dirty maps of
 *   replicas that miss writes, and held completions while Python holds the gate.
 *   A request C may not take on its own (Python cleared `fast`, an overlap, a
 *   cold activity-log extent, any other opcode) goes to Python's slow callback;
 *   replies to Python's own requests go to `on_reply`; connection failures and
 *   error statuses to `on_error`, which must detach the link.
 *
 * replica_apply (replica): applies the plain WRITEs and READs at the front of a
 *   received buffer with pwrite/pread, without the GIL, and stops at the first
 *   request Python must see.
 *
 * Wire formats: docs/mirror.md ("Wire protocol") and the FUSE kernel ABI 7.41.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <endian.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define REQ_BYTES 32
#define REP_BYTES 16
#define MAX_PAYLOAD ((uint64_t)8 << 20)
#define INBUF_BYTES (MAX_PAYLOAD + 65536)
#define W_WRITE 2
#define W_READ 3
#define W_DISCARD 5
#define W_WRITE_ZEROES 6

#define FUSE_IN_BYTES 40
#define FUSE_RW_END 80 /* in header + fuse_write_in / fuse_read_in */
#define FUSE_READ 15
#define FUSE_WRITE 16

#define MAX_LINKS 16
/* epoll data of our own fds: not a plausible fd number, so Python's fds never collide */
#define TAG_BASE 0x5A000000u
#define TAG_MASK 0xFFFFF000u
#define TAG_FUSE (TAG_BASE | 0xFFFu)
#define DRAIN_BATCH 64
#define MAX_EVENTS 64

enum { K_FREE = 0, K_WRITE = 1, K_READ = 2 };
enum { RP_NONE, RP_WRITE, RP_DATA };
enum { MODE_ACK = 0, MODE_FAIL = 1, MODE_DROP = 2 };

static inline uint32_t ld32(const char *p) { uint32_t v; memcpy(&v, p, 4); return le32toh(v); }
static inline uint64_t ld64(const char *p) { uint64_t v; memcpy(&v, p, 8); return le64toh(v); }
static inline void st32(char *p, uint32_t v) { v = htole32(v); memcpy(p, &v, 4); }
static inline void st64(char *p, uint64_t v) { v = htole64(v); memcpy(p, &v, 8); }

static void pack_req(char *p, uint32_t len, int op, int flags, uint64_t rid, uint64_t off, uint32_t count)
{
    st32(p, len);
    p[4] = (char)op;
    p[5] = (char)flags;
    p[6] = p[7] = 0;
    st64(p + 8, rid);
    st64(p + 16, off);
    st32(p + 24, count);
    st32(p + 28, 0);
}

static double mono_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ------------------------------------------------------------------ structures */

typedef struct {
    uint64_t rid;
    double t;
    int32_t op;     /* >= 0: index of a C op; -1: a Python op in py */
    PyObject *py;   /* owned reference */
} Pend;

typedef struct {
    int fd;         /* -1: detached */
    uint32_t conn;  /* bumped by attach/detach: callbacks may change the link under us */
    int want_out;
    int queued;     /* in the flush queue */
    char *out;
    size_t out_off, out_len, out_cap;
    PyObject *inbuf; /* bytearray of INBUF_BYTES, kept for the DataPath's life */
    size_t fill;
    Pend *ring;
    size_t rcap, rhead, rlen;
} Link;

typedef struct {
    uint64_t unique, offset, length, token;
    int32_t remaining; /* acks still needed; -1 once failed */
    int32_t refs;      /* ring entries naming this op */
    uint32_t r0, r1, e0, e1;
    uint8_t kind, wop, done, released;
    int32_t next_free;
} COp;

typedef struct {
    uint64_t start, end, token;
} Busy;

typedef struct {
    uint64_t unique, length;
    uint8_t wop;
} Held;

typedef struct {
    PyObject_HEAD
    uint64_t size;
    int rshift, eshift;
    uint64_t regions, extents;
    int epfd;
    int fuse_fd;
    Py_buffer fbuf;
    int has_fbuf;
    PyObject *slow_cb, *reply_cb, *on_reply, *on_error;
    int reply_fd;
    int fast, hold, destroyed;
    uint64_t next_rid;
    Link links[MAX_LINKS];
    int wslots[MAX_LINKS];
    int nw, rslot;
    Py_buffer missing[MAX_LINKS];
    int nmissing;
    COp *ops;
    int32_t ops_cap, free_head, live_ops;
    Busy *busy;
    size_t nbusy, busy_cap;
    uint64_t next_token;
    uint32_t *al_count;
    uint8_t *al_hot;
    uint64_t *al_stamp;
    uint64_t al_clock, al_nhot;
    Held *held;
    size_t nheld, held_cap;
    int flushq[MAX_LINKS];
    int nflush;
    int depth;
    uint64_t py_calls; /* calls into Python (callbacks, deferred errors): poll stops spinning */
    PyObject *exc_type, *exc_value, *exc_tb; /* first error raised inside a loop */
    uint64_t st_fast_writes, st_fast_reads, st_slow, st_fuse_reads, st_sends, st_recvs, st_polls,
        st_replies, st_completions;
} DataPath;

/* ------------------------------------------------------------------ errors */

/* Loops keep going when a callback raises: the state stays consistent, and the
 * first exception is raised when the outermost call returns. */
static void defer_exc(DataPath *self)
{
    self->py_calls++;
    if (self->exc_type == NULL)
        PyErr_Fetch(&self->exc_type, &self->exc_value, &self->exc_tb);
    else
        PyErr_WriteUnraisable((PyObject *)self);
}

static void enter(DataPath *self) { self->depth++; }

static PyObject *leave(DataPath *self, PyObject *ret)
{
    self->depth--;
    if (self->depth == 0 && self->exc_type != NULL) {
        Py_XDECREF(ret);
        PyErr_Restore(self->exc_type, self->exc_value, self->exc_tb);
        self->exc_type = self->exc_value = self->exc_tb = NULL;
        return NULL;
    }
    if (ret == NULL && !PyErr_Occurred())
        PyErr_SetString(PyExc_SystemError, "_fastpath: NULL without an error");
    return ret;
}

static void defer_oserror(DataPath *self, int err, const char *what)
{
    errno = err;
    PyErr_SetFromErrnoWithFilename(PyExc_OSError, what);
    defer_exc(self);
}

/* ------------------------------------------------------------------ FUSE replies */

static void fuse_reply(DataPath *self, uint64_t unique, int32_t err, int kind, const char *data, size_t len)
{
    self->st_replies++;
    if (self->reply_fd >= 0) {
        char hdr[24];
        struct iovec iov[2];
        int n = 1;
        size_t total = 16;
        if (kind == RP_WRITE) {
            st32(hdr + 16, (uint32_t)len);
            st32(hdr + 20, 0);
            total = 24;
        }
        iov[0].iov_base = hdr;
        iov[0].iov_len = total;
        if (kind == RP_DATA && len) {
            iov[1].iov_base = (void *)data;
            iov[1].iov_len = len;
            n = 2;
            total += len;
        }
        st32(hdr, (uint32_t)total);
        st32(hdr + 4, (uint32_t)err);
        st64(hdr + 8, unique);
        for (;;) {
            if (writev(self->reply_fd, iov, n) >= 0)
                return;
            if (errno == EINTR)
                continue;
            if (errno == ENOENT) /* the request was interrupted meanwhile */
                return;
            if (errno == ENODEV) {
                self->destroyed = 1;
                return;
            }
            defer_oserror(self, errno, "reply to /dev/fuse");
            return;
        }
    }
    if (self->reply_cb == NULL || self->reply_cb == Py_None)
        return;
    PyObject *payload;
    if (kind == RP_WRITE)
        payload = PyLong_FromSize_t(len);
    else if (kind == RP_DATA)
        payload = PyBytes_FromStringAndSize(data, (Py_ssize_t)len);
    else
        payload = Py_NewRef(Py_None);
    if (payload == NULL) {
        defer_exc(self);
        return;
    }
    self->py_calls++;
    PyObject *r = PyObject_CallFunction(self->reply_cb, "KiO", (unsigned long long)unique, (int)err, payload);
    Py_DECREF(payload);
    if (r == NULL)
        defer_exc(self);
    Py_XDECREF(r);
}

/* ------------------------------------------------------------------ in-flight ranges */

static int busy_conflicts(DataPath *self, uint64_t start, uint64_t end)
{
    Busy *b = self->busy;
    for (size_t i = 0, n = self->nbusy; i < n; i++)
        if (b[i].start < end && start < b[i].end)
            return 1;
    return 0;
}

static int busy_add(DataPath *self, uint64_t start, uint64_t end, uint64_t *token)
{
    if (self->nbusy == self->busy_cap) {
        size_t cap = self->busy_cap ? self->busy_cap * 2 : 256;
        Busy *nb = PyMem_Realloc(self->busy, cap * sizeof(Busy));
        if (nb == NULL)
            return -1;
        self->busy = nb;
        self->busy_cap = cap;
    }
    *token = ++self->next_token;
    self->busy[self->nbusy++] = (Busy){start, end, *token};
    return 0;
}

static int busy_del(DataPath *self, uint64_t token)
{
    for (size_t i = self->nbusy; i-- > 0;)
        if (self->busy[i].token == token) {
            self->busy[i] = self->busy[--self->nbusy];
            return 1;
        }
    return 0;
}

/* ------------------------------------------------------------------ ops */

static int32_t op_alloc(DataPath *self)
{
    if (self->free_head < 0) {
        int32_t cap = self->ops_cap ? self->ops_cap * 2 : 256;
        COp *n = PyMem_Realloc(self->ops, (size_t)cap * sizeof(COp));
        if (n == NULL)
            return -1;
        for (int32_t i = self->ops_cap; i < cap; i++) {
            n[i].kind = K_FREE;
            n[i].next_free = i + 1 < cap ? i + 1 : -1;
        }
        self->free_head = self->ops_cap;
        self->ops = n;
        self->ops_cap = cap;
    }
    int32_t i = self->free_head;
    self->free_head = self->ops[i].next_free;
    self->live_ops++;
    return i;
}

static void op_free(DataPath *self, int32_t i)
{
    self->ops[i].kind = K_FREE;
    self->ops[i].next_free = self->free_head;
    self->free_head = i;
    self->live_ops--;
}

/* Drop the op's range and activity-log counts (once). */
static void op_release(DataPath *self, COp *op)
{
    if (op->released)
        return;
    op->released = 1;
    busy_del(self, op->token);
    for (uint32_t e = op->e0; e <= op->e1 && e < self->extents; e++)
        if (self->al_count[e])
            self->al_count[e]--;
}

static void write_done(DataPath *self, COp *op)
{
    op_release(self, op);
    op->done = 1;
    self->st_completions++;
    if (self->hold) {
        if (self->nheld == self->held_cap) {
            size_t cap = self->held_cap ? self->held_cap * 2 : 256;
            Held *n = PyMem_Realloc(self->held, cap * sizeof(Held));
            if (n == NULL) { /* cannot hold it: failing is the safe answer */
                fuse_reply(self, op->unique, -ENOMEM, RP_NONE, NULL, 0);
                return;
            }
            self->held = n;
            self->held_cap = cap;
        }
        self->held[self->nheld++] = (Held){op->unique, op->length, op->wop};
        return;
    }
    if (op->wop == W_WRITE)
        fuse_reply(self, op->unique, 0, RP_WRITE, NULL, op->length);
    else
        fuse_reply(self, op->unique, 0, RP_NONE, NULL, 0);
}

static void op_fail(DataPath *self, COp *op, int err)
{
    op->remaining = -1;
    op_release(self, op);
    op->done = 1;
    fuse_reply(self, op->unique, -err, RP_NONE, NULL, 0);
}

/* ------------------------------------------------------------------ links */

static int out_reserve(Link *L, size_t n)
{
    if (L->out_cap - L->out_len >= n)
        return 0;
    if (L->out_off) {
        memmove(L->out, L->out + L->out_off, L->out_len - L->out_off);
        L->out_len -= L->out_off;
        L->out_off = 0;
        if (L->out_cap - L->out_len >= n)
            return 0;
    }
    size_t cap = L->out_cap ? L->out_cap : 65536;
    while (cap - L->out_len < n)
        cap *= 2;
    char *nb = PyMem_Realloc(L->out, cap);
    if (nb == NULL)
        return -1;
    L->out = nb;
    L->out_cap = cap;
    return 0;
}

static int ring_push(Link *L, uint64_t rid, double t, int32_t op, PyObject *py)
{
    if (L->rlen == L->rcap) {
        size_t cap = L->rcap ? L->rcap * 2 : 256;
        Pend *n = PyMem_Malloc(cap * sizeof(Pend));
        if (n == NULL)
            return -1;
        for (size_t i = 0; i < L->rlen; i++)
            n[i] = L->ring[(L->rhead + i) % L->rcap];
        PyMem_Free(L->ring);
        L->ring = n;
        L->rcap = cap;
        L->rhead = 0;
    }
    Pend *e = &L->ring[(L->rhead + L->rlen) % L->rcap];
    e->rid = rid;
    e->t = t;
    e->op = op;
    e->py = py;
    Py_XINCREF(py);
    L->rlen++;
    return 0;
}

static inline Pend *ring_head(Link *L) { return &L->ring[L->rhead]; }

static inline void ring_pop(Link *L)
{
    L->rhead = (L->rhead + 1) % L->rcap;
    L->rlen--;
}

static void queue_flush(DataPath *self, int slot)
{
    Link *L = &self->links[slot];
    if (!L->queued) {
        L->queued = 1;
        self->flushq[self->nflush++] = slot;
    }
}

/* Append a request (header + optional payload) to a link; records it as pending. */
static int link_append(DataPath *self, int slot, const char *hdr, const char *data, size_t dlen, uint64_t rid,
                       int32_t op, PyObject *py, double t)
{
    Link *L = &self->links[slot];
    if (out_reserve(L, REQ_BYTES + dlen) < 0 || ring_push(L, rid, t, op, py) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(L->out + L->out_len, hdr, REQ_BYTES);
    if (dlen)
        memcpy(L->out + L->out_len + REQ_BYTES, data, dlen);
    L->out_len += REQ_BYTES + dlen;
    queue_flush(self, slot);
    return 0;
}

static void link_error(DataPath *self, int slot, int status, const char *reason)
{
    if (self->on_error == NULL || self->on_error == Py_None)
        return;
    self->py_calls++;
    PyObject *r = PyObject_CallFunction(self->on_error, "iis", slot, status, reason);
    if (r == NULL)
        defer_exc(self);
    Py_XDECREF(r);
}

static void set_out_interest(DataPath *self, int slot, int want)
{
    Link *L = &self->links[slot];
    if (want == L->want_out || L->fd < 0)
        return;
    struct epoll_event ev = {.events = EPOLLIN | (want ? EPOLLOUT : 0), .data.u64 = TAG_BASE | (uint32_t)slot};
    if (epoll_ctl(self->epfd, EPOLL_CTL_MOD, L->fd, &ev) == 0)
        L->want_out = want;
    else
        defer_oserror(self, errno, "epoll_ctl");
}

static void send_out(DataPath *self, int slot)
{
    Link *L = &self->links[slot];
    if (L->fd < 0)
        return;
    while (L->out_off < L->out_len) {
        ssize_t n = send(L->fd, L->out + L->out_off, L->out_len - L->out_off, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            char why[96];
            snprintf(why, sizeof why, "send: %s", strerror(errno));
            link_error(self, slot, 0, why);
            return;
        }
        self->st_sends++;
        L->out_off += (size_t)n;
    }
    if (L->out_off == L->out_len)
        L->out_off = L->out_len = 0;
    set_out_interest(self, slot, L->out_len > 0);
}

static void do_flush(DataPath *self)
{
    while (self->nflush) {
        int q[MAX_LINKS], n = self->nflush;
        memcpy(q, self->flushq, sizeof(int) * (size_t)n);
        self->nflush = 0;
        for (int i = 0; i < n; i++)
            self->links[q[i]].queued = 0;
        for (int i = 0; i < n; i++)
            send_out(self, q[i]);
    }
}

/* ------------------------------------------------------------------ issuing */

static int al_all_hot(DataPath *self, uint64_t off, uint64_t len)
{
    uint64_t e0 = off >> self->eshift, e1 = (off + len - 1) >> self->eshift;
    for (uint64_t e = e0; e <= e1; e++)
        if (!self->al_hot[e])
            return 0;
    return 1;
}

/* Fan a write (or discard / write-zeroes) out to the write set. Range checked by the caller. */
static int issue_write(DataPath *self, uint64_t unique, int wop, uint64_t off, uint64_t len, const char *data)
{
    int32_t i = op_alloc(self);
    if (i < 0) {
        PyErr_NoMemory();
        return -1;
    }
    COp *op = &self->ops[i];
    memset(op, 0, sizeof *op);
    op->kind = K_WRITE;
    op->wop = (uint8_t)wop;
    op->unique = unique;
    op->offset = off;
    op->length = len;
    op->r0 = (uint32_t)(off >> self->rshift);
    op->r1 = (uint32_t)((off + len - 1) >> self->rshift);
    op->e0 = (uint32_t)(off >> self->eshift);
    op->e1 = (uint32_t)((off + len - 1) >> self->eshift);
    if (busy_add(self, off, off + len, &op->token) < 0) {
        op_free(self, i);
        PyErr_NoMemory();
        return -1;
    }
    uint64_t stamp = ++self->al_clock;
    for (uint32_t e = op->e0; e <= op->e1; e++) {
        self->al_count[e]++;
        self->al_stamp[e] = stamp;
    }
    for (int m = 0; m < self->nmissing; m++) {
        Py_buffer *b = &self->missing[m];
        if ((Py_ssize_t)op->r1 < b->len)
            memset((char *)b->buf + op->r0, 1, op->r1 - op->r0 + 1);
    }
    uint64_t rid = ++self->next_rid;
    char hdr[REQ_BYTES];
    size_t dlen = wop == W_WRITE ? len : 0;
    pack_req(hdr, (uint32_t)(REQ_BYTES + dlen), wop, 0, rid, off, (uint32_t)len);
    double t = mono_now();
    op->remaining = op->refs = 0;
    for (int k = 0; k < self->nw; k++) {
        if (link_append(self, self->wslots[k], hdr, data, dlen, rid, i, NULL, t) < 0)
            return -1; /* out of memory: the op stays pending on the links it reached */
        op->remaining++;
        op->refs++;
    }
    if (op->refs == 0) { /* no replica to write to: a failure, never an acknowledgement */
        op_fail(self, op, EIO);
        op_free(self, i);
    }
    return 0;
}

static int issue_read(DataPath *self, uint64_t unique, uint64_t off, uint64_t len)
{
    int32_t i = op_alloc(self);
    if (i < 0) {
        PyErr_NoMemory();
        return -1;
    }
    COp *op = &self->ops[i];
    memset(op, 0, sizeof *op);
    op->kind = K_READ;
    op->wop = W_READ;
    op->unique = unique;
    op->offset = off;
    op->length = len;
    op->released = 1;
    op->remaining = op->refs = 1;
    char hdr[REQ_BYTES];
    uint64_t rid = ++self->next_rid;
    pack_req(hdr, REQ_BYTES, W_READ, 0, rid, off, (uint32_t)len);
    if (link_append(self, self->rslot, hdr, NULL, 0, rid, i, NULL, mono_now()) < 0) {
        op_free(self, i);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ FUSE requests */

static void call_slow(DataPath *self, Py_ssize_t n)
{
    self->st_slow++;
    if (self->slow_cb == NULL)
        return;
    self->py_calls++;
    PyObject *r = PyObject_CallFunction(self->slow_cb, "n", n);
    if (r == NULL)
        defer_exc(self);
    Py_XDECREF(r);
}

/* Handle one request in the FUSE buffer in C if we may; else hand it to Python. */
static void fuse_request(DataPath *self, Py_ssize_t n)
{
    const char *b = self->fbuf.buf;
    uint32_t opcode = ld32(b + 4);
    uint64_t unique = ld64(b + 8);
    if ((opcode == FUSE_WRITE || opcode == FUSE_READ) && self->fast) {
        if (n < FUSE_RW_END) {
            fuse_reply(self, unique, -EINVAL, RP_NONE, NULL, 0);
            return;
        }
        uint64_t off = ld64(b + 48);
        uint32_t size = ld32(b + 56);
        if (opcode == FUSE_WRITE) {
            if ((uint64_t)n - FUSE_RW_END < size) { /* shorter than it says */
                fuse_reply(self, unique, -EINVAL, RP_NONE, NULL, 0);
                return;
            }
            if (size && self->nw && off < self->size && size <= self->size - off &&
                !busy_conflicts(self, off, off + size) && al_all_hot(self, off, size)) {
                if (issue_write(self, unique, W_WRITE, off, size, b + FUSE_RW_END) < 0)
                    defer_exc(self);
                self->st_fast_writes++;
                return;
            }
        } else if (self->rslot >= 0 && off < self->size && size) {
            uint64_t len = size < self->size - off ? size : self->size - off;
            if (len <= MAX_PAYLOAD) {
                if (issue_read(self, unique, off, len) < 0)
                    defer_exc(self);
                self->st_fast_reads++;
                return;
            }
        }
    }
    call_slow(self, n);
}

static int drain_fuse(DataPath *self)
{
    for (int i = 0; i < DRAIN_BATCH && !self->destroyed; i++) {
        ssize_t n = read(self->fuse_fd, self->fbuf.buf, (size_t)self->fbuf.len);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            if (errno == EINTR || errno == ENOENT)
                continue;
            if (errno == ENODEV) {
                self->destroyed = 1;
                break;
            }
            defer_oserror(self, errno, "read /dev/fuse");
            return -1;
        }
        self->st_fuse_reads++;
        if (n < FUSE_IN_BYTES)
            continue; /* not a request: the kernel never sends one */
        fuse_request(self, n);
    }
    return 0;
}

/* ------------------------------------------------------------------ replies */

static PyObject *inbuf_view(Link *L, size_t off, size_t len)
{
    /* a view of the link's bytearray (never resized): a view kept too long sees new bytes, never freed memory */
    PyObject *whole = PyMemoryView_FromObject(L->inbuf);
    if (whole == NULL)
        return NULL;
    PyObject *view = PySequence_GetSlice(whole, (Py_ssize_t)off, (Py_ssize_t)(off + len));
    Py_DECREF(whole);
    return view;
}

static const char *op_name(int op)
{
    switch (op) {
    case W_WRITE: return "WRITE";
    case W_READ: return "READ";
    case W_DISCARD: return "DISCARD";
    case W_WRITE_ZEROES: return "WRITE_ZEROES";
    default: return "request";
    }
}

static void on_readable(DataPath *self, int slot)
{
    Link *L = &self->links[slot];
    if (L->fd < 0)
        return;
    uint32_t conn = L->conn;
    char *buf = PyByteArray_AS_STRING(L->inbuf);
    ssize_t n;
    for (;;) {
        n = recv(L->fd, buf + L->fill, INBUF_BYTES - L->fill, MSG_DONTWAIT);
        if (n >= 0 || errno != EINTR)
            break;
    }
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return;
        char why[96];
        snprintf(why, sizeof why, "recv: %s", strerror(errno));
        link_error(self, slot, 0, why);
        return;
    }
    if (n == 0) {
        link_error(self, slot, 0, "connection closed");
        return;
    }
    self->st_recvs++;
    size_t fill = L->fill + (size_t)n, pos = 0;
    L->fill = fill;
    char why[96];
    while (fill - pos >= REP_BYTES) {
        const char *p = buf + pos;
        uint32_t length = ld32(p);
        int32_t status = (int32_t)ld32(p + 4);
        uint64_t rid = ld64(p + 8);
        if (length < REP_BYTES || length > REP_BYTES + MAX_PAYLOAD) {
            link_error(self, slot, 0, "bad reply length");
            goto out;
        }
        if (fill - pos < length)
            break;
        if (L->rlen == 0) {
            link_error(self, slot, 0, "reply without request");
            goto out;
        }
        Pend *e = ring_head(L);
        if (e->rid != rid) {
            snprintf(why, sizeof why, "reply %llu for request %llu", (unsigned long long)rid,
                     (unsigned long long)e->rid);
            link_error(self, slot, 0, why);
            goto out;
        }
        const char *payload = p + REP_BYTES;
        size_t plen = length - REP_BYTES;
        if (status > 0) { /* the protocol has 0 or -errno: anything else is never a success */
            snprintf(why, sizeof why, "reply %llu with status %d", (unsigned long long)rid, (int)status);
            link_error(self, slot, -EPROTO, why);
            goto out;
        }
        if (e->op >= 0) {
            int32_t oi = e->op;
            COp *op = &self->ops[oi];
            if (status < 0 && !(op->kind == K_READ && status == -EINVAL)) {
                /* stays pending on this link: the failure path (Python) owns it */
                link_error(self, slot, status, op_name(op->wop));
                goto out;
            }
            if (op->kind == K_READ && status == 0 && plen != op->length) {
                /* a short (or long) read would reach the application as data: never */
                snprintf(why, sizeof why, "READ reply of %zu bytes for %llu", plen,
                         (unsigned long long)op->length);
                link_error(self, slot, -EPROTO, why);
                goto out;
            }
            ring_pop(L);
            pos += length;
            op->refs--;
            if (op->kind == K_WRITE) {
                if (op->remaining > 0 && --op->remaining == 0)
                    write_done(self, op);
            } else if (!op->done) {
                op->done = 1;
                if (status < 0)
                    fuse_reply(self, op->unique, status, RP_NONE, NULL, 0);
                else
                    fuse_reply(self, op->unique, 0, RP_DATA, payload, plen);
            }
            if (op->refs == 0)
                op_free(self, oi);
        } else {
            if (status < 0) {
                link_error(self, slot, status, "control request");
                goto out;
            }
            PyObject *py = e->py;
            ring_pop(L);
            pos += length;
            PyObject *view = self->on_reply ? inbuf_view(L, (size_t)(payload - buf), plen) : NULL;
            if (view == NULL && self->on_reply) {
                defer_exc(self);
            } else if (view != NULL) {
                self->py_calls++;
                PyObject *r = PyObject_CallFunction(self->on_reply, "iOiO", slot, py, (int)status, view);
                if (r == NULL)
                    defer_exc(self);
                Py_XDECREF(r);
                Py_DECREF(view);
            }
            Py_DECREF(py);
            if (L->fd < 0 || L->conn != conn)
                return; /* detached (maybe re-attached) by the callback: its buffer was reset */
        }
    }
out:
    if (pos && L->fd >= 0 && L->conn == conn) {
        memmove(buf, buf + pos, fill - pos);
        L->fill = fill - pos;
    }
}

static void on_link_event(DataPath *self, int slot, uint32_t events)
{
    Link *L = &self->links[slot];
    uint32_t conn = L->conn;
    if (events & EPOLLOUT)
        send_out(self, slot);
    if (L->fd >= 0 && L->conn == conn && (events & (EPOLLIN | EPOLLERR | EPOLLHUP)))
        on_readable(self, slot);
}

/* ------------------------------------------------------------------ Python API */

static int check_slot(int slot)
{
    if (slot < 0 || slot >= MAX_LINKS) {
        PyErr_Format(PyExc_ValueError, "slot %d outside 0..%d", slot, MAX_LINKS - 1);
        return -1;
    }
    return 0;
}

static int check_range(DataPath *self, unsigned long long off, unsigned long long len)
{
    if (len == 0 || off >= self->size || len > self->size - off || len > MAX_PAYLOAD) {
        PyErr_Format(PyExc_ValueError, "range %llu+%llu outside the volume or too long", off, len);
        return -1;
    }
    return 0;
}

static void release_missing(DataPath *self)
{
    for (int i = 0; i < self->nmissing; i++)
        PyBuffer_Release(&self->missing[i]);
    self->nmissing = 0;
}

static int DataPath_init(DataPath *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"size_bytes", "epoll_fd", "reply", "on_reply", "on_error", "region_bytes",
                             "extent_bytes", "reply_fd", NULL};
    unsigned long long size, region = 65536, extent = 4 << 20;
    int epfd, reply_fd = -1;
    PyObject *reply, *on_reply, *on_error;
    if (self->ops != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "DataPath is already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "KiOOO|KKi", kwlist, &size, &epfd, &reply, &on_reply, &on_error,
                                     &region, &extent, &reply_fd))
        return -1;
    if (size == 0 || region == 0 || extent == 0 || (region & (region - 1)) || (extent & (extent - 1))) {
        PyErr_SetString(PyExc_ValueError, "size must be > 0; region and extent sizes powers of two");
        return -1;
    }
    if (!PyCallable_Check(on_reply) || !PyCallable_Check(on_error) || (reply != Py_None && !PyCallable_Check(reply))) {
        PyErr_SetString(PyExc_TypeError, "reply, on_reply and on_error must be callables");
        return -1;
    }
    self->size = size;
    self->rshift = __builtin_ctzll(region);
    self->eshift = __builtin_ctzll(extent);
    self->regions = (size + region - 1) / region;
    self->extents = (size + extent - 1) / extent;
    self->epfd = epfd;
    self->reply_fd = reply_fd;
    self->fuse_fd = -1;
    self->rslot = -1;
    self->fast = 0;
    self->free_head = -1;
    self->reply_cb = Py_NewRef(reply);
    self->on_reply = Py_NewRef(on_reply);
    self->on_error = Py_NewRef(on_error);
    for (int i = 0; i < MAX_LINKS; i++)
        self->links[i].fd = -1;
    self->al_count = PyMem_Calloc(self->extents, sizeof(uint32_t));
    self->al_hot = PyMem_Calloc(self->extents, 1);
    self->al_stamp = PyMem_Calloc(self->extents, sizeof(uint64_t));
    int32_t i = op_alloc(self); /* allocates the first table */
    if (!self->al_count || !self->al_hot || !self->al_stamp || i < 0) {
        PyErr_NoMemory();
        return -1;
    }
    op_free(self, i);
    return 0;
}

static int DataPath_traverse(DataPath *self, visitproc visit, void *arg)
{
    Py_VISIT(self->slow_cb);
    Py_VISIT(self->reply_cb);
    Py_VISIT(self->on_reply);
    Py_VISIT(self->on_error);
    for (int s = 0; s < MAX_LINKS; s++) {
        Link *L = &self->links[s];
        for (size_t i = 0; i < L->rlen; i++)
            Py_VISIT(L->ring[(L->rhead + i) % L->rcap].py);
    }
    return 0;
}

static void drop_ring(Link *L)
{
    while (L->rlen) {
        PyObject *py = ring_head(L)->py;
        ring_pop(L);
        Py_XDECREF(py);
    }
}

static int DataPath_clear(DataPath *self)
{
    Py_CLEAR(self->slow_cb);
    Py_CLEAR(self->reply_cb);
    Py_CLEAR(self->on_reply);
    Py_CLEAR(self->on_error);
    for (int s = 0; s < MAX_LINKS; s++)
        drop_ring(&self->links[s]);
    return 0;
}

static void DataPath_dealloc(DataPath *self)
{
    PyObject_GC_UnTrack(self);
    DataPath_clear(self);
    for (int s = 0; s < MAX_LINKS; s++) {
        Link *L = &self->links[s];
        PyMem_Free(L->out);
        PyMem_Free(L->ring);
        Py_XDECREF(L->inbuf);
    }
    release_missing(self);
    if (self->has_fbuf)
        PyBuffer_Release(&self->fbuf);
    PyMem_Free(self->ops);
    PyMem_Free(self->busy);
    PyMem_Free(self->al_count);
    PyMem_Free(self->al_hot);
    PyMem_Free(self->al_stamp);
    PyMem_Free(self->held);
    Py_XDECREF(self->exc_type);
    Py_XDECREF(self->exc_value);
    Py_XDECREF(self->exc_tb);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *DataPath_set_fuse(DataPath *self, PyObject *args)
{
    int fd;
    Py_buffer b;
    PyObject *slow;
    if (!PyArg_ParseTuple(args, "iw*O", &fd, &b, &slow))
        return NULL;
    if (!PyCallable_Check(slow) || b.len < FUSE_RW_END + 4096 || self->fuse_fd >= 0) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "set_fuse(fd, buffer of at least 4176 bytes, callable), once");
        return NULL;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = TAG_FUSE};
    if (epoll_ctl(self->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        PyBuffer_Release(&b);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    self->fuse_fd = fd;
    self->fbuf = b;
    self->has_fbuf = 1;
    Py_XSETREF(self->slow_cb, Py_NewRef(slow));
    Py_RETURN_NONE;
}

static PyObject *DataPath_attach(DataPath *self, PyObject *args)
{
    int slot, fd;
    if (!PyArg_ParseTuple(args, "ii", &slot, &fd) || check_slot(slot) < 0)
        return NULL;
    Link *L = &self->links[slot];
    if (L->fd >= 0) {
        PyErr_Format(PyExc_ValueError, "slot %d is attached", slot);
        return NULL;
    }
    if (L->inbuf == NULL) {
        L->inbuf = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)INBUF_BYTES);
        if (L->inbuf == NULL)
            return NULL;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = TAG_BASE | (uint32_t)slot};
    if (epoll_ctl(self->epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    L->fd = fd;
    L->conn++;
    L->fill = L->out_off = L->out_len = 0;
    L->want_out = 0;
    return PyLong_FromUnsignedLong(TAG_BASE | (uint32_t)slot);
}

/* detach(slot, mode) -> (python ops, [(r0, r1)] of writes, [(unique, offset, length)] of reads)
 * mode 0: the survivors carry on, each pending write counts this link as done;
 * mode 1: pending writes fail with EIO; mode 2: just drop (the caller failed everything). */
static PyObject *DataPath_detach(DataPath *self, PyObject *args)
{
    int slot, mode = MODE_ACK;
    if (!PyArg_ParseTuple(args, "i|i", &slot, &mode) || check_slot(slot) < 0)
        return NULL;
    Link *L = &self->links[slot];
    PyObject *pyops = PyList_New(0), *regions = PyList_New(0), *reads = PyList_New(0);
    if (!pyops || !regions || !reads)
        goto fail;
    enter(self);
    if (L->fd >= 0)
        epoll_ctl(self->epfd, EPOLL_CTL_DEL, L->fd, NULL);
    L->fd = -1;
    L->conn++;
    L->fill = L->out_off = L->out_len = 0;
    L->want_out = 0;
    /* out of the write and read sets at once: nothing may be queued on a detached link */
    int k = 0;
    for (int i = 0; i < self->nw; i++)
        if (self->wslots[i] != slot)
            self->wslots[k++] = self->wslots[i];
    self->nw = k;
    if (self->rslot == slot)
        self->rslot = -1;
    while (L->rlen) {
        Pend e = *ring_head(L);
        ring_pop(L);
        if (e.op < 0) {
            int r = PyList_Append(pyops, e.py);
            Py_DECREF(e.py);
            if (r < 0)
                defer_exc(self);
            continue;
        }
        COp *op = &self->ops[e.op];
        op->refs--;
        PyObject *t = NULL;
        if (op->kind == K_WRITE) {
            t = Py_BuildValue("(II)", op->r0, op->r1);
            if (t && PyList_Append(regions, t) < 0)
                defer_exc(self);
            if (op->remaining > 0) {
                if (mode == MODE_ACK) {
                    if (--op->remaining == 0)
                        write_done(self, op);
                } else if (mode == MODE_FAIL) {
                    op_fail(self, op, EIO);
                }
            }
        } else if (!op->done) {
            op->done = 1;
            t = Py_BuildValue("(KKK)", (unsigned long long)op->unique, (unsigned long long)op->offset,
                              (unsigned long long)op->length);
            if (t && PyList_Append(reads, t) < 0)
                defer_exc(self);
        }
        if (t == NULL && PyErr_Occurred())
            defer_exc(self);
        Py_XDECREF(t);
        if (op->refs == 0)
            op_free(self, e.op);
    }
    PyObject *ret = PyTuple_Pack(3, pyops, regions, reads);
    Py_DECREF(pyops);
    Py_DECREF(regions);
    Py_DECREF(reads);
    return leave(self, ret);
fail:
    Py_XDECREF(pyops);
    Py_XDECREF(regions);
    Py_XDECREF(reads);
    return NULL;
}

static PyObject *DataPath_set_links(DataPath *self, PyObject *args)
{
    PyObject *wseq, *mseq;
    int rslot;
    if (!PyArg_ParseTuple(args, "OiO", &wseq, &rslot, &mseq))
        return NULL;
    PyObject *w = PySequence_Fast(wseq, "write slots must be a sequence");
    if (w == NULL)
        return NULL;
    PyObject *m = PySequence_Fast(mseq, "missing maps must be a sequence");
    if (m == NULL) {
        Py_DECREF(w);
        return NULL;
    }
    Py_ssize_t nw = PySequence_Fast_GET_SIZE(w), nm = PySequence_Fast_GET_SIZE(m);
    int slots[MAX_LINKS];
    Py_buffer bufs[MAX_LINKS];
    int nb = 0;
    if (nw > MAX_LINKS || nm > MAX_LINKS || (rslot >= 0 && check_slot(rslot) < 0)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "too many links");
        goto fail;
    }
    if (rslot >= 0 && self->links[rslot].fd < 0) {
        PyErr_Format(PyExc_ValueError, "read slot %d is not attached", rslot);
        goto fail;
    }
    for (Py_ssize_t i = 0; i < nw; i++) {
        int s = PyLong_AsLong(PySequence_Fast_GET_ITEM(w, i));
        if ((s == -1 && PyErr_Occurred()) || check_slot(s) < 0)
            goto fail;
        if (self->links[s].fd < 0) {
            PyErr_Format(PyExc_ValueError, "write slot %d is not attached", s);
            goto fail;
        }
        slots[i] = s;
    }
    for (Py_ssize_t i = 0; i < nm; i++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(m, i), &bufs[nb], PyBUF_WRITABLE) < 0)
            goto fail;
        nb++;
        if ((uint64_t)bufs[nb - 1].len < self->regions) {
            PyErr_SetString(PyExc_ValueError, "a missing map is shorter than the volume's regions");
            goto fail;
        }
    }
    release_missing(self);
    memcpy(self->wslots, slots, sizeof(int) * (size_t)nw);
    self->nw = (int)nw;
    self->rslot = rslot;
    memcpy(self->missing, bufs, sizeof(Py_buffer) * (size_t)nb);
    self->nmissing = nb;
    Py_DECREF(w);
    Py_DECREF(m);
    Py_RETURN_NONE;
fail:
    for (int i = 0; i < nb; i++)
        PyBuffer_Release(&bufs[i]);
    Py_DECREF(w);
    Py_DECREF(m);
    return NULL;
}

/* send(slot, op, wire_op, flags=0, offset=0, count=0, payload=None) -> request id, or 0 if detached */
static PyObject *DataPath_send(DataPath *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"slot", "op", "wire_op", "flags", "offset", "count", "payload", NULL};
    int slot, wop, flags = 0;
    unsigned long long off = 0, count = 0;
    PyObject *py, *payload = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iOi|iKKO", kwlist, &slot, &py, &wop, &flags, &off, &count,
                                     &payload) ||
        check_slot(slot) < 0)
        return NULL;
    if (wop <= 0 || wop > 255 || flags < 0 || flags > 255 || count > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "op, flags or count out of range");
        return NULL;
    }
    if (self->links[slot].fd < 0)
        return PyLong_FromLong(0);
    Py_buffer b = {0};
    int has = payload != Py_None;
    if (has && PyObject_GetBuffer(payload, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    if ((uint64_t)b.len > MAX_PAYLOAD) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "payload too long");
        return NULL;
    }
    uint64_t rid = ++self->next_rid;
    char hdr[REQ_BYTES];
    pack_req(hdr, (uint32_t)(REQ_BYTES + b.len), wop, flags, rid, off, (uint32_t)count);
    int r = link_append(self, slot, hdr, has ? b.buf : NULL, has ? (size_t)b.len : 0, rid, -1, py, mono_now());
    if (has)
        PyBuffer_Release(&b);
    if (r < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(rid);
}

static PyObject *DataPath_issue_write(DataPath *self, PyObject *args)
{
    unsigned long long unique, off, len;
    int wop;
    PyObject *data;
    if (!PyArg_ParseTuple(args, "KiKKO", &unique, &wop, &off, &len, &data))
        return NULL;
    if (wop != W_WRITE && wop != W_DISCARD && wop != W_WRITE_ZEROES) {
        PyErr_Format(PyExc_ValueError, "not a write op: %d", wop);
        return NULL;
    }
    if (len == 0 || off >= self->size || len > self->size - off || len > UINT32_MAX ||
        (wop == W_WRITE && len > MAX_PAYLOAD)) {
        PyErr_Format(PyExc_ValueError, "range %llu+%llu outside the volume or too long", off, len);
        return NULL;
    }
    Py_buffer b = {0};
    if (wop == W_WRITE) {
        if (data == Py_None || PyObject_GetBuffer(data, &b, PyBUF_SIMPLE) < 0) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "a WRITE needs its data");
            return NULL;
        }
        if ((uint64_t)b.len != len) {
            PyBuffer_Release(&b);
            PyErr_Format(PyExc_ValueError, "data has %zd bytes, not %llu", b.len, len);
            return NULL;
        }
    }
    enter(self);
    int r = issue_write(self, unique, wop, off, len, b.buf);
    if (wop == W_WRITE)
        PyBuffer_Release(&b);
    return leave(self, r < 0 ? NULL : Py_NewRef(Py_None));
}

static PyObject *DataPath_issue_read(DataPath *self, PyObject *args)
{
    unsigned long long unique, off, len;
    if (!PyArg_ParseTuple(args, "KKK", &unique, &off, &len) || check_range(self, off, len) < 0)
        return NULL;
    if (self->rslot < 0)
        Py_RETURN_FALSE;
    if (issue_read(self, unique, off, len) < 0)
        return NULL;
    Py_RETURN_TRUE;
}

static PyObject *DataPath_conflicts(DataPath *self, PyObject *args)
{
    unsigned long long off, len;
    if (!PyArg_ParseTuple(args, "KK", &off, &len))
        return NULL;
    return PyBool_FromLong(len && busy_conflicts(self, off, off + len));
}

static PyObject *DataPath_register(DataPath *self, PyObject *args)
{
    unsigned long long off, len;
    uint64_t token;
    if (!PyArg_ParseTuple(args, "KK", &off, &len))
        return NULL;
    if (len == 0 || off + len < off) {
        PyErr_SetString(PyExc_ValueError, "empty or wrapping range");
        return NULL;
    }
    if (busy_add(self, off, off + len, &token) < 0)
        return PyErr_NoMemory();
    return PyLong_FromUnsignedLongLong(token);
}

static PyObject *DataPath_unregister(DataPath *self, PyObject *arg)
{
    unsigned long long token = PyLong_AsUnsignedLongLong(arg);
    if (token == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    return PyBool_FromLong(busy_del(self, token));
}

static int extent_arg(DataPath *self, PyObject *o, uint64_t *e)
{
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if (v >= self->extents) {
        PyErr_Format(PyExc_ValueError, "extent %llu outside %llu", v, (unsigned long long)self->extents);
        return -1;
    }
    *e = v;
    return 0;
}

/* al_cold(offset, length) -> extents of the range not in the activity log (empty list: all hot) */
static PyObject *DataPath_al_cold(DataPath *self, PyObject *args)
{
    unsigned long long off, len;
    if (!PyArg_ParseTuple(args, "KK", &off, &len))
        return NULL;
    /* no payload limit: a discard or a zeroing (mkfs sends 64 MiB ones) spans many extents */
    if (off >= self->size || len > self->size - off) {
        PyErr_Format(PyExc_ValueError, "range %llu+%llu outside the volume", off, len);
        return NULL;
    }
    PyObject *out = PyList_New(0);
    if (out == NULL || len == 0)
        return out;
    for (uint64_t e = off >> self->eshift; e <= (off + len - 1) >> self->eshift; e++) {
        if (self->al_hot[e])
            continue;
        PyObject *v = PyLong_FromUnsignedLongLong(e);
        if (v == NULL || PyList_Append(out, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(v);
    }
    return out;
}

static PyObject *DataPath_al_add(DataPath *self, PyObject *arg)
{
    PyObject *seq = PySequence_Fast(arg, "extents must be a sequence");
    if (seq == NULL)
        return NULL;
    uint64_t stamp = ++self->al_clock;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        uint64_t e;
        if (extent_arg(self, PySequence_Fast_GET_ITEM(seq, i), &e) < 0) {
            Py_DECREF(seq);
            return NULL;
        }
        if (!self->al_hot[e]) {
            self->al_hot[e] = 1;
            self->al_nhot++;
        }
        self->al_stamp[e] = stamp;
    }
    Py_DECREF(seq);
    Py_RETURN_NONE;
}

static int cmp_stamp(const void *a, const void *b)
{
    const uint64_t *x = a, *y = b;
    return x[0] < y[0] ? -1 : x[0] > y[0];
}

/* al_evict(max_extents, target) -> the least recently used cold extents taken out of the log */
static PyObject *DataPath_al_evict(DataPath *self, PyObject *args)
{
    unsigned long long maxe, target;
    if (!PyArg_ParseTuple(args, "KK", &maxe, &target))
        return NULL;
    PyObject *out = PyList_New(0);
    if (out == NULL || self->al_nhot <= maxe)
        return out;
    uint64_t (*cold)[2] = PyMem_Malloc(sizeof(uint64_t[2]) * (self->al_nhot + 1));
    if (cold == NULL) {
        Py_DECREF(out);
        return PyErr_NoMemory();
    }
    size_t n = 0;
    for (uint64_t e = 0; e < self->extents; e++)
        if (self->al_hot[e] && self->al_count[e] == 0) {
            cold[n][0] = self->al_stamp[e];
            cold[n][1] = e;
            n++;
        }
    qsort(cold, n, sizeof cold[0], cmp_stamp);
    for (size_t i = 0; i < n && self->al_nhot > target; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(cold[i][1]);
        if (v == NULL || PyList_Append(out, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(out);
            PyMem_Free(cold);
            return NULL;
        }
        Py_DECREF(v);
        self->al_hot[cold[i][1]] = 0;
        self->al_nhot--;
    }
    PyMem_Free(cold);
    return out;
}

static PyObject *DataPath_al_hot_extents(DataPath *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *out = PyList_New(0);
    for (uint64_t e = 0; out && e < self->extents; e++) {
        if (!self->al_hot[e])
            continue;
        PyObject *v = PyLong_FromUnsignedLongLong(e);
        if (v == NULL || PyList_Append(out, v) < 0) {
            Py_XDECREF(v);
            Py_CLEAR(out);
            break;
        }
        Py_DECREF(v);
    }
    return out;
}

static PyObject *DataPath_al_is_hot(DataPath *self, PyObject *arg)
{
    uint64_t e;
    if (extent_arg(self, arg, &e) < 0)
        return NULL;
    return PyBool_FromLong(self->al_hot[e]);
}

static PyObject *DataPath_al_clear(DataPath *self, PyObject *Py_UNUSED(ignored))
{
    memset(self->al_hot, 0, self->extents);
    self->al_nhot = 0;
    Py_RETURN_NONE;
}

/* grow(size_bytes): the volume grew (an online expansion; never shrinks). The dirty maps
 * given to set_links must already cover the new regions: Python hands longer ones first. */
static PyObject *DataPath_grow(DataPath *self, PyObject *arg)
{
    unsigned long long size = PyLong_AsUnsignedLongLong(arg);
    if (size == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (size < self->size) {
        PyErr_Format(PyExc_ValueError, "a volume never shrinks (%llu < %llu bytes)", size,
                     (unsigned long long)self->size);
        return NULL;
    }
    uint64_t region = 1ULL << self->rshift, extent = 1ULL << self->eshift;
    uint64_t regions = (size + region - 1) / region, extents = (size + extent - 1) / extent;
    for (int i = 0; i < self->nmissing; i++) {
        if ((uint64_t)self->missing[i].len < regions) {
            PyErr_SetString(PyExc_ValueError, "a missing map is shorter than the grown volume's regions");
            return NULL;
        }
    }
    if (extents > self->extents) {
        uint32_t *count = PyMem_Realloc(self->al_count, extents * sizeof(uint32_t));
        if (count == NULL)
            return PyErr_NoMemory();
        self->al_count = count;
        uint8_t *hot = PyMem_Realloc(self->al_hot, extents);
        if (hot == NULL)
            return PyErr_NoMemory();
        self->al_hot = hot;
        uint64_t *stamp = PyMem_Realloc(self->al_stamp, extents * sizeof(uint64_t));
        if (stamp == NULL)
            return PyErr_NoMemory();
        self->al_stamp = stamp;
        size_t old = (size_t)self->extents, more = (size_t)(extents - self->extents);
        memset(self->al_count + old, 0, more * sizeof(uint32_t));
        memset(self->al_hot + old, 0, more);
        memset(self->al_stamp + old, 0, more * sizeof(uint64_t));
        self->extents = extents;
    }
    self->regions = regions;
    self->size = size;
    Py_RETURN_NONE;
}

static PyObject *DataPath_release_held(DataPath *self, PyObject *Py_UNUSED(ignored))
{
    enter(self);
    size_t n = self->nheld;
    self->nheld = 0;
    for (size_t i = 0; i < n; i++) {
        Held h = self->held[i];
        if (h.wop == W_WRITE)
            fuse_reply(self, h.unique, 0, RP_WRITE, NULL, h.length);
        else
            fuse_reply(self, h.unique, 0, RP_NONE, NULL, 0);
    }
    return leave(self, PyLong_FromSize_t(n));
}

/* fail_writes(errno): every write not yet answered (in flight or held) fails with -errno */
static PyObject *DataPath_fail_writes(DataPath *self, PyObject *arg)
{
    int err = (int)PyLong_AsLong(arg);
    if (err == -1 && PyErr_Occurred())
        return NULL;
    if (err <= 0) {
        PyErr_SetString(PyExc_ValueError, "errno must be positive");
        return NULL;
    }
    enter(self);
    size_t n = 0, held = self->nheld;
    self->nheld = 0;
    for (size_t i = 0; i < held; i++, n++)
        fuse_reply(self, self->held[i].unique, -err, RP_NONE, NULL, 0);
    for (int32_t i = 0; i < self->ops_cap; i++) {
        COp *op = &self->ops[i];
        if (op->kind == K_WRITE && op->remaining > 0) {
            op_fail(self, op, err);
            n++;
        }
    }
    return leave(self, PyLong_FromSize_t(n));
}

static PyObject *DataPath_on_event(DataPath *self, PyObject *args)
{
    unsigned long long tag;
    unsigned int events;
    if (!PyArg_ParseTuple(args, "KI", &tag, &events))
        return NULL;
    uint32_t t = (uint32_t)tag;
    if ((t & TAG_MASK) != TAG_BASE)
        Py_RETURN_FALSE;
    enter(self);
    if (t == TAG_FUSE) {
        if (self->fuse_fd >= 0)
            drain_fuse(self);
    } else if ((t & 0xFFF) < MAX_LINKS) {
        on_link_event(self, (int)(t & 0xFFF), events);
    }
    do_flush(self);
    return leave(self, Py_NewRef(Py_True));
}

/* poll(timeout_ms, spin_ms=0) -> [(fd, events)] for the fds that are not ours; ours are handled.
 *
 * spin_ms > 0: after a round of events that needed no Python (no callback ran, no other fd
 * fired, no error, not holding), wait again here, for up to spin_ms from the call, instead
 * of returning: under load the caller's loop (timers, guards) then runs every spin_ms
 * rather than after every FUSE request and every replica reply, which cost more per write
 * than the C path itself. The first wait, as ever, is for timeout_ms. */
static PyObject *DataPath_poll(DataPath *self, PyObject *args)
{
    int timeout, spin_ms = 0;
    if (!PyArg_ParseTuple(args, "i|i:poll", &timeout, &spin_ms))
        return NULL;
    struct epoll_event evs[MAX_EVENTS];
    int n;
    enter(self);
    do_flush(self);
    uint64_t calls = self->py_calls;
    double spin_end = spin_ms > 0 ? mono_now() + spin_ms / 1000.0 : 0.0;
    PyObject *others = NULL;
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        n = epoll_wait(self->epfd, evs, MAX_EVENTS, timeout);
        Py_END_ALLOW_THREADS
        if (n < 0) {
            if (errno != EINTR)
                defer_oserror(self, errno, "epoll_wait");
            n = 0;
            if (PyErr_CheckSignals() < 0)
                defer_exc(self);
        }
        self->st_polls++;
        for (int i = 0; i < n; i++) {
            uint32_t t = (uint32_t)evs[i].data.u64;
            if ((t & TAG_MASK) == TAG_BASE) {
                if (t == TAG_FUSE) {
                    if (self->fuse_fd >= 0)
                        drain_fuse(self);
                } else if ((t & 0xFFF) < MAX_LINKS) {
                    on_link_event(self, (int)(t & 0xFFF), evs[i].events);
                }
                continue;
            }
            if (others == NULL && (others = PyList_New(0)) == NULL) {
                defer_exc(self);
                continue;
            }
            PyObject *p = Py_BuildValue("(iI)", (int)t, evs[i].events);
            if (p == NULL || PyList_Append(others, p) < 0)
                defer_exc(self);
            Py_XDECREF(p);
        }
        do_flush(self);
        if (n == 0 || spin_ms <= 0 || others != NULL || self->py_calls != calls || self->exc_type != NULL ||
            self->destroyed || self->hold)
            break;
        int left_ms = (int)((spin_end - mono_now()) * 1000.0);
        if (left_ms <= 0)
            break;
        timeout = timeout >= 0 && timeout < left_ms ? timeout : left_ms;
    }
    if (others == NULL)
        others = PyList_New(0);
    return leave(self, others);
}

static PyObject *DataPath_flush(DataPath *self, PyObject *Py_UNUSED(ignored))
{
    enter(self);
    do_flush(self);
    return leave(self, Py_NewRef(Py_None));
}

static PyObject *DataPath_pending(DataPath *self, PyObject *arg)
{
    int slot = (int)PyLong_AsLong(arg);
    if ((slot == -1 && PyErr_Occurred()) || check_slot(slot) < 0)
        return NULL;
    return PyLong_FromSize_t(self->links[slot].rlen);
}

/* oldest(slot) -> monotonic send time of the oldest unanswered request, or None */
static PyObject *DataPath_oldest(DataPath *self, PyObject *arg)
{
    int slot = (int)PyLong_AsLong(arg);
    if ((slot == -1 && PyErr_Occurred()) || check_slot(slot) < 0)
        return NULL;
    Link *L = &self->links[slot];
    if (L->rlen == 0)
        Py_RETURN_NONE;
    return PyFloat_FromDouble(ring_head(L)->t);
}

/* python_ops(slot) -> the Python ops pending on a link, oldest first */
static PyObject *DataPath_python_ops(DataPath *self, PyObject *arg)
{
    int slot = (int)PyLong_AsLong(arg);
    if ((slot == -1 && PyErr_Occurred()) || check_slot(slot) < 0)
        return NULL;
    Link *L = &self->links[slot];
    PyObject *out = PyList_New(0);
    for (size_t i = 0; out && i < L->rlen; i++) {
        PyObject *py = L->ring[(L->rhead + i) % L->rcap].py;
        if (py && PyList_Append(out, py) < 0)
            Py_CLEAR(out);
    }
    return out;
}

static PyObject *DataPath_stats(DataPath *self, PyObject *Py_UNUSED(ignored))
{
    typedef unsigned long long ull;
    return Py_BuildValue("{sKsKsKsKsKsKsKsKsKsisnsKsn}", "fast_writes", (ull)self->st_fast_writes,
                         "fast_reads", (ull)self->st_fast_reads, "slow", (ull)self->st_slow, "fuse_reads",
                         (ull)self->st_fuse_reads, "sends", (ull)self->st_sends, "recvs", (ull)self->st_recvs,
                         "polls", (ull)self->st_polls, "replies", (ull)self->st_replies, "completions",
                         (ull)self->st_completions, "live_ops", (int)self->live_ops, "busy",
                         (Py_ssize_t)self->nbusy, "al_hot", (ull)self->al_nhot, "held", (Py_ssize_t)self->nheld);
}

static PyObject *get_bool(int *p) { return PyBool_FromLong(*p); }

static PyObject *DataPath_get_fast(DataPath *self, void *c) { return get_bool(&self->fast); }
static PyObject *DataPath_get_hold(DataPath *self, void *c) { return get_bool(&self->hold); }
static PyObject *DataPath_get_destroyed(DataPath *self, void *c) { return get_bool(&self->destroyed); }

static int set_bool(int *p, PyObject *v)
{
    if (v == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete");
        return -1;
    }
    int b = PyObject_IsTrue(v);
    if (b < 0)
        return -1;
    *p = b;
    return 0;
}

static int DataPath_set_fast(DataPath *self, PyObject *v, void *c) { return set_bool(&self->fast, v); }
static int DataPath_set_hold(DataPath *self, PyObject *v, void *c) { return set_bool(&self->hold, v); }

static PyObject *DataPath_get_held(DataPath *self, void *c) { return PyLong_FromSize_t(self->nheld); }
static PyObject *DataPath_get_inflight(DataPath *self, void *c) { return PyLong_FromLong(self->live_ops); }

static PyGetSetDef DataPath_getset[] = {
    {"fast", (getter)DataPath_get_fast, (setter)DataPath_set_fast,
     "Python's consent: C may issue plain reads and writes on its own", NULL},
    {"hold", (getter)DataPath_get_hold, (setter)DataPath_set_hold,
     "completed writes are held (not answered) while set", NULL},
    {"destroyed", (getter)DataPath_get_destroyed, NULL, "the FUSE connection is gone (ENODEV)", NULL},
    {"held", (getter)DataPath_get_held, NULL, "number of held completions", NULL},
    {"inflight", (getter)DataPath_get_inflight, NULL, "C ops not yet freed", NULL},
    {NULL},
};

static PyMethodDef DataPath_methods[] = {
    {"set_fuse", (PyCFunction)DataPath_set_fuse, METH_VARARGS,
     "set_fuse(fd, buffer, slow): read FUSE requests from fd into buffer; slow(n) gets the others"},
    {"attach", (PyCFunction)DataPath_attach, METH_VARARGS,
     "attach(slot, fd) -> epoll tag: a connected, non-blocking replica socket"},
    {"detach", (PyCFunction)DataPath_detach, METH_VARARGS,
     "detach(slot, mode=0) -> (python ops, write regions, reads to retry)"},
    {"set_links", (PyCFunction)DataPath_set_links, METH_VARARGS,
     "set_links(write slots, read slot or -1, dirty maps of replicas missing writes)"},
    {"send", (PyCFunction)(void (*)(void))DataPath_send, METH_VARARGS | METH_KEYWORDS,
     "send(slot, op, wire_op, flags=0, offset=0, count=0, payload=None) -> request id (0: detached)"},
    {"issue_write", (PyCFunction)DataPath_issue_write, METH_VARARGS,
     "issue_write(unique, wire_op, offset, length, data): fan out to the write set"},
    {"issue_read", (PyCFunction)DataPath_issue_read, METH_VARARGS,
     "issue_read(unique, offset, length) -> False if there is no read replica"},
    {"conflicts", (PyCFunction)DataPath_conflicts, METH_VARARGS, "conflicts(offset, length) -> bool"},
    {"register", (PyCFunction)DataPath_register, METH_VARARGS, "register(offset, length) -> token"},
    {"unregister", (PyCFunction)DataPath_unregister, METH_O, "unregister(token) -> whether it was there"},
    {"al_cold", (PyCFunction)DataPath_al_cold, METH_VARARGS, "al_cold(offset, length) -> extents not hot"},
    {"al_add", (PyCFunction)DataPath_al_add, METH_O, "al_add(extents): now in the activity log"},
    {"al_evict", (PyCFunction)DataPath_al_evict, METH_VARARGS,
     "al_evict(max, target) -> least recently used cold extents removed"},
    {"al_hot_extents", (PyCFunction)DataPath_al_hot_extents, METH_NOARGS, "extents in the activity log"},
    {"al_is_hot", (PyCFunction)DataPath_al_is_hot, METH_O, "al_is_hot(extent) -> bool"},
    {"al_clear", (PyCFunction)DataPath_al_clear, METH_NOARGS, "forget every extent"},
    {"grow", (PyCFunction)DataPath_grow, METH_O, "grow(size_bytes): the volume grew"},
    {"release_held", (PyCFunction)DataPath_release_held, METH_NOARGS, "answer held completions"},
    {"fail_writes", (PyCFunction)DataPath_fail_writes, METH_O,
     "fail_writes(errno): fail every unanswered write, held ones too"},
    {"on_event", (PyCFunction)DataPath_on_event, METH_VARARGS,
     "on_event(tag, events) -> False if the tag is not ours"},
    {"poll", (PyCFunction)DataPath_poll, METH_VARARGS,
     "poll(timeout_ms, spin_ms=0) -> [(fd, events)] not ours"},
    {"flush", (PyCFunction)DataPath_flush, METH_NOARGS, "send what is queued, one send per link"},
    {"pending", (PyCFunction)DataPath_pending, METH_O, "pending(slot) -> unanswered requests"},
    {"oldest", (PyCFunction)DataPath_oldest, METH_O, "oldest(slot) -> send time of the oldest, or None"},
    {"python_ops", (PyCFunction)DataPath_python_ops, METH_O, "python_ops(slot) -> pending Python ops"},
    {"stats", (PyCFunction)DataPath_stats, METH_NOARGS, "counters"},
    {NULL},
};

static PyTypeObject DataPathType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "mirror._fastpath.DataPath",
    .tp_basicsize = sizeof(DataPath),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The frontend's data path: FUSE requests in, replica requests out, replies matched.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)DataPath_init,
    .tp_dealloc = (destructor)DataPath_dealloc,
    .tp_traverse = (traverseproc)DataPath_traverse,
    .tp_clear = (inquiry)DataPath_clear,
    .tp_methods = DataPath_methods,
    .tp_getset = DataPath_getset,
};

/* ------------------------------------------------------------------ replica side */

/* replica_apply(buffer, pos, end, fd, size_bytes, out) -> new pos
 *
 * Applies the plain WRITEs and READs (flags 0) at the front of buffer[pos:end]
 * to fd, appending their replies to the bytearray out, and stops at the first
 * request that is incomplete, malformed or anything else: Python handles it. */
static PyObject *replica_apply(PyObject *mod, PyObject *args)
{
    Py_buffer b;
    Py_ssize_t pos, end;
    int fd;
    unsigned long long size;
    PyObject *out;
    if (!PyArg_ParseTuple(args, "y*nniKY", &b, &pos, &end, &fd, &size, &out))
        return NULL;
    if (pos < 0 || end < pos || end > b.len) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "bad pos/end");
        return NULL;
    }
    const char *buf = b.buf;
    size_t need = 0, count = 0;
    Py_ssize_t p = pos;
    while (end - p >= REQ_BYTES) {
        const char *h = buf + p;
        uint32_t length = ld32(h);
        int op = (unsigned char)h[4], flags = (unsigned char)h[5];
        if (length < REQ_BYTES || length > REQ_BYTES + MAX_PAYLOAD || end - p < (Py_ssize_t)length)
            break;
        if (op == W_WRITE) {
            need += REP_BYTES;
        } else if (op == W_READ && flags == 0 && length == REQ_BYTES) {
            uint64_t off = ld64(h + 16), cnt = ld32(h + 24);
            need += REP_BYTES + (off <= size && cnt <= size - off && cnt <= MAX_PAYLOAD ? cnt : 0);
        } else {
            break;
        }
        count++;
        p += length;
    }
    if (count == 0) {
        PyBuffer_Release(&b);
        return PyLong_FromSsize_t(pos);
    }
    Py_ssize_t old = PyByteArray_GET_SIZE(out);
    if (PyByteArray_Resize(out, old + (Py_ssize_t)need) < 0) {
        PyBuffer_Release(&b);
        return NULL;
    }
    char *o = PyByteArray_AS_STRING(out) + old;
    size_t used = 0;
    Py_BEGIN_ALLOW_THREADS
    p = pos;
    for (size_t i = 0; i < count; i++) {
        const char *h = buf + p;
        uint32_t length = ld32(h);
        int op = (unsigned char)h[4];
        uint64_t rid = ld64(h + 8), off = ld64(h + 16), cnt = ld32(h + 24);
        char *r = o + used;
        int32_t status = 0;
        uint32_t rlen = REP_BYTES;
        if (op == W_WRITE) {
            if (cnt != length - REQ_BYTES || off > size || cnt > size - off) {
                status = -EINVAL;
            } else {
                const char *d = h + REQ_BYTES;
                uint64_t done = 0;
                while (done < cnt) {
                    ssize_t w = pwrite(fd, d + done, cnt - done, (off_t)(off + done));
                    if (w < 0) {
                        if (errno == EINTR)
                            continue;
                        status = -errno;
                        break;
                    }
                    if (w == 0) {
                        status = -EIO;
                        break;
                    }
                    done += (uint64_t)w;
                }
            }
        } else if (off > size || cnt > size - off || cnt > MAX_PAYLOAD) {
            status = -EINVAL;
        } else {
            char *d = r + REP_BYTES;
            uint64_t done = 0;
            while (done < cnt) {
                ssize_t n = pread(fd, d + done, cnt - done, (off_t)(off + done));
                if (n < 0) {
                    if (errno == EINTR)
                        continue;
                    status = -errno;
                    break;
                }
                if (n == 0) { /* past the end of a short file: zeros */
                    memset(d + done, 0, cnt - done);
                    done = cnt;
                    break;
                }
                done += (uint64_t)n;
            }
            if (status == 0)
                rlen += (uint32_t)cnt;
        }
        st32(r, rlen);
        st32(r + 4, (uint32_t)status);
        st64(r + 8, rid);
        used += rlen;
        p += length;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    if (used != need && PyByteArray_Resize(out, old + (Py_ssize_t)used) < 0)
        return NULL;
    return PyLong_FromSsize_t(p);
}

static PyMethodDef module_methods[] = {
    {"replica_apply", replica_apply, METH_VARARGS,
     "replica_apply(buffer, pos, end, fd, size_bytes, out) -> new pos"},
    {NULL},
};

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT, .m_name = "mirror._fastpath",
    .m_doc = "The mirror's data-path hot loops (see docs/mirror.md).", .m_size = -1, .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__fastpath(void)
{
    if (PyType_Ready(&DataPathType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&fastpath_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "DataPath", (PyObject *)&DataPathType) < 0 ||
        PyModule_AddIntConstant(m, "REQ_BYTES", REQ_BYTES) < 0 ||
        PyModule_AddIntConstant(m, "REP_BYTES", REP_BYTES) < 0 ||
        PyModule_AddIntConstant(m, "MAX_PAYLOAD_BYTES", (long)MAX_PAYLOAD) < 0 ||
        PyModule_AddIntConstant(m, "MAX_LINKS", MAX_LINKS) < 0 ||
        PyModule_AddIntConstant(m, "DETACH_ACK", MODE_ACK) < 0 ||
        PyModule_AddIntConstant(m, "DETACH_FAIL", MODE_FAIL) < 0 ||
        PyModule_AddIntConstant(m, "DETACH_DROP", MODE_DROP) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

/* The compiled core: the two lock holds of every call, and least_loaded's scan.
 *
 * An optional accelerator of the pure Python reference in `_state.py` (`SharedState._commit`,
 * `SharedState._finish`) and `_strategies.py` (`LeastLoaded`): the same segment words, the same
 * semaphore, the same holder record, the same writes in the same order, so that both leave the
 * same bytes (tests/test_speedups.py checks it). Whatever is not the common case (the lock is
 * taken, a failure, a load report, a draining backend, a call made with keywords) goes to the
 * Python reference, which stays the one place those cases are written.
 *
 * Nothing here waits: a hold starts with sem_trywait, and a taken lock is left to the Python
 * path, which waits with the GIL released and recovers a lock whose holder died. Nothing here
 * allocates or calls Python code while holding the lock, and the GIL is held throughout, so no
 * signal handler runs between taking the lock and recording what the hold did.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <math.h>
#include <semaphore.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

static PyObject *monotonic_ns;   /* time.monotonic_ns: read directly as CLOCK_MONOTONIC */

/* The constants of `_latency`, given by `configure` so that they are written in one place. */
static double decay_ns, failure_penalty_ns;
static int64_t stale_ns, buckets;
static PyObject *clock_name;     /* "clock", the owner's attribute */

/* HotPath ---------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    Py_buffer buffer;
    int64_t *words;     /* NULL once released: every call then goes to the Python path */
    double *floats;
    sem_t *sem;
    PyObject *semaphore;    /* keeps `sem` open */
    PyObject *commit;       /* the Python reference, for every case not handled here */
    PyObject *finish;
    PyObject *owner;        /* the SharedState, whose `clock` times calls */
    PyObject *ended;        /* ENDED, the generation of a call whose end is recorded */
    Py_ssize_t h_lock_pid, h_version, h_cursor;
    Py_ssize_t in_flight, generation, state, requests, consecutive, ewma, stamp, histogram;
    Py_ssize_t capacity;
    int64_t draining;
    Py_ssize_t t_slot, t_generation, t_start, t_size; /* where a call's ticket keeps what */
    Py_ssize_t own_row;
    int64_t pid;
} HotPath;

static int
as_int64(PyObject *obj, int64_t *out)
{
    if (!PyLong_Check(obj)) {
        return -1;
    }
    int overflow = 0;
    long long value = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (overflow || (value == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return -1;
    }
    *out = (int64_t)value;
    return 0;
}

static int
HotPath_init(HotPath *self, PyObject *args, PyObject *kwds)
{
    static char *names[] = {
        "buffer", "semaphore", "commit", "finish", "owner", "header", "columns", "capacity",
        "draining", "ended", "ticket", NULL};
    PyObject *buffer, *semaphore, *commit, *finish, *owner, *ended;
    Py_ssize_t capacity;
    long long draining;
    if (self->words != NULL) { /* before parsing, which writes the offsets in place */
        PyErr_SetString(PyExc_RuntimeError, "HotPath is already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(
            args, kwds, "$OOOOO(nnn)(nnnnnnnn)nLO!(nnn)", names, &buffer, &semaphore, &commit,
            &finish, &owner, &self->h_lock_pid, &self->h_version, &self->h_cursor,
            &self->in_flight, &self->generation, &self->state, &self->requests,
            &self->consecutive, &self->ewma, &self->stamp, &self->histogram, &capacity,
            &draining, &PyLong_Type, &ended, &self->t_slot, &self->t_generation,
            &self->t_start)) {
        return -1;
    }
    if (self->t_slot < 0 || self->t_generation < 0 || self->t_start < 0) {
        PyErr_SetString(PyExc_ValueError, "ticket indices must be >= 0");
        return -1;
    }
    self->t_size = 1 + (self->t_slot > self->t_generation ? self->t_slot : self->t_generation);
    self->t_size = self->t_size > self->t_start ? self->t_size : self->t_start + 1;
    PyObject *handle = PyObject_GetAttrString(semaphore, "handle");
    if (handle == NULL) {
        return -1;
    }
    self->sem = (sem_t *)PyLong_AsVoidPtr(handle);
    Py_DECREF(handle);
    if (self->sem == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_ValueError, "the semaphore has no handle");
        }
        return -1;
    }
    if (PyObject_GetBuffer(buffer, &self->buffer, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        return -1;
    }
    Py_ssize_t words = self->buffer.len / 8;
    Py_ssize_t highest = self->histogram + capacity * buckets;
    Py_ssize_t columns[] = {self->in_flight, self->generation, self->state, self->requests,
                            self->consecutive, self->ewma, self->stamp};
    int fits = capacity > 0 && buckets > 0 && highest <= words && self->h_lock_pid < words &&
               self->h_version < words && self->h_cursor < words;
    for (size_t i = 0; i < sizeof(columns) / sizeof(columns[0]); i++) {
        fits = fits && columns[i] >= 0 && columns[i] + capacity <= words;
    }
    if (!fits || ((uintptr_t)self->buffer.buf % 8) != 0) {
        PyBuffer_Release(&self->buffer);
        PyErr_SetString(PyExc_ValueError, "the layout does not fit the buffer");
        return -1;
    }
    self->words = (int64_t *)self->buffer.buf;
    self->floats = (double *)self->buffer.buf;
    self->capacity = capacity;
    self->draining = (int64_t)draining;
    self->own_row = -1;
    self->pid = 0;
    Py_INCREF(semaphore);
    self->semaphore = semaphore;
    Py_INCREF(commit);
    self->commit = commit;
    Py_INCREF(finish);
    self->finish = finish;
    Py_INCREF(owner);
    self->owner = owner;
    Py_INCREF(ended);
    self->ended = ended;
    return 0;
}

static void
HotPath_release_buffer(HotPath *self)
{
    if (self->words != NULL) {
        self->words = NULL;
        self->floats = NULL;
        PyBuffer_Release(&self->buffer);
    }
}

static int
HotPath_traverse(HotPath *self, visitproc visit, void *arg)
{
    Py_VISIT(self->semaphore);
    Py_VISIT(self->commit);
    Py_VISIT(self->finish);
    Py_VISIT(self->owner);
    Py_VISIT(self->ended);
    return 0;
}

static int
HotPath_clear(HotPath *self)
{
    HotPath_release_buffer(self);
    Py_CLEAR(self->semaphore);
    Py_CLEAR(self->commit);
    Py_CLEAR(self->finish);
    Py_CLEAR(self->owner);
    Py_CLEAR(self->ended);
    return 0;
}

static void
HotPath_dealloc(HotPath *self)
{
    PyObject_GC_UnTrack(self);
    HotPath_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Take the lock if it is free; 0 if taken, -1 with an exception set on an error. */
static int
take(HotPath *self)
{
    if (sem_trywait(self->sem) == 0) {
        return 1;
    }
    if (errno == EAGAIN || errno == EINTR) {
        return 0;
    }
    PyErr_SetFromErrno(PyExc_OSError);
    return -1;
}

static void
give_back(HotPath *self)
{
    self->words[self->h_lock_pid] = 0;
    sem_post(self->sem);
}

/* commit(version, slot, cursor, call[, blocking]) -> bool: `SharedState._commit`. */
static PyObject *
HotPath_commit(HotPath *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    int64_t version, slot, cursor;
    if (kwnames != NULL || nargs < 4 || nargs > 5 || self->words == NULL || self->own_row < 0) {
        goto python;
    }
    PyObject *call = args[3];
    if (!PyList_CheckExact(call) || PyList_GET_SIZE(call) < self->t_size ||
        as_int64(args[0], &version) ||
        as_int64(args[1], &slot) || as_int64(args[2], &cursor) || slot < 0 ||
        slot >= self->capacity || cursor == INT64_MAX) {
        goto python;
    }
    int64_t *w = self->words;
    /* The generation's int is made before the hold; a generation that moved meanwhile (the
     * slot was re-registered, which also moves the version) voids the pick. */
    int64_t generation = w[self->generation + slot];
    PyObject *counted_generation = PyLong_FromLongLong(generation);
    if (counted_generation == NULL) {
        return NULL;
    }
    int got = take(self);
    if (got <= 0) {
        Py_DECREF(counted_generation);
        if (got < 0) {
            return NULL;
        }
        goto python;
    }
    w[self->h_lock_pid] = self->pid;
    PyObject *old = NULL;
    int counted = w[self->h_version] == version && (cursor < 0 || w[self->h_cursor] == cursor) &&
                  w[self->generation + slot] == generation;
    if (counted) {
        if (cursor >= 0) {
            w[self->h_cursor] = cursor + 1;
        }
        w[self->own_row + slot] += 1;
        w[self->in_flight + slot] += 1;
        old = PyList_GET_ITEM(call, self->t_generation);
        PyList_SET_ITEM(call, self->t_generation, counted_generation);
        counted_generation = NULL;
    }
    give_back(self);
    Py_XDECREF(old);
    Py_XDECREF(counted_generation);
    return PyBool_FromLong(counted);

python:
    return PyObject_Vectorcall(self->commit, args, nargs, kwnames);
}

/* `_layout.bucket_of`. */
static int64_t
bucket_of(int64_t latency)
{
    if (latency < 2) {
        return 0;
    }
    int64_t bits = 64 - __builtin_clzll((unsigned long long)latency);
    int64_t bucket = 2 * bits + ((latency >> (bits - 2)) & 1) - 2;
    return bucket < buckets - 1 ? bucket : buckets - 1;
}

/* `_latency.peak_ewma`, operation for operation. */
static double
peak_ewma(double average, int64_t stamp, double sample, int64_t now)
{
    int64_t age = now - stamp;
    if (average <= 0.0 || (age >= stale_ns && average < failure_penalty_ns)) {
        return sample;
    }
    double weight = exp(-(double)(age > 0 ? age : 0) / decay_ns);
    double current = average * weight;
    if (current <= 0.0 || sample >= current) {
        return sample;
    }
    return current * weight + sample * (1.0 - weight);
}

/* The owner's clock: CLOCK_MONOTONIC read here when it is time.monotonic_ns. */
static int
now_ns(HotPath *self, int64_t *now)
{
    PyObject *clock = PyObject_GetAttr(self->owner, clock_name);
    if (clock == NULL) {
        return -1;
    }
    if (clock == monotonic_ns) {
        Py_DECREF(clock);
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        *now = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
        return 0;
    }
    PyObject *value = PyObject_CallNoArgs(clock);
    Py_DECREF(clock);
    if (value == NULL) {
        return -1;
    }
    int bad = as_int64(value, now);
    Py_DECREF(value);
    if (bad) {
        PyErr_SetString(PyExc_TypeError, "the clock must return an int of nanoseconds");
        return -1;
    }
    return 0;
}

/* finish(call, outcome[, blocking[, report]]) -> None: `SharedState._finish`, for a call that
 * succeeded with no load report on a backend that is not draining. */
static PyObject *
HotPath_finish(HotPath *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    int64_t outcome, slot, generation, start;
    if (kwnames != NULL || nargs < 2 || nargs > 4 || self->words == NULL || self->own_row < 0 ||
        (nargs == 4 && args[3] != Py_None)) {
        goto python;
    }
    PyObject *call = args[0];
    if (!PyList_CheckExact(call) || PyList_GET_SIZE(call) < self->t_size ||
        as_int64(args[1], &outcome) || outcome != 0) {
        goto python;
    }
    PyObject *ticket = PyList_GET_ITEM(call, self->t_generation);
    if (as_int64(PyList_GET_ITEM(call, self->t_slot), &slot) || as_int64(ticket, &generation) ||
        as_int64(PyList_GET_ITEM(call, self->t_start), &start) || slot < 0 ||
        slot >= self->capacity) {
        goto python;
    }
    if (generation < 0) {
        Py_RETURN_NONE;
    }
    Py_INCREF(ticket); /* so that finding it in the call below means it was left alone */
    int64_t now = 0, bucket = -1;
    double ewma = 0.0;
    if (start != 0) {
        if (now_ns(self, &now) < 0 || self->words == NULL ||
            PyList_GET_SIZE(call) < self->t_size) {
            Py_DECREF(ticket);
            if (PyErr_Occurred()) {
                return NULL;
            }
            goto python; /* the clock's code closed the state or changed the call */
        }
        int64_t latency = now - start;
        bucket = self->histogram + slot * buckets + bucket_of(latency);
        double average = self->floats[self->ewma + slot];
        int64_t stamp = self->words[self->stamp + slot];
        double sample = (double)latency;
        ewma = sample >= average ? sample : peak_ewma(average, stamp, sample, now);
    }
    int got = take(self);
    if (got <= 0) {
        Py_DECREF(ticket);
        if (got < 0) {
            return NULL;
        }
        goto python;
    }
    int64_t *w = self->words;
    w[self->h_lock_pid] = self->pid;
    int ours = PyList_GET_ITEM(call, self->t_generation) == ticket &&
               w[self->generation + slot] == generation;
    if (ours && w[self->state + slot] == self->draining) {
        give_back(self); /* the backend is leaving: the Python path frees its slot */
        Py_DECREF(ticket);
        goto python;
    }
    if (ours) {
        w[self->in_flight + slot] -= 1;
        w[self->own_row + slot] -= 1;
    }
    Py_INCREF(self->ended);
    PyObject *old = PyList_GET_ITEM(call, self->t_generation);
    PyList_SET_ITEM(call, self->t_generation, self->ended);
    if (ours) {
        w[self->requests + slot] += 1;
        if (bucket >= 0) {
            w[bucket] += 1;
            self->floats[self->ewma + slot] = ewma;
            w[self->stamp + slot] = now;
        }
        w[self->consecutive + slot] = 0;
    }
    give_back(self);
    Py_DECREF(old);
    Py_DECREF(ticket);
    Py_RETURN_NONE;

python:
    return PyObject_Vectorcall(self->finish, args, nargs, kwnames);
}

static PyObject *
HotPath_release(HotPath *self, PyObject *Py_UNUSED(ignored))
{
    HotPath_release_buffer(self);
    Py_RETURN_NONE;
}

static PyObject *
HotPath_get_pid(HotPath *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLongLong(self->pid);
}

static int
HotPath_set_pid(HotPath *self, PyObject *value, void *Py_UNUSED(closure))
{
    int64_t pid;
    if (value == NULL || as_int64(value, &pid) || pid <= 0) {
        PyErr_SetString(PyExc_ValueError, "pid must be a positive int");
        return -1;
    }
    self->pid = pid;
    return 0;
}

static PyObject *
HotPath_get_own_row(HotPath *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(self->own_row);
}

static int
HotPath_set_own_row(HotPath *self, PyObject *value, void *Py_UNUSED(closure))
{
    int64_t row;
    if (value == NULL || as_int64(value, &row) || row < -1 ||
        (self->words != NULL && row + self->capacity > self->buffer.len / 8)) {
        PyErr_SetString(PyExc_ValueError, "own_row must be -1 or a worker row's first word");
        return -1;
    }
    self->own_row = (Py_ssize_t)row;
    return 0;
}

static PyMethodDef HotPath_methods[] = {
    {"commit", (PyCFunction)(void (*)(void))HotPath_commit, METH_FASTCALL | METH_KEYWORDS,
     "commit(version, slot, cursor, call, blocking=True) -> bool"},
    {"finish", (PyCFunction)(void (*)(void))HotPath_finish, METH_FASTCALL | METH_KEYWORDS,
     "finish(call, outcome, blocking=True, report=None) -> None"},
    {"release", (PyCFunction)HotPath_release, METH_NOARGS,
     "Drop the buffer, so that the segment can be closed; every later call goes to Python."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef HotPath_getset[] = {
    {"pid", (getter)HotPath_get_pid, (setter)HotPath_set_pid, "Recorded as the lock's holder.",
     NULL},
    {"own_row", (getter)HotPath_get_own_row, (setter)HotPath_set_own_row,
     "Word index of slot 0 of this process's worker row; -1 until it claims one.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject HotPathType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dispatcher._speedups.HotPath",
    .tp_doc = "The commit and finish of `SharedState`, on one segment and its semaphore.",
    .tp_basicsize = sizeof(HotPath),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)HotPath_init,
    .tp_dealloc = (destructor)HotPath_dealloc,
    .tp_traverse = (traverseproc)HotPath_traverse,
    .tp_clear = (inquiry)HotPath_clear,
    .tp_methods = HotPath_methods,
    .tp_getset = HotPath_getset,
};

/* EqualScan ------------------------------------------------------------------------------- */

/* `LeastLoaded.pick` over contiguous slots of equal weight with no penalties, choice for
 * choice as the Python path (`_strategies._Scan`): all idle, the next in turn from
 * `turns[0]`; else an idle one drawn with the generator in `turns[1]`, else the first idle
 * after the last draw; none idle, the same among the least loaded. */
typedef struct {
    PyObject_HEAD
    Py_ssize_t lo, hi;
    PyObject *turns;    /* a writable buffer of two int64: the next turn, the draws' state */
    Py_buffer turn;
} EqualScan;

static int
EqualScan_init(EqualScan *self, PyObject *args, PyObject *kwds)
{
    static char *names[] = {"lo", "hi", "turns", NULL};
    PyObject *turns;
    Py_ssize_t lo, hi;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "$nnO", names, &lo, &hi, &turns)) {
        return -1;
    }
    if (self->turns != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "EqualScan is already initialised");
        return -1;
    }
    if (lo < 0 || hi - lo < 2) {
        PyErr_SetString(PyExc_ValueError, "EqualScan: fewer than two slots");
        return -1;
    }
    if (PyObject_GetBuffer(turns, &self->turn, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        return -1;
    }
    if (self->turn.len < 16 || ((uintptr_t)self->turn.buf % 8) != 0) {
        PyBuffer_Release(&self->turn);
        PyErr_SetString(PyExc_ValueError, "turns must hold two aligned int64");
        return -1;
    }
    self->lo = lo;
    self->hi = hi;
    self->turns = Py_NewRef(turns);
    return 0;
}

static int
EqualScan_traverse(EqualScan *self, visitproc visit, void *arg)
{
    Py_VISIT(self->turns);
    return 0;
}

static int
EqualScan_clear(EqualScan *self)
{
    if (self->turns != NULL) {
        PyBuffer_Release(&self->turn);
        Py_CLEAR(self->turns);
    }
    return 0;
}

static void
EqualScan_dealloc(EqualScan *self)
{
    PyObject_GC_UnTrack(self);
    EqualScan_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

#define DRAWS 4
#define MULTIPLIER 6364136223846793005ULL
#define INCREMENT 1442695040888963407ULL
#define MASK 0x7fffffffffffffffULL

/* `_draw_idle` (`low` 0) or `_draw_least`'s draws, then `_nth`: a slot counting `low`, each
 * as likely; -1 if none does. */
static Py_ssize_t
draw(const volatile int64_t *counts, Py_ssize_t n, int64_t low, int64_t *turns)
{
    uint64_t state = (uint64_t)turns[1];
    for (int k = 0; k < DRAWS; k++) {
        state = (state * MULTIPLIER + INCREMENT) & MASK;
        Py_ssize_t i = (Py_ssize_t)((state >> 31) % (uint64_t)n);
        if (counts[i] == low) {
            turns[1] = (int64_t)state;
            return i;
        }
    }
    turns[1] = (int64_t)state;
    Py_ssize_t tied = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        tied += counts[i] == low;
    }
    if (tied == 0) {
        return -1;
    }
    state = (state * MULTIPLIER + INCREMENT) & MASK;
    turns[1] = (int64_t)state;
    Py_ssize_t rank = (Py_ssize_t)((state >> 31) % (uint64_t)tied);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (counts[i] == low && rank-- == 0) {
            return i;
        }
    }
    return -1; /* the counts moved meanwhile */
}

/* pick(in_flight) -> slot: the calls in flight by slot, as a buffer of int64. */
static PyObject *
EqualScan_pick(EqualScan *self, PyObject *in_flight)
{
    if (self->turns == NULL) {
        PyErr_SetString(PyExc_ValueError, "EqualScan is not initialised");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(in_flight, &view, PyBUF_C_CONTIGUOUS) < 0) {
        return NULL;
    }
    if (view.len < self->hi * 8) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "fewer counts than slots");
        return NULL;
    }
    /* Counts are read live, as the Python path reads them: other processes change them. */
    const volatile int64_t *counts = (const int64_t *)view.buf + self->lo;
    Py_ssize_t n = self->hi - self->lo;
    int64_t *turns = (int64_t *)self->turn.buf;
    Py_ssize_t chosen = -1;
    /* All idle: an OR over the counts, which the compiler vectorises; as the Python path's
     * bytes compare, it may see a count change that lands meanwhile, or not. */
    const int64_t *plain = (const int64_t *)view.buf + self->lo;
    int64_t any = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        any |= plain[i];
    }
    int all_idle = any == 0;
    if (all_idle) {
        Py_ssize_t turn = (Py_ssize_t)(turns[0] % n);
        chosen = turn < 0 ? turn + n : turn; /* Python's modulo */
        turns[0] = chosen + 1;
    }
    else {
        chosen = draw(counts, n, 0, turns);
        if (chosen < 0) {
            Py_ssize_t least = 0;
            int64_t low = counts[0];
            for (Py_ssize_t i = 1; i < n; i++) {
                int64_t count = counts[i];
                if (count < low) {
                    least = i;
                    low = count;
                }
            }
            chosen = draw(counts, n, low, turns);
            if (chosen < 0) {
                chosen = least; /* the counts moved since they were read: the least seen */
            }
        }
    }
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(self->lo + chosen);
}

static PyMethodDef EqualScan_methods[] = {
    {"pick", (PyCFunction)EqualScan_pick, METH_O,
     "pick(in_flight) -> slot, from the calls in flight by slot (a buffer of int64)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EqualScanType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dispatcher._speedups.EqualScan",
    .tp_doc = "least_loaded's pick over contiguous slots of equal weight.",
    .tp_basicsize = sizeof(EqualScan),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)EqualScan_init,
    .tp_dealloc = (destructor)EqualScan_dealloc,
    .tp_traverse = (traverseproc)EqualScan_traverse,
    .tp_clear = (inquiry)EqualScan_clear,
    .tp_methods = EqualScan_methods,
};

/* Module ----------------------------------------------------------------------------------- */

static PyObject *
configure(PyObject *Py_UNUSED(module), PyObject *args, PyObject *kwds)
{
    static char *names[] = {"decay_ns", "stale_ns", "failure_penalty_ns", "buckets", NULL};
    long long stale, bucket_count;
    if (!PyArg_ParseTupleAndKeywords(
            args, kwds, "$dLdL", names, &decay_ns, &stale, &failure_penalty_ns,
            &bucket_count)) {
        return NULL;
    }
    stale_ns = (int64_t)stale;
    buckets = (int64_t)bucket_count;
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"configure", (PyCFunction)(void (*)(void))configure, METH_VARARGS | METH_KEYWORDS,
     "Give the constants of `_latency` and `_layout` that the hot path uses."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "dispatcher._speedups",
    .m_doc = "The compiled core of dispatcher's hot path (optional: see `_core`).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if (PyType_Ready(&HotPathType) < 0 || PyType_Ready(&EqualScanType) < 0) {
        return NULL;
    }
    PyObject *time = PyImport_ImportModule("time");
    if (time == NULL) {
        return NULL;
    }
    monotonic_ns = PyObject_GetAttrString(time, "monotonic_ns");
    Py_DECREF(time);
    clock_name = PyUnicode_InternFromString("clock");
    if (monotonic_ns == NULL || clock_name == NULL) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "HotPath", (PyObject *)&HotPathType) < 0 ||
        PyModule_AddObjectRef(m, "EqualScan", (PyObject *)&EqualScanType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

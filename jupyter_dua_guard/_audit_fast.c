/*
 * Optional C fast path of the jupyter-dua-guard audit hook.
 *
 * A hook registered with sys.addaudithook is a Python call on *every* audit event,
 * including builtins.id, which copy.deepcopy raises several times per object. This hook,
 * added with PySys_AddAuditHook, filters the event name in C and enters Python only for
 * the few events the guard handles, calling that event's handler directly. install()
 * works once per process; the handlers and the event names are kept in static storage
 * that Python code cannot reach or reset.
 *
 * The package works without this module (pure-Python hook) where no compiler exists.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#if defined(__GNUC__) || defined(__clang__)
#define GUARD_NOINLINE __attribute__((noinline))
#define GUARD_UNLIKELY(x) __builtin_expect(!!(x), 0)
#else
#define GUARD_NOINLINE
#define GUARD_UNLIKELY(x) (x)
#endif

#define MAX_EVENTS 64
#define MAX_NAME 64
#define CLEAR_HOOKS_EVENT "cpython._PySys_ClearAuditHooks"

static PyObject *handlers = NULL; /* tuple: handlers[i] handles events[i] */
static PyInterpreterState *owner = NULL;
static int n_events = 0;
static char events[MAX_EVENTS][MAX_NAME];
/* Nonzero for the first byte of each handled event name. Every other event (builtins.id,
   exec, compile, object.__getattr__, ...) is decided by this one load. */
static unsigned char first_chars[256];

static void
strip_guard_frames(void)
{
    /* Drop the guard's own frames from the error so that user code cannot reach the
       handler's locals through the traceback. */
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    Py_XDECREF(tb);
    if (value != NULL) {
        PyException_SetTraceback(value, Py_None);
        PyException_SetContext(value, NULL);
        PyException_SetCause(value, NULL);
    }
    PyErr_Restore(type, value, NULL);
}

/* The rare events whose first byte matched: find the exact name and call its handler. */
static GUARD_NOINLINE int
handle_event(const char *event, PyObject *args)
{
    if (handlers == NULL) {
        return 0;
    }
    int i;
    for (i = 0; i < n_events; i++) {
        if (events[i][0] == event[0] && strcmp(event + 1, events[i] + 1) == 0) {
            break;
        }
    }
    if (i == n_events) {
        if (event[0] == 'c' && strcmp(event, CLEAR_HOOKS_EVENT) == 0) {
            /* interpreter shutdown: Python objects are going away */
            memset(first_chars, 0, sizeof(first_chars));
            handlers = NULL;
        }
        return 0;
    }
    if (PyInterpreterState_Get() != owner) {
        return 0; /* sub-interpreters do not share our Python objects */
    }
#if PY_VERSION_HEX >= 0x030B0000
    PyThreadState *ts = PyThreadState_Get();
    PyThreadState_EnterTracing(ts); /* like Python hooks: not traced, not profiled */
#endif
    PyObject *res = PyObject_CallOneArg(PyTuple_GET_ITEM(handlers, i), args);
#if PY_VERSION_HEX >= 0x030B0000
    PyThreadState_LeaveTracing(ts);
#endif
    if (res == NULL) {
        strip_guard_frames();
        return -1;
    }
    Py_DECREF(res);
    return 0;
}

/* Called by CPython for every audit event in the process: keep this to one table load. */
static int
guard_hook(const char *event, PyObject *args, void *data)
{
    (void)data;
    if (GUARD_UNLIKELY(first_chars[(unsigned char)event[0]])) {
        return handle_event(event, args);
    }
    return 0;
}

static PyObject *
install_handlers(PyObject *self, PyObject *args)
{
    PyObject *funcs, *names;
    (void)self;
    if (!PyArg_ParseTuple(args, "O!O!:install_handlers", &PyTuple_Type, &funcs, &PyTuple_Type,
                          &names)) {
        return NULL;
    }
    if (handlers != NULL || owner != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the guard's C audit hook is already installed");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(names);
    if (n > MAX_EVENTS || PyTuple_GET_SIZE(funcs) != n) {
        PyErr_SetString(PyExc_ValueError, "need one handler per event name, at most 64");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(names, i);
        const char *s = PyUnicode_Check(item) ? PyUnicode_AsUTF8(item) : NULL;
        if (s == NULL || strlen(s) == 0 || strlen(s) >= MAX_NAME) {
            PyErr_SetString(PyExc_ValueError, "event names must be short non-empty strings");
            return NULL;
        }
        if (!PyCallable_Check(PyTuple_GET_ITEM(funcs, i))) {
            PyErr_SetString(PyExc_TypeError, "every handler must be callable");
            return NULL;
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        const char *s = PyUnicode_AsUTF8(PyTuple_GET_ITEM(names, i));
        strcpy(events[i], s);
        first_chars[(unsigned char)s[0]] = 1;
    }
    first_chars[(unsigned char)CLEAR_HOOKS_EVENT[0]] = 1;
    n_events = (int)n;
    Py_INCREF(funcs);
    handlers = funcs;
    owner = PyInterpreterState_Get();
    if (PySys_AddAuditHook(guard_hook, NULL) < 0) {
        /* refused by an existing hook: keep state so that install cannot be retried */
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"install_handlers", install_handlers, METH_VARARGS,
     "install_handlers(handlers, event_names): add the guard's C audit hook, which calls\n"
     "handlers[i](args) for event_names[i] and ignores every other event (once per process)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_audit_fast",
    .m_doc = "C fast path of the jupyter-dua-guard audit hook.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__audit_fast(void)
{
    return PyModule_Create(&module);
}

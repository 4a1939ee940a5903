/*
 * Optional C fast path of the jupyter-dua-guard audit hook.
 *
 * A hook registered with sys.addaudithook is a Python call on *every* audit event,
 * including builtins.id, which copy.deepcopy raises once per object. This hook, added
 * with PySys_AddAuditHook, filters the event name in C and enters Python only for the
 * few events the guard handles. install() works once per process; the callback and the
 * event names are kept in static storage that Python code cannot reach or reset.
 *
 * The package works without this module (pure-Python hook) where no compiler exists.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define MAX_EVENTS 64
#define MAX_NAME 64

static PyObject *callback = NULL;
static PyInterpreterState *owner = NULL;
static int n_events = 0;
static char events[MAX_EVENTS][MAX_NAME];
static unsigned char first_chars[256];

static int
guard_hook(const char *event, PyObject *args, void *data)
{
    (void)data;
    if (callback == NULL || !first_chars[(unsigned char)event[0]]) {
        return 0;
    }
    int i;
    for (i = 0; i < n_events; i++) {
        if (strcmp(event, events[i]) == 0) {
            break;
        }
    }
    if (i == n_events) {
        if (strcmp(event, "cpython._PySys_ClearAuditHooks") == 0) {
            callback = NULL; /* interpreter shutdown: Python objects are going away */
        }
        return 0;
    }
    if (PyInterpreterState_Get() != owner) {
        return 0; /* sub-interpreters do not share our Python objects */
    }
    PyObject *name = PyUnicode_FromString(event);
    if (name == NULL) {
        return -1;
    }
#if PY_VERSION_HEX >= 0x030B0000
    PyThreadState *ts = PyThreadState_Get();
    PyThreadState_EnterTracing(ts); /* like Python hooks: not traced, not profiled */
#endif
    PyObject *res = PyObject_CallFunctionObjArgs(callback, name, args, NULL);
#if PY_VERSION_HEX >= 0x030B0000
    PyThreadState_LeaveTracing(ts);
#endif
    Py_DECREF(name);
    if (res == NULL) {
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
        return -1;
    }
    Py_DECREF(res);
    return 0;
}

static PyObject *
install(PyObject *self, PyObject *args)
{
    PyObject *func, *names;
    (void)self;
    if (!PyArg_ParseTuple(args, "OO!:install", &func, &PyTuple_Type, &names)) {
        return NULL;
    }
    if (callback != NULL || owner != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the guard's C audit hook is already installed");
        return NULL;
    }
    if (!PyCallable_Check(func)) {
        PyErr_SetString(PyExc_TypeError, "callback must be callable");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(names);
    if (n > MAX_EVENTS) {
        PyErr_SetString(PyExc_ValueError, "too many event names");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(names, i);
        const char *s = PyUnicode_Check(item) ? PyUnicode_AsUTF8(item) : NULL;
        if (s == NULL || strlen(s) == 0 || strlen(s) >= MAX_NAME) {
            PyErr_SetString(PyExc_ValueError, "event names must be short non-empty strings");
            return NULL;
        }
        strcpy(events[i], s);
        first_chars[(unsigned char)s[0]] = 1;
    }
    first_chars[(unsigned char)'c'] = 1; /* cpython._PySys_ClearAuditHooks */
    n_events = (int)n;
    Py_INCREF(func);
    callback = func;
    owner = PyInterpreterState_Get();
    if (PySys_AddAuditHook(guard_hook, NULL) < 0) {
        /* refused by an existing hook: keep state so that install() cannot be retried */
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"install", install, METH_VARARGS,
     "install(callback, event_names): add the guard's C audit hook (once per process)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_audit_fast",
    "C fast path of the jupyter-dua-guard audit hook.", -1, methods,
};

PyMODINIT_FUNC
PyInit__audit_fast(void)
{
    return PyModule_Create(&module);
}

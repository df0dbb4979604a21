/* Ingest's rows into a claimed record's columns in one call (stages/ingest/rows.py,
 * RowBuffer.write): the row buffer keeps each column as a Python list, and numpy would make a
 * view of each column and convert each list element by element through its generic machinery. In
 * the worker, between two records ~45 network reads run, and the views and assignments cost ~30 us
 * of a record's ~90 us, most of it the code of that machinery coming back into the caches.
 *
 * Where the columns lie comes from shm.batch.write_header (the batch format's one home); their
 * order and types are checked against shm.batch.BASE_COLUMNS before this module is used (COLUMNS).
 * The numpy assignments (rows.assign_columns) stay the reference (the tests compare the records the
 * two write) and the fallback where this module is not built.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* shm.batch.BASE_COLUMNS, the batch format's one home: rows.py takes this module only while the
 * two agree (COLUMNS below), then the text arena. */
enum { STREAM_ID, SEQ, RECV_NS, TOKEN_ID, LOGPROB, TEXT_END, KIND, TEXT, COLUMNS };
static const char *const NAMES[COLUMNS] = {"stream_id", "seq", "recv_ns", "token_id", "logprob", "text_end", "kind", "text"};
static const char *const DTYPES[COLUMNS - 1] = {"<u8", "<u8", "<i8", "<u4", "<f4", "<u4", "u1"};
static const Py_ssize_t ITEM[COLUMNS] = {8, 8, 8, 4, 4, 4, 1, 1};

/* Row i of a list of ints (`stream_id`, `seq`, `kind`, `token_id`) as an unsigned integer; -1 and
 * an exception when it is not one or does not fit `bits` bits. */
static int unsigned_at(PyObject *list, Py_ssize_t i, int bits, uint64_t *out, const char *name) {
    unsigned long long v = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(list, i));
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if (bits < 64 && v >> bits) {
        PyErr_Format(PyExc_OverflowError, "fill: %s %llu of row %zd does not fit %d bits", name, v, i, bits);
        return -1;
    }
    *out = v;
    return 0;
}

PyDoc_STRVAR(fill_doc,
             "fill(record, offsets: tuple, rows: tuple) -> None\n\n"
             "Write a batch's base columns and text arena into the writable buffer ``record``, at\n"
             "``offsets`` (shm.batch.write_header's: BASE_COLUMNS' order, then the arena), from the\n"
             "row lists sids, seqs, kinds, token_ids, logprobs (floats), recv_ns and texts (bytes),\n"
             "all of one length; the texts' bytes end at the record's end or before it.");

/* `value` stored at byte `at` of `base` (memcpy: the record's alignment is the ring's business). */
#define PUT(base, at, value) memcpy((base) + (at), &(value), sizeof(value))

static PyObject *fill(PyObject *module, PyObject *args) {
    PyObject *record, *offsets, *rows;
    if (!PyArg_ParseTuple(args, "OO!O!:fill", &record, &PyTuple_Type, &offsets, &PyTuple_Type, &rows))
        return NULL;
    if (PyTuple_GET_SIZE(offsets) != COLUMNS || PyTuple_GET_SIZE(rows) != COLUMNS - 1) {
        PyErr_SetString(PyExc_TypeError, "fill: 8 offsets and 7 row lists");
        return NULL;
    }
    PyObject *lists[COLUMNS] = {NULL}; /* by column; text_end has no list of its own */
    Py_ssize_t n = -1;
    /* the row lists in fill's argument order: sids, seqs, kinds, token_ids, logprobs, recv_ns, texts */
    static const int ROW_OF[COLUMNS - 1] = {STREAM_ID, SEQ, KIND, TOKEN_ID, LOGPROB, RECV_NS, TEXT};
    for (int c = 0; c < COLUMNS - 1; c++) {
        PyObject *list = PyTuple_GET_ITEM(rows, c);
        if (!PyList_CheckExact(list) || (n >= 0 && PyList_GET_SIZE(list) != n)) {
            PyErr_Format(PyExc_TypeError, "fill: the row lists must be lists of one length (%s)", NAMES[ROW_OF[c]]);
            return NULL;
        }
        n = PyList_GET_SIZE(list);
        lists[ROW_OF[c]] = list;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(record, &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    PyObject *result = NULL;
    char *base = view.buf;
    Py_ssize_t at[COLUMNS];
    for (int c = 0; c < COLUMNS; c++) {
        at[c] = PyLong_AsSsize_t(PyTuple_GET_ITEM(offsets, c));
        if (at[c] == -1 && PyErr_Occurred())
            goto done;
        if (at[c] < 0 || (c < TEXT && at[c] > view.len - n * ITEM[c])) {
            PyErr_Format(PyExc_ValueError, "fill: column %s at %zd does not fit the %zd-byte record", NAMES[c], at[c],
                         view.len);
            goto done;
        }
    }
    Py_ssize_t text = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t v;
        if (unsigned_at(lists[STREAM_ID], i, 64, &v, "stream_id") < 0)
            goto done;
        PUT(base, at[STREAM_ID] + 8 * i, v);
        if (unsigned_at(lists[SEQ], i, 64, &v, "seq") < 0)
            goto done;
        PUT(base, at[SEQ] + 8 * i, v);
        if (unsigned_at(lists[KIND], i, 8, &v, "kind") < 0)
            goto done;
        base[at[KIND] + i] = (char)(uint8_t)v;
        if (unsigned_at(lists[TOKEN_ID], i, 32, &v, "token_id") < 0)
            goto done;
        uint32_t token_id = (uint32_t)v;
        PUT(base, at[TOKEN_ID] + 4 * i, token_id);
        double lp = PyFloat_AsDouble(PyList_GET_ITEM(lists[LOGPROB], i));
        if (lp == -1.0 && PyErr_Occurred())
            goto done;
        /* out of float's range: an infinity, as numpy's cast gives (C leaves the cast undefined) */
        float logprob = lp > FLT_MAX ? INFINITY : lp < -FLT_MAX ? -INFINITY : (float)lp;
        PUT(base, at[LOGPROB] + 4 * i, logprob);
        int64_t ns = PyLong_AsLongLong(PyList_GET_ITEM(lists[RECV_NS], i));
        if (ns == -1 && PyErr_Occurred())
            goto done;
        PUT(base, at[RECV_NS] + 8 * i, ns);
        PyObject *t = PyList_GET_ITEM(lists[TEXT], i);
        if (!PyBytes_CheckExact(t)) {
            PyErr_Format(PyExc_TypeError, "fill: the text of row %zd is not bytes", i);
            goto done;
        }
        Py_ssize_t len = PyBytes_GET_SIZE(t);
        if (len > view.len - at[TEXT] - text || text + len > UINT32_MAX) {
            PyErr_Format(PyExc_ValueError, "fill: the texts overflow the %zd-byte record", view.len);
            goto done;
        }
        memcpy(base + at[TEXT] + text, PyBytes_AS_STRING(t), len);
        text += len;
        uint32_t end = (uint32_t)text;
        PUT(base, at[TEXT_END] + 4 * i, end);
    }
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"fill", fill, METH_VARARGS, fill_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_rows", "Ingest's rows into a record's columns in C (stages/ingest/rows.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__rows(void) {
    PyObject *m = PyModule_Create(&module);
    PyObject *columns = PyTuple_New(COLUMNS - 1);
    if (m == NULL || columns == NULL)
        goto fail;
    for (int c = 0; c < COLUMNS - 1; c++) {
        PyObject *pair = Py_BuildValue("(ss)", NAMES[c], DTYPES[c]);
        if (pair == NULL)
            goto fail;
        PyTuple_SET_ITEM(columns, c, pair);
    }
    if (PyModule_AddObject(m, "COLUMNS", columns) < 0) /* steals columns on success only */
        goto fail;
    return m;
fail:
    Py_XDECREF(columns);
    Py_XDECREF(m);
    return NULL;
}

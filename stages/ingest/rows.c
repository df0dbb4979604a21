/* Ingest's rows into a claimed record's columns in one call (stages/ingest/rows.py,
 * RowBuffer.write): the row buffer keeps each column as a Python list, and numpy converts a list
 * element by element through its generic machinery, one assignment per column. In the worker,
 * between two records ~45 network reads run, and the eight assignments cost ~20 us of a record's
 * ~90 us, most of it the code of the machinery itself coming back into the caches.
 *
 * The columns are the views shm.batch.write_batch lays out (the batch format's one home): this
 * module only fills typed buffers. The numpy assignments stay the reference (the tests compare
 * the records the two write) and the fallback where this module is not built.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { STREAM_ID, SEQ, KIND, TOKEN_ID, LOGPROB, RECV_NS, TEXT_END, TEXT, COLUMNS };
static const char *const NAMES[COLUMNS] = {"stream_id", "seq", "kind", "token_id", "logprob", "recv_ns", "text_end", "text"};
static const Py_ssize_t ITEM[COLUMNS] = {8, 8, 1, 4, 4, 8, 4, 1};

/* Row i of a list of ints as an unsigned (`stream_id`, `seq`, `kind`, `token_id`) or signed
 * (`recv_ns`) integer; -1 and an exception when it is not one or does not fit `bits` bits. */
static int unsigned_at(PyObject *list, Py_ssize_t i, int bits, uint64_t *out, const char *name) {
    unsigned long long v = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(list, i));
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if (bits < 64 && v >> bits) {
        PyErr_Format(PyExc_OverflowError, "rows: %s %llu of row %zd does not fit %d bits", name, v, i, bits);
        return -1;
    }
    *out = v;
    return 0;
}

PyDoc_STRVAR(fill_doc,
             "fill(columns: tuple, rows: tuple) -> None\n\n"
             "Write the first len(rows[0]) rows into a record's column views. ``columns``: the\n"
             "writable buffers stream_id (u8), seq (u8), kind (u1), token_id (u4), logprob (f4),\n"
             "recv_ns (i8), text_end (u4), text (u1) of shm.batch.write_batch; ``rows``: the lists\n"
             "sids, seqs, kinds, token_ids, logprobs (floats), recv_ns and texts (bytes) of as many\n"
             "rows as the columns hold, the texts exactly filling ``text``.");

static PyObject *fill(PyObject *module, PyObject *args) {
    PyObject *columns, *rows;
    if (!PyArg_ParseTuple(args, "O!O!:fill", &PyTuple_Type, &columns, &PyTuple_Type, &rows))
        return NULL;
    if (PyTuple_GET_SIZE(columns) != COLUMNS || PyTuple_GET_SIZE(rows) != COLUMNS - 1) {
        PyErr_SetString(PyExc_TypeError, "fill: 8 columns and 7 row lists");
        return NULL;
    }
    Py_buffer view[COLUMNS];
    int held = 0;
    PyObject *result = NULL;
    for (; held < COLUMNS; held++)
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(columns, held), &view[held], PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
            goto done;
    PyObject *lists[COLUMNS - 1];
    Py_ssize_t n = -1;
    for (int c = 0; c < COLUMNS - 1; c++) {
        lists[c] = PyTuple_GET_ITEM(rows, c);
        if (!PyList_CheckExact(lists[c]) || (n >= 0 && PyList_GET_SIZE(lists[c]) != n)) {
            PyErr_Format(PyExc_TypeError, "fill: the row lists must be lists of one length (%s)", NAMES[c]);
            goto done;
        }
        n = PyList_GET_SIZE(lists[c]);
    }
    for (int c = 0; c < TEXT; c++)
        if (view[c].len != n * ITEM[c]) {
            PyErr_Format(PyExc_ValueError, "fill: column %s holds %zd bytes for %zd rows", NAMES[c], view[c].len, n);
            goto done;
        }
    uint64_t *sid = view[STREAM_ID].buf, *seq = view[SEQ].buf;
    uint8_t *kind = view[KIND].buf, *text = view[TEXT].buf;
    uint32_t *token_id = view[TOKEN_ID].buf, *text_end = view[TEXT_END].buf;
    float *logprob = view[LOGPROB].buf;
    int64_t *recv_ns = view[RECV_NS].buf;
    Py_ssize_t at = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t v;
        if (unsigned_at(lists[0], i, 64, &v, "stream_id") < 0)
            goto done;
        sid[i] = v;
        if (unsigned_at(lists[1], i, 64, &v, "seq") < 0)
            goto done;
        seq[i] = v;
        if (unsigned_at(lists[2], i, 8, &v, "kind") < 0)
            goto done;
        kind[i] = (uint8_t)v;
        if (unsigned_at(lists[3], i, 32, &v, "token_id") < 0)
            goto done;
        token_id[i] = (uint32_t)v;
        double lp = PyFloat_AsDouble(PyList_GET_ITEM(lists[4], i));
        if (lp == -1.0 && PyErr_Occurred())
            goto done;
        /* out of float's range: an infinity, as numpy's cast gives (C leaves the cast undefined) */
        logprob[i] = lp > FLT_MAX ? INFINITY : lp < -FLT_MAX ? -INFINITY : (float)lp;
        long long ns = PyLong_AsLongLong(PyList_GET_ITEM(lists[5], i));
        if (ns == -1 && PyErr_Occurred())
            goto done;
        recv_ns[i] = ns;
        PyObject *t = PyList_GET_ITEM(lists[6], i);
        if (!PyBytes_CheckExact(t)) {
            PyErr_Format(PyExc_TypeError, "fill: the text of row %zd is not bytes", i);
            goto done;
        }
        Py_ssize_t len = PyBytes_GET_SIZE(t);
        if (len > view[TEXT].len - at || at + len > UINT32_MAX) {
            PyErr_Format(PyExc_ValueError, "fill: the texts overflow the %zd-byte text column", view[TEXT].len);
            goto done;
        }
        memcpy(text + at, PyBytes_AS_STRING(t), len);
        at += len;
        text_end[i] = (uint32_t)at;
    }
    if (at != view[TEXT].len) {
        PyErr_Format(PyExc_ValueError, "fill: the texts hold %zd bytes, the text column %zd", at, view[TEXT].len);
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    while (held > 0)
        PyBuffer_Release(&view[--held]);
    return result;
}

static PyMethodDef methods[] = {
    {"fill", fill, METH_VARARGS, fill_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_rows", "Ingest's rows into a record's columns in C (stages/ingest/rows.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__rows(void) { return PyModule_Create(&module); }

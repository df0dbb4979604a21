/* The usual read of an OpenAI stream, recognised in one call: one SSE event of one `data: ` line
 * whose JSON chunk (parsed by orjson, as the Python path does) carries one content token and
 * nothing else that the decoder keeps (stages/ingest/openai_client.py, _BodyReader.feed).
 *
 * At model speed every network read is such an event, and the Python path (SSEParser.feed_plain
 * and _ChunkDecoder.decode) spends ~1.3 us of bytecode on what here is a few dictionary look-ups.
 * Anything else, a read it is unsure of included, gives None and goes the Python way, which stays
 * the reference (tests/test_ingest_usual_chunk.py holds the two to the same answer) and the
 * fallback where this module is not built.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static PyObject *loads; /* orjson.loads */
static PyObject *k_error, *k_usage, *k_choices, *k_index, *k_finish_reason, *k_delta, *k_content, *k_text,
    *k_logprobs, *k_token_ids;

/* Whether `dict[key]` is there and true; -1 on an error (none for what orjson makes). */
static int truthy(PyObject *dict, PyObject *key) {
    PyObject *value = PyDict_GetItemWithError(dict, key); /* borrowed */
    if (value == NULL)
        return PyErr_Occurred() ? -1 : 0;
    return PyObject_IsTrue(value);
}

/* The token text of the usual chunk `obj`, a new reference; NULL (no error set) for any other. */
static PyObject *usual_text(PyObject *obj, int chat) {
    if (!PyDict_CheckExact(obj) || truthy(obj, k_error) != 0 || truthy(obj, k_usage) != 0)
        return NULL;
    PyObject *choices = PyDict_GetItemWithError(obj, k_choices);
    if (choices == NULL || !PyList_CheckExact(choices) || PyList_GET_SIZE(choices) != 1)
        return NULL;
    PyObject *choice = PyList_GET_ITEM(choices, 0);
    if (!PyDict_CheckExact(choice))
        return NULL;
    PyObject *index = PyDict_GetItemWithError(choice, k_index);
    if (index != NULL && !(PyLong_CheckExact(index) && PyLong_AsLong(index) == 0))
        return NULL;
    if (truthy(choice, k_finish_reason) != 0 || truthy(choice, k_logprobs) != 0)
        return NULL;
    if (PyDict_Contains(choice, k_token_ids) != 0)
        return NULL;
    PyObject *text;
    if (chat) {
        PyObject *delta = PyDict_GetItemWithError(choice, k_delta);
        if (delta == NULL || !PyDict_CheckExact(delta) || PyDict_GET_SIZE(delta) != 1)
            return NULL;
        text = PyDict_GetItemWithError(delta, k_content);
    } else {
        text = PyDict_GetItemWithError(choice, k_text);
    }
    if (text == NULL || !PyUnicode_CheckExact(text) || PyUnicode_GET_LENGTH(text) == 0)
        return NULL;
    Py_INCREF(text);
    return text;
}

PyDoc_STRVAR(usual_token_doc,
             "usual_token(read: bytes, chat: bool, max_event: int) -> str | None\n\n"
             "The token of ``read`` when it is one ``data: `` event (LF line ends, no CR, at most\n"
             "``max_event`` bytes before its line end) whose chunk has one choice (index 0) with a\n"
             "non-empty content delta (``chat``) or text, nothing beside the delta's content, no\n"
             "finish_reason, logprobs, token_ids, usage or error; else None.");

static PyObject *usual_token(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyBytes_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "usual_token(read: bytes, chat: bool, max_event: int)");
        return NULL;
    }
    int chat = PyObject_IsTrue(args[1]);
    Py_ssize_t max_event = PyLong_AsSsize_t(args[2]);
    if (chat < 0 || (max_event == -1 && PyErr_Occurred()))
        return NULL;
    const char *read = PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    /* SSEParser.feed_plain's one-event read: "data: " VALUE "\n\n", the first LF at n - 2 */
    if (n < 8 || memcmp(read, "data: ", 6) != 0 || read[n - 2] != '\n' || read[n - 1] != '\n' || n - 2 > max_event)
        Py_RETURN_NONE;
    if (memchr(read, '\n', n - 2) != NULL || memchr(read, '\r', n) != NULL)
        Py_RETURN_NONE;
    PyObject *value = PyBytes_FromStringAndSize(read + 6, n - 8); /* a copy: nothing points into `read` after */
    if (value == NULL)
        return NULL;
    PyObject *obj = PyObject_CallOneArg(loads, value);
    Py_DECREF(value);
    if (obj == NULL) { /* not JSON, or not UTF-8: the Python path says which */
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    PyObject *text = usual_text(obj, chat);
    Py_DECREF(obj);
    if (text == NULL) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    return text;
}

static PyMethodDef methods[] = {
    {"usual_token", (PyCFunction)(void (*)(void))usual_token, METH_FASTCALL, usual_token_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_chunk", "The usual read of an OpenAI stream in C (stages/ingest/chunk.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__chunk(void) {
    PyObject *orjson = PyImport_ImportModule("orjson");
    if (orjson == NULL)
        return NULL;
    loads = PyObject_GetAttrString(orjson, "loads");
    Py_DECREF(orjson);
    if (loads == NULL)
        return NULL;
    PyObject **keys[] = {&k_error,  &k_usage,   &k_choices, &k_index,    &k_finish_reason,
                         &k_delta,  &k_content, &k_text,    &k_logprobs, &k_token_ids};
    const char *names[] = {"error", "usage", "choices", "index", "finish_reason",
                           "delta", "content", "text",  "logprobs", "token_ids"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if ((*keys[i] = PyUnicode_InternFromString(names[i])) == NULL)
            return NULL;
    return PyModule_Create(&module);
}

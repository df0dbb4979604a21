/* The compute stage's per-record work on the CPU in one call: what stages/compute/stage.py's
 * numpy paths compute (the per-token columns of stages/compute/fused.py and the running ones of
 * Compute._row_by_row), row after row in plain C.
 *
 * A 64-row record costs numpy ~60 calls of ~0.5-1 us each whatever their size; here it is one call
 * and a few hundred nanoseconds per row. The numpy paths stay the reference (tests compare the two)
 * and the fallback where this module is not built, probes are on or a wgpu device computes.
 *
 * The per-stream state is the stage's own arrays (streams.StreamStates), changed in place: running
 * sums [slots, 3] f64 (sum of -logprob, tokens with one, tokens seen), origin [slots] i64 (the
 * position at column 0 of a row), pair keys [slots, width] u64 and match flags [slots, width] u8
 * (a token at position p in column p - origin), fired [slots] u8. Slots are the caller's: taken
 * before the call (a fresh one zeroed), a finished stream's dropped after it.
 *
 * Built with -ffp-contract=off: products and sums rounded one at a time, as numpy's.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define TOKEN 2 /* shm.batch.Kind.TOKEN */

static const float SHADE_SCALE[4] = {0.65f, 0.65f, 0.65f, 0.75f}; /* fused._SHADE_SCALE */
static const float SHADE_BASE[4] = {0.35f, 0.35f, 0.35f, 0.25f};

/* A buffer argument of at least `items` items of `size` bytes: a clear error names it otherwise. */
static int check(const Py_buffer *b, Py_ssize_t items, Py_ssize_t size, const char *name) {
    if (b->len < items * size) {
        PyErr_Format(PyExc_ValueError, "record: %s holds %zd bytes, %zd needed", name, b->len, items * size);
        return 0;
    }
    return 1;
}

/* The per-token columns of one token (fused.token_columns). */
static void token_columns(uint32_t cell, float logprob, const float *xy, const float *base, float *hilbert,
                          float *conf, uint8_t *rgba, float *entropy) {
    hilbert[0] = xy[2 * cell];
    hilbert[1] = xy[2 * cell + 1];
    float p = expf(fminf(logprob, 0.0f)); /* fmin: NaN (no logprob) -> 0 -> confidence 1 */
    *conf = p;
    for (int k = 0; k < 4; k++) {
        float shade = p * SHADE_SCALE[k] + SHADE_BASE[k];
        float v = base[4 * cell + k] * shade;
        rgba[k] = (uint8_t)rintf(v * 255.0f);
    }
    /* -(p ln p) - (r ln r), r = 1 - p; the log of the smallest f32 instead of ln 0 */
    float r = 1.0f - p;
    float tp = logf(fmaxf(p, 0x1p-149f)) * p;
    float tr = logf(fmaxf(r, 0x1p-149f)) * r;
    *entropy = 0.0f - (tp + tr);
}

/* Whether the n-gram of pair keys ending at column `at` of `keys` occurred ending at one of the
 * `reach` columns before it (Compute._row_by_row's search). */
static int seen_before(const uint64_t *keys, int64_t at, int64_t reach, int64_t grams) {
    for (int64_t end = at - reach; end < at; end++) {
        int64_t k = 0;
        while (k < grams && keys[end - k] == keys[at - k])
            k++;
        if (k == grams)
            return 1;
    }
    return 0;
}

PyDoc_STRVAR(record_doc,
             "record(kind, slot, token_id, logprob, running, origin, keys, flags, fired, xy, base, hilbert, conf, "
             "rgba, entropy, ppl, rep, repflag, rows, width, mask, ngram, window, threshold) -> list[int]\n\n"
             "Fill the appended columns of a record's ``rows`` rows and move each stream's state on; returns the "
             "rows whose stream's repetition flag fired for the first time.");

static PyObject *record(PyObject *self, PyObject *args) {
    Py_buffer kind_b, slot_b, id_b, lp_b, running_b, origin_b, keys_b, flags_b, fired_b, xy_b, base_b;
    Py_buffer hilbert_b, conf_b, rgba_b, entropy_b, ppl_b, rep_b, repflag_b;
    Py_ssize_t n, width, ngram, window;
    unsigned int mask;
    double threshold;
    if (!PyArg_ParseTuple(args, "y*y*y*y*w*w*w*w*w*y*y*w*w*w*w*w*w*w*nnInnd", &kind_b, &slot_b, &id_b, &lp_b,
                          &running_b, &origin_b, &keys_b, &flags_b, &fired_b, &xy_b, &base_b, &hilbert_b, &conf_b,
                          &rgba_b, &entropy_b, &ppl_b, &rep_b, &repflag_b, &n, &width, &mask, &ngram, &window,
                          &threshold))
        return NULL;
    Py_buffer *all[] = {&kind_b,  &slot_b,    &id_b,   &lp_b,   &running_b, &origin_b,  &keys_b,
                        &flags_b, &fired_b,   &xy_b,   &base_b, &hilbert_b, &conf_b,    &rgba_b,
                        &entropy_b, &ppl_b,   &rep_b,  &repflag_b};
    PyObject *fired_rows = NULL;
    Py_ssize_t slots = running_b.len / (3 * (Py_ssize_t)sizeof(double));
    Py_ssize_t cells = xy_b.len / (2 * (Py_ssize_t)sizeof(float));
    int64_t span = window + ngram - 1, grams = ngram > 1 ? ngram - 1 : 1;
    if (n < 0 || window < 1 || ngram < 1 || width <= span || (Py_ssize_t)mask >= cells) {
        PyErr_SetString(PyExc_ValueError, "record: rows, width, ngram, window or mask out of range");
        goto done;
    }
    if (!(check(&kind_b, n, 1, "kind") && check(&slot_b, n, 8, "slot") && check(&id_b, n, 4, "token_id") &&
          check(&lp_b, n, 4, "logprob") && check(&origin_b, slots, 8, "origin") &&
          check(&keys_b, slots * width, 8, "keys") && check(&flags_b, slots * width, 1, "flags") &&
          check(&fired_b, slots, 1, "fired") && check(&base_b, cells, 16, "base") &&
          check(&hilbert_b, n, 8, "hilbert") && check(&conf_b, n, 4, "conf") && check(&rgba_b, n, 4, "rgba") &&
          check(&entropy_b, n, 4, "entropy") && check(&ppl_b, n, 4, "ppl") && check(&rep_b, n, 4, "rep") &&
          check(&repflag_b, n, 1, "repflag")))
        goto done;
    fired_rows = PyList_New(0);
    if (fired_rows == NULL)
        goto done;
    const uint8_t *kind = kind_b.buf;
    const int64_t *slot = slot_b.buf;
    const uint32_t *ids = id_b.buf;
    const float *logprobs = lp_b.buf;
    double *running = running_b.buf;
    int64_t *origin = origin_b.buf;
    uint8_t *fired = fired_b.buf, *repflag = repflag_b.buf, *rgba = rgba_b.buf;
    float *hilbert = hilbert_b.buf, *conf = conf_b.buf, *entropy = entropy_b.buf, *ppl = ppl_b.buf, *rep = rep_b.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t s = slot[i];
        if (s < 0 || s >= slots) {
            PyErr_Format(PyExc_ValueError, "record: row %zd's slot %lld outside the state's %zd", i, (long long)s,
                         slots);
            Py_CLEAR(fired_rows);
            goto done;
        }
        double *sums = running + 3 * s; /* sum of -logprob, tokens with one, tokens seen */
        if (kind[i] != TOKEN) {          /* START, END, ERROR: zeros but for the stream's ppl so far */
            hilbert[2 * i] = hilbert[2 * i + 1] = conf[i] = entropy[i] = rep[i] = 0.0f;
            memset(rgba + 4 * i, 0, 4);
            repflag[i] = 0;
            ppl[i] = sums[1] ? (float)exp(sums[0] / sums[1]) : 0.0f;
            continue;
        }
        float logprob = logprobs[i];
        token_columns(ids[i] & mask, logprob, xy_b.buf, base_b.buf, hilbert + 2 * i, conf + i, rgba + 4 * i,
                      entropy + i);
        if (logprob == logprob) { /* not NaN */
            sums[0] -= (double)logprob;
            sums[1] += 1;
        }
        int64_t position = (int64_t)sums[2]; /* this token's index in its stream */
        sums[2] += 1;
        ppl[i] = sums[1] ? (float)exp(sums[0] / sums[1]) : 0.0f;
        uint64_t *row = (uint64_t *)keys_b.buf + s * width;
        uint8_t *flag = (uint8_t *)flags_b.buf + s * width;
        int64_t at = position - origin[s]; /* its column */
        if (at < span) { /* a row keeps the span before each token: a state that does not is refused */
            PyErr_Format(PyExc_ValueError, "record: row %zd's column %lld (origin) leaves no window before it", i,
                         (long long)at);
            Py_CLEAR(fired_rows);
            goto done;
        }
        if (at >= width) {                 /* the row is full: its last span columns to the front */
            int64_t from = position - span - origin[s];
            memmove(row, row + from, span * sizeof(uint64_t));
            memmove(flag, flag + from, span);
            origin[s] = position - span;
            at = span;
        }
        row[at] = ngram > 1 ? ids[i] | (row[at - 1] & 0xFFFFFFFFu) << 32 : ids[i];
        int64_t reach = position - (ngram - 1); /* n-grams back that lie within the stream */
        if (reach > window)
            reach = window;
        flag[at] = reach >= 1 && seen_before(row, at, reach, grams);
        int64_t total = 0;
        for (int64_t c = at + 1 - window; c <= at; c++)
            total += flag[c];
        float share = (float)((double)total / (double)(position + 1 < window ? position + 1 : window));
        rep[i] = share;
        repflag[i] = share >= threshold;
        if (repflag[i] && !fired[s]) {
            fired[s] = 1;
            PyObject *at_row = PyLong_FromSsize_t(i);
            if (at_row == NULL || PyList_Append(fired_rows, at_row) < 0) {
                Py_XDECREF(at_row);
                Py_CLEAR(fired_rows);
                goto done;
            }
            Py_DECREF(at_row);
        }
    }
done:
    for (size_t k = 0; k < sizeof(all) / sizeof(all[0]); k++)
        PyBuffer_Release(all[k]);
    return fired_rows;
}

static PyMethodDef methods[] = {
    {"record", record, METH_VARARGS, record_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_compiled", "The compute stage's per-record work in C (stages/compute/compiled.c).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__compiled(void) { return PyModule_Create(&module); }

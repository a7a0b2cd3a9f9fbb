/* ddb_cdc_speedups._decode — an experiment (issue 16, item 3): pipeline.codec.decode_item in C.
 *
 * Decodes one DynamoDB image (a plain dict of attribute name -> AttributeValue dict, as orjson
 * parses it) into Python values with exactly the results of pipeline.codec.decode_item:
 *
 *   S -> the same str object; N -> DYNAMODB_CONTEXT.create_decimal(text) (the codec's own bound
 *   method, so the context, rounding and traps are the codec's); B -> binascii.a2b_base64(text,
 *   strict_mode=True) (what base64.b64decode(text, validate=True) calls) or the same bytes object;
 *   SS / NS / BS -> set; M -> dict; L -> list; NULL -> None (whatever its value); BOOL -> the bool.
 *
 * Only the codec's fast shapes are handled here (exact dict / list / str / bytes / bool types, one
 * type tag, no error). Anything else — other types, wrong shapes, an empty {}, a number or base64
 * text that fails, nesting deeper than the limit — is handed to the codec's own Python function
 * for that value (decode_value(av, depth), _decode_attributes(attrs, depth) or decode_item(image)),
 * so unusual-but-valid values decode exactly as codec.py decodes them and every error is raised by
 * codec.py itself, with its type and message: one source of truth for the rules.
 *
 * configure() must be called first with the codec's functions (ddb_cdc_speedups.bind(codec)).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static PyObject *create_decimal = NULL;     /* codec.DYNAMODB_CONTEXT.create_decimal */
static PyObject *py_decode_value = NULL;    /* codec.decode_value(av, depth) */
static PyObject *py_decode_attributes = NULL; /* codec._decode_attributes(attrs, depth) */
static PyObject *py_decode_item = NULL;     /* codec.decode_item(image) */
static long max_depth = 0;                  /* codec.MAX_NESTING_DEPTH */

static PyObject *a2b_base64 = NULL;         /* binascii.a2b_base64 */
static PyObject *strict_kwnames = NULL;     /* ("strict_mode",) */
static PyObject *str_is_finite = NULL;      /* "is_finite" */

#include "_tags.h"

/* True when the text is a number in the plain ASCII syntax [+-]? (digits [. digits?] | . digits)
 * ([eE] [+-]? digits)? : a Decimal converted from it is finite. Anything else (other characters,
 * bad syntax — which the number context, not trapping InvalidOperation, turns into NaN — NaN,
 * Infinity) is asked is_finite() of its Decimal instead. */
static int
plain_number_text(PyObject *text)
{
    if (!PyUnicode_IS_READY(text) || !PyUnicode_IS_COMPACT_ASCII(text))
        return 0;
    const unsigned char *s = (const unsigned char *)PyUnicode_DATA(text);
    const unsigned char *end = s + PyUnicode_GET_LENGTH(text);
    Py_ssize_t digits = 0;
    if (s < end && (*s == '+' || *s == '-'))
        s++;
    while (s < end && *s >= '0' && *s <= '9') {
        s++;
        digits++;
    }
    if (s < end && *s == '.') {
        s++;
        while (s < end && *s >= '0' && *s <= '9') {
            s++;
            digits++;
        }
    }
    if (digits == 0)
        return 0;
    if (s < end && (*s == 'e' || *s == 'E')) {
        s++;
        if (s < end && (*s == '+' || *s == '-'))
            s++;
        if (s == end || *s < '0' || *s > '9')
            return 0;
        while (s < end && *s >= '0' && *s <= '9')
            s++;
    }
    return s == end;
}

/* An N text (exact str) -> new Decimal. NULL with *fallback = 1 and no exception: not a finite
 * DynamoDB number (the codec raises its DecodeError); NULL with an exception: any other error. */
static PyObject *
number(PyObject *text, int *fallback)
{
    PyObject *d = PyObject_Vectorcall(create_decimal, &text, 1, NULL);
    if (d == NULL) {
        if (PyErr_ExceptionMatches(PyExc_ArithmeticError)) {  /* codec.py: except ArithmeticError */
            PyErr_Clear();
            *fallback = 1;
        }
        return NULL;
    }
    if (!plain_number_text(text)) {
        PyObject *r = PyObject_CallMethodNoArgs(d, str_is_finite);
        if (r == NULL) {
            Py_DECREF(d);
            return NULL;
        }
        int finite = PyObject_IsTrue(r);
        Py_DECREF(r);
        if (finite != 1) {
            Py_DECREF(d);
            if (finite == 0)
                *fallback = 1;
            return NULL;
        }
    }
    return d;
}

/* A B text (exact str) -> new bytes; NULL with *fallback = 1: not valid base64 (codec.py catches
 * binascii.Error and ValueError — binascii.Error is a ValueError). */
static PyObject *
binary(PyObject *text, int *fallback)
{
    PyObject *args[2] = {text, Py_True};
    PyObject *r = PyObject_Vectorcall(a2b_base64, args, 1, strict_kwnames);
    if (r == NULL && PyErr_ExceptionMatches(PyExc_ValueError)) {
        PyErr_Clear();
        *fallback = 1;
    }
    return r;
}

static PyObject *decode_attributes(PyObject *attrs, long depth);
static PyObject *decode_value(PyObject *av, long depth);

static PyObject *
fallback_value(PyObject *av, long depth)
{
    PyObject *d = PyLong_FromLong(depth);
    if (d == NULL)
        return NULL;
    PyObject *args[2] = {av, d};
    PyObject *r = PyObject_Vectorcall(py_decode_value, args, 2, NULL);
    Py_DECREF(d);
    return r;
}

static PyObject *
decode_list(PyObject *list, long depth)
{
    Py_ssize_t n = PyList_GET_SIZE(list);
    PyObject *out = PyList_New(n);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i >= PyList_GET_SIZE(list)) {  /* only if something mutated the input meanwhile */
            Py_DECREF(out);
            PyErr_SetString(PyExc_RuntimeError, "list changed size during decode");
            return NULL;
        }
        PyObject *item = PyList_GET_ITEM(list, i);
        Py_INCREF(item);
        PyObject *v = decode_value(item, depth);
        Py_DECREF(item);
        if (v == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, v);
    }
    return out;
}

/* NS / BS members (an exact list) -> new set; NULL with *fallback = 1 when a member is not on the
 * fast path (the codec then decodes the whole value, or raises). */
static PyObject *
member_set(PyObject *list, int numbers, int *fallback)
{
    PyObject *out = PySet_New(NULL);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(list); i++) {
        PyObject *item = PyList_GET_ITEM(list, i);
        PyObject *v;
        if (PyUnicode_CheckExact(item)) {
            Py_INCREF(item);
            v = numbers ? number(item, fallback) : binary(item, fallback);
            Py_DECREF(item);
        }
        else if (!numbers && PyBytes_CheckExact(item)) {
            Py_INCREF(item);
            v = item;
        }
        else {
            *fallback = 1;
            v = NULL;
        }
        if (v == NULL || PySet_Add(out, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(v);
    }
    return out;
}

/* codec.decode_value(av, depth) */
static PyObject *
decode_value(PyObject *av, long depth)
{
    if (!PyDict_CheckExact(av) || PyDict_GET_SIZE(av) != 1)
        return fallback_value(av, depth);
    Py_ssize_t pos = 0;
    PyObject *tag, *value, *r = NULL;
    int fallback = 0;
    if (!PyDict_Next(av, &pos, &tag, &value))
        return fallback_value(av, depth);
    Py_INCREF(value);
    switch (tag_of(tag)) {
    case T_S:
        if (PyUnicode_CheckExact(value)) {
            Py_INCREF(value);
            r = value;
        }
        else
            fallback = 1;
        break;
    case T_N:
        if (PyUnicode_CheckExact(value))
            r = number(value, &fallback);
        else
            fallback = 1;
        break;
    case T_M:
        if (PyDict_CheckExact(value) && depth <= max_depth)
            r = decode_attributes(value, depth + 1);
        else
            fallback = 1;
        break;
    case T_L:
        if (PyList_CheckExact(value) && depth <= max_depth)
            r = decode_list(value, depth + 1);
        else
            fallback = 1;
        break;
    case T_BOOL:
        if (PyBool_Check(value)) {
            Py_INCREF(value);
            r = value;
        }
        else
            fallback = 1;
        break;
    case T_NULL:
        Py_INCREF(Py_None);
        r = Py_None;
        break;
    case T_SS:
        fallback = 1;
        if (PyList_CheckExact(value)) {
            Py_ssize_t i, n = PyList_GET_SIZE(value);
            for (i = 0; i < n; i++)
                if (!PyUnicode_CheckExact(PyList_GET_ITEM(value, i)))
                    break;
            if (i == n) {
                fallback = 0;
                r = PySet_New(value);
            }
        }
        break;
    case T_NS:
    case T_BS:
        if (PyList_CheckExact(value))
            r = member_set(value, tag_of(tag) == T_NS, &fallback);
        else
            fallback = 1;
        break;
    case T_B:
        if (PyUnicode_CheckExact(value))
            r = binary(value, &fallback);
        else if (PyBytes_CheckExact(value)) {
            Py_INCREF(value);
            r = value;
        }
        else
            fallback = 1;
        break;
    default:
        fallback = 1;
    }
    Py_DECREF(value);
    if (fallback)
        return fallback_value(av, depth);
    return r;
}

/* codec._decode_attributes(attrs, depth): a plain dict of name -> AttributeValue. */
static PyObject *
decode_attributes(PyObject *attrs, long depth)
{
    PyObject *out = _PyDict_NewPresized(PyDict_GET_SIZE(attrs));
    if (out == NULL)
        return NULL;
    Py_ssize_t pos = 0;
    PyObject *name, *av;
    while (PyDict_Next(attrs, &pos, &name, &av)) {
        if (!PyUnicode_Check(name)) {
            /* codec.py raises its DecodeError for this name, or an earlier error: let it */
            Py_DECREF(out);
            PyObject *d = PyLong_FromLong(depth);
            if (d == NULL)
                return NULL;
            PyObject *args[2] = {attrs, d};
            PyObject *r = PyObject_Vectorcall(py_decode_attributes, args, 2, NULL);
            Py_DECREF(d);
            return r;
        }
        Py_INCREF(name);
        Py_INCREF(av);
        PyObject *v = decode_value(av, depth);
        Py_DECREF(av);
        if (v == NULL || PyDict_SetItem(out, name, v) < 0) {
            Py_DECREF(name);
            Py_XDECREF(v);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(name);
        Py_DECREF(v);
    }
    return out;
}

static int
configured(void)
{
    if (create_decimal == NULL) {
        PyErr_SetString(PyExc_RuntimeError,
                        "ddb_cdc_speedups._decode is not configured: call ddb_cdc_speedups.bind(pipeline.codec)");
        return 0;
    }
    return 1;
}

static PyObject *
decode_item(PyObject *self, PyObject *image)
{
    if (!configured())
        return NULL;
    if (image == Py_None)
        Py_RETURN_NONE;
    if (PyDict_CheckExact(image))
        return decode_attributes(image, 0);
    return PyObject_CallOneArg(py_decode_item, image);
}

static PyObject *
decode_value_py(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (!configured())
        return NULL;
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "decode_value(av, depth=0)");
        return NULL;
    }
    long depth = 0;
    if (nargs == 2) {
        depth = PyLong_AsLong(args[1]);
        if (depth == -1 && PyErr_Occurred())
            return NULL;
    }
    return decode_value(args[0], depth);
}

static PyObject *
configure(PyObject *self, PyObject *args)
{
    PyObject *cd, *dv, *da, *di;
    long depth;
    if (!PyArg_ParseTuple(args, "OOOOl:configure", &cd, &dv, &da, &di, &depth))
        return NULL;
    Py_INCREF(cd);
    Py_INCREF(dv);
    Py_INCREF(da);
    Py_INCREF(di);
    Py_XSETREF(create_decimal, cd);
    Py_XSETREF(py_decode_value, dv);
    Py_XSETREF(py_decode_attributes, da);
    Py_XSETREF(py_decode_item, di);
    max_depth = depth;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS,
     "configure(create_decimal, decode_value, decode_attributes, decode_item, max_depth): the codec's "
     "number context's create_decimal, its Python fallbacks and its nesting limit."},
    {"decode_item", decode_item, METH_O, "decode_item(image): pipeline.codec.decode_item, in C."},
    {"decode_value", (PyCFunction)(void (*)(void))decode_value_py, METH_FASTCALL,
     "decode_value(av, depth=0): pipeline.codec.decode_value, in C."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "ddb_cdc_speedups._decode",
    "pipeline.codec.decode_item in C (an experiment; see ddb_cdc_speedups).", -1, methods,
};

PyMODINIT_FUNC
PyInit__decode(void)
{
    PyObject *binascii = PyImport_ImportModule("binascii");
    if (binascii == NULL)
        return NULL;
    a2b_base64 = PyObject_GetAttrString(binascii, "a2b_base64");
    Py_DECREF(binascii);
    if (a2b_base64 == NULL)
        return NULL;
    strict_kwnames = Py_BuildValue("(s)", "strict_mode");
    str_is_finite = PyUnicode_InternFromString("is_finite");
    if (strict_kwnames == NULL || str_is_finite == NULL)
        return NULL;
    return PyModule_Create(&module);
}

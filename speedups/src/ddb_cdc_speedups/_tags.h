/* The AttributeValue type tags, shared by _decode.c and _canonical.c (one place). */

#ifndef DDB_CDC_SPEEDUPS_TAGS_H
#define DDB_CDC_SPEEDUPS_TAGS_H

#include <Python.h>
#include <string.h>

enum { T_OTHER, T_S, T_N, T_B, T_M, T_L, T_SS, T_NS, T_BS, T_BOOL, T_NULL };

/* The type tag of an exact, ASCII str key; T_OTHER for anything else (the caller decides then). */
static inline int
tag_of(PyObject *key)
{
    if (!PyUnicode_CheckExact(key) || !PyUnicode_IS_READY(key) || !PyUnicode_IS_COMPACT_ASCII(key))
        return T_OTHER;
    const char *s = (const char *)PyUnicode_DATA(key);
    switch (PyUnicode_GET_LENGTH(key)) {
    case 1:
        switch (s[0]) {
        case 'S': return T_S;
        case 'N': return T_N;
        case 'B': return T_B;
        case 'M': return T_M;
        case 'L': return T_L;
        }
        return T_OTHER;
    case 2:
        if (s[1] != 'S')
            return T_OTHER;
        switch (s[0]) {
        case 'S': return T_SS;
        case 'N': return T_NS;
        case 'B': return T_BS;
        }
        return T_OTHER;
    case 4:
        if (memcmp(s, "BOOL", 4) == 0)
            return T_BOOL;
        if (memcmp(s, "NULL", 4) == 0)
            return T_NULL;
        return T_OTHER;
    }
    return T_OTHER;
}

#endif

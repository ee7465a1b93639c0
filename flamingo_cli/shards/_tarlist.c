/* The listing of a plain tar shard in one call: the header walk and webdataset's sample grouping.
 *
 * `list_plain(fd, size)` follows the chain of 512-byte headers of a local tar file with
 * positioned reads, never touching member data, and groups the members into samples (runs
 * of members sharing a key, webdataset's rule). It accepts only what writers of shards emit:
 * octal numbers, unsigned checksums, regular files with names of at most 100 bytes and no
 * ustar prefix, other member kinds skipped, an end-of-archive block where the chain ends.
 * For anything else (damage, pax or GNU long names, prefixes, base-256 numbers) it returns
 * None, and the general walk in tar.py reads the file and reports what is wrong. It exists
 * because the same loop in Python costs a few microseconds per member, which is most of a
 * fast-mode audit.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define BLOCK 512
#define WINDOW 4096 /* bytes read at a header: it and the small members after it */

typedef struct {
    char *data;
    size_t len, cap;
} Buffer;

static int put(Buffer *b, const void *src, size_t n) {
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 1 << 14;
        while (cap < b->len + n) cap *= 2;
        char *grown = realloc(b->data, cap);
        if (grown == NULL) return -1;
        b->data = grown;
        b->cap = cap;
    }
    memcpy(b->data + b->len, src, n);
    b->len += n;
    return 0;
}

/* A numeric header field as writers emit it: optional leading spaces, octal digits, then only
   NULs or spaces. -1 for anything else (base-256, signs, no digits): the general walk
   judges those. */
static int64_t octal(const unsigned char *field, int length) {
    int i = 0, digits = 0;
    int64_t value = 0;
    while (i < length && field[i] == ' ') i++;
    for (; i < length && field[i] >= '0' && field[i] <= '7'; i++, digits++) {
        if (value > (INT64_MAX >> 3)) return -1;
        value = value * 8 + (field[i] - '0');
    }
    for (; i < length; i++)
        if (field[i] != 0 && field[i] != ' ') return -1;
    return digits ? value : -1;
}

static int checksum_ok(const unsigned char *h) {
    int64_t stored = octal(h + 148, 8), sum = 8 * ' ';
    for (int i = 0; i < 148; i++) sum += h[i];
    for (int i = 156; i < BLOCK; i++) sum += h[i];
    return stored == sum;
}

static int all_zero(const unsigned char *h) {
    for (int i = 0; i < BLOCK; i++)
        if (h[i]) return 0;
    return 1;
}

typedef enum { LISTED, DECLINED, FAILED } Outcome;

typedef struct {
    Buffer names, offsets, sizes, starts, keys, signatures;
    int64_t end, members;
    int error; /* errno of a failed read, or 0 for a failed allocation */
} Listing;

/* The walk itself; touches no Python objects, so it runs without the GIL. */
static Outcome walk(int fd, int64_t size, Listing *out) {
    unsigned char window[WINDOW];
    int64_t window_start = 0, window_len = 0, offset = 0;
    size_t key_at = 0, key_len = 0; /* the current sample's key, inside out->keys */
    const char nul = 0, slash = '/';
    for (;;) {
        if (offset + BLOCK > size) return DECLINED; /* no end-of-archive block */
        if (offset < window_start || offset + BLOCK > window_start + window_len) {
            int64_t want = size - offset < WINDOW ? size - offset : WINDOW;
            ssize_t got = pread(fd, window, (size_t)want, (off_t)offset);
            if (got < 0) {
                if (errno == EINTR) continue;
                out->error = errno;
                return FAILED;
            }
            if (got < BLOCK) return DECLINED; /* the file changed under us */
            window_start = offset;
            window_len = got;
        }
        const unsigned char *h = window + (offset - window_start);
        if (all_zero(h)) {
            out->end = offset;
            break;
        }
        int64_t member_size = octal(h + 124, 12);
        if (member_size < 0 || !checksum_ok(h)) return DECLINED;
        int64_t data_offset = offset + BLOCK;
        if (member_size > size - data_offset) return DECLINED; /* truncated */
        unsigned char kind = h[156];
        if (kind == 'L' || kind == 'x') return DECLINED; /* names the next member */
        if (kind == '0' || kind == 0 || kind == '7') {
            if (h[345] && memcmp(h + 257, "ustar\0", 6) == 0) return DECLINED; /* prefix */
            size_t length = strnlen((const char *)h, 100);
            if (!length) return DECLINED;
            const char *name = (const char *)h;
            size_t base = length;
            while (base && name[base - 1] != '/') base--;
            const char *dot = memchr(name + base, '.', length - base);
            size_t key = dot ? (size_t)(dot - name) : length;
            const char *ext = dot ? dot + 1 : name + length;
            size_t ext_len = (size_t)(name + length - ext);
            int same = out->members && key == key_len &&
                       memcmp(out->keys.data + key_at, name, key) == 0;
            int failed = put(&out->names, name, length) || put(&out->names, &nul, 1) ||
                         put(&out->offsets, &offset, 8) || put(&out->sizes, &member_size, 8);
            if (same) {
                failed = failed || put(&out->signatures, &slash, 1);
            } else {
                if (out->members) failed = failed || put(&out->signatures, &nul, 1);
                key_at = out->keys.len;
                key_len = key;
                failed = failed || put(&out->starts, &out->members, 8) ||
                         put(&out->keys, name, key) || put(&out->keys, &nul, 1);
            }
            if (failed || put(&out->signatures, ext, ext_len)) {
                out->error = 0;
                return FAILED;
            }
            out->members++;
        }
        offset = data_offset + (member_size + BLOCK - 1) / BLOCK * BLOCK;
    }
    if (out->members && put(&out->signatures, &nul, 1)) {
        out->error = 0;
        return FAILED;
    }
    return LISTED;
}

static PyObject *bytes_of(Buffer *b) {
    return PyBytes_FromStringAndSize(b->data ? b->data : "", (Py_ssize_t)b->len);
}

PyDoc_STRVAR(list_plain_doc,
             "list_plain(fd, size, /)\n--\n\n"
             "The members and samples of a plain tar file, or None when the general walk must "
             "read it.\n\n"
             "Returns (end, names, offsets, sizes, starts, keys, signatures): the offset of the "
             "end-of-archive block; member names each followed by NUL; header offsets and "
             "data sizes as native int64; the index of each sample's first member as int64; "
             "sample keys each followed by NUL; each sample's member extensions joined by '/', "
             "each followed by NUL.");

static PyObject *list_plain(PyObject *module, PyObject *args) {
    int fd;
    long long size;
    if (!PyArg_ParseTuple(args, "iL:list_plain", &fd, &size)) return NULL;
    Listing listing;
    memset(&listing, 0, sizeof listing);
    Outcome outcome;
    Py_BEGIN_ALLOW_THREADS outcome = walk(fd, (int64_t)size, &listing);
    Py_END_ALLOW_THREADS

    PyObject *result = NULL;
    if (outcome == FAILED) {
        if (listing.error) {
            errno = listing.error;
            PyErr_SetFromErrno(PyExc_OSError);
        } else {
            PyErr_NoMemory();
        }
    } else if (outcome == DECLINED) {
        result = Py_NewRef(Py_None);
    } else {
        result = Py_BuildValue("(LNNNNNN)", (long long)listing.end, bytes_of(&listing.names),
                               bytes_of(&listing.offsets), bytes_of(&listing.sizes),
                               bytes_of(&listing.starts), bytes_of(&listing.keys),
                               bytes_of(&listing.signatures));
    }
    Buffer *buffers[] = {&listing.names,  &listing.offsets, &listing.sizes,
                         &listing.starts, &listing.keys,    &listing.signatures};
    for (size_t i = 0; i < sizeof buffers / sizeof *buffers; i++) free(buffers[i]->data);
    return result;
}

static PyMethodDef methods[] = {
    {"list_plain", list_plain, METH_VARARGS, list_plain_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_tarlist", "The header walk of plain tar shards, compiled.", -1,
    methods,
};

PyMODINIT_FUNC PyInit__tarlist(void) { return PyModule_Create(&module); }

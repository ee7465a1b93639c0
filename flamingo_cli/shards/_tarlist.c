/* The listing of a tar shard in one call: the header walk and webdataset's sample grouping.
 *
 * `list_plain(fd, size)` follows the chain of 512-byte headers of a local tar file with
 * positioned reads, never touching member data, and groups the members into samples (runs
 * of members sharing a key, webdataset's rule). It reads what writers of shards emit: octal
 * numbers, unsigned checksums, regular files, pax headers (their path and size, as Python's
 * tarfile and so webdataset's TarWriter write one before every member), GNU long names and
 * ustar names; other member kinds are skipped by their size. For anything else (damage,
 * name prefixes, base-256 numbers, odd pax records) it returns None, and the general walk in
 * tar.py reads the file and reports what is wrong. It exists because the same loop in Python
 * costs a few microseconds per member, which is most of a fast-mode audit.
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

/* Room for `n` more bytes after what the buffer holds. */
static int reserve(Buffer *b, size_t n) {
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 1 << 14;
        while (cap < b->len + n) cap *= 2;
        char *grown = realloc(b->data, cap);
        if (grown == NULL) return -1;
        b->data = grown;
        b->cap = cap;
    }
    return 0;
}

static int put(Buffer *b, const void *src, size_t n) {
    if (reserve(b, n)) return -1;
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

/* What a pax header ('x') or a GNU long name ('L') says about the member after it. */
typedef struct {
    Buffer path, long_name, scratch;
    int64_t size;
    int has_size;
} Pending;

#define MAX_EXTENDED (1 << 20) /* larger pax or long-name data: left to the general walk */

/* Records `LEN key=value\n` of a pax header: keeps path and size (the last of each), as the
   general walk does. -1 for anything it would read differently or call corrupt. */
static int parse_pax(const unsigned char *data, int64_t n, Pending *p) {
    int64_t pos = 0;
    p->path.len = 0;
    p->has_size = 0;
    while (pos < n) {
        int64_t i = pos, length = 0;
        while (i < n && data[i] >= '0' && data[i] <= '9') {
            length = length * 10 + (data[i++] - '0');
            if (length > n) return -1;
        }
        if (i == pos || i >= n || data[i] != ' ' || pos + length > n || pos + length < i + 2)
            return -1;
        const unsigned char *record = data + i + 1;
        size_t record_len = (size_t)(pos + length - 1 - (i + 1));
        const unsigned char *eq = memchr(record, '=', record_len);
        size_t key_len = eq ? (size_t)(eq - record) : record_len;
        const unsigned char *value = eq ? eq + 1 : record + record_len;
        size_t value_len = (size_t)(record + record_len - value);
        if (key_len == 4 && memcmp(record, "path", 4) == 0) {
            p->path.len = 0;
            if (put(&p->path, value, value_len)) return -2;
        } else if (key_len == 4 && memcmp(record, "size", 4) == 0) {
            int64_t v = 0;
            if (!value_len || value_len > 18) return -1;
            for (size_t k = 0; k < value_len; k++) {
                if (value[k] < '0' || value[k] > '9') return -1;
                v = v * 10 + (value[k] - '0');
            }
            p->size = v;
            p->has_size = 1;
        }
        pos += length;
    }
    return 0;
}

/* The walk itself; touches no Python objects, so it runs without the GIL. */
static Outcome walk(int fd, int64_t size, Listing *out, Pending *pending) {
    unsigned char window[WINDOW];
    int64_t window_start = 0, window_len = 0, offset = 0;
    size_t key_at = 0, key_len = 0; /* the current sample's key, inside out->keys */
    const char nul = 0, slash = '/';
    out->error = 0; /* a failed allocation unless a read sets errno */
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
        if (kind == 'L' || kind == 'x') {
            const unsigned char *data = window + (data_offset - window_start);
            if (member_size > MAX_EXTENDED) return DECLINED;
            if (data_offset + member_size > window_start + window_len) {
                if (reserve(&pending->scratch, (size_t)member_size)) return FAILED;
                ssize_t got = pread(fd, pending->scratch.data, (size_t)member_size, data_offset);
                if (got < 0) {
                    out->error = errno;
                    return FAILED;
                }
                if (got < member_size) return DECLINED;
                data = (const unsigned char *)pending->scratch.data;
            }
            if (kind == 'L') {
                const unsigned char *cut = memchr(data, 0, (size_t)member_size);
                pending->long_name.len = 0;
                if (put(&pending->long_name, data, cut ? (size_t)(cut - data) : (size_t)member_size))
                    return FAILED;
            } else {
                int parsed = parse_pax(data, member_size, pending);
                if (parsed == -2) return FAILED;
                if (parsed) return DECLINED;
            }
        } else if (kind == '0' || kind == 0 || kind == '7') {
            const char *name = (const char *)h;
            size_t length;
            if (pending->path.len) {
                name = pending->path.data;
                length = pending->path.len;
            } else if (pending->long_name.len) {
                name = pending->long_name.data;
                length = pending->long_name.len;
            } else {
                if (h[345] && memcmp(h + 257, "ustar\0", 6) == 0) return DECLINED; /* prefix */
                length = strnlen(name, 100);
            }
            if (!length || memchr(name, 0, length)) return DECLINED;
            if (pending->has_size) member_size = pending->size;
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
            if (failed || put(&out->signatures, ext, ext_len)) return FAILED;
            out->members++;
            pending->path.len = pending->long_name.len = 0;
            pending->has_size = 0;
        } else { /* folders, links, global headers and the like: no member, and they end
                    what a pax header or long name said */
            pending->path.len = pending->long_name.len = 0;
            pending->has_size = 0;
        }
        offset = data_offset + (member_size + BLOCK - 1) / BLOCK * BLOCK;
    }
    if (out->members && put(&out->signatures, &nul, 1)) return FAILED;
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

static PyObject *list_plain(PyObject *Py_UNUSED(module), PyObject *args) {
    int fd;
    long long size;
    if (!PyArg_ParseTuple(args, "iL:list_plain", &fd, &size)) return NULL;
    Listing listing;
    Pending pending;
    memset(&listing, 0, sizeof listing);
    memset(&pending, 0, sizeof pending);
    Outcome outcome;
    Py_BEGIN_ALLOW_THREADS outcome = walk(fd, (int64_t)size, &listing, &pending);
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
    Buffer *buffers[] = {&listing.names,      &listing.offsets,  &listing.sizes,
                         &listing.starts,     &listing.keys,     &listing.signatures,
                         &pending.path,       &pending.long_name, &pending.scratch};
    for (size_t i = 0; i < sizeof buffers / sizeof *buffers; i++) free(buffers[i]->data);
    return result;
}

static PyMethodDef methods[] = {
    {"list_plain", list_plain, METH_VARARGS, list_plain_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "_tarlist",
    .m_doc = "The header walk of tar shards, compiled.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__tarlist(void) { return PyModule_Create(&module); }

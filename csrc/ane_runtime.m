/* rustane ANE runtime over the private AppleNeuralEngine framework (docs/ane-runtime.md#call-sequence, docs/ane-runtime.md#surfaces).
 *
 * Manual retain/release (no ARC): the same file builds with clang on macOS and against GNUstep +
 * GCC libobjc on Linux, where the "framework" is the test fake (tests/fakeane) and the IOSurface
 * C API comes from that fake through dlsym (csrc/iosurface_shim.h).
 *
 * Every private message goes through objc_msgSend cast to the exact prototype of the selector:
 * on arm64 a variadic call would pass arguments where the callee does not look for them.
 */
#if !defined(__APPLE__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE /* -std=c11 hides POSIX (lstat, O_NOFOLLOW, nanosleep) on glibc */
#endif
#import <Foundation/Foundation.h>

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "ane_runtime.h"

#ifdef __APPLE__
#include <IOSurface/IOSurface.h>
#include <objc/message.h>
#else
#include "iosurface_shim.h"
/* GCC libobjc has no objc_msgSend; csrc/objc_msgsend_x86_64.S provides one on x86-64. */
id objc_msgSend(id self, SEL op, ...);

/* The IOSurface API lives in the fake: resolve it at ane_init, call it by its usual names. */
#define SHIM_FN(name, type) static type shim_##name;
IOSURFACE_SHIM_SYMBOLS(SHIM_FN)
#undef SHIM_FN
#define SHIM_KEY(name) static const CFStringRef *shim_##name;
IOSURFACE_SHIM_KEYS(SHIM_KEY)
#undef SHIM_KEY
#define IOSurfaceCreate shim_IOSurfaceCreate
#define IOSurfaceLock shim_IOSurfaceLock
#define IOSurfaceUnlock shim_IOSurfaceUnlock
#define IOSurfaceGetBaseAddress shim_IOSurfaceGetBaseAddress
#define IOSurfaceGetAllocSize shim_IOSurfaceGetAllocSize
#define CFRelease shim_CFRelease
#define kIOSurfaceWidth (*shim_kIOSurfaceWidth)
#define kIOSurfaceHeight (*shim_kIOSurfaceHeight)
#define kIOSurfaceBytesPerElement (*shim_kIOSurfaceBytesPerElement)
#define kIOSurfaceBytesPerRow (*shim_kIOSurfaceBytesPerRow)
#define kIOSurfaceAllocSize (*shim_kIOSurfaceAllocSize)
#define kIOSurfacePixelFormat (*shim_kIOSurfacePixelFormat)
#endif

/* ---- exact prototypes of the selectors we send (docs/ane-runtime.md#call-sequence) ---------------------------- */
typedef id (*msg_descriptor_fn)(Class, SEL, id mil, id weights, id options_plist);
typedef id (*msg_class_obj_fn)(Class, SEL, id);
typedef id (*msg_getter_fn)(id, SEL);
typedef BOOL (*msg_qos_options_error_fn)(id, SEL, unsigned int qos, id options, NSError **error);
typedef id (*msg_io_object_fn)(Class, SEL, IOSurfaceRef);
typedef id (*msg_request_fn)(Class, SEL, id inputs, id input_indices, id outputs, id output_indices,
                             id weights_buffer, id perf_stats, id procedure_index);
typedef BOOL (*msg_evaluate_fn)(id, SEL, unsigned int qos, id options, id request, NSError **error);
typedef BOOL (*msg_unload_fn)(id, SEL, unsigned int qos, NSError **error);

#define SEND(proto) ((proto)objc_msgSend)

struct ane_model {
    id model;                /* _ANEInMemoryModel, retained */
    int loaded;
    /* -hexStringIdentifier: three 64-digit SHA-256 hex strings joined by '_' (194 characters, see
     * docs/ane-rules.md, "model identifier"). Heap copy of whatever length it has: a fixed buffer
     * sized to what we expected is exactly the bug that once stopped every compile. */
    char *hex;
    char tmpdir[PATH_MAX];
};

struct ane_surface {
    IOSurfaceRef ref;
    id io_object;            /* _ANEIOSurfaceObject wrapping ref, created once, retained */
    size_t nbytes;
};

struct ane_request {
    id request;              /* _ANERequest, retained */
};

/* ---- process-wide state ----------------------------------------------------------------------- */
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static void *g_handle;
static char g_path[PATH_MAX];
static Class g_descriptor_class, g_model_class, g_request_class, g_io_object_class;
static int g_compiles;

/* Temp dirs are content-keyed (same MIL + weights -> same hex id), so two live models can share
 * one: count users and remove the directory with the last. */
typedef struct dir_ref {
    struct dir_ref *next;
    char path[PATH_MAX];
    int users;
    int owned; /* created by this process: removed with the last user; otherwise never removed */
} dir_ref;
static dir_ref *g_dirs;

/* ---- errors ------------------------------------------------------------------------------------ */
static void set_error(ane_error *err, const char *stage, long code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void set_error(ane_error *err, const char *stage, long code, const char *fmt, ...)
{
    if (!err)
        return;
    err->code = code;
    snprintf(err->stage, sizeof err->stage, "%s", stage);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof err->message, fmt, ap);
    va_end(ap);
}

static void set_nserror(ane_error *err, const char *stage, const char *what, NSError *e)
{
    if (e == nil) {
        set_error(err, stage, ANE_E_NO_NSERROR, "%s returned NO without an NSError", what);
        return;
    }
    set_error(err, stage, (long)[e code], "%s failed: %s code %ld (0x%lx): %s", what,
              [[e domain] UTF8String] ?: "?", (long)[e code], (unsigned long)[e code],
              [[e localizedDescription] UTF8String] ?: "");
}

static void set_exception(ane_error *err, const char *stage, NSException *ex)
{
    set_error(err, stage, ANE_E_EXCEPTION, "Objective-C exception %s: %s", [[ex name] UTF8String] ?: "?",
              [[ex reason] UTF8String] ?: "");
}

/* ---- init ------------------------------------------------------------------------------------- */
static int check_selectors(ane_error *err)
{
    struct { Class cls; SEL sel; int instance; const char *name; } need[] = {
        {g_descriptor_class, @selector(modelWithMILText:weights:optionsPlist:), 0, "+modelWithMILText:weights:optionsPlist:"},
        {g_model_class, @selector(inMemoryModelWithDescriptor:), 0, "+inMemoryModelWithDescriptor:"},
        {g_model_class, @selector(hexStringIdentifier), 1, "-hexStringIdentifier"},
        {g_model_class, @selector(compileWithQoS:options:error:), 1, "-compileWithQoS:options:error:"},
        {g_model_class, @selector(loadWithQoS:options:error:), 1, "-loadWithQoS:options:error:"},
        {g_model_class, @selector(evaluateWithQoS:options:request:error:), 1, "-evaluateWithQoS:options:request:error:"},
        {g_model_class, @selector(unloadWithQoS:error:), 1, "-unloadWithQoS:error:"},
        {g_request_class,
         @selector(requestWithInputs:inputIndices:outputs:outputIndices:weightsBuffer:perfStats:procedureIndex:), 0,
         "+requestWithInputs:inputIndices:outputs:outputIndices:weightsBuffer:perfStats:procedureIndex:"},
        {g_io_object_class, @selector(objectWithIOSurface:), 0, "+objectWithIOSurface:"},
    };
    for (size_t i = 0; i < sizeof need / sizeof need[0]; i++) {
        BOOL ok = need[i].instance ? [need[i].cls instancesRespondToSelector:need[i].sel]
                                   : [need[i].cls respondsToSelector:need[i].sel];
        if (!ok) {
            set_error(err, "init", ANE_E_NOT_LOADED,
                      "the framework has no %s (private API changed in this macOS version?)", need[i].name);
            return -1;
        }
    }
    return 0;
}

#ifndef __APPLE__
static int resolve_shim(void *h, ane_error *err)
{
#define RESOLVE_FN(name, type)                                                                 \
    shim_##name = (type)dlsym(h, #name);                                                       \
    if (!shim_##name) {                                                                        \
        set_error(err, "init", ANE_E_NOT_LOADED, "IOSurface shim symbol %s missing", #name);   \
        return -1;                                                                             \
    }
    IOSURFACE_SHIM_SYMBOLS(RESOLVE_FN)
#undef RESOLVE_FN
#define RESOLVE_KEY(name)                                                                      \
    shim_##name = (const CFStringRef *)dlsym(h, #name);                                        \
    if (!shim_##name) {                                                                        \
        set_error(err, "init", ANE_E_NOT_LOADED, "IOSurface shim key %s missing", #name);      \
        return -1;                                                                             \
    }
    IOSURFACE_SHIM_KEYS(RESOLVE_KEY)
#undef RESOLVE_KEY
    return 0;
}
#endif

int ane_init(const char *path, ane_error *err)
{
    if (!path)
        path = ANE_DEFAULT_FRAMEWORK;
    int rc = -1;
    pthread_mutex_lock(&g_lock);
    if (g_handle) {
        if (strcmp(g_path, path) == 0)
            rc = 0;
        else
            set_error(err, "init", ANE_E_ARG, "framework already loaded from %s (asked for %s)", g_path, path);
        goto out;
    }
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        const char *why = dlerror();
        set_error(err, "init", ANE_E_NOT_LOADED, "dlopen failed: %s", why ? why : path);
        goto out;
    }
#ifndef __APPLE__
    if (resolve_shim(h, err) != 0) {
        dlclose(h);
        goto out;
    }
#endif
    @autoreleasepool {
        g_descriptor_class = NSClassFromString(@"_ANEInMemoryModelDescriptor");
        g_model_class = NSClassFromString(@"_ANEInMemoryModel");
        g_request_class = NSClassFromString(@"_ANERequest");
        g_io_object_class = NSClassFromString(@"_ANEIOSurfaceObject");
        if (!g_descriptor_class || !g_model_class || !g_request_class || !g_io_object_class) {
            set_error(err, "init", ANE_E_NOT_LOADED,
                      "framework loaded but a class is missing (descriptor=%d model=%d request=%d io=%d)",
                      g_descriptor_class != Nil, g_model_class != Nil, g_request_class != Nil,
                      g_io_object_class != Nil);
        } else if (check_selectors(err) == 0) {
            rc = 0;
        }
    }
    if (rc != 0) {
        /* Classes registered by an ObjC library cannot be unregistered; keep the handle open. */
        g_descriptor_class = g_model_class = g_request_class = g_io_object_class = Nil;
        goto out;
    }
    g_handle = h;
    snprintf(g_path, sizeof g_path, "%s", path);
out:
    pthread_mutex_unlock(&g_lock);
    return rc;
}

int ane_is_initialized(void) { return g_handle != NULL; }

void *ane_framework_symbol(const char *name) { return g_handle ? dlsym(g_handle, name) : NULL; }

int ane_compile_count(void)
{
    pthread_mutex_lock(&g_lock);
    int n = g_compiles;
    pthread_mutex_unlock(&g_lock);
    return n;
}

static int need_init(ane_error *err)
{
    if (g_handle)
        return 0;
    set_error(err, "init", ANE_E_NOT_LOADED, "ane_init has not loaded the framework");
    return -1;
}

/* ---- temp directory ----------------------------------------------------------------------------- */
/* Weight keys must be "@model_path/weights/<file>" with a plain file name: they become paths. */
static const char *weight_relpath(const char *key)
{
    static const char prefix[] = "@model_path/weights/";
    if (strncmp(key, prefix, sizeof prefix - 1) != 0)
        return NULL;
    const char *file = key + sizeof prefix - 1;
    if (!*file || strcmp(file, ".") == 0 || strcmp(file, "..") == 0 || strlen(file) > 200)
        return NULL;
    for (const char *p = file; *p; p++) {
        char c = *p;
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
              c == '-' || c == '.'))
            return NULL;
    }
    return key + sizeof "@model_path/" - 1;
}

/* The id becomes one path component under NSTemporaryDirectory(), so it must be a plain file name:
 * any length the file system takes (NAME_MAX), no '/', no '.' or '..'. */
static int valid_hex_id(const char *hex)
{
    size_t n = strlen(hex);
    if (n == 0 || n > NAME_MAX)
        return 0;
    for (const char *p = hex; *p; p++)
        if (!((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || *p == '_' ||
              *p == '-'))
            return 0;
    return 1;
}

/* mkdir 0700; refuse anything that already exists (callers clear stale dirs first). */
static int make_private_dir(const char *path, ane_error *err)
{
    if (mkdir(path, 0700) != 0) {
        set_error(err, "tmpdir", ANE_E_OS, "mkdir %s: %s", path, strerror(errno));
        return -1;
    }
    return 0;
}

static int write_private_file(const char *path, const void *data, size_t n, ane_error *err)
{
    /* O_EXCL|O_NOFOLLOW: never write through a planted file or symlink. */
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) {
        set_error(err, "tmpdir", ANE_E_OS, "create %s: %s", path, strerror(errno));
        return -1;
    }
    const char *p = data;
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            set_error(err, "tmpdir", ANE_E_OS, "write %s: %s", path, strerror(errno));
            close(fd);
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    if (close(fd) != 0) {
        set_error(err, "tmpdir", ANE_E_OS, "close %s: %s", path, strerror(errno));
        return -1;
    }
    return 0;
}

static int remove_tree(const char *path, ane_error *err)
{
    int rc = 0;
    @autoreleasepool {
        NSError *e = nil;
        NSString *p = [NSString stringWithUTF8String:path];
        /* removeItemAtPath: deletes symlinks themselves, never their targets. */
        if (![[NSFileManager defaultManager] removeItemAtPath:p error:&e]) {
            set_error(err, "unload", ANE_E_OS, "remove %s: %s", path,
                      e ? [[e localizedDescription] UTF8String] : "unknown error");
            rc = -1;
        }
    }
    return rc;
}

/* Called with g_lock held. Returns 1 if another live model already populated `path`. */
static int dir_acquire(const char *path)
{
    for (dir_ref *d = g_dirs; d; d = d->next)
        if (strcmp(d->path, path) == 0) {
            d->users++;
            return 1;
        }
    return 0;
}

static int dir_register(const char *path, int owned)
{
    dir_ref *d = calloc(1, sizeof *d);
    if (!d)
        return -1;
    snprintf(d->path, sizeof d->path, "%s", path);
    d->users = 1;
    d->owned = owned;
    d->next = g_dirs;
    g_dirs = d;
    return 0;
}

/* Called with g_lock held. Returns 1 if the caller was the last user of a directory this process
 * created (and must remove it). */
static int dir_release(const char *path)
{
    for (dir_ref **pp = &g_dirs; *pp; pp = &(*pp)->next) {
        dir_ref *d = *pp;
        if (strcmp(d->path, path) == 0) {
            if (--d->users > 0)
                return 0;
            int owned = d->owned;
            *pp = d->next;
            free(d);
            return owned;
        }
    }
    return 0;
}

/* Replace `path` atomically (a private temp file renamed over it): the directory may be another
 * process's, compiling the same content-keyed program right now. */
static int replace_private_file(const char *path, const void *data, size_t n, ane_error *err)
{
    char tmp[PATH_MAX];
    if ((size_t)snprintf(tmp, sizeof tmp, "%s.rustane-%ld", path, (long)getpid()) >= sizeof tmp) {
        set_error(err, "tmpdir", ANE_E_OS, "temp path too long");
        return -1;
    }
    unlink(tmp);
    if (write_private_file(tmp, data, n, err) != 0)
        return -1;
    if (rename(tmp, path) != 0) {
        set_error(err, "tmpdir", ANE_E_OS, "rename %s: %s", tmp, strerror(errno));
        unlink(tmp);
        return -1;
    }
    return 0;
}

/* Create <tmp>/<hex>/model.mil and one <tmp>/<hex>/weights/<file> per blob (docs/ane-runtime.md#call-sequence step 3). */
static int populate_tmpdir(ane_model *m, const char *mil, size_t mil_len, size_t n_weights,
                           const char *const *names, const void *const *blobs, const size_t *sizes, ane_error *err)
{
    char path[PATH_MAX];
    int rc = -1;
    pthread_mutex_lock(&g_lock);
    if (dir_acquire(m->tmpdir)) {
        rc = 0; /* identical content is already there and in use */
        goto out;
    }
    struct stat st;
    int existing = 0;
    if (lstat(m->tmpdir, &st) == 0) {
        /* Left by a process that died before unloading, or being compiled by another process
         * right now (the id is content-keyed, so its files are ours byte for byte). Never delete
         * it (docs/ane-rules.md, "Other facts"): rewrite our files in place, atomically, and
         * leave the directory where it is when we are done. */
        if (!S_ISDIR(st.st_mode) || st.st_uid != geteuid()) {
            set_error(err, "tmpdir", ANE_E_OS, "%s exists and is not a directory owned by this user", m->tmpdir);
            goto out;
        }
        existing = 1;
    } else if (make_private_dir(m->tmpdir, err) != 0) {
        goto out;
    }
    snprintf(path, sizeof path, "%s/weights", m->tmpdir);
    if (mkdir(path, 0700) != 0 && !(existing && errno == EEXIST)) {
        set_error(err, "tmpdir", ANE_E_OS, "mkdir %s: %s", path, strerror(errno));
        goto fail;
    }
    snprintf(path, sizeof path, "%s/model.mil", m->tmpdir);
    if ((existing ? replace_private_file : write_private_file)(path, mil, mil_len, err) != 0)
        goto fail;
    for (size_t i = 0; i < n_weights; i++) {
        snprintf(path, sizeof path, "%s/%s", m->tmpdir, weight_relpath(names[i]));
        if ((existing ? replace_private_file : write_private_file)(path, blobs[i], sizes[i], err) != 0)
            goto fail;
    }
    if (dir_register(m->tmpdir, !existing) != 0) {
        set_error(err, "tmpdir", ANE_E_OS, "out of memory");
        goto fail;
    }
    rc = 0;
    goto out;
fail:
    if (!existing)
        remove_tree(m->tmpdir, NULL);
out:
    pthread_mutex_unlock(&g_lock);
    return rc;
}

static void release_tmpdir(ane_model *m, ane_error *err)
{
    if (!m->tmpdir[0])
        return;
    pthread_mutex_lock(&g_lock);
    int last = dir_release(m->tmpdir);
    pthread_mutex_unlock(&g_lock);
    if (last)
        remove_tree(m->tmpdir, err);
    m->tmpdir[0] = '\0';
}

/* ---- compile / load / unload ------------------------------------------------------------------- */
static void count_compile(void)
{
    pthread_mutex_lock(&g_lock);
    int n = ++g_compiles;
    pthread_mutex_unlock(&g_lock);
    if (n == ANE_COMPILE_WARN_AT || n >= ANE_COMPILE_BUDGET)
        fprintf(stderr,
                "rustane: warning: %d ANE compiles in this process; the compiler leaks and allows about %d per "
                "process (then load fails with 0x50004). Compile kernels once and reuse them, or restart.\n",
                n, ANE_COMPILE_BUDGET);
}

static BOOL send_load(id model, NSError **e)
{
    *e = nil;
    return SEND(msg_qos_options_error_fn)(model, @selector(loadWithQoS:options:error:), ANE_QOS, @{}, e);
}

static void model_dispose(ane_model *m)
{
    if (!m)
        return;
    @autoreleasepool {
        [m->model release];
        m->model = nil;
    }
    release_tmpdir(m, NULL);
    free(m->hex);
    free(m);
}

ane_model *ane_compile(const char *mil, size_t mil_len, size_t n_weights, const char *const *names,
                       const void *const *blobs, const size_t *blob_sizes, ane_error *err)
{
    if (need_init(err) != 0)
        return NULL;
    if (!mil || mil_len == 0) {
        set_error(err, "descriptor", ANE_E_ARG, "empty MIL text");
        return NULL;
    }
    for (size_t i = 0; i < n_weights; i++) {
        if (!names[i] || !weight_relpath(names[i])) {
            set_error(err, "weights", ANE_E_ARG,
                      "weight key %s: expected @model_path/weights/<file> with a plain file name",
                      names[i] ? names[i] : "(null)");
            return NULL;
        }
        for (size_t j = 0; j < i; j++)
            if (strcmp(names[i], names[j]) == 0) {
                set_error(err, "weights", ANE_E_ARG, "weight key %s given twice", names[i]);
                return NULL;
            }
    }
    ane_model *m = calloc(1, sizeof *m);
    if (!m) {
        set_error(err, "descriptor", ANE_E_OS, "out of memory");
        return NULL;
    }
    int ok = 0;
    const char *stage = "descriptor";
    @autoreleasepool {
        @try {
            NSData *mil_data = [NSData dataWithBytes:mil length:mil_len];
            /* An empty dict, never nil: nil weights make compile fail silently (docs/ane-runtime.md#call-sequence). */
            NSMutableDictionary *weights = [NSMutableDictionary dictionaryWithCapacity:n_weights];
            for (size_t i = 0; i < n_weights; i++) {
                NSData *blob = [NSData dataWithBytes:blobs[i] length:blob_sizes[i]];
                [weights setObject:@{@"offset": @0, @"data": blob} forKey:[NSString stringWithUTF8String:names[i]]];
            }
            id desc = SEND(msg_descriptor_fn)(g_descriptor_class, @selector(modelWithMILText:weights:optionsPlist:),
                                              mil_data, weights, nil);
            if (!desc) {
                set_error(err, stage, ANE_E_NIL_RESULT, "+modelWithMILText:weights:optionsPlist: returned nil");
                goto done;
            }
            stage = "model";
            id model = SEND(msg_class_obj_fn)(g_model_class, @selector(inMemoryModelWithDescriptor:), desc);
            if (!model) {
                set_error(err, stage, ANE_E_NIL_RESULT, "+inMemoryModelWithDescriptor: returned nil");
                goto done;
            }
            m->model = [model retain];

            stage = "tmpdir";
            NSString *hex = SEND(msg_getter_fn)(model, @selector(hexStringIdentifier));
            const char *hex_c = [hex isKindOfClass:[NSString class]] ? [hex UTF8String] : NULL;
            if (!hex_c || !valid_hex_id(hex_c)) {
                set_error(err, stage, ANE_E_NIL_RESULT, "-hexStringIdentifier gave no usable id (%.300s)",
                          hex_c ? hex_c : "nil");
                goto done;
            }
            m->hex = strdup(hex_c);
            if (!m->hex) {
                set_error(err, stage, ANE_E_OS, "out of memory");
                goto done;
            }
            NSString *tmp = NSTemporaryDirectory();
            const char *tmp_c = tmp ? [tmp fileSystemRepresentation] : NULL;
            if (!tmp_c) {
                set_error(err, stage, ANE_E_OS, "NSTemporaryDirectory() gave no directory");
                goto done;
            }
            size_t tl = strlen(tmp_c);
            while (tl > 1 && tmp_c[tl - 1] == '/')
                tl--;
            if ((size_t)snprintf(m->tmpdir, sizeof m->tmpdir, "%.*s/%s", (int)tl, tmp_c, m->hex) >= sizeof m->tmpdir) {
                set_error(err, stage, ANE_E_OS, "temp path too long");
                m->tmpdir[0] = '\0';
                goto done;
            }
            if (populate_tmpdir(m, mil, mil_len, n_weights, names, blobs, blob_sizes, err) != 0) {
                m->tmpdir[0] = '\0'; /* not ours to remove */
                goto done;
            }

            stage = "compile";
            count_compile();
            NSError *e = nil;
            if (!SEND(msg_qos_options_error_fn)(model, @selector(compileWithQoS:options:error:), ANE_QOS, @{}, &e)) {
                set_nserror(err, stage, "-compileWithQoS:options:error:", e);
                goto done;
            }

            stage = "load";
            if (!send_load(model, &e)) {
                /* 0x50004: program slots not yet reclaimed; one retry after 100 ms usually works. */
                struct timespec pause = {0, ANE_LOAD_RETRY_US * 1000L};
                while (nanosleep(&pause, &pause) != 0 && errno == EINTR) {
                }
                if (!send_load(model, &e)) {
                    set_nserror(err, stage, "-loadWithQoS:options:error: (after one retry)", e);
                    goto done;
                }
            }
            m->loaded = 1;
            ok = 1;
        done:;
        } @catch (NSException *ex) {
            set_exception(err, stage, ex);
        }
    }
    if (!ok) {
        model_dispose(m);
        return NULL;
    }
    return m;
}

const char *ane_model_tmpdir(const ane_model *m) { return m->tmpdir; }

int ane_model_free(ane_model *m, ane_error *err)
{
    if (!m)
        return 0;
    int rc = 0;
    if (m->loaded) {
        @autoreleasepool {
            @try {
                NSError *e = nil;
                if (!SEND(msg_unload_fn)(m->model, @selector(unloadWithQoS:error:), ANE_QOS, &e)) {
                    set_nserror(err, "unload", "-unloadWithQoS:error:", e);
                    rc = -1;
                }
            } @catch (NSException *ex) {
                set_exception(err, "unload", ex);
                rc = -1;
            }
        }
        m->loaded = 0;
    }
    ane_error rm_err;
    memset(&rm_err, 0, sizeof rm_err);
    if (m->tmpdir[0]) {
        release_tmpdir(m, &rm_err);
        if (rm_err.message[0] && rc == 0) {
            if (err)
                *err = rm_err;
            rc = -1;
        }
    }
    model_dispose(m);
    return rc;
}

/* ---- IOSurfaces -------------------------------------------------------------------------------- */
ane_surface *ane_surface_create(size_t nbytes, ane_error *err)
{
    if (need_init(err) != 0)
        return NULL;
    if (nbytes == 0) {
        set_error(err, "surface", ANE_E_ARG, "a surface needs at least one byte");
        return NULL;
    }
    ane_surface *s = calloc(1, sizeof *s);
    if (!s) {
        set_error(err, "surface", ANE_E_OS, "out of memory");
        return NULL;
    }
    s->nbytes = nbytes;
    @autoreleasepool {
        @try {
            /* A flat byte buffer (docs/ane-runtime.md#surfaces): width = bytes, one row, one byte per element. */
            NSNumber *n = [NSNumber numberWithUnsignedLong:(unsigned long)nbytes];
            NSDictionary *props = @{
                (id)kIOSurfaceWidth: n,
                (id)kIOSurfaceHeight: @1,
                (id)kIOSurfaceBytesPerElement: @1,
                (id)kIOSurfaceBytesPerRow: n,
                (id)kIOSurfaceAllocSize: n,
                (id)kIOSurfacePixelFormat: @0,
            };
            s->ref = IOSurfaceCreate((CFDictionaryRef)props);
            if (!s->ref) {
                set_error(err, "surface", ANE_E_NIL_RESULT, "IOSurfaceCreate(%zu bytes) returned NULL", nbytes);
            } else if (IOSurfaceGetAllocSize(s->ref) < nbytes) {
                set_error(err, "surface", ANE_E_NIL_RESULT, "IOSurface of %zu bytes has only %zu", nbytes,
                          (size_t)IOSurfaceGetAllocSize(s->ref));
            } else {
                id obj = SEND(msg_io_object_fn)(g_io_object_class, @selector(objectWithIOSurface:), s->ref);
                if (!obj)
                    set_error(err, "surface", ANE_E_NIL_RESULT, "+objectWithIOSurface: returned nil");
                else
                    s->io_object = [obj retain];
            }
        } @catch (NSException *ex) {
            set_exception(err, "surface", ex);
        }
    }
    if (!s->io_object) {
        ane_surface_free(s);
        return NULL;
    }
    return s;
}

size_t ane_surface_nbytes(const ane_surface *s) { return s->nbytes; }

void *ane_surface_lock(ane_surface *s, int readonly, ane_error *err)
{
    kern_return_t kr = IOSurfaceLock(s->ref, readonly ? kIOSurfaceLockReadOnly : 0, NULL);
    if (kr != 0) {
        set_error(err, "lock", ANE_E_LOCK, "IOSurfaceLock returned 0x%x", (unsigned)kr);
        return NULL;
    }
    void *p = IOSurfaceGetBaseAddress(s->ref);
    if (!p) {
        IOSurfaceUnlock(s->ref, readonly ? kIOSurfaceLockReadOnly : 0, NULL);
        set_error(err, "lock", ANE_E_NIL_RESULT, "IOSurfaceGetBaseAddress returned NULL");
    }
    return p;
}

int ane_surface_unlock(ane_surface *s, int readonly, ane_error *err)
{
    kern_return_t kr = IOSurfaceUnlock(s->ref, readonly ? kIOSurfaceLockReadOnly : 0, NULL);
    if (kr != 0) {
        set_error(err, "lock", ANE_E_LOCK, "IOSurfaceUnlock returned 0x%x", (unsigned)kr);
        return -1;
    }
    return 0;
}

void ane_surface_free(ane_surface *s)
{
    if (!s)
        return;
    @autoreleasepool {
        [s->io_object release];
        s->io_object = nil;
    }
    if (s->ref)
        CFRelease(s->ref);
    free(s);
}

/* ---- requests and evaluation ------------------------------------------------------------------- */
static NSMutableArray *index_array(size_t n)
{
    NSMutableArray *a = [NSMutableArray arrayWithCapacity:n];
    for (size_t i = 0; i < n; i++)
        [a addObject:[NSNumber numberWithUnsignedLong:(unsigned long)i]];
    return a;
}

ane_request *ane_request_create(ane_model *m, size_t n_in, ane_surface *const *ins, size_t n_out,
                                ane_surface *const *outs, ane_error *err)
{
    if (!m || !m->loaded) {
        set_error(err, "request", ANE_E_ARG, "model is not loaded");
        return NULL;
    }
    if (n_in == 0 || n_out == 0) {
        set_error(err, "request", ANE_E_ARG, "a request needs at least one input and one output");
        return NULL;
    }
    ane_request *r = calloc(1, sizeof *r);
    if (!r) {
        set_error(err, "request", ANE_E_OS, "out of memory");
        return NULL;
    }
    @autoreleasepool {
        @try {
            NSMutableArray *in_objs = [NSMutableArray arrayWithCapacity:n_in];
            NSMutableArray *out_objs = [NSMutableArray arrayWithCapacity:n_out];
            for (size_t i = 0; i < n_in; i++)
                [in_objs addObject:ins[i]->io_object];
            for (size_t i = 0; i < n_out; i++)
                [out_objs addObject:outs[i]->io_object];
            /* All seven arguments are objects; procedureIndex is the NSNumber @0, not an int. */
            id req = SEND(msg_request_fn)(
                g_request_class,
                @selector(requestWithInputs:inputIndices:outputs:outputIndices:weightsBuffer:perfStats:procedureIndex:),
                in_objs, index_array(n_in), out_objs, index_array(n_out), nil, nil, @0);
            if (!req)
                set_error(err, "request", ANE_E_NIL_RESULT, "+requestWithInputs:...procedureIndex: returned nil");
            else
                r->request = [req retain];
        } @catch (NSException *ex) {
            set_exception(err, "request", ex);
        }
    }
    if (!r->request) {
        free(r);
        return NULL;
    }
    return r;
}

void ane_request_free(ane_request *r)
{
    if (!r)
        return;
    @autoreleasepool {
        [r->request release];
    }
    free(r);
}

int ane_eval(ane_model *m, ane_request *r, ane_error *err)
{
    if (!m || !m->loaded || !r) {
        set_error(err, "eval", ANE_E_ARG, "model not loaded or no request");
        return -1;
    }
    int rc = 0;
    @autoreleasepool {
        @try {
            NSError *e = nil;
            if (!SEND(msg_evaluate_fn)(m->model, @selector(evaluateWithQoS:options:request:error:), ANE_QOS, @{},
                                       r->request, &e)) {
                set_nserror(err, "eval", "-evaluateWithQoS:options:request:error:", e);
                rc = -1;
            }
        } @catch (NSException *ex) {
            set_exception(err, "eval", ex);
            rc = -1;
        }
    }
    return rc;
}

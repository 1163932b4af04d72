/* A fake AppleNeuralEngine framework for the Linux contract tests (see fakeane.h).
 *
 * Built with GNUstep + GCC libobjc, manual retain/release. Nothing here talks to hardware: the
 * point is to see exactly what csrc/ane_runtime.m sends, in which order and with which argument
 * types, and to enforce the rules the real framework breaks on (docs/ane-runtime.md#call-sequence, docs/ane-runtime.md#surfaces, docs/ane-runtime.md#limits).
 */
#if !defined(_GNU_SOURCE)
#define _GNU_SOURCE /* -std=c11 hides lstat on glibc */
#endif
#import <Foundation/Foundation.h>

#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include "fakeane.h"
#include "iosurface_shim.h"
#include "sha256.h"

#define EXPORT __attribute__((visibility("default")))

/* ---- recorder ---------------------------------------------------------------------------------- */
typedef struct {
    char **items;
    size_t n, cap;
} strlist;

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static strlist g_log, g_violations;
static long g_live;
static fakeane_eval_fn g_eval_fn;
static void *g_eval_ctx;
static fakeane_hook_fn g_hook;
static struct { long code; int times; } g_fail_compile, g_fail_load, g_fail_eval;
static int g_next_surface_id;

static void strlist_push(strlist *l, char *s)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 64;
        char **items = realloc(l->items, cap * sizeof *items);
        if (!items) {
            free(s);
            return;
        }
        l->items = items;
        l->cap = cap;
    }
    l->items[l->n++] = s;
}

static void strlist_clear(strlist *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->items[i]);
    l->n = 0;
}

static void vpush(strlist *l, const char *fmt, va_list ap)
{
    va_list ap2;
    va_copy(ap2, ap);
    int n = vsnprintf(NULL, 0, fmt, ap2);
    va_end(ap2);
    char *s = n >= 0 ? malloc((size_t)n + 1) : NULL;
    if (!s)
        return;
    vsnprintf(s, (size_t)n + 1, fmt, ap);
    pthread_mutex_lock(&g_lock);
    strlist_push(l, s);
    pthread_mutex_unlock(&g_lock);
}

static void record(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void record(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vpush(&g_log, fmt, ap);
    va_end(ap);
}

static void violation(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void violation(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vpush(&g_violations, fmt, ap);
    va_end(ap);
}

static void live(long delta)
{
    pthread_mutex_lock(&g_lock);
    g_live += delta;
    pthread_mutex_unlock(&g_lock);
}

/* A short description of an argument's type, e.g. NSData, NSDictionary[0], NSNumber(0), nil. */
static NSString *kind(id o)
{
    if (o == nil)
        return @"nil";
    if ([o isKindOfClass:[NSData class]])
        return @"NSData";
    if ([o isKindOfClass:[NSString class]])
        return @"NSString";
    if ([o isKindOfClass:[NSNumber class]])
        return [NSString stringWithFormat:@"NSNumber(%@)", o];
    if ([o isKindOfClass:[NSDictionary class]])
        return [NSString stringWithFormat:@"NSDictionary[%lu]", (unsigned long)[o count]];
    if ([o isKindOfClass:[NSArray class]]) {
        NSString *elem = @"";
        for (id e in (NSArray *)o) {
            NSString *k = [e isKindOfClass:[NSNumber class]] ? @"NSNumber" : NSStringFromClass([e class]);
            if ([elem length] == 0)
                elem = k;
            else if (![elem isEqualToString:k])
                elem = @"mixed";
        }
        return [NSString stringWithFormat:@"NSArray<%@>[%lu]", elem, (unsigned long)[o count]];
    }
    return NSStringFromClass([o class]);
}

#define K(o) [kind(o) UTF8String]

static BOOL take_failure(long *code, int which)
{
    BOOL fail = NO;
    pthread_mutex_lock(&g_lock);
    if (which == 0 && g_fail_compile.times > 0) {
        g_fail_compile.times--;
        *code = g_fail_compile.code;
        fail = YES;
    } else if (which == 1 && g_fail_load.times > 0) {
        g_fail_load.times--;
        *code = g_fail_load.code;
        fail = YES;
    } else if (which == 2 && g_fail_eval.times > 0) {
        g_fail_eval.times--;
        *code = g_fail_eval.code;
        fail = YES;
    }
    pthread_mutex_unlock(&g_lock);
    return fail;
}

static BOOL fail_with(NSError **error, long code, NSString *what)
{
    if (error && code != 0)
        *error = [NSError errorWithDomain:@"com.apple.appleneuralengine"
                                     code:code
                                 userInfo:@{NSLocalizedDescriptionKey: [NSString stringWithFormat:@"fake %@ failure", what]}];
    return NO;
}

/* Ask the test's chip profile (if any) about one stage; returns the NSError code to fail with. */
static long profile_hook(int stage, NSData *mil, size_t n_in, const size_t *in_sizes, size_t n_out,
                         void *const *out_ptrs, const size_t *out_sizes)
{
    pthread_mutex_lock(&g_lock);
    fakeane_hook_fn fn = g_hook;
    pthread_mutex_unlock(&g_lock);
    if (!fn)
        return 0;
    return fn(stage, [mil bytes], [mil length], n_in, in_sizes, n_out, out_ptrs, out_sizes);
}

/* FAKEANE_CORRUPT=<SHA-256 of one program's MIL text, hex>: that program's first output comes back
 * with one element silently wrong, the way a miscompiled kernel on a real chip would look. The
 * self-check (rustane/selfcheck.py) must catch it and name the kernel. An environment variable
 * rather than a hook so that a subprocess (the training CLI, the doctor) can be corrupted too. */
#define FAKEANE_CORRUPT_VALUE 0x5640u /* fp16 100.0 */

static void corrupt_if_asked(NSData *mil, size_t n_out, void *const *out_ptrs, const size_t *out_sizes)
{
    const char *want = getenv("FAKEANE_CORRUPT");
    if (!want || !*want || n_out == 0 || out_sizes[0] < 2)
        return;
    sha256_ctx c;
    unsigned char d[32];
    char hex[65];
    sha256_init(&c);
    sha256_update(&c, [mil bytes], [mil length]);
    sha256_final(&c, d);
    sha256_hex(d, hex);
    if (strcasecmp(hex, want) != 0)
        return;
    /* element two thirds of the way in: not the first or last, where a test might look first */
    size_t n = out_sizes[0] / 2, at = (2 * n) / 3;
    uint16_t v = FAKEANE_CORRUPT_VALUE;
    memcpy((unsigned char *)out_ptrs[0] + 2 * at, &v, sizeof v);
}

/* ---- IOSurface shim over malloc ---------------------------------------------------------------- */
#define SURFACE_MAGIC 0x10501fa5u

struct __IOSurface {
    uint32_t magic;
    int id;
    int refs;           /* CFRelease by the owner + one per _ANEIOSurfaceObject */
    size_t size;
    unsigned char *data;
    int locked;
    IOSurfaceLockOptions lock_options;
    uint64_t readonly_hash;
};

EXPORT const void *kIOSurfaceWidth = @"IOSurfaceWidth";
EXPORT const void *kIOSurfaceHeight = @"IOSurfaceHeight";
EXPORT const void *kIOSurfaceBytesPerElement = @"IOSurfaceBytesPerElement";
EXPORT const void *kIOSurfaceBytesPerRow = @"IOSurfaceBytesPerRow";
EXPORT const void *kIOSurfaceAllocSize = @"IOSurfaceAllocSize";
EXPORT const void *kIOSurfacePixelFormat = @"IOSurfacePixelFormat";

static uint64_t fnv1a(uint64_t h, const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

static BOOL valid_surface(IOSurfaceRef s, const char *who)
{
    if (s && s->magic == SURFACE_MAGIC)
        return YES;
    violation("%s got something that is not a live IOSurface (%p)", who, (void *)s);
    return NO;
}

static long prop(NSDictionary *d, const void *key, BOOL *ok)
{
    id v = [d objectForKey:(id)key];
    if (![v isKindOfClass:[NSNumber class]]) {
        *ok = NO;
        return -1;
    }
    return [v longValue];
}

EXPORT IOSurfaceRef IOSurfaceCreate(CFDictionaryRef properties)
{
    NSDictionary *d = (NSDictionary *)properties;
    if (![d isKindOfClass:[NSDictionary class]]) {
        violation("IOSurfaceCreate: properties is not a dictionary");
        return NULL;
    }
    record("IOSurfaceCreate %s", K(d));
    BOOL ok = YES;
    long width = prop(d, kIOSurfaceWidth, &ok), height = prop(d, kIOSurfaceHeight, &ok);
    long bpe = prop(d, kIOSurfaceBytesPerElement, &ok), bpr = prop(d, kIOSurfaceBytesPerRow, &ok);
    long alloc = prop(d, kIOSurfaceAllocSize, &ok), fmt = prop(d, kIOSurfacePixelFormat, &ok);
    /* docs/ane-runtime.md#surfaces: a flat byte buffer, width = bpr = alloc = bytes, height 1, bpe 1, format 0. */
    if (!ok || [d count] != 6 || height != 1 || bpe != 1 || fmt != 0 || width <= 0 || bpr != width ||
        alloc != width) {
        violation("IOSurfaceCreate: not a flat byte buffer (width=%ld height=%ld bpe=%ld bpr=%ld alloc=%ld "
                  "format=%ld, %lu keys)", width, height, bpe, bpr, alloc, fmt, (unsigned long)[d count]);
        if (!ok || width <= 0)
            return NULL;
    }
    struct __IOSurface *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->data = calloc(1, (size_t)alloc > 0 ? (size_t)alloc : 1);
    if (!s->data) {
        free(s);
        return NULL;
    }
    s->magic = SURFACE_MAGIC;
    s->size = (size_t)(alloc > 0 ? alloc : width);
    s->refs = 1;
    pthread_mutex_lock(&g_lock);
    s->id = ++g_next_surface_id;
    pthread_mutex_unlock(&g_lock);
    live(1);
    return s;
}

static void surface_release(IOSurfaceRef s)
{
    pthread_mutex_lock(&g_lock);
    int left = --s->refs;
    pthread_mutex_unlock(&g_lock);
    if (left > 0)
        return;
    s->magic = 0;
    free(s->data);
    free(s);
    live(-1);
}

EXPORT kern_return_t IOSurfaceLock(IOSurfaceRef s, IOSurfaceLockOptions options, uint32_t *seed)
{
    (void)seed;
    if (!valid_surface(s, "IOSurfaceLock"))
        return 1;
    record("IOSurfaceLock #%d %s", s->id, (options & kIOSurfaceLockReadOnly) ? "ro" : "rw");
    if (s->locked)
        violation("IOSurfaceLock #%d: already locked (nested CPU locks)", s->id);
    s->locked++;
    s->lock_options = options;
    if (options & kIOSurfaceLockReadOnly)
        s->readonly_hash = fnv1a(0xcbf29ce484222325ull, s->data, s->size);
    return 0;
}

EXPORT kern_return_t IOSurfaceUnlock(IOSurfaceRef s, IOSurfaceLockOptions options, uint32_t *seed)
{
    (void)seed;
    if (!valid_surface(s, "IOSurfaceUnlock"))
        return 1;
    record("IOSurfaceUnlock #%d %s", s->id, (options & kIOSurfaceLockReadOnly) ? "ro" : "rw");
    if (!s->locked) {
        violation("IOSurfaceUnlock #%d: surface is not locked", s->id);
        return 1;
    }
    if ((options & kIOSurfaceLockReadOnly) != (s->lock_options & kIOSurfaceLockReadOnly))
        violation("IOSurfaceUnlock #%d: unlock options differ from the lock's (read-only flag)", s->id);
    if ((s->lock_options & kIOSurfaceLockReadOnly) &&
        fnv1a(0xcbf29ce484222325ull, s->data, s->size) != s->readonly_hash)
        violation("IOSurface #%d was written while locked read-only", s->id);
    s->locked--;
    return 0;
}

EXPORT void *IOSurfaceGetBaseAddress(IOSurfaceRef s)
{
    if (!valid_surface(s, "IOSurfaceGetBaseAddress"))
        return NULL;
    record("IOSurfaceGetBaseAddress #%d", s->id);
    if (!s->locked)
        violation("IOSurfaceGetBaseAddress #%d: CPU access without IOSurfaceLock", s->id);
    return s->data;
}

EXPORT size_t IOSurfaceGetAllocSize(IOSurfaceRef s)
{
    if (!valid_surface(s, "IOSurfaceGetAllocSize"))
        return 0;
    return s->size;
}

EXPORT void CFRelease(CFTypeRef cf)
{
    IOSurfaceRef s = (IOSurfaceRef)cf;
    if (!valid_surface(s, "CFRelease"))
        return;
    record("CFRelease #%d", s->id);
    if (s->locked)
        violation("CFRelease #%d: surface released while locked", s->id);
    surface_release(s);
}

/* ---- private classes ----------------------------------------------------------------------------- */
@interface _ANEInMemoryModelDescriptor : NSObject {
@public
    NSData *_mil;
    NSDictionary *_weights;
    NSString *_hex;
}
+ (id)modelWithMILText:(id)mil weights:(id)weights optionsPlist:(id)options;
- (id)hexStringIdentifier;
@end

static NSString *hex_digest(sha256_ctx *c)
{
    unsigned char d[32];
    char hex[65];
    sha256_final(c, d);
    sha256_hex(d, hex);
    return [NSString stringWithUTF8String:hex];
}

/* The identifier the framework derives (docs/ane-rules.md, "model identifier"): SHA-256 of the MIL
 * bytes; SHA-256 of four zero bytes followed by each weight's data, keys in sorted order; SHA-256
 * of the options plist (none here: the hash of empty input). Upper-case hex, joined by '_'. */
static NSString *model_identifier(NSData *mil, NSDictionary *weights)
{
    sha256_ctx c;
    sha256_init(&c);
    sha256_update(&c, [mil bytes], [mil length]);
    NSString *mil_hash = hex_digest(&c);
    sha256_init(&c);
    static const unsigned char zero[4];
    sha256_update(&c, zero, sizeof zero);
    for (NSString *k in [[weights allKeys] sortedArrayUsingSelector:@selector(compare:)]) {
        NSData *blob = [[weights objectForKey:k] objectForKey:@"data"];
        sha256_update(&c, [blob bytes], [blob length]);
    }
    NSString *weights_hash = hex_digest(&c);
    sha256_init(&c);
    NSString *options_hash = hex_digest(&c);
    return [NSString stringWithFormat:@"%@_%@_%@", mil_hash, weights_hash, options_hash];
}

@implementation _ANEInMemoryModelDescriptor
+ (id)modelWithMILText:(id)mil weights:(id)weights optionsPlist:(id)options
{
    record("+[_ANEInMemoryModelDescriptor modelWithMILText:weights:optionsPlist:] %s %s %s", K(mil), K(weights),
           K(options));
    if (![mil isKindOfClass:[NSData class]])
        violation("modelWithMILText: MIL text must be NSData (UTF-8 bytes), got %s", K(mil));
    if (weights == nil)
        violation("modelWithMILText: weights is nil (use @{} when there are none; nil fails silently)");
    else if (![weights isKindOfClass:[NSDictionary class]])
        violation("modelWithMILText: weights must be an NSDictionary, got %s", K(weights));
    else
        for (id key in (NSDictionary *)weights) {
            id v = [(NSDictionary *)weights objectForKey:key];
            if (![key isKindOfClass:[NSString class]] || ![key hasPrefix:@"@model_path/weights/"])
                violation("weights key %s is not an @model_path/weights/ path", [[key description] UTF8String]);
            if (![v isKindOfClass:[NSDictionary class]] ||
                ![[v objectForKey:@"offset"] isKindOfClass:[NSNumber class]] ||
                [[v objectForKey:@"offset"] longValue] != 0 ||
                ![[v objectForKey:@"data"] isKindOfClass:[NSData class]])
                violation("weights[%s] must be {offset: @0, data: NSData}", [[key description] UTF8String]);
        }
    if (options != nil)
        violation("modelWithMILText: optionsPlist should be nil, got %s", K(options));
    if (![mil isKindOfClass:[NSData class]] || ![weights isKindOfClass:[NSDictionary class]])
        return nil;
    _ANEInMemoryModelDescriptor *d = [[self alloc] init];
    d->_mil = [mil copy];
    d->_weights = [weights copy];
    d->_hex = [model_identifier(mil, weights) retain];
    live(1);
    return [d autorelease];
}

- (id)hexStringIdentifier
{
    return _hex;
}

- (void)dealloc
{
    [_mil release];
    [_weights release];
    [_hex release];
    live(-1);
    [super dealloc];
}
@end

@interface _ANEIOSurfaceObject : NSObject {
@public
    IOSurfaceRef _surface;
}
+ (id)objectWithIOSurface:(IOSurfaceRef)surface;
@end

@implementation _ANEIOSurfaceObject
+ (id)objectWithIOSurface:(IOSurfaceRef)surface
{
    if (!valid_surface(surface, "+[_ANEIOSurfaceObject objectWithIOSurface:]"))
        return nil;
    record("+[_ANEIOSurfaceObject objectWithIOSurface:] IOSurfaceRef #%d", surface->id);
    _ANEIOSurfaceObject *o = [[self alloc] init];
    pthread_mutex_lock(&g_lock);
    surface->refs++;
    pthread_mutex_unlock(&g_lock);
    o->_surface = surface;
    live(1);
    return [o autorelease];
}

- (void)dealloc
{
    surface_release(_surface);
    live(-1);
    [super dealloc];
}
@end

@interface _ANERequest : NSObject {
@public
    NSArray *_inputs, *_outputs;
}
+ (id)requestWithInputs:(id)inputs inputIndices:(id)inputIndices outputs:(id)outputs outputIndices:(id)outputIndices
          weightsBuffer:(id)weightsBuffer perfStats:(id)perfStats procedureIndex:(id)procedureIndex;
@end

static BOOL check_surface_array(id arr, id indices, const char *what)
{
    BOOL ok = YES;
    if (![arr isKindOfClass:[NSArray class]] || [arr count] == 0) {
        violation("request %s must be a non-empty NSArray of _ANEIOSurfaceObject, got %s", what, K(arr));
        return NO;
    }
    for (id o in (NSArray *)arr)
        if (![o isKindOfClass:[_ANEIOSurfaceObject class]]) {
            violation("request %s holds %s, not _ANEIOSurfaceObject", what, K(o));
            ok = NO;
        }
    if (![indices isKindOfClass:[NSArray class]] || [indices count] != [arr count]) {
        violation("request %s indices must be an NSArray of NSNumber, one per surface, got %s", what, K(indices));
        return NO;
    }
    for (NSUInteger i = 0; i < [indices count]; i++) {
        id n = [indices objectAtIndex:i];
        if (![n isKindOfClass:[NSNumber class]] || [n unsignedLongValue] != i) {
            violation("request %s indices must be @[@0, @1, ...], got %s at %lu", what, K(n), (unsigned long)i);
            ok = NO;
        }
    }
    return ok;
}

@implementation _ANERequest
+ (id)requestWithInputs:(id)inputs inputIndices:(id)inputIndices outputs:(id)outputs outputIndices:(id)outputIndices
          weightsBuffer:(id)weightsBuffer perfStats:(id)perfStats procedureIndex:(id)procedureIndex
{
    record("+[_ANERequest requestWithInputs:inputIndices:outputs:outputIndices:weightsBuffer:perfStats:procedureIndex:]"
           " %s %s %s %s %s %s %s", K(inputs), K(inputIndices), K(outputs), K(outputIndices), K(weightsBuffer),
           K(perfStats), K(procedureIndex));
    BOOL ok = check_surface_array(inputs, inputIndices, "inputs");
    ok = check_surface_array(outputs, outputIndices, "outputs") && ok;
    if (weightsBuffer != nil)
        violation("request weightsBuffer should be nil (weights are baked in at compile time)");
    if (perfStats != nil)
        violation("request perfStats should be nil");
    if (![procedureIndex isKindOfClass:[NSNumber class]]) {
        violation("request procedureIndex must be an NSNumber object (@0), got %s", K(procedureIndex));
        ok = NO;
    }
    if (!ok)
        return nil;
    _ANERequest *r = [[self alloc] init];
    r->_inputs = [inputs copy];
    r->_outputs = [outputs copy];
    live(1);
    return [r autorelease];
}

- (void)dealloc
{
    [_inputs release];
    [_outputs release];
    live(-1);
    [super dealloc];
}
@end

@interface _ANEInMemoryModel : NSObject {
    _ANEInMemoryModelDescriptor *_descriptor;
    NSString *_hex;
    BOOL _compiled, _loaded;
}
+ (id)inMemoryModelWithDescriptor:(id)descriptor;
- (id)hexStringIdentifier;
- (BOOL)saveModelFiles;
- (BOOL)compileWithQoS:(unsigned int)qos options:(id)options error:(NSError **)error;
- (BOOL)loadWithQoS:(unsigned int)qos options:(id)options error:(NSError **)error;
- (BOOL)evaluateWithQoS:(unsigned int)qos options:(id)options request:(id)request error:(NSError **)error;
- (BOOL)unloadWithQoS:(unsigned int)qos error:(NSError **)error;
@end

/* Files the fake itself wrote in -saveModelFiles (device, inode): their mode is the framework's,
 * not the runtime's, so the permission check below skips them. */
static struct { dev_t dev; ino_t ino; } g_saved[256];
static size_t g_n_saved;

static void remember_saved(NSString *path)
{
    struct stat st;
    if (lstat([path fileSystemRepresentation], &st) != 0)
        return;
    pthread_mutex_lock(&g_lock);
    g_saved[g_n_saved % 256].dev = st.st_dev;
    g_saved[g_n_saved % 256].ino = st.st_ino;
    g_n_saved++;
    pthread_mutex_unlock(&g_lock);
}

static BOOL saved_by_fake(const struct stat *st)
{
    BOOL hit = NO;
    pthread_mutex_lock(&g_lock);
    for (size_t i = 0; i < g_n_saved && i < 256; i++)
        if (g_saved[i].dev == st->st_dev && g_saved[i].ino == st->st_ino)
            hit = YES;
    pthread_mutex_unlock(&g_lock);
    return hit;
}

/* Compare a file the runtime wrote with what it must hold, and its permission bits. */
static void check_file(NSString *path, NSData *want, unsigned mode, const char *what)
{
    struct stat st;
    if (lstat([path fileSystemRepresentation], &st) != 0) {
        violation("compile: %s missing at %s (pre-populate the temp dir before compiling)", what, [path UTF8String]);
        return;
    }
    if (!S_ISREG(st.st_mode) || (!saved_by_fake(&st) && (st.st_mode & 0777) != mode))
        violation("compile: %s is not a regular file with mode %o (mode %o)", what, mode, st.st_mode & 0777);
    NSData *have = [NSData dataWithContentsOfFile:path];
    if (![have isEqualToData:want])
        violation("compile: %s content differs from the descriptor's", what);
}

static void check_dir(NSString *path, const char *what)
{
    struct stat st;
    if (lstat([path fileSystemRepresentation], &st) != 0 || !S_ISDIR(st.st_mode))
        violation("compile: %s directory missing at %s", what, [path UTF8String]);
    else if ((st.st_mode & 0777) != 0700)
        violation("compile: %s directory has mode %o, want 0700", what, st.st_mode & 0777);
}

static void check_options(id options, NSError **error, const char *sel)
{
    if (![options isKindOfClass:[NSDictionary class]])
        violation("%s: options must be a dictionary (@{}), got %s", sel, K(options));
    if (error == NULL)
        violation("%s: pass an NSError** to learn why it failed", sel);
}

@implementation _ANEInMemoryModel
+ (id)inMemoryModelWithDescriptor:(id)descriptor
{
    record("+[_ANEInMemoryModel inMemoryModelWithDescriptor:] %s", K(descriptor));
    if (![descriptor isKindOfClass:[_ANEInMemoryModelDescriptor class]]) {
        violation("inMemoryModelWithDescriptor: argument is %s, not a descriptor", K(descriptor));
        return nil;
    }
    _ANEInMemoryModelDescriptor *d = descriptor;
    _ANEInMemoryModel *m = [[self alloc] init];
    m->_descriptor = [d retain];
    m->_hex = [d->_hex copy]; /* the model copies the descriptor's id, as the framework does */
    live(1);
    return [m autorelease];
}

- (id)hexStringIdentifier
{
    record("-[_ANEInMemoryModel hexStringIdentifier]");
    return _hex;
}

- (NSString *)tmpdir
{
    return [NSTemporaryDirectory() stringByAppendingPathComponent:_hex];
}

- (BOOL)compileWithQoS:(unsigned int)qos options:(id)options error:(NSError **)error
{
    record("-[_ANEInMemoryModel compileWithQoS:options:error:] %u %s %s", qos, K(options), error ? "NSError**" : "NULL");
    check_options(options, error, "compileWithQoS:options:error:");
    NSString *dir = [self tmpdir];
    check_dir(dir, "model");
    check_dir([dir stringByAppendingPathComponent:@"weights"], "weights");
    check_file([dir stringByAppendingPathComponent:@"model.mil"], _descriptor->_mil, 0600, "model.mil");
    for (NSString *key in _descriptor->_weights) {
        NSString *rel = [key substringFromIndex:[@"@model_path/" length]];
        check_file([dir stringByAppendingPathComponent:rel], [[_descriptor->_weights objectForKey:key] objectForKey:@"data"],
                   0600, [key UTF8String]);
    }
    long code;
    if (take_failure(&code, 0))
        return fail_with(error, code, @"compile");
    if ((code = profile_hook(FAKEANE_COMPILE, _descriptor->_mil, 0, NULL, 0, NULL, NULL)) != 0)
        return fail_with(error, code, @"compile (rejected by the chip profile)");
    if (![self saveModelFiles]) {
        violation("compile: -saveModelFiles could not write into %s", [dir UTF8String]);
        return fail_with(error, 0x1, @"compile (saveModelFiles)");
    }
    /* The real compiler leaves net.plist next to the MIL; so does the fake, to test cleanup. */
    [[@"<plist/>" dataUsingEncoding:NSUTF8StringEncoding] writeToFile:[dir stringByAppendingPathComponent:@"net.plist"]
                                                             atomically:NO];
    _compiled = YES;
    return YES;
}

/* What the framework's own -saveModelFiles does inside compile (docs/ane-rules.md, "temp
 * directory"): create the directory if missing, rewrite model.mil atomically (a new file with the
 * default mode replaces the runtime's), and write each weight's data to <hex>/<first key of its
 * entry>, i.e. <hex>/data. */
- (BOOL)saveModelFiles
{
    NSString *dir = [self tmpdir];
    if (![[NSFileManager defaultManager] createDirectoryAtPath:dir withIntermediateDirectories:YES attributes:nil
                                                          error:NULL])
        return NO;
    NSString *mil = [dir stringByAppendingPathComponent:@"model.mil"];
    if (![_descriptor->_mil writeToFile:mil atomically:YES])
        return NO;
    remember_saved(mil);
    for (NSString *key in _descriptor->_weights) {
        NSString *data = [dir stringByAppendingPathComponent:@"data"];
        if (![[[_descriptor->_weights objectForKey:key] objectForKey:@"data"] writeToFile:data atomically:YES])
            return NO;
        remember_saved(data);
    }
    return YES;
}

- (BOOL)loadWithQoS:(unsigned int)qos options:(id)options error:(NSError **)error
{
    record("-[_ANEInMemoryModel loadWithQoS:options:error:] %u %s %s", qos, K(options), error ? "NSError**" : "NULL");
    check_options(options, error, "loadWithQoS:options:error:");
    if (!_compiled) {
        violation("loadWithQoS: model was not compiled");
        return fail_with(error, 0x50004, @"load");
    }
    long code;
    if (take_failure(&code, 1))
        return fail_with(error, code, @"load");
    if ((code = profile_hook(FAKEANE_LOAD, _descriptor->_mil, 0, NULL, 0, NULL, NULL)) != 0)
        return fail_with(error, code, @"load (refused by the chip profile)");
    _loaded = YES;
    return YES;
}

- (BOOL)evaluateWithQoS:(unsigned int)qos options:(id)options request:(id)request error:(NSError **)error
{
    record("-[_ANEInMemoryModel evaluateWithQoS:options:request:error:] %u %s %s %s", qos, K(options), K(request),
           error ? "NSError**" : "NULL");
    check_options(options, error, "evaluateWithQoS:options:request:error:");
    if (!_loaded) {
        violation("evaluateWithQoS: model is not loaded");
        return fail_with(error, 0x1d, @"eval");
    }
    if (![request isKindOfClass:[_ANERequest class]]) {
        violation("evaluateWithQoS: request is %s", K(request));
        return fail_with(error, 0x1d, @"eval");
    }
    _ANERequest *r = request;
    NSUInteger n_in = [r->_inputs count], n_out = [r->_outputs count];
    void *in_ptrs[n_in], *out_ptrs[n_out];
    size_t in_sizes[n_in], out_sizes[n_out];
    for (NSUInteger i = 0; i < n_in + n_out; i++) {
        BOOL is_in = i < n_in;
        _ANEIOSurfaceObject *o = is_in ? [r->_inputs objectAtIndex:i] : [r->_outputs objectAtIndex:i - n_in];
        IOSurfaceRef s = o->_surface;
        if (s->locked)
            violation("evaluateWithQoS: surface #%d is locked by the CPU during evaluation", s->id);
        if (is_in) {
            in_ptrs[i] = s->data;
            in_sizes[i] = s->size;
        } else {
            out_ptrs[i - n_in] = s->data;
            out_sizes[i - n_in] = s->size;
        }
    }
    long code;
    if (take_failure(&code, 2))
        return fail_with(error, code, @"eval");
    if ((code = profile_hook(FAKEANE_EVAL_BEFORE, _descriptor->_mil, n_in, in_sizes, n_out, out_ptrs, out_sizes)) != 0)
        return fail_with(error, code, @"eval (Program Inference error under the chip profile)");
    pthread_mutex_lock(&g_lock);
    fakeane_eval_fn fn = g_eval_fn;
    void *ctx = g_eval_ctx;
    pthread_mutex_unlock(&g_lock);
    if (!fn)
        return fail_with(error, 0x1d, @"eval (no evaluator registered: fakeane_set_eval_callback)");
    NSDictionary *w = _descriptor->_weights;
    NSArray *keys = [[w allKeys] sortedArrayUsingSelector:@selector(compare:)];
    size_t n_w = [keys count];
    const char *wk[n_w + 1];
    const void *wd[n_w + 1];
    size_t ws[n_w + 1];
    for (size_t i = 0; i < n_w; i++) {
        NSData *blob = [[w objectForKey:[keys objectAtIndex:i]] objectForKey:@"data"];
        wk[i] = [[keys objectAtIndex:i] UTF8String];
        wd[i] = [blob bytes];
        ws[i] = [blob length];
    }
    int rc = fn(ctx, [_descriptor->_mil bytes], [_descriptor->_mil length], n_w, wk, wd, ws, n_in, in_ptrs, in_sizes,
                n_out, out_ptrs, out_sizes);
    if (rc != 0)
        return fail_with(error, rc, @"eval (evaluator)");
    /* where the hardware is silently wrong, the profile rewrites the outputs and still succeeds */
    if ((code = profile_hook(FAKEANE_EVAL_AFTER, _descriptor->_mil, n_in, in_sizes, n_out, out_ptrs, out_sizes)) != 0)
        return fail_with(error, code, @"eval (chip profile)");
    corrupt_if_asked(_descriptor->_mil, n_out, out_ptrs, out_sizes);
    return YES;
}

- (BOOL)unloadWithQoS:(unsigned int)qos error:(NSError **)error
{
    record("-[_ANEInMemoryModel unloadWithQoS:error:] %u %s", qos, error ? "NSError**" : "NULL");
    if (!_loaded) {
        violation("unloadWithQoS: model is not loaded");
        return fail_with(error, 0x50004, @"unload");
    }
    _loaded = NO;
    return YES;
}

- (void)dealloc
{
    if (_loaded)
        violation("_ANEInMemoryModel released while still loaded (unloadWithQoS:error: first)");
    [_descriptor release];
    [_hex release];
    live(-1);
    [super dealloc];
}
@end

/* ---- hooks ------------------------------------------------------------------------------------- */
EXPORT void fakeane_set_eval_callback(fakeane_eval_fn fn, void *ctx)
{
    pthread_mutex_lock(&g_lock);
    g_eval_fn = fn;
    g_eval_ctx = ctx;
    pthread_mutex_unlock(&g_lock);
}

EXPORT void fakeane_set_hook(fakeane_hook_fn fn)
{
    pthread_mutex_lock(&g_lock);
    g_hook = fn;
    pthread_mutex_unlock(&g_lock);
}

EXPORT void fakeane_reset(void)
{
    pthread_mutex_lock(&g_lock);
    strlist_clear(&g_log);
    strlist_clear(&g_violations);
    g_fail_compile.times = g_fail_load.times = g_fail_eval.times = 0;
    pthread_mutex_unlock(&g_lock);
}

static const char *entry(strlist *l, size_t i)
{
    pthread_mutex_lock(&g_lock);
    const char *s = i < l->n ? l->items[i] : NULL;
    pthread_mutex_unlock(&g_lock);
    return s;
}

EXPORT size_t fakeane_log_count(void) { return g_log.n; }
EXPORT const char *fakeane_log_entry(size_t i) { return entry(&g_log, i); }
EXPORT size_t fakeane_violation_count(void) { return g_violations.n; }
EXPORT const char *fakeane_violation(size_t i) { return entry(&g_violations, i); }

EXPORT void fakeane_fail_next(const char *stage, long code, int times)
{
    pthread_mutex_lock(&g_lock);
    if (strcmp(stage, "compile") == 0)
        g_fail_compile.code = code, g_fail_compile.times = times;
    else if (strcmp(stage, "load") == 0)
        g_fail_load.code = code, g_fail_load.times = times;
    else if (strcmp(stage, "eval") == 0)
        g_fail_eval.code = code, g_fail_eval.times = times;
    pthread_mutex_unlock(&g_lock);
}

EXPORT void fakeane_sha256_hex(const void *data, size_t n, char out[65])
{
    sha256_ctx c;
    unsigned char d[32];
    sha256_init(&c);
    sha256_update(&c, data, n);
    sha256_final(&c, d);
    sha256_hex(d, out);
}

EXPORT long fakeane_live_objects(void)
{
    pthread_mutex_lock(&g_lock);
    long n = g_live;
    pthread_mutex_unlock(&g_lock);
    return n;
}

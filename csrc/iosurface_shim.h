/* Linux-only stand-in for the IOSurface C API (tests only).
 *
 * On macOS the runtime includes <IOSurface/IOSurface.h>. On Linux there is no IOSurface, so the
 * fake framework (tests/fakeane) implements these same names over malloc, and the runtime resolves
 * them with dlsym from the fake's handle when it "loads the framework" — so the extension never
 * links against the fake and nothing of it is loaded unless a test asks for it.
 *
 * The property keys are Objective-C string objects in the fake (the CF types are toll-free
 * bridged on macOS, where the runtime casts them to id the same way).
 */
#ifndef RUSTANE_IOSURFACE_SHIM_H
#define RUSTANE_IOSURFACE_SHIM_H

#ifdef __APPLE__
#error "iosurface_shim.h is for Linux test builds only; use <IOSurface/IOSurface.h> on macOS"
#endif

#include <stddef.h>
#include <stdint.h>

typedef const void *CFTypeRef;
typedef const void *CFStringRef;
typedef const void *CFDictionaryRef;
typedef struct __IOSurface *IOSurfaceRef;
typedef uint32_t IOSurfaceLockOptions;
typedef int kern_return_t;

enum { kIOSurfaceLockReadOnly = 0x00000001, kIOSurfaceLockAvoidSync = 0x00000002 };

/* Function-pointer types with the exact prototypes of the Apple API (resolved by dlsym). */
typedef IOSurfaceRef (*iosurface_create_fn)(CFDictionaryRef properties);
typedef kern_return_t (*iosurface_lock_fn)(IOSurfaceRef buffer, IOSurfaceLockOptions options, uint32_t *seed);
typedef void *(*iosurface_base_fn)(IOSurfaceRef buffer);
typedef size_t (*iosurface_size_fn)(IOSurfaceRef buffer);
typedef void (*cf_release_fn)(CFTypeRef cf);

/* Names the fake exports (the runtime looks these up; the fake defines them). */
#define IOSURFACE_SHIM_SYMBOLS(X) \
    X(IOSurfaceCreate, iosurface_create_fn) \
    X(IOSurfaceLock, iosurface_lock_fn) \
    X(IOSurfaceUnlock, iosurface_lock_fn) \
    X(IOSurfaceGetBaseAddress, iosurface_base_fn) \
    X(IOSurfaceGetAllocSize, iosurface_size_fn) \
    X(CFRelease, cf_release_fn)

#define IOSURFACE_SHIM_KEYS(X) \
    X(kIOSurfaceWidth) \
    X(kIOSurfaceHeight) \
    X(kIOSurfaceBytesPerElement) \
    X(kIOSurfaceBytesPerRow) \
    X(kIOSurfaceAllocSize) \
    X(kIOSurfacePixelFormat)

#endif

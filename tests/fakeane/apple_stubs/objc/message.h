/* Syntax-check stub (tests only): the modern macOS SDK declares objc_msgSend as void(void)
 * (OBJC_OLD_DISPATCH_PROTOTYPES=0), so any call not cast to an exact prototype fails to compile.
 * GCC's own objc/message.h is included first for everything else. */
#include_next <objc/message.h>
void objc_msgSend(void);

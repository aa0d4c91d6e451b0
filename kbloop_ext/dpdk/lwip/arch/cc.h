/* lwIP's platform header for kbloop: Linux, GCC, little-endian x86-64.  lwip/arch.h supplies
 * the rest (stdint types, printf diagnostics). */
#ifndef KBLOOP_LWIP_ARCH_CC_H
#define KBLOOP_LWIP_ARCH_CC_H
#include <stdio.h>
#include <stdlib.h>
#define LWIP_PLATFORM_DIAG(x)   do { printf x; } while (0)
#define LWIP_PLATFORM_ASSERT(x) do { fprintf(stderr, "kbloop lwIP assertion \"%s\" failed at %s:%d\n", \
                                     x, __FILE__, __LINE__); fflush(NULL); abort(); } while (0)
#define LWIP_ERRNO_STDINCLUDE   1
#endif

/* Shared by diygpt's C kernels (built by diygpt/native.py, which keys its cache on this file
 * too).
 *
 * torch.set_flush_denormal(True) sets flush-to-zero in the calling thread only, so torch's
 * own result then depends on how its threads split the work; a kernel that must equal torch
 * refuses to run in that mode and leaves the op to torch.
 */
#ifndef DIYGPT_NATIVE_FP_H
#define DIYGPT_NATIVE_FP_H

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

static inline int diygpt_flushing_denormals(void) {
#if defined(__x86_64__) || defined(__i386__)
    return (_mm_getcsr() & 0x8040) != 0; /* FTZ or DAZ */
#else
    return 0;
#endif
}

#endif

/* libpwork.so / libpwork_cet.so: see pwork.h. Every function is exported, noinline and holds
 * an empty asm with a memory clobber, so each call stays a real call that a uprobe sees.
 *
 * PWORK_FRAME() makes every function set up a frame (push %rbp; mov %rsp,%rbp), also the leaf
 * ones: GCC 12 on x86-64 skips the frame in leaf functions even with -fno-omit-frame-pointer
 * (and -mno-omit-leaf-frame-pointer does not change that). With it, the first instruction is
 * `push %rbp` in libpwork.so and `endbr64` in libpwork_cet.so, and the lib_tick USDT nop is
 * not at the entry address of pwork_lib_tick. */
#include <sys/sdt.h>

#include "precise_sleep.h"
#include "pwork.h"

#define PWORK_FRAME() __asm__ volatile("" : : "r"(__builtin_frame_address(0)) : "memory")

static __thread unsigned long long last_sleep_ns;

void pwork_sleep_us(unsigned long us)
{
	unsigned long long start;

	PWORK_FRAME();
	start = precise_now_ns();
	precise_sleep_us(us);
	last_sleep_ns = precise_now_ns() - start;
}

unsigned long long pwork_last_sleep_ns(void)
{
	PWORK_FRAME();
	return last_sleep_ns;
}

unsigned long pwork_record(unsigned long v)
{
	PWORK_FRAME();
	__asm__ volatile("" : "+r"(v) : : "memory");
	return v;
}

unsigned long pwork_nop(void)
{
	PWORK_FRAME();
	return 0;
}

void pwork_lib_tick(unsigned long i)
{
	PWORK_FRAME();
	DTRACE_PROBE1(pwork, lib_tick, i);
}

/* libpwork.so / libpwork_cet.so: see pwork.h. Every function is exported, noinline and holds
 * an empty asm with a memory clobber, so each call stays a real call that a uprobe sees.
 *
 * PWORK_FRAME() makes every function set up a frame (push %rbp; mov %rsp,%rbp), also the leaf
 * ones: GCC 12 on x86-64 skips the frame in leaf functions even with -fno-omit-frame-pointer
 * (and -mno-omit-leaf-frame-pointer does not change that). With it, the first instruction is
 * `push %rbp` in libpwork.so and `endbr64` in libpwork_cet.so, and the lib_tick USDT nop is
 * not at the entry address of pwork_lib_tick. */
#include <pthread.h>
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

static pthread_mutex_t hold_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t hold_changed = PTHREAD_COND_INITIALIZER;
static unsigned long hold_inside;
static int hold_released;

void pwork_hold(void)
{
	PWORK_FRAME();
	pthread_mutex_lock(&hold_lock);
	hold_inside++;
	pthread_cond_broadcast(&hold_changed);
	while (!hold_released)
		pthread_cond_wait(&hold_changed, &hold_lock);
	hold_inside--;
	pthread_cond_broadcast(&hold_changed);
	pthread_mutex_unlock(&hold_lock);
}

void pwork_hold_wait(unsigned long n)
{
	PWORK_FRAME();
	pthread_mutex_lock(&hold_lock);
	while (hold_inside < n)
		pthread_cond_wait(&hold_changed, &hold_lock);
	pthread_mutex_unlock(&hold_lock);
}

void pwork_hold_release(void)
{
	PWORK_FRAME();
	pthread_mutex_lock(&hold_lock);
	hold_released = 1;
	pthread_cond_broadcast(&hold_changed);
	while (hold_inside > 0)
		pthread_cond_wait(&hold_changed, &hold_lock);
	pthread_mutex_unlock(&hold_lock);
}

/* libpwork: functions with known calls and known durations for probec's uprobe/USDT tests. */
#ifndef PROBEC_WORKLOADS_PWORK_H
#define PROBEC_WORKLOADS_PWORK_H

#define PWORK_API __attribute__((visibility("default"), noinline))

#ifdef __cplusplus
extern "C" {
#endif

/* Takes `us` microseconds: nanosleep for us >= 1000, busy-wait below (see precise_sleep.h). */
PWORK_API void pwork_sleep_us(unsigned long us);
/* How long this thread's last pwork_sleep_us call took, timed inside its body (so inside any
 * probe on it). */
PWORK_API unsigned long long pwork_last_sleep_ns(void);
/* Returns v and does nothing else; always a real call (uprobe arg/retval tests). */
PWORK_API unsigned long pwork_record(unsigned long v);
/* Returns 0 and does nothing else; always a real call (overhead benchmarks). */
PWORK_API unsigned long pwork_nop(void);
/* Fires the library USDT probe pwork:lib_tick with arg0 = i. */
PWORK_API void pwork_lib_tick(unsigned long i);
/* Stays inside this call until pwork_hold_release() (gauge tests: calls in flight). */
PWORK_API void pwork_hold(void);
/* Returns once `n` threads are inside pwork_hold. */
PWORK_API void pwork_hold_wait(unsigned long n);
/* Lets every pwork_hold call return, and returns once none is inside any more. */
PWORK_API void pwork_hold_release(void);

#ifdef __cplusplus
}
#endif

#endif

/* Sleep for a known number of microseconds, as tightly as this machine allows.
 *
 * Shared by libpwork and libinference (each gets its own inlined copy, so neither
 * library depends on the other). Durations are measured from the call itself:
 *   us >= 1000: clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME) to start + us
 *               (off-CPU; restarts after EINTR without drifting);
 *   us <  1000: busy-wait on clock_gettime(CLOCK_MONOTONIC) (on-CPU).
 * The executables set their timer slack to 1 ns (PR_SET_TIMERSLACK) so the kernel
 * does not add its default 50 us of slack to each nanosleep wake-up.
 */
#ifndef PROBEC_WORKLOADS_PRECISE_SLEEP_H
#define PROBEC_WORKLOADS_PRECISE_SLEEP_H

#include <errno.h>
#include <time.h>

#define PRECISE_SLEEP_NANOSLEEP_MIN_US 1000UL

/* CLOCK_MONOTONIC in nanoseconds: the clock of bpf_ktime_get_ns() and bpftrace's nsecs. */
static inline unsigned long long precise_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (unsigned long long)ts.tv_sec * 1000000000ULL + (unsigned long long)ts.tv_nsec;
}

static inline void precise_sleep_add_us(struct timespec *ts, unsigned long us)
{
	ts->tv_sec += (time_t)(us / 1000000UL);
	ts->tv_nsec += (long)(us % 1000000UL) * 1000L;
	if (ts->tv_nsec >= 1000000000L) {
		ts->tv_sec += 1;
		ts->tv_nsec -= 1000000000L;
	}
}

static inline int precise_sleep_before(const struct timespec *a, const struct timespec *b)
{
	return a->tv_sec < b->tv_sec || (a->tv_sec == b->tv_sec && a->tv_nsec < b->tv_nsec);
}

static inline void precise_sleep_us(unsigned long us)
{
	struct timespec deadline, now;

	clock_gettime(CLOCK_MONOTONIC, &deadline);
	precise_sleep_add_us(&deadline, us);
	if (us >= PRECISE_SLEEP_NANOSLEEP_MIN_US) {
		while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &deadline, NULL) == EINTR)
			;
		return;
	}
	do {
		clock_gettime(CLOCK_MONOTONIC, &now);
	} while (precise_sleep_before(&now, &deadline));
}

#endif

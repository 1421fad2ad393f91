/* Helpers shared by the example workloads: strict number parsing, thread naming with a 1 ns
 * timer slack, a precise sleep, and write/read-all loops. Header-only, C and C++. */
#ifndef PROBEC_EXAMPLES_COMMON_H
#define PROBEC_EXAMPLES_COMMON_H

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

/* A plain unsigned decimal (digits only) that fits in 64 bits; exits with status 2 otherwise. */
static inline unsigned long long ex_u64(const char *s)
{
	const char *p;
	char *end;
	unsigned long long v;

	if (s == NULL || *s == '\0')
		goto bad;
	for (p = s; *p; p++)
		if (*p < '0' || *p > '9')
			goto bad;
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno != 0 || *end != '\0')
		goto bad;
	return v;
bad:
	fprintf(stderr, "not an unsigned number: '%s'\n", s ? s : "(null)");
	exit(2);
}

/* Names the calling thread (its comm) and sets a 1 ns timer slack so nanosleep wakes on time. */
static inline void ex_thread(const char *comm)
{
	prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);
	if (comm != NULL && prctl(PR_SET_NAME, (unsigned long)comm, 0UL, 0UL, 0UL) != 0) {
		perror("prctl(PR_SET_NAME)");
		exit(1);
	}
}

/* Sleeps off-CPU for `us` microseconds: one clock_nanosleep, hence one wake-up (an EINTR restart
 * sleeps what was left). The time is relative, so the kernel arms the timer right before the
 * thread blocks: however long the thread is delayed before the call (preempted, or its virtual
 * CPU stalled), it is off the CPU for the whole time. (An absolute deadline taken before the call
 * lets such a delay eat into the sleep, or all of it.) */
static inline void ex_sleep_us(unsigned long us)
{
	struct timespec t = { (time_t)(us / 1000000UL), (long)(us % 1000000UL) * 1000L };

	while (clock_nanosleep(CLOCK_MONOTONIC, 0, &t, &t) == EINTR)
		;
}

/* CLOCK_MONOTONIC in nanoseconds: the clock of bpf_ktime_get_ns() and bpftrace's nsecs. */
static inline unsigned long long ex_now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (unsigned long long)t.tv_sec * 1000000000ULL + (unsigned long long)t.tv_nsec;
}

/* CLOCK_THREAD_CPUTIME_ID in nanoseconds: the time the kernel has accounted the calling thread as
 * running on a CPU (its scheduler's own clock). Wall time minus this is time off the CPU. */
static inline unsigned long long ex_thread_cpu_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
	return (unsigned long long)t.tv_sec * 1000000000ULL + (unsigned long long)t.tv_nsec;
}

static inline void ex_die(const char *what)
{
	perror(what);
	exit(1);
}

/* Reads exactly `len` bytes with recv(); exits on EOF or error. */
static inline void ex_recv_all(int fd, void *buf, size_t len)
{
	size_t got = 0;

	while (got < len) {
		ssize_t n = recv(fd, (char *)buf + got, len - got, 0);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			fprintf(stderr, "recv: %s\n", n == 0 ? "connection closed early" : strerror(errno));
			exit(1);
		}
		got += (size_t)n;
	}
}

/* One send() call (the sendto syscall) of `len` bytes; a blocking stream socket sends all of
 * it or fails, and this exits on failure or a short send so every call is counted once. */
static inline void ex_send_once(int fd, const void *buf, size_t len)
{
	ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);

	if (n < 0 || (size_t)n != len) {
		fprintf(stderr, "send of %zu bytes: %s\n", len, n < 0 ? strerror(errno) : "short send");
		exit(1);
	}
}

#endif

/* loadgen: a controlled rate of spans for the collector and ring-buffer benchmarks.
 *
 *   loadgen getpid RATE COUNT          COUNT raw getpid syscalls at RATE per second
 *   loadgen nop RATE COUNT LIBRARY     COUNT calls of LIBRARY's pwork_nop() at RATE per second
 *
 * RATE 0 means as fast as possible. Paced in 1 ms slices (RATE/1000 calls, then sleep to the next
 * slice on CLOCK_MONOTONIC; a late slice catches up). Prints "calls=N seconds=S rate=R" on stdout.
 * Part of probec's benchmarks (benchmarks/README.md); the test workloads stay untouched. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static unsigned long (*nop_fn)(void);
static int use_nop;

static inline void one(void)
{
	if (use_nop)
		nop_fn();
	else
		syscall(SYS_getpid);
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	if (argc < 4 || (strcmp(argv[1], "getpid") && strcmp(argv[1], "nop")) ||
	    (!strcmp(argv[1], "nop") && argc < 5)) {
		fprintf(stderr, "usage: loadgen getpid|nop RATE COUNT [LIBRARY]\n");
		return 2;
	}
	unsigned long rate = strtoul(argv[2], NULL, 10), count = strtoul(argv[3], NULL, 10), done = 0;

	if (!strcmp(argv[1], "nop")) {
		void *lib = dlopen(argv[4], RTLD_NOW);

		if (!lib || !(nop_fn = (unsigned long (*)(void))dlsym(lib, "pwork_nop"))) {
			fprintf(stderr, "loadgen: %s\n", dlerror());
			return 1;
		}
		use_nop = 1;
	}
	double t0 = now_s();

	if (rate == 0) {
		for (; done < count; done++)
			one();
	} else {
		struct timespec next;
		unsigned long per_slice = rate / 1000 ? rate / 1000 : 1;
		long slice_ns = rate / 1000 ? 1000000L : 1000000000L / rate;

		clock_gettime(CLOCK_MONOTONIC, &next);
		while (done < count) {
			for (unsigned long i = 0; i < per_slice && done < count; i++, done++)
				one();
			next.tv_nsec += slice_ns;
			while (next.tv_nsec >= 1000000000L) {
				next.tv_nsec -= 1000000000L;
				next.tv_sec++;
			}
			clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
		}
	}
	double dt = now_s() - t0;

	printf("calls=%lu seconds=%.6f rate=%.0f\n", done, dt, done / (dt > 0 ? dt : 1e-9));
	return 0;
}

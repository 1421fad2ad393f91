/* Small helpers shared by the workload executables (pwork, inference): strict number parsing,
 * thread naming, timer slack and the --wait-stdin handshake. */
#ifndef PROBEC_WORKLOADS_WORKLOAD_CLI_H
#define PROBEC_WORKLOADS_WORKLOAD_CLI_H

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <unistd.h>

/* Parses a plain unsigned decimal (digits only, no sign, no spaces) that fits in 64 bits. */
static inline int workload_parse_u64(const char *s, unsigned long long *out)
{
	const char *p;
	char *end;

	if (s == NULL || *s == '\0')
		return -1;
	for (p = s; *p; p++)
		if (*p < '0' || *p > '9')
			return -1;
	errno = 0;
	*out = strtoull(s, &end, 10);
	if (errno != 0 || *end != '\0')
		return -1;
	return 0;
}

/* Per thread: the comm name (if given) and a 1 ns timer slack so nanosleep wakes on time. */
static inline int workload_setup_thread(const char *comm)
{
	prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);
	if (comm != NULL && prctl(PR_SET_NAME, (unsigned long)comm, 0UL, 0UL, 0UL) != 0) {
		perror("prctl(PR_SET_NAME)");
		return -1;
	}
	return 0;
}

/* --wait-stdin: print "PID <n>\n", flush, then block until one line (or EOF) arrives on stdin. */
static inline void workload_wait_stdin(void)
{
	int c;

	printf("PID %ld\n", (long)getpid());
	fflush(stdout);
	do {
		c = getchar();
	} while (c != '\n' && c != EOF);
}

#endif

/* pwork: calls into libpwork (and fires USDT probes, makes syscalls) an exact number of times.
 * Run without arguments for the command line. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sdt.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "precise_sleep.h"
#include "pwork.h"
#include "workload_cli.h"

static const char usage_text[] =
	"usage: pwork [--comm NAME] [--threads T] [--wait-stdin] [--durations FILE] COMMAND ARGS...\n"
	"commands (every count is exact; with --threads T each of T threads runs the command):\n"
	"  sleep N US [N2 US2 ...]  N calls of pwork_sleep_us(US) per pair, in order\n"
	"  record V1 [V2 ...]       pwork_record(Vi) once each (unsigned 64-bit decimals)\n"
	"  record-past-entry V1 ... pwork_record(Vi) once each, entered 4 bytes in, past its endbr64\n"
	"                           (as a jump past a function's entry does; at the entry where it\n"
	"                           does not start with endbr64)\n"
	"  write N SIZE             N write() syscalls of SIZE bytes to /dev/null\n"
	"  usdt N                   N x USDT pwork:tick(i) in pwork and N x pwork_lib_tick(i)\n"
	"                           (USDT pwork:lib_tick in libpwork), i = 0..N-1\n"
	"  nop N                    N calls of pwork_nop()\n"
	"  getpid N                 N syscall(SYS_getpid)\n"
	"  hold                     (needs --threads T) each thread calls pwork_hold(); once all T\n"
	"                           are inside, print \"HOLDING T\", release them when a line (or\n"
	"                           EOF) arrives on stdin, print \"RELEASED T\" once all returned\n"
	"--durations FILE: for sleep, one line per call: \"US OUTER INNER\": asked (us), then\n"
	"                  nanoseconds of CLOCK_MONOTONIC around the call (OUTER, the caller's\n"
	"                  view, so any probe on it is inside) and inside its body (INNER)\n";

enum command { CMD_SLEEP, CMD_RECORD, CMD_RECORD_PAST_ENTRY, CMD_WRITE, CMD_USDT, CMD_NOP, CMD_GETPID, CMD_HOLD };

struct work {
	enum command cmd;
	const char *comm;
	unsigned long long *args; /* parsed numbers after the command name */
	size_t nargs;
	FILE *durations; /* CMD_SLEEP with --durations */
	int devnull;  /* CMD_WRITE */
	char *buffer; /* CMD_WRITE, args[1] bytes */
};

static void usage(void)
{
	fputs(usage_text, stderr);
	exit(2);
}

/* One pwork_sleep_us call; with --durations, timed from outside and inside, written down. */
static void timed_sleep(const struct work *w, unsigned long long us)
{
	unsigned long long start;

	if (w->durations == NULL) {
		pwork_sleep_us(us);
		return;
	}
	start = precise_now_ns();
	pwork_sleep_us(us);
	start = precise_now_ns() - start;
	fprintf(w->durations, "%llu %llu %llu\n", us, start, pwork_last_sleep_ns());
}

typedef unsigned long (*record_fn)(unsigned long);

/* pwork_record entered past its endbr64 (f3 0f 1e fa) when it starts with one: a uprobe at its
 * entry misses these calls, one placed past the endbr64 sees them. A uprobe at the entry shows
 * here as an int3 (cc) in the first byte, so only the other three are compared. No CPU here
 * enforces indirect branch tracking in user space, so the call lands. */
static record_fn record_past_entry(void)
{
	static const unsigned char endbr64_tail[] = { 0x0f, 0x1e, 0xfa };
	const unsigned char *code = dlsym(RTLD_DEFAULT, "pwork_record");

	if (code == NULL)
		return pwork_record;
	if ((code[0] == 0xf3 || code[0] == 0xcc) && memcmp(code + 1, endbr64_tail, sizeof(endbr64_tail)) == 0)
		return (record_fn)(uintptr_t)(code + 4);
	return (record_fn)(uintptr_t)code;
}

static int run_work(const struct work *w)
{
	record_fn past_entry;
	unsigned long long i, n;
	size_t k;

	switch (w->cmd) {
	case CMD_SLEEP:
		for (k = 0; k + 1 < w->nargs; k += 2)
			for (i = 0; i < w->args[k]; i++)
				timed_sleep(w, w->args[k + 1]);
		break;
	case CMD_RECORD:
		for (k = 0; k < w->nargs; k++)
			pwork_record(w->args[k]);
		break;
	case CMD_RECORD_PAST_ENTRY:
		past_entry = record_past_entry();
		for (k = 0; k < w->nargs; k++)
			past_entry(w->args[k]);
		break;
	case CMD_WRITE:
		for (i = 0; i < w->args[0]; i++) {
			ssize_t done = write(w->devnull, w->buffer, w->args[1]);

			if (done < 0 || (unsigned long long)done != w->args[1]) {
				perror("write(/dev/null)");
				return 1;
			}
		}
		break;
	case CMD_USDT:
		for (i = 0; i < w->args[0]; i++) {
			DTRACE_PROBE1(pwork, tick, i);
			pwork_lib_tick(i);
		}
		break;
	case CMD_NOP:
		n = w->args[0];
		for (i = 0; i < n; i++)
			pwork_nop();
		break;
	case CMD_GETPID:
		n = w->args[0];
		for (i = 0; i < n; i++)
			syscall(SYS_getpid);
		break;
	case CMD_HOLD:
		pwork_hold();
		break;
	}
	return 0;
}

static void *worker(void *arg)
{
	const struct work *w = arg;

	if (workload_setup_thread(w->comm) != 0)
		return (void *)1;
	return (void *)(long)run_work(w);
}

static int parse_command(const char *name, int nargs, enum command *cmd)
{
	static const struct {
		const char *name;
		enum command cmd;
		int min_args, max_args; /* max -1: any; sleep also needs an even count */
	} table[] = {
		{ "sleep", CMD_SLEEP, 2, -1 },	{ "record", CMD_RECORD, 1, -1 },
		{ "record-past-entry", CMD_RECORD_PAST_ENTRY, 1, -1 },
		{ "write", CMD_WRITE, 2, 2 },	{ "usdt", CMD_USDT, 1, 1 },
		{ "nop", CMD_NOP, 1, 1 },	{ "getpid", CMD_GETPID, 1, 1 },
		{ "hold", CMD_HOLD, 0, 0 },
	};
	size_t k;

	for (k = 0; k < sizeof(table) / sizeof(table[0]); k++) {
		if (strcmp(name, table[k].name) != 0)
			continue;
		if (nargs < table[k].min_args || (table[k].max_args >= 0 && nargs > table[k].max_args))
			return -1;
		if (table[k].cmd == CMD_SLEEP && nargs % 2 != 0)
			return -1;
		*cmd = table[k].cmd;
		return 0;
	}
	return -1;
}

int main(int argc, char **argv)
{
	struct work w = { .devnull = -1 };
	unsigned long long threads = 0;
	const char *durations_path = NULL;
	int wait_stdin = 0, argi = 1, k, status = 0;

	while (argi < argc && strncmp(argv[argi], "--", 2) == 0) {
		if (strcmp(argv[argi], "--comm") == 0 && argi + 1 < argc) {
			w.comm = argv[argi + 1];
			if (w.comm[0] == '\0')
				usage();
			argi += 2;
		} else if (strcmp(argv[argi], "--threads") == 0 && argi + 1 < argc) {
			if (workload_parse_u64(argv[argi + 1], &threads) != 0 || threads == 0 ||
			    threads > 1024)
				usage();
			argi += 2;
		} else if (strcmp(argv[argi], "--durations") == 0 && argi + 1 < argc) {
			durations_path = argv[argi + 1];
			argi += 2;
		} else if (strcmp(argv[argi], "--wait-stdin") == 0) {
			wait_stdin = 1;
			argi += 1;
		} else {
			usage();
		}
	}
	if (argi >= argc || parse_command(argv[argi], argc - argi - 1, &w.cmd) != 0)
		usage();
	w.nargs = (size_t)(argc - argi - 1);
	w.args = calloc(w.nargs, sizeof(*w.args));
	if (w.args == NULL) {
		perror("calloc");
		return 1;
	}
	for (k = 0; k < (int)w.nargs; k++)
		if (workload_parse_u64(argv[argi + 1 + k], &w.args[k]) != 0)
			usage();

	if (workload_setup_thread(w.comm) != 0)
		return 1;
	if (durations_path != NULL) {
		if (w.cmd != CMD_SLEEP)
			usage();
		w.durations = fopen(durations_path, "w");
		if (w.durations == NULL) {
			perror(durations_path);
			return 1;
		}
	}
	if (w.cmd == CMD_WRITE) {
		w.devnull = open("/dev/null", O_WRONLY | O_CLOEXEC);
		w.buffer = calloc(1, w.args[1] ? w.args[1] : 1);
		if (w.devnull < 0 || w.buffer == NULL) {
			perror("write setup");
			return 1;
		}
	}
	if (w.cmd == CMD_HOLD && threads == 0)
		usage();
	if (wait_stdin)
		workload_wait_stdin();

	if (threads == 0) {
		status = run_work(&w);
	} else {
		pthread_t *tids = calloc(threads, sizeof(*tids));
		unsigned long long t, started;

		if (tids == NULL) {
			perror("calloc");
			return 1;
		}
		for (started = 0; started < threads; started++) {
			int err = pthread_create(&tids[started], NULL, worker, &w);

			if (err != 0) {
				fprintf(stderr, "pthread_create: %s\n", strerror(err));
				status = 1;
				break;
			}
		}
		if (w.cmd == CMD_HOLD) {
			int c;

			pwork_hold_wait(started);
			printf("HOLDING %llu\n", started);
			fflush(stdout);
			do {
				c = getchar();
			} while (c != '\n' && c != EOF);
			pwork_hold_release();
			printf("RELEASED %llu\n", started);
			fflush(stdout);
		}
		for (t = 0; t < started; t++) {
			void *ret;

			pthread_join(tids[t], &ret);
			if (ret != NULL)
				status = 1;
		}
		free(tids);
	}
	if (w.devnull >= 0)
		close(w.devnull);
	if (w.durations != NULL && fclose(w.durations) != 0) {
		perror(durations_path);
		status = 1;
	}
	free(w.buffer);
	free(w.args);
	return status;
}

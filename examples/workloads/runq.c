/* runq: two threads that hand a token back and forth through two pipes, for the runqueue
 * example. Every wake-up is one the kernel must really do:
 *
 *   runq ROUNDS PAUSE_US
 *
 * Thread "rq_ping" and thread "rq_pong" (their comms). Each round:
 *   ping: sleep PAUSE_US (clock_nanosleep), write 1 byte to pipe A, read 1 byte from pipe B;
 *   pong: read 1 byte from pipe A, sleep PAUSE_US, write 1 byte to pipe B.
 * The sleep before each write makes sure the reader on the other side has long gone to sleep
 * in read(), so each of the 2 * ROUNDS hand-offs wakes a sleeping thread. With the timer
 * wake-ups of the sleeps, each thread is woken 2 * ROUNDS times (4 * ROUNDS in all) as long as
 * PAUSE_US is well above the time a thread takes to go from write() to sleeping in read().
 * After its rounds each thread renames itself "rq_done" before it exits: the last thread to let
 * go of the process's files closes them, and on a network or 9p file system (the kernel matrix's
 * guest runs this binary over 9p) closing one waits for the server, a wake-up that is not one of
 * the rounds (the 6.1 guest showed rq_ping blocked in do_exit -> __fput -> p9_client_clunk, up to
 * 7 such wake-ups in a run).
 */
#include <pthread.h>

#include "common.h"

static int pipe_a[2], pipe_b[2];
static unsigned long rounds, pause_us;

static void xwrite(int fd)
{
	char c = 't';

	if (write(fd, &c, 1) != 1)
		ex_die("write");
}

static void xread(int fd)
{
	char c;

	if (read(fd, &c, 1) != 1)
		ex_die("read");
}

static void *ping(void *unused)
{
	(void)unused;
	ex_thread("rq_ping");
	for (unsigned long i = 0; i < rounds; i++) {
		ex_sleep_us(pause_us);
		xwrite(pipe_a[1]);
		xread(pipe_b[0]);
	}
	ex_thread("rq_done");
	return NULL;
}

static void *pong(void *unused)
{
	(void)unused;
	ex_thread("rq_pong");
	for (unsigned long i = 0; i < rounds; i++) {
		xread(pipe_a[0]);
		ex_sleep_us(pause_us);
		xwrite(pipe_b[1]);
	}
	ex_thread("rq_done");
	return NULL;
}

int main(int argc, char **argv)
{
	pthread_t a, b;

	if (argc != 3) {
		fprintf(stderr, "usage: runq ROUNDS PAUSE_US\n");
		return 2;
	}
	rounds = ex_u64(argv[1]);
	pause_us = ex_u64(argv[2]);
	ex_thread("rq_main");
	if (pipe(pipe_a) != 0 || pipe(pipe_b) != 0)
		ex_die("pipe");
	if (pthread_create(&b, NULL, pong, NULL) != 0 || pthread_create(&a, NULL, ping, NULL) != 0)
		ex_die("pthread_create");
	pthread_join(a, NULL);
	pthread_join(b, NULL);
	return 0;
}

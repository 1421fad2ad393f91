/* sendlat: a TCP client and server over 127.0.0.1 with a known number of send() calls, for the
 * send_latency example. Every send() is one sendto syscall.
 *
 *   sendlat N SIZE M PAUSE_MS
 *
 * The process forks: the parent is the server (comm "sl_server"), the child the client (comm
 * "sl_client"), connected over 127.0.0.1 on a port the kernel picks.
 *   phase 1: the client makes N send() calls of SIZE bytes; the server reads them as they come,
 *            so these sends only copy into the socket buffer (microseconds).
 *   phase 2: M rounds: the server sleeps PAUSE_MS, then reads 4 MiB and answers with one send()
 *            of 1 byte; the client makes one send() of 4 MiB, then reads the 1-byte answer. The
 *            socket buffers are small (64 KiB asked), so each 4 MiB send blocks until the server
 *            wakes: it takes at least PAUSE_MS (minus a few microseconds) plus the copy.
 * Totals: sl_client calls send() exactly N + M times, sl_server exactly M times.
 * When done, the client prints each of its N + M send() calls' durations in nanoseconds, one per
 * line, as it measured them (CLOCK_MONOTONIC around the call, the clock the probes read).
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/wait.h>

#include "common.h"

#define BIG (4UL << 20)

static void small_buffers(int fd)
{
	int size = 64 << 10;

	if (setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof(size)) != 0 ||
	    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof(size)) != 0)
		ex_die("setsockopt");
}

static void client(unsigned short port, unsigned long n, unsigned long size, unsigned long m)
{
	struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons(port) };
	char *buf = calloc(1, BIG > size ? BIG : size);
	unsigned long long *took = calloc(n + m + 1, sizeof(*took)), start;
	char answer;
	int fd;

	ex_thread("sl_client");
	fd = socket(AF_INET, SOCK_STREAM, 0);
	if (buf == NULL || took == NULL)
		ex_die("calloc");
	if (fd < 0)
		ex_die("socket");
	small_buffers(fd);
	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0)
		ex_die("connect");
	for (unsigned long i = 0; i < n; i++) {
		start = ex_now_ns();
		ex_send_once(fd, buf, size);
		took[i] = ex_now_ns() - start;
	}
	for (unsigned long i = 0; i < m; i++) {
		start = ex_now_ns();
		ex_send_once(fd, buf, BIG);
		took[n + i] = ex_now_ns() - start;
		ex_recv_all(fd, &answer, 1);
	}
	close(fd);
	for (unsigned long i = 0; i < n + m; i++)
		printf("%llu\n", took[i]);
	free(took);
	free(buf);
	exit(fflush(stdout) == 0 ? 0 : 1);
}

int main(int argc, char **argv)
{
	struct sockaddr_in addr = { .sin_family = AF_INET };
	socklen_t len = sizeof(addr);
	unsigned long n, size, m, pause_ms;
	int lfd, fd, status, one = 1;
	char *buf;
	pid_t child;

	if (argc != 5) {
		fprintf(stderr, "usage: sendlat N SIZE M PAUSE_MS\n");
		return 2;
	}
	n = ex_u64(argv[1]);
	size = ex_u64(argv[2]);
	m = ex_u64(argv[3]);
	pause_ms = ex_u64(argv[4]);
	if (size == 0 || size > BIG) {
		fprintf(stderr, "SIZE must be 1..%lu\n", BIG);
		return 2;
	}
	ex_thread("sl_server");
	lfd = socket(AF_INET, SOCK_STREAM, 0);
	if (lfd < 0)
		ex_die("socket");
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	small_buffers(lfd);
	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (bind(lfd, (struct sockaddr *)&addr, sizeof(addr)) != 0 || listen(lfd, 1) != 0 ||
	    getsockname(lfd, (struct sockaddr *)&addr, &len) != 0)
		ex_die("bind/listen");
	fflush(NULL);
	child = fork();
	if (child < 0)
		ex_die("fork");
	if (child == 0) {
		close(lfd);
		client(ntohs(addr.sin_port), n, size, m);
	}
	fd = accept(lfd, NULL, NULL);
	if (fd < 0)
		ex_die("accept");
	close(lfd);
	buf = malloc(BIG);
	if (buf == NULL)
		ex_die("malloc");
	for (unsigned long left = n * size; left > 0;) {
		unsigned long chunk = left < BIG ? left : BIG;

		ex_recv_all(fd, buf, chunk);
		left -= chunk;
	}
	for (unsigned long i = 0; i < m; i++) {
		ex_sleep_us(pause_ms * 1000UL);
		ex_recv_all(fd, buf, BIG);
		ex_send_once(fd, "k", 1);
	}
	if (waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
		fprintf(stderr, "client failed\n");
		return 1;
	}
	close(fd);
	free(buf);
	return 0;
}

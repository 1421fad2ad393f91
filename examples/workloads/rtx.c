/* rtx: request/response over TCP, for the retransmits example (run in two network namespaces).
 *
 *   rtx server PORT ROUNDS SIZE          comm "rtx_server": accepts one connection, then ROUNDS
 *                                         times reads SIZE bytes and answers 8 bytes
 *   rtx client ADDR PORT ROUNDS SIZE     comm "rtx_client": connects (retrying for up to 5 s while
 *                                         the server starts), then ROUNDS requests: one send() of
 *                                         SIZE bytes (the sendto syscall), then one recv() of the
 *                                         8-byte answer (the recvfrom syscall)
 * Both exit 0 after the last round.
 */
#include <arpa/inet.h>
#include <netinet/in.h>

#include "common.h"

static void server(unsigned short port, unsigned long rounds, unsigned long size, char *buf)
{
	struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons(port) };
	int lfd, fd, one = 1;

	ex_thread("rtx_server");
	lfd = socket(AF_INET, SOCK_STREAM, 0);
	if (lfd < 0)
		ex_die("socket");
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	addr.sin_addr.s_addr = htonl(INADDR_ANY);
	if (bind(lfd, (struct sockaddr *)&addr, sizeof(addr)) != 0 || listen(lfd, 1) != 0)
		ex_die("bind/listen");
	printf("listening\n");
	fflush(stdout);
	fd = accept(lfd, NULL, NULL);
	if (fd < 0)
		ex_die("accept");
	for (unsigned long i = 0; i < rounds; i++) {
		ex_recv_all(fd, buf, size);
		ex_send_once(fd, "response", 8);
	}
	close(fd);
	close(lfd);
}

static void client(const char *host, unsigned short port, unsigned long rounds, unsigned long size,
		   char *buf)
{
	struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons(port) };
	char answer[8];
	int fd = -1;

	ex_thread("rtx_client");
	if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
		fprintf(stderr, "bad address '%s'\n", host);
		exit(2);
	}
	for (int tries = 0;; tries++) {
		fd = socket(AF_INET, SOCK_STREAM, 0);
		if (fd < 0)
			ex_die("socket");
		if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) == 0)
			break;
		if (tries >= 100)
			ex_die("connect");
		close(fd);
		ex_sleep_us(50000);
	}
	for (unsigned long i = 0; i < rounds; i++) {
		ex_send_once(fd, buf, size);
		ex_recv_all(fd, answer, sizeof(answer));
	}
	close(fd);
}

int main(int argc, char **argv)
{
	int is_server = argc == 5 && strcmp(argv[1], "server") == 0;
	int is_client = argc == 6 && strcmp(argv[1], "client") == 0;
	unsigned long rounds, size;
	char *buf;

	if (!is_server && !is_client) {
		fprintf(stderr, "usage: rtx server PORT ROUNDS SIZE | rtx client ADDR PORT ROUNDS SIZE\n");
		return 2;
	}
	rounds = ex_u64(argv[argc - 2]);
	size = ex_u64(argv[argc - 1]);
	if (size == 0 || size > (64UL << 20)) {
		fprintf(stderr, "SIZE must be 1..64 MiB\n");
		return 2;
	}
	buf = calloc(1, size);
	if (buf == NULL)
		ex_die("calloc");
	if (is_server)
		server((unsigned short)ex_u64(argv[2]), rounds, size, buf);
	else
		client(argv[2], (unsigned short)ex_u64(argv[3]), rounds, size, buf);
	free(buf);
	return 0;
}

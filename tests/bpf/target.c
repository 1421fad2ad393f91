/* Workload for tests/test_libbpf_binding.py.
 *   target calls N   : call target_fn(i) and fire USDT probec:tick(i) for i in 1..N
 *   target getpid N  : wait for a line on stdin, then call getpid() N times
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <sys/sdt.h>

__attribute__((noinline)) int target_fn(int arg)
{
	__asm__ volatile("" ::: "memory");
	return arg * 2;
}

int main(int argc, char **argv)
{
	long n;
	volatile long sink = 0;

	if (argc != 3)
		return 2;
	n = strtol(argv[2], NULL, 10);
	if (strcmp(argv[1], "calls") == 0) {
		for (long i = 1; i <= n; i++) {
			sink += target_fn((int)i);
			DTRACE_PROBE1(probec, tick, i);
		}
		return 0;
	}
	if (strcmp(argv[1], "getpid") == 0) {
		char line[16];
		if (!fgets(line, sizeof(line), stdin))
			return 3;
		for (long i = 0; i < n; i++)
			sink += syscall(SYS_getpid);
		return 0;
	}
	return 2;
}

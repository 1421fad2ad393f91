// corr: a C++ "inference" server for the correlation example. Worker threads call
// Inference::Forward, which sends on a socket and sleeps (off-CPU) inside the call; between
// calls they also send and sleep outside it, which a spec restricted to inference must not count.
//
//   corr THREADS CALLS BYTES INSIDE_US OUTSIDE_US [hold]
//
// Threads "corr_w0", "corr_w1", ... (their comms) each make CALLS calls of
// Inference::Forward(BYTES, INSIDE_US): one send() of BYTES bytes (the sendto syscall) on a
// UNIX stream socket, then one clock_nanosleep of INSIDE_US. After each call, outside Forward:
// one send() of BYTES bytes and one clock_nanosleep of OUTSIDE_US. Thread "corr_sink" reads
// everything (recv, never send). Per worker: exactly CALLS sends and CALLS sleeps inside
// inference, and as many outside.
//
// When all threads are done it prints, per Forward call, "corr_wN OUTER INNER INNER_CPU": the
// call's duration in nanoseconds of CLOCK_MONOTONIC (the clock the probes read) as its caller
// measured it around the call, and as Forward measured it inside its body; and the CPU time the
// kernel accounted to the thread around that inner measurement. A probe's span on Forward lies
// between OUTER and INNER, so a test can hold the probes' numbers against them; INNER - INNER_CPU
// is at most the time the thread spent off the CPU inside the span (the CPU clock is read outside
// the wall clock's reads).
//
// With "hold", it then keeps living until its standard input closes: a tracer that reads a user
// stack's symbols from /proc/PID at print time (bpftrace 0.17) can still do so for the last
// calls' stacks, however far behind it runs.
#include <pthread.h>

#include <cstdio>
#include <string>
#include <vector>

#include "common.h"

#define CORR_API __attribute__((visibility("default"), noinline))

class Inference {
public:
	explicit Inference(int fd) : fd_(fd) {}
	// One send() of `bytes` bytes, then sleeps `sleep_us` off-CPU. Returns bytes.
	CORR_API unsigned long Forward(unsigned long bytes, unsigned long sleep_us);
	// How long the last Forward took, timed inside its body, and the thread's CPU time around that.
	unsigned long long last_ns() const { return last_ns_; }
	unsigned long long last_cpu_ns() const { return last_cpu_ns_; }

private:
	int fd_;
	unsigned long long last_ns_ = 0, last_cpu_ns_ = 0;
	char payload_[65536] = {};
};

unsigned long Inference::Forward(unsigned long bytes, unsigned long sleep_us)
{
	unsigned long long cpu_start = ex_thread_cpu_ns();
	unsigned long long start = ex_now_ns();

	ex_send_once(fd_, payload_, bytes);
	ex_sleep_us(sleep_us);
	__asm__ volatile("" : "+r"(bytes) : : "memory");
	last_ns_ = ex_now_ns() - start;
	last_cpu_ns_ = ex_thread_cpu_ns() - cpu_start;
	return bytes;
}

struct Worker {
	int index;
	int fd;
	unsigned long calls, bytes, inside_us, outside_us;
	std::vector<unsigned long long> outer_ns, inner_ns, inner_cpu_ns; // one per call, filled by the worker
};


static void *work(void *arg)
{
	Worker *w = static_cast<Worker *>(arg);
	char name[16];
	static char outside[65536];

	std::snprintf(name, sizeof(name), "corr_w%d", w->index);
	ex_thread(name);
	Inference model(w->fd);
	w->outer_ns.reserve(w->calls);
	w->inner_ns.reserve(w->calls);
	w->inner_cpu_ns.reserve(w->calls);
	for (unsigned long i = 0; i < w->calls; i++) {
		unsigned long long start = ex_now_ns();

		model.Forward(w->bytes, w->inside_us);
		w->outer_ns.push_back(ex_now_ns() - start);
		w->inner_ns.push_back(model.last_ns());
		w->inner_cpu_ns.push_back(model.last_cpu_ns());
		ex_send_once(w->fd, outside, w->bytes);
		ex_sleep_us(w->outside_us);
	}
	return nullptr;
}

static void *sink(void *arg)
{
	int fd = *static_cast<int *>(arg);
	char buf[65536];

	ex_thread("corr_sink");
	while (recv(fd, buf, sizeof(buf), 0) > 0)
		;
	return nullptr;
}

int main(int argc, char **argv)
{
	bool hold = argc == 7 && std::string(argv[6]) == "hold";
	if (argc != 6 && !hold) {
		std::fprintf(stderr, "usage: corr THREADS CALLS BYTES INSIDE_US OUTSIDE_US [hold]\n");
		return 2;
	}
	unsigned long threads = ex_u64(argv[1]);
	Worker proto = { 0, -1, ex_u64(argv[2]), ex_u64(argv[3]), ex_u64(argv[4]), ex_u64(argv[5]), {}, {}, {} };
	if (threads < 1 || threads > 64 || proto.bytes < 1 || proto.bytes > 65536) {
		std::fprintf(stderr, "THREADS must be 1..64 and BYTES 1..65536\n");
		return 2;
	}
	ex_thread("corr_main");
	int pair[2];
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, pair) != 0)
		ex_die("socketpair");
	pthread_t reader;
	if (pthread_create(&reader, nullptr, sink, &pair[1]) != 0)
		ex_die("pthread_create");
	std::vector<Worker> workers(threads, proto);
	std::vector<pthread_t> ids(threads);
	for (unsigned long t = 0; t < threads; t++) {
		workers[t].index = (int)t;
		workers[t].fd = pair[0];
		if (pthread_create(&ids[t], nullptr, work, &workers[t]) != 0)
			ex_die("pthread_create");
	}
	for (unsigned long t = 0; t < threads; t++)
		pthread_join(ids[t], nullptr);
	shutdown(pair[0], SHUT_WR);
	pthread_join(reader, nullptr);
	for (const Worker &w : workers)
		for (size_t i = 0; i < w.outer_ns.size(); i++)
			std::printf("corr_w%d %llu %llu %llu\n", w.index, w.outer_ns[i], w.inner_ns[i], w.inner_cpu_ns[i]);
	if (std::fflush(stdout) != 0)
		return 1;
	while (hold && std::getchar() != EOF)
		;
	return 0;
}

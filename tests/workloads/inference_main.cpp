// inference: calls libinference's C++ methods an exact number of times.
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "inference.h"
#include "workload_cli.h"

static const char usage_text[] =
	"usage: inference [--comm NAME] [--wait-stdin] COMMAND ARGS...\n"
	"commands (every count is exact):\n"
	"  forward N US [N2 US2 ...]  N calls of Inference::Forward(US) per pair, in order;\n"
	"                             each calls serving::Allocator::Allocate(64) once\n"
	"  warmup                     Inference::Warmup(int) once, then Inference::Warmup(double) once\n";

static void usage()
{
	std::fputs(usage_text, stderr);
	std::exit(2);
}

int main(int argc, char **argv)
{
	const char *comm = nullptr;
	bool wait_stdin = false;
	int argi = 1;

	while (argi < argc && std::strncmp(argv[argi], "--", 2) == 0) {
		if (std::strcmp(argv[argi], "--comm") == 0 && argi + 1 < argc && argv[argi + 1][0]) {
			comm = argv[argi + 1];
			argi += 2;
		} else if (std::strcmp(argv[argi], "--wait-stdin") == 0) {
			wait_stdin = true;
			argi += 1;
		} else {
			usage();
		}
	}
	if (argi >= argc)
		usage();
	const char *command = argv[argi++];
	int nargs = argc - argi;
	unsigned long long *args = new unsigned long long[nargs > 0 ? nargs : 1];

	for (int k = 0; k < nargs; k++)
		if (workload_parse_u64(argv[argi + k], &args[k]) != 0)
			usage();
	bool forward = std::strcmp(command, "forward") == 0;
	if (forward) {
		if (nargs < 2 || nargs % 2 != 0)
			usage();
		for (int k = 1; k < nargs; k += 2)
			if (args[k] > 2147483647ULL) // Forward takes an int
				usage();
	} else if (std::strcmp(command, "warmup") != 0 || nargs != 0) {
		usage();
	}

	if (workload_setup_thread(comm) != 0)
		return 1;
	if (wait_stdin)
		workload_wait_stdin();

	Inference model;
	if (forward) {
		for (int k = 0; k + 1 < nargs; k += 2)
			for (unsigned long long i = 0; i < args[k]; i++)
				model.Forward((int)args[k + 1]);
	} else {
		Inference::Warmup(3);
		Inference::Warmup(0.5);
	}
	delete[] args;
	return 0;
}

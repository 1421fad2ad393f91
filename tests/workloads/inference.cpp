// libinference.so: see inference.h.
#include <cstdlib>

#include "inference.h"
#include "precise_sleep.h"

#define INFERENCE_BARRIER() __asm__ volatile("" ::: "memory")
// Every method sets up a frame (push %rbp; mov %rsp,%rbp) even when it is a leaf: see pwork.c.
#define INFERENCE_FRAME() __asm__ volatile("" : : "r"(__builtin_frame_address(0)) : "memory")

int Inference::Forward(int us)
{
	INFERENCE_FRAME();
	serving::Allocator allocator;

	precise_sleep_us(us > 0 ? (unsigned long)us : 0UL);
	void *block = allocator.Allocate(64);
	INFERENCE_BARRIER();
	std::free(block);
	return us;
}

int Inference::Warmup(int rounds)
{
	INFERENCE_FRAME();
	__asm__ volatile("" : "+r"(rounds) : : "memory");
	return rounds;
}

int Inference::Warmup(double scale)
{
	INFERENCE_FRAME();
	int result = (int)scale;

	__asm__ volatile("" : "+r"(result) : : "memory");
	return result;
}

void *serving::Allocator::Allocate(unsigned long bytes)
{
	INFERENCE_FRAME();
	void *block = std::malloc(bytes);

	INFERENCE_BARRIER();
	return block;
}

// libinference: C++ methods with known calls and durations for probec's C++ uprobe tests
// (mangled names, a namespaced class, and a deliberately overloaded static method).
#ifndef PROBEC_WORKLOADS_INFERENCE_H
#define PROBEC_WORKLOADS_INFERENCE_H

#define INFERENCE_API __attribute__((visibility("default"), noinline))

class Inference {
public:
	// Takes `us` microseconds (precise_sleep.h), then calls serving::Allocator::Allocate(64)
	// once. Returns us.
	INFERENCE_API int Forward(int us);
	// Deliberately overloaded: a spec naming "Inference::Warmup" is ambiguous.
	INFERENCE_API static int Warmup(int rounds);   // _ZN9Inference6WarmupEi
	INFERENCE_API static int Warmup(double scale); // _ZN9Inference6WarmupEd
};

namespace serving {
class Allocator {
public:
	// Returns malloc(bytes); the caller frees it.
	INFERENCE_API void *Allocate(unsigned long bytes);
};
} // namespace serving

#endif

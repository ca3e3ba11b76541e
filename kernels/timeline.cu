// Timestamps of a decode step's GPU timeline (src/cuda/shadow/timeline.rs): one thread
// writes the GPU's global timer (nanoseconds) to `at` once the work queued before it on
// its stream is done. The stage marks of a step are these stamps rather than timing
// events: with some 400 timing events a step, two lanes decoding side by side ran their
// timed steps one after the other (52 ms a step against 42 untimed, H200); with the
// stamps they overlap as the untimed steps do (42.0 ms).
extern "C" __global__ void stamp_time(unsigned long long* __restrict__ at) {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    *at = t;
}

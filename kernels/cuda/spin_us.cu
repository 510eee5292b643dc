// SPDX-License-Identifier: Apache-2.0
// Keeps every thread busy for `us` microseconds of wall time (the GPU's global timer),
// then the first thread of the grid writes `us` to out[0]: a kernel of known duration,
// for scheduling checks and for exercising the watchdog. The catalog caps its grid at
// SPIN_MAX_BLOCKS blocks, so one launch lasts a few waves of `us` at most.
extern "C" __global__ void spin_us(unsigned int* out, unsigned int us)
{
    unsigned long long start;
    unsigned long long now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    const unsigned long long end = start + (unsigned long long)us * 1000ull;
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now < end);
    if (vgpu_block_index() == 0 && threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0) {
        out[0] = us;
    }
}

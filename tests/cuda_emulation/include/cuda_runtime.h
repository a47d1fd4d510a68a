// Stand-in for the toolkit's cuda_runtime.h: cuda_emulation.h, included first, provides what
// kernels need; the host runtime API is not emulated.
#pragma once

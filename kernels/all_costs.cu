// The one translation unit nvcc compiles into the library's cubin (and the CPU emulation
// builds for the tests): every family of cost kernels, each in its own file over common.cuh.
// A family's host side (kernel names, launch plan) lives beside its cost classes in
// puzzlelib_cost/<family>.py.
#include "kl_divergence.cu"
#include "kl_cluster.cu"   // (sm_90+)
#include "sparse_kl.cu"
#include "elementwise.cu"
#include "cross_entropy.cu"
#include "ctc.cu"
#include "labels.cu"   // (the integer labels' range check, shared by the families)

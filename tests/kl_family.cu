// The KL family's kernels alone (the emulation's builds to measure: emulated_device.emulated_build).
#include "kl_divergence.cu"
#include "kl_cluster.cu"

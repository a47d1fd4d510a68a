// The KL family's kernels alone (the emulation's builds to measure: emulated_device.emulated_build),
// with the integer labels' range check that runs before them on labels.
#include "kl_divergence.cu"
#include "kl_cluster.cu"
#include "labels.cu"

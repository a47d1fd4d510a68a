// Shadows the CUDA toolkit header of the same name: see cuda_emulation.h.
#error "cuda_emulation: cooperative_groups/scan.h is not modelled"

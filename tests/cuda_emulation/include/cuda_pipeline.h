// Shadows the CUDA toolkit header of the same name: see cuda_emulation.h.
#error "cuda_emulation: async copies and pipelines are not modelled"

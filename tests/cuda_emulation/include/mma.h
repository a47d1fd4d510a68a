// Shadows the CUDA toolkit header of the same name: see cuda_emulation.h.
#error "cuda_emulation: tensor-core (wmma) instructions are not modelled"

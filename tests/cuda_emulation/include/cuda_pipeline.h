// Shadows the CUDA toolkit header of the same name: see cuda_emulation.h.
#error "cuda_emulation: cuda::pipeline is not modelled (the primitives of cuda_pipeline_primitives.h are)"

from setuptools import setup

# kernels/ lives at the top of the repository (CUDA sources beside the Python
# package, as in the design card) but is installed as puzzlelib_cost/kernels so
# that `pip install .` ships the .cu/.cuh files the CUDA backend compiles.
setup(
    name="puzzlelib_cost",
    version="0.1.0",
    description="PuzzleLib's Cost module (KLDivergence, CrossEntropy, MSE, ...) on NumPy and hand-written CUDA kernels",
    python_requires=">=3.9",
    packages=["puzzlelib_cost", "puzzlelib_cost.backends", "puzzlelib_cost.cpu_kernels", "puzzlelib_cost.kernels"],
    package_dir={"puzzlelib_cost.kernels": "kernels"},
    package_data={"puzzlelib_cost.kernels": ["*.cu", "*.cuh"]},
    install_requires=["numpy>=1.22"],
    extras_require={
        "cuda": ["pycuda>=2022.1"],
        # puzzlelib_cost.cpu_kernels: the NumPy backend's hottest blocks as fused, vectorised loops
        # (2-12x faster than the NumPy blocks: README, Performance); numba compiles them on first use.
        "cpu": ["numba>=0.61"],
        # puzzlelib_cost.nn: the costs as torch modules (torch.library custom ops, so >= 2.4).
        "torch": ["torch>=2.4"],
        # ml_dtypes: NumPy has no bfloat16; the tests need one to feed and check bf16 kernels.
        # nvidia-cuda-cuobjdump and -nvdisasm: NVIDIA's disassembler (cuobjdump -sass runs
        # nvdisasm), which the cost model's budget test reads the kernels' machine code with;
        # the toolkit on CI machines has neither.
        "test": ["pytest>=7", "hypothesis>=6", "ml_dtypes>=0.3", "nvidia-cuda-cuobjdump>=13.0",
                 "nvidia-cuda-nvdisasm>=13.0"],
    },
)

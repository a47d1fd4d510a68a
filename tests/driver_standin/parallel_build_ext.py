"""Run a package's `setup.py build_ext --inplace` with the C++ files of each extension compiled in
parallel, one per core.  distutils compiles them one after another, and pycuda's _driver has
about forty: on two cores this nearly halves the stand-in's pycuda build.

    python parallel_build_ext.py SOURCE_DIR
"""
import concurrent.futures
import os
import sys


def parallel_compile(self, sources, output_dir=None, macros=None, include_dirs=None, debug=0,
                     extra_preargs=None, extra_postargs=None, depends=None):
    # distutils' CCompiler.compile, with the loop over objects run on a thread pool.
    macros, objects, extra_postargs, pp_opts, build = self._setup_compile(
        output_dir, macros, include_dirs, sources, depends, extra_postargs)
    cc_args = self._get_cc_args(pp_opts, debug, extra_preargs)

    def compile_one(obj):
        source, extension = build[obj]
        self._compile(obj, source, extension, cc_args, extra_postargs, pp_opts)

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(compile_one, objects))
    return objects


def main(source_dir):
    os.chdir(source_dir)
    sys.path.insert(0, source_dir)
    import setuptools  # noqa: F401  (its distutils is the one setup.py will use)
    from distutils import ccompiler
    ccompiler.CCompiler.compile = parallel_compile
    sys.argv = ["setup.py", "build_ext", "--inplace"]
    with open("setup.py") as setup:
        code = compile(setup.read(), "setup.py", "exec")
    exec(code, {"__name__": "__main__", "__file__": os.path.join(source_dir, "setup.py")})


if __name__ == "__main__":
    main(os.path.abspath(sys.argv[1]))

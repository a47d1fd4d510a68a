"""Compile CUDA kernel sources with g++ against cuda_emulation.h into a shared object.

Steps for build([a.cu, b.cu]):
  1. Preprocess each source with -DCUDA_EMULATION_SCAN: the header turns `__global__`,
     `__launch_bounds__(...)` and `__cluster_dims__(...)` into markers, so kernels are found after
     all macros expanded.
  2. Hash everything that goes into the result (preprocessed text, runtime.cpp, flags, compiler
     version); a finished module for that hash in the cache folder is reused as it is.
  3. Otherwise compile runtime.cpp (cached on its own) and, per source, a generated file that
     includes the header, the source and one registration line per kernel (with the kernel's
     __cluster_dims__ expressions, which the compiler evaluates there: they may name constants).
  4. `extern __shared__` arrays are undefined thread-local symbols in those objects: generate a
     file that defines each of them as an alias of one dynamic shared memory buffer.
  5. Link module.so and move the build folder into the cache under its hash.
"""

from __future__ import annotations

import ast
import concurrent.futures
import functools
import hashlib
import operator
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

PACKAGE_DIR = Path(__file__).resolve().parent
HEADER = PACKAGE_DIR / "cuda_emulation.h"
RUNTIME = PACKAGE_DIR / "runtime.cpp"
STUB_INCLUDE_DIR = PACKAGE_DIR / "include"  # shadows toolkit headers for unsupported features
DYNAMIC_SHARED_CAPACITY = 227 * 1024 + 4096  # runtime.cpp's kMaxDynamicShared plus guard bytes
FORMAT_VERSION = "2"  # bump to invalidate caches after changing how modules are built


class BuildError(RuntimeError):
    """The compiler or linker failed; the message contains its output."""


@dataclass(frozen=True)
class KernelDeclaration:
    name: str
    param_names: tuple[str, ...]
    max_threads: int  # from __launch_bounds__ when it is a plain number, else 0
    cluster_dims: tuple[str, str, str] | None = None  # __cluster_dims__'s C++ expressions, if any


def compiler() -> str:
    return os.environ.get("CXX", "g++")


@functools.lru_cache(maxsize=None)
def cuda_include_dir() -> Path:
    """The CUDA toolkit's include folder (for cuda_fp16.h, cuda_bf16.h, cuda_fp8.h)."""
    def candidates():
        yield os.environ.get("CUDA_HOME")
        yield os.environ.get("CUDA_PATH")
        nvcc = shutil.which("nvcc")
        if nvcc:
            yield str(Path(nvcc).resolve().parent.parent)
        yield "/usr/local/cuda"
        yield "/opt/cuda"
        if nvcc:  # nvcc may be a wrapper script elsewhere: ask it where it lives
            try:
                dryrun = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull],
                                        capture_output=True, text=True, timeout=60)
                yield from re.findall(r"TOP=(\S+)", dryrun.stdout + dryrun.stderr)
            except (OSError, subprocess.SubprocessError):
                pass

    for candidate in candidates():
        if candidate and (Path(candidate) / "include" / "cuda_fp16.h").is_file():
            return (Path(candidate) / "include").resolve()
    raise BuildError("CUDA toolkit headers (include/cuda_fp16.h) not found: set CUDA_HOME")


@functools.lru_cache(maxsize=None)
def compiler_version() -> str:
    return subprocess.run([compiler(), "--version"], capture_output=True, text=True).stdout


def cache_root() -> Path:
    root = os.environ.get("CUDA_EMULATION_CACHE") or Path(tempfile.gettempdir()) / f"cuda_emulation-{os.getuid()}"
    Path(root).mkdir(parents=True, exist_ok=True)
    return Path(root)


def compile_flags(include_dirs: Sequence[Path], defines: Mapping[str, object], sanitize: bool,
                  extra_flags: Sequence[str]) -> list[str]:
    # DWARF 4: binutils 2.40's addr2line misreads DWARF 5 file names. Stack-clash protection
    # touches every stack page, so a too-large frame hits the fiber's guard page (runtime.cpp).
    flags = ["-std=c++17", "-O1", "-g", "-gdwarf-4", "-fPIC", "-pthread", "-fno-strict-aliasing",
             "-fvisibility=hidden", "-fstack-clash-protection"]
    if sanitize:
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
    flags += [f"-I{d}" for d in include_dirs]
    flags += [f"-I{STUB_INCLUDE_DIR}", "-isystem", str(cuda_include_dir())]
    flags += [f"-D{k}" if v is None else f"-D{k}={v}" for k, v in sorted(defines.items())]
    return flags + list(extra_flags)


def run_compiler(arguments: list[str], what: str, stdin: str | None = None) -> str:
    result = subprocess.run([compiler(), *arguments], input=stdin, capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(f"{what} failed:\n{' '.join([compiler(), *arguments])}\n{result.stderr}")
    return result.stdout


def run_parallel(jobs: Iterable[tuple]) -> list:
    """Run (function, *args) jobs on up to one thread per core; re-raise the first error."""
    jobs = list(jobs)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        futures = [pool.submit(job[0], *job[1:]) for job in jobs]
        return [future.result() for future in futures]


# ------------------------------------------------------------------------------------------
# Step 1: finding kernels in preprocessed text
# ------------------------------------------------------------------------------------------
_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|\w+|\S')
_KEYWORDS = {"const", "volatile", "__restrict__", "__restrict", "restrict", "int", "float", "double",
             "char", "short", "long", "unsigned", "signed", "bool", "void", "struct"}


def preprocess_for_scan(source: Path, flags: list[str]) -> str:
    wrapper = f'#include "{HEADER}"\n#include "{source}"\n'
    return run_compiler(["-E", "-DCUDA_EMULATION_SCAN", *flags, "-x", "c++", "-"],
                        f"preprocessing {source}", stdin=wrapper)


def included_files(preprocessed: str) -> list[Path]:
    names = set(re.findall(r'^# \d+ "([^"<]+)"', preprocessed, flags=re.M))
    return sorted(Path(n) for n in names if n != "-" and Path(n).is_file())


def _balanced(tokens: list[str], i: int) -> tuple[list[str], int]:
    """tokens[i] is '('; return the tokens inside the matching ')' and the index after it."""
    depth, start = 0, i
    for j in range(i, len(tokens)):
        depth += {"(": 1, ")": -1}.get(tokens[j], 0)
        if depth == 0:
            return tokens[start + 1:j], j + 1
    raise BuildError("unbalanced parentheses after a __global__ declaration")


def _param_names(tokens: list[str]) -> tuple[str, ...]:
    groups, current, depth = [], [], 0
    for t in tokens:
        depth += {"(": 1, "<": 1, "[": 1, ")": -1, ">": -1, "]": -1}.get(t, 0)
        if t == "," and depth == 0:
            groups.append(current)
            current = []
        else:
            current.append(t)
    groups.append(current)
    if groups == [[]] or groups == [["void"]]:
        return ()
    names = []
    for k, group in enumerate(groups):
        identifiers = [t for t in group if re.fullmatch(r"[A-Za-z_]\w*", t)]
        last = identifiers[-1] if identifiers else ""
        names.append(last if last and last not in _KEYWORDS and len(identifiers) > 1 else f"arg{k}")
    return tuple(names)


def _integer_value(expression: str) -> int:
    """Value of an integer constant expression such as `(32 * 8)` after macro expansion, else 0."""
    expression = re.sub(r"\b(\d+)[uUlL]+\b", r"\1", expression).replace("/", "//")
    operators = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
                 ast.FloorDiv: operator.floordiv, ast.LShift: operator.lshift, ast.RShift: operator.rshift}

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in operators:
            return operators[type(node.op)](value(node.left), value(node.right))
        raise ValueError(node)

    try:
        return value(ast.parse(expression, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError):
        return 0  # a constexpr variable, say: no launch-bounds check


def _cluster_dims(text: str, start: int) -> tuple[str, str, str]:
    """The three dimensions of the `__cluster_dims__(...)` whose '(' is text[start - 1], as C++
    expressions (missing ones: 1), from the source text (tokens would lose `<<` and such)."""
    parts, depth, current = [], 0, ""
    for c in text[start:start + 4000]:
        if c == ")" and depth == 0:
            break
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(c, 0)
        if c == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += c
    parts = [p.strip() for p in [*parts, current] if p.strip()]
    if len(parts) > 3:
        raise BuildError(f"__cluster_dims__({', '.join(parts)}) has more than three dimensions")
    return tuple(parts + ["1"] * (3 - len(parts)))


def find_kernels(preprocessed: str) -> list[KernelDeclaration]:
    """__global__ function definitions (not templates) in a CUDA_EMULATION_SCAN preprocessing."""
    text = re.sub(r"^#.*$", "", preprocessed, flags=re.M)  # drop line markers
    found: dict[str, KernelDeclaration] = {}
    for marker in re.finditer(r"\bCUDA_EMULATION_KERNEL\b", text):
        head = re.split(r"[;{}]", text[max(0, marker.start() - 4000):marker.start()])[-1]
        if re.search(r"\btemplate\b", head):
            continue  # a template kernel has no address to register
        # __cluster_dims__ may also come before __global__ (both are attributes).
        cluster_dims = None
        before = list(re.finditer(r"\bCUDA_EMULATION_CLUSTER_DIMS\s*\(", head))
        if before:
            cluster_dims = _cluster_dims(text, marker.start() - len(head) + before[-1].end())
        matches = list(_TOKEN.finditer(text, marker.end(), min(len(text), marker.end() + 20000)))
        tokens = [m.group(0) for m in matches]
        name, max_threads, i, identifier = None, 0, 0, None
        while i < len(tokens):
            t = tokens[i]
            if t in ("CUDA_EMULATION_LAUNCH_BOUNDS", "CUDA_EMULATION_CLUSTER_DIMS", "__attribute__",
                     "__declspec") and tokens[i + 1] == "(":
                inside, after = _balanced(tokens, i + 1)
                if t == "CUDA_EMULATION_LAUNCH_BOUNDS":
                    max_threads = _integer_value(" ".join(inside).split(",")[0])
                if t == "CUDA_EMULATION_CLUSTER_DIMS":
                    cluster_dims = _cluster_dims(text, matches[i + 1].end())
                i = after
                continue
            if t == "(":
                name = identifier
                params, i = _balanced(tokens, i)
                if name and i < len(tokens) and tokens[i] == "{":  # a definition
                    found.setdefault(name, KernelDeclaration(name, _param_names(params), max_threads,
                                                             cluster_dims))
                break
            if re.fullmatch(r"[A-Za-z_]\w*", t):
                identifier = t
            i += 1
    return list(found.values())


# ------------------------------------------------------------------------------------------
# Steps 3-5: compiling and linking
# ------------------------------------------------------------------------------------------
def registration_source(source: Path, kernels: list[KernelDeclaration]) -> str:
    lines = ["// generated by tests/cuda_emulation/_build.py",
             f'#include "{HEADER}"', f'#include "{source}"']
    for k, kernel in enumerate(kernels):
        cluster = ("cuda_emu::ClusterShape{}" if kernel.cluster_dims is None else
                   f"cuda_emu::cluster_shape<{', '.join(f'({d})' for d in kernel.cluster_dims)}>()")
        lines.append(f'static const int cuda_emu_registered_{k} = cuda_emu::register_kernel('
                     f'"{kernel.name}", &{kernel.name}, "{",".join(kernel.param_names)}", {kernel.max_threads}, '
                     f'{cluster});')
    return "\n".join(lines) + "\n"


def thread_local_symbols(objects: list[Path]) -> tuple[set[str], set[str]]:
    """(defined, undefined) thread-local symbols of the objects, from readelf."""
    defined, undefined = set(), set()
    for obj in objects:
        table = subprocess.run(["readelf", "-sW", str(obj)], capture_output=True, text=True, check=True).stdout
        for line in table.splitlines():
            fields = line.split()
            if len(fields) >= 8 and fields[3] == "TLS":
                (undefined if fields[6] == "UND" else defined).add(fields[7])
    return defined, undefined


def dynamic_shared_source(names: Iterable[str]) -> str:
    lines = ["// generated: the storage behind every `extern __shared__` array of this module",
             "#include <cstddef>",
             'extern "C" {',
             f"alignas(128) __thread unsigned char cuda_emu_dynamic_shared[{DYNAMIC_SHARED_CAPACITY}];",
             f"extern const std::size_t cuda_emu_dynamic_shared_capacity = {DYNAMIC_SHARED_CAPACITY};",
             "}"]
    for k, name in enumerate(sorted(names)):
        lines.append(f'extern __thread unsigned char cuda_emu_alias_{k}[{DYNAMIC_SHARED_CAPACITY}] '
                     f'__asm__("{name}") __attribute__((alias("cuda_emu_dynamic_shared")));')
    return "\n".join(lines) + "\n"


def runtime_object(base_flags: list[str]) -> Path:
    """runtime.cpp compiled once per set of flags (at -O2: it runs every context switch),
    shared by all modules."""
    base_flags = [*base_flags, "-O2"]
    key = hashlib.sha256("\0".join([FORMAT_VERSION, compiler_version(), *base_flags,
                                    RUNTIME.read_text(), HEADER.read_text()]).encode()).hexdigest()[:24]
    target = cache_root() / f"runtime-{key}.o"
    if not target.exists():
        scratch = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        run_compiler([*base_flags, "-c", str(RUNTIME), "-o", str(scratch)], "compiling runtime.cpp")
        os.replace(scratch, target)
    return target


def build_shared_object(sources: Sequence[Path], include_dirs: Sequence[Path], defines: Mapping[str, object],
                        sanitize: bool, extra_flags: Sequence[str]) -> tuple[Path, list[Path]]:
    """Build (or find in the cache) the module; return its path and the files it depends on."""
    flags = compile_flags(include_dirs, defines, sanitize, extra_flags)
    scans = run_parallel((preprocess_for_scan, source, flags) for source in sources)

    key = hashlib.sha256("\0".join([FORMAT_VERSION, compiler_version(), *flags, RUNTIME.read_text(),
                                    *map(str, sources), *scans]).encode()).hexdigest()[:24]
    dependencies = sorted({f for scan in scans for f in included_files(scan)} | {RUNTIME})
    final = cache_root() / key
    if (final / "module.so").exists():
        return final / "module.so", dependencies

    work = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=cache_root()))
    try:
        kernel_units = []
        for k, (source, scan) in enumerate(zip(sources, scans)):
            unit = work / f"kernels{k}_{source.stem}.cpp"
            unit.write_text(registration_source(source, find_kernels(scan)))
            kernel_units.append(unit)
        runtime_flags = compile_flags([], defines, sanitize, extra_flags)
        results = run_parallel([(runtime_object, runtime_flags)] + [
            (run_compiler, [*flags, "-c", str(u), "-o", str(u.with_suffix(".o"))], f"compiling {s}")
            for u, s in zip(kernel_units, sources)])
        objects = [results[0]] + [u.with_suffix(".o") for u in kernel_units]

        defined, _ = thread_local_symbols(objects)
        _, needed_by_kernels = thread_local_symbols(objects[1:])
        shared_unit = work / "dynamic_shared.cpp"
        shared_unit.write_text(dynamic_shared_source(needed_by_kernels - defined))
        run_compiler([*flags, "-c", str(shared_unit), "-o", str(work / "dynamic_shared.o")],
                     "compiling dynamic_shared.cpp")
        objects.append(work / "dynamic_shared.o")

        link = ["-shared", "-o", str(work / "module.so"), *map(str, objects), "-pthread", "-ldl", "-Wl,-z,defs"]
        run_compiler(link + (["-fsanitize=address"] if sanitize else []), "linking")
        try:
            os.rename(work, final)
        except OSError:  # another process finished the same module first
            shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return final / "module.so", dependencies

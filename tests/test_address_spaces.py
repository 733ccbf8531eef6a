"""MSL address spaces of the metal backend's generated source, checked by clang where no Metal compiler is.

g++ reads the generated MSL as C++ (test_metal_backend.py), where `device`, `constant`,
`threadgroup` and `thread` vanish. clang's C++-for-OpenCL mode keeps them apart: with
mlm_opencl_check.h force-included they are OpenCL's __global, __constant, __local and __private,
so handing a threadgroup array to a `device float*` parameter, storing through a `constant`
pointer or binding a device location to a `thread float&` fails here as it would on a Mac.

One clang limitation is tolerated, and only it: C++ for OpenCL gives a struct's implicit copy
and move members `__generic` references, which cannot bind a `__constant` object, so copying a
constant struct by value (random.metal: `const PhiloxParams local = p;`) is refused though
Metal allows it. Such an error is dropped when every candidate it lists is an implicit member
refused for that reason alone; clang goes on checking the rest of the file.
"""

import functools
import pathlib
import re
import shutil
import subprocess
import textwrap

import pytest

from mlmetal.runtime import source as S

INCLUDE = pathlib.Path(S.__file__).parent / "include"
LIBRARIES = sorted(p.stem for p in S.KERNEL_DIR.glob("*.metal"))

# spir64: a target with half (cl_khr_fp16). -cl-no-stdinc: no OpenCL builtins, Metal's come
# from the header. The generated source's `#include <metal_stdlib>` finds the empty shim.
CLANG_FLAGS = ["-x", "clcpp", "-cl-std=clc++", "-cl-no-stdinc", "--target=spir64", "-fsyntax-only",
               "-ferror-limit=0", "-Wno-unknown-attributes",  # [[buffer(0)]] and the like
               "-Wno-pragma-once-outside-header"]  # kernel headers are inlined into one file

DIAGNOSTIC = re.compile(r"^[^\s:][^:]*:\d+:\d+: (?P<kind>fatal error|error|warning|note): ")
SUMMARY = re.compile(r"^\d+ (warnings?|errors?)( and \d+ errors?)? generated\.$")
CONSTANT_COPY = re.compile(
    r"candidate (constructor|function) \(the implicit (copy|move) (constructor|assignment operator)\) "
    r"not viable: cannot bind reference in address space '__constant' to object in address space '__generic'")
DEFAULT_CONSTRUCTOR = re.compile(r"candidate constructor \(the implicit default constructor\) not viable: requires 0")


@functools.cache
def unavailable() -> str | None:
    """Why this machine cannot run the check, or None."""
    if shutil.which("clang") is None:
        return "the address-space check needs clang on PATH"
    probe = subprocess.run(["clang", *CLANG_FLAGS, "-"], input="__kernel void k(__local float* x) {}\n",
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"clang cannot check C++ for OpenCL (-cl-std=clc++): {probe.stderr.strip().splitlines()[0]}"
    return None


@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> pathlib.Path:
    if reason := unavailable():
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("opencl_shim")
    (folder / "metal_stdlib").write_text("// mlm_opencl_check.h is force-included: it is all of <metal_stdlib> here\n")
    return folder


def diagnostics(stderr: str) -> list[list[str]]:
    """clang's output as one list of lines per error or warning, its notes and source lines after it."""
    blocks: list[list[str]] = []
    for line in stderr.splitlines():
        if SUMMARY.match(line):
            continue
        m = DIAGNOSTIC.match(line)
        if (m and m["kind"] != "note") or not blocks:
            blocks.append([])
        blocks[-1].append(line)
    return blocks


def is_constant_copy(block: list[str]) -> bool:
    """An error that only says a constant struct cannot be copied (clang's limitation, see above)."""
    if not re.search(r"error: (no matching constructor for initialization of|no viable overloaded '=')", block[0]):
        return False
    candidates = [line for line in block if re.search(r"note: candidate ", line)]
    return (any(CONSTANT_COPY.search(line) for line in candidates)
            and all(CONSTANT_COPY.search(line) or DEFAULT_CONSTRUCTOR.search(line) for line in candidates))


def address_space_errors(text: str, shim: pathlib.Path, tmp_path: pathlib.Path) -> list[str]:
    """The errors clang finds in generated MSL `text`, each with its notes: [] when it is clean."""
    path = tmp_path / "generated.metal.clcpp"
    path.write_text(text)
    proc = subprocess.run(["clang", *CLANG_FLAGS, "-I", str(shim),
                           "-include", str(INCLUDE / "mlm_opencl_check.h"), str(path)],
                          capture_output=True, text=True)
    reported = [b for b in diagnostics(proc.stderr) if re.search(r"\berror: ", b[0])]
    if proc.returncode != 0 and not reported:
        return [proc.stderr or f"clang exited with {proc.returncode}"]
    return ["\n".join(b) for b in reported if not is_constant_copy(b)]


@pytest.mark.parametrize("threads", [32, 1024])
@pytest.mark.parametrize("library", LIBRARIES)
def test_generated_metal_source_passes_the_address_space_check(library, threads, shim, tmp_path):
    text = S.generate(S.Source.from_file(S.find(library)), "metal", threads=threads)
    errors = address_space_errors(text, shim, tmp_path)
    assert errors == [], "\n\n".join(errors)


# ---------------------------------------------------------------- what it catches

PARAMS = """
#include <metal_stdlib>
using namespace metal;
struct Params { uint n; float a; };
"""

MISTAKES = {
    "threadgroup array to a device pointer": ("""
        inline void fill(device float* x, uint i) { x[i] = 0.0f; }
        kernel void k(device float* y [[buffer(0)]], uint i [[thread_position_in_grid]]) {
            threadgroup float staged[32];
            fill(staged, i % 32);  // MISTAKE
            y[i] = staged[i % 32];
        }""", ["'__local float[32]'", "'__global float *"]),
    "store through a constant pointer": ("""
        kernel void k(device float* y [[buffer(0)]], constant Params& p [[buffer(1)]],
                      uint i [[thread_position_in_grid]]) {
            constant float* a = &p.a;
            *a = y[i];  // MISTAKE
        }""", ["read-only variable is not assignable"]),
    "device location to a thread reference": ("""
        inline void accumulate(thread float& total, float v) { total += v; }
        kernel void k(device float* y [[buffer(0)]], uint i [[thread_position_in_grid]]) {
            accumulate(y[0], y[i]);  // MISTAKE
        }""", ["'__global'", "'__private'"]),
    "device buffer to a constant pointer": ("""
        inline float first(constant float* table) { return table[0]; }
        kernel void k(device float* y [[buffer(0)]], uint i [[thread_position_in_grid]]) {
            y[i] = first(y);  // MISTAKE
        }""", ["'__global'", "'__constant'"]),
    "constant struct to a thread reference": ("""
        inline float scale(thread const Params& q) { return q.a; }
        kernel void k(device float* y [[buffer(0)]], constant Params& p [[buffer(1)]],
                      uint i [[thread_position_in_grid]]) {
            Params copy = p;  // allowed: a copy by value (the tolerated clang limitation)
            y[i] = scale(copy) + scale(p);  // MISTAKE
        }""", ["'__constant'", "'__private'"]),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_check_catches_address_space_mistakes_at_their_line(mistake, shim, tmp_path):
    body, fragments = MISTAKES[mistake]
    text = PARAMS + textwrap.dedent(body)
    line = text.splitlines().index(next(s for s in text.splitlines() if "MISTAKE" in s)) + 1
    src = S.Source(text, name="mistake.metal")
    assert S.lint(src) == []
    errors = address_space_errors(S.generate(src, "metal", threads=64), shim, tmp_path)
    assert len(errors) == 1, "\n\n".join(errors)
    assert errors[0].startswith(f"mistake.metal:{line}:"), errors[0]
    for fragment in fragments:
        assert fragment in errors[0]


def test_copying_a_constant_struct_is_tolerated_and_nothing_else(shim, tmp_path):
    src = S.Source(PARAMS + textwrap.dedent("""
        kernel void k(device float* y [[buffer(0)]], device Params* out [[buffer(1)]],
                      constant Params& p [[buffer(2)]], uint i [[thread_position_in_grid]]) {
            const Params copy = p;
            out[i] = p;
            y[i] = copy.a + float(p.n);
        }"""), name="copy.metal")
    text = S.generate(src, "metal", threads=64)
    assert address_space_errors(text, shim, tmp_path) == []
    broken = text.replace("y[i] = copy.a", "y[i] = undeclared")
    errors = address_space_errors(broken, shim, tmp_path)
    assert len(errors) == 1 and "undeclared" in errors[0]

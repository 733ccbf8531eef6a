"""Kernel sources: signature parsing, the MSL-subset lint, and the wrapper generator's text."""

import ctypes
import re
from pathlib import Path

import pytest

import mlmetal as mm
from mlmetal.runtime import source as S
from mlmetal.runtime.msl import lint as lint_module

HEAD = "#include <metal_stdlib>\nusing namespace metal;\n"


def lint_text(body: str) -> list[str]:
    return S.lint(S.Source(HEAD + body, name="t.metal"))


# One failing example per rule: (source after the two header lines, rule, line of the violation).
VIOLATIONS = [
    ("kernel void k(device float* x [[buffer(0)]]) {\n double d = 1; }", "no-double", 4),
    ("kernel void k(device float* x [[buffer(0)]]) {\n long long d = 1; }", "no-long-long", 4),
    ("kernel void k(device float* x [[buffer(0)]]) {\n std::min(1, 2); }", "no-std", 4),
    ("kernel void k(device float* x [[buffer(0)]]) {\n float* p = new float[2]; }", "no-new-delete", 4),
    ("struct A { virtual void f(); };", "no-virtual", 3),
    ("kernel void k(device float* x [[buffer(0)]]) {\n try { } catch (...) { } }", "no-exceptions", 4),
    ("kernel void k(device float* x [[buffer(0)]]) {\n goto end; end: ; }", "no-goto", 4),
    ("kernel void k(device float* x [[buffer(0)]]) {\n thread_local int t; }", "no-thread-local", 4),
    ("kernel void k(device float* x [[buffer(0)]]) {\n auto f = [](int a) { return a; }; }", "no-lambda", 4),
    ("kernel void k(device float* x [[buffer(0)]]) {\n float (*f)(float) = 0; }", "no-function-pointer", 4),
    ("kernel void k(device atomic<float>* x [[buffer(0)]]) {\n}", "no-atomic-float", 3),
    ("kernel void k(device float* x [[buffer(0)]], threadgroup float* t [[threadgroup(0)]]) {\n}",
     "no-threadgroup-param", 3),
    ("kernel void k(device float4* x [[buffer(0)]]) {\n x[0].xy = 1; }", "no-swizzle", 4),
    ("#include <cmath>\nkernel void k(device float* x [[buffer(0)]]) {\n}", "include", 3),
    ("kernel void k(device float* x [[buffer(0)]]) {\n static int s = 0; }", "no-static-local", 4),
    ("threadgroup float g[4];\nkernel void k(device float* x [[buffer(0)]]) {\n}", "threadgroup-scope", 3),
    ("void f() {\n threadgroup float t[4]; }\nkernel void k(device float* x [[buffer(0)]]) { f(); }",
     "threadgroup-scope", 4),
    ("kernel void k(device float* x [[buffer(0)]]) {\n threadgroup float t; }", "threadgroup-array", 4),
    ("float f(float* p) { return *p; }\nkernel void k(device float* x [[buffer(0)]]) {\n}", "address-space", 3),
    ("float f(float x) { return f(x); }\nkernel void k(device float* x [[buffer(0)]]) {\n}", "no-recursion", 3),
    ("kernel void k(device float* x [[buffer(0)]],\n uint i) {\n}", "kernel-param", 4),
    ("kernel void k(device float* x [[buffer(0)]],\n uint i [[sample_id]]) {\n}", "kernel-param", 4),
    ("kernel void k(device float* x [[buffer(0)]],\n float i [[thread_position_in_grid]]) {\n}", "kernel-param", 4),
    ("kernel void k(device float* x [[buffer(0)]],\n device float* y [[buffer(2)]]) {\n}", "buffer-index", 3),
    ("kernel void k(device float* x [[buffer(0)]],\n float* y [[buffer(1)]]) {\n}", "address-space", 4),
    ("kernel void k(device float3* x [[buffer(0)]]) {\n}", "no-vec3-in-buffer", 3),
    ("struct P { float3 v; };\nkernel void k(device P* x [[buffer(0)]]) {\n}", "no-vec3-in-buffer", 4),
    ("struct P { float2 v; };\nkernel void k(constant P& p [[buffer(0)]]) {\n}", "constant-struct", 4),
    ("kernel void k(constant half& h [[buffer(0)]]) {\n}", "constant-struct", 3),
    ("kernel void k(device float* x [[buffer(0)]]) {\n simdgroup_float8x8 m;\n float2 e = m.thread_elements()[0]; }",
     "no-thread-elements", 5),
    ("kernel void k(device float* x [[buffer(0)]]) {\n simdgroup_matrix<float, 4, 4> m; }", "simdgroup-matrix-size", 4),
    ("struct P { uint n; };\nkernel void k(device float* x [[buffer(0)]],\n constant P& p [[buffer(1)]],  // extent: p.n\n"
     " device float* y [[buffer(2)]]) {}", "extent", 5),
    ("struct P { uint n; };\nkernel void k(device float* x [[buffer(0)]],  // extent: p.m\n constant P& p [[buffer(1)]]) {}",
     "extent", 4),
]


@pytest.mark.parametrize("body, rule, line", VIOLATIONS, ids=[f"{r}-{i}" for i, (_, r, _) in enumerate(VIOLATIONS)])
def test_every_lint_rule_has_a_failing_example(body, rule, line):
    problems = lint_text(body)
    hits = [p for p in problems if f": {rule}: " in p]
    assert hits, f"expected {rule}, got {problems}"
    assert hits[0].startswith(f"t.metal:{line}: {rule}: "), hits


def test_every_rule_is_exercised():
    source = Path(lint_module.__file__).read_text()
    rules = set(re.findall(r'"(no-[\w-]+|include|threadgroup-scope|threadgroup-array|address-space|kernel-param|'
                           r'buffer-index|constant-struct|extent)"', source))
    assert rules <= {r for _, r, _ in VIOLATIONS}, rules - {r for _, r, _ in VIOLATIONS}


def test_clean_kernels_pass_lint():
    for path in sorted(S.KERNEL_DIR.glob("*.metal")):
        assert S.lint(S.Source.from_file(path)) == [], path


def test_comments_and_strings_do_not_trigger_rules():
    assert lint_text("// double goto std::\n/* new delete */\nkernel void k(device float* x [[buffer(0)]]) {\n}") == []


def test_library_refuses_to_compile_a_lint_violation(dev):
    with pytest.raises(mm.LintError, match=r"<source>:4: no-double"):
        dev.library(source=HEAD + "kernel void k(device float* x [[buffer(0)]]) {\n double d = 1; }")


def test_compile_error_names_the_right_line(dev):
    src = HEAD + "kernel void k(device float* x [[buffer(0)]],\n uint i [[thread_position_in_grid]]) {\n  x[i] = 1;\n  x[i] = undefined_name;\n}"
    with pytest.raises(mm.KernelSourceError) as e:
        dev.library(source=src)
    assert re.search(r"<source>:6:\d*:? ?.*error", str(e.value)), str(e.value)


# ---------------------------------------------------------------- parsing

def test_signature_parsing():
    src = S.Source.from_file(S.find("elementwise"))
    k = src.kernels["axpy"]
    assert [(p.kind, p.name, p.index) for p in k.buffers] == [("buffer", "x", 0), ("buffer", "y", 1), ("constant", "p", 2)]
    assert [(p.name, p.builtin, p.type) for p in k.builtins] == [("i", "thread_position_in_grid", "uint")]
    assert not k.buffers[0].writable and k.buffers[1].writable
    st = k.struct_of(k.buffers[2])
    assert [(f.type, f.name) for f in st.fields] == [("uint", "n"), ("float", "a")] and st.nbytes == 8
    assert not k.uses_sync and src.kernels.keys() >= {"axpy", "fill_u32"}
    assert S.Source.from_file(S.find("reduce")).kernels["sum_partial"].uses_sync


def test_kernel_after_a_define_is_found():
    src = S.Source(HEAD + "#define TILE 16\nkernel void k(device float* x [[buffer(0)]]) {\n threadgroup float t[TILE]; }")
    assert list(src.kernels) == ["k"] and S.lint(src) == []


def test_sync_detected_through_helper_functions():
    src = S.Source(HEAD + "void helper() { threadgroup_barrier(mem_flags::mem_threadgroup); }\n"
                          "kernel void k(device float* x [[buffer(0)]]) { helper(); }")
    assert src.kernels["k"].uses_sync


def test_local_headers_are_inlined_with_their_own_line_numbers(tmp_path):
    (tmp_path / "common.h").write_text("// helper\ninline float twice(float x) { return 2 * x; }\ndouble bad;\n")
    (tmp_path / "k.metal").write_text(HEAD + '#include "common.h"\nkernel void k(device float* x [[buffer(0)]]) {}\n')
    src = S.Source.from_file(tmp_path / "k.metal")
    assert any(p.endswith("common.h:3: no-double: `double` is not available in MSL; use float") for p in S.lint(src))
    assert "twice" in S.generate(src, "cpu")
    # compiler messages (and the bounds checks) name the header's lines, then the includer's again
    (tmp_path / "k2.metal").write_text(HEAD + '#include "common.h"\nstruct S { float v; };\nkernel void k() {}\n')
    text = S.generate(S.Source.from_file(tmp_path / "k2.metal"), "cpu")
    assert f'#line 1 "{tmp_path / "common.h"}"\n// helper\n' in text
    assert f'#line 4 "{tmp_path / "k2.metal"}"\nstruct S' in text


# ---------------------------------------------------------------- generated wrappers

def test_cuda_wrapper_text():
    text = S.generate(S.Source.from_file(S.find("elementwise")), "cuda")
    # constants travel by value in the launch, with a pointer for a buffer bound in their place
    assert ('extern "C" __global__ void axpy(void* __mlm_b0, void* __mlm_b1, const AxpyParams __mlm_v2, '
            'const void* __mlm_b2, const unsigned int* __mlm_pred)') in text
    assert "const AxpyParams __mlm_c2 = __mlm_b2 != nullptr ? *(const AxpyParams*)(__mlm_b2) : __mlm_v2;" in text
    assert "if (__mlm_pred != nullptr && *__mlm_pred == 0u) return;" in text
    assert "const uint __mlm_lid = threadIdx.z * __mlm_t0 * __mlm_t1 + threadIdx.y * __mlm_t0 + threadIdx.x;" in text
    assert "uint i = (uint)(__mlm_g0*__mlm_t0+__mlm_l0);" in text
    # the body is the file's, with its line number restored
    lines = S.find("elementwise").read_text().split("\n")
    brace = next(i for i, l in enumerate(lines, 1) if "kernel void axpy" in l) + 3  # the line holding axpy's `{`
    assert lines[brace - 1].endswith("{")
    assert re.search(rf'#line {brace} "kernels/elementwise.metal"\n\{{\n    if \(i < p.n\) y\[i\] = fma', text)
    tg = S.generate(S.Source.from_file(S.find("layout")), "cuda")
    assert "__shared__ float tile[32][33];" in tg and "threadgroup float tile" not in tg


def test_metal_wrapper_text():
    text = S.generate(S.Source.from_file(S.find("reduce")), "metal", threads=256)
    assert "[[max_total_threads_per_threadgroup(256)]]\nkernel void sum_partial(device const float* x [[buffer(0)]]" in text
    assert "device const uint* __mlm_pred [[buffer(3)]]" in text
    assert "constant mlm_launch& __mlm_L [[buffer(4)]]" in text
    assert "if (__mlm_ptg != 256u) { atomic_store_explicit(__mlm_err, __mlm_ptg, memory_order_relaxed); return; }" in text
    # metal keeps threadgroup arrays as they are, in the kernel's outermost scope (no nested block)
    assert re.search(r'#line \d+ "kernels/reduce.metal"\n\n    threadgroup float totals\[32\];', text)
    assert "uint lane = (uint)((__mlm_lid%32u));" in text
    with pytest.raises(ValueError, match="threads="):
        S.generate(S.Source.from_file(S.find("reduce")), "metal")


def test_cpu_wrapper_text():
    text = S.generate(S.Source.from_file(S.find("layout")), "cpu")
    assert "static thread_local float tile[32][33];" in text
    assert 'extern "C" void transpose__mlm_group(' in text and 'extern "C" void transpose__mlm_thread(' in text


def test_checked_cpu_wrapper_text():
    text = S.generate(S.Source.from_file(S.find("layout")), "cpu", check_bounds=True)
    assert text.startswith('#include "mlm_cpu_launch.h"\n#include "mlm_cpu_check.h"\n')
    # threadgroup arrays: thread-local storage and a checked view under the array's name
    assert ("static thread_local float tile__mlm_tg[32][33]; const ::metal::check::region tile__mlm_rg(&tile__mlm_tg, "
            'sizeof(tile__mlm_tg), "threadgroup array `tile`", "transpose", -1, __mlm_err); '
            "auto tile = ::metal::check::view(tile__mlm_tg, &tile__mlm_rg);") in text
    # buffers: a region (address, extent, name) and a checked pointer over it; extents and the
    # error record follow the buffers
    assert "const unsigned long long* __mlm_ext = (const unsigned long long*)__mlm_b[3];" in text
    assert ('const ::metal::check::region __mlm_r0(__mlm_b[0], __mlm_ext[0], "buffer `x` [[buffer(0)]]", "transpose", '
            "0, __mlm_err);") in text
    assert "::metal::check::ptr<const float> x(__mlm_b[0], &__mlm_r0);" in text
    # pointer types in bodies and helpers, casts included; `thread` pointers stay raw
    src = S.Source(HEAD + "inline float f(threadgroup const float4* t, thread float* r, const device uint* u) { return 0; }\n"
                          "kernel void k(device float* x [[buffer(0)]]) { ((device float4*)x)[0] = 0; }")
    text = S.generate(src, "cpu", check_bounds=True)
    assert ("float f(::metal::check::ptr<const float4> t, thread float* r, ::metal::check::ptr<const uint> u)" in text
            and "((::metal::check::ptr<float4>)x)[0] = 0;" in text)
    with pytest.raises(ValueError, match="cpu target"):
        S.generate(src, "cuda", check_bounds=True)


def test_the_launch_record_is_declared_once():
    """struct mlm_launch is written in include/mlm_launch.h alone; the metal prelude, cpu.py's
    ctypes structure and metal.py's packing are made from it, field for field."""
    from mlmetal.runtime import cpu, metal

    root = Path(S.__file__).resolve().parents[1]
    declared = [p for p in root.rglob("*") if p.suffix in (".h", ".cpp", ".py") and
                re.search(r"struct\s+mlm_launch\s*\{|\bmlm_launch\b.*\{\s*uint", p.read_text())]
    assert declared == [root / "runtime" / "include" / "mlm_launch.h"], declared
    fields = S.launch_struct().fields
    assert [f.name for f in fields] == [name for name, _ in cpu.Launch._fields_]
    assert ctypes.sizeof(cpu.Launch) == metal.LAUNCH.size == S.launch_struct().nbytes
    text = S.generate(S.Source.from_file(S.find("elementwise")), "metal", threads=64)
    assert all(f"{f.name}{f'[{f.count}]' if f.count > 1 else ''};" in text for f in fields)

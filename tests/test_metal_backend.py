"""The metal backend where no Mac is: its generated MSL, and its dispatch logic against a fake metalcompute.

- Every kernel's metal translation passes the lint and compiles as C++17 (`g++ -fsyntax-only`)
  against the compatibility headers plus mlm_metal_check.h: a broken wrapper fails CI. (C++17,
  not C++14: mlm_compat.h uses `if constexpr` and hex float literals.)
- A fake `metalcompute` module (its 0.2.9 API: Device, Device.kernel(src).function(name),
  Device.buffer(n or bytes), function(count, *buffers) -> run handle that blocks when
  released) records what the backend binds, and plays the GPU when a handle is released.
- Off macOS, `mm.device("metal")` refuses with the reason.
"""

import dataclasses
import pathlib
import re
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

import mlmetal as mm
from mlmetal.runtime import metal
from mlmetal.runtime import source as S

INCLUDE = pathlib.Path(S.__file__).parent / "include"
LIBRARIES = sorted(p.stem for p in S.KERNEL_DIR.glob("*.metal"))


# ---------------------------------------------------------------- the generated MSL, compiled as C++

def compile_as_cpp(text: str, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / "generated.metal.cpp"
    path.write_text(text)
    return subprocess.run(["g++", "-std=c++17", "-fsyntax-only", "-Wno-attributes", "-I", str(INCLUDE),
                           "-include", "mlm_metal_check.h", str(path)], capture_output=True, text=True)


needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="the MSL-as-C++ check needs g++")


@needs_gxx
@pytest.mark.parametrize("threads", [32, 256, 1024])
@pytest.mark.parametrize("library", LIBRARIES)
def test_generated_metal_source_lints_and_compiles_as_cpp(library, threads, tmp_path):
    src = S.Source.from_file(S.find(library))
    assert S.lint(src) == []
    text = S.generate(src, "metal", threads=threads)
    assert text.count(f"[[max_total_threads_per_threadgroup({threads})]]\nkernel void ") == len(src.kernels)
    proc = compile_as_cpp(text, tmp_path)
    assert proc.returncode == 0, proc.stderr


@needs_gxx
def test_cpp_check_catches_a_broken_wrapper(tmp_path):
    text = S.generate(S.Source.from_file(S.find("reduce")), "metal", threads=256)
    broken = text.replace("__mlm_L.pred_word", "__mlm_L.pred_index")
    proc = compile_as_cpp(broken, tmp_path)
    assert proc.returncode != 0 and "pred_index" in proc.stderr


# ---------------------------------------------------------------- a fake metalcompute

class FakeError(Exception):
    pass


class FakeBuffer(bytearray):
    """A metalcompute.Buffer: bytes the GPU and the host share (buffer protocol, uint8)."""


@dataclasses.dataclass
class Call:
    """What one metalcompute call was given."""

    function: "FakeFunction"
    count: int
    args: tuple


class FakeRun:
    def __init__(self, gpu, call: Call):
        self.gpu, self.call, self.id = gpu, call, len(gpu.calls)
        gpu.calls.append(call)
        gpu.log.append(("commit", self.id))

    def __del__(self):  # metalcompute: releasing a run waits for its command buffer, so it "runs" here
        compiled = self.call.function.threads
        chosen = min(compiled, self.gpu.max_threads)
        if chosen != compiled:  # what the wrapper does on the GPU when the threadgroup is not T
            np.frombuffer(self.call.args[-1], np.uint32)[0] = chosen
        self.gpu.log.append(("complete", self.id))


class FakeFunction:
    def __init__(self, gpu, name, threads):
        self.gpu, self.name, self.threads = gpu, name, threads

    def __call__(self, count, *buffers):
        if self.gpu.refuse:
            raise FakeError("Cannot create pipeline state")
        return FakeRun(self.gpu, Call(self, count, buffers))


class FakeKernel:
    def __init__(self, gpu, source):
        self.gpu = gpu
        self.source = source
        self.threads = int(re.search(r"max_total_threads_per_threadgroup\((\d+)\)", source).group(1))

    def function(self, name):
        if not re.search(rf"kernel void {name}\(", self.source):
            raise FakeError("Function not found")
        return FakeFunction(self.gpu, name, self.threads)


class FakeDevice:
    def __init__(self, index=-1):
        self.calls: list[Call] = []
        self.log: list[tuple[str, int]] = []
        self.sources: list[str] = []
        self.max_threads = 1024  # the largest threadgroup the pipelines allow
        self.refuse = False  # fail every dispatch, as metalcompute does when Metal refuses a pipeline

    def kernel(self, source):
        if "BROKEN" in source:
            raise FakeError("Compilation failed: \n\nkernels/x.metal:7:5: error: use of undeclared identifier 'BROKEN'\n"
                            "    BROKEN;\n    ^\n")
        self.sources.append(source)
        return FakeKernel(self, source)

    def buffer(self, length_or_data):
        return FakeBuffer(length_or_data if isinstance(length_or_data, int) else bytes(memoryview(length_or_data)))


class FakeMetalcompute:
    error = FakeError
    Device = FakeDevice

    @staticmethod
    def get_devices():
        return ("Apple M2 (fake)",)


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setitem(sys.modules, "metalcompute", FakeMetalcompute)
    dev = metal.MetalDevice()
    return dev, dev.mc


KERNELS = """
#include <metal_stdlib>
using namespace metal;
struct Params { uint n; float a; };
kernel void scale(device const float* x [[buffer(0)]],
                  constant Params& p [[buffer(1)]],
                  device float* y [[buffer(2)]],
                  uint i [[thread_position_in_grid]]) {
    if (i < p.n) y[i] = p.a * x[i];
}
kernel void fill(device uint* y [[buffer(0)]], uint i [[thread_position_in_grid]]) { y[i] = 7u; }
"""


def launch(groups, threads, pred_word=0, has_pred=0) -> bytes:
    return struct.pack("<8I", *groups, *threads, pred_word, has_pred)


def test_buffers_are_zero_copy_views(fake):
    dev, _ = fake
    buf = dev.buffer(np.arange(4, dtype=np.float32))
    view = buf.numpy(np.float32)
    view[2] = 9.5
    assert np.frombuffer(buf.mc, np.float32).tolist() == [0, 1, 9.5, 3]
    buf.write(np.float32(-1), offset=4)
    assert view[1] == -1


def test_dispatch_binds_buffers_in_index_order_then_predicate_launch_and_flag(fake):
    dev, gpu = fake
    scale = dev.library(source=KERNELS).kernel("scale")
    x, y = dev.buffer(np.ones(300, np.float32)), dev.buffer(nbytes=1200)
    cb = dev.command_buffer()
    cb.dispatch(scale, groups=(3, 2), threads=(64, 2), args=[x, {"n": 300, "a": 2.0}, y])
    cb.commit()
    assert gpu.log == [("commit", 0)]  # committed at once, not yet complete
    cb.wait()
    assert gpu.log == [("commit", 0), ("complete", 0)]
    run = gpu.calls[0]
    assert run.function.name == "scale" and run.function.threads == 128
    assert run.count == 3 * 2 * 1 * 128  # gx·gy·gz·T threads, 1-D
    xb, params, yb, pred, launch_bytes, flag = run.args
    assert xb is x.mc and yb is y.mc
    assert params == struct.pack("<If", 300, 2.0)
    assert pred is dev._always.mc and np.frombuffer(pred, np.uint32).tolist() == [1]
    assert launch_bytes == launch((3, 2, 1), (64, 2, 1))
    assert np.frombuffer(flag, np.uint32).tolist() == [0]
    assert "[[max_total_threads_per_threadgroup(128)]]\nkernel void scale(" in gpu.sources[0]


def test_predicate_buffer_and_word(fake):
    dev, gpu = fake
    fill = dev.library(source=KERNELS).kernel("fill")
    y, flags = dev.buffer(nbytes=256), dev.buffer(np.array([1, 0, 1], np.uint32))
    cb = dev.command_buffer()
    cb.dispatch(fill, groups=2, threads=32, args=[y], predicate=mm.Predicate(flags, 8))
    cb.predicate = mm.Predicate(flags, 4)
    cb.dispatch(fill, groups=2, threads=32, args=[y])
    cb.commit()
    cb.wait()
    (_, pred0, launch0, _), (_, pred1, launch1, _) = (r.args for r in gpu.calls)
    assert pred0 is flags.mc and launch0 == launch((2, 1, 1), (32, 1, 1), pred_word=2, has_pred=1)
    assert pred1 is flags.mc and launch1 == launch((2, 1, 1), (32, 1, 1), pred_word=1, has_pred=1)


def test_each_library_compiled_once_per_threadgroup_size(fake):
    dev, gpu = fake
    lib = dev.library(source=KERNELS)
    y = dev.buffer(nbytes=4096)
    cb = dev.command_buffer()
    for threads in [(128,), (64, 2), (256,), (32, 4, 2)]:
        cb.dispatch(lib.kernel("fill"), groups=1, threads=threads, args=[y])
    cb.commit()
    cb.wait()
    assert [FakeKernel(gpu, s).threads for s in gpu.sources] == [128, 256]
    assert len({id(r.function) for r in gpu.calls}) == 2  # one function object (and flag) per size


def test_runs_complete_in_commit_order(fake):
    dev, gpu = fake
    fill = dev.library(source=KERNELS).kernel("fill")
    y = dev.buffer(nbytes=512)
    first, second = dev.command_buffer(), dev.command_buffer()
    first.dispatch(fill, groups=1, threads=32, args=[y])
    first.commit_and_continue()
    first.dispatch(fill, groups=2, threads=32, args=[y])
    second.dispatch(fill, groups=3, threads=32, args=[y])
    first.commit_and_continue()
    second.commit()
    first.dispatch(fill, groups=4, threads=32, args=[y])
    first.commit()
    empty = dev.command_buffer()
    empty.commit()
    assert gpu.log == [("commit", 0), ("commit", 1), ("commit", 2), ("commit", 3)]
    assert not first.completed and not second.completed
    dev.synchronize()
    assert [e for e in gpu.log if e[0] == "complete"] == [("complete", i) for i in range(4)]
    assert first.completed and second.completed and empty.completed
    first.wait()  # already done: nothing more happens
    assert len(gpu.log) == 8


def test_wait_releases_only_its_own_runs_in_order(fake):
    dev, gpu = fake
    fill = dev.library(source=KERNELS).kernel("fill")
    y = dev.buffer(nbytes=512)
    a, b = dev.command_buffer(), dev.command_buffer()
    a.dispatch(fill, groups=1, threads=32, args=[y])
    b.dispatch(fill, groups=1, threads=32, args=[y])
    b.dispatch(fill, groups=1, threads=32, args=[y])
    a.commit()
    b.commit()
    b.wait()
    assert gpu.log[3:] == [("complete", 1), ("complete", 2)]
    assert not a.completed and b.completed


def test_wrong_threadgroup_size_raises_at_wait_naming_kernel_and_size(fake):
    dev, gpu = fake
    fill = dev.library(source=KERNELS).kernel("fill")
    y = dev.buffer(nbytes=8192)
    gpu.max_threads = 512  # as if register pressure capped the pipeline below what was asked
    ok, bad = dev.command_buffer(), dev.command_buffer()
    ok.dispatch(fill, groups=2, threads=512, args=[y])
    ok.commit()
    bad.dispatch(fill, groups=2, threads=512, args=[y])
    bad.dispatch(fill, groups=2, threads=1024, args=[y])
    bad.commit()
    ok.wait()
    for _ in range(2):  # the error stays with the command buffer
        with pytest.raises(mm.ExecutionError, match=r"kernel fill \(<source>:\d+\).* 1024 threads.* of 512"):
            bad.wait()
    with pytest.raises(mm.ExecutionError, match="fill"):  # the pipeline is broken for good
        again = dev.command_buffer()
        again.dispatch(fill, groups=1, threads=1024, args=[y])
        again.commit()
        dev.synchronize()


def test_compile_error_names_the_metal_file_and_commits_nothing(fake):
    dev, gpu = fake
    lib = dev.library(source=KERNELS.replace("y[i] = 7u;", "y[i] = 7u; BROKEN;"))
    y = dev.buffer(nbytes=512)
    cb = dev.command_buffer()
    cb.dispatch(lib.kernel("scale"), groups=1, threads=32, args=[y, {"n": 1, "a": 1.0}, y])
    cb.dispatch(lib.kernel("fill"), groups=1, threads=32, args=[y])
    with pytest.raises(metal.CompileError) as e:
        cb.commit()
    assert e.value.problems == ["kernels/x.metal:7:5: error: use of undeclared identifier 'BROKEN'"]
    assert gpu.calls == []


def test_refused_dispatch_raises_execution_error(fake):
    dev, gpu = fake
    gpu.refuse = True
    cb = dev.command_buffer()
    cb.dispatch(dev.library(source=KERNELS).kernel("fill"), groups=1, threads=32, args=[dev.buffer(nbytes=128)])
    with pytest.raises(mm.ExecutionError, match="kernel fill .*Cannot create pipeline state"):
        cb.commit()


# ---------------------------------------------------------------- availability

def test_unavailable_reasons(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    assert "macOS 14" in metal.MetalDevice.unavailable()
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(metal.platform, "machine", lambda: "arm64")
    monkeypatch.setattr(metal.platform, "mac_ver", lambda: ("13.6", ("", "", ""), ""))
    assert "this is macOS 13.6" in metal.MetalDevice.unavailable()
    monkeypatch.setattr(metal.platform, "mac_ver", lambda: ("14.5", ("", "", ""), ""))
    monkeypatch.setitem(sys.modules, "metalcompute", None)  # `import metalcompute` raises ImportError
    assert "metalcompute" in metal.MetalDevice.unavailable()
    monkeypatch.setitem(sys.modules, "metalcompute", FakeMetalcompute)
    assert metal.MetalDevice.unavailable() is None
    monkeypatch.setattr(metal.platform, "machine", lambda: "x86_64")
    assert "Apple silicon" in metal.MetalDevice.unavailable()


@pytest.mark.skipif(sys.platform == "darwin", reason="off macOS only")
def test_device_metal_off_macos_says_why():
    with pytest.raises(mm.BackendUnavailable, match=rf"'metal' is not available here: .*macOS 14.*{sys.platform}"):
        mm.device("metal")
    assert "macOS 14" in mm.available("metal")

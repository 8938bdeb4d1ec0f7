"""The PDL contract, checked in the machine code of every router-kernel instantiation (no GPU needed),
and of the LoRA expand kernel.

Under programmatic dependent launch the router may start while the kernel before it still runs. So,
in the compiled SASS and not only in the source: no activation load and no global store before
griddepcontrol.wait (SASS ACQBULK), and griddepcontrol.launch_dependents (PREEXIT) at entry, before
the wait, so that the next kernel's weight fetch overlaps this one (csrc/kernels/grid_dependency.cuh
states the contract that makes the early trigger safe). And the point of PDL for a router: every weight load
that the kernel issues before its first activation load is issued before the wait, so that the
weights' HBM latency overlaps the previous kernel. ptxas moves loads across the wait: an ``__ldg``
of x was once hoisted above it, and non-coherent weight loads (``ld.global.nc``) moved freely
around it. So the order is checked where it is decided. In SASS, weights are LDG.E.NA
(``ld.global.L1::no_allocate``), activations plain coherent LDG, the bias LDG...CONSTANT.

Needs nvcc, cuobjdump and nvdisasm (the last two from PyPI, in the test extras); skipped without
them.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The extension's nvcc flags (setup.py), compiled to a cubin for sm_90a.
NVCC_FLAGS = ["-cubin", "-O3", "--expt-relaxed-constexpr", "-std=c++17",
              "-gencode=arch=compute_90a,code=sm_90a", "-I" + os.path.join(ROOT, "csrc")]
PDL_KERNELS = ["router_gemm_small_m.cu", "router_gemm_small_m_route.cu", "router_gemm_small_m_lora.cu",
               "router_gemm_sm90.cu"]


def _tool(name: str) -> str | None:
    """A CUDA tool on PATH, or the copy a pip package (nvidia-cuda-cuobjdump) keeps in site-packages."""
    found = shutil.which(name)
    if found:
        return found
    for prefix in {sys.prefix, sys.base_prefix}:
        pattern = os.path.join(prefix, "lib", "python3*", "site-packages", "nvidia", "*", "bin", name)
        for path in sorted(glob.glob(pattern)):
            if os.access(path, os.X_OK):
                return path
    return None


@pytest.fixture(scope="module")
def tools():
    nvcc, cuobjdump, nvdisasm = _tool("nvcc"), _tool("cuobjdump"), _tool("nvdisasm")
    if nvcc is None or cuobjdump is None or nvdisasm is None:
        pytest.skip("needs nvcc, cuobjdump and nvdisasm (pip install nvidia-cuda-cuobjdump "
                    "nvidia-cuda-nvdisasm)")
    # cuobjdump -sass runs nvdisasm, which it looks up on PATH.
    env = dict(os.environ, PATH=os.path.dirname(nvdisasm) + os.pathsep + os.environ.get("PATH", ""))
    return nvcc, cuobjdump, env


_CUBINS: dict[str, str] = {}  # source -> cubin, compiled once per run (minutes each on CI's cores)


def compiled_cubin(tools, source: str, out_dir) -> str:
    """`source` compiled with the extension's flags; the cubin's path."""
    if source in _CUBINS and os.path.exists(_CUBINS[source]):
        return _CUBINS[source]
    nvcc = tools[0]
    cubin = os.path.join(str(out_dir), os.path.basename(source) + ".cubin")
    subprocess.run([nvcc, *NVCC_FLAGS, "-o", cubin, source], check=True, capture_output=True)
    _CUBINS[source] = cubin
    return cubin


def compiled_functions(tools, source: str, out_dir) -> dict[str, list[str]]:
    """Kernel name -> its SASS opcodes (predicates dropped), in program order."""
    _, cuobjdump, env = tools
    sass = subprocess.run([cuobjdump, "-sass", compiled_cubin(tools, source, out_dir)], check=True,
                          capture_output=True, text=True, env=env).stdout
    opcode = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")
    functions = {}
    for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
        name, body = chunk.split("\n", 1)
        functions[name.strip()] = opcode.findall(body)
    return functions


def pdl_violations(ops: list[str]) -> list[str]:
    """What breaks the PDL order in one kernel's opcodes (empty when it holds)."""
    waits = [i for i, op in enumerate(ops) if op == "ACQBULK"]
    if not waits:
        return ["no griddepcontrol.wait (ACQBULK)"]
    wait = waits[0]
    problems = []
    loads = [(i, op) for i, op in enumerate(ops) if op.startswith("LDG")]
    weight_loads = [i for i, op in loads if ".NA" in op]
    activation_loads = [i for i, op in loads if ".NA" not in op and ".CONSTANT" not in op]
    if not activation_loads:
        problems.append("no coherent (activation) load at all: x read through the non-coherent path?")
    elif any(i < wait for i in activation_loads):
        problems.append("an activation load before the wait")
    elif any(wait < i < activation_loads[0] for i in weight_loads):
        problems.append("a first-chunk weight load after the wait")
    if not any(i < wait for i in weight_loads):
        problems.append("no weight load (LDG.E.NA) before the wait")
    # Before the wait the parameters only: weight rows (.NA) and the bias (16 bits, read-only path).
    # x through the read-only path would be a non-coherent load, which the rule above does not see.
    early_nc = [op for op in ops[:wait] if op.startswith("LDG") and ".CONSTANT" in op
                and op != "LDG.E.U16.CONSTANT"]
    if early_nc:
        problems.append(f"a non-coherent load before the wait that is not the bias: {early_nc}")
    return problems + store_and_trigger_violations(ops, wait)


# Global writes: stores, generic stores and global atomics / reductions (REDUX is a warp reduction).
GLOBAL_WRITES = ("STG", "ST.E", "ATOMG", "ATOM.E", "REDG", "RED.")


def store_and_trigger_violations(ops: list[str], wait: int) -> list[str]:
    """Global stores (and atomics) only after the wait (index `wait`); launch_dependents at entry,
    before it."""
    problems = []
    stores = [i for i, op in enumerate(ops) if op.startswith(GLOBAL_WRITES)]
    if not stores:
        problems.append("no global store")
    elif any(i < wait for i in stores):
        problems.append("a global store before the wait")
    triggers = [i for i, op in enumerate(ops) if op == "PREEXIT"]
    if not triggers:
        problems.append("no griddepcontrol.launch_dependents (PREEXIT)")
    elif min(triggers) > wait:
        problems.append("launch_dependents after the wait (it belongs at entry)")
    return problems


def lora_expand_pdl_violations(ops: list[str], prefetch: bool = True) -> list[str]:
    """The expand kernel's PDL order: before the wait it only prefetches B into L2 (CCTL...PF, no
    load at all: which slot a token uses is read after the wait), then the router kernels' rules
    for stores and the trigger. prefetch=False: the routing kernel's order, no load before the wait
    and nothing to prefetch (all it reads is the logits)."""
    waits = [i for i, op in enumerate(ops) if op == "ACQBULK"]
    if not waits:
        return ["no griddepcontrol.wait (ACQBULK)"]
    wait = waits[0]
    problems = []
    if any(op.startswith(("LDG", "LD.", "LDS")) for op in ops[:wait]):
        problems.append("a load before the wait")
    if prefetch and not any(op.startswith("CCTL") and ".PF" in op for op in ops[:wait]):
        problems.append("no L2 prefetch (CCTL.PF) before the wait")
    return problems + store_and_trigger_violations(ops, wait)


def test_lora_expand_keeps_the_pdl_order(tools, tmp_path):
    functions = compiled_functions(tools, os.path.join(ROOT, "csrc", "kernels", "lora_expand.cu"), tmp_path)
    kernels = {name: ops for name, ops in functions.items() if "lora_expand" in name}
    assert len(kernels) == 36, (f"expected 3 logits x 3 B dtypes x 2 load paths x 2 forms (plain, "
                                f"routed), found {sorted(kernels)}")
    broken = {name: lora_expand_pdl_violations(ops) for name, ops in kernels.items()
              if lora_expand_pdl_violations(ops)}
    assert not broken, broken


def test_route_logits_keeps_the_pdl_order(tools, tmp_path):
    """The routing kernel runs as a programmatic dependent of the router GEMM (gate.ops.route)."""
    functions = compiled_functions(tools, os.path.join(ROOT, "csrc", "kernels", "route_logits.cu"), tmp_path)
    kernels = {name: ops for name, ops in functions.items() if "route" in name}
    assert len(kernels) == 3, f"expected one kernel per logits dtype, found {sorted(kernels)}"
    broken = {name: lora_expand_pdl_violations(ops, prefetch=False) for name, ops in kernels.items()
              if lora_expand_pdl_violations(ops, prefetch=False)}
    assert not broken, broken


# Router-GEMM kernels of each unit, at least: the one-launch LoRA unit's 3 item counts x 2 outputs
# (the other units have more).
MIN_INSTANTIATIONS = 6


@pytest.mark.parametrize("kernel_file", PDL_KERNELS)
def test_every_instantiation_keeps_the_pdl_order(tools, tmp_path, kernel_file):
    functions = compiled_functions(tools, os.path.join(ROOT, "csrc", "kernels", kernel_file), tmp_path)
    kernels = {name: ops for name, ops in functions.items() if "router_gemm" in name}
    assert len(kernels) >= MIN_INSTANTIATIONS, f"expected every tile instantiation, found {sorted(kernels)}"
    broken = {name: pdl_violations(ops) for name, ops in kernels.items() if pdl_violations(ops)}
    assert not broken, broken


def waits_before_weights(ops: list[str]) -> list[str]:
    """Memory barriers a kernel executes before its first weight load (empty when none).

    A router call is one trip to memory: anything that makes a warp wait for the memory system
    before the weights are in flight lengthens every call. The tensor-core kernel's cluster arrive
    once had release semantics, which ptxas compiles to MEMBAR.ALL.GPU (plus ERRBAR and
    CGAERRBAR); every warp ran it before its first weight load, at 0.13-0.15 us per call on an
    H200 (benchmarks/results/README.md).
    """
    weight_loads = [i for i, op in enumerate(ops) if op.startswith("LDG") and ".NA" in op]
    if not weight_loads:
        return ["no weight load (LDG.E.NA)"]
    barrier = re.compile(r"(MEMBAR|ERRBAR|CGAERRBAR)\b")
    return [op for op in ops[:weight_loads[0]] if barrier.match(op)]


@pytest.mark.parametrize("kernel_file", PDL_KERNELS)
def test_no_memory_barrier_before_the_first_weight_load(tools, tmp_path, kernel_file):
    functions = compiled_functions(tools, os.path.join(ROOT, "csrc", "kernels", kernel_file), tmp_path)
    kernels = {name: ops for name, ops in functions.items() if "router_gemm" in name}
    assert len(kernels) >= MIN_INSTANTIATIONS, f"expected every tile instantiation, found {sorted(kernels)}"
    stalled = {name: waits_before_weights(ops) for name, ops in kernels.items()
               if waits_before_weights(ops)}
    assert not stalled, stalled


def ctas_per_sm_by_registers(registers: int, threads: int) -> int:
    """CTAs of `threads` threads that one SM's 64K registers hold (allocated per warp, 256 at a time)."""
    per_warp = -(-registers * 32 // 256) * 256
    return 65536 // (per_warp * (threads // 32))


# CTAs per SM that the tensor-core kernels must keep, by (expert tiles, token tiles) per warp
# (router_gemm_sm90.cuh). The tile rule (router_gemm_sm90_resolve) launches up to 256 CTAs in
# clusters of 8, a fused LoRA launch adds up to twice as many for the shrink (4 rank-64 slots at
# E = 128), and a fused routing launch has the plain call's grid. Such grids fit in one wave only
# with these residencies (benchmarks/results/README.md, "Current build: independent MMA chains":
# a 1 x 4 kernel at two CTAs per SM, and the fused 1 x 2 kernel at three, each cost about a
# microsecond). 2 x 1 tiles serve only the plain call under PDL, in place of 1 x 2 (grids of up to
# 256 CTAs, as 1 x 4), and 2 x 4 only grids past one wave, which leaves 2 x 4 free.
MIN_CTAS_PER_SM = {(1, 1): 4, (1, 2): 4, (1, 4): 3, (2, 1): 3, (2, 2): 3}


def test_tensor_core_kernels_keep_their_ctas_per_sm(tools, tmp_path):
    """Registers are what ptxas decides, so the residency the grids need is checked here, for
    every instantiation."""
    _, cuobjdump, env = tools
    assert ctas_per_sm_by_registers(168, 128) == 3 and ctas_per_sm_by_registers(182, 128) == 2
    assert ctas_per_sm_by_registers(128, 128) == 4 and ctas_per_sm_by_registers(132, 128) == 3
    registers = {}
    cubin = compiled_cubin(tools, os.path.join(ROOT, "csrc", "kernels", "router_gemm_sm90.cu"),
                           tmp_path)
    usage = subprocess.run([cuobjdump, "-res-usage", cubin], check=True, capture_output=True,
                           text=True, env=env).stdout
    registers.update((name, int(regs))
                     for name, regs in re.findall(r"Function (\S+):\s+REG:(\d+)", usage))
    tiles = {}
    for name in registers:
        shape = re.search(r"router_gemm_sm90_kernelILi(\d+)ELi(\d+)E", name)
        if shape:
            tiles[name] = (int(shape.group(1)), int(shape.group(2)))
    # Forms: plain and fused with a LoRA shrink.
    assert len(tiles) == 48, f"expected 2 x 3 tiles x 2 clusters x 2 outputs x 2 forms, found {sorted(tiles)}"
    threads = 128  # sm90::kWarps * 32
    too_big = {name: registers[name] for name, shape in tiles.items()
               if ctas_per_sm_by_registers(registers[name], threads) < MIN_CTAS_PER_SM.get(shape, 1)}
    assert not too_big, too_big


def test_one_launch_lora_kernels_hold_two_ctas_per_sm_without_spilling(tools, tmp_path):
    """The one-launch LoRA grids run only where all their clusters of 16 are resident at once
    (router_gemm_small_m_lora.cu); one CTA an SM sent the M = 1 grid into a second wave on an H100.
    The register cap that buys two must not buy them with local memory on the critical path."""
    _, cuobjdump, env = tools
    cubin = compiled_cubin(tools, os.path.join(ROOT, "csrc", "kernels", "router_gemm_small_m_lora.cu"),
                           tmp_path)
    usage = subprocess.run([cuobjdump, "-res-usage", cubin], check=True, capture_output=True,
                           text=True, env=env).stdout
    kernels = re.findall(r"Function (\S*router_gemm_small_m_kernel\S*):\s+REG:(\d+) STACK:(\d+)", usage)
    assert len(kernels) == 6, f"expected 1 x 1 tiles x 3 item counts x 2 outputs, found {kernels}"
    threads = 256  # kShortRowThreads
    broken = {name: (int(regs), int(stack)) for name, regs, stack in kernels
              if ctas_per_sm_by_registers(int(regs), threads) < 2 or int(stack) > 0}
    assert not broken, broken


def loads_after_first_fma(ops: list[str]) -> list[str]:
    """The global loads that ptxas placed after the first FFMA: the FFMAs wait for x and the rows,
    so each such load goes to memory only once they have arrived, a second trip."""
    first_fma = next((i for i, op in enumerate(ops) if op.startswith("FFMA")), len(ops))
    return [op for op in ops[first_fma:] if op.startswith("LDG")]


def test_one_launch_lora_reads_memory_in_one_trip(tools, tmp_path):
    """The one launch at rank <= 16 (one shrink item a CTA; the form taken under PDL): the slots,
    the weight, x and A rows, and the expand's B row, scale and bias are all issued before the
    first FFMA. With B read in a branch, ptxas placed its load after the base gate's FFMAs, a
    second memory latency on the one launch's critical path (lora_cluster.cuh, read_expand). The
    forms with 2 and 4 items a CTA (rank 32 and 64, without PDL only) still read the expand's
    operands after it."""
    source = os.path.join(ROOT, "csrc", "kernels", "router_gemm_small_m_lora.cu")
    functions = compiled_functions(tools, source, tmp_path)
    single_item = {name: ops for name, ops in functions.items() if re.search(r"FusionE3ELi1EEE", name)}
    assert len(single_item) == 2, f"expected bf16 and fp32 logits, found {list(single_item)}"
    late = {name: loads_after_first_fma(ops) for name, ops in single_item.items()}
    assert not any(late.values()), late


BROKEN_KERNELS = r"""
#include <cuda_bf16.h>
__device__ float weight_load(const float* p) {  // as the kernels load weights: LDG.E.NA
  float v;
  asm volatile("ld.global.L1::no_allocate.f32 %0, [%1];" : "=f"(v) : "l"(p));
  return v;
}
__global__ void nc_load_and_early_store(const __nv_bfloat16* __restrict__ x, float* out) {
  const float f = __bfloat162float(__ldg(x + threadIdx.x));  // x through the non-coherent path
  out[threadIdx.x] = 0.f;                                      // a store before the wait
  asm volatile("griddepcontrol.wait;" ::: "memory");
  out[threadIdx.x + 32] = f;
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");  // after the wait
}
__global__ void early_activation_load(const float* w, const float* x, float* out) {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  const float a = weight_load(w + threadIdx.x);
  const float f = x[threadIdx.x];  // a coherent load, before the wait
  asm volatile("griddepcontrol.wait;" ::: "memory");
  out[threadIdx.x] = a * f * x[threadIdx.x + 32];
}
__global__ void release_arrive_before_weights(const float* w, const float* x, float* out) {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");  // MEMBAR.ALL.GPU
  const float a = weight_load(w + threadIdx.x);
  asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
  asm volatile("griddepcontrol.wait;" ::: "memory");
  out[threadIdx.x] = a * x[threadIdx.x];
}
__global__ void prefetch_then_wait(const float* w, const float* x, float* out) {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("prefetch.global.L2 [%0];" ::"l"(w + threadIdx.x));
  asm volatile("griddepcontrol.wait;" ::: "memory");
  out[threadIdx.x] = w[threadIdx.x] * x[threadIdx.x];
}
__global__ void nc_activation_before_wait(const float* w, const float* x, float* out) {
  __shared__ float staged[32];
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  const float a = weight_load(w + threadIdx.x);
  staged[threadIdx.x % 32] = __ldg(x + threadIdx.x);  // x through the read-only path, used
  __syncthreads();                                      // before the wait
  asm volatile("griddepcontrol.wait;" ::: "memory");
  out[threadIdx.x] = a * staged[(threadIdx.x + 1) % 32] * x[threadIdx.x + 32];
}
__global__ void atomic_before_wait(const float* w, const float* x, float* out) {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  const float a = weight_load(w + threadIdx.x);
  atomicAdd(out + 64, 1.f);  // a global write before the wait
  asm volatile("griddepcontrol.wait;" ::: "memory");
  out[threadIdx.x] = a * x[threadIdx.x];
}
__global__ void weight_load_after_wait(const float* w, const float* x, float* out) {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  const float a = weight_load(w + threadIdx.x);
  asm volatile("griddepcontrol.wait;" ::: "memory");
  const float b = weight_load(w + threadIdx.x + 32);  // could have been in flight already
  out[threadIdx.x] = a * b * x[threadIdx.x];
}
"""


def test_the_check_catches_what_it_is_for(tools, tmp_path):
    source = tmp_path / "broken.cu"
    source.write_text(BROKEN_KERNELS)
    functions = compiled_functions(tools, str(source), tmp_path)
    first = pdl_violations(next(ops for name, ops in functions.items() if "nc_load" in name))
    assert "a global store before the wait" in first
    assert any("coherent" in p for p in first)
    assert "launch_dependents after the wait (it belongs at entry)" in first
    second = next(ops for name, ops in functions.items() if "early_activation" in name)
    assert pdl_violations(second) == ["an activation load before the wait"]
    assert pdl_violations([op for op in second if op != "ACQBULK"]) == ["no griddepcontrol.wait (ACQBULK)"]
    third = next(ops for name, ops in functions.items() if "weight_load_after" in name)
    assert pdl_violations(third) == ["a first-chunk weight load after the wait"]
    no_weights_first = [op for op in third if ".NA" not in op]
    assert pdl_violations(no_weights_first) == ["no weight load (LDG.E.NA) before the wait"]
    assert waits_before_weights(third) == []
    nc_early = pdl_violations(next(ops for name, ops in functions.items() if "nc_activation" in name))
    assert len(nc_early) == 1 and nc_early[0].startswith("a non-coherent load before the wait"), nc_early
    atomic = pdl_violations(next(ops for name, ops in functions.items() if "atomic_before" in name))
    assert atomic == ["a global store before the wait"], atomic
    fourth = next(ops for name, ops in functions.items() if "release_arrive" in name)
    assert pdl_violations(fourth) == []
    assert "MEMBAR.ALL.GPU" in waits_before_weights(fourth)
    # The expand kernel's rule: the weight load before the wait is a load, not a prefetch.
    assert lora_expand_pdl_violations(third) == ["a load before the wait",
                                                 "no L2 prefetch (CCTL.PF) before the wait"]
    prefetch_only = next(ops for name, ops in functions.items() if "prefetch_then_wait" in name)
    assert lora_expand_pdl_violations(prefetch_only) == []
    # One trip to memory: a load behind the first FFMA is found, loads before it are not.
    assert loads_after_first_fma(third) == []
    assert loads_after_first_fma(["LDG.E.NA.128", "FFMA", "LDG.E.128", "FFMA"]) == ["LDG.E.128"]

"""Compile every kernel launch for real GPU targets, without a GPU, and check its resources.

Triton's interpreter runs the kernels on the CPU but enforces none of a GPU's limits. Here each launch the
dispatchers make (same arguments, dtypes, alignment specialization, constexprs, warps and stages as
``launch.py`` gives them) is compiled by Triton for a target (``GPUTarget("cuda", capability, 32)``) through
the ``ptxas`` its wheel bundles, and ptxas's own report is read: registers, spill stores and loads, and
Triton's shared memory. A launch fails the check on a compile error, on shared memory over the target's
per-block limit, on spills over ``SPILL_BOUND`` (none for 16-bit launches), or, for 64-row 16-bit tiles on
sm_90, on products that did not become warpgroup MMA. The compiled PTX shows which matrix instructions the
dots became (``wgmma``: Hopper's warpgroup MMA, ``mma``: ``mma.sync``, ``fma``: fp32 products, exact). The
attention's optional warpgroup tiles (``attention_launch(..., warpgroup=True)``) are compiled too.

The shapes are the open_clip text towers' (``TOWERS``; a test checks them against open_clip's configs) plus
head dims 80 and 128. ``softcpt-dist kernels check`` runs it; ``bounding=True`` keeps the launches that
bound each kernel's resources (every tiling at its largest head dim, dimension and width), which CI compiles.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import re
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from softcpt_dist.kernels import cosine_ce, prompt_assembly, shared_prefix_attention
from softcpt_dist.kernels._triton import block, dot_precision, triton
from softcpt_dist.kernels.launch import SHARED_MEMORY_LIMIT, WARPGROUP_MMA_FROM, attention_launch, loss_launch

# open_clip text towers: (width, heads, embedding dim).
TOWERS: Dict[str, Tuple[int, int, int]] = {
    "ViT-B-16": (512, 8, 512),
    "ViT-L-14": (768, 12, 768),
    "ViT-H-14": (1024, 16, 1024),
    "ViT-bigG-14": (1280, 20, 1280),
}
EXTRA_HEAD_DIMS = {80: (1280, 16), 128: (1024, 8)}  # head dim: (width, heads) it is checked at
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TARGETS = (80, 86, 89, 90, 100)
SPILL_BOUND = {"fp32": 32, "bf16": 0, "fp16": 0}  # bytes of spill stores per thread, per launch dtype
NODES, SAMPLES, CLASSES = 1001, 255, 1191  # counts as a launch meets them: not multiples of 16


@dataclass
class Launch:
    """One kernel launch as a dispatcher makes it: the kernel, its arguments' shapes, constexprs, options."""

    kernel: str  # module:function
    variant: str
    dtype: str
    shape: str  # what it was launched for (tower, head dim, dimension)
    tiles: str
    args: list  # ("tensor", shape, dtype name) or a Python number
    constexprs: dict
    options: dict
    expect_wgmma: bool  # 16-bit products in 64-row tiles: warpgroup MMA expected on sm_90

    def key(self) -> tuple:
        return (self.kernel, repr(self.args_spec()), tuple(sorted(self.constexprs.items())),
                tuple(sorted(self.options.items())))

    def args_spec(self) -> list:
        """What the compiled code depends on: tensor dtypes, and each integer's 16-divisibility / being 1."""
        spec = []
        for a in self.args:
            if isinstance(a, tuple):
                spec.append(a[2])
            elif isinstance(a, int):
                spec.append("1" if a == 1 else "i16" if a % 16 == 0 else "i")
            else:
                spec.append(type(a).__name__)
        return spec


@dataclass
class Result:
    target: int
    kernel: str
    variant: str
    dtype: str
    shapes: List[str]
    tiles: str
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    shared: int = 0
    mma: str = ""
    error: str = ""
    problems: List[str] = field(default_factory=list)


def _t(shape, dtype: torch.dtype):
    return ("tensor", tuple(shape), str(dtype).replace("torch.", ""))


def _name(fn) -> str:
    return f"{fn.fn.__module__.rsplit('.', 1)[-1]}:{fn.fn.__name__}"


def _tiles_text(options: dict, **blocks) -> str:
    sizes = "x".join(str(v) for v in blocks.values())
    return f"{sizes}, {options['num_warps']}w/{options['num_stages']}s"


def attention_launches(dtype_name: str, head_dim: int, width: int, heads: int, shape: str, target: int,
                       warpgroup: bool = False) -> List[Launch]:
    """The forward, dQ and dK/dV launches; ``warpgroup``: the 64-row warpgroup tiles (``attention_launch``)."""
    dtype = DTYPES[dtype_name]
    launch = attention_launch(dtype, head_dim, target, warpgroup)
    three = 3 * width
    qkv, out, lse, i64 = _t((NODES, three), dtype), _t((NODES, width), dtype), _t((heads, NODES), torch.float32), \
        _t((NODES,), torch.int64)
    meta = dict(HEAD_DIM=head_dim, BLOCK_D=block(head_dim), PRECISION=dot_precision(dtype))
    query, key = launch.query, launch.key
    wide = dtype != torch.float32 and launch.query.rows >= 64
    suffix = ", warpgroup tiles" if warpgroup else ""
    qmeta = dict(meta, BLOCK_M=query.rows, BLOCK_N=query.cols)
    kmeta = dict(meta, BLOCK_M=key.rows, BLOCK_N=key.cols)
    fn_q, fn_k = shared_prefix_attention._query_tile, shared_prefix_attention._key_tile
    common = [NODES, width, three, width, 1.0 / head_dim ** 0.5]
    return [
        Launch(_name(fn_q), "forward" + suffix, dtype_name, shape,
               _tiles_text(query.options(), m=query.rows, n=query.cols),
               [qkv, out, lse, out, lse, qkv, i64, i64, i64, *common], dict(qmeta, BACKWARD=False),
               query.options(), wide),
        Launch(_name(fn_q), "backward dQ" + suffix, dtype_name, shape,
               _tiles_text(query.options(), m=query.rows, n=query.cols),
               [qkv, out, lse, out, lse, qkv, i64, i64, i64, *common], dict(qmeta, BACKWARD=True),
               query.options(), wide),
        Launch(_name(fn_k), "backward dK dV" + suffix, dtype_name, shape,
               _tiles_text(key.options(), m=key.rows, n=key.cols),
               [qkv, out, lse, lse, qkv, i64, *common], kmeta, key.options(), wide and key.cols >= 64),
    ]


def loss_launches(dtype_name: str, dim: int, shape: str, target: int) -> List[Launch]:
    dtype = DTYPES[dtype_name]
    launch = loss_launch(dtype, dim, target)
    img, txt = _t((SAMPLES, dim), dtype), _t((CLASSES, dim), dtype)
    i64, f32, scale = _t((SAMPLES,), torch.int64), _t((SAMPLES,), torch.float32), _t((), torch.float32)
    c64, c32 = _t((CLASSES,), torch.int64), _t((CLASSES,), torch.float32)
    meta = dict(BLOCK_B=launch.samples, BLOCK_C=launch.classes, BLOCK_E=launch.chunk, PRECISION=dot_precision(dtype))
    tiles = _tiles_text(launch.options(), b=launch.samples, c=launch.classes, e=launch.chunk)
    sample = _name(cosine_ce._sample_tile)
    sample_args = [img, txt, i64, i64, i64, i64, f32, scale, f32, f32, i64, f32, f32, f32, img, SAMPLES, dim, dim,
                   dim]
    class_args = [img, txt, i64, i64, i64, c64, c64, i64, f32, scale, f32, f32, f32, txt, c32, SAMPLES, CLASSES, dim,
                  dim, dim]
    wide = dtype != torch.float32 and launch.samples >= 64
    out = []
    for weight in (False, True):
        suffix = ", task weights" if weight else ""
        out += [
            Launch(sample, "forward" + suffix, dtype_name, shape, tiles, sample_args,
                   dict(meta, HAS_TARGET=True, HAS_WEIGHT=weight, BACKWARD=False, STATS=False), launch.options(), wide),
            Launch(sample, "backward images" + suffix, dtype_name, shape, tiles, sample_args,
                   dict(meta, HAS_TARGET=True, HAS_WEIGHT=weight, BACKWARD=True, STATS=False), launch.options(), wide),
            Launch(_name(cosine_ce._class_tile), "backward classes" + suffix, dtype_name, shape, tiles, class_args,
                   dict(meta, HAS_WEIGHT=weight, STATS=False), launch.options(), wide),
        ]
    out.append(Launch(sample, "predict", dtype_name, shape, tiles, sample_args,
                      dict(meta, HAS_TARGET=False, HAS_WEIGHT=False, BACKWARD=False, STATS=False), launch.options(),
                      wide))
    # class-parallel scoring's share statistics (``fused_share_stats``)
    out += [
        Launch(sample, "share forward", dtype_name, shape, tiles, sample_args,
               dict(meta, HAS_TARGET=True, HAS_WEIGHT=False, BACKWARD=False, STATS=True), launch.options(), wide),
        Launch(sample, "share backward images", dtype_name, shape, tiles, sample_args,
               dict(meta, HAS_TARGET=True, HAS_WEIGHT=False, BACKWARD=True, STATS=True), launch.options(), wide),
        Launch(_name(cosine_ce._class_tile), "share backward classes", dtype_name, shape, tiles, class_args,
               dict(meta, HAS_WEIGHT=False, STATS=True), launch.options(), wide),
    ]
    return out


def assembly_launches(dtype_name: str, width: int, shape: str) -> List[Launch]:
    """The packed input (frozen embeddings in the encoder's dtype, fp32 contexts) and the contexts' gradient."""
    dtype = DTYPES[dtype_name]
    rows, vocab, n_ctx, positions = 4099, 49408, 33, 77
    bw = block(width, most=256)
    options = dict(num_warps=4, num_stages=3)
    tok, ctx, pos, i64 = _t((vocab, width), dtype), _t((n_ctx, width), torch.float32), _t((positions, width), dtype), \
        _t((rows,), torch.int64)
    out = _t((rows, width), dtype)
    assemble = _name(prompt_assembly._assemble)
    launches = [Launch(assemble, "forward" + (" with contexts" if has_ctx else ""), dtype_name, shape,
                       _tiles_text(options, r=prompt_assembly.BLOCK_ROWS, w=bw),
                       [tok, ctx if has_ctx else tok, pos, i64, i64, out, rows, width, width, width, width, width],
                       dict(HAS_CTX=has_ctx, BLOCK_R=prompt_assembly.BLOCK_ROWS, BLOCK_W=bw), options, False)
                for has_ctx in (False, True)]
    grad, order, start = out, i64, _t((n_ctx + 1,), torch.int64)
    launches.append(Launch(_name(prompt_assembly._segment_sum), "backward contexts", dtype_name, shape,
                           _tiles_text(options, g=prompt_assembly.BLOCK_GROUPS, w=bw),
                           [grad, order, start, ctx, n_ctx, width, 7, width, width],
                           dict(BLOCK_G=prompt_assembly.BLOCK_GROUPS, BLOCK_W=bw), options, False))
    return launches


def launches_for(target: int, dtypes: Sequence[str] = tuple(DTYPES), bounding: bool = False) -> List[Launch]:
    """Every distinct launch for ``target`` (launches equal in all that compiles merged, their shapes listed);
    ``bounding``: only the narrowest and the widest tower (each tile size of the loss; the widest assembly)
    and head dims 64 and 128 (each tiling of the attention), which bound every kernel's resources."""
    found: Dict[tuple, Launch] = {}
    towers = dict(TOWERS)
    if bounding:  # the widest tower bounds assembly and the loss's 16-class tiles; the narrowest its 32-class ones
        towers = {n: towers[n] for n in ("ViT-B-16", "ViT-bigG-14")}
    attention = [(width // heads, width, heads, name) for name, (width, heads, _) in towers.items()]
    attention += [(hd, width, heads, f"head dim {hd}") for hd, (width, heads) in EXTRA_HEAD_DIMS.items()
                  if not bounding or hd == max(EXTRA_HEAD_DIMS)]
    for dtype_name in dtypes:
        candidates = []
        for head_dim, width, heads, name in attention:
            candidates += attention_launches(dtype_name, head_dim, width, heads, name, target)
            if dtype_name != "fp32" and target >= WARPGROUP_MMA_FROM:
                candidates += attention_launches(dtype_name, head_dim, width, heads, name, target, warpgroup=True)
        for name, (width, heads, embed) in towers.items():
            candidates += loss_launches(dtype_name, embed, name, target)
            if not bounding or name == "ViT-bigG-14":
                candidates += assembly_launches(dtype_name, width, name)
        for launch in candidates:
            kept = found.setdefault(launch.key(), launch)
            if kept is not launch and launch.shape not in kept.shape.split(", "):
                kept.shape += ", " + launch.shape
    return list(found.values())


def _materialize(arg):
    if isinstance(arg, tuple):
        return torch.empty(arg[1], dtype=getattr(torch, arg[2]))
    return arg


def _kernel_fn(name: str):
    module, fn = name.split(":")
    modules = {"cosine_ce": cosine_ce, "prompt_assembly": prompt_assembly,
               "shared_prefix_attention": shared_prefix_attention}
    return getattr(modules[module], fn).fn


_JITTED: Dict[str, object] = {}


def compile_launch(launch: Launch, target: int) -> Result:
    """Compile ``launch`` for ``target`` and read its resources (a compile error is reported, not raised)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    result = Result(target, launch.kernel, launch.variant, launch.dtype, launch.shape.split(", "), launch.tiles)
    if launch.kernel not in _JITTED:
        _JITTED[launch.kernel] = triton.jit(_kernel_fn(launch.kernel))
    fn = _JITTED[launch.kernel]
    gpu = GPUTarget("cuda", target, 32)
    backend = make_backend(gpu)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {**launch.constexprs, **launch.options}
    bound, specialization, options = binder(*[_materialize(a) for a in launch.args], **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report, printed when it compiles (a fresh cache: always)
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=gpu,
                                      options=options.__dict__)
    except Exception as err:  # a compile error is this check's finding
        result.error = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        return result
    text = log.getvalue()
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if registers is None or spills is None:
        result.error = "ptxas printed no resource report (a cached compile?)"
        return result
    result.registers = int(registers.group(1))
    result.spill_stores, result.spill_loads = int(spills.group(1)), int(spills.group(2))
    result.shared = int(compiled.metadata.shared)
    ptx = compiled.asm["ptx"]
    result.mma = "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "fma" if _has_dot(launch) else "-"
    return result


def _has_dot(launch: Launch) -> bool:
    return "assembly" not in launch.kernel


def problems(result: Result, launch: Launch) -> List[str]:
    """Why ``result`` fails the check (empty: it passes)."""
    found = []
    if result.error:
        return [f"compile error: {result.error}"]
    limit = SHARED_MEMORY_LIMIT.get(result.target)
    if limit is not None and result.shared > limit:
        found.append(f"shared memory {result.shared} B > sm_{result.target}'s {limit} B")
    bound = SPILL_BOUND[launch.dtype]
    if result.spill_stores > bound:
        found.append(f"{result.spill_stores} B of spill stores > the {launch.dtype} bound of {bound} B")
    if launch.expect_wgmma and result.target == 90 and result.mma != "wgmma":
        found.append(f"64-row 16-bit tiles on sm_90 compiled to {result.mma or 'no MMA'}, not warpgroup MMA")
    return found


def _compile_in_worker(job):
    launch, target = job
    return compile_launch(launch, target)


def _set_env(name: str, value: Optional[str]) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@contextlib.contextmanager
def _environment(**values: Optional[str]):
    """Environment variables set (``None``: removed) for the processes started inside."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            _set_env(name, value)
        yield
    finally:
        for name, value in saved.items():
            _set_env(name, value)


def known_targets(targets: Sequence[int]) -> Tuple[List[int], List[int]]:
    """``(kept, unknown)``: the targets this Triton can compile for (sm_100 needs its Blackwell ptxas)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    kept, unknown = [], []
    for target in targets:
        try:
            make_backend(GPUTarget("cuda", target, 32))
            kept.append(target)
        except Exception:
            unknown.append(target)
    return kept, unknown


def run_check(targets: Sequence[int] = TARGETS, dtypes: Sequence[str] = tuple(DTYPES), bounding: bool = False,
              jobs: int = 0) -> List[Result]:
    """Compile every launch for every target in ``jobs`` processes (0: one per CPU) with an empty Triton
    cache (so that ptxas reports on each); results in launch order, ``problems`` filled in."""
    if triton is None:
        raise RuntimeError("the compile check needs Triton (Linux builds of torch ship it)")
    work = [(launch, target) for target in targets for launch in launches_for(target, dtypes, bounding)]
    results = compile_all(work, jobs)
    for result, (launch, _) in zip(results, work):
        result.problems = problems(result, launch)
    return results


def compile_all(work: Sequence[Tuple[Launch, int]], jobs: int = 0) -> List[Result]:
    """``compile_launch`` of each ``(launch, target)`` in ``jobs`` processes (0: one per CPU), in order."""
    jobs = jobs or os.cpu_count() or 1
    # Fresh processes: Triton imported outside the interpreter (a test session imports it under
    # TRITON_INTERPRET=1, and then jits for the interpreter), with an empty cache.
    with tempfile.TemporaryDirectory(prefix="softcpt-kernel-check-") as cache, \
            _environment(TRITON_INTERPRET=None, TRITON_CACHE_DIR=cache), \
            ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile_in_worker, work, chunksize=1))


def markdown(results: Sequence[Result]) -> str:
    """One row per launch: its tiles and, per target, registers / spill stores / shared KB / MMA."""
    targets = sorted({r.target for r in results})
    rows: Dict[tuple, Dict[int, Result]] = {}
    for r in results:
        rows.setdefault((r.kernel, r.variant, r.dtype, ", ".join(r.shapes)), {})[r.target] = r
    head = "| kernel | launch | dtype | shapes | " + " | ".join(f"sm_{t}" for t in targets) + " |"
    lines = [head, "|" + "---|" * (4 + len(targets))]
    for (kernel, variant, dtype, shapes), by_target in rows.items():
        cells = []
        for t in targets:
            r = by_target.get(t)
            if r is None:
                cells.append("")
            elif r.error:
                cells.append("**compile error**")
            else:
                cell = f"{r.tiles}: {r.registers} regs, {r.spill_stores} B spill, {r.shared / 1024:.1f} KB, {r.mma}"
                cells.append(f"**{cell}**" if r.problems else cell)
        lines.append(f"| {kernel} | {variant} | {dtype} | {shapes} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary(results: Sequence[Result]) -> str:
    failed = [r for r in results if r.problems]
    targets = sorted({r.target for r in results})
    text = (f"{len(results)} compiles of the launches for {', '.join(f'sm_{t}' for t in targets)}: "
            f"{len(results) - len(failed)} pass, {len(failed)} fail")
    for r in failed:
        text += f"\n  FAIL sm_{r.target} {r.kernel} {r.variant} {r.dtype} ({', '.join(r.shapes)}): " + \
            "; ".join(r.problems)
    return text


def as_dicts(results: Sequence[Result]) -> List[dict]:
    return [asdict(r) for r in results]

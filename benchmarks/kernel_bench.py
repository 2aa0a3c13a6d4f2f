"""The Triton kernels against PyTorch eager, ``torch.compile`` and FlexAttention, side by side in one run,
at the ViT-L-14 General-10 shape (1,191 classes; bf16 text tower on a GPU), and a full text-side
SoftCPT training step with throughput and MFU. Writes ``kernels.json`` and ``kernels.md`` to ``--out``.

Each timing is forward + backward (the gradients training needs), the median of ``--repeats`` after
``--warmup`` runs, CUDA-event timed; a ratio is eager (or compiled) time over kernel time.

- prompt_assembly: the packed input of all class prompts (gradient to the contexts);
- shared_prefix_attention: one layer's attention over the packed nodes (gradient to q, k, v); FlexAttention
  gets a block mask of the same map (node q sees node k iff ``k <= q < subtree_end[k]``);
- cosine_ce: the per-task loss of ``--batch`` cached image features against all class features;
- the attention and loss kernels also with the tiles every GPU used before per-target launch settings
  (``FORMER_*``: 32 x 32 attention tiles, 16-sample loss tiles, 4 warps, 3 stages): "vs former" is their
  time over the per-target settings' (``softcpt_dist.kernels.launch``), both called without the dispatcher;
  16-bit attention on sm_90+ also with the 64-row warpgroup-MMA tiles (``warpgroup=True``);
- the text-side step: task prompts -> meta network -> all class prompts through the frozen tower -> loss,
  backward to the learnable tensors, kernels on vs off.

MFU counts the work a frozen tower must do, per token position encoded (the layout's nodes):
forward 2 FLOPs per weight of the transformer blocks, backward 2 more (input gradients only: the
weights are frozen); attention adds, per layer and query, 4 * keys * width forward and 8 * keys *
width backward, with keys = the positions the query really attends (its depth + 1, no padding);
the projection of each class's EOT row adds 4 * width * embed. Peak: bf16 dense tensor-core FLOP/s
of the device (``PEAK_TFLOPS``; unknown devices get no MFU).

    python benchmarks/kernel_bench.py --out /tmp/kb                      # GPU: ViT-L-14, General-10, bf16
    TRITON_INTERPRET=1 python benchmarks/kernel_bench.py --device cpu --arch softcpt-tiny --group plant6 \\
        --precision fp32 --skip compile flex --repeats 1 --warmup 0 --out /tmp/kb   # smoke run on a CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import softcpt_dist  # noqa: E402,F401  (torchvision shim before open_clip)
import open_clip  # noqa: E402
import torch  # noqa: E402

from group_shapes import GROUPS  # noqa: E402
from softcpt_dist.config import MethodConfig, PromptConfig  # noqa: E402
from softcpt_dist.kernels.cosine_ce import fused_cosine_cross_entropy  # noqa: E402
from softcpt_dist.kernels.launch import (AttentionLaunch, LossLaunch, Tiles, WARPGROUP_MMA_FROM,  # noqa: E402
                                        attention_launch, device_target)
from softcpt_dist.kernels.shared_prefix_attention import triton_shared_prefix_attention  # noqa: E402
from softcpt_dist.model.loss import cosine_cross_entropy  # noqa: E402  (the kernels' dispatchers: model side)
from softcpt_dist.model.prompt_layout import prompt_assembly  # noqa: E402
from softcpt_dist.model.tree_attention import shared_prefix_attention  # noqa: E402
from softcpt_dist.model.backbone import _DTYPES, CLIPBackbone, ensure_builtin_configs  # noqa: E402
from softcpt_dist.model.methods.softcpt import SoftCPT  # noqa: E402

FORMER_ATTENTION = AttentionLaunch(Tiles(32, 32), Tiles(32, 32))


def former_loss(dim: int) -> LossLaunch:
    return LossLaunch(16, 32 if dim <= 512 else 16)


PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


def peak_tflops(name: str):
    return next((v for k, v in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])) if k in name), None)


def timed(fn, device: str, warmup: int, repeats: int) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def text_flops(layout, encoder, n_eot: int) -> float:
    """Forward + input-gradient backward FLOPs of the frozen tower over a shared-prefix layout."""
    width, layers = encoder.width, len(encoder.blocks)
    block_weights = sum(p.numel() for n, p in encoder.blocks.named_parameters()
                        if n.endswith("weight") and p.dim() == 2)
    keys = float((layout.node_depth + 1).sum())
    dense = 4.0 * block_weights * layout.positions
    attention = 12.0 * keys * width * layers
    return dense + attention + 4.0 * width * encoder.output_dim * n_eot


def build(args):
    ensure_builtin_configs()
    torch.manual_seed(0)
    model = open_clip.create_model(args.arch, pretrained=None, precision="fp32", device="cpu")
    model = model.to(device=args.device, dtype=_DTYPES[args.precision]).eval().requires_grad_(False)
    backbone = CLIPBackbone(model, open_clip.get_tokenizer(args.arch), args.arch, None)
    group = GROUPS[args.group]()
    torch.manual_seed(1)
    method = SoftCPT(backbone, group, PromptConfig(), MethodConfig(variant="NATA")).to(args.device)
    return backbone, group, method


def variants(args, eager, kernel, flex=None) -> dict:
    """Timings of one operation's callables (each runs forward + backward)."""
    out = {"eager": timed(eager, args.device, args.warmup, args.repeats),
           "kernel": timed(kernel, args.device, args.warmup, args.repeats)}
    if "compile" not in args.skip:
        compiled = torch.compile(eager)
        out["compile"] = timed(compiled, args.device, max(args.warmup, 1), args.repeats)
    if flex is not None and "flex" not in args.skip:
        out["flex"] = timed(flex, args.device, max(args.warmup, 1), args.repeats)
    for name in list(out):
        if name != "kernel":
            out[f"kernel_vs_{name}"] = out[name]["median_s"] / out["kernel"]["median_s"]
    return out


def bench_assembly(args, backbone, method):
    enc = backbone.text_encoder
    ctx, owner = method.context_groups()
    batch = method.class_prompts(ctx.detach(), owner)
    layout = enc.layout(batch)
    context = batch.ctx.detach().clone().requires_grad_(True)
    grad = torch.randn(layout.positions, enc.width, device=args.device, dtype=enc.dtype)

    def run(enabled):
        def step():
            context.grad = None
            prompt_assembly(batch.tokens, context, enc.positional_embedding, layout.node_source, layout.node_depth,
                            enc.dtype, enabled).backward(grad)
        return step
    return variants(args, run("off"), run("auto")), layout


def bench_attention(args, backbone, layout):
    enc = backbone.text_encoder
    heads, width = enc.blocks[0].attn.heads, enc.width
    qkv = torch.randn(layout.positions, 3 * width, device=args.device, dtype=enc.dtype).requires_grad_(True)
    grad = torch.randn(layout.positions, width, device=args.device, dtype=enc.dtype)

    def run(enabled):
        def step():
            qkv.grad = None
            shared_prefix_attention(qkv, layout, heads, enabled).backward(grad)
        return step

    plans = {}  # tile plans kept, as the dispatcher keeps the layout's own

    def direct(launch):  # the kernel without the dispatcher, at the given tiles
        def step():
            qkv.grad = None
            triton_shared_prefix_attention(qkv, layout.node_parent, layout.subtree_end, heads, plans,
                                           launch=launch).backward(grad)
        return step

    def with_former(out):
        if args.device == "cuda":
            out["former"] = timed(direct(FORMER_ATTENTION), args.device, args.warmup, args.repeats)
            out["direct"] = timed(direct(None), args.device, args.warmup, args.repeats)
            out["kernel_vs_former"] = out["former"]["median_s"] / out["direct"]["median_s"]
            target = device_target(qkv.device)
            if qkv.dtype != torch.float32 and target >= WARPGROUP_MMA_FROM:
                wide = attention_launch(qkv.dtype, width // heads, target, warpgroup=True)
                out["warpgroup"] = timed(direct(wide), args.device, args.warmup, args.repeats)
                out["kernel_vs_warpgroup"] = out["warpgroup"]["median_s"] / out["direct"]["median_s"]
        return out
    if "flex" in args.skip:
        return with_former(variants(args, run("off"), run("auto")))
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    end, n = layout.subtree_end, layout.positions
    mask = create_block_mask(lambda b, h, q, k: (k <= q) & (q < end[k]), 1, 1, n, n, device=args.device)
    flex_fn = torch.compile(flex_attention)

    def flex_step():
        qkv.grad = None
        q, k, v = (t.view(n, heads, -1).transpose(0, 1).unsqueeze(0) for t in qkv.chunk(3, dim=-1))
        out = flex_fn(q, k, v, block_mask=mask)
        out.squeeze(0).transpose(0, 1).reshape(n, width).backward(grad)
    return with_former(variants(args, run("off"), run("auto"), flex_step))


def bench_loss(args, backbone, group):
    n, dim = args.batch, backbone.text_encoder.output_dim
    g = torch.Generator().manual_seed(3)
    class_task = group.class_task().to(args.device)
    tasks = torch.randint(0, len(group.tasks), (n,), generator=g).to(args.device)
    offsets = torch.as_tensor(group.offsets, device=args.device)
    sizes = torch.as_tensor([t.num_classes for t in group.tasks], device=args.device)
    targets = offsets[tasks] + (torch.rand(n, generator=g).to(args.device) * sizes[tasks]).long()
    img = torch.randn(n, dim, generator=g).to(args.device)  # cached image features: fp32, no gradient
    txt = torch.randn(group.num_classes, dim, generator=g).to(args.device, backbone.text_encoder.dtype)
    txt.requires_grad_(True)

    def run(enabled):
        def step():
            txt.grad = None
            loss, _ = cosine_cross_entropy(img, txt, backbone.logit_scale, tasks, targets, class_task,
                                                     enabled=enabled)
            loss.backward()
        return step

    def direct(launch):  # the fused kernel without the dispatcher's checks, at the given tiles
        def step():
            txt.grad = None
            fused_cosine_cross_entropy(img, txt, backbone.logit_scale, tasks, targets, class_task,
                                       launch=launch)[0].backward()
        return step
    out = variants(args, run("off"), run("auto"))
    if args.device == "cuda":  # both without the dispatcher's checks: the tiles' difference alone
        out["former"] = timed(direct(former_loss(dim)), args.device, args.warmup, args.repeats)
        out["direct"] = timed(direct(None), args.device, args.warmup, args.repeats)
        out["kernel_vs_former"] = out["former"]["median_s"] / out["direct"]["median_s"]
    return out


def bench_step(args, backbone, group, method, layout):
    """The whole text side of one step, kernels on vs off; throughput in class prompts and positions per s."""
    g = torch.Generator().manual_seed(4)
    tasks = torch.randint(0, len(group.tasks), (args.batch,), generator=g).to(args.device)
    targets = torch.as_tensor(group.offsets, device=args.device)[tasks]
    img = torch.randn(args.batch, backbone.text_encoder.output_dim, generator=g).to(args.device)
    class_task = group.class_task().to(args.device)
    task_layout = backbone.text_encoder.layout(method.task_prompts(method.task_ctx))

    def run(enabled):
        def step():
            backbone.text_encoder.set_kernels(enabled)
            method.zero_grad(set_to_none=True)
            loss, _ = cosine_cross_entropy(img, method(), backbone.logit_scale, tasks, targets, class_task,
                                                     enabled=enabled)
            loss.backward()
        return step
    out = {"eager": timed(run("off"), args.device, args.warmup, args.repeats),
           "kernel": timed(run("auto"), args.device, args.warmup, args.repeats)}
    flops = text_flops(layout, backbone.text_encoder, group.num_classes) + \
        text_flops(task_layout, backbone.text_encoder, len(group.tasks))
    peak = peak_tflops(torch.cuda.get_device_name()) if args.device == "cuda" else None
    for name in ("eager", "kernel"):
        t = out[name]["median_s"]
        out[name].update(class_prompts_per_s=group.num_classes / t, positions_per_s=layout.positions / t,
                         tflops=flops / t / 1e12, mfu=(flops / t / 1e12 / peak) if peak else None)
    out["kernel_vs_eager"] = out["eager"]["median_s"] / out["kernel"]["median_s"]
    out["flops_per_step"] = flops
    return out


def markdown(report: dict) -> str:
    lines = [f"# Kernel check: {report['device']}", "", f"{report['setup']}", "",
             "| operation | eager ms | torch.compile ms | FlexAttention ms | kernel ms | vs eager | vs compile "
             "| former tiles ms | vs former | warpgroup tiles ms | vs warpgroup |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ms = lambda r, k: f"{r[k]['median_s'] * 1e3:.3f}" if k in r else "—"  # noqa: E731
    ratio = lambda r, k: f"{r[k]:.2f}×" if k in r else "—"  # noqa: E731
    for name in ("prompt_assembly", "shared_prefix_attention", "cosine_ce"):
        r = report[name]
        lines.append(f"| {name} | {ms(r, 'eager')} | {ms(r, 'compile')} | {ms(r, 'flex')} | {ms(r, 'kernel')} | "
                     f"{ratio(r, 'kernel_vs_eager')} | {ratio(r, 'kernel_vs_compile')} | {ms(r, 'former')} | "
                     f"{ratio(r, 'kernel_vs_former')} | {ms(r, 'warpgroup')} | {ratio(r, 'kernel_vs_warpgroup')} |")
    s = report["text_step"]
    lines += ["", "| text-side step | ms | class prompts/s | positions/s | TFLOP/s | MFU |",
              "|---|---:|---:|---:|---:|---:|"]
    for name in ("eager", "kernel"):
        r = s[name]
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "—"
        lines.append(f"| {name} | {r['median_s'] * 1e3:.2f} | {r['class_prompts_per_s']:,.0f} | "
                     f"{r['positions_per_s']:,.0f} | {r['tflops']:.1f} | {mfu} |")
    lines.append(f"\nkernels vs eager: {s['kernel_vs_eager']:.2f}×; FLOPs per step {s['flops_per_step']:.3e}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="ViT-L-14")
    p.add_argument("--group", default="general10", choices=sorted(GROUPS))
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="bf16", choices=sorted(_DTYPES))
    p.add_argument("--batch", type=int, default=256, help="image features per step (the loss's rows)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--skip", nargs="*", default=[], choices=["compile", "flex"])
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    backbone, group, method = build(args)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({args.device})"
    report = {"device": device, "torch": torch.__version__,
              "setup": f"{args.arch} text tower (random init), {args.group} ({group.num_classes} classes), "
                       f"{args.precision}, batch {args.batch}, median of {args.repeats} after {args.warmup} warm-up"}
    report["prompt_assembly"], layout = bench_assembly(args, backbone, method)
    report["positions"] = layout.positions
    for name, fn in (("shared_prefix_attention", lambda: bench_attention(args, backbone, layout)),
                     ("cosine_ce", lambda: bench_loss(args, backbone, group)),
                     ("text_step", lambda: bench_step(args, backbone, group, method, layout))):
        report[name] = fn()
        print(name, json.dumps(report[name]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "kernels.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

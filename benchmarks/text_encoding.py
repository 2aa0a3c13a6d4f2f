"""The text side of a SoftCPT step, three ways side by side in one run: forward + backward of all class
features (task prompts -> meta network -> class prompts), as the official code encodes them and as
our two exact paths do.

  (a) official: every prompt padded to 77 tokens, one encoder call per task, task prompts at 77
      tokens, ``ln_final`` on all positions (a faithful re-implementation of kding1225/softcpt's
      encoding, on open_clip's own transformer);
  (b) dense: ``text.path=dense``, prompts cut after the longest EOT, one call for all classes;
  (c) shared_prefix: ``text.path=shared_prefix``, each shared prompt prefix encoded once, the rest
      packed without padding.

Each path runs in a fresh process (so its peak memory is its own): token positions per step,
forward+backward time (median of ``--repeats`` after a warm-up), the peak memory the text side
adds (peak RSS on CPU, max allocated on CUDA), and the max relative difference of the class
features and of the meta network's gradient to (a) (``max |x - a| / max |a|``).

    python benchmarks/text_encoding.py                                  # ViT-B-16 text tower, Plant-6, CPU
    python benchmarks/text_encoding.py --group general10 --repeats 1    # 1,191 classes (slow on CPU)
    python benchmarks/text_encoding.py --arch ViT-L-14 --device cuda --precision bf16 --group general10
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import softcpt_dist  # noqa: E402,F401  (torchvision shim before open_clip)
import open_clip  # noqa: E402
import torch  # noqa: E402

from group_shapes import GROUPS  # noqa: E402
from side_by_side import add_arguments, device_name, relative_difference, run_paths, worker_arguments  # noqa: E402
from softcpt_dist.config import MethodConfig, PromptConfig  # noqa: E402
from softcpt_dist.model.backbone import _DTYPES, CLIPBackbone, ensure_builtin_configs  # noqa: E402
from softcpt_dist.model.methods.softcpt import SoftCPT  # noqa: E402
from softcpt_dist.model.prompts import PLACEHOLDER  # noqa: E402

PATHS = ("official", "dense", "shared_prefix")


class OfficialEncoding:
    """kding1225/softcpt's text side: 77-token prompts, one text-encoder call per task."""

    def __init__(self, model, method: SoftCPT, group, tokenizer, prompt: PromptConfig):
        self.model, self.method = model, method
        with torch.no_grad():
            self.task = self._templates([" ".join([PLACEHOLDER] * prompt.n_task_ctx) + f" {n}." for n in
                                         group.task_names], prompt.n_task_ctx, tokenizer)
            self.classes = [self._templates([" ".join([PLACEHOLDER] * prompt.n_ctx) + f" {c}." for c in t.classnames],
                                            prompt.n_ctx, tokenizer) for t in group.tasks]
        self.positions = 77 * (len(group) + group.num_classes)

    def _templates(self, texts, n_ctx, tokenizer):
        ids = tokenizer(texts).to(self.model.positional_embedding.device)
        emb = self.model.token_embedding(ids)
        return emb[:, :1], emb[:, 1 + n_ctx:], ids.argmax(dim=-1)

    def _encode(self, template, ctx):
        prefix, suffix, eot = template
        x = torch.cat([prefix, ctx.to(prefix.dtype).expand(prefix.shape[0], -1, -1), suffix], dim=1)
        x = x + self.model.positional_embedding.to(x.dtype)
        x = self.model.transformer(x, attn_mask=self.model.attn_mask)
        x = self.model.ln_final(x)  # on all 77 positions, as the official code
        return x[torch.arange(x.shape[0]), eot] @ self.model.text_projection

    def __call__(self) -> torch.Tensor:
        task_ctx = self.method.task_ctx
        task_feat = self._encode(self.task, task_ctx.expand(len(self.task[0]), -1, -1) if task_ctx.shape[0] == 1
                                 else task_ctx).float()
        ctx = self.method.meta_net(task_feat)
        return torch.cat([self._encode(t, ctx[i:i + 1]) for i, t in enumerate(self.classes)])


def _peak_memory(device: str) -> float:
    if device.startswith("cuda"):
        return float(torch.cuda.max_memory_allocated())
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def _current_memory(device: str) -> float:
    if device.startswith("cuda"):
        return float(torch.cuda.memory_allocated())
    with open("/proc/self/statm") as f:
        return float(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))


def worker(args) -> None:
    """One path: build the same model and SoftCPT (seeded), time forward + backward, save the outputs."""
    ensure_builtin_configs()
    torch.manual_seed(0)
    model = open_clip.create_model(args.arch, pretrained=None, precision="fp32", device="cpu")
    model = model.to(device=args.device, dtype=_DTYPES[args.precision]).eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(args.arch)
    backbone = CLIPBackbone(model, tokenizer, args.arch, None,
                            text_path="dense" if args.worker == "official" else args.worker)
    group, prompt = GROUPS[args.group](), PromptConfig()
    torch.manual_seed(1)
    method = SoftCPT(backbone, group, prompt, MethodConfig(variant="NATA")).to(args.device)
    if args.worker == "official":
        encode = OfficialEncoding(model, method, group, tokenizer, prompt)
        positions = encode.positions
    else:
        encode = method
        enc = backbone.text_encoder
        task_batch = method.task_prompts(method.task_ctx)
        ctx, owner = method.context_groups()
        class_batch = method.class_prompts(ctx.detach(), owner)
        if args.worker == "dense":
            positions = sum(len(b) * int(b.length.max()) for b in (task_batch, class_batch))
        else:
            positions = enc.layout(task_batch).positions + enc.layout(class_batch).positions
    weights = torch.randn(group.num_classes, backbone.embed_dim, generator=torch.Generator().manual_seed(2))
    weights = weights.to(args.device)

    def step():
        method.zero_grad(set_to_none=True)
        features = encode()
        (features.float() * weights).sum().backward()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return features

    step()  # warm-up (and the layouts' one-time build)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    before = _current_memory(args.device)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        features = step()
        times.append(time.perf_counter() - t0)
    peak = _peak_memory(args.device) - before
    torch.save({"features": features.detach().float().cpu(), "grad": method.meta_net.net.weight.grad.float().cpu()},
               args.out)
    print(json.dumps({"positions": positions, "median_s": statistics.median(times), "min_s": min(times),
                      "max_s": max(times), "peak_bytes": peak}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, PATHS, GROUPS, _DTYPES)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    results, outputs = run_paths(__file__, args.paths, worker_arguments(args))
    if not results:
        return 1
    ref = next(iter(results))
    device = device_name(args.device)
    print(f"{args.arch} text tower, random init, {args.group} shape, {args.precision}, {device}, torch "
          f"{torch.__version__}; forward+backward of all class features, median of {args.repeats} after a warm-up")
    print(f"{'path':<15} {'positions':>10} {'time (s)':>10} {'speed-up':>9} {'peak MiB':>9} "
          f"{'feat rel diff':>14} {'grad rel diff':>14}   (speed-up and differences against {ref})")
    for path, r in results.items():
        diff = {k: relative_difference(outputs[path][k], outputs[ref][k])
                for k in ("features", "grad")}
        speed = results[ref]["median_s"] / r["median_s"]
        print(f"{path:<15} {r['positions']:>10,} {r['median_s']:>10.3f} {speed:>8.1f}x {r['peak_bytes'] / 2**20:>9.1f} "
              f"{diff['features']:>14.2e} {diff['grad']:>14.2e}")
    if {"dense", "shared_prefix"} <= set(results):
        print(f"shared_prefix vs dense: {results['dense']['median_s'] / results['shared_prefix']['median_s']:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

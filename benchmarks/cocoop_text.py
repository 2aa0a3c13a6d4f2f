"""CoCoOp's text side, side by side in one run: forward + backward of every image's class prompts for a batch
of images per task, as the official code encodes them and as our exact paths do.

  (a) official: KaiyangZhou/CoOp ``trainers/cocoop.py``'s encoding -- for each image, its class prompts
      ``[SOS] (ctx + π(x)) <class> . [EOS]`` padded to 77 tokens through the text transformer, one pass per image
      (here each image's backward follows its forward, which gives the same gradients as one backward of the
      batch's summed loss and keeps the memory of one image);
  (b) dense: ``text.path=dense``, all images' prompts of a task in one call, cut after the longest EOT;
  (c) shared_prefix: ``text.path=shared_prefix``, each image's ``[SOS] + context`` prefix encoded once and the
      class suffixes packed without padding, all images of a task in one call.

CoCoOp trains each task on its own: a step is ``--images`` images of one task against that task's classes; the
figures are the sum over the group's tasks. Each path runs in a fresh process: token positions, forward +
backward time (median of ``--repeats`` after a warm-up), the peak memory the text side adds, and the max
relative difference of the class features and of the gradients of the context and of the meta networks'
first layer to (a).

    python benchmarks/cocoop_text.py                                   # ViT-B-16 text tower, Plant-6, 32 images, CPU
    python benchmarks/cocoop_text.py --paths official shared_prefix --repeats 1
    python benchmarks/cocoop_text.py --arch ViT-L-14 --device cuda --precision bf16
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
import torch.nn.functional as F  # noqa: E402

from group_shapes import GROUPS  # noqa: E402
from side_by_side import add_arguments, device_name, relative_difference, run_paths, worker_arguments  # noqa: E402
from softcpt_dist.config import MethodConfig, PromptConfig  # noqa: E402
from softcpt_dist.model.backbone import _DTYPES, CLIPBackbone, ensure_builtin_configs  # noqa: E402
from softcpt_dist.model.methods.cocoop import COCOOP_INIT, CoCoOp  # noqa: E402
from text_encoding import _current_memory, _peak_memory  # noqa: E402

PATHS = ("official", "dense", "shared_prefix")


class OfficialCoCoOp:
    """The official per-image encoding of one task's class prompts (77 tokens each)."""

    def __init__(self, model, method: CoCoOp, classnames, tokenizer, task: int):
        self.model, self.method, self.task = model, method, task
        ids = tokenizer([f"{COCOOP_INIT} {c}." for c in classnames]).to(model.positional_embedding.device)
        with torch.no_grad():
            emb = model.token_embedding(ids)
        self.prefix, self.suffix, self.eot = emb[:, :1], emb[:, 1 + method.n_ctx:], ids.argmax(dim=-1)

    def image(self, feature: torch.Tensor) -> torch.Tensor:
        """Class features ``[C_t, E]`` of one image."""
        x = F.normalize(feature.float(), dim=-1)
        ctx = self.method.ctx[self.task] + self.method.meta_nets[self.task](x)
        n = self.prefix.shape[0]
        x = torch.cat([self.prefix, ctx.to(self.prefix.dtype).unsqueeze(0).expand(n, -1, -1), self.suffix], dim=1)
        x = x + self.model.positional_embedding.to(x.dtype)
        x = self.model.transformer(x, attn_mask=self.model.attn_mask)
        x = self.model.ln_final(x)
        return x[torch.arange(n), self.eot] @ self.model.text_projection


def worker(args) -> None:
    ensure_builtin_configs()
    torch.manual_seed(0)
    model = open_clip.create_model(args.arch, pretrained=None, precision="fp32", device="cpu")
    model = model.to(device=args.device, dtype=_DTYPES[args.precision]).eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(args.arch)
    backbone = CLIPBackbone(model, tokenizer, args.arch, None,
                            text_path="dense" if args.worker == "official" else args.worker)
    group = GROUPS[args.group]()
    torch.manual_seed(1)
    method = CoCoOp(backbone, group, PromptConfig(n_ctx=4), MethodConfig(name="cocoop")).to(args.device)
    gen = torch.Generator().manual_seed(2)
    images = [torch.randn(args.images, backbone.embed_dim, generator=gen).to(args.device) for _ in group.tasks]
    weights = [torch.randn(args.images, t.num_classes, backbone.embed_dim, generator=gen).to(args.device)
               for t in group.tasks]
    classes = [torch.arange(o, o + t.num_classes, device=args.device) for o, t in zip(group.offsets, group.tasks)]
    official = [OfficialCoCoOp(model, method, t.classnames, tokenizer, i) for i, t in enumerate(group.tasks)]

    def step():
        method.zero_grad(set_to_none=True)
        features = []
        for t in range(len(group)):
            if args.worker == "official":
                for b in range(args.images):
                    f = official[t].image(images[t][b])
                    (f.float() * weights[t][b]).sum().backward()
                    features.append(f.detach())
            else:
                f = method(classes[t], images[t])
                (f.float() * weights[t]).sum().backward()
                features.append(f.detach().reshape(-1, f.shape[-1]))
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return torch.cat(features)

    step()  # warm-up (and the layouts' one-time build)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    before = _current_memory(args.device)
    counted = backbone.text_encoder.positions_encoded
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        features = step()
        times.append(time.perf_counter() - t0)
    peak = _peak_memory(args.device) - before
    positions = args.images * group.num_classes * 77 if args.worker == "official" \
        else (backbone.text_encoder.positions_encoded - counted) // args.repeats
    torch.save({"features": features.float().cpu(), "ctx_grad": method.ctx.grad.float().cpu(),
                "meta_grad": torch.cat([n.linear1.weight.grad.float().cpu().flatten() for n in method.meta_nets])},
               args.out)
    print(json.dumps({"positions": positions, "median_s": statistics.median(times), "min_s": min(times),
                      "max_s": max(times), "peak_bytes": peak}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, PATHS, GROUPS, _DTYPES)
    p.add_argument("--images", type=int, default=32, help="images per task (the batch of a per-task step)")
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    results, outputs = run_paths(__file__, args.paths, worker_arguments(args, "--images", str(args.images)))
    if not results:
        return 1
    ref = next(iter(results))
    device = device_name(args.device)
    print(f"CoCoOp, {args.arch} text tower, random init, {args.group} shape, {args.images} images per task, "
          f"{args.precision}, {device}, torch {torch.__version__}; forward+backward of every image's class prompts, "
          f"all tasks, median of {args.repeats} after a warm-up")
    print(f"{'path':<15} {'positions':>10} {'time (s)':>10} {'speed-up':>9} {'peak MiB':>9} {'feat rel diff':>14} "
          f"{'ctx grad diff':>14} {'meta grad diff':>15}   (against {ref})")
    for path, r in results.items():
        diff = {k: relative_difference(outputs[path][k], outputs[ref][k])
                for k in ("features", "ctx_grad", "meta_grad")}
        speed = results[ref]["median_s"] / r["median_s"]
        print(f"{path:<15} {r['positions']:>10,} {r['median_s']:>10.3f} {speed:>8.1f}x {r['peak_bytes'] / 2**20:>9.1f} "
              f"{diff['features']:>14.2e} {diff['ctx_grad']:>14.2e} {diff['meta_grad']:>15.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

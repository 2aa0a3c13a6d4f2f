"""Command line: ``softcpt-dist train|eval|interpret|sweep|report|profile|scaling|pretrain-micro|data|setup|kernels``,
with ``--config`` files and ``key=value`` overrides.

Exit codes: 0 success; 1 ``data check`` found problems, training stopped on a non-finite loss, or a
file could not be written (a full disk; the message names the file); 2 a bad config, data, weights or
checkpoint, or a run folder another live run holds (the message names it), or runs ``report`` cannot
read, or a kernel launch failed ``kernels check``; 75 stopped by a stop signal (``train.stop_signals``, default SIGUSR1/SIGTERM) after saving a
checkpoint (requeue and resume with ``train.resume=latest``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

from softcpt_dist.config import ConfigError, load_config
from softcpt_dist.files import WriteError
from softcpt_dist.training.run_dir import setup_console_logging

logger = logging.getLogger("softcpt_dist")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="softcpt-dist", description=__doc__)
    # The deepspeed launcher passes --local_rank=N to every rank; the environment has the same information.
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train (or fit / evaluate) one experiment")
    tr.add_argument("--config", nargs="*", default=[], help="YAML files, merged in order")
    tr.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.epochs=5")
    ev = sub.add_parser("eval", help="evaluate a finished run or a checkpoint")
    # --run-dir: under torchrun, `--run` would be taken for an abbreviation of torchrun's --run-path.
    ev.add_argument("--run", "--run-dir", dest="run", type=Path,
                    help="run folder (its config.yaml and prompt_checkpoint.pt); use --run-dir under torchrun")
    ev.add_argument("--config", nargs="*", default=[], help="YAML files (without --run)")
    ev.add_argument("--checkpoint", type=Path, help="prompt checkpoint (default: the run's)")
    ev.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.eval_split=val")
    it = sub.add_parser("interpret", help="the nearest vocabulary words of a run's learned and generated contexts")
    it.add_argument("--run", "--run-dir", dest="run", type=Path, required=True,
                    help="run folder (its config.yaml and prompt_checkpoint.pt); prompt_words.json/.md go there")
    it.add_argument("--checkpoint", type=Path, help="prompt checkpoint (default: the run's)")
    it.add_argument("--topk", type=int, default=5, help="nearest tokens per context vector (default 5)")
    it.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.pretrained=/weights/RN50.pt")
    pm = sub.add_parser("pretrain-micro", help="pre-train the micro CLIP on the generated world (cached; reused)")
    pm.add_argument("--config", nargs="*", default=[], help="YAML files (model.arch, model.micro.*)")
    pm.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.micro.steps=1000")
    sub.add_parser("setup", help="build DeepSpeed's JIT ops for this machine now (else built on first use)")
    sw = sub.add_parser("sweep", help="list a sweep file's runs, or run one of them (a job-array task)")
    sw.add_argument("file", type=Path, help="sweep file (see softcpt_dist/sweep.py)")
    sw.add_argument("--index", type=int, help="run this run (default $SLURM_ARRAY_TASK_ID) unless it finished")
    sw.add_argument("--list", action="store_true", help="list the runs and their states (the default)")
    sw.add_argument("--count", action="store_true", help="print the number of runs (for sbatch --array)")
    sw.add_argument("--all", action="store_true", help="run every unfinished run, one after another, in this process")
    sw.add_argument("extra", nargs="*", help="key=value overrides added to every run, before any --index")
    rep = sub.add_parser("report", help="the paper's tables (mean ± std over seeds) from finished runs")
    rep.add_argument("runs", nargs="+", type=Path, help="run folders, or folders to search for them")
    rep.add_argument("--out", type=Path, help="write report.md and report.csv (and report.tex) here")
    rep.add_argument("--latex", action="store_true", help="also write report.tex")
    rep.add_argument("--digits", type=int, default=2)
    rep.add_argument("--spread", choices=["sample", "population", "ci95"], default="sample",
                     help="after ±: sample std (default), population std or the 95%% interval half-width "
                          "1.96·population std/√n (the official parser's --ci95)")
    pr = sub.add_parser("profile", help="time training steps: split, samples/s, FLOPs, MFU, memory")
    pr.add_argument("--config", nargs="*", default=[], help="YAML files, merged in order")
    pr.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    pr.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    pr.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s for MFU (default: device table)")
    pr.add_argument("--trace", action="store_true", help="also write a Chrome trace per rank (torch.profiler)")
    pr.add_argument("--out", type=Path, help="profile folder (default <train.output_dir>/profile-<...>-<time>)")
    pr.add_argument("--link-gb-s", type=float, help="cost model: per-rank interconnect bandwidth, GB/s")
    pr.add_argument("--link-latency-us", type=float, help="cost model: per-hop latency, us")
    pr.add_argument("--link-ranks-per-node", type=int, default=8,
                    help="cost model, with --link-gb-s: ranks a node (tree all-reduces across nodes; 0: rings only)")
    pr.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.arch=ViT-L-14")
    _scaling_parser(sub)
    da = sub.add_parser("data", help="dataset utilities")
    da_sub = da.add_subparsers(dest="data_command", required=True)
    gen = da_sub.add_parser("generate", help="write the built-in synthetic dataset")
    gen.add_argument("--root", type=Path, default=Path("data/synthetic"))
    chk = da_sub.add_parser("check", help="validate a data root against a config: counts per task, problems")
    chk.add_argument("--config", nargs="*", default=[], help="YAML files, merged in order")
    chk.add_argument("--no-decode", action="store_true", help="only check that listed images exist")
    chk.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.root=/datasets")
    _kernels_parser(sub)
    return p


def _kernels_parser(sub) -> None:
    from softcpt_dist.kernels.compile_check import DTYPES, TARGETS
    ke = sub.add_parser("kernels", help="the Triton kernels: compile every launch for GPU targets, without a GPU")
    ke_sub = ke.add_subparsers(dest="kernels_command", required=True)
    kc = ke_sub.add_parser("check", help="compile each launch the dispatchers make for sm_80/86/89/90/100; "
                                         "registers, spills, shared memory against each target's limits")
    kc.add_argument("--targets", nargs="+", type=int, default=list(TARGETS), help="compute capabilities")
    kc.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    kc.add_argument("--bounding", action="store_true",
                    help="only the launches that bound each kernel's resources (what CI compiles)")
    kc.add_argument("--jobs", type=int, default=0, help="compiling processes (default: one per CPU)")
    kc.add_argument("--out", type=Path, help="also write kernels_check.md and kernels_check.json here")


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    for option in ("config", "ranks"):
        if hasattr(args, option):
            # `--config a.yaml b.yaml key=value`: argparse hands every token to --config; split them.
            given = getattr(args, option)
            args.overrides = [c for c in given if "=" in c] + list(args.overrides)
            setattr(args, option, [c for c in given if "=" not in c])
    setup_console_logging()
    from softcpt_dist.training.signals import EXIT_PREEMPTED, Preempted
    try:
        return _dispatch(args)
    except Preempted as err:
        logger.warning("%s; exiting with code %d (requeue and rerun with train.resume=latest)", err, EXIT_PREEMPTED)
        return EXIT_PREEMPTED
    except (FloatingPointError, WriteError) as err:
        logger.error("%s", err)
        return 1
    except (ConfigError, FileNotFoundError) as err:
        logger.error("%s", err)
        return 2
    except Exception as err:  # errors about data, weights, checkpoints or the run folder name the culprit
        from softcpt_dist.data.tasks import DataError
        from softcpt_dist.model.weights import WeightsError
        from softcpt_dist.training.checkpoint import CheckpointError
        from softcpt_dist.training.engine import StaleBuildLock
        from softcpt_dist.training.run_lock import RunFolderBusy
        if isinstance(err, (CheckpointError, WeightsError, DataError, RunFolderBusy, StaleBuildLock)):
            logger.error("%s", err)
            return 1 if isinstance(err, StaleBuildLock) else 2
        raise


def _dispatch(args) -> int:
    if args.command == "train":
        from softcpt_dist.training import run
        run(load_config(args.config, args.overrides))
        return 0
    if args.command == "eval":
        from softcpt_dist.training import run_eval
        from softcpt_dist.training.checkpoint import CHECKPOINT_NAME
        if args.run is not None:
            cfg_file = args.run / "config.yaml"
            if not cfg_file.is_file():
                raise ConfigError(f"run folder {args.run} has no config.yaml")
            # A run's saved config.yaml is an ordinary config file; overrides go on top.
            cfg = load_config([cfg_file], args.overrides)
            checkpoint = args.checkpoint or args.run / CHECKPOINT_NAME
        else:
            cfg = load_config(args.config, args.overrides)
            checkpoint = args.checkpoint
        run_eval(cfg, checkpoint, out_dir=args.run)
        return 0
    if args.command == "interpret":
        from softcpt_dist.training.checkpoint import CHECKPOINT_NAME
        from softcpt_dist.training.interpret import interpret_run, write_words
        if not (args.run / "config.yaml").is_file():
            raise ConfigError(f"run folder {args.run} has no config.yaml")
        cfg = load_config([args.run / "config.yaml"], args.overrides)
        words = interpret_run(cfg, args.checkpoint or args.run / CHECKPOINT_NAME, args.topk)
        print(write_words(words, args.run, f"Learned prompts of {args.run}"), end="")
        return 0
    if args.command == "sweep":
        return _sweep(args)
    if args.command == "report":
        from softcpt_dist.report import ReportError, write_report
        try:
            print(write_report(args.runs, args.out, args.latex, args.digits, args.spread), end="")
        except ReportError as err:
            raise ConfigError(str(err)) from None
        return 0
    if args.command == "profile":
        return _profile(args)
    if args.command == "scaling":
        from softcpt_dist.profiling.scaling_study import main as scaling_main
        return scaling_main(args)
    if args.command == "pretrain-micro":
        from softcpt_dist.micro.pretrain import micro_clip
        implied = [] if args.config or any(o.startswith("model.arch=") for o in args.overrides) \
            else ["model.arch=softcpt-micro"]
        cfg = load_config(args.config, implied + list(args.overrides))
        print(micro_clip(cfg.model.arch, cfg.model.micro, cfg.train.progress))
        return 0
    if args.command == "setup":
        from softcpt_dist.training.engine import prebuild_ops
        built = prebuild_ops()
        print("\n".join(f"built {name} in {where}" for name, where in built.items()) or "nothing to build here")
        return 0
    if args.command == "data" and args.data_command == "check":
        from softcpt_dist.data.check import check_data
        cfg = load_config(args.config, args.overrides)
        report = check_data(cfg.data, cfg.train.seed, decode=not args.no_decode, eval_split=cfg.train.eval_split)
        print(report.text())
        return 1 if report.problems else 0
    if args.command == "kernels":
        return _kernels_check(args)
    if args.command == "data" and args.data_command == "generate":
        from softcpt_dist.config import SyntheticDataConfig
        from softcpt_dist.data.synthetic import generate_synthetic
        generate_synthetic(args.root, SyntheticDataConfig())
        return 0
    raise ConfigError(f"unknown command {args.command}")


def _scaling_parser(sub) -> None:
    sc = sub.add_parser("scaling", help="profiles over world sizes (and models, class counts): CSV and plots")
    sc_sub = sc.add_subparsers(dest="scaling_command", required=True)
    run = sc_sub.add_parser("run", help="run `profile` at each world size and setting, then collect")
    run.add_argument("--config", nargs="*", default=[], help="YAML files, merged in order")
    run.add_argument("--ranks", nargs="+", default=["1", "2"], help="world sizes (default 1 2)")
    run.add_argument("--mode", choices=["strong", "weak", "both"], default="strong",
                     help="strong: same global batch at every world size; weak: the same batch per rank")
    run.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2",
                     help="also vary a config key (model sizes, class counts); repeatable, all combinations")
    run.add_argument("--launcher", choices=["auto", "torchrun", "srun"], default="auto",
                     help="auto: srun inside a SLURM allocation, else torchrun on this machine")
    run.add_argument("--gpus-per-node", type=int, help="srun: ranks per node (default $SLURM_NTASKS_PER_NODE)")
    run.add_argument("--warmup", type=int, default=3)
    run.add_argument("--steps", type=int, default=10)
    run.add_argument("--peak-tflops", type=float)
    run.add_argument("--out", type=Path, required=True, help="study folder: a profile folder per point, CSV, PNGs")
    run.add_argument("overrides", nargs="*", help="key=value overrides for every point")
    col = sc_sub.add_parser("collect", help="CSV and plots from profile folders that exist")
    col.add_argument("profiles", nargs="+", type=Path, help="profile folders, or folders to search for them")
    col.add_argument("--out", type=Path, required=True, help="where scaling.csv and the PNGs go")


def _profile(args) -> int:
    from softcpt_dist.profiling.step_profile import ProfileSettings, run_profile
    from softcpt_dist.profiling.summary import markdown
    from softcpt_dist.scaling import Link
    link = None
    if args.link_gb_s is not None or args.link_latency_us is not None:
        if args.link_gb_s is None or args.link_latency_us is None:
            raise ConfigError("profile: give both --link-gb-s and --link-latency-us (or neither)")
        link = Link(args.link_gb_s, args.link_latency_us, args.link_ranks_per_node)
    cfg = load_config(args.config, args.overrides)
    record = run_profile(cfg, ProfileSettings(args.warmup, args.steps, args.peak_tflops, args.trace, args.out, link))
    from softcpt_dist.distributed import rank
    if rank() == 0:
        print(markdown(record), end="")
    return 0


def _kernels_check(args) -> int:
    from softcpt_dist.kernels import compile_check as check
    from softcpt_dist.files import atomic_write_text
    targets, unknown = check.known_targets(args.targets)
    for target in unknown:
        logger.warning("kernels check: this Triton cannot compile for sm_%d: skipped", target)
    results = check.run_check(targets, args.dtypes, args.bounding, args.jobs)
    table, summary = check.markdown(results), check.summary(results)
    print(table + "\n" + summary)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / "kernels_check.md", table + "\n" + summary + "\n")
        atomic_write_text(args.out / "kernels_check.json", json.dumps(check.as_dicts(results), indent=1) + "\n")
    return 1 if any(r.problems for r in results) else 0


def _sweep(args) -> int:
    from softcpt_dist.sweep import listing, load_sweep
    sweep = load_sweep(args.file)
    if args.count:
        print(len(sweep.runs))
        return 0
    if args.all:
        from softcpt_dist.training.signals import EXIT_PREEMPTED
        codes = []
        for run in sweep.runs:
            codes.append(_sweep_run(sweep, run, args.extra))
            if codes[-1] == EXIT_PREEMPTED:  # a stop signal stops the sweep too (rerun --all to go on)
                return EXIT_PREEMPTED
        print(listing(sweep))
        return 1 if any(codes) else 0
    index = args.index if args.index is not None else os.environ.get("SLURM_ARRAY_TASK_ID")
    if index is None or args.list:
        print(listing(sweep))
        return 0
    if not 0 <= int(index) < len(sweep.runs):
        raise ConfigError(f"sweep {args.file}: index {index} is outside 0..{len(sweep.runs) - 1}")
    return _sweep_run(sweep, sweep.runs[int(index)], args.extra)


def _sweep_run(sweep, run, extra: List[str]) -> int:
    """Run one run of ``sweep`` unless it finished; record its exit code beside the run folders."""
    from softcpt_dist.files import atomic_write_text
    if sweep.state(run) == "finished":
        logger.info("sweep run %d (%s) finished already: skipped", run.index, run.name)
        return 0
    logger.info("sweep run %d of %d: %s", run.index, len(sweep.runs), run.name)
    rc = main(["train", "--config", *sweep.configs, *run.overrides, *extra])
    from softcpt_dist.distributed import world_info_from_env
    if world_info_from_env().rank == 0:  # failed runs are listed by --list from this record
        status = sweep.status_file(run)
        status.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(status, json.dumps({"index": run.index, "rc": rc, "time": time.time()}) + "\n")
    return rc


def entry() -> None:
    """Console-script / ``python -m`` entry: run, leave the process group, and exit without the
    interpreter's teardown: threads of the communication libraries (gloo, DeepSpeed's shared-memory op)
    can abort it ("terminate called without an active exception"), which would turn a finished job's
    exit code into a crash. Everything the run writes is written and closed by then."""
    rc = main()
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    entry()

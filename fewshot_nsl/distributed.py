"""Data-parallel base-class pretraining with ``torchrun`` (DDP; NCCL on GPUs, gloo on CPU).

    torchrun --standalone --nproc_per_node 4 -m fewshot_nsl.distributed pretrain \\
        --method dynamic_nsn --backbone cnn9 --profile paper
    python run_benchmarks.py --method dynamic_nsn --backbone cnn9 --profile paper   # reuses it

Every process resolves the same config as ``run_benchmarks.py`` would from the same flags,
walks the same seeded sequence of global batches and trains on its contiguous slice of each
(:func:`fewshot_nsl.training.pretrain` with ``distributed=True``): the augmentation is drawn
for the whole batch and sliced, and the loss is scaled so that DDP's gradient average equals
the full-batch gradient. Rank 0 writes the pretraining cache entry, under the same key a
single-process run uses, so the next ``run_benchmarks.py`` run (any executor) picks it up; the
cache entry and every leaderboard row record the world size (``pretrain_world_size``).

BatchNorm: on GPUs the BN layers become ``SyncBatchNorm``, so batch statistics are over the
global batch and a step equals the single-process full-batch step (up to float summation
order). ``SyncBatchNorm`` does not run on CPU, so with gloo each process normalises with the
statistics of its own slice (like most multi-GPU ImageNet training); the update then equals
the full-batch one exactly only for models without batch-dependent layers, which is what the
test checks (``tests/test_ddp.py``, a BN-free backbone), and it is documented as such.

Each process is set up as a single-process run sets itself up before building the network
(:func:`fewshot_nsl.process_setup.build_for_device`: seed, ``--deterministic`` / TF32 / cuDNN switches,
channels-last, ``compile``), so the cached weights do not depend on the entry point that trained them.

Resume: a multi-process pretraining keeps no ``.partial`` checkpoint (only a single-process one does, at
every epoch end), so a killed ``--nproc-per-node`` N > 1 pretraining starts again from the beginning when the
command is run again; a finished one is cached and reused.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

USAGE = ("python -m fewshot_nsl.distributed launch --nproc-per-node N [flags]  (or: torchrun --nproc_per_node N "
         "-m fewshot_nsl.distributed pretrain [flags])")


def pretrain_main(argv: List[str]) -> int:
    """Entry point of one torchrun process; returns the exit status."""
    import torch
    import torch.distributed as dist

    from . import training
    from .cli import build_parser, overrides_of
    from .console import show_progress
    from .config import resolve_config
    from .data.store import default_cache_dir
    from .errors import ConfigError, FewShotError
    from .host_memory import retain_freed_memory
    from .process_setup import build_for_device
    from .registry import load_plugins
    from .runner import conv_spec_of, load_store, stages_of

    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    log = print if rank == 0 else (lambda *a, **k: None)
    initialised = False
    try:
        if "RANK" not in os.environ:
            raise ConfigError(f"run this under torchrun: {USAGE}")
        if args.threads is not None:
            if args.threads < 1:
                raise ConfigError(f"--threads must be at least 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        retain_freed_memory()  # as a run does (host_memory.py)
        load_plugins([Path(d) for d in args.plugins])
        if args.method and "," in args.method or args.shots and len(args.shots) > 1 or args.backbone and "," in args.backbone:
            raise ConfigError("distributed pretraining takes one --method, --backbone and --shots")
        cfg = resolve_config(overrides_of(args, args.method or None), args.config)
        if "pretrain" not in stages_of(cfg):
            raise ConfigError(f"method {cfg.method} has no pretraining stage; pick a method that pretrains "
                              f"(its [stages] are shown by --list)")
        use_cuda = cfg.device != "cpu" and torch.cuda.is_available()
        if cfg.device.startswith("cuda") and not use_cuda:
            raise ConfigError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
        if use_cuda:
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        dist.init_process_group("nccl" if use_cuda else "gloo")
        initialised = True
        if rank == 0:  # build the dataset cache once, then the others read it
            store = load_store(cfg)
        dist.barrier()
        if rank != 0:
            store = load_store(cfg)
        built = build_for_device(cfg, device, log=log)  # as a single-process run: seed, TF32/cuDNN, compile
        cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        log(f"pretraining {cfg.backbone} for {cfg.method} on {store.name} with {world} process(es) "
            f"({'NCCL, SyncBatchNorm' if use_cuda else 'gloo on CPU, per-process BatchNorm statistics'})")
        if world > 1:
            log("note: a multi-process pretraining keeps no checkpoint; if it is killed, running the command again "
                "starts it from the beginning")
        info = training.pretrain(built.method, store, cfg, device, conv_spec_of(cfg), cache,
                                 progress=show_progress(args.progress, args.quiet), distributed=True,
                                 compiled=built.compiled)
        state = "already cached" if info["cached"] else f"trained, base-class train accuracy {100 * info['train_accuracy']:.1f}%"
        log(f"pretraining {state}: {info['cache_path']}")
        log("fewshot-nsl (or run_benchmarks.py) with the same flags (and cache dir) reuses it")
        return 0
    except FewShotError as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if initialised:
            dist.destroy_process_group()


def launch_main(argv: List[str]) -> int:
    """``python -m fewshot_nsl.distributed launch --nproc-per-node N [flags]``: torchrun's launcher
    (standalone rendezvous) started from this process, after the flags and the dataset are checked
    here, so a bad input is one ``error:`` line before any worker starts, and a worker that fails
    is one line too (plain ``torchrun`` prints its own traceback for a failed worker)."""
    from .cli import build_parser, overrides_of
    from .config import resolve_config
    from .errors import ConfigError, FewShotError
    from .registry import load_plugins
    from .runner import load_store, stages_of

    try:
        if "--nproc-per-node" not in argv:
            raise ConfigError(f"launch needs --nproc-per-node N; usage: {USAGE}")
        i = argv.index("--nproc-per-node")
        try:
            nproc = int(argv[i + 1])
        except (IndexError, ValueError):
            raise ConfigError("--nproc-per-node needs a whole number of processes, e.g. 2") from None
        if nproc < 1:
            raise ConfigError(f"--nproc-per-node must be at least 1, got {nproc}")
        rest = argv[:i] + argv[i + 2:]
        args = build_parser().parse_args(rest)
        load_plugins([Path(d) for d in args.plugins])
        cfg = resolve_config(overrides_of(args, args.method or None), args.config)
        if "pretrain" not in stages_of(cfg):
            raise ConfigError(f"method {cfg.method} has no pretraining stage; pick a method that pretrains "
                              f"(its [stages] are shown by --list)")
        load_store(cfg)  # a bad dataset fails here, once; the workers then read the cache
    except FewShotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was trained yet", file=sys.stderr)
        return 130
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(["--standalone", "--nproc_per_node", str(nproc), "-m", "fewshot_nsl.distributed", "pretrain",
                        *rest]))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        print(f"error: distributed pretraining failed: rank {rank} exited with status {failure.exitcode} "
              f"(its message is above); rerun after fixing it (a finished pretraining is cached)", file=sys.stderr)
        return 2 if failure.exitcode == 2 else 1
    except KeyboardInterrupt:
        if nproc > 1:  # training.py writes no .partial checkpoint when world > 1
            print(f"interrupted: a {nproc}-process pretraining keeps no checkpoint; running the same command again "
                  f"starts it from the beginning", file=sys.stderr)
        else:
            print("interrupted: a one-process pretraining checkpoints every finished epoch; run the same command "
                  "again to resume from the last one", file=sys.stderr)
        return 130
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("pretrain", "launch"):
        print(f"usage: {USAGE}", file=sys.stderr)
        return 2
    if argv[0] == "launch":
        return launch_main(argv[1:])
    return pretrain_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())

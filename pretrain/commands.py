"""`proseco train|sample ...`: the commands that run models."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from pretrain.config import load_config, split_config_args
from pretrain.errors import UserError

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: checkpointed on a signal; run the same command to resume


def writable_output(path: str | Path, flag: str) -> Path:
    """`path` as a file this process can write, checked before the work that ends in writing it
    (sampling, loading a large checkpoint) rather than after. Nothing is created: the writer
    makes the missing folders, so the nearest existing one must be a writable folder."""
    out = Path(path)
    if out.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name")
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{flag} {path}: {folder} is a file, not a folder; give a path in a folder you can write to")
    if not os.access(folder, os.W_OK):
        raise UserError(f"{flag} {path}: {folder} is not writable; give a path in a folder you can write to")
    return out


def prompt_ids(tokenizer, text: str, seq_len: int) -> list[int]:
    """BOS + the prompt's tokens, checked to leave room to generate in a sequence of `seq_len`."""
    ids = [tokenizer.bos_id, *tokenizer.encode(text)]
    if len(ids) >= seq_len:
        raise UserError(f"--prompt is {len(ids) - 1} tokens (plus BOS) but the model's sequences are {seq_len} "
                        f"tokens (model.seq_len), leaving nothing to generate; shorten it to at most "
                        f"{seq_len - 2} tokens")
    return ids


def _train(args: argparse.Namespace) -> int:
    """Train (or resume), then on rank 0 write the sample report of a run that finished."""
    from parallel.env import detect_launch, pick_device
    from pretrain.report import write_sample_report
    from pretrain.train import train

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(*split_config_args(args.config, args.overrides))
    result = train(cfg)
    launch = detect_launch()
    # The process group is gone by now: rank 0 samples alone from the final checkpoint while the
    # other ranks exit.
    if not result.get("preempted") and cfg.sampling.num_samples > 0 and launch.rank == 0:
        write_sample_report(Path(cfg.logging.run_dir), pick_device(cfg.train.device, launch.local_rank))
    if result and args.print_result:
        print(json.dumps(result))
    return PREEMPTED_EXIT_CODE if result.get("preempted") else 0


def _sampling_overrides(args: argparse.Namespace) -> dict:
    """The sampler flags the user gave, as SamplingConfig fields."""
    names = ("steps", "batch_size", "nucleus_p", "corrector_steps", "corrector_every", "corrector_start_iter",
             "corrector_sampling", "corrector_top_k", "corrector_prior", "block_length", "temperature", "seed",
             "unmasking", "nucleus_cache", "guidance")
    chosen = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.sample_class is not None:
        chosen["label"] = args.sample_class
    if args.no_cache:
        chosen["use_cache"] = False
    if args.float32:
        chosen["float64"] = False
    if args.denoise_final:
        chosen["denoise_final"] = True
    if args.early_eos_stop:
        chosen["early_eos_stop"] = True
    return chosen


def _grid_sampling_overrides(args: argparse.Namespace) -> dict:
    """The sampler flags of `eval` and `sweep` (the grid sets steps and corrector settings)."""
    chosen = {name: getattr(args, name) for name in ("nucleus_p", "unmasking", "nucleus_cache")
              if getattr(args, name) is not None}
    if getattr(args, "sample_class", None) is not None:  # sweep only
        chosen["label"] = args.sample_class
    return chosen


def _sample(args: argparse.Namespace) -> None:
    import torch
    from rich.progress import Progress

    from parallel.env import pick_device
    from pretrain.checkpoint import load_model
    from pretrain.config import validate
    from pretrain.sampler import Sampler
    from pretrain.sweep import write_samples

    writable_output(args.out, "--out")
    device = pick_device(args.device, 0)
    model, cfg, tokenizer = load_model(args.checkpoint, device, use_ema=not args.raw_weights)
    sampling = dataclasses.replace(cfg.sampling, **_sampling_overrides(args))
    cfg = dataclasses.replace(cfg, sampling=sampling)
    validate(dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, dp=-1, tp=1, pp=1)))
    prompt = torch.tensor(prompt_ids(tokenizer, args.prompt, cfg.model.seq_len)) if args.prompt else None
    sampler = Sampler.for_run(model, cfg, tokenizer, sampling, device)
    num_samples = args.num_samples or sampling.num_samples
    batches = -(-num_samples // sampling.batch_size)
    with Progress(transient=True, disable=not sys.stderr.isatty()) as bar:  # rank 0 is the only rank here
        task = bar.add_task("sampling", total=batches * sampling.steps)
        result = sampler.sample(num_samples, prompt=prompt, progress=lambda step, total, x: bar.advance(task))
    out = write_samples(args.out, [tokenizer.decode(ids) for ids in result.tokens.tolist()], result)
    print(f"wrote {num_samples} samples to {out}: mean NFE {result.nfe_total.float().mean():.1f} "
          f"(denoiser {result.nfe_denoiser.float().mean():.1f}, corrector {result.nfe_corrector.float().mean():.1f})")


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _eval(args: argparse.Namespace) -> None:
    """Validation NELBO and corrector loss of a checkpoint, plus sample quality with --samples."""
    from parallel.env import pick_device
    from pretrain.checkpoint import load_model
    from pretrain.sweep import GridPoint, run_grid, summary_markdown
    from pretrain.validation import evaluate_checkpoint

    if args.out:
        writable_output(args.out, "--out")
    device = pick_device(args.device, 0)
    result = evaluate_checkpoint(args.checkpoint, split=args.split, batches=args.batches or None, shards=args.shards,
                                 device=device, log=lambda message: print(message, file=sys.stderr, flush=True))
    if args.samples > 0:
        _, cfg, _ = load_model(args.checkpoint)
        point = GridPoint(args.steps or cfg.sampling.steps, args.corrector_steps, args.corrector_every)
        overrides = _grid_sampling_overrides(args)
        row = run_grid(args.checkpoint, [point], args.samples, batch_size=args.batch_size, seed=args.seed,
                       device=device, sampling_overrides=overrides, shards=args.shards, log=lambda m: None)[0]
        result["samples"] = {k: v for k, v in row.items() if k not in ("model", "checkpoint", "train_step")}
    flat = {k: v for k, v in result.items() if k != "samples"}
    flat.update({f"samples.{k}": v for k, v in result.get("samples", {}).items()})
    print(summary_markdown(flat), end="")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")


def _sweep(args: argparse.Namespace) -> None:
    """Quality against NFE over checkpoints x steps x corrector settings -> sweep.csv/.md/.png."""
    from parallel.env import pick_device
    from pretrain.sweep import make_grid, plot_sweep, read_rows, run_grid, write_table

    if args.merge:
        rows = [row for folder in args.merge for row in read_rows(Path(folder) / "sweep.csv")]
    else:
        if not args.checkpoint:
            raise SystemExit("proseco sweep: give --checkpoint (one or more) or --merge DIR ...")
        device = pick_device(args.device, 0)
        points = make_grid(args.steps, args.corrector_steps, args.corrector_every, args.guidance)
        overrides = _grid_sampling_overrides(args)
        labels = args.label or []
        if labels and len(labels) != len(args.checkpoint):
            raise SystemExit("proseco sweep: give one --label per --checkpoint (or none)")
        rows = []
        for i, checkpoint in enumerate(args.checkpoint):
            rows += run_grid(checkpoint, points, args.num_samples, batch_size=args.batch_size, seed=args.seed,
                             label=labels[i] if labels else None, device=device, sampling_overrides=overrides,
                             novelty=not args.no_novelty, samples_dir=Path(args.out) / "samples",
                             log=lambda m: print(m, flush=True), fcd=args.fcd)
    csv_path, md_path = write_table(rows, args.out)
    png_path = plot_sweep(rows, Path(args.out) / "sweep.png", title=args.title)
    print(md_path.read_text(), end="")
    print(f"wrote {csv_path}, {md_path}, {png_path}")


def _consolidate(args: argparse.Namespace) -> None:
    from pretrain.checkpoint import consolidate

    writable_output(args.out, "the output file")  # before loading what may be a large checkpoint
    try:
        out = consolidate(args.checkpoint, args.out)
    except OSError as err:  # a full disk, a folder that vanished: the file names itself in err
        raise UserError(f"consolidating {args.checkpoint} into {args.out} failed: {err}") from None
    print(f"wrote {out}")


def _convert_checkpoint(args: argparse.Namespace) -> None:
    from pretrain.checkpoint import resolve_checkpoint
    from pretrain.checkpoint.deepspeed import to_dcp

    source = resolve_checkpoint(args.checkpoint)
    try:
        out = to_dcp(source, args.out)
    except OSError as err:
        raise UserError(f"converting {source} into {args.out} failed: {err}") from None
    print(f"wrote {out}; resume it with either engine at any layout: proseco train CONFIG "
          f"logging.run_dir={args.out}")


def _label(args: argparse.Namespace) -> None:
    from pretrain.labeling import label_shards

    info = label_shards(args.shards, args.property, quantile=args.quantile, overwrite=args.overwrite)
    splits = ", ".join(f"{split} {s['positive']:,}/{s['samples']:,} positive ({s['invalid']:,} invalid)"
                       for split, s in info["splits"].items())
    print(f"labels/{args.property}: {info['rule']}, threshold {info['threshold']:.4g}; {splits}")


def _plan(args: argparse.Namespace) -> int:
    """Memory per rank and step time of the config's layout on --world-size devices; exit 1 when
    the busiest rank does not fit --device-memory."""
    from pretrain.plan import Assumptions, plan_config
    from pretrain.plan.report import alternatives, describe
    from pretrain.plan.timing import Links

    if args.device_memory <= args.reserve or min(args.peak_tflops, args.mfu, args.intra_node_gbs,
                                                 args.inter_node_gbs, args.devices_per_node) <= 0:
        raise UserError(f"--device-memory ({args.device_memory:g} GiB) must exceed --reserve ({args.reserve:g} GiB), "
                        "and --peak-tflops, --mfu, the link bandwidths and --devices-per-node must be positive")
    cfg = load_config(*split_config_args(args.config, args.overrides))
    links = Links(args.intra_node_gbs, args.inter_node_gbs, args.devices_per_node)
    assumptions = Assumptions(device_memory_gb=args.device_memory, reserve_gb=args.reserve,
                              peak_tflops=args.peak_tflops, mfu=args.mfu, links=links, device=args.device)
    plan = plan_config(cfg, args.world_size, assumptions)
    print(describe(plan))
    if plan.fits:
        print("fits")
        return 0
    over = plan.busiest.total / 2**30 - (args.device_memory - args.reserve)
    print(f"DOES NOT FIT: pipeline rank {plan.busiest.pp_rank} needs {over:.2f} GiB more than the "
          f"{args.device_memory - args.reserve:.1f} GiB usable; change one of:", file=sys.stderr)
    print("\n".join(alternatives(plan, args.world_size, assumptions)) or "  (no single change fits: more devices)",
          file=sys.stderr)
    return 1


def _add_plan_command(sub: argparse._SubParsersAction) -> None:
    from pretrain.plan import Assumptions

    defaults = Assumptions()
    plan = sub.add_parser("plan", help="memory per rank and step time of a layout, before any job is queued")
    plan.add_argument("config", nargs="?", help="YAML run config (omit for the defaults)")
    plan.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. parallel.tp=2")
    plan.add_argument("--world-size", type=int, required=True, help="devices the run would be launched on")
    plan.add_argument("--device-memory", type=float, required=True, help="memory of one device, GiB (80 for an H100)")
    plan.add_argument("--peak-tflops", type=float, default=defaults.peak_tflops,
                      help=f"dense peak of one device, TFLOP/s (default {defaults.peak_tflops:g}: H100 SXM bf16)")
    plan.add_argument("--mfu", type=float, default=defaults.mfu,
                      help=f"share of the peak the kernels reach (default {defaults.mfu:g})")
    plan.add_argument("--reserve", type=float, default=defaults.reserve_gb,
                      help=f"GiB of each device not for tensors: CUDA context, NCCL, fragmentation "
                           f"(default {defaults.reserve_gb:g})")
    plan.add_argument("--intra-node-gbs", type=float, default=defaults.links.intra_node,
                      help=f"GB/s per device within a node (default {defaults.links.intra_node:g}: NVLink 4)")
    plan.add_argument("--inter-node-gbs", type=float, default=defaults.links.inter_node,
                      help=f"GB/s per device between nodes (default {defaults.links.inter_node:g}: a 400 Gb/s NIC)")
    plan.add_argument("--devices-per-node", type=int, default=defaults.links.devices_per_node)
    plan.add_argument("--device", choices=["cuda", "cpu"], default=defaults.device,
                      help="where the run trains (on CPU dropout masks take the activation dtype)")
    plan.set_defaults(func=_plan)


def _add_unmasking_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--unmasking", choices=["posterior", "confidence"],
                        help="which masked positions a step unmasks: MDLM's posterior, or the most confident")
    parser.add_argument("--nucleus-cache", choices=["once", "official"],
                        help="a reused forward's distribution is filtered once, or again at every reuse (official)")


def _float_list(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def add_commands(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="pretrain a model (one process, torchrun, srun or deepspeed)")
    train.add_argument("config", help="YAML run config, e.g. configs/shakespeare.yaml (or just overrides)")
    train.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. train.max_steps=100")
    train.add_argument("--print-result", action="store_true", help="print the final validation metrics as JSON")
    train.set_defaults(func=_train)
    _add_plan_command(sub)

    sample = sub.add_parser("sample", help="draw samples with the ProSeCo sampler from a checkpoint")
    sample.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (latest checkpoint)")
    sample.add_argument("--out", required=True, help="JSONL file: one sample per line with its NFE counts")
    sample.add_argument("--num-samples", type=int, help="default: sampling.num_samples of the run")
    sample.add_argument("--steps", type=int, help="unmasking steps T")
    sample.add_argument("--batch-size", type=int)
    sample.add_argument("--nucleus-p", type=float)
    sample.add_argument("--corrector-steps", type=int, help="corrector iterations per loop S (0: plain MDLM)")
    sample.add_argument("--corrector-every", type=int, help="a corrector loop every this many steps (omega)")
    sample.add_argument("--corrector-start-iter", type=int)
    sample.add_argument("--corrector-sampling", choices=["argmax", "sample", "select_top_k"])
    sample.add_argument("--corrector-top-k", type=int)
    sample.add_argument("--corrector-prior", choices=["argmax", "sample"])
    sample.add_argument("--block-length", type=int, help="semi-autoregressive blocks of this length")
    sample.add_argument("--temperature", type=float, help="block mode: 0 = greedy")
    sample.add_argument("--early-eos-stop", action="store_true", help="block mode: a sample stops at a block "
                        "ending in EOS (as LLaDA's harness)")
    _add_unmasking_arguments(sample)
    sample.add_argument("--class", dest="sample_class", type=int, help="the class to sample (sampling.label; a model "
                        "trained with data.labels)")
    sample.add_argument("--guidance", type=float, help="classifier-free guidance scale gamma with --class "
                        "(sampling.guidance; 1 = the conditional model)")
    sample.add_argument("--prompt", help="text to condition on (kept fixed as the prefix)")
    sample.add_argument("--seed", type=int)
    sample.add_argument("--no-cache", action="store_true", help="recompute every forward (same samples, more NFE)")
    sample.add_argument("--float32", action="store_true", help="sample from float32 instead of float64 probabilities")
    sample.add_argument("--denoise-final", action="store_true", help="fill masks left after the last step")
    sample.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA")
    sample.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    sample.set_defaults(func=_sample)

    evaluate = sub.add_parser("eval", help="validation NELBO, corrector loss and (with --samples) sample quality")
    evaluate.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (latest checkpoint)")
    evaluate.add_argument("--split", default="val", help="shard split to evaluate on (default val)")
    evaluate.add_argument("--batches", type=int, default=0,
                          help="validation batches of the run's data.global_batch_size samples, as "
                               "train.eval_batches (default 0: the whole split)")
    evaluate.add_argument("--shards", help="shard folder (default: data.shards of the run's config)")
    evaluate.add_argument("--samples", type=int, default=0, help="also draw this many samples and score them")
    evaluate.add_argument("--steps", type=int, help="unmasking steps T (default: sampling.steps of the run)")
    evaluate.add_argument("--corrector-steps", type=int, default=0, help="corrector iterations per loop S")
    evaluate.add_argument("--corrector-every", type=int, default=1, help="a corrector loop every this many steps")
    evaluate.add_argument("--batch-size", type=int, help="samples generated at once (default: all)")
    evaluate.add_argument("--nucleus-p", type=float)
    _add_unmasking_arguments(evaluate)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--out", help="write the metrics as JSON here")
    evaluate.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    evaluate.set_defaults(func=_eval)

    sweep = sub.add_parser("sweep", help="sample quality against NFE over steps x corrector settings")
    sweep.add_argument("--checkpoint", action="append", help="checkpoint or run folder; repeat for more models")
    sweep.add_argument("--label", action="append", help="model name in the table, one per --checkpoint "
                                                        "(default: the run's name)")
    sweep.add_argument("--steps", type=_int_list, default=[4, 8, 16, 32, 64], help="unmasking steps T, e.g. 4,8,16")
    sweep.add_argument("--corrector-steps", type=_int_list, default=[0, 1, 2],
                       help="corrector iterations S, e.g. 0,1,2")
    sweep.add_argument("--corrector-every", type=_int_list, default=[1], help="omega values, e.g. 1,2")
    sweep.add_argument("--num-samples", type=int, default=64, help="samples per grid point")
    sweep.add_argument("--batch-size", type=int, help="samples generated at once (default: all)")
    sweep.add_argument("--nucleus-p", type=float)
    _add_unmasking_arguments(sweep)
    sweep.add_argument("--class", dest="sample_class", type=int, help="the class every point samples (sampling.label; "
                       "models trained with data.labels)")
    sweep.add_argument("--guidance", type=_float_list, default=[1.0], help="guidance scales gamma with --class, "
                       "e.g. 1,2,3 (default 1: the conditional model)")
    sweep.add_argument("--seed", type=int, default=0, help="sampler seed, the same for every grid point")
    sweep.add_argument("--no-novelty", action="store_true", help="SMILES: skip the training set (no novelty)")
    sweep.add_argument("--fcd", action="store_true", help="SMILES: also the FCD to held-out molecules (the fcd "
                                                          "package; ~25 s per 1,024 samples)")
    sweep.add_argument("--merge", nargs="+", help="instead of sampling: combine the sweep.csv of these folders")
    sweep.add_argument("--title", help="plot title")
    sweep.add_argument("--out", required=True, help="folder for sweep.csv, sweep.md and sweep.png")
    sweep.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    sweep.set_defaults(func=_sweep)

    label = sub.add_parser("label", help="conditioning labels of a SMILES shard folder (classifier-free guidance)")
    label.add_argument("shards", help="shard folder (a path or URL) of molecules")
    label.add_argument("--property", required=True, choices=["qed", "ring_count"],
                       help="label 1 when the molecule's property is above the train split's quantile")
    label.add_argument("--quantile", type=float, default=0.9, help="the threshold's quantile (default 0.9)")
    label.add_argument("--overwrite", action="store_true", help="compute an existing label set again")
    label.set_defaults(func=_label)

    checkpoint = sub.add_parser("checkpoint", help="work with checkpoints")
    checkpoint_sub = checkpoint.add_subparsers(dest="checkpoint_command", required=True)
    consolidate = checkpoint_sub.add_parser("consolidate", help="one safetensors file of full weights (and EMA) "
                                            "from a checkpoint saved on any layout")
    consolidate.add_argument("checkpoint", help="checkpoint folder, or a run folder (latest checkpoint)")
    consolidate.add_argument("out", help="output .safetensors file")
    consolidate.set_defaults(func=_consolidate)
    convert = checkpoint_sub.add_parser("convert", help="a DeepSpeed engine's checkpoint -> a DCP checkpoint (through "
                                        "DeepSpeed's universal format) that the native engine resumes at any layout")
    convert.add_argument("checkpoint", help="DeepSpeed checkpoint folder, or a run folder (latest checkpoint)")
    convert.add_argument("--out", required=True, help="run folder to write checkpoints/step_XXXXXXXX into")
    convert.set_defaults(func=_convert_checkpoint)

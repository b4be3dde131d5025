"""Phase 1, researcher side: federated training of the data factory with Fed-BioMed 6.4.1.

The nodes (one per hospital) must be running, each with its ``prepare_data.py`` LMDB folder
registered under the tag(s) given by ``--tags``. Each round samples at most
``--max-nodes-per-round`` nodes, sends them the global G/D/G_ema, each trains
``--num_updates_per_round`` alternating D/G updates on its own data, and the returned parameters
are averaged (FedAverage). Only parameters cross the network. A breakpoint is saved after
every round. With ``--secagg`` the researcher receives only masked updates and can read nothing
but their average (Fed-BioMed secure aggregation, LOM; the README's deployment section says what
each node must set).

Paper schedule (SPEC §5.4), two commands:

  python train.py --size 512 --n_domains 3 --augment --num_updates_per_round 2000 --rounds 350
  python train.py --resume --num_updates_per_round 200 --rounds 385 --clip-weight 50 \\
      --clip-pretrained /path/to/ViT-L-14-openai.pt

then ``python save_global_model.py``. ``--rounds`` is the total round limit; ``--resume`` continues
the latest (or the given) breakpoint. With ``--resume``, only the flags given on the command line
change (schedule flags); architecture flags are taken from the breakpoint.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from robustmedseg.errors import InputError, run_cli

# flag dest -> FactoryConfig field (model_args shipped to the nodes)
MODEL_FLAGS = {
    "size": "size", "latent": "style_dim", "n_mlp": "n_mlp", "n_domains": "n_domains",
    "channel_multiplier": "channel_multiplier", "n_zbins": "n_zbins", "clip_dim": "clip_dim",
    "channel_cap": "channel_cap", "r1": "r1", "path_regularize": "path_regularize",
    "path_batch_shrink": "path_batch_shrink", "d_reg_every": "d_reg_every", "g_reg_every": "g_reg_every",
    "mixing": "mixing", "augment": "augment", "augment_p": "augment_p", "ada_target": "ada_target",
    "ada_length": "ada_length", "ada_every": "ada_every", "clip_weight": "clip_weight",
    "clip_model": "clip_model", "clip_pretrained": "clip_pretrained", "n_sample": "n_sample",
    "sample_every": "sample_every", "log_every": "log_every", "seed": "seed",
}
ARCH_FLAGS = ("size", "latent", "n_mlp", "n_domains", "channel_multiplier", "n_zbins", "clip_dim", "channel_cap")


def build_parser(suppress: bool = False) -> argparse.ArgumentParser:
    """The CLI; ``suppress`` builds a copy without defaults (to see which flags were given)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS if suppress else None)

    group = [p]

    def add(*names: str, **kw: Any) -> None:
        if suppress:
            kw.pop("default", None)
        group[0].add_argument(*names, **kw)

    group[0] = p.add_argument_group("schedule (may change on --resume)")
    add("--rounds", type=int, default=350, help="total number of rounds (round limit; default 350)")
    add("--num_updates_per_round", "--num-updates-per-round", type=int, default=2000,
        help="updates per round on each sampled node; even updates train D, odd ones G (default 2000)")
    add("--batch", type=int, default=16, help="batch size on the nodes (default 16)")
    add("--lr", type=float, default=0.002, help="base learning rate (G: lr*4/5, D: lr*16/17; default 0.002)")
    add("--clip-weight", "--clip_weight", dest="clip_weight", type=float, default=0.0,
        help="weight of the CLIP spherical loss (0: off; the refinement stage uses 50)")
    add("--clip-model", dest="clip_model", default="ViT-L-14",
        help="open_clip architecture of the CLIP loss, loaded on the nodes if --clip-weight > 0 (default ViT-L-14)")
    add("--clip-pretrained", dest="clip_pretrained", default="openai",
        help="CLIP weights on the nodes: a local file path (same path on every node) or an open_clip tag already "
             "in the nodes' cache (default openai); must match the model used by prepare_data.py")
    add("--max-nodes-per-round", dest="max_nodes", type=int, default=2,
        help="nodes sampled per round, uniformly at random (default 2)")
    add("--aggregation", choices=("uniform", "samples"), default="uniform",
        help="FedAverage weights: uniform over the replying nodes (as the paper) or by dataset size")
    add("--sample-every", dest="sample_every", type=int, default=100,
        help="node-side sample grid every N updates, written on the node only (default 100)")
    add("--log-every", dest="log_every", type=int, default=50,
        help="nodes report running-mean losses every N updates (default 50)")
    add("--secagg", action=argparse.BooleanOptionalAction, default=False,
        help="secure aggregation (Fed-BioMed LOM): the researcher sees only the average of the sampled nodes' "
             "updates, never one node's weights; needs >= 2 nodes per round. On --resume, the breakpoint's "
             "setting is kept unless --secagg / --no-secagg is given (default off)")
    add("--secagg-clip", "--secagg_clip", dest="secagg_clip", type=float, default=None,
        help="with --secagg: largest change of one stored weight during one round that is represented "
             "(larger changes are clipped, reported as secagg_clipped); precision of the average: clip/8192 "
             "per round (default 2.0 = lr x steps per network of a 2000-update round; measured max 0.74)")

    group[0] = p.add_argument_group("model, losses and augmentation (architecture flags are fixed by the first run)")
    add("--size", type=int, default=512, help="image size (paper: 512; the LMDBs must contain it)")
    add("--latent", type=int, default=512, help="style/latent width (paper: 512)")
    add("--n_mlp", type=int, default=8, help="mapping-network depth (paper: 8)")
    add("--n_domains", "--n-domains", dest="n_domains", type=int, default=3, help="number of domains (default 3)")
    add("--n-zbins", "--n_zbins", dest="n_zbins", type=int, default=29, help="number of z-bins (default 29)")
    add("--clip-dim", "--clip_dim", dest="clip_dim", type=int, default=768,
        help="CLIP embedding width = clip_mean.npy width (ViT-L-14: 768)")
    add("--channel_multiplier", "--channel-multiplier", dest="channel_multiplier", type=int, default=2,
        help="StyleGAN2 channel multiplier (default 2)")
    add("--channel-cap", "--channel_cap", dest="channel_cap", type=int, default=None,
        help="cap on the channels of every layer (small CPU runs); default none = paper widths")
    add("--r1", type=float, default=10.0, help="R1 weight (default 10)")
    add("--path_regularize", type=float, default=2.0, help="path-length weight (default 2)")
    add("--path_batch_shrink", type=int, default=2, help="batch divisor of the path-length step (default 2)")
    add("--d_reg_every", type=int, default=16, help="R1 every N D updates (lazy; default 16)")
    add("--g_reg_every", type=int, default=4, help="path length every N G updates (lazy; default 4)")
    add("--mixing", type=float, default=0.9, help="style-mixing probability (default 0.9)")
    add("--augment", action="store_true", default=False, help="ADA augmentation of D inputs (paper: on)")
    add("--augment_p", type=float, default=0.0, help="fixed augmentation probability; 0 = adaptive (default)")
    add("--ada_target", type=float, default=0.6, help="ADA target of E[sign(D(real))] (default 0.6)")
    add("--ada_length", type=int, default=500_000, help="ADA speed: samples for p to move by 1 (default 500000)")
    add("--ada_every", type=int, default=256, help="ADA p update every N regular D updates (default 256)")
    add("--n_sample", type=int, default=3, help="sample grids: N z vectors x every domain (default 3)")
    add("--seed", type=int, default=0, help="seed of the node streams, node sampling and grids (default 0)")

    group[0] = p.add_argument_group("federation and outputs")
    add("--tags", default="#im2im", help="dataset tags searched on the nodes, comma separated (default #im2im)")
    add("--researcher-dir", dest="researcher_dir", type=Path, default=None,
        help="Fed-BioMed researcher component (default: $FBM_RESEARCHER_COMPONENT_ROOT, else ./fbm-researcher); "
             "breakpoints live in its var/experiments")
    add("--workdir", type=Path, default=Path("factory_run"),
        help="researcher outputs: samples/round_*.png from the aggregated G_ema, run.json (default ./factory_run)")
    add("--keep-breakpoints", dest="keep_breakpoints", type=int, default=3,
        help="keep only the newest N breakpoints and the node-reply files they use (0 = keep all; at 512 px "
             "a breakpoint is ~1 GB); default 3")
    add("--tensorboard", type=Path, default=None, help="TensorBoard folder (default WORKDIR/tensorboard)")
    add("--min-nodes", dest="min_nodes", type=int, default=1,
        help="wait until at least this many nodes answer before starting (default 1)")
    add("--wait-nodes", dest="wait_nodes", type=float, default=120.0,
        help="seconds to wait for the nodes (default 120)")
    add("--resume", nargs="?", const="LATEST", default=None, metavar="BREAKPOINT",
        help="continue from the latest breakpoint (or the given breakpoint folder)")
    add("--use-gpu", dest="use_gpu", action="store_true", default=False,
        help="ask the nodes to train on their GPU (nodes must be started with --gpu)")
    add("--verbose", action="store_true", default=False, help="Fed-BioMed INFO logs")
    return p


def _config_from_args(args: argparse.Namespace) -> Any:
    from robustmedseg.factory.config import FactoryConfig

    values = {field: getattr(args, flag) for flag, field in MODEL_FLAGS.items()}
    try:
        return FactoryConfig.from_model_args(values)
    except ValueError as err:
        raise InputError(str(err)) from err


def _print_round(report: Any, limit: int) -> None:
    keys = ("d_loss", "g_loss", "r1", "path_length", "ada_p", "clip_loss", "secagg_clipped")
    shown = " ".join(f"{k} {report.metrics[k]:.4g}" for k in keys if k in report.metrics)
    train_s = max(report.node_train_s.values()) if report.node_train_s else float("nan")
    print(f"round {report.round}/{limit}  {report.seconds:.1f} s (node training {train_s:.1f} s)  "
          f"nodes {', '.join(report.nodes)}  {shown}", flush=True)


def _resume_updates(explicit: Dict[str, Any], args: argparse.Namespace):
    bad = [f for f in ARCH_FLAGS if f in explicit]
    if bad:
        raise InputError(f"--resume keeps the architecture of the breakpoint; drop {', '.join('--' + b for b in bad)}")
    model = {MODEL_FLAGS[k]: getattr(args, k) for k in MODEL_FLAGS if k in explicit}
    training: Dict[str, Any] = {}
    if "num_updates_per_round" in explicit:
        training["num_updates"] = args.num_updates_per_round
    if "batch" in explicit:
        training["loader_args"] = {"batch_size": args.batch}
    if "use_gpu" in explicit:
        training["use_gpu"] = args.use_gpu
    if "lr" in explicit:
        training["optimizer_args"] = {"lr": args.lr}
    strategy = {}
    if "max_nodes" in explicit:
        strategy["max_nodes"] = args.max_nodes
    if "aggregation" in explicit:
        strategy["weighting"] = args.aggregation
    return model, training, strategy, (args.rounds if "rounds" in explicit else None)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    explicit = vars(build_parser(suppress=True).parse_args(argv))
    import os

    researcher_dir = args.researcher_dir or Path(os.environ.get("FBM_RESEARCHER_COMPONENT_ROOT", "fbm-researcher"))
    cfg = _config_from_args(args)
    if args.rounds < 1 or args.num_updates_per_round < 1 or args.batch < 1 or args.max_nodes < 1:
        raise InputError("--rounds, --num_updates_per_round, --batch and --max-nodes-per-round must be >= 1")
    if args.secagg_clip is not None and not args.secagg_clip > 0:
        raise InputError(f"--secagg-clip must be > 0, got {args.secagg_clip}")
    if args.secagg and args.max_nodes < 2:
        raise InputError("--secagg needs --max-nodes-per-round >= 2 (only a sum over 2+ nodes can be unmasked)")
    tags = [t for t in args.tags.split(",") if t]

    from robustmedseg.federation import researcher as R

    try:
        R.use_researcher_component(researcher_dir, verbose=args.verbose)
        online = R.wait_for_nodes(args.min_nodes, timeout=args.wait_nodes, hint=R.local_logs_hint(researcher_dir))
        print(f"{len(online)} node(s) online: {', '.join(online)}", flush=True)
        if args.resume:
            model_up, train_up, strat_up, rounds = _resume_updates(explicit, args)
            exp = R.resume_experiment(None if args.resume == "LATEST" else args.resume, model_up, train_up,
                                      strat_up, rounds, secagg=explicit.get("secagg"),
                                      secagg_clip=explicit.get("secagg_clip"))
            print(f"resumed experiment {exp.id} at round {exp.round_current()} (limit {exp.round_limit()})",
                  flush=True)
            if exp.round_current() >= exp.round_limit():
                print(f"nothing to run: the breakpoint is at its round limit; pass --rounds N (> "
                      f"{exp.round_current()}) to train more rounds", flush=True)
        else:
            schedule = R.Schedule(args.rounds, args.num_updates_per_round, args.batch, args.lr, args.max_nodes,
                                  args.aggregation, args.seed, args.use_gpu, args.secagg, args.secagg_clip)
            exp = R.create_experiment(cfg, schedule, tags)
            print(f"experiment {exp.id}: {len(exp.all_federation_nodes())} node(s) with data, "
                  f"{args.rounds} rounds x {args.num_updates_per_round} updates, run id {exp.model_args()['run_id']}",
                  flush=True)
        secure = R.secagg_info(exp)
        if secure["active"]:
            print(f"secure aggregation: {secure['scheme']}, update clip +-{secure['clip']:g} (precision "
                  f"{secure['resolution']:.2g} per round), {secure['weighting']} weights", flush=True)
        workdir = Path(args.workdir)
        writer = R.tensorboard_writer(args.tensorboard or workdir / "tensorboard")
        metrics = R.attach_metrics(exp, writer)
        model_args = exp.model_args()
        t0 = time.time()
        rounds = R.previous_rounds(workdir / "run.json", exp.id, exp.round_current())

        def on_round(report: Any) -> None:
            rounds.append({"round": report.round, "seconds": report.seconds, "node_train_s": report.node_train_s,
                           "node_cpu_s": report.node_cpu_s})
            _print_round(report, exp.round_limit())

        try:
            R.run_rounds(exp, metrics, writer, workdir / "samples", int(model_args.get("n_sample", 3)),
                         int(model_args.get("seed", 0)), on_round, keep_breakpoints=args.keep_breakpoints)
        finally:
            if writer is not None:
                writer.close()
            R.write_run_info(workdir / "run.json", exp, {"researcher_dir": str(Path(researcher_dir).resolve()),
                                                        "rounds": rounds})
        bkpts = R.breakpoint_dirs(exp)
        print(f"done: round {exp.round_current()}/{exp.round_limit()} in {time.time() - t0:.1f} s; "
              f"last breakpoint {bkpts[-1] if bkpts else 'none'}", flush=True)
        print(json.dumps({"experiment": exp.id, "round": exp.round_current(),
                          "breakpoint": bkpts[-1] if bkpts else None}), flush=True)
    except R.FederationError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    except InputError:
        raise
    except Exception as err:  # Fed-BioMed errors (FedbiomedError, ...) -> one line, not a traceback
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: Fed-BioMed: {type(err).__name__}: {message}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main)

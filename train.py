"""Phase 1, researcher side: federated training of the data factory with Fed-BioMed 6.4.1.

The nodes (one per hospital) must be running, each with its ``prepare_data.py`` LMDB folder
registered under the tag(s) given by ``--tags``. Each round samples at most
``--max_nodes_per_round`` nodes, sends them the global G/D/G_ema, each trains
``--num_updates_per_round`` alternating D/G updates on its own data, and the returned parameters
are averaged (FedAverage). Only parameters cross the network. A breakpoint is saved after
every round. With ``--secagg`` the researcher receives only masked updates and can read nothing
but their average (Fed-BioMed secure aggregation, LOM; the README's deployment section says what
each node must set).

Paper schedule (docs/method.md#schedule), two commands:

  python train.py --size 512 --n_domains 3 --augment --num_updates_per_round 2000 --rounds 350
  python train.py --resume --num_updates_per_round 200 --rounds 385 --clip_weight 50 \\
      --clip_pretrained /path/to/ViT-L-14-openai.pt

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
from typing import Any, Dict, Optional, Sequence, Tuple

from robustmedseg.cli import BooleanFlag, DataclassParser, add_field_flags
from robustmedseg.errors import InputError, run_cli
from robustmedseg.factory.config import MODEL_KEYS, FactoryConfig
from robustmedseg.federation.options import ResearcherOptions

# FactoryConfig fields that are flags: field -> (other names, help).  The flag is the field's name
# (both spellings accepted), its type and default are the field's (FactoryConfig holds the paper's).
SCHEDULE_FIELDS: Dict[str, Tuple[Tuple[str, ...], str]] = {
    "clip_weight": ((), "weight of the CLIP spherical loss (0: off; the refinement stage uses 50)"),
    "clip_model": ((), "open_clip architecture of the CLIP loss, loaded on the nodes if --clip_weight > 0"),
    "clip_pretrained": ((), "CLIP weights on the nodes: a local file path (same path on every node) or an open_clip "
                            "tag already in the nodes' cache; must match the model used by prepare_data.py"),
    "sample_every": ((), "node-side sample grid every N updates, written on the node only"),
    "log_every": ((), "nodes report running-mean losses every N updates"),
}
MODEL_FIELDS: Dict[str, Tuple[Tuple[str, ...], str]] = {
    "size": ((), "image size (paper: 512; the LMDBs must contain it)"),
    "style_dim": (("--latent",), "style/latent width (paper: 512)"),
    "n_mlp": ((), "mapping-network depth (paper: 8)"),
    "n_domains": ((), "number of domains"),
    "n_zbins": ((), "number of z-bins"),
    "clip_dim": ((), "CLIP embedding width = clip_mean.npy width (ViT-L-14: 768)"),
    "channel_multiplier": ((), "StyleGAN2 channel multiplier"),
    "channel_cap": ((), "cap on the channels of every layer (small CPU runs); default none = paper widths"),
    "lr_mlp": ((), "learning-rate multiplier of the mapping network (paper: 0.01). Short CPU runs learn the site "
                   "conditioning much faster with 1 (BENCHMARKS.md); save_global_model.py exports in the paper's "
                   "parametrisation either way"),
    "r1": ((), "R1 weight"),
    "path_regularize": ((), "path-length weight"),
    "path_batch_shrink": ((), "batch divisor of the path-length step"),
    "d_reg_every": ((), "R1 every N D updates (lazy)"),
    "g_reg_every": ((), "path length every N G updates (lazy)"),
    "mixing": ((), "style-mixing probability"),
    "augment": ((), "ADA augmentation of D inputs (paper: on)"),
    "augment_p": ((), "fixed augmentation probability; 0 = adaptive"),
    "ada_target": ((), "ADA target of E[sign(D(real))]"),
    "ada_length": ((), "ADA speed: samples for p to move by 1"),
    "ada_every": ((), "ADA p update every N regular D updates"),
    "ada_rot90": ((), "quarter turns ADA draws: 'uniform' (k in {0,1,2,3}, as the ADA paper) or 'original' "
                      "(k in {0,3}, the original code; docs/differences.md#ada-rotation-set)"),
    "n_sample": ((), "sample grids: N z vectors x every domain"),
    "seed": ((), "seed of the node streams, node sampling and grids"),
}
# GPU switches of the nodes (added with --no-... forms in their own group; may change on --resume)
GPU_FIELDS: Dict[str, Tuple[Tuple[str, ...], str]] = {
    "allow_tf32": ((), "TF32 tensor cores for float32 convolutions and matrix products on the nodes' GPUs (Ampere+): "
                       "faster, about 1e-3 relative error per product; off by default, as NVlabs keeps it for GAN "
                       "training"),
    "cudnn_benchmark": ((), "cuDNN times the convolution algorithms once per (fixed) training shape and keeps the "
                            "fastest; runs are no longer bit-reproducible; off by default"),
}
FLAG_FIELDS = {**SCHEDULE_FIELDS, **MODEL_FIELDS, **GPU_FIELDS}
# architecture: fixed by the first run
ARCH_FLAGS = tuple(k for k in MODEL_KEYS if k in FLAG_FIELDS)


def build_parser(suppress: bool = False) -> DataclassParser:
    """The CLI; ``suppress`` builds a copy without defaults (to see which flags were given).  The researcher's
    flags are the fields of :class:`~robustmedseg.federation.options.ResearcherOptions`, the factory's those of
    :class:`~robustmedseg.factory.config.FactoryConfig` (:data:`FLAG_FIELDS`); each takes its field's type and
    default."""
    p = DataclassParser(ResearcherOptions, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                        argument_default=argparse.SUPPRESS if suppress else None)

    group = [p]

    def add(*names: str, **kw: Any) -> None:
        if suppress:
            kw.pop("default", None)
        group[0].add_argument(*names, **kw)

    g = group[0] = p.add_argument_group("schedule (may change on --resume)")
    p.add("rounds", group=g, help="total number of rounds (round limit; default 350)")
    p.add("num_updates_per_round", group=g,
          help="updates per round on each sampled node; even updates train D, odd ones G (default 2000)")
    p.add("batch", "--batch_size", group=g, help="batch size on the nodes (default 16)")
    p.add("lr", group=g, help="base learning rate (G: lr*4/5, D: lr*16/17; default 0.002)")
    add_field_flags(add, FactoryConfig, SCHEDULE_FIELDS)
    p.add("max_nodes", flags=("--max_nodes_per_round",), group=g,
          help="nodes sampled per round, uniformly at random (default 2)")
    p.add("aggregation", group=g, choices=("uniform", "samples"),
          help="FedAverage weights: uniform over the replying nodes (as the paper) or by dataset size")
    p.add("secagg", group=g, action=BooleanFlag,
          help="secure aggregation (Fed-BioMed LOM): the researcher sees only the average of the sampled nodes' "
               "updates, never one node's weights; needs >= 2 nodes per round. On --resume, the breakpoint's "
               "setting is kept unless --secagg / --no_secagg is given (default off)")
    p.add("secagg_clip", group=g,
          help="with --secagg: largest change of one stored weight during one round that is represented "
               "(larger changes are clipped, reported as secagg_clipped); precision of the average: clip/8192 "
               "per round (default 2.0 = lr x steps per network of a 2000-update round; measured max 0.74)")

    group[0] = p.add_argument_group("model, losses and augmentation (architecture flags are fixed by the first run; "
                                    "names and defaults are those of robustmedseg.factory.config.FactoryConfig)")
    add_field_flags(add, FactoryConfig, MODEL_FIELDS)

    g = group[0] = p.add_argument_group("federation and outputs")
    p.add("tags", group=g, help="dataset tags searched on the nodes, comma separated (default #im2im)")
    p.add("researcher_dir", group=g,
          help="Fed-BioMed researcher component (default: $FBM_RESEARCHER_COMPONENT_ROOT, else ./fbm-researcher); "
               "breakpoints live in its var/experiments. It must exist (fedbiomed component create -c researcher, "
               "or python -m robustmedseg.federation.local up) unless --create_researcher_dir")
    p.add("create_researcher_dir", group=g,
          help="let Fed-BioMed create a missing researcher component at --researcher_dir (with its default "
               "server address; real deployments create it once with fedbiomed component create)")
    p.add("workdir", group=g,
          help="researcher outputs: samples/round_*.png from the aggregated G_ema, run.json (default ./factory_run)")
    p.add("keep_breakpoints", group=g,
          help="keep only the newest N breakpoints and the node-reply files they use (0 = keep all; at 512 px "
               "a breakpoint is ~1 GB); default 3")
    p.add("tensorboard", group=g, help="TensorBoard folder (default WORKDIR/tensorboard)")
    p.add("fidelity_evaluator", group=g,
          help="frozen fidelity evaluator file (python -m robustmedseg.fidelity train): after every "
               "--fidelity_every rounds the aggregated G_ema is scored on the researcher side (domain and z-bin "
               "accuracy of generated slices, KID per domain) -> TensorBoard fidelity/* and run.json")
    p.add("fidelity_every", group=g, help="score the aggregated G_ema every N rounds (and after the last round; default 1)")
    p.add("fidelity_n", group=g, help="generated slices per domain for each fidelity score (default 64)")
    p.add("min_nodes", group=g, help="wait until at least this many nodes answer before starting (default 1)")
    p.add("wait_nodes", group=g,
          help="seconds to wait for the nodes, with a progress line every 10 s (default 120)")
    p.add("resume", group=g, nargs="?", const="LATEST", metavar="BREAKPOINT",
          help="continue from the latest breakpoint (or the given breakpoint folder)")
    p.add("use_gpu", group=g, help="ask the nodes to train on their GPU (nodes must be started with --gpu)")
    p.add("verbose", group=g, help="Fed-BioMed INFO logs")

    group[0] = p.add_argument_group("GPU switches of the nodes (no effect on CPU; may change on --resume)")
    for name, (_, text) in GPU_FIELDS.items():
        add(f"--{name}", dest=name, action=BooleanFlag, default=getattr(FactoryConfig(), name),
            help=text)
    return p


def _config_from_args(args: argparse.Namespace) -> FactoryConfig:
    values = {name: getattr(args, name) for name in FLAG_FIELDS}
    try:
        return FactoryConfig.from_model_args(values)
    except ValueError as err:  # FactoryConfig names its field; the user typed the flag of that field
        message = str(err)
        field = message.split(" ", 1)[0]
        raise InputError(f"--{message}" if field in FLAG_FIELDS else message) from err


def _print_round(report: Any, limit: int) -> None:
    keys = ("d_loss", "g_loss", "r1", "path_length", "ada_p", "clip_loss", "secagg_clipped")
    shown = " ".join(f"{k} {report.metrics[k]:.4g}" for k in keys if k in report.metrics)
    train_s = max(report.node_train_s.values()) if report.node_train_s else float("nan")
    fid = report.fidelity
    if fid:
        shown += (f"  fidelity: domain acc {fid['domain_accuracy']:.3f} z-bin ±1 {fid['zbin_within1']:.3f}")
    print(f"round {report.round}/{limit}  {report.seconds:.1f} s (node training {train_s:.1f} s)  "
          f"nodes {', '.join(report.nodes)}  {shown}", flush=True)


def _resume_updates(explicit: Dict[str, Any]):
    """What a resume changes: the flags given on the command line (``explicit``, parsed without defaults)."""
    bad = [f for f in ARCH_FLAGS if f in explicit]
    if bad:
        raise InputError(f"--resume keeps the architecture of the breakpoint; drop {', '.join('--' + b for b in bad)}")
    model = {k: explicit[k] for k in FLAG_FIELDS if k in explicit}
    training: Dict[str, Any] = {}
    if "num_updates_per_round" in explicit:
        training["num_updates"] = explicit["num_updates_per_round"]
    if "batch" in explicit:
        training["loader_args"] = {"batch_size": explicit["batch"]}
    if "use_gpu" in explicit:
        training["use_gpu"] = explicit["use_gpu"]
    if "lr" in explicit:
        training["optimizer_args"] = {"lr": explicit["lr"]}
    strategy = {}
    if "max_nodes" in explicit:
        strategy["max_nodes"] = explicit["max_nodes"]
    if "aggregation" in explicit:
        strategy["weighting"] = explicit["aggregation"]
    return model, training, strategy, explicit.get("rounds")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The researcher's run, section by section; failures reach the user through ``run_cli`` (one line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    parsed = parser.parse_args(argv)
    explicit = vars(build_parser(suppress=True).parse_args(argv))

    # ---- flags: every check before anything is created or contacted
    cfg = _config_from_args(parsed)
    opts: ResearcherOptions = parser.build(parsed)
    _check_numbers(opts)
    tags = opts.tag_list
    if not tags:
        raise InputError("--tags needs at least one tag")
    researcher_dir = opts.root
    if researcher_dir.exists() and not researcher_dir.is_dir():
        raise InputError("is a file; --researcher_dir names the researcher component folder", researcher_dir)
    for folder in (opts.workdir, opts.tensorboard):
        if folder is not None and folder.exists() and not folder.is_dir():
            raise InputError("is a file; a folder is expected here", folder)
    breakpoint = None
    if opts.resume:  # a missing or damaged breakpoint is one line
        from robustmedseg.federation.export import check_breakpoint

        breakpoint = check_breakpoint(researcher_dir, opts.resume_breakpoint)
    _check_researcher_component(researcher_dir, opts.create_researcher_dir)

    from robustmedseg.federation import researcher as R

    fidelity = None
    if opts.fidelity_evaluator is not None:  # a bad file fails here, before any node is contacted
        fidelity = R.fidelity_scorer(opts.fidelity_evaluator, opts.fidelity_n, cfg.seed)
    run: Dict[str, Any] = {"exp": None}

    def clean_up() -> Optional[str]:
        exp = run["exp"]
        return R.abandon_experiment(exp, fresh=not opts.resume, keep=opts.keep_breakpoints) if exp is not None \
            else None

    with R.reported_failures(clean_up):
        # ---- federation: the researcher component, then the nodes
        created = not R.is_researcher_component(researcher_dir)
        R.use_researcher_component(researcher_dir, verbose=opts.verbose)
        if created:
            print(f"created a new Fed-BioMed researcher component in {researcher_dir} (--create_researcher_dir)",
                  flush=True)
        online = R.wait_for_nodes(opts.min_nodes, timeout=opts.wait_nodes, hint=R.local_logs_hint(researcher_dir))
        print(f"{len(online)} node(s) online: {', '.join(online)}", flush=True)

        if opts.resume:
            # ---- resume: the breakpoint's data, networks and state, with the flags given changed
            model_up, train_up, strat_up, rounds = _resume_updates(explicit)
            exp = run["exp"] = R.resume_experiment(str(breakpoint), model_up, train_up, strat_up, rounds,
                                                   secagg=explicit.get("secagg"),
                                                   secagg_clip=explicit.get("secagg_clip"))
            print(f"resumed experiment {exp.id} at round {exp.round_current()} (limit {exp.round_limit()})",
                  flush=True)
            if exp.round_current() >= exp.round_limit():
                print(f"nothing to run: the breakpoint is at its round limit; pass --rounds N (> "
                      f"{exp.round_current()}) to train more rounds", flush=True)
        else:
            # ---- data and networks: the nodes' datasets by tag, G/D/G_ema initialised from --seed
            schedule = R.Schedule(opts.rounds, opts.num_updates_per_round, opts.batch, opts.lr, opts.max_nodes,
                                  opts.aggregation, cfg.seed, opts.use_gpu, opts.secagg, opts.secagg_clip)
            from training_plan import FactoryTrainingPlan

            exp = run["exp"] = R.create_experiment(cfg, schedule, tags, FactoryTrainingPlan)
            print(f"experiment {exp.id}: {len(exp.all_federation_nodes())} node(s) with data, "
                  f"{opts.rounds} rounds x {opts.num_updates_per_round} updates, run id {exp.model_args()['run_id']}",
                  flush=True)
        secure = R.secagg_info(exp)
        if secure["active"]:
            print(f"secure aggregation: {secure['scheme']}, update clip +-{secure['clip']:g} (precision "
                  f"{secure['resolution']:.2g} per round), {secure['weighting']} weights", flush=True)

        # ---- rounds: train, record (TensorBoard, run.json, sample grids), prune breakpoints
        record = R.RunRecord(Path(opts.workdir), opts.tensorboard)
        metrics = R.attach_metrics(exp, record.writer)
        model_args = exp.model_args()
        t0 = time.time()
        record.start(exp)
        if fidelity is not None:
            fidelity.evaluator.check_generator(exp.training_plan().model().g_ema)

        def on_round(report: Any) -> None:
            record.add(report)
            _print_round(report, exp.round_limit())

        completed = False
        try:
            R.run_rounds(exp, metrics, record.writer, record.workdir / "samples", int(model_args.get("n_sample", 3)),
                         int(model_args.get("seed", 0)), on_round, keep_breakpoints=opts.keep_breakpoints,
                         fidelity=fidelity, fidelity_every=opts.fidelity_every)
            completed = True
        finally:
            record.close(exp, completed, {"researcher_dir": str(Path(researcher_dir).resolve())})

        # ---- done
        bkpts = R.breakpoint_dirs(exp)
        print(f"done: round {exp.round_current()}/{exp.round_limit()} in {time.time() - t0:.1f} s; "
              f"last breakpoint {bkpts[-1] if bkpts else 'none'}", flush=True)
        print(json.dumps({"experiment": exp.id, "round": exp.round_current(),
                          "breakpoint": bkpts[-1] if bkpts else None}), flush=True)
    return 0


def _check_researcher_component(folder: Path, create: bool) -> None:
    """A folder that holds no researcher component is refused unless ``--create_researcher_dir``:
    Fed-BioMed would silently make a new, empty component there (a mistyped path), with a server
    certificate the nodes do not know."""
    from robustmedseg.federation.researcher import is_researcher_component

    if create or is_researcher_component(folder):
        return
    problem = "no such folder" if not folder.exists() else "no etc/config.ini in it"
    raise InputError(f"not a Fed-BioMed researcher component ({problem}): check --researcher_dir, create the "
                     f"component once with 'fedbiomed component create -c researcher -p DIR' (docs/phase1.md), or "
                     f"pass --create_researcher_dir", folder)


def _check_numbers(opts: ResearcherOptions) -> None:
    """The researcher-side numbers (the model ones are FactoryConfig's): finite and in range."""
    import math

    if opts.rounds < 1 or opts.num_updates_per_round < 1 or opts.batch < 1 or opts.max_nodes < 1:
        raise InputError("--rounds, --num_updates_per_round, --batch and --max_nodes_per_round must be >= 1")
    if opts.secagg_clip is not None and not opts.secagg_clip > 0:
        raise InputError(f"--secagg_clip must be > 0, got {opts.secagg_clip}")
    if opts.secagg and opts.max_nodes < 2:
        raise InputError("--secagg needs --max_nodes_per_round >= 2 (only a sum over 2+ nodes can be unmasked)")
    if opts.fidelity_every < 1 or opts.fidelity_n < 2:
        raise InputError("--fidelity_every must be >= 1 and --fidelity_n >= 2")
    if not (math.isfinite(opts.lr) and opts.lr > 0):
        raise InputError(f"--lr must be a finite number > 0, got {opts.lr}")
    if not (math.isfinite(opts.wait_nodes) and opts.wait_nodes >= 0):
        raise InputError(f"--wait_nodes must be a finite number of seconds >= 0, got {opts.wait_nodes}")
    if opts.keep_breakpoints < 0:
        raise InputError(f"--keep_breakpoints must be >= 0 (0 = keep all), got {opts.keep_breakpoints}")
    if opts.min_nodes < 1:
        raise InputError(f"--min_nodes must be >= 1, got {opts.min_nodes}")


def cli(argv: Optional[Sequence[str]] = None) -> None:
    """Console-script entry point (``rms-train``): :func:`main` with the one-line error policy."""
    run_cli(main, argv)


if __name__ == "__main__":
    cli()

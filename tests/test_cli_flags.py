"""One flag policy for every script: ``_`` and ``-`` spellings, one name per concept, one-line usage errors."""
from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List

import pytest

from robustmedseg.cli import CliParser
from robustmedseg.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def _module_parser(module: str, attr: str = "build_parser", *args) -> Callable[[], CliParser]:
    return lambda: getattr(importlib.import_module(module), attr)(*args)


# every file with a ``__main__`` block -> the parser its main() uses
PARSERS: Dict[str, Callable[[], CliParser]] = {
    "prepare_data.py": _module_parser("prepare_data"),
    "train.py": _module_parser("train"),
    "save_global_model.py": _module_parser("save_global_model"),
    "generate_volumes.py": _module_parser("generate_volumes"),
    "MultiMedSeg/preprocess.py": _module_parser("MultiMedSeg.preprocess"),
    "MultiMedSeg/pretrain.py": _module_parser("MultiMedSeg.options", "training_parser", "pretrain"),
    "MultiMedSeg/train.py": _module_parser("MultiMedSeg.options", "training_parser", "train"),
    "MultiMedSeg/inference.py": _module_parser("MultiMedSeg.options", "inference_parser"),
    "MultiMedSeg/predict.py": _module_parser("MultiMedSeg.options", "predict_parser"),
    "MultiMedSeg/plan.py": _module_parser("MultiMedSeg.plan"),
    "MultiMedSeg/select_evaluation.py": _module_parser("MultiMedSeg.select_evaluation"),
    "demo/run.py": _module_parser("demo.run"),
    "demo/phantom.py": _module_parser("demo.phantom"),
    "demo/report.py": _module_parser("demo.report"),
    "demo/vessel_report.py": _module_parser("demo.vessel_report"),
    "demo/reorient.py": _module_parser("demo.reorient"),
    "demo/fewshot.py": _module_parser("demo.fewshot"),
    "demo/evidence.py": _module_parser("demo.evidence"),
    "demo/compare.py": _module_parser("demo.compare"),
    "robustmedseg/federation/local.py": _module_parser("robustmedseg.federation.local"),
    "robustmedseg/federation/rehearsal.py": _module_parser("robustmedseg.federation.rehearsal"),
    "robustmedseg/fidelity.py": _module_parser("robustmedseg.fidelity"),
    **{f"bench/bench_{name}.py": _module_parser(f"bench.bench_{name}")
       for name in ("adaptation", "allocator", "factory_schedule", "federation", "generate", "gpu_check", "model",
                    "ops", "predict", "secagg", "steps", "train_step", "vessel_downsampling")},
}


def _scripts_in_repo() -> List[str]:
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True).stdout.split()
    if not files:  # not a git checkout: walk the tree
        files = [str(p.relative_to(REPO)) for p in REPO.rglob("*.py") if ".venv" not in p.parts]
    return sorted(f for f in files if not f.startswith(("tests/", "tools/"))  # developer tools: not the CLI
                  and 'if __name__ == "__main__"' in (REPO / f).read_text())


def _all_parsers(parser: argparse.ArgumentParser) -> List[argparse.ArgumentParser]:
    """The parser and its sub-command parsers."""
    out = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out += _all_parsers(sub)
    return out


def _other_spelling(option: str) -> str:
    words = option[2:]
    return "--" + (words.replace("_", "-") if "_" in words else words.replace("-", "_"))


def test_every_script_is_covered():
    assert _scripts_in_repo() == sorted(PARSERS)


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_every_flag_accepts_both_spellings(script):
    """Each multi-word flag of the script (and of its sub-commands), written the other way, is the same flag."""
    parser = PARSERS[script]()
    for p in _all_parsers(parser):
        assert isinstance(p, CliParser), f"{script} does not use robustmedseg.cli.CliParser"
        for option, action in p.flag_spellings().values():  # also refuses flags that differ only by _ / -
            other = _other_spelling(option)
            if other == option:
                continue
            assert p.normalize_flags([other, "x"]) == [option, "x"]
            assert p.normalize_flags([f"{other}=1"]) == [f"{option}=1"]


# one real parse per script: the same namespace from both spellings of a flag (and of its aliases)
PARSES = {
    "prepare_data.py": (["slices", "--out", "o", "--label", "1", "--n-domains", "2", "--clip-batch", "4"],
                        ["slices", "--out", "o", "--label", "1", "--n_domains", "2", "--clip_batch", "4"]),
    "train.py": (["--num_updates_per_round", "5", "--clip-weight", "50", "--latent", "64", "--batch", "3",
                  "--secagg", "--secagg-clip", "1.5"],
                 ["--num-updates-per-round", "5", "--clip_weight", "50", "--style-dim", "64", "--batch-size", "3",
                  "--secagg", "--secagg_clip", "1.5"]),
    "save_global_model.py": (["--researcher-dir", "r"], ["--researcher_dir", "r"]),
    "generate_volumes.py": (
        ["--ckpt_dir", "c", "--label", "0", "--n_volumes", "2", "--slices_in_one_z", "3",
         "--n_segmentation_labels", "3", "--z_depth", "29", "--out_dir", "o", "--keep-largest-component"],
        ["--checkpoint-dir", "c", "--label", "0", "--n-volumes", "2", "--slices-in-one-z", "3",
         "--label-nc", "3", "--n-zbins", "29", "--out-dir", "o", "--keep_largest_component"]),
    "MultiMedSeg/preprocess.py": (["--images", "i", "--out", "o", "--num-classes", "3", "--val-frac", "0.2"],
                                  ["--images", "i", "--out", "o", "--label_nc", "3", "--val_frac", "0.2"]),
    "MultiMedSeg/pretrain.py": (["--exp_dir", "e", "--batch_size", "2", "--label_nc", "3", "--disable_DSBN"],
                                ["--exp-dir", "e", "--batch-size", "2", "--num-classes", "3", "--disable-DSBN"]),
    "MultiMedSeg/train.py": (["--exp_dir", "e", "--ensemble_size", "2", "--one_target_slice"],
                             ["--exp-dir", "e", "--n-best", "2", "--one-target-slice"]),
    "MultiMedSeg/inference.py": (["--checkpoint_dir", "c", "--ensemble_weights", "0.5,0.5", "--label_nc", "3"],
                                 ["--checkpoint-dir", "c", "--ensemble-weights", "0.5,0.5",
                                  "--n_segmentation_labels", "3"]),
    "MultiMedSeg/predict.py": (["-i", "a", "b", "-o", "o", "--checkpoint_dir", "c", "--save_probabilities",
                                "--output_format", "input"],
                               ["--input", "a", "b", "--output=o", "--checkpoint-dir", "c", "--save-probabilities",
                                "--output-format", "input"]),
    "MultiMedSeg/plan.py": (["--checkpoint_dir", "c", "--metadata", "m"], ["--checkpoint-dir=c", "--metadata=m"]),
    "MultiMedSeg/select_evaluation.py": (["--checkpoint_dir", "c", "--ensemble_selection", "paper", "--val_root", "v"],
                                         ["--checkpoint-dir=c", "--ensemble-selection", "paper", "--val-root=v"]),
    "demo/run.py": (["--clip-model", "none", "--print-commands"], ["--clip_model", "none", "--print_commands"]),
    "demo/phantom.py": (["--out", "o", "--n-subjects", "2"], ["--out", "o", "--n_subjects", "2"]),
    "demo/report.py": (["--out", "o", "--target", "1"], ["--out=o", "--target=1"]),
    "demo/vessel_report.py": (["--out", "o", "--target", "1"], ["--out=o", "--target=1"]),
    "demo/reorient.py": (["--metadata", "m", "--out", "o", "--axcodes", "LPS"], ["--metadata=m", "--out=o", "--axcodes=LPS"]),
    "demo/fewshot.py": (["--labeled", "l", "--out", "o", "--label-nc", "3"],
                        ["--labeled=l", "--out=o", "--num_classes", "3"]),
    "demo/evidence.py": (["--seeds", "0,1", "--aggregate-only", "--out", "o"],
                         ["--seeds=0,1", "--aggregate_only", "--out=o"]),
    "demo/compare.py": (["a", "b", "--max-lines", "3"], ["a", "b", "--max_lines=3"]),
    "robustmedseg/federation/local.py": (["up", "--root", "r", "--dataset", "a=b"],
                                         ["up", "--root=r", "--dataset=a=b"]),
    "robustmedseg/federation/rehearsal.py": (["--out", "o", "--faults", "cut,slow", "--no-compare"],
                                             ["--out=o", "--faults=cut,slow", "--no_compare"]),
    "robustmedseg/fidelity.py": (["train", "--train", "0=a", "--heldout", "0=b", "--out", "e.pt",
                                          "--n-zbins", "5"],
                                         ["train", "--train=0=a", "--heldout=0=b", "--out=e.pt", "--n_zbins", "5"]),
    "bench/bench_adaptation.py": (["--work", "w", "--pretrain-steps", "3"], ["--work", "w", "--pretrain_steps", "3"]),
    "bench/bench_allocator.py": (["--rounds", "2", "--allocators", "system"], ["--rounds=2", "--allocators=system"]),
    "bench/bench_factory_schedule.py": (
        ["--lmdb", "a", "--evaluator", "e", "--mode", "central", "--out", "o", "--lr-mlp", "1", "--latent", "32"],
        ["--lmdb", "a", "--evaluator", "e", "--mode", "central", "--out=o", "--lr_mlp", "1", "--style-dim", "32"]),
    "bench/bench_federation.py": (["--updates", "3"], ["--updates=3"]),
    "bench/bench_generate.py": (["--n_zbins", "5", "--paper-load"], ["--n-zbins", "5", "--paper_load"]),
    "bench/bench_model.py": (["--channel-cap", "8", "--no-reg"], ["--channel_cap", "8", "--no_reg"]),
    "bench/bench_ops.py": (["--quick"], ["--quick"]),
    "bench/bench_gpu_check.py": (["--budget-s", "3", "--tiny"], ["--budget_s", "3", "--tiny"]),
    "bench/bench_predict.py": (["--batch-size", "2", "--skip-variants"], ["--batch_size=2", "--skip_variants"]),
    "bench/bench_secagg.py": (["--long-updates", "0", "--skip-federation"], ["--long_updates", "0", "--skip_federation"]),
    "bench/bench_steps.py": (["--ada-p", "0.1", "--paper-size", "16"], ["--ada_p=0.1", "--paper_size", "16"]),
    "bench/bench_train_step.py": (["--size", "32"], ["--size=32"]),
    "bench/bench_vessel_downsampling.py": (["--phantom", "p", "--site", "2"], ["--phantom=p", "--site=2"]),
}


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_both_spellings_parse_alike(script):
    one, other = PARSES[script]
    assert vars(PARSERS[script]().parse_args(one)) == vars(PARSERS[script]().parse_args(other))


def test_paper_command_lines_still_parse():
    import generate_volumes
    import train
    from MultiMedSeg.options import parse_inference_options, parse_training_options, training_parser

    a = train.build_parser().parse_args("--size 512 --n_domains 3 --augment --num_updates_per_round 2000 "
                                        "--rounds 350".split())
    assert (a.size, a.n_domains, a.augment, a.num_updates_per_round, a.rounds) == (512, 3, True, 2000, 350)
    b = train.build_parser().parse_args("--resume --num_updates_per_round 200 --rounds 385 --clip-weight 50 "
                                        "--clip-pretrained /w/ViT-L-14.pt".split())
    assert (b.resume, b.clip_weight, b.clip_pretrained) == ("LATEST", 50.0, "/w/ViT-L-14.pt")
    g = generate_volumes.build_parser().parse_args(
        "--ckpt_dir runs/pretrain --label 0 --n_volumes 50 --slices_in_one_z 10 --n_segmentation_labels 3 "
        "--out_dir fake".split())
    assert (g.ckpt_dir, g.n_segmentation_labels, g.z_depth) == (Path("runs/pretrain"), 3, None)
    pre = parse_training_options(("--exp_dir e --source_root s --val_root v --batch_size 8 --start_from_latent_avg "
                                  "--label_nc 3 --max_steps 15000 --stylegan_weights final_global_model.pt "
                                  "--only_intra --src_label 0").split(), "pretrain")
    assert (pre.batch_size, pre.label_nc, pre.max_steps, pre.only_intra) == (8, 3, 15000, True)
    assert training_parser("train").parse_args(["--one_target_slice"]).one_target_slice
    inf = parse_inference_options("--exp_dir o --checkpoint_dir c --target_data d --ensemble_size 5".split())
    assert inf.ensemble_size == 5


def test_train_flags_are_the_factory_config_fields():
    """train.py's model flags are FactoryConfig's fields, with FactoryConfig's defaults."""
    import dataclasses

    import train
    from robustmedseg.factory.config import FactoryConfig

    args = train.build_parser().parse_args([])
    cfg = train._config_from_args(args)
    assert cfg == FactoryConfig()  # no flag repeats (or changes) a default
    fields = {f.name for f in dataclasses.fields(FactoryConfig)}
    assert set(train.FLAG_FIELDS) <= fields
    # not flags of their own: secagg_clip and secagg_weighting follow --secagg, --secagg-clip and --aggregation.
    assert fields - set(train.FLAG_FIELDS) == {"clip_prob", "run_id", "secagg_clip", "secagg_weighting", "site_keys"}


def test_factory_config_errors_name_the_flag(capsys):
    """A value FactoryConfig refuses is one line naming the flag (--ada_rot90), and the original's ADA draw is
    reachable from the command line (issue 21)."""
    import train

    assert train._config_from_args(train.build_parser().parse_args(["--ada_rot90", "original"])).ada_rot90 == "original"
    for argv, flag in ((["--ada_rot90", "sideways"], "--ada_rot90"), (["--size", "33"], "--size")):
        with pytest.raises(InputError) as ex:
            train._config_from_args(train.build_parser().parse_args(argv))
        assert str(ex.value).startswith(f"{flag} must be"), str(ex.value)


def test_usage_error_is_one_line(capsys):
    import prepare_data

    with pytest.raises(SystemExit) as ex:
        prepare_data.build_parser().parse_args(["slices", "--out", "o", "--label", "x"])
    err = capsys.readouterr().err.strip()
    assert ex.value.code == 2 and err.startswith("error: ") and "\n" not in err and "--label" in err


def test_prefixes_and_collisions():
    p = CliParser(prog="t")
    p.add_argument("--num_updates_per_round", type=int)
    p.add_argument("--n-domains", type=int)
    assert p.parse_args(["--num-updates", "3", "--n_dom", "2"]).num_updates_per_round == 3
    assert p.normalize_flags(["--n_domains", "--", "--n_domains"]) == ["--n-domains", "--", "--n_domains"]
    p.add_argument("--n_domains_extra", type=int)
    with pytest.raises(SystemExit):  # an ambiguous prefix stays an argparse error
        p.parse_args(["--n_dom", "2"])
    bad = CliParser(prog="t")
    bad.add_argument("--a-b")
    bad.add_argument("--a_b")
    with pytest.raises(ValueError, match="differ only"):
        bad.parse_args([])


# ------------------------------------------------------------------------------------------ console scripts
def _console_scripts() -> Dict[str, str]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_user_facing_command_has_a_console_script():
    scripts = _console_scripts()
    expected = {"rms-preprocess", "rms-prepare-data", "rms-federation", "rms-train", "rms-export", "rms-pretrain",
                "rms-generate", "rms-adapt", "rms-infer", "rms-plan", "rms-predict", "rms-select-evaluation",
                "rms-demo", "rms-phantom"}
    assert set(scripts) == expected
    assert all(name.startswith("rms-") and name == name.lower() for name in scripts)
    # the modules behind them are installed: a top-level py-module or a module of an installed package
    tomllib = pytest.importorskip("tomllib")
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = [p.rstrip("*") for p in tool["packages"]["find"]["include"]]
    for target in scripts.values():
        module = target.split(":")[0]
        assert module in tool["py-modules"] or module.split(".")[0] in packages, target


@pytest.mark.parametrize("name", sorted(_console_scripts()) if sys.version_info >= (3, 11) else [])
def test_console_script_resolves_and_answers_help(name, capsys):
    """The entry point object exists, runs its script's main() and answers --help (exit 0)."""
    module, attr = _console_scripts()[name].split(":")
    entry = getattr(importlib.import_module(module), attr)
    with pytest.raises(SystemExit) as info:
        entry(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--help" in out
    with pytest.raises(SystemExit) as info:  # the one-line usage-error policy, as `python script.py`
        entry(["--no-such-flag"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


# ------------------------------------------------------------------------------------------ usage lines
def _help(*command: str, cwd: Path = REPO, name: str = "") -> str:
    import os

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, *command, "--help"], cwd=cwd, capture_output=True, text=True,
                         timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    return res.stdout


def _installed_console_script(name: str, module: str) -> bool:
    from importlib.metadata import entry_points

    return any(e.name == name and e.value.startswith(module + ":") for e in entry_points(group="console_scripts"))


def test_program_name_follows_the_invocation(tmp_path):
    """`python -m X` shows `python -m X`, `python X.py` the path typed, a console script its own name."""
    assert _help("-m", "MultiMedSeg.predict").startswith("usage: python -m MultiMedSeg.predict ")
    assert _help("MultiMedSeg/predict.py").startswith("usage: MultiMedSeg/predict.py ")
    assert _help("-m", "MultiMedSeg.preprocess").startswith("usage: python -m MultiMedSeg.preprocess ")
    assert _help("MultiMedSeg/preprocess.py").startswith("usage: MultiMedSeg/preprocess.py ")
    for name, module in (("rms-predict", "MultiMedSeg.predict"), ("rms-preprocess", "MultiMedSeg.preprocess")):
        if not _installed_console_script(name, module):
            pytest.skip("the project is not installed (pip install -e .): no console-script metadata")
        wrapper = tmp_path / name  # what pip writes for a console script: import the entry point and call it
        wrapper.write_text(f"import sys\nfrom {module} import cli\nsys.exit(cli())\n")
        assert _help(str(wrapper)).startswith(f"usage: {name} "), name
    # inside another process (a test, a library call) the parser keeps its documented name
    from MultiMedSeg.options import predict_parser

    assert predict_parser().prog == "MultiMedSeg/predict.py"


def _usage(parser: argparse.ArgumentParser) -> str:
    return " ".join(parser.format_usage().split())


def test_required_flags_are_shown_as_required():
    from MultiMedSeg import preprocess
    from MultiMedSeg.options import inference_parser, predict_parser, training_parser

    usage = _usage(predict_parser())
    for shown in ("-i PATH [PATH ...]", "-o OUT", "--checkpoint_dir CHECKPOINT_DIR"):
        assert f" {shown}" in usage and f"[{shown}" not in usage, (shown, usage)
    assert "[--device" in usage  # an optional flag keeps its brackets
    assert " --exp_dir EXP_DIR" in _usage(inference_parser()) and "[--exp_dir" not in _usage(inference_parser())
    for flag in ("--exp_dir EXP_DIR", "--src_label SRC_LABEL", "--tgt_label TGT_LABEL",
                 "--checkpoint_dir CHECKPOINT_DIR"):
        assert f" {flag}" in _usage(training_parser("train")) and f"[{flag}" not in _usage(training_parser("train"))
    assert " --images IMAGES" in _usage(preprocess.build_parser())
    # shown as required, still checked by the command (the value may come from --config): the one-line error
    p = predict_parser()
    assert all(not a.required for a in p._actions)
    from MultiMedSeg.options import parse_predict_options
    from robustmedseg.errors import InputError

    with pytest.raises(InputError, match="^-i is required$"):
        parse_predict_options(["-o", "x", "--checkpoint_dir", "y"])


def test_train_usage_uses_one_spelling_style():
    """rms-train's usage writes every multi-word flag with '_' (the other spelling stays accepted)."""
    import train

    usage = _usage(train.build_parser())
    dashed = sorted({flag for flag in usage.replace("[", " ").replace("]", " ").replace("|", " ").split()
                     if flag.startswith("--") and "-" in flag[2:]})
    assert not dashed, dashed
    args = train.build_parser().parse_args(["--max-nodes-per-round", "3", "--no-secagg", "--no-allow-tf32",
                                            "--researcher-dir", "r"])
    assert args.max_nodes == 3 and args.secagg is False and args.allow_tf32 is False
    assert str(args.researcher_dir) == "r"
    assert train.build_parser().parse_args(["--secagg", "--allow_tf32"]).allow_tf32 is True


def test_missing_backbone_weights_name_the_flag(tmp_path):
    """The README's P2a command without the ArcFace file: the error names --backbone_weights."""
    from MultiMedSeg.models.iresnet import IResNet, load_arcface_weights
    from robustmedseg.errors import InputError

    with pytest.raises(InputError) as info:
        load_arcface_weights(IResNet([1, 1, 1, 1], base_channels=8), tmp_path / "backbone.pth")
    message = str(info.value)
    assert "backbone.pth" in message and "--backbone_weights" in message and "not found" in message


def test_preprocess_and_generate_flags_are_their_config_fields():
    """preprocess.py's and generate_volumes.py's flags are generated from PreprocessConfig and GenerationConfig
    (same fields, same defaults; a field without a default is a required flag); --help imports no torch."""
    import dataclasses

    import generate_volumes
    from MultiMedSeg import preprocess
    from MultiMedSeg.data.volumes_to_slices import PreprocessConfig
    from MultiMedSeg.options import GenerationConfig

    p = preprocess.build_parser()
    dests = {a.dest for a in p._actions} - {"help", "convert_legacy", "quiet"}
    assert dests == {f.name for f in dataclasses.fields(PreprocessConfig)}
    cfg = preprocess.config_from_args(p.parse_args(["--images", "i", "--out", "o", "--target-spacing", "1", "2", "3",
                                                    "--no-crop", "--num_classes", "4", "--no-standardize"]))
    assert cfg == PreprocessConfig(images=Path("i"), out=Path("o"), target_spacing=(1.0, 2.0, 3.0), crop=False,
                                   num_classes=4, standardize=False)
    assert preprocess.config_from_args(p.parse_args(["--images", "i", "--out", "o"])) == \
        PreprocessConfig(images=Path("i"), out=Path("o"))
    g = generate_volumes.build_parser()
    actions = {a.dest: a for a in g._actions if a.dest not in ("help", "quiet")}
    fields = {f.name: f for f in dataclasses.fields(GenerationConfig)}
    assert set(actions) == set(fields)
    for name, f in fields.items():
        if f.default is not dataclasses.MISSING:
            assert actions[name].default == f.default, name
        else:
            assert actions[name].required, name
    args = g.parse_args(["--ckpt_dir", "c", "--label", "0", "--n_volumes", "2", "--slices_in_one_z", "3",
                         "--n_segmentation_labels", "3", "--out_dir", "o", "--no-nifti", "--z_depth", "5"])
    assert g.build(args) == GenerationConfig(ckpt_dir=Path("c"), label=0, n_volumes=2, slices_in_one_z=3,
                                             n_segmentation_labels=3, out_dir=Path("o"), nifti=False, z_depth=5)
    import os

    code = "import sys, generate_volumes, MultiMedSeg.preprocess as p; p.build_parser(); " \
           "generate_volumes.build_parser(); print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert res.stdout.strip() == "False", res.stderr


def _assert_flags_are_fields(parser, options: type, others=()) -> None:
    """Every destination of ``parser`` (but ``others``, flags that are not options) is a field of ``options``
    and every field a destination, with the field's default (a field without one: a required flag)."""
    import dataclasses

    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", *others)}
    fields = {f.name: f for f in dataclasses.fields(options)}
    assert set(actions) == set(fields), options.__name__
    for name, f in fields.items():
        if f.default is not dataclasses.MISSING:
            assert actions[name].default == f.default, name
        else:
            assert actions[name].required or not actions[name].option_strings, name


def test_phase1_command_flags_are_their_options_fields():
    """save_global_model.py's, prepare_data.py's and train.py's flags are the fields of ExportOptions,
    PrepareOptions and ResearcherOptions (+ train.py's FactoryConfig flags): same names, same defaults (a field
    without a default is a required flag), and their main() reads one."""
    import prepare_data
    import save_global_model
    import train
    from robustmedseg.data.lmdb_store import PrepareOptions
    from robustmedseg.federation.options import ExportOptions, ResearcherOptions

    p = save_global_model.build_parser()
    _assert_flags_are_fields(p, ExportOptions)
    assert p.build(p.parse_args([])) == ExportOptions()
    assert p.build(p.parse_args(["--researcher_dir", "r", "--breakpoint", "b", "--out", "f.pt"])) == \
        ExportOptions(researcher_dir=Path("r"), breakpoint=Path("b"), out=Path("f.pt"))
    p = prepare_data.build_parser()
    _assert_flags_are_fields(p, PrepareOptions)
    assert prepare_data.options_from_args(p, p.parse_args(["s", "--out", "o", "--label", "1"])) == \
        PrepareOptions(source=Path("s"), out=Path("o"), label=1)
    args = p.parse_args(["s", "--out", "o", "--label", "1", "--size", "256,512", "--clip-model", "none",
                         "--no-clip-quick-gelu", "--quiet", "--recursive", "--n_zbins", "7"])
    assert prepare_data.options_from_args(p, args) == \
        PrepareOptions(source=Path("s"), out=Path("o"), label=1, sizes=(256, 512), clip_model=None,
                       clip_quick_gelu=False, progress=False, recursive=True, n_zbins=7)
    p = train.build_parser()
    _assert_flags_are_fields(p, ResearcherOptions, others=tuple(train.FLAG_FIELDS))
    assert p.build(p.parse_args([])) == ResearcherOptions()
    args = p.parse_args(["--max-nodes-per-round", "3", "--batch_size", "8", "--secagg", "--resume", "--tags", "a,,b",
                         "--researcher-dir", "r", "--wait_nodes", "5", "--size", "64"])
    assert p.build(args) == ResearcherOptions(max_nodes=3, batch=8, secagg=True, resume="LATEST", tags="a,,b",
                                              researcher_dir=Path("r"), wait_nodes=5.0)
    assert p.build(args).tag_list == ["a", "b"] and p.build(args).resume_breakpoint is None
    assert p.build(p.parse_args(["--resume", "bk"])).resume_breakpoint == Path("bk")
    assert vars(train.build_parser(suppress=True).parse_args(["--rounds", "5", "--no-secagg", "--size", "64"])) == \
        {"rounds": 5, "secagg": False, "size": 64}  # only the flags given (what --resume changes)

"""Evaluate a trained vitmha checkpoint and write a report with per-class numbers and pictures.

    vitmha evaluate --checkpoint last.ckpt --config configs/quickstart.yaml --split val --output report/

Runs ``trainer.validate`` (``--split val``) or ``trainer.test`` (``--split test``) on the data module of the
config (its ``data:`` section; the run's own data module, saved in the checkpoint, when ``--config`` is
left out) and writes, for a classifier: confusion_matrix.png/.csv, per_class.csv (precision, recall, F1,
support, AUROC), roc_curves.png (one-vs-rest), auroc.json, summary.json; for a segmenter:
per_class_iou.csv, confusion_matrix.png/.csv, samples.png (image | truth | prediction), summary.json.
summary.json holds the metrics exactly as the task logs them (``val/acc``, ``test/miou``, ...).

Several checkpoints of one task and classes are an ensemble (``vitmha.fusion.EnsembleTask``): the mean of their
probabilities (per pixel for a segmenter), each member computing them as its own evaluation does, scored with
the first one's metrics and report; summary.json then names the members under ``ensemble``.

    vitmha evaluate --checkpoint a.ckpt b.ckpt c.ckpt --config configs/quickstart.yaml --output report/

With ``--robustness`` it also writes robustness.csv and robustness.png: accuracy (classifier) or mIoU
(segmenter) on the whole split (``--subset N``: its first N samples; the report says which), clean, under
Gaussian noise, Gaussian blur, JPEG, brightness and contrast (severity levels 1, 3, 5 of 5; all five with
``--robustness_full``), and under FGSM and 10-step PGD at ε = 1/255, 4/255, 16/255 in [0, 1] pixel units
(1, 2, 4, 8, 16 /255 with ``--robustness_full``). Corruptions and attacks act on the un-normalised pixels; the
levels are listed in vitmha/robustness.py.

    vitmha evaluate --checkpoint last.ckpt --config configs/quickstart.yaml --split val --output report/ --robustness
"""
from __future__ import annotations

import argparse
import inspect
import os
import re
import sys
from typing import Any, Dict, Optional, Sequence


from vitmha.inference import ToolError, load_task, read_checkpoint, run_tool, task_class_path


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line (``argv`` entries may be paths; default ``sys.argv[1:]``)."""
    argv = None if argv is None else [str(a) for a in argv]
    p = argparse.ArgumentParser(prog="vitmha evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--checkpoint", required=True, nargs="+",
                   help="Lightning checkpoint of a vitmha task; several (of one task and classes) = an ensemble: "
                        "the mean of their probabilities, scored with the first one's metrics and report")
    p.add_argument("--config", default=None,
                   help="YAML config whose data: section gives the data module (default: the one saved in the checkpoint)")
    p.add_argument("--split", choices=("val", "test"), default="test", help="which split to evaluate (default test)")
    p.add_argument("--output", required=True, help="folder for the report (created)")
    p.add_argument("--batch-size", type=int, default=None, help="override the data module's batch size")
    p.add_argument("--num-workers", type=int, default=None, help="override the data module's loader workers")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--precision", choices=("fp32", "bf16", "int8"), default="fp32",
                   help="fp32 (default); bf16 weights (fast on CPUs with AMX/AVX512-BF16 and on GPUs); int8: "
                        "dynamically quantised linear layers (torchao); see vitmha.precision")
    p.add_argument("--samples", type=int, default=6, help="segmentation images drawn in samples.png")
    r = p.add_argument_group("robustness (vitmha.robustness)")
    r.add_argument("--robustness", action="store_true",
                   help="also write robustness.csv/.png: the metric under corruptions and FGSM/PGD attacks")
    r.add_argument("--robustness_full", "--robustness-full", action="store_true", default=None,
                   help="5 severity levels and 5 ε instead of 3 and 3")
    r.add_argument("--subset", "--robustness_subset", "--robustness-subset", dest="robustness_subset", type=int,
                   default=None, metavar="N",
                   help="score only the first N samples of the split, the same for every row (default: the whole "
                        "split; 0 = the whole split); the report says how many samples it used")
    r.add_argument("--robustness_corruptions", "--robustness-corruptions", default=None, metavar="LIST",
                   help="comma-separated subset of gaussian_noise, gaussian_blur, jpeg, brightness, contrast, "
                        "fgsm, pgd (default all)")
    r.add_argument("--robustness_eps", "--robustness-eps", default=None, metavar="LIST",
                   help="attack ε in [0, 1] pixel units, comma-separated; fractions allowed (e.g. 2/255,8/255)")
    r.add_argument("--robustness_pgd_steps", "--robustness-pgd-steps", type=int, default=None, metavar="K",
                   help="PGD steps (default 10, each of ε/4)")
    r.add_argument("--robustness_seed", "--robustness-seed", type=int, default=None,
                   help="seed of the noise and of PGD's random start (default 0)")
    args = p.parse_args(argv)
    args.checkpoints, args.checkpoint = list(args.checkpoint), args.checkpoint[0]  # the first one's data and report
    return args


def _flag(key: str) -> str:
    """The command-line flag of a RobustnessSpec field."""
    return {"perturbations": "--robustness_corruptions", "subset": "--subset"}.get(key, f"--robustness_{key}")


def robustness_spec(args):
    """The robustness sweep the options ask for (None without ``--robustness``); ToolError on a bad option."""
    from vitmha.robustness import RobustnessError, RobustnessSpec

    options = {"full": args.robustness_full, "subset": args.robustness_subset,
               "perturbations": args.robustness_corruptions, "eps": args.robustness_eps,
               "pgd_steps": args.robustness_pgd_steps, "seed": args.robustness_seed}
    if not args.robustness:
        given = [k for k, v in options.items() if v is not None]
        if given:
            raise ToolError(f"{_flag(given[0])}: only applies with --robustness")
        return None
    kwargs = {k: v for k, v in options.items() if v is not None}
    for key in kwargs:
        try:
            RobustnessSpec.create(**{key: kwargs[key]})
        except RobustnessError as e:
            raise ToolError(f"{_flag(key)}: {e}") from None
    return RobustnessSpec.create(**kwargs)


def _data_section(args, ckpt: Dict[str, Any]) -> Dict[str, Any]:
    """``{"class_path": ..., "init_args": {...}}`` from the config file or the checkpoint."""
    if args.config:
        import yaml

        if not os.path.isfile(args.config):
            raise ToolError(f"{args.config}: config file not found")
        try:
            with open(args.config) as f:
                cfg = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ToolError(f"{args.config}: not valid YAML ({e})") from None
        model = cfg.get("model") if isinstance(cfg, dict) else None
        model_class = str(model.get("class_path", "")) if isinstance(model, dict) else ""
        task_class = task_class_path(ckpt, args.checkpoint)
        if model_class and model_class.rsplit(".", 1)[-1] != task_class.rsplit(".", 1)[-1]:
            raise ToolError(f"{args.checkpoint}: a checkpoint of {task_class}, but {args.config} is a config for "
                            f"{model_class} (its data would not fit)")
        data = cfg.get("data") if isinstance(cfg, dict) else None
        if not isinstance(data, dict) or "class_path" not in data:
            raise ToolError(f"{args.config}: no data: section with a class_path (expected data: {{class_path: ..., "
                            "init_args: {...}}})")
        return {"class_path": data["class_path"], "init_args": dict(data.get("init_args") or {})}
    dm = dict(ckpt.get("datamodule_hyper_parameters") or {})
    cp = dm.pop("_class_path", None)
    dm.pop("_instantiator", None)
    if not cp:
        raise ToolError(f"{args.checkpoint}: the checkpoint does not say which data module the run used; "
                        "pass --config with a data: section")
    return {"class_path": cp, "init_args": dm}


def build_datamodule(section: Dict[str, Any], task: Any, where: str):
    """Instantiate the data module as LightningCLI does (jsonargparse, same type checks), with the CLI's
    link from the model's ``backbone`` (the data module then normalises with its pretrained mean/std)."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    init_args = dict(section["init_args"])
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data", required=True)
    try:
        cls = _import(str(section["class_path"]))
        if cls is not None and "backbone" in inspect.signature(cls.__init__).parameters \
                and init_args.get("backbone") is None:
            init_args["backbone"] = task.hparams.backbone
        cfg = parser.parse_object({"data": {"class_path": section["class_path"], "init_args": init_args}})
        instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
        return instantiate(cfg).data
    except ToolError:
        raise
    except Exception as e:  # noqa: BLE001 - jsonargparse and the data module raise many kinds
        from vitmha.errors import user_error

        err = user_error(e)
        if err is not None:
            raise
        msg = " ".join(str(e).split())
        m = re.search(r"Problem with given class_path '([^']+)': (.*?)(?: - Expected a |$)", msg)
        if m:  # jsonargparse's Union noise around the one line that matters
            msg = f"{m.group(1)}: {m.group(2)}"
        raise ToolError(f"{where}: cannot build the data module ({msg[:600]})") from None


def _import(path: str):
    """The class at a dotted path, or None (jsonargparse then resolves or rejects the name)."""
    import importlib

    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None) if module else None
    except ImportError:
        return None


@run_tool
def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    spec = robustness_spec(args)
    import logging
    import warnings

    import lightning as L

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no GPU/TPU banner or tips
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    from vitmha.inference import resolve_device
    from vitmha.reports import EvaluationReport

    ckpt = read_checkpoint(args.checkpoint)
    device = resolve_device(args.device)
    task = load_task(args.checkpoint, ckpt=ckpt)
    if spec is not None:
        from vitmha.robustness import RobustnessError, check_task

        try:
            check_task(task)
        except RobustnessError as e:
            raise ToolError(f"{args.checkpoint}: --robustness: {e}") from None
    section = _data_section(args, ckpt)
    for key, value in (("batch_size", args.batch_size), ("num_workers", args.num_workers)):
        if value is not None:
            section["init_args"][key] = value
    dm = build_datamodule(section, task, args.config or args.checkpoint)
    dm_classes = getattr(dm, "num_classes", None)
    if dm_classes is not None and int(dm_classes) != int(task.hparams.num_classes):
        raise ToolError(f"{args.config or args.checkpoint}: the data has {dm_classes} classes, the checkpoint "
                        f"{task.hparams.num_classes}")
    if len(args.checkpoints) > 1:  # an ensemble: vitmha.fusion.EnsembleTask averages the members' probabilities
        from vitmha.fusion import load_ensemble

        task = load_ensemble(args.checkpoints, dm, first=(task, ckpt))
    from vitmha.precision import prepare_inference

    task = prepare_inference(task, args.precision, device)
    stage = "validate" if args.split == "val" else "test"
    report = EvaluationReport(output_dir=args.output, stages=(stage,), num_samples=args.samples)
    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, callbacks=[report],
                        default_root_dir=args.output)
    run = trainer.validate if stage == "validate" else trainer.test
    logged = run(task, datamodule=dm, verbose=False)[0]
    result = report.result or {}
    members = f" of an ensemble of {len(args.checkpoints)}: {', '.join(args.checkpoints)}" \
        if len(args.checkpoints) > 1 else ""
    print(f"wrote the {args.split} report{members} to {args.output}:")
    for name, path in sorted(report.files.items()):
        print(f"  {path}")
    for k, v in sorted((result.get("metrics") or {}).items()):
        print(f"  {k} = {v:.4f}")
    out = {"logged": logged, "result": result, "files": report.files}
    if spec is not None:
        out["robustness"] = robustness_report(task, dm, args, spec, device, out["files"])
    return out


def robustness_report(task, dm, args, spec, device, files: Dict[str, Any]):
    """Run the sweep of ``spec`` on the split's loader, print the table and write robustness.csv/.png."""
    from vitmha import robustness as rb

    mean, std = getattr(dm, "mean", None), getattr(dm, "std", None)
    if mean is None or std is None:
        raise ToolError(f"{args.config or args.checkpoint}: the data module has no mean/std, which --robustness "
                        "needs to undo the normalisation")
    loader = dm.val_dataloader() if args.split == "val" else dm.test_dataloader()
    prefix = "val/" if args.split == "val" else "test/"
    res = rb.robustness_sweep(task, loader, mean, std, spec, prefix=prefix, device=device)
    files["robustness_csv"] = rb.write_csv(res, os.path.join(args.output, "robustness.csv"))
    members = getattr(args, "checkpoints", [args.checkpoint])
    name = os.path.basename(args.checkpoint) if len(members) == 1 else f"ensemble of {len(members)}"
    title = f"{name}: {args.split} split"
    files["robustness_png"] = rb.save_robustness_plot(res, os.path.join(args.output, "robustness.png"), title=title)
    files["robustness_json"] = rb.write_json(res, os.path.join(args.output, "robustness.json"))
    print(f"robustness on {res.describe()} of the {args.split} split ({res.seconds:.1f} s; corruptions on "
          "[0, 1] pixels, ε in [0, 1] pixel units):")
    print(rb.format_table(res))
    print(f"  {files['robustness_csv']}\n  {files['robustness_png']}\n  {files['robustness_json']}")
    return res


if __name__ == "__main__":
    main()

"""The ``vitmha`` command: ``vitmha <command> ...`` (``vitmha --help`` lists them).

``fit``, ``validate`` and ``test`` are a :class:`~lightning.pytorch.cli.LightningCLI` in subclass mode: any
LightningModule goes under ``model:`` and any LightningDataModule under ``data:`` (``class_path`` +
``init_args``); ``num_classes`` is given once, by the data module, and linked to the model. The trainer is
:class:`vitmha.Trainer` (loggers, atomic checkpoints, preemption handling, reports: see there), and

- ``seed_everything: 0`` unless given (the data modules and tasks derive every epoch's randomness from it,
  which is what makes ``--ckpt_path last.ckpt`` resume bit-exactly);
- ``--ckpt_path`` is checked before anything runs: a missing, unreadable or code-carrying file, or one whose
  weights do not fit the model the config builds, is one ``error:`` line; ``--ckpt_path last`` is the
  newest run's ``last.ckpt`` under ``<trainer.default_root_dir>/lightning_logs``. The config is kept as
  given (LightningCLI would replace the model's arguments with the checkpoint's hyper-parameters), and the
  model is built without reading its ``pretrained`` weights: the checkpoint holds them.

The other commands live in :mod:`vitmha.commands`, one module each. Errors in the config are reported by
jsonargparse with the offending key. vitmha's own user-facing errors (bad data, missing weights, a bad
checkpoint, a diverged run, a full disk) print as ``error: ...`` with exit code 2; set ``VITMHA_TRACEBACK=1``
to see the traceback instead.
"""
from __future__ import annotations

import os
import sys
from typing import Any, NoReturn, Optional

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from vitmha.callbacks import task_monitor
from vitmha.checkpoints import CheckpointError, check_fits, find_last_checkpoint, read_checkpoint
from vitmha.errors import exit_on_user_error
from vitmha.trainer import LOG_NAME, Trainer

__all__ = ["VitmhaCLI", "cli_main", "COMMANDS", "default_monitor"]

default_monitor = task_monitor  # the name this module has always exported


_UNION_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes: [",
    "Errors:",
    "- Expected a <class 'NoneType'>",
    "Given value type:",
)


class VitmhaArgumentParser(LightningArgumentParser):
    """LightningCLI's parser; a bad option prints one short message (key and reason), not the usage."""

    _quiet_usage = False

    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        if self.exit_on_error:
            lines = [ln for ln in message.splitlines() if not any(n in ln for n in _UNION_NOISE)]
            message = "\n".join(lines)
            VitmhaArgumentParser._quiet_usage = True
        try:
            super().error(message, ex)
        finally:
            VitmhaArgumentParser._quiet_usage = False

    def print_usage(self, file: Any = None) -> None:
        if not VitmhaArgumentParser._quiet_usage:
            super().print_usage(file)


class VitmhaCLI(LightningCLI):
    """LightningCLI for vitmha tasks and data modules, with vitmha's run-directory defaults.

    Any LightningModule/LightningDataModule works (subclass mode); see the module docstring for defaults.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        save_config_kwargs = {"overwrite": True, **(kwargs.pop("save_config_kwargs", None) or {})}
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("parser_class", VitmhaArgumentParser)
        kwargs.setdefault("trainer_class", Trainer)
        # a fixed default seed: runs repeat, and a resumed run reseeds exactly as the first one did
        kwargs.setdefault("seed_everything_default", 0)
        parser_kwargs = {"description": "vitmha: train, validate and test vision transformers (LightningCLI).",
                         "prog": "vitmha"}
        kwargs["parser_kwargs"] = {**parser_kwargs, **(kwargs.get("parser_kwargs") or {})}
        super().__init__(
            LightningModule, LightningDataModule, *args, save_config_kwargs=save_config_kwargs, **kwargs
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test; predicting is ``vitmha predict`` (images in, files out)."""
        every = LightningCLI.subcommands()
        return {name: every[name] for name in LIGHTNING_COMMANDS}

    # ------------------------------------------------------------------------------------------ parsing
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        # the data module normalises with the backbone's pretrained mean/std; a data module or model
        # without a `backbone` argument simply gets no link
        parser.link_arguments("model.init_args.backbone", "data.init_args.backbone", apply_on="parse")
        # images are read with the channels the patch embedding takes: backbone_kwargs.in_chans (default 3)
        parser.link_arguments("model.init_args.backbone_kwargs", "data.init_args.in_chans",
                              compute_fn=backbone_in_chans, apply_on="parse")

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if any(action.dest == "weights_only" for action in parser._actions):
            # Lightning passes None on to torch.load, which unpickles anything from a URL: only tensors here
            parser.set_defaults(weights_only=True)
        return parser

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # as LightningCLI's, without its warning when both `args` and sys.argv are given: tools/train.py
        # passes its own list while sys.argv stays as typed, so DDP can relaunch the same command
        if isinstance(args, dict) or hasattr(args, "as_dict"):
            self.config = parser.parse_object(args)
        else:
            self.config = parser.parse_args(args)

    # ------------------------------------------------------------------------------------- checkpoints
    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` right after parsing, before anything is seeded, built or written: resolve
        ``last``, and read the file safely, so that a bad file is one error line and starts no run folder.

        This replaces LightningCLI's step of the same name, which unpickles the file unguarded (a bad file
        ends in a traceback) and replaces the model's arguments with the checkpoint's hyper-parameters,
        silently overriding the command line. Here the config stays as given, and
        :meth:`_check_checkpoint_fits` checks that the checkpoint fits the model it builds.
        """
        self._checkpoint: Optional[tuple[str, dict]] = None
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        path = config.get("ckpt_path")
        if path == "last":
            path = config.ckpt_path = self._newest_last_checkpoint(_root_dir(config.get("trainer") or {}))
        if path is None or path in ("best", "hpc") or "://" in str(path) or os.path.isdir(path):
            return  # Lightning's special values, remote files and sharded checkpoint folders are Lightning's
        self._checkpoint = (os.fspath(path), read_checkpoint(path))

    def before_instantiate_classes(self) -> None:
        if not hasattr(self, "_checkpoint"):  # a Lightning whose LightningCLI has no _parse_ckpt_path step
            self._parse_ckpt_path()

    @staticmethod
    def _newest_last_checkpoint(root: str) -> str:
        """``--ckpt_path last``: the newest run's last.ckpt (Lightning's ``last`` looks only in the new run's
        own, empty, folder, and starts from scratch with just a warning)."""
        versions = os.path.join(root, LOG_NAME)
        last = find_last_checkpoint(versions)
        if last is None:
            pattern = os.path.join(versions, "version_*", "checkpoints", "last.ckpt")
            raise CheckpointError(f"--ckpt_path last: no {pattern} (set trainer.default_root_dir to the runs' root, "
                                  "or give the file)")
        rank_zero_only(print)(f"--ckpt_path last: {last}", flush=True)
        return last

    def _check_checkpoint_fits(self) -> None:
        """The checkpoint read in :meth:`_parse_ckpt_path` must hold this model's weights (a model
        that builds its layers in ``configure_model`` has none yet, and is left to Lightning)."""
        checkpoint, self._checkpoint = getattr(self, "_checkpoint", None), None
        lazy = type(self.model).configure_model is not LightningModule.configure_model
        if checkpoint is not None and not lazy:
            check_fits(checkpoint[1], self.model, checkpoint[0])

    # ------------------------------------------------------------------------------------- instantiate
    def instantiate_classes(self) -> None:
        """As LightningCLI's; with a checkpoint to start from, the model is built without reading its
        ``pretrained`` weights (the checkpoint holds every weight, so a moved weights file does not matter)."""
        from vitmha.tasks.base import weights_from_checkpoint

        config = self.config.get(self.config.get("subcommand") or "", None) if "subcommand" in self.config else None
        with weights_from_checkpoint(bool(config is not None and config.get("ckpt_path"))):
            super().instantiate_classes()

    def before_fit(self) -> None:
        self._check_checkpoint_fits()

    before_test = before_validate = before_fit


def backbone_in_chans(backbone_kwargs: Any) -> int:
    """The image channels a task's ``backbone_kwargs`` give its backbone (3 unless ``in_chans`` is set)."""
    return int((backbone_kwargs or {}).get("in_chans", 3))


def _root_dir(trainer_config: Any) -> str:
    """Where the run folders go: ``trainer.default_root_dir``, else the working directory (Lightning's rule)."""
    return trainer_config.get("default_root_dir") or os.getcwd()


#: every ``vitmha`` subcommand: (module with ``main(argv)``, or None for LightningCLI's, and its summary)
COMMANDS: dict[str, tuple[Optional[str], str]] = {
    "fit": (None, "train a task from a YAML config (--config X.yaml [--section.key value ...] [--ckpt_path C])"),
    "validate": (None, "run the validation split through a checkpoint (--config X.yaml --ckpt_path C)"),
    "test": (None, "run the test split through a checkpoint and write the evaluation report"),
    "predict": ("vitmha.commands.predict", "labels, probabilities or masks for images, folders or globs"),
    "evaluate": ("vitmha.commands.evaluate", "an evaluation report of a checkpoint (per class; --robustness)"),
    "export": ("vitmha.commands.export", "a checkpoint as ONNX, TorchScript, timm safetensors or PEFT weights"),
    "explain": ("vitmha.commands.explain", "relevance maps of a prediction (attention, rollout, Chefer, IG, ...)"),
    "attention": ("vitmha.commands.attention", "attention maps of a checkpoint or backbone on an image"),
    "reconstruct": ("vitmha.commands.reconstruct", "original | masked | reconstruction of images by an MAE checkpoint"),
    "tune": ("vitmha.commands.tune", "hyper-parameter or architecture search with Optuna"),
    "soup": ("vitmha.commands.soup", "average fine-tuned checkpoints: uniform or greedy model soups, WiSE-FT"),
    "parity": ("vitmha.commands.parity", "compare vitmha with timm on every timm ViT architecture"),
    "seed-cache": ("vitmha.commands.seed_cache", "put a weights file in the Hugging Face cache for offline use"),
}
LIGHTNING_COMMANDS = tuple(name for name, (module, _) in COMMANDS.items() if module is None)


def usage() -> str:
    """The top-level ``vitmha --help``: every subcommand with its summary."""
    from vitmha import __version__

    width = max(map(len, COMMANDS)) + 2
    lines = [f"usage: vitmha <command> [options]   (vitmha {__version__})", "",
             "vision transformers with from-scratch attention that load timm weights: train, evaluate, run", "",
             "commands:"]
    lines += [f"  {name:<{width}}{summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "`vitmha <command> --help` explains each one; `python tools/train.py` is `vitmha fit`."]
    return "\n".join(lines)


def cli_main(args: Optional[list[str]] = None) -> None:
    """Run the ``vitmha`` command line on ``args`` (default: ``sys.argv[1:]``): the first item names the
    subcommand (``vitmha --help`` lists them).

    Raises SystemExit(2) after printing ``error: ...`` for vitmha's user-facing errors; other exceptions
    propagate with their traceback.
    """
    argv = [str(a) for a in (sys.argv[1:] if args is None else args)]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        raise SystemExit(0 if argv else 2)
    if argv[0] in ("-V", "--version"):
        from vitmha import __version__

        print(f"vitmha {__version__}")
        return
    name = argv[0]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; expected one of {', '.join(COMMANDS)} (vitmha --help)",
              file=sys.stderr)
        raise SystemExit(2)
    module = COMMANDS[name][0]
    if module is None:
        _lightning_main(argv)
        return
    import importlib

    rc = importlib.import_module(module).main(argv[1:])
    if isinstance(rc, int) and rc:
        raise SystemExit(rc)


@exit_on_user_error
def _lightning_main(argv: list[str]) -> None:
    VitmhaCLI(args=argv)


if __name__ == "__main__":
    cli_main()

"""The ``selftune`` command line.

``selftune run CONFIG.toml [--method stn|delta-stn|fixed] [--seed N] [--set key=value ...] [--out DIR]``

Bad input (config, arguments) prints one line naming the field to stderr and exits with status 2
before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from .settings import METHODS

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"selftune: error: {message} (see `selftune {self.prog.split()[-1]} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="selftune", description="Tune hyperparameters inside one training run (STN, Delta-STN).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="train one model with self-tuned (or fixed) hyperparameters",
                         description="Train the model a config describes and write result.json, "
                                     "trajectory.csv, epochs.csv and plots to --out.")
    run.add_argument("config", help="run config (TOML, see docs/config.md)")
    run.add_argument("--method", choices=METHODS, help="override the config's method")
    run.add_argument("--seed", type=int, help="override the config's seed")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override any config key, e.g. --set tuner.lr=0.05 (repeatable)")
    run.add_argument("--out", help="output folder (default: runs/<config>-<method>-seed<seed>)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _run(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config

    overrides = list(args.overrides)
    if args.method:
        overrides.append(f'method="{args.method}"')
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    try:
        config = load_config(args.config, overrides)
        from .runner import prepare

        prepared = prepare(config)
    except ConfigError as err:
        print(f"selftune: error: {err}", file=sys.stderr)
        return EXIT_USAGE

    from .callbacks import ProgressBar
    from .runner import execute, write_outputs

    out = Path(args.out) if args.out else Path("runs") / f"{Path(args.config).stem}-{config.method}-seed{config.seed}"
    sizes = prepared.splits.sizes()
    print(f"selftune {config.method}: {config.data.name} (train {sizes['train']}, val {sizes['val']}, "
          f"test {sizes['test']}), model {config.model.name}, {config.epochs} epochs, seed {config.seed}")
    fit, result = execute(prepared, [] if args.quiet else [ProgressBar()])
    write_outputs(out, fit, result)
    print("hyperparameters: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in result["hparams"].items()))
    print(f"test loss {result['test']['loss']:.4f}  test accuracy {result['test']['accuracy']:.4f}  "
          f"({result['compute']['seconds']:.1f} s, {result['compute']['examples']} examples)")
    print(f"wrote {out}/result.json, trajectory.csv, epochs.csv, trajectory.png, losses.png")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return _run(args)
    return EXIT_USAGE  # pragma: no cover - argparse enforces the subcommand


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

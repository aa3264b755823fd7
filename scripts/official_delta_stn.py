"""Run the official Delta-STN MLP and selftune's delta-stn on the same MNIST split, side by side.

Issue 11, item 5 ("measured against the official implementation"): does Delta-STN raise the dropout
rates from an over-fitting start (0.05), and does selftune do what the authors' code does?

The official code (github.com/pomonam/Self-Tuning-Networks) is *imported*, never copied: pass a
checkout with ``--official PATH``. This adapter builds the hyperparameter container (three dropouts:
input and both hidden layers, range [0, 0.95]), the ``StnThreeLayerMLP``, the four optimizers (SGD
lr 1e-2 momentum 0.9 for general and for response weights, RMSprop lr 1e-2 for the hyperparameters and
for the scales), the ``DeltaStnStepOptimizer`` and the ``StnTrainer`` (batch 128, train_steps 5,
valid_steps 1, warm-up 5 epochs, initial perturbation scale 1, entropy weight 1e-3) exactly as
``examples/mlp/train.py --delta_stn`` does, with ``--recipe`` choosing its two flag sets:

* ``paper`` (default): the repository README's Delta-STN MLP command, ``--linearize --tune_scales``;
* ``defaults``: the argparse defaults, no linearisation and no scale tuning.

What differs from ``train.py``, and only this:

* the data: selftune's own split (``selftune.data.load_dataset("mnist", ...)``: the same tensors both
  sides see) fed through shuffled DataLoaders of batch 128, as ``data/mnist.py`` does;
* the number of epochs, the training subset and the validation share, for a CPU budget;
* wandb is replaced by a do-nothing module in ``sys.modules`` and ``train.py``'s evaluation function is
  re-written here (same computation: eval mode, response path centred at the current
  hyperparameters) so it scores the validation set per epoch and the test set once, at the end.

Two shims keep the 2020 code running on today's PyTorch without touching it: loader iterators get the
Python-2 ``.next()`` method that ``utils/data_utils.next_batch`` calls, and the datasets get the
no-op ``set_h_container``/``reset_hyper_params`` that ``StnTrainer`` calls (as ``StnMNIST`` has).
``--warmup-epochs`` equal to ``--epochs`` gives the official code's fixed baseline: weight steps only,
and the general weights (the network that is evaluated) then train at the start values.

``--selftune CONFIG`` runs selftune's delta-stn (and with ``--fixed`` its fixed baseline) on the same
split, epochs, starts, seeds and recipe, through selftune's Python API. Two ablations change this
process only, never selftune's files: ``--encoding raw`` feeds selftune's gates the raw unconstrained
hyperparameter (the official input: ``tuner.encoding = "logit"``, selftune's default since this
comparison) instead of the cos/sin encoding (``--encoding mip``, the default here, as in the main tables), and
``--output-width 1200`` gives selftune's MLP the official model's 1200 logits. ``--plot`` draws the
dropout trajectories of result files and prints the side-by-side table.

Every run records, per epoch: the three dropout rates and perturbation scales, the mean hypergradient
of the epoch's hyper steps (in the unconstrained space both implementations share,
``p = 0.95 * sigmoid(u)``; negative pushes the rate up), the share of hyper steps pushing each rate up,
the training and validation loss; and at the end the test loss and accuracy and the final rates.

Reproduce (2-core CPU, one thread each, one run at a time; all commands are in
docs/benchmarks/official-delta-stn/README.md)::

    mkdir -p /tmp/official/stn
    git --git-dir=<mirror of pomonam/Self-Tuning-Networks>/.git archive HEAD | tar -x -C /tmp/official/stn
    OMP_NUM_THREADS=1 .venv/bin/python scripts/official_delta_stn.py --official /tmp/official/stn \\
        --recipe paper --epochs 30 --warmup-epochs 5 --train-subset 2000 --val-fraction 0.05 \\
        --init-dropout 0.05 0.5 --seeds 0 1 2 --out docs/benchmarks/official-delta-stn/official.json
    OMP_NUM_THREADS=1 .venv/bin/python scripts/official_delta_stn.py \\
        --selftune docs/benchmarks/official-delta-stn/selftune_mnist_mlp.toml --fixed \\
        --recipe paper --epochs 30 --warmup-epochs 5 --train-subset 2000 --val-fraction 0.05 \\
        --init-dropout 0.05 0.5 --seeds 0 1 2 --out docs/benchmarks/official-delta-stn/selftune.json
    .venv/bin/python scripts/official_delta_stn.py --plot docs/benchmarks/official-delta-stn/official.json \\
        docs/benchmarks/official-delta-stn/selftune.json --out docs/benchmarks/official-delta-stn/trajectories.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

NAMES = ("dropout0", "dropout1", "dropout2")  # input, hidden 1, hidden 2 (the official names)
OFFICIAL_DEFAULTS = {  # examples/mlp/train.py's argparse defaults that this adapter keeps
    "train_batch_size": 128, "valid_batch_size": 128, "test_batch_size": 128, "warmup_epochs": 5,
    "train_lr": 1e-2, "valid_lr": 1e-2, "scale_lr": 1e-2, "train_steps": 5, "valid_steps": 1,
    "entropy_weight": 1e-3, "initial_dropout_scale": 1.0, "tune_scales": False, "linearize": False,
    "percent_valid": 0.15,
}
#: ``paper``: the repository README's Delta-STN MLP command (``--delta_stn --linearize --entropy_weight 1e-3
#: --tune_scales``); ``defaults``: ``--delta_stn`` alone (no scale tuning, no linearisation).
RECIPES = {"paper": {"tune_scales": True, "linearize": True}, "defaults": {"tune_scales": False, "linearize": False}}


# ---------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------
def _one_thread() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


def _splits(train_subset: int, val_fraction: float):
    from selftune.data import load_dataset

    return load_dataset("mnist", val_fraction=val_fraction, train_subset=train_subset, split_seed=0)


class _HyperGradLog:
    """Hypergradients of the hyper steps since the last epoch row (unconstrained space)."""

    def __init__(self) -> None:
        self.grads: list[torch.Tensor] = []

    def add(self, grad: torch.Tensor | None) -> None:
        if grad is not None:
            self.grads.append(grad.detach().double().cpu().clone())

    def flush(self) -> dict[str, Any]:
        if not self.grads:
            return {"hyper_steps": 0, "hypergrad_mean": None, "share_up": None}
        g = torch.stack(self.grads)
        self.grads = []
        return {"hyper_steps": len(g), "hypergrad_mean": g.mean(0).tolist(),
                "share_up": (g < 0).double().mean(0).tolist()}


def _wrap_step(optimizer: torch.optim.Optimizer, param: torch.Tensor, log: _HyperGradLog) -> None:
    """Record ``param.grad`` every time ``optimizer`` steps (an instance attribute; the class is untouched)."""
    step = optimizer.step

    def logged_step(*args, **kwargs):
        log.add(param.grad)
        return step(*args, **kwargs)

    optimizer.step = logged_step  # type: ignore[method-assign]


def _write(out: Path, payload: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(out)


def _header(side: str, args: argparse.Namespace) -> dict[str, Any]:
    return {"side": side, "argv": sys.argv, "recipe": args.recipe, "epochs": args.epochs,
            "train_subset": args.train_subset, "val_fraction": args.val_fraction, "warmup_epochs": args.warmup_epochs,
            "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "torch": torch.__version__, "python": platform.python_version(),
                        "processor": platform.processor() or platform.machine()},
            "runs": []}


# ---------------------------------------------------------------------------------------------------
# The official implementation
# ---------------------------------------------------------------------------------------------------
class _StnTensorDataset(TensorDataset):
    """A TensorDataset with the two no-op hooks ``StnTrainer`` calls (as the official ``StnMNIST``)."""

    def set_h_container(self, h_container, perturbed_h_tensor) -> None:
        pass

    def reset_hyper_params(self) -> None:
        pass


class _Py2Iter:
    """A loader iterator that also answers ``.next()``, which the official ``next_batch`` calls."""

    def __init__(self, it) -> None:
        self._it = it

    def __next__(self):
        return next(self._it)

    next = __next__

    def __iter__(self):
        return self


class _Loader(DataLoader):
    def __iter__(self):  # type: ignore[override]
        return _Py2Iter(super().__iter__())


def _import_official(path: Path) -> dict[str, Any]:
    if not (path / "base_trainer.py").exists() or not (path / "examples" / "mlp" / "model.py").exists():
        raise SystemExit(f"--official: {path} is not a checkout of pomonam/Self-Tuning-Networks")
    if "wandb" not in sys.modules:  # the official trainer logs to wandb; here it logs nowhere
        stub = types.ModuleType("wandb")
        stub.log = lambda *a, **k: None  # type: ignore[attr-defined]
        stub.init = lambda *a, **k: None  # type: ignore[attr-defined]
        sys.modules["wandb"] = stub
    sys.path.insert(0, str(path.resolve()))
    from base_step_optimizer import DeltaStnStepOptimizer
    from base_trainer import StnTrainer
    from examples.mlp.model import StnThreeLayerMLP
    from hyper.container import HyperContainer

    return {"DeltaStnStepOptimizer": DeltaStnStepOptimizer, "StnTrainer": StnTrainer,
            "StnThreeLayerMLP": StnThreeLayerMLP, "HyperContainer": HyperContainer}


def _official_loader(data: TensorDataset, batch_size: int) -> _Loader:
    return _Loader(_StnTensorDataset(*data.tensors), batch_size=batch_size, shuffle=True, num_workers=0)


def run_official(official: dict[str, Any], splits, init: float, seed: int, epochs: int,
                 warmup: int, recipe: str) -> dict[str, Any]:
    """One run of examples/mlp/train.py --delta_stn [recipe flags] --initial_dropout_value INIT, on ``splits``."""
    import random

    import numpy as np

    info = dict(OFFICIAL_DEFAULTS, **RECIPES[recipe], initial_dropout_value=init, total_epochs=epochs,
                warmup_epochs=warmup, data_seed=seed, model_seed=seed)
    device = torch.device("cpu")
    for set_seed in (torch.manual_seed, np.random.seed, random.seed):
        set_seed(info["data_seed"])
    train_loader = _official_loader(splits.train, info["train_batch_size"])
    valid_loader = _official_loader(splits.val, info["valid_batch_size"])
    test_loader = _official_loader(splits.test, info["test_batch_size"])

    h = official["HyperContainer"](device)
    for name in NAMES:  # tune_input_dropout and tune_dropout are both on by default
        h.register(name, info["initial_dropout_value"], info["initial_dropout_scale"], min_range=0.,
                   max_range=0.95, discrete=False, same_perturb_mb=False)
    for set_seed in (torch.manual_seed, np.random.seed, random.seed):
        set_seed(info["model_seed"])
    model = official["StnThreeLayerMLP"](input_dim=784, output_dim=10, h_container=h, num_hyper=h.get_size())
    criterion = torch.nn.CrossEntropyLoss(reduction="mean")
    general = torch.optim.SGD(model.get_general_parameters(), lr=info["train_lr"], momentum=0.9)
    response = torch.optim.SGD(model.get_response_parameters(), lr=info["train_lr"], momentum=0.9)
    hyper = torch.optim.RMSprop([h.h_tensor], lr=info["valid_lr"])
    scale = torch.optim.RMSprop([h.h_scale], lr=info["scale_lr"])
    grads = _HyperGradLog()
    _wrap_step(hyper, h.h_tensor, grads)
    step_optimizer = official["DeltaStnStepOptimizer"](model, general, response, hyper, scale, criterion, h,
                                                       info["tune_scales"], info["entropy_weight"],
                                                       info["linearize"])

    def evaluate(loader) -> tuple[float, float]:
        """train.py's delta_stn_per_epoch_evaluate: eval mode, response centred at the current h."""
        model.eval()
        correct = total = loss = 0.0
        with torch.no_grad():
            for images, labels in loader:
                rep = h.h_tensor.unsqueeze(0).repeat((images.shape[0], 1))
                pred = model(images, rep - rep.detach(), rep)
                loss += F.cross_entropy(pred.float(), labels.long(), reduction="sum").item()
                correct += (pred.argmax(1) == labels).sum().item()
                total += labels.size(0)
        return loss / total, correct / total

    trajectory: list[dict[str, Any]] = []
    started = time.time()

    def per_epoch(epoch: int, train_loss: float | None = None) -> float:
        val_loss, val_acc = evaluate(valid_loader)
        values = {k: float(v.detach()) for k, v in h.generate_summary(show_scale=False).items()}
        scales = F.softplus(h.h_scale.detach()).tolist()
        row = {"epoch": epoch, **values, **{f"{k}_scale": v for k, v in zip(NAMES, scales, strict=True)},
               "train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_acc,
               "seconds": time.time() - started, **grads.flush()}
        trajectory.append(row)
        print(f"official init={init} seed={seed} epoch {epoch:3d} "
              + " ".join(f"{k}={values[k]:.4f}" for k in NAMES) + f" val_loss={val_loss:.4f}", flush=True)
        return val_loss

    trainer = official["StnTrainer"](step_optimizer, train_loader=train_loader, valid_loader=valid_loader,
                                     test_loader=test_loader, h_container=h, evaluate_fnc=per_epoch,
                                     device=device, lr_scheduler=None, warmup_epochs=info["warmup_epochs"],
                                     total_epochs=info["total_epochs"], train_steps=info["train_steps"],
                                     valid_steps=info["valid_steps"], log_interval=10**9, patience=None)
    trainer.train()
    # StnTrainer finishes the train/valid cycle it is in when the last epoch ends (up to 4 more weight
    # steps and 1 hyper step): one more row, at the state train.py then evaluates.
    per_epoch(epochs, None)
    trajectory[-1]["after_last_cycle"] = True
    test_loss, test_acc = evaluate(test_loader)
    val_loss, val_acc = evaluate(valid_loader)
    final = {k: float(v.detach()) for k, v in h.generate_summary(show_scale=False).items()}
    method = "official fixed (warm-up only)" if warmup >= epochs else "official delta-stn"
    return {"method": method, "init_dropout": init, "seed": seed, "trajectory": trajectory,
            "final_dropouts": final, "test_loss": test_loss, "test_accuracy": test_acc, "val_loss": val_loss,
            "val_accuracy": val_acc, "seconds": time.time() - started,
            "settings": {k: v for k, v in info.items() if k not in ("data_seed", "model_seed")}}


# ---------------------------------------------------------------------------------------------------
# selftune
# ---------------------------------------------------------------------------------------------------
def _wide_output(width: int) -> None:
    """Ablation: build the model with ``width`` logits instead of the 10 classes, as the official
    ``StnThreeLayerMLP`` does (its forward ends at a 1200-wide layer; its 1200 -> 10 layer is never used).
    Replaces ``selftune.runner.build`` in this process only."""
    import selftune.runner as runner
    from selftune.models import build

    def wide(name, *, input_shape, num_classes, **kwargs):
        return build(name, input_shape=input_shape, num_classes=width, **kwargs)

    runner.build = wide


def run_selftune(config_path: str, method: str, init: float, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from selftune.config import load_config
    from selftune.runner import evaluate_run, prepare
    from selftune.tuner import Callback

    recipe = RECIPES[args.recipe]
    # "raw" (the official input, the ablation these tables were made with) is selftune's "logit" encoding,
    # which became its default after this comparison; "mip" reproduces the main tables.
    encoding = "logit" if args.encoding == "raw" else "mip"
    overrides = [f"tuner.encoding={encoding}", f"epochs={args.epochs}", f"data.train_subset={args.train_subset}",
                 f"data.val_fraction={args.val_fraction}", f"tuner.warmup_epochs={args.warmup_epochs}",
                 f"tuner.tune_scales={str(recipe['tune_scales']).lower()}",
                 f"tuner.linearize={str(recipe['linearize']).lower()}"]
    config = load_config(config_path, overrides).derive(method=method, seed=seed,
                                                         values={n: init for n in NAMES})
    if args.output_width:
        _wide_output(args.output_width)
    prepared = prepare(config)
    tuner = prepared.tuner
    grads = _HyperGradLog()
    if "hyper" in tuner.optimizers:
        _wrap_step(tuner.optimizers["hyper"], tuner.net.hparams, grads)
    trajectory: list[dict[str, Any]] = []
    ablations = ([] if args.encoding == "mip" else ["raw encoding"]) + (
        [f"{args.output_width} logits"] if args.output_width else [])
    label = f"{method} ({', '.join(ablations)})" if ablations else method

    def row(epoch: int, values: dict[str, float], extra: dict[str, Any]) -> None:
        trajectory.append({"epoch": epoch, **{k: float(values[k]) for k in NAMES}, **extra, **grads.flush()})
        print(f"selftune {label} init={init} seed={seed} epoch {epoch:3d} "
              + " ".join(f"{k}={values[k]:.4f}" for k in NAMES)
              + (f" val_loss={extra['val_loss']:.4f}" if extra.get("val_loss") is not None else ""), flush=True)

    class Rows(Callback):
        def on_epoch_end(self, tuner, r):
            row(int(r["epoch"]), r, {**{f"{k}_scale": r[f"{k}_scale"] for k in NAMES}, "train_loss": r["train_loss"],
                                     "val_loss": r["val_loss"], "val_accuracy": r["val_accuracy"],
                                     "seconds": r["seconds"]})

    from selftune.tuner import evaluate

    val_loss, val_acc = evaluate(tuner.net, prepared.splits.val)  # epoch 0, as the official trainer logs it
    row(0, tuner.net.values(), {"train_loss": None, "val_loss": val_loss, "val_accuracy": val_acc, "seconds": 0.0})
    started = time.time()
    fit = tuner.fit(config.epochs, callbacks=[Rows()])
    result = evaluate_run(prepared, fit)
    return {"method": f"selftune {label}", "init_dropout": init, "seed": seed, "trajectory": trajectory,
            "final_dropouts": {k: float(v) for k, v in fit.hparams.items()}, "test_loss": result.test["loss"],
            "test_accuracy": result.test["accuracy"], "val_loss": result.val["loss"],
            "val_accuracy": result.val["accuracy"], "seconds": time.time() - started,
            "settings": config.model_dump(mode="json")}


# ---------------------------------------------------------------------------------------------------
# Plot and table
# ---------------------------------------------------------------------------------------------------
def plot(files: list[str], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for f in files for r in json.loads(Path(f).read_text())["runs"]]
    inits = sorted({r["init_dropout"] for r in runs})
    methods = list(dict.fromkeys(r["method"] for r in runs if r["method"] != "selftune fixed"))
    fig, axes = plt.subplots(len(inits), 3, figsize=(13, 3.6 * len(inits)), squeeze=False, sharex=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for i, init in enumerate(inits):
        for j, name in enumerate(NAMES):
            ax = axes[i][j]
            for m, method in enumerate(methods):
                for r in (r for r in runs if r["method"] == method and r["init_dropout"] == init):
                    ep = [t["epoch"] for t in r["trajectory"]]
                    ax.plot(ep, [t[name] for t in r["trajectory"]], color=colours[m % len(colours)],
                            linestyle=styles[r["seed"] % len(styles)], label=f"{method}, seed {r['seed']}")
            ax.set_title(f"{name}, start {init}")
            ax.set_ylim(0, 0.95 if init > 0.2 else max(0.3, ax.get_ylim()[1]))
            if i == len(inits) - 1:
                ax.set_xlabel("epoch")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Dropout trajectories: official Delta-STN vs selftune delta-stn (same split, epochs, starts, seeds)")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    table(runs)


def table(runs: list[dict[str, Any]]) -> None:
    """Markdown, one row per (start, seed), one column pair per method: final rates and test loss."""
    methods = list(dict.fromkeys(r["method"] for r in runs))
    head = " | ".join(f"{m}: final dropout0 / 1 / 2 | {m}: test loss (acc)" for m in methods)
    print(f"| start | seed | {head} |")
    print("|---|---|" + "---|---|" * len(methods))
    keys = sorted({(r["init_dropout"], r["seed"]) for r in runs})
    for init, seed in keys:
        cells = []
        for m in methods:
            found = [r for r in runs if r["method"] == m and r["init_dropout"] == init and r["seed"] == seed]
            if not found:
                cells += ["", ""]
                continue
            r = found[0]
            cells.append(" / ".join(f"{r['final_dropouts'][k]:.3f}" for k in NAMES))
            cells.append(f"{r['test_loss']:.4f} ({r['test_accuracy']:.4f})")
        print(f"| {init} | {seed} | " + " | ".join(cells) + " |")


# ---------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--official", metavar="PATH", help="checkout of pomonam/Self-Tuning-Networks: run it")
    mode.add_argument("--selftune", metavar="CONFIG", help="selftune config (TOML): run selftune on the same runs")
    mode.add_argument("--plot", metavar="JSON", nargs="+", help="result files to plot (PNG to --out) and tabulate")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--train-subset", type=int, default=2000, help="training examples kept (selftune's split)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of MNIST's 60,000 training images held out for validation (official: 0.15; "
                        "0.05 = 3,000 images keeps the per-epoch scoring cheap)")
    p.add_argument("--warmup-epochs", type=int, default=OFFICIAL_DEFAULTS["warmup_epochs"])
    p.add_argument("--recipe", choices=sorted(RECIPES), default="paper",
                   help="paper: the README's Delta-STN MLP flags (--linearize --tune_scales --entropy_weight 1e-3); "
                        "defaults: train.py's argparse defaults (--delta_stn only); applied to both sides")
    p.add_argument("--init-dropout", type=float, nargs="+", default=[0.05, 0.5])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--fixed", action="store_true", help="selftune: also train method=fixed at each start")
    p.add_argument("--no-delta", action="store_true", help="selftune: skip delta-stn (with --fixed: baseline only)")
    p.add_argument("--encoding", choices=("mip", "raw"), default="mip",
                   help="selftune: gate input; raw = the official unconstrained value (selftune's "
                        "encoding = logit, its default since this comparison); mip = the map the main tables used")
    p.add_argument("--output-width", type=int, default=0,
                   help="selftune: give the MLP this many logits (1200 = the official model's output); 0: classes")
    p.add_argument("--out", required=True, help="result JSON (PNG with --plot)")
    args = p.parse_args(argv)
    if args.plot:
        plot(args.plot, args.out)
        return
    _one_thread()
    out = Path(args.out)
    if args.official:
        splits = _splits(args.train_subset, args.val_fraction)
        print("split sizes:", splits.sizes(), flush=True)
        official = _import_official(Path(args.official))
        payload = _header("official", args)
        payload["official_path"] = str(Path(args.official).resolve())
        for init in args.init_dropout:
            for seed in args.seeds:
                payload["runs"].append(run_official(official, splits, init, seed, args.epochs, args.warmup_epochs,
                                                    args.recipe))
                _write(out, payload)
    else:
        payload = _header("selftune", args)
        payload["config"], payload["encoding"] = args.selftune, args.encoding
        methods = ([] if args.no_delta else ["delta-stn"]) + (["fixed"] if args.fixed else [])
        for method in methods:
            for init in args.init_dropout:
                for seed in args.seeds:
                    payload["runs"].append(run_selftune(args.selftune, method, init, seed, args))
                    _write(out, payload)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

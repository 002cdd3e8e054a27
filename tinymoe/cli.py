"""The `tinymoe` command.

    tinymoe train [--config run.toml] [--set key=value ...]   # no arguments: the built-in multi-task demo
    tinymoe eval RUN_DIR                                      # per-task test metrics of a finished run
    tinymoe routes RUN_DIR                                    # task x expert routing heatmap, per-layer load (PNG)
    tinymoe plot RUN_DIR                                      # curves.png: losses, aux losses, metrics, expert load
    tinymoe config [--data KIND] [--set key=value ...]        # the full default run config as commented TOML
    tinymoe bench [--backend numba] [--json PATH]             # MoE layer vs dense-equivalent FFN, per backend
    tinymoe experiment NAME [--preset small]                  # the experiments of REFERENCE.md §4 (e1 .. e4)
"""
from __future__ import annotations

import argparse
import os
import sys


def _train(args) -> int:
    from .config import load_config
    from .runs import train_run

    cfg = load_config(args.config, args.set)
    result = train_run(cfg, run_dir=args.run_dir, log=(lambda *a: None) if args.quiet else print,
                       progress=not args.quiet, resume=args.resume)
    _print_test(result["test"], cfg=cfg)
    print(f"\nrun folder: {result['dir']}  (metrics.jsonl, checkpoint.safetensors, results.json)")
    if result.get("curves"):
        print(f"training curves: {result['curves']}")
    if result["plot"]:
        print(f"routing plot: {result['plot']}")
    else:
        print("routing plot: none (the model has no MoE layer, or matplotlib is missing: pip install 'tinymoe[plot]')")
    print(f"next: tinymoe eval {result['dir']}   |   tinymoe routes {result['dir']}   |   tinymoe plot {result['dir']}")
    return 0


def _print_test(test, split="test", cfg=None):
    scaled = cfg is not None and cfg.data.kind == "table" and cfg.data.standardize and test["metric"] == "mse"
    note = " (targets standardized: 1.0 = predicting the mean)" if scaled else ""
    print(f"\n{split} {test['metric']} per task (mean {test['mean']:.4f}){note}:")
    for name, value in test["per_task"].items():
        extra = f"   (whole sequence right: {test['exact'][name]:.3f})" if "exact" in test else ""
        print(f"  {name:>20}  {value:.4f}{extra}")


def _eval(args) -> int:
    from .runs import load_run, run_backend
    from .train import evaluate

    cfg, model, splits = load_run(args.run_dir)
    with run_backend(cfg.backend):
        test = evaluate(model, splits[args.split])
    _print_test(test, args.split, cfg)
    return 0


def _routes(args) -> int:
    from .runs import format_routing, has_routing, load_run, plot_routes, routing_tables, run_backend

    cfg, model, splits = load_run(args.run_dir)
    if not has_routing(model):
        print(f"{args.run_dir}: the model ({type(model).__name__}) has no MoE layer, so there is no routing to show")
        return 0
    with run_backend(cfg.backend):
        print(format_routing(routing_tables(model, splits["test"])))
        out = args.out or os.path.join(args.run_dir, "routes.png")
        try:
            print(f"\nwrote {plot_routes(model, splits['test'], out)}")
        except ImportError:
            print("\nno plot: matplotlib is not installed (pip install 'tinymoe[plot]')")
    return 0


def _plot(args) -> int:
    from .config import ConfigError
    from .plots import plot_curves

    try:
        path = plot_curves(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    except ImportError:
        print("no plot: matplotlib is not installed (pip install 'tinymoe[plot]')", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def _config(args) -> int:
    from .config_docs import default_config_toml

    print(default_config_toml(args.data, args.set), end="")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tinymoe", description="Mixture-of-Experts from scratch: train, inspect, "
                                     "benchmark.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a run (no arguments: the built-in multi-task demo)")
    p.add_argument("--config", help="a run.toml (or a run's config.json)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.steps=200 --set model.router=task")
    p.add_argument("--run-dir", help="write the run here instead of <out>/<name>-<time>")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-eval lines")
    p.set_defaults(fn=_train)

    p = sub.add_parser("eval", help="per-task metrics of a finished run")
    p.add_argument("run_dir")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.set_defaults(fn=_eval)

    p = sub.add_parser("routes", help="routing tables and plot of a finished run")
    p.add_argument("run_dir")
    p.add_argument("--out", help="PNG path (default RUN_DIR/routes.png)")
    p.set_defaults(fn=_routes)

    p = sub.add_parser("plot", help="training curves of a run (losses, aux losses, per-task metrics, expert load)")
    p.add_argument("run_dir")
    p.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")
    p.set_defaults(fn=_plot)

    p = sub.add_parser("config", help="print the full default run config as TOML, one comment per key")
    p.add_argument("--data", default="sequence", choices=["sequence", "mmoe", "clustered", "digits", "table"],
                   help="the dataset kind whose [data] and [model] keys to print (default sequence)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="start from these overrides, e.g. --set model.family=ple")
    p.set_defaults(fn=_config)

    p = sub.add_parser("bench", help="benchmark the MoE hot path per backend", add_help=False)
    p.set_defaults(fn=None)
    p = sub.add_parser("experiment", help="run an experiment of REFERENCE.md §4 (e1 .. e4)", add_help=False)
    p.set_defaults(fn=None)

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("bench", "experiment"):  # they parse their own arguments
        if argv[0] == "bench":
            from .bench import main as bench_main

            return bench_main(argv[1:])
        from .experiments import main as experiment_main

        return experiment_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "train" and args.resume and not args.run_dir:
        parser.error("--resume needs --run-dir RUN_DIR (the run to continue)")
    from .backends import BackendUnavailable
    from .checkpoint import CheckpointError
    from .config import ConfigError

    try:
        return args.fn(args)
    except (ConfigError, CheckpointError, BackendUnavailable) as e:
        print(f"tinymoe {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

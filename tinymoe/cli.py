"""The `tinymoe` command.

    tinymoe train [--config run.toml] [--set key=value ...]   # no arguments: the built-in multi-task demo
    tinymoe eval RUN_DIR                                      # per-task test metrics of a finished run
    tinymoe routes RUN_DIR                                    # task x expert routing heatmap, per-layer load (PNG)
    tinymoe plot RUN_DIR                                      # curves.png: losses, aux losses, metrics, expert load
    tinymoe config [--data KIND] [--set key=value ...]        # the full default run config as commented TOML
    tinymoe bench [--backend numba] [--json PATH]             # MoE layer vs dense-equivalent FFN, per backend
    tinymoe experiment NAME [--preset small]                  # the experiments (e1 .. e6; report writes docs/results.md)

Every failure a user can cause (a bad config, data file, checkpoint or environment, a full disk, a diverged run)
is ONE line on stderr, `tinymoe COMMAND: error: <the problem and the fix>`, and exit status 2. `--debug` (or
TINYMOE_DEBUG=1) shows the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys


def _train(args) -> int:
    from .config import load_config
    from .distributed.comm import launched_by_mpi
    from .runs import train_run

    if launched_by_mpi():  # distributed hook: `mpiexec -n P tinymoe train ...` spreads the experts over P ranks
        from .distributed.run import train_cli

        return train_cli(args, _report, describe_error)

    cfg = load_config(args.config, args.set)
    result = train_run(cfg, run_dir=args.run_dir, log=(lambda *a: None) if args.quiet else print,
                       progress=not args.quiet, resume=args.resume, overwrite=args.overwrite)
    _report(result, cfg)
    return 0


def _report(result, cfg):
    """What `tinymoe train` prints at the end (one process or the root of an MPI job)."""
    _print_test(result["test"], cfg=cfg)
    print(f"\nrun folder: {result['dir']}  (metrics.jsonl, checkpoint.safetensors, results.json)")
    if result.get("curves"):
        print(f"training curves: {result['curves']}")
    if result["plot"]:
        print(f"routing plot: {result['plot']}")
    else:
        print("routing plot: none (the model has no MoE layer, or matplotlib is missing: pip install 'tinymoe[plot]')")
    print(f"next: tinymoe eval {result['dir']}   |   tinymoe routes {result['dir']}   |   tinymoe plot {result['dir']}")


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


def _bench(argv) -> int:
    """Run the benchmark harness, benchmarks/moe_layer.py: it lives beside the package in a source checkout (it
    holds a PyTorch baseline and machine sampling, which a reader of the library does not need)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(root, "benchmarks", "moe_layer.py")):
        print("tinymoe bench: error: the benchmark harness is in the benchmarks/ folder of a source checkout; clone "
              "the repository, pip install -e '.[numba,test]' there, then run make bench", file=sys.stderr)
        return 2
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks.moe_layer import main as bench_main

    return bench_main(argv)


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
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also TINYMOE_DEBUG=1); "
                        "accepted after the command too")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a run (no arguments: the built-in multi-task demo)")
    p.add_argument("--config", help="a run.toml (or a run's config.json)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.steps=200 --set model.router=task")
    p.add_argument("--run-dir", help="write the run here instead of <out>/<name>-<time>")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --run-dir (deletes its files)")
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
    p = sub.add_parser("experiment", help="run an experiment (e1 .. e6), or `report` to write docs/results.md", add_help=False)
    p.set_defaults(fn=None)

    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("TINYMOE_DEBUG", "").strip() not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    command = argv[0] if argv else "?"
    try:
        if command in ("bench", "experiment"):  # they parse their own arguments
            if command == "bench":
                return _bench(argv[1:])
            from .experiments import main as experiment_main

            return experiment_main(argv[1:])
        args = parser.parse_args(argv)
        if args.command == "train" and args.resume and not args.run_dir:
            parser.error("--resume needs --run-dir RUN_DIR (the run to continue)")
        return args.fn(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"tinymoe {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        print(f"tinymoe {command}: error: {describe_error(e)}", file=sys.stderr)
        return 2


def describe_error(e: BaseException) -> str:
    """One line for the user: the problem and the fix (the exception types that carry both print as they are)."""
    from .backends import BackendUnavailable
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .runs import RunFailed, describe_os_error
    from .train import TrainingDiverged

    if isinstance(e, (ConfigError, CheckpointError, BackendUnavailable, RunFailed, TrainingDiverged)):
        text = str(e)
    elif isinstance(e, BrokenPipeError):
        text = "the output was closed before tinymoe finished writing it (e.g. piped into head)"
    elif isinstance(e, MemoryError):
        text = "out of memory; make the model, the batch or the data smaller"
    elif isinstance(e, OSError):
        text = describe_os_error(e)
    else:
        text = (f"unexpected {type(e).__name__}: {e}. This is a bug in tinymoe: rerun with --debug for the "
                "traceback and report it")
    return " ".join(text.split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())

r"""Train a config (or load a checkpoint) and report zero-shot transfer on every held-out family.

    python tools/demo_transfer.py --config=configs/demo.py --workdir=runs/demo_transfer
    python tools/demo_transfer.py --checkpoint=runs/demo              # a trained workdir
    python tools/demo_transfer.py --checkpoint=runs/demo --by_kind    # and per defect kind
    python tools/demo_transfer.py --config=configs/demo.py --baselines_only
    python tools/demo_transfer.py --config=configs/demo.py --workdir=runs/x --set optim.steps=300

What ``zsad_jax.train`` does, with the evaluation at the end replaced by
``zsad_jax.transfer.transfer_report``: the model and the training-free baselines on
``config.data.test_set`` and on each of ``--extra`` (default: the config's
``eval.extra_test_sets``, else ``synthetic_novel``). The last line printed is JSON: ``steps``,
``seconds``, ``train_seconds`` and ``report`` ({set: {"model"|baseline: {metric: value}}});
with ``--by_kind`` also ``by_kind`` ({set: {defect kind: {"model"|baseline: {metric: value}}}},
``zsad_jax.transfer.kind_report``: each kind scored with all of its set's normal images).
``zsad_jax.train`` itself reports the same under ``transfer`` when the config names
``eval.extra_test_sets`` or ``eval.baselines`` (configs/demo.py does).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="config file[:variants]")
    parser.add_argument("--checkpoint", help="a trained workdir to report on instead of training")
    parser.add_argument("--workdir")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE config override")
    parser.add_argument("--extra", default=None, help="comma-separated extra held-out datasets")
    parser.add_argument("--baselines", default="colour_median,random_token_median")
    parser.add_argument("--baselines_only", action="store_true")
    parser.add_argument("--no_baselines", action="store_true")
    parser.add_argument(
        "--by_kind",
        action="store_true",
        help="also report each held-out set per defect kind (each kind with all normal images)",
    )
    args = parser.parse_args(argv)

    from zsad_jax import cli, inference, transfer
    from zsad_jax import train as train_lib

    start = time.time()
    overrides = [tuple(s.split("=", 1)) for s in args.set]
    config = cli.build_config(
        config_file=None if args.checkpoint else args.config,
        overrides=overrides,
        checkpoint=args.checkpoint,
    )
    extra = args.extra
    if extra is None:
        extra = str(config.eval.get("extra_test_sets", "") or "") or "synthetic_novel"
    with config.unlocked():
        config.eval.extra_test_sets = extra
    names = [] if args.no_baselines else [b for b in args.baselines.split(",") if b]

    result: dict = {}
    model = None
    if args.checkpoint:
        model = inference.load_model(args.checkpoint, config)[0]
    elif not args.baselines_only:
        captured = {}

        def evaluator(model, step):
            captured["model"] = model
            return {}

        t0 = time.time()
        result = train_lib.train(config, args.workdir, evaluator=evaluator, progress=False)
        result["train_seconds"] = round(time.time() - t0, 1)
        model = captured.get("model")
        if model is None:  # a finished run resumed: rebuild from its checkpoint
            model = inference.load_model(args.workdir, config)[0]
    report = transfer.transfer_report(model, config, baselines=names)
    result["report"] = report
    lines = [((set_name,), row) for set_name, row in report.items()]
    if args.by_kind:
        result["by_kind"] = transfer.kind_report(model, config, baselines=names)
        lines += [
            ((set_name, kind), row)
            for set_name, kinds in result["by_kind"].items()
            for kind, row in kinds.items()
        ]
    result["seconds"] = round(time.time() - start, 1)
    for where, row in lines:
        for who, m in row.items():
            print(
                f"{' '.join(where):28s} {who:24s} "
                f"pixel_AUROC {m.get('pixel_AUROC', float('nan')):.3f} "
                f"image_AUROC {m.get('image_AUROC', float('nan')):.3f}",
                file=sys.stderr,
            )
    from zsad_jax.report import json_ready

    print(json.dumps(json_ready(result)), flush=True)


if __name__ == "__main__":
    from zsad_jax.errors import run_command

    sys.exit(run_command(main))

"""The command line, `python -m data_prep.phantom` (usage in the package docstring).

`--out` writes a dataset (`generate`), `--preview` a sheet of one image per label, `--benchmark`
prints the render rate of one core.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from cxr_jax.data import labels as label_lib
from data_prep.phantom.layout import LAYOUTS, generate
from data_prep.phantom.patients import benchmark
from data_prep.phantom.preview import make_preview
from data_prep.phantom.prevalence import DEFAULT_NO_FINDING


def _prevalence_flag(text: str) -> tuple[str, float]:
  name, sep, value = text.partition("=")
  if not sep:
    raise argparse.ArgumentTypeError(f"--prevalence wants Name=p, got {text!r}")
  try:
    return label_lib.canonical(name), float(value)
  except ValueError:
    raise argparse.ArgumentTypeError(f"--prevalence {text!r}: {value!r} is not a number") from None


def _parser() -> argparse.ArgumentParser:
  # --help opens with the package's summary line (the package docstring says it once).
  summary = importlib.import_module(__package__).__doc__.split("\n\n")[0]
  p = argparse.ArgumentParser(prog="python -m data_prep.phantom", description=summary)
  p.add_argument("--out", help="dataset folder to write (refused if not empty, see --overwrite)")
  p.add_argument("--num-patients", type=int, default=1000, help="patients, 1-5 images each")
  p.add_argument("--image-size", type=int, default=512, help="image side in pixels")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--workers", type=int, default=None,
                 help="processes (default: all cores); the output does not depend on it")
  p.add_argument("--test-fraction", type=float, default=0.2, help="fraction of test patients")
  p.add_argument("--label-noise", type=float, default=0.0,
                 help="rate at which each Data_Entry label is flipped (extras stay true)")
  p.add_argument("--prevalence", type=_prevalence_flag, action="append", default=[],
                 metavar="NAME=P", help="per-image rate of a label (repeatable)")
  p.add_argument("--no-finding", type=float, default=DEFAULT_NO_FINDING,
                 help="fraction of 'No Finding' images")
  p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
  p.add_argument("--layout", choices=LAYOUTS, default="nih",
                 help="the release whose files to write: NIH ChestX-ray14 (default), CheXpert "
                      "v1.0 (small) or MIMIC-CXR-JPG 2.x, labels mapped to CheXpert's")
  p.add_argument("--preview", metavar="PATH",
                 help="write a grid of one normal image and one per label, then exit")
  p.add_argument("--benchmark", type=int, metavar="N",
                 help="render N images on one core, print images/s, then exit")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line on `argv` (default: sys.argv); returns the exit status, 2 when the
  arguments or the output folder are refused."""
  args = _parser().parse_args(argv)
  if args.preview:
    make_preview(args.preview, args.image_size, args.seed)
    print(f"wrote {args.preview}")
    return 0
  if args.benchmark:
    per_cpu, per_wall = benchmark(args.benchmark, args.image_size, args.seed)
    print(f"{per_cpu:.1f} images/s per core (CPU time; {per_wall:.1f} images/s wall clock) at "
          f"{args.image_size} px: render + PNG encode of image and anatomy map, "
          f"{args.benchmark} images")
    return 0
  if not args.out:
    _parser().error("--out is required (or --preview / --benchmark)")
  return _generate(args)


def _generate(args: argparse.Namespace) -> int:
  try:
    summary = generate(args.out, args.num_patients, args.image_size, args.seed,
                       workers=args.workers, test_fraction=args.test_fraction,
                       label_noise=args.label_noise, prevalence=dict(args.prevalence),
                       no_finding=args.no_finding, overwrite=args.overwrite, layout=args.layout)
  except (ValueError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.out}: {summary['num_images']} images of {summary['num_patients']} patients "
        f"({summary['num_train_val_images']} train_val, {summary['num_test_images']} test), "
        f"{summary['num_instances']} finding instances, {summary['num_boxes']} boxes")
  if args.layout != "nih":
    counts = ", ".join(f"{n} {split}" for split, n in summary["layout_splits"].items())
    print(f"{args.layout} layout: {counts}")
  return 0


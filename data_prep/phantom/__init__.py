"""Procedural synthetic chest radiographs ("the phantom"), written in the NIH ChestX-ray14 layout
(or CheXpert's, or MIMIC-CXR-JPG's).

Every image is drawn from a seed: a patient's anatomy (body, lungs, heart, mediastinum,
diaphragm, ribs, clavicles, spine, vascular markings), the view (PA or AP), pose, exposure,
noise and blur, and the findings of the 14 NIH labels, each rendered as an instance at a known
side and zone with a tight pixel box. The output folder (docs/architecture.md, "The phantom in
NIH layout") holds the NIH files (images, `Data_Entry_2017_v2020.csv`, `BBox_List_2017.csv`,
`train_val_list.txt`, `test_list.txt`) plus `phantom_extras/` (anatomy label maps, location-aware
labels, generation info), so the NIH converter and every location-aware method have exact
ground truth.

Coordinates. Geometry lives in a canonical frame: u (viewer's left to right) and v (top to
bottom), both in [0, 1] of the image width; the pose maps it to pixels. The patient's right is on
the viewer's left (low u). Sizes and positions are drawn independently of the image size, so one
seed renders the same scene at any resolution. Densities are in units where mediastinal soft
tissue is about 1; the exposure maps density to grey levels (dense = bright).

Determinism. Each patient and each image draws from its own `numpy.random.Generator` seeded by
(seed, patient, follow-up), so the output is byte-identical for any number of workers.

Modules, in the order an image is made:
  anatomy     a patient's normal anatomy, its fields and lungs (`sample_anatomy`, `follow_up`)
  findings    the 14 findings' parameters, anatomy changes and instance placement
  study       one image's view, pose, exposure and instances (`sample_study`)
  raster      pose, pixel grid and drawing primitives
  canvas      the normal anatomy's density on the pixel grid
  signatures  each finding's look on the film and its tight box
  render      density to film, anatomy label map and instances (`render`, `render_example`)
  prevalence  which findings an image has (`resolve_prevalence`, `abnormal_rates`)
  streams     the random streams every draw comes from
  patients    one patient's images and table rows, a worker's job (`benchmark` times it)
  layout      the NIH files and extras on disk (`generate`)
  release_layouts  the CheXpert and MIMIC-CXR-JPG layouts (`generate(..., layout=...)`)
  preview     one image per label on one sheet (`make_preview`)
  cli         the command line (`main`)

Usage:
  python -m data_prep.phantom --out DIR --num-patients 500 --image-size 256 --seed 0
  python -m data_prep.phantom --out DIR --num-patients 500 --layout chexpert   # or mimic
  python -m data_prep.phantom --preview docs/phantom_preview.png --image-size 256
  python -m data_prep.phantom --benchmark 200 --image-size 256
"""

from data_prep.phantom.anatomy import (ABDOMEN, ANATOMY, ANATOMY_NAMES, BACKGROUND, BODY, HEART,
                                       LEFT, LEFT_LUNG, MEDIASTINUM, RIGHT, RIGHT_LUNG, Anatomy,
                                       follow_up, sample_anatomy)
from data_prep.phantom.canvas import DENSITY
from data_prep.phantom.cli import main
from data_prep.phantom.findings import FINDINGS
from data_prep.phantom.layout import (BBOX_LIST, BBOX_NAMES, DATA_ENTRY, EXTRAS, FINE_LABELS,
                                      GENERATOR_VERSION, INFO, TEST_LIST, TRAIN_VAL_LIST,
                                      generate)
from data_prep.phantom.patients import benchmark
from data_prep.phantom.prevalence import (DEFAULT_NO_FINDING, DEFAULT_PREVALENCE, abnormal_rates,
                                          resolve_prevalence, sample_findings)
from data_prep.phantom.preview import PREVIEW_CAPTION, make_preview
from data_prep.phantom.raster import Pose
from data_prep.phantom.render import Instance, Rendered, render, render_example
from data_prep.phantom.study import EXPOSURE, POSE, Study, sample_study

__all__ = [
    "ABDOMEN", "ANATOMY", "ANATOMY_NAMES", "BACKGROUND", "BBOX_LIST", "BBOX_NAMES", "BODY",
    "DATA_ENTRY", "DEFAULT_NO_FINDING", "DEFAULT_PREVALENCE", "DENSITY", "EXPOSURE", "EXTRAS",
    "FINDINGS", "FINE_LABELS", "GENERATOR_VERSION", "HEART", "INFO", "LEFT", "LEFT_LUNG",
    "MEDIASTINUM", "POSE", "PREVIEW_CAPTION", "RIGHT", "RIGHT_LUNG", "TEST_LIST", "TRAIN_VAL_LIST",
    "Anatomy", "Instance", "Pose", "Rendered", "Study", "abnormal_rates", "benchmark",
    "follow_up", "generate", "main", "make_preview", "render", "render_example",
    "resolve_prevalence", "sample_anatomy", "sample_findings", "sample_study",
]

"""Tests of data_prep.common.prepare_image on the image formats that real releases contain.

Each test writes a file with PIL, prepares it as every converter does and decodes the PNG that
comes back: the 8-bit gray values must be the expected ones, or the file must be refused by name.
A converter turns such a refusal into a BadInputError naming its file and row: see the "corrupt
image" and "empty image" cases of tests/test_nih.py (and of test_chexpert.py, test_mimic.py).
"""

import io

import numpy as np
import pytest
from PIL import Image

from data_prep import common

SIZE = 16
SOURCE = 2 * SIZE  # sources are 2 x 2 flat quadrants of SIZE x SIZE pixels
ORIENTATION = 0x0112  # the EXIF tag


def quadrants(values, dtype=np.uint8) -> np.ndarray:
  """A SOURCE x SOURCE array of 2 x 2 flat quadrants (`values` nested as [[top], [bottom]], each
  a number or a pixel's channels); area resizing to SIZE keeps each quadrant flat."""
  values = np.asarray(values, dtype)
  return np.repeat(np.repeat(values, SIZE, axis=0), SIZE, axis=1)


def prepare(path) -> tuple[common.ImageResult, np.ndarray]:
  """The prepared result of an image file and its decoded 8-bit gray pixels."""
  result = common.prepare_image(common.ImageJob(str(path), SIZE))
  assert result.error is None, result.error
  image = Image.open(io.BytesIO(result.png))
  assert (image.mode, image.size) == ("L", (SIZE, SIZE))
  return result, np.asarray(image)


def expected(gray) -> np.ndarray:
  """The SIZE x SIZE output of 2 x 2 flat quadrants of these gray values."""
  return np.kron(np.asarray(gray, np.uint8), np.ones((SIZE // 2, SIZE // 2), np.uint8))


def test_16_bit_png_is_scaled_from_its_full_range(tmp_path):
  path = tmp_path / "sixteen.png"
  Image.fromarray(quadrants([[0, 65535], [257 * 100, 257 * 7]], np.uint16)).save(path)
  with Image.open(path) as saved:
    assert saved.mode == "I;16"  # read back as 16-bit, not already 8-bit
    as_older_pillow_reads_it = saved.convert("I")  # older Pillow opened such PNGs as "I"
  result, gray = prepare(path)
  np.testing.assert_array_equal(gray, expected([[0, 255], [100, 7]]))
  assert (result.width, result.height) == (SOURCE, SOURCE)
  np.testing.assert_array_equal(
      common.resize_area(common.to_gray8(as_older_pillow_reads_it), SIZE), gray)


# Pure red, green and blue, and white, in PIL's "L" conversion (ITU-R 601-2 luma).
COLOURS = [[(255, 0, 0), (0, 255, 0)], [(0, 0, 255), (255, 255, 255)]]
COLOUR_GRAYS = [[76, 150], [29, 255]]


def test_rgb_png_takes_the_luma(tmp_path):
  path = tmp_path / "rgb.png"
  Image.fromarray(quadrants(COLOURS), "RGB").save(path)
  np.testing.assert_array_equal(prepare(path)[1], expected(COLOUR_GRAYS))


def test_rgba_png_takes_the_luma_and_drops_alpha(tmp_path):
  path = tmp_path / "rgba.png"
  alphas = [[255, 0], [128, 255]]  # transparency does not darken or lighten an X-ray
  rgba = [[(*colour, alpha) for colour, alpha in zip(*row)] for row in zip(COLOURS, alphas)]
  Image.fromarray(quadrants(rgba), "RGBA").save(path)
  with Image.open(path) as saved:
    assert saved.mode == "RGBA"
  np.testing.assert_array_equal(prepare(path)[1], expected(COLOUR_GRAYS))


def test_palette_png_takes_the_luma_of_its_colours(tmp_path):
  path = tmp_path / "palette.png"
  image = Image.fromarray(quadrants([[0, 1], [2, 3]]), "P")
  image.putpalette([0, 0, 0, 255, 0, 0, 128, 128, 128, 255, 255, 255])
  image.save(path)
  with Image.open(path) as saved:
    assert saved.mode == "P"
  np.testing.assert_array_equal(prepare(path)[1], expected([[0, 76], [128, 255]]))


# EXIF orientation -> where the stored image's top half is once shown upright.
TOP_HALF_GOES = {1: "top", 3: "bottom", 6: "right", 8: "left"}


@pytest.mark.parametrize("orientation", list(TOP_HALF_GOES))
def test_jpeg_is_turned_upright_by_its_exif_orientation(tmp_path, orientation):
  path = tmp_path / "oriented.jpg"
  stored = np.zeros((SIZE, SOURCE), np.uint8)  # landscape as stored: 32 wide, 16 high
  stored[:SIZE // 2] = 255  # top half white, bottom half black
  exif = Image.Exif()
  exif[ORIENTATION] = orientation
  Image.fromarray(stored, "L").save(path, "JPEG", quality=95, exif=exif)
  result, gray = prepare(path)
  turned = orientation in (6, 8)
  assert (result.width, result.height) == ((SIZE, SOURCE) if turned else (SOURCE, SIZE))
  half = SIZE // 2
  halves = {"top": gray[:half], "bottom": gray[half:], "left": gray[:, :half],
            "right": gray[:, half:]}
  opposite = {"top": "bottom", "bottom": "top", "left": "right", "right": "left"}
  white = TOP_HALF_GOES[orientation]
  # JPEG is lossy: a wide margin still tells white from black.
  assert halves[white].min() > 200 and halves[opposite[white]].max() < 55, gray


def test_zero_byte_file_is_refused_by_name(tmp_path):
  path = tmp_path / "empty.png"
  path.write_bytes(b"")
  result = common.prepare_image(common.ImageJob(str(path), SIZE))
  assert result.png == b"" and result.error.startswith(f"cannot read image {path}: ")


def test_truncated_jpeg_is_refused_by_name(tmp_path):
  path = tmp_path / "truncated.jpg"
  noise = np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)
  Image.fromarray(noise, "L").save(path, "JPEG", quality=95)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])  # the header is intact, the scan cut short
  result = common.prepare_image(common.ImageJob(str(path), SIZE))
  assert result.png == b"" and result.error.startswith(f"cannot read image {path}: ")
  assert "truncated" in result.error

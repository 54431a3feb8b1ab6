"""Random streams: every draw of the phantom comes from a `numpy.random.Generator` seeded by
(seed, patient, stream, index), with one stream per purpose below.

So the rendering, the labels and the label noise of one image never depend on how many workers
drew the others, nor on each other: the output is byte-identical for any number of workers.
"""

PATIENT, IMAGE, LABELS, NOISE = 0, 1, 2, 3  # index: 0, or the follow-up for an image's streams
SPLIT, EXAMPLE, PREVIEW, RELEASE_IDS = 4, 5, 6, 7  # patient 0 (RELEASE_IDS: MIMIC's ids, dates)

"""The data layer: datasets, split files, augmentations, mixing and loaders.

Every dataset is decoded to the same internal label convention on load: class indices
``0 .. num_classes-1`` and :data:`IGNORE_INDEX` (255) for void, padding and anything not scored.

* :mod:`semiseg.data.datasets` -- dataset layouts, split files, :class:`~semiseg.data.datasets.Sample`
* :mod:`semiseg.data.splits` -- labelled / unlabelled partitions
* :mod:`semiseg.data.transforms` -- UniMatch's augmentations (rescale, crop, flip, strong photometric, CutMix box)
* :mod:`semiseg.data.mixing` -- batched CutMix / ClassMix shared by the methods
* :mod:`semiseg.data.build` -- torch datasets, loaders and ``check_dataset``
* :mod:`semiseg.data.synthetic` -- the built-in procedural dataset
"""

IGNORE_INDEX = 255  # internal void label: never a class, never scored

__all__ = ["IGNORE_INDEX"]

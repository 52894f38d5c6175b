"""Mini-ImageNet (every common on-disk format) and custom dataset loaders.

Modules: :mod:`.common` (constants, canonical split, class records), :mod:`.safe_pickle`,
:mod:`.images` (decoding), :mod:`.detect` (format detection, split files, cache key), one module
per reader (:mod:`.ravi`, :mod:`.folders`, :mod:`.pickles`, :mod:`.hdf5`), :mod:`.listing` (the one
list of a source's files, shared by the cache key and the readers) and :mod:`.build` (checks,
order, the cached store, the registered datasets).

Each loader turns a folder on disk into one canonical :class:`~.store.ImageStore`
(``uint8`` images ``(N, S, S, 3)`` grouped by class, ``int64`` labels, class names,
class splits). Formats are detected by the files present:

* ``ravi-csv``: Ravi & Larochelle, ``images/*.jpg`` + ``train.csv``/``val.csv``/``test.csv``
  (header ``filename,label``); rank within a class = CSV row order.
* ``learn2learn-pickle``: ``mini-imagenet-cache-{train,validation|val,test}.pkl`` holding
  ``image_data`` ``(N, 84, 84, 3)`` and ``class_dict`` ``{wnid: [indices]}`` (str or bytes keys);
  rank = order of the index list.
* ``metaoptnet-pickle``: ``miniImageNet_category_split_{train_phase_train,val,test}.pickle``
  holding ``data``, ``labels`` (ints, not starting at 0 for val/test) and ``catname2label``;
  Python-2 pickles are read with ``encoding='latin1'``; rank = order of appearance.
* ``torchmeta-hdf5``: ``{split}_data.hdf5`` (group ``datasets``, one ``(n, 84, 84, 3)`` dataset
  per wnid) + ``{split}_labels.json``; rank = row order.
* ``class-folders``: ``{train,val,test}/<class>/*.jpg|*.png``; rank = sorted file name.

Pickles are read with :class:`SafeUnpickler`, which only admits numpy array reconstruction.
For Mini-ImageNet, splits come from the canonical Ravi wnid lists shipped with the package
(``miniimagenet_split.json``), never from folder membership alone, and the 64/16/20 classes
of 600 images are checked. The decoded store is cached (memory-mapped) under
``cache_dir/<dataset>-<key>``, where the key hashes the resolved root, the format, the image
size, the options and the name, size, mtime, ctime and inode of every file in the source's
listing (:func:`list_source`): exactly the files the readers open, built once and used for both
the key and the decoding. A Ravi CSV may name any file in ``images/`` (dot-named ones too: they
are read and keyed); in class folders, names starting with ``.`` and non-image files are neither
read nor keyed. The listing is kept with the store (``ImageStore.source_files``).

Images that are not 8-bit RGB are converted (:func:`to_rgb`): 16-bit grey (``I;16``, ``I``
holding 0..65535) divided by 257, transparency composited on white, ``1``/``L``/``P``/``CMYK``
through PIL; floating-point or 32-bit images, whose range is not defined, are refused. Which modes
were converted is said once, in an :class:`ImageModeWarning`, and kept as ``ImageStore.decode_note``.

Every problem with a source is raised as a one-line :class:`~..errors.DataError` naming
the file and the fix.
"""
from __future__ import annotations

from .build import (
    build_store,
    check_canonical,
    check_unique_classes,
    load_custom,
    load_miniimagenet,
    order_classes,
    scan_source,
)
from .common import (
    _METAOPTNET_FILES,
    ALL_FORMATS,
    CUSTOM_FORMATS,
    EXPECTED_CLASSES,
    EXPECTED_PER_CLASS,
    FORMAT_FOLDERS,
    FORMAT_HDF5,
    FORMAT_L2L,
    FORMAT_METAOPTNET,
    FORMAT_RAVI,
    IMAGE_EXTENSIONS,
    RAVI_CSV_DIR,
    SPLIT_FILE,
    ClassSource,
    canonical_split,
)
from .detect import cache_key, detect_format, locate_split_files, source_files
from .images import ImageModeWarning, conversion_note, decode_image, materialize, to_rgb
from .listing import SourceListing, list_source, read_classes
from .safe_pickle import SafeUnpickler, read_pickle

__all__ = [
    "build_store",
    "check_canonical",
    "check_unique_classes",
    "load_custom",
    "load_miniimagenet",
    "order_classes",
    "scan_source",
    "_METAOPTNET_FILES",
    "ALL_FORMATS",
    "CUSTOM_FORMATS",
    "EXPECTED_CLASSES",
    "EXPECTED_PER_CLASS",
    "FORMAT_FOLDERS",
    "FORMAT_HDF5",
    "FORMAT_L2L",
    "FORMAT_METAOPTNET",
    "FORMAT_RAVI",
    "IMAGE_EXTENSIONS",
    "RAVI_CSV_DIR",
    "SPLIT_FILE",
    "ClassSource",
    "canonical_split",
    "cache_key",
    "detect_format",
    "locate_split_files",
    "source_files",
    "decode_image",
    "materialize",
    "to_rgb",
    "ImageModeWarning",
    "conversion_note",
    "SourceListing",
    "list_source",
    "read_classes",
    "SafeUnpickler",
    "read_pickle",
]

"""Data sets: readers for HAM10000, ISIC 2018 Task 3 and folder trees; lesion-disjoint splits.

numpy + Pillow + standard library only.
"""

from .readers import Dataset, Sample, SkippedItem, load_dataset, read_folder, read_ham10000, read_isic2018
from .split import SPLITS, Split, make_split, read_split, write_split
from .cache import decode_dataset, decode_with_progress, eval_tensors, labels_of, load_eval_set

__all__ = [
    "Dataset", "Sample", "SkippedItem", "load_dataset", "read_folder", "read_ham10000",
    "read_isic2018", "SPLITS", "Split", "make_split", "read_split", "write_split", "decode_dataset",
    "decode_with_progress", "eval_tensors", "labels_of", "load_eval_set",
]

"""Datasets: the paper's toy problems (:mod:`.toy`) and image sets (:mod:`.images`)."""

from .images import (
    Batch,
    BatchIterator,
    Dataset,
    DatasetNotPreparedError,
    load_dataset,
    make_dataset,
)
from .toy import ToySplit, annuli, reflection, toy_split

__all__ = [
    "Batch",
    "BatchIterator",
    "Dataset",
    "DatasetNotPreparedError",
    "ToySplit",
    "annuli",
    "load_dataset",
    "make_dataset",
    "reflection",
    "toy_split",
]

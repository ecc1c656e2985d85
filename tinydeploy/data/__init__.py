"""Stage 1, data: built-in datasets, user files, torchvision folders, splits and preprocessing.

Imports numpy and scikit-learn (torchvision lazily, for image folders); never torch, never a later stage.
"""

from tinydeploy.data.dataset import BUILTIN_DATASETS, Dataset, load_dataset
from tinydeploy.data.preprocessing import apply_standardizer, fit_standardizer

__all__ = ["BUILTIN_DATASETS", "Dataset", "apply_standardizer", "fit_standardizer", "load_dataset"]

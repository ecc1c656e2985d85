"""Options of a grow run (``tinydeploy grow``'s flags) and the per-dataset defaults."""

from __future__ import annotations

from dataclasses import dataclass, replace

from tinydeploy.errors import TinyDeployError
from tinydeploy.growth.candidates import METHODS
from tinydeploy.model.spec import RESNET_STAGES, TASKS, TRANSITIONS, check_activation

ARCHS = ("mlp", "cnn", *RESNET_STAGES)
OPTIMIZERS = ("adam", "sgd")
#: Arithmetic of training steps: float32, or autocast to bfloat16 / float16 on CUDA (auto: bf16 on CUDA).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def recipe_of(arch: str) -> str:
    """The ``RECIPES`` entry of an architecture: ``mlp``, ``cnn``, or ``resnet`` for every ResNet preset."""
    return "resnet" if arch in RESNET_STAGES else arch


def is_convolutional(arch: str | None) -> bool:
    """Whether ``arch`` takes images / signals as (C, ...) tensors (a CNN or a ResNet)."""
    return arch is not None and recipe_of(arch) in ("cnn", "resnet")


def parse_fraction(text: str | float, option: str) -> float:
    """'1/64', '0.25' or 1 -> a float in (0, 1]; a one-line error otherwise."""
    try:
        if isinstance(text, str) and "/" in text:
            num, den = text.split("/")
            value = float(num) / float(den)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        value = float("nan")
    if not 0 < value <= 1:
        raise TinyDeployError(f"{option} must be a fraction in (0, 1] like 1/64 or 0.25; got '{text}'")
    return value

#: Below this parameter budget one CPU thread is fastest: compact MLPs' matrices are too small to split.
SINGLE_THREAD_MAX_PARAMS = 100_000

#: Defaults sized to each built-in dataset, used when the option is not given: the parameter budget,
#: and Gaussian noise (std, on standardised inputs) added to training batches where it was measured
#: to help (digits: 64 features, 1,149 training samples; 0.5 chosen on validation accuracy, default grow,
#: seeds 0-4: 0.3 gave 96.9% val / 96.8% test, 0.5 97.7% / 97.2%); low-dimensional sets keep 0, since
#: noise would blur their fine class boundaries. ``hflip``: random horizontal flips of training images (CIFAR:
#: the labels survive a mirror image; digits do not).
DATASET_DEFAULTS: dict[str, dict[str, float]] = {
    "digits": {"max_params": 3000, "input_noise": 0.5},
    "mnist1d": {"max_params": 12000},
    "mnist5k": {"max_params": 15000, "max_macs": 400000},
    "moons": {"max_params": 400},
    "spirals": {"max_params": 1500},
    "sine": {"max_params": 300},
    "sine2d": {"max_params": 400},
    "quadratic2d": {"max_params": 400},
    "mnist": {"max_params": 60000},
    "fashion-mnist": {"max_params": 60000},
    "cifar10": {"max_params": 200000, "hflip": 1.0},
    "cifar100": {"max_params": 300000, "hflip": 1.0},
}

#: The architecture of a built-in dataset when --arch is not given (else a CNN for image files, an MLP
#: otherwise). mnist1d's 40-sample signals are shifted, scaled and noised templates: a 1-D CNN grown from
#: width 1 reached 81.6% test accuracy with 2,686 params, where MLPs stay near 60% at any width
#: (fixed [64,64]: 60.0%; grown: 59.6%, stopped by the significance test because the MLP fits the 3,200
#: training signals and what is left of their loss gradients is noise; issue 15).
DATASET_ARCH: dict[str, str] = {"mnist1d": "cnn"}

#: Parameter budget of a dataset without a default (a user file): ``USER_PARAMS_PER_SAMPLE`` per training
#: sample (the built-in budgets are 2.6 for digits, 3.75 for mnist1d, 4.7 for mnist5k), and at least a
#: hidden layer of ``USER_MIN_WIDTH`` units between the inputs and the outputs (wide inputs, such as
#: 784 pixels, would otherwise leave room for only a few units).
USER_PARAMS_PER_SAMPLE = 4
USER_MIN_WIDTH = 64
#: MAC budget of a user file of images (a CNN), per budgeted parameter: convolutions at full resolution
#: spend many MACs per weight, which the parameter budget alone leaves unbounded (mnist5k's defaults:
#: 400,000 / 15,000 = 27).
USER_IMAGE_MACS_PER_PARAM = 30


def default_arch(cfg: GrowConfig) -> str | None:
    """--arch, else the dataset's own (``DATASET_ARCH``); None leaves the choice to the data's shape."""
    return cfg.arch or DATASET_ARCH.get(cfg.dataset)


def default_max_params(dataset: str, n_train: int, n_inputs: int, n_outputs: int, images: bool = False) -> int:
    """The parameter budget when --max-params is not given: the dataset's default, else (user files)
    max(USER_PARAMS_PER_SAMPLE * n_train, USER_MIN_WIDTH * (n_inputs + 1 + n_outputs)), or for ``images``
    (a CNN, whose first layer does not scale with the number of inputs) USER_PARAMS_PER_SAMPLE * n_train."""
    budget = DATASET_DEFAULTS.get(dataset, {}).get("max_params")
    if budget is not None:
        return int(budget)
    if images:
        return USER_PARAMS_PER_SAMPLE * n_train
    return max(USER_PARAMS_PER_SAMPLE * n_train, USER_MIN_WIDTH * (n_inputs + 1 + n_outputs))


#: The training and growth recipe of each architecture, for the options left unset (None): the same for
#: grown nets and for fixed ones (``--max-growth-epochs 0``). CNNs train on larger batches, grow once an
#: epoch, and damp the new neurons' statistics (a relative ridge, ``tinydeploy.growth.linalg.ridged``)
#: and their scale (``tinydeploy.growth.candidates.balance``): flattened conv features are strongly
#: correlated, and without both the amplitude search grows weights thousands of times larger than
#: their neighbours', which Adam then trains poorly (measured on mnist5k: 94.6% -> 97.6%, see README).
RECIPES: dict[str, dict[str, float | int | bool]] = {
    "mlp": {"batch_size": 16, "grow_every": 0.25, "max_growth_epochs": 40.0, "final_epochs": 60.0,
            "ridge": 0.0, "balance": False},
    "cnn": {"batch_size": 64, "grow_every": 1.0, "max_growth_epochs": 12.0, "final_epochs": 40.0,
            "ridge": 1e-3, "balance": True},
    "resnet": {"batch_size": 64, "grow_every": 1.0, "max_growth_epochs": 10.0, "final_epochs": 20.0,
               "ridge": 1e-3, "balance": True},
}
#: CNN batches hold n_train / CNN_STEPS_PER_EPOCH samples, within [16, RECIPES["cnn"]["batch_size"]]:
#: small datasets (digits, 1,149 images) still get about 50 optimizer steps per epoch.
CNN_STEPS_PER_EPOCH = 50
MIN_CNN_BATCH = 16


@dataclass
class GrowConfig:
    """Every option of ``tinydeploy grow`` (the CLI maps its flags one to one onto these fields).

    Fields left None take the per-architecture recipe (``RECIPES``, via ``resolved``) or a per-dataset
    default (``DATASET_DEFAULTS``)."""

    dataset: str = "digits"
    data_dir: str | None = None
    target: str | None = None
    task: str | None = None
    split_seed: int = 0
    val_fraction: float = 0.2
    method: str = "tiny"
    arch: str | None = None
    init_widths: list[int] | None = None
    conv_kernels: list[int] | None = None
    conv_strides: list[int] | None = None
    conv_pools: list[int] | None = None
    transition: str = "flatten"
    hidden_layers: int | None = None
    width_factor: float | None = None
    stream_width: float = 1.0
    activation: str = "relu"
    grow_every: float | None = None
    max_growth_epochs: float | None = None
    final_epochs: float | None = None
    neurons_per_step: int = 16
    layers_per_step: int | None = None
    max_params: int | None = None
    max_macs: int | None = None
    max_width: int | None = None
    target_accuracy: float | None = None
    patience: int = 8
    lr: float = 3e-3
    optimizer: str = "adam"
    precision: str = "auto"
    batch_size: int | None = None
    weight_decay: float = 1e-3
    input_noise: float | None = None
    max_shift: int | None = None
    ridge: float | None = None
    balance: bool | None = None
    line_search_batch: int = 1000
    device: str = "auto"
    threads: int | None = None
    seed: int = 0
    checkpoint_every: float = 2.0

    def validate(self) -> None:
        """Raise a one-line ``TinyDeployError`` for option values that cannot work."""
        if self.method not in METHODS:
            raise TinyDeployError(f"unknown method '{self.method}': use one of {', '.join(METHODS)}")
        check_activation(self.activation)
        if self.task is not None and self.task not in TASKS:
            raise TinyDeployError(f"unknown --task '{self.task}': use classification or regression")
        if self.arch is not None and self.arch not in ARCHS:
            raise TinyDeployError(f"unknown --arch '{self.arch}': use one of {', '.join(ARCHS)}")
        if self.precision not in PRECISIONS:
            raise TinyDeployError(f"unknown --precision '{self.precision}': use one of {', '.join(PRECISIONS)}")
        if self.optimizer not in OPTIMIZERS:
            raise TinyDeployError(f"unknown --optimizer '{self.optimizer}': use one of {', '.join(OPTIMIZERS)}")
        for name in ("width_factor", "stream_width"):
            value = getattr(self, name)
            if value is not None:
                parse_fraction(value, f"--{name.replace('_', '-')}")
        if (self.width_factor is not None or self.stream_width != 1.0) and recipe_of(self.arch or "") != "resnet":
            raise TinyDeployError("--width-factor and --stream-width apply to ResNets: add --arch resnet18 or resnet10")
        if self.init_widths is not None and (not self.init_widths or min(self.init_widths) < 1):
            raise TinyDeployError(f"--init-widths must be positive integers like 1,1; got {self.init_widths}")
        if self.transition not in TRANSITIONS:
            raise TinyDeployError(f"unknown --transition '{self.transition}': use flatten or global_avgpool")
        for name in ("conv_kernels", "conv_strides", "conv_pools"):
            values = getattr(self, name)
            if values is not None and (not values or min(values) < (0 if name == "conv_pools" else 1)):
                raise TinyDeployError(f"--{name.replace('_', '-')} must be comma-separated positive integers, "
                                      f"got {values}")
        if self.hidden_layers is not None and self.hidden_layers < 0:
            raise TinyDeployError(f"--hidden-layers must be >= 0, got {self.hidden_layers}")
        if self.max_shift is not None and self.max_shift < 0:
            raise TinyDeployError(f"--max-shift must be >= 0, got {self.max_shift}")
        if self.max_macs is not None and self.max_macs < 1:
            raise TinyDeployError(f"--max-macs must be >= 1, got {self.max_macs}")
        positive = {"grow-every": self.grow_every, "lr": self.lr, "batch-size": self.batch_size,
                    "neurons-per-step": self.neurons_per_step}
        for name, value in positive.items():
            if value is not None and not value > 0:
                raise TinyDeployError(f"--{name} must be > 0, got {value}")
        if any(v is not None and v < 0 for v in (self.final_epochs, self.max_growth_epochs)):
            raise TinyDeployError("--final-epochs and --max-growth-epochs must be >= 0")
        if self.ridge is not None and self.ridge < 0:
            raise TinyDeployError(f"--ridge must be >= 0, got {self.ridge}")
        if self.target_accuracy is not None and not 0 < self.target_accuracy <= 1:
            raise TinyDeployError(f"--target-accuracy is a fraction in (0, 1], got {self.target_accuracy}")
        if self.input_noise is not None and self.input_noise < 0:
            raise TinyDeployError(f"--input-noise must be >= 0, got {self.input_noise}")
        if self.threads is not None and self.threads < 1:
            raise TinyDeployError(f"--threads must be >= 1, got {self.threads}")
        if not self.checkpoint_every >= 0:
            raise TinyDeployError(f"--checkpoint-every is in minutes and must be >= 0, got {self.checkpoint_every}")
        if not 0 < self.val_fraction < 1:
            raise TinyDeployError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")

    def resolved(self, arch: str, n_train: int) -> "GrowConfig":
        """A copy with ``arch`` set and the options left None filled from ``RECIPES[arch]`` (for a CNN
        the batch size also follows the number of training samples, ``CNN_STEPS_PER_EPOCH``)."""
        recipe = dict(RECIPES[recipe_of(arch)])
        if recipe_of(arch) in ("cnn", "resnet"):
            recipe["batch_size"] = min(int(recipe["batch_size"]), max(MIN_CNN_BATCH, n_train // CNN_STEPS_PER_EPOCH))
        return replace(self, arch=arch, **{k: v for k, v in recipe.items() if getattr(self, k) is None})


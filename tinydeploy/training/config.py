"""Options of a grow run (``tinydeploy grow``'s flags) and the per-dataset defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from tinydeploy.errors import TinyDeployError
from tinydeploy.growth.candidates import METHODS
from tinydeploy.model.spec import check_activation

#: Below this parameter budget one CPU thread is fastest: compact MLPs' matrices are too small to split.
SINGLE_THREAD_MAX_PARAMS = 100_000

#: Defaults sized to each built-in dataset, used when the option is not given: the parameter budget,
#: and Gaussian noise (std, on standardised inputs) added to training batches where it was measured
#: to help (digits: 64 features, 1,149 training samples); low-dimensional sets keep 0, since noise
#: would blur their fine class boundaries.
DATASET_DEFAULTS: dict[str, dict[str, float]] = {
    "digits": {"max_params": 3000, "input_noise": 0.3},
    "mnist1d": {"max_params": 12000},
    "moons": {"max_params": 400},
    "spirals": {"max_params": 1500},
    "sine": {"max_params": 300},
    "mnist": {"max_params": 60000},
    "fashion-mnist": {"max_params": 60000},
    "cifar10": {"max_params": 200000},
    "cifar100": {"max_params": 300000},
}


@dataclass
class GrowConfig:
    """Every option of ``tinydeploy grow`` (the CLI maps its flags one to one onto these fields)."""

    dataset: str = "digits"
    data_dir: str | None = None
    target: str | None = None
    split_seed: int = 0
    val_fraction: float = 0.2
    method: str = "tiny"
    init_widths: list[int] = field(default_factory=lambda: [1, 1])
    activation: str = "relu"
    grow_every: float = 0.25
    max_growth_epochs: float = 40.0
    final_epochs: float = 60.0
    neurons_per_step: int = 16
    layers_per_step: int | None = None
    max_params: int | None = None
    max_width: int | None = None
    target_accuracy: float | None = None
    patience: int = 8
    lr: float = 3e-3
    batch_size: int = 16
    weight_decay: float = 1e-3
    input_noise: float | None = None
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
        if not self.init_widths or min(self.init_widths) < 1:
            raise TinyDeployError(f"--init-widths must be positive integers like 1,1; got {self.init_widths}")
        positive = {"grow-every": self.grow_every, "lr": self.lr, "batch-size": self.batch_size,
                    "neurons-per-step": self.neurons_per_step}
        for name, value in positive.items():
            if not value > 0:
                raise TinyDeployError(f"--{name} must be > 0, got {value}")
        if self.final_epochs < 0 or self.max_growth_epochs < 0:
            raise TinyDeployError("--final-epochs and --max-growth-epochs must be >= 0")
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

"""CNN architecture specs and image/signal data: shapes, costs, compatibility with MLP specs written
before convolutions, mnist5k, digits/mnist1d as CNN inputs, user arrays, image folders (real PNG/JPEG
files written with Pillow), per-channel standardisation, and the one-line errors for bad input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tinydeploy.data import apply_standardizer, fit_standardizer, load_dataset
from tinydeploy.errors import DataError, SpecError
from tinydeploy.model.build import build_model
from tinydeploy.model.freeze import Standardize
from tinydeploy.model.spec import ArchSpec, ConvBlock
from tinydeploy.training.architecture import conv_blocks
from tinydeploy.training.config import GrowConfig

#: ``ArchSpec.mlp(...).to_json()`` as written by tinydeploy before convolutions existed (commit 7cd51b6).
OLD_MLP_SPEC = (
    '{"classes":["a","b","c"],"dataset":"old","extra":{},"format":"tinydeploy.arch/1","input_shape":[1,4,4],'
    '"layers":[{"kind":"flatten"},{"growable":true,"kind":"linear","out_features":3},{"kind":"activation",'
    '"name":"relu"},{"growable":true,"kind":"linear","out_features":2},{"kind":"activation","name":"relu"},'
    '{"growable":false,"kind":"linear","out_features":3}],"preprocessing":{"kind":"standardize","mean":'
    '[0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5],"std":[2.0,2.0,2.0,2.0,2.0,2.0,2.0,2.0,'
    '2.0,2.0,2.0,2.0,2.0,2.0,2.0,2.0]},"task":"classification"}'
)


# ----- spec ------------------------------------------------------------------------------------------------
def _cnn(**overrides) -> ArchSpec:
    args = {"task": "classification", "input_shape": (1, 28, 28), "blocks": [ConvBlock(pool=2), ConvBlock(pool=2)],
            "conv_widths": [8, 16], "hidden_widths": [16], "n_outputs": 10}
    return ArchSpec.cnn(**{**args, **overrides})


def test_cnn_spec_shapes_params_and_macs_match_the_built_model() -> None:
    spec = _cnn()
    assert spec.shapes()[-4:] == [(16, 7, 7), (784,), (16,), (16,)] or spec.shapes()[6] == (16, 7, 7)
    model = build_model(spec)
    assert spec.n_params() == sum(p.numel() for p in model.parameters()) == 13_978
    assert spec.macs() == 8 * 9 * 784 + 16 * 8 * 9 * 196 + 784 * 16 + 16 * 10
    assert spec.hidden_widths == [8, 16, 16] and spec.pairs() == [(0, 3), (3, 7), (7, 9)]
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert ArchSpec.from_json(spec.to_json()) == spec
    signal = _cnn(input_shape=(2, 40), blocks=[ConvBlock(kernel=5, pool=2), ConvBlock(kernel=5, stride=2)],
                  transition="global_avgpool")
    assert signal.shapes()[1:6] == [(8, 40), (8, 40), (8, 20), (16, 10), (16, 10)]
    assert build_model(signal)(torch.zeros(3, 2, 40)).shape == (3, 10)
    assert signal.macs() == 8 * 2 * 5 * 40 + 16 * 8 * 5 * 10 + 16 * 16 + 16 * 10


def test_mlp_specs_written_before_convolutions_still_load_and_build() -> None:
    spec = ArchSpec.from_json(OLD_MLP_SPEC)
    assert spec.to_json() == OLD_MLP_SPEC  # same canonical form, so stored sha256 and metadata still match
    assert spec.sha256() == "7e335ef281ebb20716af5e8cdf9ca5bd74844f2d46e933ed1426c00eb46379c5"
    assert (spec.n_params(), spec.macs(), spec.hidden_widths) == (68, 60, [3, 2])
    same = ArchSpec.mlp(task="classification", input_shape=(1, 4, 4), hidden_widths=[3, 2], n_outputs=3,
                        classes=("a", "b", "c"), dataset="old", preprocessing=spec.preprocessing)
    assert same.to_json() == OLD_MLP_SPEC
    assert build_model(spec)(torch.zeros(1, 1, 4, 4)).shape == (1, 3)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"input_shape": (784,)}, "a CNN takes signals of shape (C, L) or images of shape (C, H, W); inputs have shape "
                              "[784]: use --arch mlp or reshape the data"),
    ({"input_shape": (1, 4, 4), "blocks": [ConvBlock(kernel=5, padding=0), ConvBlock()]},
     "layer 0 (conv): kernel 5 does not fit inputs of spatial size [4, 4]: use a smaller kernel, more padding or "
     "fewer pooling layers"),
    ({"transition": "mean"}, "unknown transition 'mean': use flatten or global_avgpool"),
    ({"conv_widths": [8]}, "a CNN needs at least one conv block and one width per block, got 2 blocks and widths [8]"),
])
def test_bad_cnn_specs_raise_one_line_errors(overrides, message) -> None:
    with pytest.raises(SpecError) as info:
        _cnn(**overrides)
    assert str(info.value) == message


def test_malformed_stored_specs_are_spec_errors() -> None:
    layers = '[{"kind":"conv","dims":3,"out_channels":2,"kernel":3,"stride":1,"padding":0,"growable":true}]'
    old_layers = OLD_MLP_SPEC[OLD_MLP_SPEC.index('"layers":') + 9 : OLD_MLP_SPEC.index(',"preprocessing"')]
    text = OLD_MLP_SPEC.replace(old_layers, layers)
    with pytest.raises(SpecError, match=r"^layer 0 \(conv\): dims must be 1 \(signals\) or 2 \(images\), got 3$"):
        ArchSpec.from_json(text)
    linear_on_image = OLD_MLP_SPEC.replace('[{"kind":"flatten"},', "[")
    with pytest.raises(SpecError, match=r"^layer 0 \(linear\) gets inputs of shape \[1, 4, 4\]: put a flatten or "):
        ArchSpec.from_json(linear_on_image)


def test_default_conv_blocks_pool_while_the_grid_stays_four_wide() -> None:
    pools = lambda shape, **kw: [b.pool for b in conv_blocks(GrowConfig(**kw), shape)]  # noqa: E731
    assert pools((1, 28, 28)) == [2, 2] and pools((3, 32, 32)) == [2, 2]
    assert pools((1, 8, 8)) == [2, 0] and pools((1, 40)) == [2, 2]
    assert [b.kernel for b in conv_blocks(GrowConfig(), (1, 40))] == [5, 5]
    assert pools((1, 28, 28), conv_kernels=[3, 3, 3]) == [2, 2, 0]
    assert pools((1, 28, 28), conv_strides=[2, 1]) == [0, 2]  # strided blocks downsample on their own


# ----- data --------------------------------------------------------------------------------------------------
def test_mnist5k_is_a_stratified_4000_1000_split_of_1x28x28_images() -> None:
    data = load_dataset("mnist5k")
    assert data.input_shape == (1, 28, 28) and data.classes == tuple(str(c) for c in range(10))
    assert (len(data.X_train) + len(data.X_val), len(data.X_test)) == (4000, 1000)
    assert np.bincount(data.y_test).tolist() == [100] * 10
    assert data.X_train.dtype == np.float32 and 0.0 == data.X_train.min() and data.X_train.max() == 1.0
    assert data.image == {"mode": "L", "size": [28, 28], "max_value": 1.0}
    again = load_dataset(**data.source)
    np.testing.assert_array_equal(again.X_test, data.X_test)


def test_digits_and_mnist1d_as_cnn_inputs() -> None:
    flat, images = load_dataset("digits"), load_dataset("digits", as_images=True)
    assert images.input_shape == (1, 8, 8) and images.source["as_images"] is True
    np.testing.assert_array_equal(images.X_test.reshape(len(images.X_test), -1), flat.X_test)
    np.testing.assert_array_equal(load_dataset(**images.source).X_train, images.X_train)
    assert images.image == {"mode": "L", "size": [8, 8], "max_value": 16.0}
    signals = load_dataset("mnist1d", as_images=True)
    assert signals.input_shape == (1, 40) and signals.image is None


def _npz(path: Path, X_train: np.ndarray, X_test: np.ndarray) -> str:
    np.savez(path, X_train=X_train, y_train=np.arange(len(X_train)) % 2, X_test=X_test,
             y_test=np.arange(len(X_test)) % 2)
    return str(path)


def test_user_arrays_of_images_and_signals(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = load_dataset(_npz(tmp_path / "i.npz", rng.random((30, 3, 6, 5)), rng.random((8, 3, 6, 5))),
                          as_images=True)
    assert images.input_shape == (3, 6, 5)
    signals = load_dataset(_npz(tmp_path / "s.npz", rng.random((30, 2, 9)), rng.random((8, 2, 9))), as_images=True)
    assert signals.input_shape == (2, 9)


@pytest.mark.parametrize(("train_shape", "message"), [
    ((30, 12), "X_train of 'f.npz' has shape (30, 12) (flat features): a CNN needs signals (n, C, L) or images "
               "(n, C, H, W); reshape X or use --arch mlp"),
    ((30, 1, 2, 3, 4), "X_train of 'f.npz' has shape (30, 1, 2, 3, 4) (4 axes per sample): a CNN needs signals "
                       "(n, C, L) or images (n, C, H, W); reshape X or use --arch mlp"),
])
def test_wrong_ranks_for_a_cnn_are_one_line_errors(tmp_path: Path, train_shape, message) -> None:
    path = _npz(tmp_path / "f.npz", np.zeros(train_shape), np.zeros((8, *train_shape[1:])))
    with pytest.raises(DataError) as info:
        load_dataset(path, as_images=True)
    assert str(info.value) == message


def test_mismatched_image_sizes_between_train_and_test_arrays(tmp_path: Path) -> None:
    path = _npz(tmp_path / "m.npz", np.zeros((30, 1, 8, 8)), np.zeros((8, 1, 8, 7)))
    with pytest.raises(DataError, match=r"^X_test samples have shape \(1, 8, 7\) but X_train samples have \(1, 8, 8\)"):
        load_dataset(path, as_images=True)


def _image_folder(root: Path, sizes=((6, 5),), per_class: int = 8, modes=("L",)) -> Path:
    rng = np.random.default_rng(1)
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            size, mode = sizes[i % len(sizes)], modes[i % len(modes)]
            shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(pixels, mode=None).convert(mode).save(root / label / f"{i}.png")
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_is_read_with_pillow(tmp_path: Path) -> None:
    data = load_dataset(str(_image_folder(tmp_path / "imgs", per_class=8)), split_seed=0)
    assert data.classes == ("cat", "dog") and data.input_shape == (1, 5, 6)
    assert len(data.X_test) == 4 and len(data.X_train) + len(data.X_val) == 12
    assert data.image == {"mode": "L", "size": [5, 6], "max_value": 1.0}
    pixels = np.asarray(Image.open(tmp_path / "imgs" / "cat" / "0.png"), dtype=np.float32) / 255
    everything = np.concatenate([data.X_train, data.X_val, data.X_test])[:, 0]
    assert any(np.array_equal(pixels, image) for image in everything)
    colour = load_dataset(str(_image_folder(tmp_path / "mixed", per_class=8, modes=("L", "RGB"))))
    assert colour.input_shape == (3, 5, 6) and colour.image["mode"] == "RGB"


def test_image_folder_with_train_and_test_sub_folders(tmp_path: Path) -> None:
    _image_folder(tmp_path / "set" / "train", per_class=7)
    _image_folder(tmp_path / "set" / "test", per_class=2)
    data = load_dataset(str(tmp_path / "set"))
    assert len(data.X_test) == 4 and len(data.X_train) + len(data.X_val) == 14


def test_image_folder_errors_are_one_line(tmp_path: Path) -> None:
    mixed = _image_folder(tmp_path / "sizes", sizes=((6, 5), (7, 5)))
    with pytest.raises(DataError) as info:
        load_dataset(str(mixed))
    assert str(info.value) == (f"image {mixed / 'cat' / '1.png'} is 7x5 but {mixed / 'cat' / '0.png'} is 6x5: "
                               "every image must have the same size; resize them")
    broken = _image_folder(tmp_path / "broken")
    (broken / "dog" / "3.png").write_bytes(b"\x89PNG not really")
    bad = broken / "dog" / "3.png"
    with pytest.raises(DataError, match=rf"^cannot read image {bad} \(.+\): replace or remove it$"):
        load_dataset(str(broken))
    single = tmp_path / "single"
    (single / "only").mkdir(parents=True)
    Image.new("L", (4, 4)).save(single / "only" / "a.png")
    with pytest.raises(DataError, match=r"has 1 class sub-folder\(s\) with images: an image folder needs one "):
        load_dataset(str(single))
    empty = _image_folder(tmp_path / "empty")
    (empty / "bird").mkdir()
    with pytest.raises(DataError, match=r"^class folder .*bird has no image files"):
        load_dataset(str(empty))
    deep = _image_folder(tmp_path / "deep")
    Image.new("I;16", (6, 5)).save(deep / "dog" / "9.png")
    with pytest.raises(DataError, match=r"has mode 'I;16': save it as 8-bit grey or RGB \(PNG or JPEG\)$"):
        load_dataset(str(deep))


def test_per_channel_standardisation_is_recorded_and_frozen_exactly() -> None:
    rng = np.random.default_rng(0)
    X = (rng.normal(size=(50, 3, 4, 5)) * [[[2.0]], [[5.0]], [[0.0]]] + [[[1.0]], [[-3.0]], [[7.0]]]).astype(np.float32)
    prep = fit_standardizer(X, per_channel=True)
    assert prep["per"] == "channel" and len(prep["mean"]) == 3 and prep["std"][2] == pytest.approx(  # constant channel: the floor
        0.1 * np.sqrt(np.mean(np.square(X.astype(np.float64).std(axis=(0, 2, 3))))))
    np.testing.assert_allclose(prep["mean"], X.astype(np.float64).mean(axis=(0, 2, 3)), rtol=1e-12)
    standard = apply_standardizer(X, prep)
    np.testing.assert_allclose(standard[:, :2].mean(axis=(0, 2, 3)), 0.0, atol=1e-6)
    module = Standardize(prep, (3, 4, 5))
    assert torch.equal(module(torch.from_numpy(X)), torch.from_numpy(standard))
    with pytest.raises(DataError, match="fitted on 3 channels"):
        apply_standardizer(X[:, :2], prep)
    assert math.prod(module.mean.shape) == 3


def test_mnist1d_grows_a_1d_cnn_unless_an_mlp_is_asked_for() -> None:
    from tinydeploy.training.job import prepare_grow

    def convs(job) -> int:
        return sum(isinstance(m, torch.nn.Conv1d) for m in job.model.modules())

    signals = prepare_grow(GrowConfig(dataset="mnist1d", device="cpu"))
    assert (signals.arch, signals.data.input_shape, convs(signals)) == ("cnn", (1, 40), 2)
    flat = prepare_grow(GrowConfig(dataset="mnist1d", arch="mlp", device="cpu"))
    assert (flat.arch, flat.data.input_shape, convs(flat)) == ("mlp", (40,), 0)
    assert prepare_grow(GrowConfig(dataset="digits", device="cpu")).arch == "mlp"

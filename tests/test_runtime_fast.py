"""serving.runtime on the fast export directory (serving_fast_fixtures): outputs against an independent numpy
forward pass, the model's signature and metadata, every input refusal with its exact message."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from serving_fast_fixtures import (
    CLASSES,
    N_FEATURES,
    digit_rows,
    fast_dir,  # noqa: F401
    fast_spec,
    forward,
    metadata,
    onnx_model,
    reference,
    rehash,
    weights,
    write_export,
)

from tinydeploy.errors import IntegrityError, TinyDeployError
from tinydeploy.serving import runtime
from tinydeploy.serving.runtime import InputError, OnnxModel, Prediction, softmax

ROWS = digit_rows(40)


@pytest.fixture
def model(fast_dir: Path) -> OnnxModel:  # noqa: F811
    """Opened for each test (30 ms), so that mutation testing maps every test that uses it to the loading code."""
    return OnnxModel(fast_dir, "cpu")


def _open(tmp_path: Path, **options) -> OnnxModel:
    return OnnxModel(write_export(tmp_path / "variant", **options), "cpu")


def _graph(inputs, outputs, nodes=None) -> onnx.ModelProto:
    """A tiny model: Identity from the first input to the first output (``nodes`` replaces it)."""
    nodes = nodes or [helper.make_node("Identity", [inputs[0].name], [outputs[0].name])]
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _bare(tmp_path: Path, model: onnx.ModelProto) -> OnnxModel:
    path = tmp_path / "bare.onnx"
    path.write_bytes(model.SerializeToString())
    return OnnxModel(path, "cpu", verify=False)


# ----- outputs -------------------------------------------------------------------------------------
def test_outputs_labels_and_probabilities_match_an_independent_forward_pass(model: OnnxModel, fast_dir: Path) -> None:  # noqa: F811
    expected = reference(fast_dir, ROWS)
    prediction = model.predict(ROWS)
    assert prediction.outputs.dtype == np.float32 and prediction.outputs.shape == (40, 10)
    np.testing.assert_allclose(prediction.outputs, expected, rtol=1e-5, atol=1e-5)
    assert list(prediction.indices) == list(expected.argmax(1)) and len(set(prediction.indices)) > 2
    assert prediction.labels == [CLASSES[i] for i in expected.argmax(1)]
    e = np.exp(expected - expected.max(1, keepdims=True))
    np.testing.assert_allclose(prediction.probabilities, e / e.sum(1, keepdims=True), rtol=1e-5, atol=1e-7)
    assert len(prediction) == 40
    answer = prediction.to_dict()
    assert list(answer) == ["outputs", "labels", "indices", "probabilities"]
    assert answer["outputs"] == prediction.outputs.tolist() and answer["labels"] == prediction.labels
    assert answer["indices"] == [int(i) for i in prediction.indices] and all(type(i) is int for i in answer["indices"])
    assert answer["probabilities"] == prediction.probabilities.tolist()


def test_one_row_every_form_and_chunks_agree_with_the_batch(model: OnnxModel) -> None:
    batch = model.predict(ROWS[:4])
    for i in range(4):
        row = ROWS[i]
        for form in (row, row.tolist(), tuple(row.tolist()), row.astype(np.float64), row.astype(np.int64),
                     row.reshape(1, N_FEATURES), [int(v) for v in row]):
            single = model.predict(form)
            assert len(single) == 1 and single.labels == [batch.labels[i]]
            np.testing.assert_allclose(single.outputs[0], batch.outputs[i], rtol=1e-6, atol=1e-6)
    done: list[int] = []
    chunked = model.predict_chunks(ROWS, chunk_size=16, progress=done.append)
    assert done == [16, 16, 8]
    np.testing.assert_allclose(chunked.outputs, model.predict(ROWS).outputs, rtol=1e-6, atol=1e-6)
    assert chunked.labels == model.predict(ROWS).labels
    done.clear()
    assert len(model.predict_chunks(ROWS[:3], chunk_size=0, progress=done.append)) == 3 and done == [1, 1, 1]
    many = np.tile(ROWS, (28, 1))  # 1120 rows: chunks of 1024 by default
    done.clear()
    np.testing.assert_array_equal(model.predict_chunks(many, progress=done.append).outputs[1100:], chunked.outputs[20:])
    assert done == [1024, 96]
    assert runtime.load(model.directory, "cpu").sha256 == model.sha256
    assert runtime.load(model.directory, "cpu", verify=False).manifest is None
    np.testing.assert_array_equal(runtime.predict(model.directory, ROWS[:3], "cpu").outputs, batch.outputs[:3])
    for call in (lambda: runtime.load(model.directory, "gpu"), lambda: runtime.predict(model.directory, ROWS, "gpu")):
        with pytest.raises(TinyDeployError, match="unknown provider 'gpu'"):  # the provider is passed on
            call()


def test_softmax_is_stable_and_exact() -> None:
    logits = np.array([[1000.0, 1000.0, 999.0], [0.0, np.log(3.0), -np.inf]])
    p = softmax(logits)
    assert p.dtype == np.float32
    e = np.exp(-1.0)
    np.testing.assert_allclose(p[0], [1 / (2 + e), 1 / (2 + e), e / (2 + e)], rtol=1e-6)
    np.testing.assert_allclose(p[1], [0.25, 0.75, 0.0], rtol=1e-6)
    wide = np.random.default_rng(0).standard_normal((4, 1000)).astype(np.float32) * 10
    z = wide.astype(np.float64) - wide.max(axis=1, keepdims=True)
    exact = (np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)).astype(np.float32)
    np.testing.assert_array_equal(softmax(wide), exact)  # float64 inside: float32 arithmetic is off by ulps


def test_a_regression_prediction_has_outputs_only() -> None:
    prediction = Prediction(outputs=np.ones((2, 1), dtype=np.float32))
    assert prediction.to_dict() == {"outputs": [[1.0], [1.0]]} and len(prediction) == 2
    labelled = Prediction(outputs=np.ones((1, 2), dtype=np.float32), labels=["a"])
    assert labelled.to_dict() == {"outputs": [[1.0, 1.0]], "labels": ["a"], "indices": None, "probabilities": None}


# ----- the model's description ---------------------------------------------------------------------
def test_describes_the_model(model: OnnxModel, fast_dir: Path) -> None:  # noqa: F811
    arch = json.loads((fast_dir / "arch.json").read_text())
    manifest = json.loads((fast_dir / "manifest.json").read_text())
    data = (fast_dir / "model.onnx").read_bytes()
    assert model.describe() == {
        "model_file": "model.onnx",
        "sha256": manifest["files"]["model.onnx"]["sha256"],
        "size_bytes": len(data),
        "task": "classification",
        "classes": list(CLASSES),
        "input_space": "raw",
        "input": {"name": "input", "dtype": "float32", "shape": ["batch", 64]},
        "feature_names": [],
        "image": None,
        "output": {"name": "output", "dtype": "float32", "shape": ["batch", 10]},
        "widths": {"hidden": [12, 6], "linear": [12, 6, 10]},
        "spec": arch,
        "providers": ["CPUExecutionProvider"],
        "requested_provider": "cpu",
        "verified_manifest": True,
        "onnxruntime": ort.__version__,
    }
    assert model.fixed_batch is None and model.n_features == 64 and model.metadata_props == metadata(fast_spec())
    assert model.directory == fast_dir and model.model_path == fast_dir / "model.onnx"
    assert model.manifest == manifest


def test_session_threads_are_applied(fast_dir: Path) -> None:  # noqa: F811
    options = OnnxModel(fast_dir, "cpu", intra_op_num_threads=1, inter_op_num_threads=2).session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 2)
    default = OnnxModel(fast_dir, "cpu").session.get_session_options()
    assert (default.intra_op_num_threads, default.inter_op_num_threads) == (0, 0)


def test_the_spec_comes_from_arch_json_when_the_model_carries_none(tmp_path: Path) -> None:
    spec = fast_spec()
    bare = _open(tmp_path / "a", props={})
    assert bare.spec == spec.to_dict() and bare.task == "classification" and bare.classes == list(CLASSES)
    assert bare.input_space == "raw" and bare.hidden_widths == [12, 6] and bare.metadata_props == {}
    unverified = OnnxModel(tmp_path / "a" / "variant", "cpu", verify=False)
    assert unverified.spec is None and unverified.classes == [] and unverified.task == "regression"
    assert unverified.hidden_widths == [] and unverified.layer_widths == []
    broken = write_export(tmp_path / "b", props={})
    (broken / "arch.json").write_bytes(b"\xff not json")
    rehash(broken, "arch.json")
    model = OnnxModel(broken, "cpu")
    assert model.spec is None and model.task == "regression" and model.predict(ROWS[:2]).labels is None
    (broken / "arch.json").write_text("[1, 2]")
    rehash(broken, "arch.json")
    assert OnnxModel(broken, "cpu").spec is None
    (broken / "arch.json").write_text("{")
    rehash(broken, "arch.json")
    assert OnnxModel(broken, "cpu").spec is None


def test_metadata_fills_what_the_spec_leaves_out(tmp_path: Path) -> None:
    spec = fast_spec()
    props = {"tinydeploy.task": "classification", "tinydeploy.inputs": "standardized"}
    model = _open(tmp_path / "a", props={**props, "tinydeploy.spec": json.dumps({"layers": []})})
    assert model.classes == [str(i) for i in range(10)] and model.input_space == "standardized"
    prediction = model.predict(ROWS[:3])
    assert prediction.labels == [str(i) for i in prediction.indices]
    few = _open(tmp_path / "b", props={**props, "tinydeploy.classes": '["a", "b", 3]'})
    prediction = few.predict(ROWS)
    assert few.classes == ["a", "b", "3"]
    assert prediction.labels == [["a", "b", "3"][i] if i < 3 else str(i) for i in prediction.indices]
    assert {0, 1} & set(prediction.indices) and any(i >= 3 for i in prediction.indices)
    task_from_spec = _open(tmp_path / "c", props={"tinydeploy.spec": json.dumps({**spec.to_dict(), "task": "regression"})})
    assert task_from_spec.task == "regression" and task_from_spec.predict(ROWS[:2]).labels is None
    assert task_from_spec.classes == list(CLASSES)


def test_an_image_model_describes_its_image_format(tmp_path: Path) -> None:
    model = _open(tmp_path, spec=fast_spec(image=True))
    assert model.input_shape == (1, 8, 8) and model.describe()["input"]["shape"] == ["batch", 1, 8, 8]
    assert model.image == {"mode": "L", "size": [8, 8], "max_value": 16.0} == model.describe()["image"]
    tensors = digit_rows(3).reshape(3, 1, 8, 8)
    spec = fast_spec(image=True)
    np.testing.assert_allclose(model.predict(tensors).outputs, forward(spec, weights(spec), tensors), rtol=1e-5,
                               atol=1e-5)


def test_classes_without_a_task_make_a_classifier(tmp_path: Path) -> None:
    spec = fast_spec()
    path = tmp_path / "model.onnx"
    path.write_bytes(onnx_model(spec, weights(spec), {"tinydeploy.classes": json.dumps(list("abcdefghij"))})
                     .SerializeToString())
    model = OnnxModel(path, "cpu", verify=False)
    assert model.spec is None and model.task == "classification" and model.classes == list("abcdefghij")
    assert model.predict(ROWS[:2]).labels == ["abcdefghij"[i] for i in model.predict(ROWS[:2]).indices]


def test_conv_widths_and_feature_names_come_from_the_spec(tmp_path: Path) -> None:
    layers = [{"kind": "conv", "out_channels": 5, "growable": True}, {"kind": "conv", "out_channels": 7},
              {"kind": "linear", "out_features": 9, "growable": True}, {"kind": "linear", "out_features": 10}]
    names = [f"f{i}" for i in range(N_FEATURES)]
    spec = {"task": "classification", "input_shape": [64], "layers": layers, "feature_names": names}
    model = _open(tmp_path / "a", props={"tinydeploy.spec": json.dumps(spec)})
    assert model.hidden_widths == [5, 9] and model.layer_widths == [9, 10]
    assert model.feature_names == names and model.classes == [str(i) for i in range(10)]
    by_name = model.predict([{name: float(v) for name, v in zip(reversed(names), reversed(ROWS[0]))}])
    np.testing.assert_array_equal(by_name.outputs, model.predict(ROWS[:1]).outputs)
    assert model.describe()["feature_names"] == names


@pytest.mark.parametrize(
    ("props", "message"),
    [
        ({"tinydeploy.spec": "{"}, "metadata 'tinydeploy.spec' is not JSON (Expecting property name"),
        ({"tinydeploy.classes": "[1,"}, "metadata 'tinydeploy.classes' is not a JSON list (Expecting value"),
        ({"tinydeploy.classes": "3"}, "metadata 'tinydeploy.classes' is not a JSON list ('int' object is not iterable)"),
        ({"tinydeploy.feature_names": '"abc"'}, ("metadata 'tinydeploy.feature_names' is not a list of strings: "
                                                "re-export the run")),
        ({"tinydeploy.feature_names": "[1]"}, "metadata 'tinydeploy.feature_names' is not a list of strings"),
        ({"tinydeploy.feature_names": '["a", "b"]'}, ": 2 feature names for 64 inputs: re-export the run"),
        ({"tinydeploy.feature_names": json.dumps(["a"] * 64)}, ": 64 feature names for 64 inputs: re-export the run"),
        ({"tinydeploy.spec": '{"input_shape": [8, 9]}'}, (": spec input_shape [8, 9] disagrees with the ONNX input [64]: "
                                                         "re-export the run")),
        ({"tinydeploy.spec": '{"layers": [{"kind": "linear"}]}'},
         ": its tinydeploy metadata is malformed (KeyError: 'out_features'): re-export the run"),
        ({"tinydeploy.spec": '{"layers": [{"kind": "linear", "out_features": "x"}]}'},
         ": its tinydeploy metadata is malformed (ValueError: invalid literal for int() with base 10: 'x'): re-export"),
        ({"tinydeploy.spec": '{"input_shape": 5}'}, (": its tinydeploy metadata is malformed (TypeError: 'int' object "
                                                   "is not iterable)")),
        ({"tinydeploy.feature_names": "[" * 100_000 + "]" * 100_000}, (": its tinydeploy metadata is malformed "
                                                                     "(RecursionError: maximum recursion depth")),
    ],
)
def test_malformed_metadata_is_a_one_line_error_at_start(tmp_path: Path, props: dict, message: str) -> None:
    directory = write_export(tmp_path / "e", props=props)
    with pytest.raises(TinyDeployError) as info:
        OnnxModel(directory, "cpu")
    text = str(info.value)
    assert text.startswith(f"{directory / 'model.onnx'}: ") and message in text and "\n" not in text


def test_a_long_malformed_metadata_message_is_cut_at_120_characters(tmp_path: Path) -> None:
    value = "x" * 300
    long = write_export(tmp_path / "long", props={"tinydeploy.spec": json.dumps(
        {"layers": [{"kind": "linear", "out_features": value}]})})
    reason = f"invalid literal for int() with base 10: {value!r}"[:120]
    with pytest.raises(TinyDeployError) as info:
        OnnxModel(long, "cpu")
    assert str(info.value) == f"{long / 'model.onnx'}: its tinydeploy metadata is malformed (ValueError: {reason}): " \
                              "re-export the run"
    key = "k" * 300
    directory = write_export(tmp_path / "e", props={"tinydeploy.spec": json.dumps({"layers": [{"kind": "linear"}],
                                                                                     "x": key})})
    directory = write_export(tmp_path / "f", props={"tinydeploy.spec": json.dumps(
        {"layers": [{"kind": "conv", "growable": True, key: 1}]})})
    with pytest.raises(TinyDeployError) as info:
        OnnxModel(directory, "cpu")
    assert str(info.value) == f"{directory / 'model.onnx'}: its tinydeploy metadata is malformed (KeyError: " \
                              "'out_channels'): re-export the run"
    assert runtime._first_line(KeyError("x" * 300)) == repr("x" * 300)
    assert runtime._first_line(ValueError("")) == "ValueError"
    assert runtime._first_line(ValueError("  a\nb ")) == "a"


# ----- the model's signature -----------------------------------------------------------------------
def _tensor(name: str, shape, kind=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, kind, shape)


def test_signatures_tinydeploy_cannot_serve_are_refused(tmp_path: Path) -> None:
    cases = [
        (_graph([_tensor("a", ["b", 4]), _tensor("c", ["b", 4])], [_tensor("o", ["b", 4])],
                [helper.make_node("Add", ["a", "c"], ["o"])]),
         "has 2 inputs and 1 outputs: a tinydeploy model has one input and one output"),
        (_graph([_tensor("x", ["b", 4], TensorProto.DOUBLE)], [_tensor("o", ["b", 4], TensorProto.DOUBLE)]),
         ": input 'x' is tensor(double), expected tensor(float)"),
        (_graph([_tensor("x", ["b"])], [_tensor("o", ["b"])]), ": input 'x' has shape ['b'], expected [batch, ...]"),
        (_graph([_tensor("x", ["b", "f"])], [_tensor("o", ["b", "f"])]),
         ": input 'x' has dynamic feature dims ['b', 'f']: only the batch may be dynamic"),
        (_graph([_tensor("x", ["b", 4, 0])], [_tensor("o", ["b", 4, 0])]), "has dynamic feature dims ['b', 4, 0]"),
    ]
    for i, (graph, message) in enumerate(cases):
        path = tmp_path / f"m{i}.onnx"
        path.write_bytes(graph.SerializeToString())
        with pytest.raises(TinyDeployError) as info:
            OnnxModel(path, "cpu", verify=False)
        assert str(info.value).startswith(str(path)) and message in str(info.value), message


def test_a_fixed_batch_and_the_output_width(tmp_path: Path) -> None:
    fixed = _open(tmp_path / "a", batch=3)
    assert fixed.fixed_batch == 3 and len(fixed.predict(ROWS[:3])) == 3
    with pytest.raises(InputError) as info:
        fixed.predict(ROWS[:2])
    assert (str(info.value), info.value.code) == ("this model takes exactly 3 rows per call, got 2", "shape")
    flat = _bare(tmp_path, _graph([_tensor("x", ["b", 4])], [_tensor("o", ["b"])],
                                  [helper.make_node("Constant", [], ["axes"], value_ints=[1]),
                                   helper.make_node("ReduceSum", ["x", "axes"], ["o"], keepdims=0)]))
    assert flat.n_outputs is None and flat.task == "regression"
    np.testing.assert_allclose(flat.predict(np.ones((3, 4))).outputs, np.full((3, 1), 4.0))
    fixed_flat = _bare(tmp_path, _graph([_tensor("x", [3, 4])], [_tensor("o", [3])],
                                        [helper.make_node("Constant", [], ["axes"], value_ints=[1]),
                                         helper.make_node("ReduceSum", ["x", "axes"], ["o"], keepdims=0)]))
    assert fixed_flat.fixed_batch == 3 and fixed_flat.n_outputs is None  # [3] is the batch, not a width
    wide = _bare(tmp_path, _graph([_tensor("x", ["b", 2, 3])], [_tensor("o", ["b", 2, 3])]))
    assert wide.input_shape == (2, 3) and wide.n_outputs == 3 and wide.n_features == 6


# ----- loading ---------------------------------------------------------------------------------------
def test_paths_and_corrupt_files_give_one_line_errors(tmp_path: Path, fast_dir: Path) -> None:  # noqa: F811
    with pytest.raises(TinyDeployError) as info:
        OnnxModel(tmp_path / "nope", "cpu")
    assert str(info.value) == f"{tmp_path / 'nope'} does not exist: pass an export directory or a model.onnx path"
    with pytest.raises(TinyDeployError) as info:
        OnnxModel(tmp_path, "cpu")
    assert str(info.value) == (f"{tmp_path} holds no model.onnx: pass the directory written by 'tinydeploy export RUN "
                               "--onnx' or a .onnx file")
    (tmp_path / "model.onnx").mkdir()
    with pytest.raises(TinyDeployError, match="holds no model.onnx"):
        OnnxModel(tmp_path, "cpu")
    other = tmp_path / "model.txt"
    other.write_bytes((fast_dir / "model.onnx").read_bytes())
    with pytest.raises(TinyDeployError) as info:
        OnnxModel(other, "cpu", verify=False)
    assert str(info.value) == f"{other} is not an .onnx file: pass an export directory or a model.onnx path"
    upper = tmp_path / "MODEL.ONNX"
    upper.write_bytes((fast_dir / "model.onnx").read_bytes())
    assert OnnxModel(upper, "cpu", verify=False).model_path == upper
    assert OnnxModel(fast_dir / "model.onnx", "cpu").manifest is not None
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08")  # a truncated varint
    with pytest.raises(TinyDeployError) as info:
        OnnxModel(junk, "cpu", verify=False)
    assert str(info.value) == f"onnxruntime cannot load {junk}: it is not a valid ONNX file (truncated or overlong varint)"
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(onnx.ModelProto(ir_version=10).SerializeToString())
    with pytest.raises(TinyDeployError) as info:
        OnnxModel(empty, "cpu", verify=False)
    with pytest.raises(Exception) as raw:  # onnxruntime's own exception types
        ort.InferenceSession(empty.read_bytes(), providers=["CPUExecutionProvider"])
    first = str(raw.value).strip().splitlines()[0]
    assert str(info.value) == f"onnxruntime cannot load {empty}: {first}" and len(first) > 10


def test_another_model_file_name(tmp_path: Path, fast_dir: Path) -> None:  # noqa: F811
    directory = write_export(tmp_path / "e")
    (directory / "model.onnx").rename(directory / "other.onnx")
    rehash_all = json.loads((directory / "manifest.json").read_text())
    rehash_all["files"]["other.onnx"] = rehash_all["files"].pop("model.onnx")
    (directory / "manifest.json").write_text(json.dumps(rehash_all))
    model = OnnxModel(directory, "cpu", model_file="other.onnx")
    assert model.model_path == directory / "other.onnx" and model.describe()["model_file"] == "other.onnx"
    with pytest.raises(TinyDeployError, match="holds no model.onnx"):
        OnnxModel(directory, "cpu")


def test_verification_is_required_unless_skipped(tmp_path: Path, fast_dir: Path) -> None:  # noqa: F811
    directory = write_export(tmp_path / "e")
    (directory / "arch.json").write_text("{}")
    with pytest.raises(IntegrityError, match=r"arch\.json changed"):
        OnnxModel(directory, "cpu")
    (directory / "manifest.json").unlink()
    with pytest.raises(IntegrityError) as info:
        OnnxModel(directory, "cpu")
    assert str(info.value) == (f"{directory} has no manifest.json: pass a directory written by 'tinydeploy export' "
                               "(or pass --no-verify to skip the integrity check, at your own risk)")
    unverified = OnnxModel(directory, "cpu", verify=False)
    assert unverified.manifest is None and unverified.describe()["verified_manifest"] is False
    data, manifest = runtime.load_model_bytes(directory, "model.onnx", False)
    assert manifest is None and data == (directory / "model.onnx").read_bytes()
    listed = write_export(tmp_path / "f")
    data, manifest = runtime.load_model_bytes(listed, "model.onnx", True)
    assert manifest == json.loads((listed / "manifest.json").read_text()) and runtime.sha256_bytes(data) == \
        manifest["files"]["model.onnx"]["sha256"]


def _external(name: str, location: str) -> TensorProto:
    tensor = numpy_helper.from_array(np.zeros(4, dtype=np.float32), name)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    return tensor


def test_external_tensors_are_refused_by_name(tmp_path: Path) -> None:
    spec = fast_spec()
    model = onnx_model(spec, weights(spec))
    model.graph.initializer.append(_external("extra", "../../etc/passwd"))
    with pytest.raises(IntegrityError) as info:
        runtime.check_self_contained(model.SerializeToString(), "where.onnx")
    assert str(info.value) == ("where.onnx keeps tensor 'extra' in the external file '../../etc/passwd': tinydeploy "
                               "loads only self-contained ONNX files, since external data is read from outside the "
                               "checked directory; re-export the model")
    model.graph.initializer.append(_external("more", "b"))
    with pytest.raises(IntegrityError, match=r"^where\.onnx keeps tensor 'extra' in the external file "
                                             r"'\.\./\.\./etc/passwd' \(and 1 more\): tinydeploy"):
        runtime.check_self_contained(model.SerializeToString(), "where.onnx")
    model.graph.initializer.append(_external("most", "c"))
    with pytest.raises(IntegrityError, match=r"^where\.onnx keeps tensor 'extra' in the external file "
                                             r"'\.\./\.\./etc/passwd' \(and 2 more\): tinydeploy"):
        runtime.check_self_contained(model.SerializeToString(), "where.onnx")
    runtime.check_self_contained(onnx_model(spec, weights(spec)).SerializeToString(), "fine")
    directory = write_export(tmp_path / "e", model=model)
    with pytest.raises(IntegrityError, match="keeps tensor 'extra'"):
        OnnxModel(directory, "cpu")


def test_providers(fast_dir: Path) -> None:  # noqa: F811
    with pytest.raises(TinyDeployError, match="unknown provider 'gpu'"):
        OnnxModel(fast_dir, "gpu")
    auto = OnnxModel(fast_dir, "auto")
    assert auto.providers[-1] == "CPUExecutionProvider" and auto.requested_provider == "auto"
    assert auto.describe()["requested_provider"] == "auto"


# ----- input validation ----------------------------------------------------------------------------
EXPECTED = "expected one row of 64 values (or shape [64]) or a batch of shape [batch, 64]"


@pytest.mark.parametrize(
    ("inputs", "code", "message"),
    [
        ([], "empty", "inputs is empty: send at least one row"),
        ([[]], "empty", "inputs is empty: send at least one row"),
        (np.zeros((0, 64), dtype=np.float32), "empty", "inputs is an empty batch: send at least one row"),
        (np.zeros((0, 64), dtype=np.float64), "empty", "inputs is an empty batch: send at least one row"),
        ([1.0, 2.0], "shape", f"inputs has shape [2]; {EXPECTED}"),
        ([[1.0] * 63], "shape", f"inputs has shape [1, 63]; {EXPECTED}"),
        (np.zeros((2, 8, 8), dtype=np.float32), "shape", f"inputs has shape [2, 8, 8]; {EXPECTED}"),
        (np.zeros((1, 1, 64), dtype=np.float32), "shape", f"inputs has shape [1, 1, 64]; {EXPECTED}"),
        (np.array(3.0), "shape", ("inputs is a single number; expected one row of 64 values or a batch [[...], ...] "
                                   "of shape [batch, 64]")),
        (3.0, "shape", "inputs is a single number; expected one row of values or a batch of rows"),
        (3, "shape", "inputs is a single number; expected one row of values or a batch of rows"),
        (True, "dtype", "inputs must be a list of numbers or a list of rows, got a boolean"),
        ("1,2,3", "dtype", "inputs must be a list of numbers or a list of rows, got a string"),
        (None, "dtype", "inputs must be a list of numbers or a list of rows, got null"),
        (b"ab", "dtype", "inputs must be a list of numbers or a list of rows, got bytes"),
        ([[1.0] * 64, [1.0] * 63], "shape", "inputs is ragged: every row must have the same number of values"),
        ([np.zeros((2, 2)), np.zeros((2, 3))], "shape", ("inputs is ragged: every row must have the same number of "
                                                        "values (could not broadcast input array from shape (2,2)")),
        ([[1.0] * 64, 1.0], "shape", "inputs is ragged: every row must have the same number of values"),
        ([[[1.0]], [1.0]], "shape", "inputs is ragged: every row must have the same number of values"),
        ([None] * 64, "dtype", "inputs must contain only numbers, found nulls"),
        ([True] * 64, "dtype", "inputs must contain only numbers, found booleans"),
        ([0.0] * 62 + ["a", {"b": 1}], "dtype", "inputs must contain only numbers, found objects (mappings), strings"),
        ([0.0] * 63 + [b"x"], "dtype", "inputs must contain only numbers, found bytes"),
        ([0.0] * 63 + [1j], "dtype", "inputs must contain only numbers, found complex"),
        (np.array(["a"] * 64), "dtype", "inputs must contain only numbers, found values of dtype <U1"),
        (np.ones(64, dtype=bool), "dtype", "inputs must contain only numbers, found booleans"),
        (np.ones(64, dtype=np.complex64), "dtype", "inputs must contain only numbers, found values of dtype complex64"),
        ([float("nan")] + [0.0] * 63, "non_finite", ("inputs contain NaN or infinite values (rows 0): send finite "
                                                    "numbers")),
        (np.full((3, 64), np.inf), "non_finite", "inputs contain NaN or infinite values (rows 0, 1, 2): send finite"),
        (np.vstack([np.zeros((1, 64)), np.full((6, 64), np.nan)]), "non_finite",
         "inputs contain NaN or infinite values (rows 1, 2, 3, 4, 5, ...): send finite numbers"),
        (np.vstack([np.zeros((1, 64)), np.full((5, 64), np.nan)]), "non_finite",
         "inputs contain NaN or infinite values (rows 1, 2, 3, 4, 5): send finite numbers"),
        ([1e39] * 64, "non_finite", "inputs contain values outside the float32 range (|x| > 3.4e38)"),
        ([0.0] * 63 + [-3.5e38], "non_finite", "inputs contain values outside the float32 range (|x| > 3.4e38)"),
        ([10**400] * 64, "non_finite", "inputs contain an integer too large for float32"),
        ({"x": 1}, "features", "this model has no feature names"),
        ([{"x": 1}], "features", "this model has no feature names"),
        (np.float32(3.0), "dtype", "inputs must be a list of numbers or a list of rows, got float32"),
    ],
)
def test_bad_inputs_raise_input_error(model: OnnxModel, inputs, code: str, message: str) -> None:
    with pytest.raises(InputError) as info:
        model.predict(inputs)
    assert info.value.code == code
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_nesting_depth_is_named(model: OnnxModel) -> None:
    deep: list = [1.0]
    for _ in range(70):
        deep = [deep]
    with pytest.raises(InputError) as info:
        model.predict(deep)
    ndim = np.asarray(deep, dtype=object).ndim  # numpy stops at its maximum number of dimensions (32 or 64)
    assert str(info.value) == f"inputs is nested {ndim}+ levels deep: send one row or a list of rows"
    assert info.value.code == "shape"
    ragged: list = [[1.0, 2.0], [3.0]]
    for _ in range(31):
        ragged = [ragged]  # 32 dimensions, then lists of unequal length
    with pytest.raises(InputError) as info:
        model.predict(ragged)
    assert str(info.value) == "inputs is nested 32+ levels deep: send one row or a list of rows"
    for _ in range(1):
        ragged = ragged[0]  # 31 dimensions: ragged
    with pytest.raises(InputError, match="^inputs is ragged: every row must have the same number of values$"):
        model.predict(ragged)
    deep = [1.0]
    for _ in range(31):
        deep = [deep]  # 32 levels: a regular array, refused by shape
    with pytest.raises(InputError, match=r"^inputs has shape \[1, 1"):
        model.predict(deep)


def test_values_at_the_edges_are_accepted(model: OnnxModel) -> None:
    edge = np.float32(np.finfo(np.float32).max)
    assert len(model.predict([float(edge)] * 64)) == 1
    assert len(model.predict(np.full(64, edge, dtype=np.float32))) == 1
    assert len(model.predict([0] * 64)) == 1 and len(model.predict([-(2**60)] * 64)) == 1
    assert model.validate([[1] * 64] * 3).dtype == np.float32 and model.validate(ROWS).flags["C_CONTIGUOUS"]
    strided = np.asfortranarray(np.tile(ROWS[:2], (1, 1)))
    assert model.validate(strided).flags["C_CONTIGUOUS"]


def test_max_batch_is_exact(model: OnnxModel) -> None:
    with pytest.raises(InputError) as info:
        model.predict(ROWS[:5], max_batch=4)
    assert (str(info.value), info.value.code) == ("batch of 5 rows exceeds the limit of 4: split it", "too_large")
    assert len(model.predict(ROWS[:4], max_batch=4)) == 4
    assert runtime.InputError("m").code == "invalid_input"


def test_one_feature_and_double_outputs(tmp_path: Path) -> None:
    single = _bare(tmp_path, _graph([_tensor("x", ["b", 1])], [_tensor("o", ["b", 1])]))
    np.testing.assert_array_equal(single.predict([5.0]).outputs, [[5.0]])  # one row of one value, not empty
    np.testing.assert_array_equal(single.predict([[5], [7]]).outputs, [[5.0], [7.0]])
    double = _bare(tmp_path, _graph([_tensor("x", ["b", 2])], [_tensor("o", ["b", 2], TensorProto.DOUBLE)],
                                    [helper.make_node("Cast", ["x"], ["o"], to=TensorProto.DOUBLE)]))
    rows = np.array([[1.5, -2.0], [3.0, 4.0], [0.5, 0.25]], dtype=np.float32)
    for prediction in (double.predict(rows), double.predict_chunks(rows, chunk_size=2)):
        assert prediction.outputs.dtype == np.float32
        np.testing.assert_array_equal(prediction.outputs, rows)


def test_tensor_inputs_of_a_multi_dimensional_model(tmp_path: Path) -> None:
    identity = _bare(tmp_path, _graph([_tensor("x", ["b", 2, 3])], [_tensor("o", ["b", 2, 3])]))
    one = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert identity.validate(one).shape == (1, 2, 3)
    assert identity.validate(one.ravel()).shape == (1, 2, 3)
    assert identity.validate(np.stack([one, one])).shape == (2, 2, 3)
    assert identity.validate(np.stack([one.ravel()] * 4)).shape == (4, 2, 3)
    np.testing.assert_array_equal(identity.predict(one).outputs, one.reshape(1, 6))
    with pytest.raises(InputError) as info:
        identity.predict(np.zeros((2, 5)))
    assert str(info.value) == ("inputs has shape [2, 5]; expected one tensor of shape [2, 3] or a batch of shape "
                               "[batch, 2, 3] (or rows of 6 values)")
    with pytest.raises(InputError) as info:
        identity.predict(np.array(1.0))
    assert str(info.value) == ("inputs is a single number; expected one tensor of shape [2, 3] or a batch of shape "
                               "[batch, 2, 3] (or rows of 6 values)")


def test_match_columns_reorders_named_tables(tmp_path: Path) -> None:
    names = tuple(f"f{i}" for i in range(N_FEATURES))
    model = _open(tmp_path / "a", spec=fast_spec(feature_names=names))
    assert model.feature_names == list(names)
    table = ROWS[:3]
    shuffled = list(reversed(names))
    reordered = model.match_columns(table[:, ::-1], shuffled, "rows.csv")
    np.testing.assert_array_equal(reordered, table)
    assert model.match_columns(table, None, "x") is table and model.match_columns(table, [], "x") is table
    with pytest.raises(InputError) as info:
        model.match_columns(table, ["g"] + list(names[1:]), "rows.csv")
    assert info.value.code == "features" and str(info.value).startswith("rows.csv: ") and "f0" in str(info.value)
    unnamed = OnnxModel(write_export(tmp_path / "b"), "cpu")
    assert unnamed.match_columns(table, shuffled, "x") is table
    rows = [dict(zip(shuffled, row[::-1].tolist())) for row in table]
    np.testing.assert_array_equal(model.predict(rows).outputs, model.predict(table).outputs)
    np.testing.assert_array_equal(model.predict(rows[0]).outputs, model.predict(table[:1]).outputs)
    forward_outputs = forward(fast_spec(), weights(fast_spec()), table)
    np.testing.assert_allclose(model.predict(rows).outputs, forward_outputs, rtol=1e-5, atol=1e-5)

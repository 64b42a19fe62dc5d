"""Format analysers: Keras, SavedModel, ONNX, GGUF, safetensors. Malicious samples are built
byte by byte (or written with h5py/onnx as data, never executed); benign ones are what the
real tools write."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import h5py
import onnx
import pytest
from onnx import TensorProto, helper

from registry.scanners import gguffile, keras, onnxfile, safetensorsfile, savedmodel
from registry.scanners.base import BytesSource, ScanContext, ScanResult, Severity

CTX = ScanContext()


def rules(result: ScanResult) -> set[str]:
    return {f.rule for f in result.findings}


def worst(result: ScanResult) -> Severity | None:
    return max((f.severity for f in result.findings), default=None)


# --- a tiny protobuf encoder -----------------------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def pb_int(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def pb_len(number: int, payload: bytes | str) -> bytes:
    data = payload.encode() if isinstance(payload, str) else payload
    return varint(number << 3 | 2) + varint(len(data)) + data


# --- Keras ---------------------------------------------------------------------------------


def keras3_config(*layers: dict[str, Any]) -> dict[str, Any]:
    """The shape keras 3 writes to config.json for a Sequential model."""
    return {
        "module": "keras",
        "class_name": "Sequential",
        "config": {
            "name": "sequential",
            "trainable": True,
            "dtype": {
                "module": "keras",
                "class_name": "DTypePolicy",
                "config": {"name": "float32"},
                "registered_name": None,
            },
            "layers": [
                {
                    "module": "keras.layers",
                    "class_name": "InputLayer",
                    "config": {"batch_shape": [None, 4], "dtype": "float32", "name": "input"},
                    "registered_name": None,
                },
                *layers,
            ],
        },
        "registered_name": None,
        "build_config": {"input_shape": [None, 4]},
    }


DENSE = {
    "module": "keras.layers",
    "class_name": "Dense",
    "config": {
        "name": "dense",
        "units": 2,
        "activation": "relu",
        "kernel_initializer": {
            "module": "keras.initializers",
            "class_name": "GlorotUniform",
            "config": {"seed": None},
            "registered_name": None,
        },
    },
    "registered_name": None,
    "build_config": {"input_shape": [None, 4]},
}
KERAS3_LAMBDA = {
    "module": "keras.layers",
    "class_name": "Lambda",
    "config": {
        "name": "lambda",
        "function": {
            "class_name": "__lambda__",
            "config": {
                "value": ["4wEAAAAAAAAAAAAAAAEAAAADAAAAQwAAAHMIAAAAdAB8AIMBUwApAU4p", None, None]
            },
        },
    },
    "registered_name": None,
}
CUSTOM = {
    "module": "evil_pkg.layers",
    "class_name": "Backdoor",
    "config": {"name": "backdoor"},
    "registered_name": "EvilPkg>Backdoor",
}


def json_source(config: Any) -> BytesSource:
    return BytesSource(json.dumps(config).encode())


def test_keras_config_without_lambda_is_clean() -> None:
    source = json_source(keras3_config(DENSE))
    assert keras.detect(source.read(0, 65536), "config.json")
    result = keras.analyse(source, name="config.json", ctx=CTX)
    assert result.findings == []
    assert result.formats == ["keras.json"]


def test_keras_lambda_is_critical_once_with_a_code_summary() -> None:
    result = keras.analyse(
        json_source(keras3_config(DENSE, KERAS3_LAMBDA)), name="config.json", ctx=CTX
    )
    assert [f.rule for f in result.findings] == ["keras.lambda"]
    assert result.findings[0].severity is Severity.CRITICAL
    assert result.findings[0].reference.startswith("marshalled code")


def test_keras_lambda_nested_in_a_wrapper_and_keras2_form_is_found() -> None:
    keras2_lambda = {
        "class_name": "Lambda",
        "config": {
            "name": "l",
            "function": "evil_fn",
            "function_type": "function",
            "module": "__main__",
        },
    }
    wrapper = {"class_name": "TimeDistributed", "config": {"layer": keras2_lambda}}
    config = {"class_name": "Model", "config": {"layers": [wrapper]}, "keras_version": "2.15.0"}
    result = keras.analyse(
        json_source(config), name="model.json", ctx=ScanContext(member="m.keras!config.json")
    )
    assert rules(result) == {"keras.lambda"}
    assert result.findings[0].reference == "evil_fn"
    assert result.findings[0].member == "m.keras!config.json"


def test_keras_custom_object_is_high() -> None:
    result = keras.analyse(json_source(keras3_config(CUSTOM)), name="config.json", ctx=CTX)
    assert rules(result) == {"keras.custom_object"}
    assert worst(result) is Severity.HIGH
    # a keras module with a package-prefixed registered name is custom too
    sneaky = {**DENSE, "registered_name": "Evil>Dense"}
    assert rules(
        keras.analyse(json_source(keras3_config(sneaky)), name="config.json", ctx=CTX)
    ) == {"keras.custom_object"}


def test_keras_get_file_and_torch_wrapper_are_critical() -> None:
    get_file = {
        "module": "keras.utils",
        "class_name": "get_file",
        "config": {},
        "registered_name": None,
    }
    torch = {
        "module": "keras.layers",
        "class_name": "TorchModuleWrapper",
        "config": {"module": "gASV"},
    }
    result = keras.analyse(json_source(keras3_config(get_file, torch)), name="config.json", ctx=CTX)
    assert rules(result) == {"keras.dangerous_function", "keras.torch_module"}
    assert worst(result) is Severity.CRITICAL


def test_keras_tf_op_lambda_severity_depends_on_the_op() -> None:
    def tfop(function: str) -> dict[str, Any]:
        return {"class_name": "TFOpLambda", "config": {"function": function}}

    benign = keras.analyse(
        json_source(keras3_config(tfop("math.add"))), name="config.json", ctx=CTX
    )
    evil = keras.analyse(
        json_source(keras3_config(tfop("io.write_file"))), name="config.json", ctx=CTX
    )
    assert worst(benign) is Severity.MEDIUM
    assert worst(evil) is Severity.CRITICAL


def test_keras_malformed_config_is_unanalysable() -> None:
    result = keras.analyse(
        BytesSource(b'{"class_name": "Sequential", "config": {'), name="config.json", ctx=CTX
    )
    assert rules(result) == {"keras.unanalysable"}
    deep = b'{"class_name": "X", "config": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert rules(keras.analyse(BytesSource(deep), name="config.json", ctx=CTX)) == {
        "keras.unanalysable"
    }


def test_keras_detect() -> None:
    head = json.dumps(keras3_config(DENSE)).encode()
    assert keras.detect(head, "config.json")
    assert not keras.detect(b'{"architectures": ["BertModel"], "hidden_size": 768}', "config.json")
    assert not keras.detect(head, "notes.txt")
    assert keras.detect(b"\x89HDF\r\n\x1a\n" + b"\0" * 100, "anything.bin")
    assert keras.detect(b"\0" * 512 + b"\x89HDF\r\n\x1a\n" + b"\0" * 100, "x")
    assert not keras.detect(b"PK\x03\x04", "model.keras")


def write_h5(path: Path, model_config: Any, *, userblock: int = 0) -> BytesSource:
    kwargs = {"userblock_size": userblock} if userblock else {}
    with h5py.File(path, "w", **kwargs) as h5:
        h5.attrs["model_config"] = json.dumps(model_config)
        h5.attrs["keras_version"] = "2.15.0"
        h5.attrs["backend"] = "tensorflow"
        h5.create_group("model_weights").create_dataset("kernel", data=[[0.5, 0.25]])
    return BytesSource(path.read_bytes())


def test_keras_h5_with_lambda_in_model_config_is_critical(tmp_path: Path) -> None:
    lambda_layer = {
        "class_name": "Lambda",
        "config": {
            "name": "l",
            "function": ["4wEAAAAAAAAA", None, None],
            "function_type": "lambda",
        },
    }
    source = write_h5(
        tmp_path / "m.h5", {"class_name": "Sequential", "config": {"layers": [lambda_layer]}}
    )
    assert keras.detect(source.read(0, 65536), "m.h5")
    result = keras.analyse(source, name="m.h5", ctx=CTX)
    assert result.formats == ["keras.h5"]
    assert rules(result) == {"keras.lambda"}


def test_keras_h5_without_lambda_is_clean_and_a_user_block_is_searched(tmp_path: Path) -> None:
    config = {
        "class_name": "Sequential",
        "config": {"layers": [{"class_name": "Dense", "config": {"units": 2}}]},
    }
    assert keras.analyse(write_h5(tmp_path / "a.h5", config), name="a.h5", ctx=CTX).findings == []
    custom = {
        "class_name": "Sequential",
        "config": {"layers": [{"class_name": "Custom>Backdoor", "config": {}}]},
    }
    source = write_h5(tmp_path / "b.h5", custom, userblock=512)
    assert source.read(0, 8) != b"\x89HDF\r\n\x1a\n"
    assert rules(keras.analyse(source, name="b.h5", ctx=CTX)) == {"keras.custom_object"}


def test_keras_truncated_h5_is_unanalysable(tmp_path: Path) -> None:
    source = write_h5(tmp_path / "c.h5", {"class_name": "Sequential", "config": {}})
    truncated = BytesSource(source.read(0, 600))
    assert rules(keras.analyse(truncated, name="c.h5", ctx=CTX)) == {"keras.unanalysable"}


# --- TensorFlow SavedModel -------------------------------------------------------------------


def node(name: str, op: str, attrs: dict[str, bytes] | None = None) -> bytes:
    body = pb_len(1, name) + pb_len(2, op) + pb_len(3, "input:0")
    for key, value in (attrs or {}).items():
        body += pb_len(5, pb_len(1, key) + pb_len(2, pb_len(2, value)))
    return body


def saved_model(nodes: list[bytes], functions: list[list[bytes]] = (), metadata: str = "") -> bytes:  # type: ignore[assignment]
    graph = b"".join(pb_len(1, n) for n in nodes)
    library = b"".join(
        pb_len(1, pb_len(1, pb_len(1, "fn")) + b"".join(pb_len(3, n) for n in f)) for f in functions
    )
    if library:
        graph += pb_len(2, library)
    graph += pb_len(4, pb_int(1, 1808))  # versions
    meta_graph = pb_len(1, pb_len(4, "serve") + pb_len(5, "2.16.1")) + pb_len(2, graph)
    if metadata:
        user_object = pb_len(1, "_tf_keras_layer") + pb_len(3, metadata)
        meta_graph += pb_len(7, pb_len(1, pb_len(4, user_object)))
    return pb_int(1, 1) + pb_len(2, meta_graph)


BENIGN_NODES = [
    node("x", "Placeholder"),
    node("w", "Const", {"value": b"\x00" * 4096}),
    node("y", "MatMul"),
    node("saver_filename", "Placeholder"),
    node("save/SaveV2", "SaveV2"),
    node("save/RestoreV2", "RestoreV2"),
    node("print", "PrintV2", {"output_stream": b"stderr"}),
]


def test_savedmodel_benign_graph_is_clean() -> None:
    data = saved_model(BENIGN_NODES, [[node("add", "AddV2"), node("id", "Identity")]])
    assert savedmodel.detect(data[:65536], "model/whatever.bin")
    result = savedmodel.analyse(BytesSource(data), name="m/saved_model.pb", ctx=CTX)
    assert result.findings == []
    assert result.formats == ["savedmodel"]


def test_savedmodel_readfile_and_pyfunc_in_a_function_are_found() -> None:
    data = saved_model([*BENIGN_NODES, node("steal", "ReadFile")], [[node("run", "PyFunc")]])
    result = savedmodel.analyse(BytesSource(data), name="saved_model.pb", ctx=CTX)
    by_rule = {f.rule: f for f in result.findings}
    assert set(by_rule) == {"savedmodel.file_read_op", "savedmodel.python_op"}
    assert by_rule["savedmodel.python_op"].severity is Severity.CRITICAL
    assert by_rule["savedmodel.file_read_op"].reference == "ReadFile"
    offset = by_rule["savedmodel.file_read_op"].offset
    assert offset is not None and data[offset:].startswith(pb_len(1, "steal"))


def test_savedmodel_writefile_and_print_to_file_are_critical() -> None:
    data = saved_model(
        [node("w", "WriteFile"), node("p", "PrintV2", {"output_stream": b"file:///tmp/x"})]
    )
    result = savedmodel.analyse(BytesSource(data), name="saved_model.pb", ctx=CTX)
    assert [f.rule for f in result.findings] == ["savedmodel.file_write_op"] * 2
    assert worst(result) is Severity.CRITICAL


def test_savedmodel_keras_lambda_metadata_is_found() -> None:
    metadata = json.dumps({"class_name": "Lambda", "config": {"function": ["4wEA", None, None]}})
    inline = savedmodel.analyse(
        BytesSource(saved_model(BENIGN_NODES, metadata=metadata)), name="saved_model.pb", ctx=CTX
    )
    assert rules(inline) == {"keras.lambda"}
    keras_metadata = pb_len(
        1, pb_int(2, 0) + pb_len(3, "root") + pb_len(4, "_tf_keras_model") + pb_len(5, metadata)
    )
    assert savedmodel.detect(keras_metadata, "m/keras_metadata.pb")
    result = savedmodel.analyse(BytesSource(keras_metadata), name="m/keras_metadata.pb", ctx=CTX)
    assert rules(result) == {"keras.lambda"}


def test_savedmodel_malformed_protobuf_is_unanalysable() -> None:
    data = saved_model([node("steal", "ReadFile")])
    for broken in (data[:-3], data + b"\x0a\xff\xff\xff\xff\x0f", b"\x08\x01\x12\x80"):
        result = savedmodel.analyse(BytesSource(broken), name="saved_model.pb", ctx=CTX)
        assert "savedmodel.unanalysable" in rules(result)


def test_savedmodel_pbtxt_is_searched_for_ops() -> None:
    text = b'meta_graphs { graph_def { node { name: "x" op: "WriteFile" } node { op: "MatMul" } } }'
    result = savedmodel.analyse(BytesSource(text), name="saved_model.pbtxt", ctx=CTX)
    assert rules(result) == {"savedmodel.file_write_op"}


def test_savedmodel_detect() -> None:
    assert savedmodel.detect(b"", "a/b/saved_model.pb")
    assert not savedmodel.detect(b"\x08\x08\x12\x07pytorch", "model.bin")
    assert not savedmodel.detect(b"GGUF", "model.gguf")


# --- ONNX ----------------------------------------------------------------------------------


FLOATS = struct.pack("<4096f", *[0.5] * 4096)


def onnx_model(*, with_if: bool = False) -> onnx.ModelProto:
    weight = helper.make_tensor("W", TensorProto.FLOAT, [64, 64], FLOATS, raw=True)
    nodes = [helper.make_node("MatMul", ["X", "W"], ["Y"])]
    if with_if:
        const = helper.make_tensor("C", TensorProto.FLOAT, [64, 64], FLOATS, raw=True)
        branch = helper.make_graph(
            [helper.make_node("Constant", [], ["Z"], value=const)],
            "branch",
            [],
            [helper.make_tensor_value_info("Z", TensorProto.FLOAT, [64, 64])],
        )
        nodes.append(
            helper.make_node("If", ["cond"], ["Z"], then_branch=branch, else_branch=branch)
        )
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 64])],
        initializer=[weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def save_external(model: onnx.ModelProto, folder: Path) -> onnx.ModelProto:
    onnx.save_model(
        model,
        folder / "model.onnx",
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=0,
        convert_attribute=True,
    )
    return onnx.load_model(folder / "model.onnx", load_external_data=False)


def both_paths(data: bytes) -> list[ScanResult]:
    """The parsed path, and the wire walk used above PARSE_LIMIT: they must agree."""
    source = BytesSource(data)
    parsed = onnxfile.analyse(source, name="model.onnx", ctx=CTX)
    wire = onnxfile.external_tensors(source, parse_limit=0)
    assert sorted((n, e) for n, e, _ in wire) == sorted(
        (n, e) for n, e, _ in onnxfile.external_tensors(source)
    )
    return [parsed]


def test_onnx_in_folder_external_data_is_clean(tmp_path: Path) -> None:
    save_external(onnx_model(with_if=True), tmp_path)
    data = (tmp_path / "model.onnx").read_bytes()
    assert (tmp_path / "weights.bin").stat().st_size > 0
    assert onnxfile.detect(data[:65536], "renamed.bin")
    tensors = onnxfile.external_tensors(BytesSource(data))
    assert {name for name, _, _ in tensors} == {"W", "C"}  # the If branches' tensor too
    [result] = both_paths(data)
    assert result.findings == []


@pytest.mark.parametrize(
    "location",
    [
        "/etc/passwd",
        "../../etc/passwd",
        "weights/../../secret",
        "C:\\Windows\\win.ini",
        "\\\\server\\share\\w.bin",
        "c:w.bin",
    ],
)
def test_onnx_external_data_escaping_the_folder_is_critical(tmp_path: Path, location: str) -> None:
    model = save_external(onnx_model(with_if=True), tmp_path)
    # the escape hides in the If branch's Constant tensor, not in the top-level initializer
    branch = model.graph.node[1].attribute[0].g
    for entry in branch.node[0].attribute[0].t.external_data:
        if entry.key == "location":
            entry.value = location
    data = model.SerializeToString()
    [result] = both_paths(data)
    assert [f.rule for f in result.findings] == ["onnx.external_data.escape"]
    assert result.findings[0].severity is Severity.CRITICAL
    assert result.findings[0].reference == location
    wire = [
        onnxfile.judge_location(name, entries, offset=offset, ctx=CTX)
        for name, entries, offset in onnxfile.external_tensors(BytesSource(data), parse_limit=0)
    ]
    escapes = [f for f in wire if f is not None]
    assert [(f.rule, f.reference) for f in escapes] == [("onnx.external_data.escape", location)]
    assert escapes[0].offset is not None and escapes[0].offset > 0


def test_onnx_sparse_initializer_and_missing_location(tmp_path: Path) -> None:
    model = onnx_model()
    values = helper.make_tensor("sv", TensorProto.FLOAT, [2], [1.0, 2.0])
    indices = helper.make_tensor("si", TensorProto.INT64, [2], [0, 5])
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [8]))
    sparse_values = model.graph.sparse_initializer[0].values
    sparse_values.ClearField("float_data")
    sparse_values.data_location = TensorProto.EXTERNAL
    sparse_values.external_data.add(key="location", value="/dev/shm/x")
    weight = model.graph.initializer[0]
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    weight.external_data.add(key="offset", value="0")
    [result] = both_paths(model.SerializeToString())
    assert rules(result) == {"onnx.external_data.escape", "onnx.external_data.invalid"}


def test_onnx_malformed_and_detect() -> None:
    result = onnxfile.analyse(BytesSource(b"\x08\x08\x3a\xff\xff"), name="model.onnx", ctx=CTX)
    assert rules(result) == {"onnx.unanalysable"}
    wire = BytesSource(b"\x08\x08\x3a\x05\x2a\x10")
    with pytest.raises(ValueError, match="past"):
        onnxfile.external_tensors(wire, parse_limit=0)
    assert not onnxfile.detect(b"\x08\x01\x12\x05\x0a\x03", "saved_model.bin")
    assert not onnxfile.detect(b"GGUF\x03\x00\x00\x00", "x")
    assert onnxfile.detect(b"", "net.ONNX")


# --- GGUF ----------------------------------------------------------------------------------


def gguf(metadata: dict[str, Any], *, version: int = 3, order: str = "<") -> bytes:
    def string(s: str) -> bytes:
        data = s.encode()
        return struct.pack(order + ("Q" if version >= 2 else "I"), len(data)) + data

    count = "Q" if version >= 2 else "I"
    out = (
        b"GGUF"
        + struct.pack(order + "I", version)
        + struct.pack(order + count * 2, 1, len(metadata))
    )
    for key, value in metadata.items():
        out += string(key)
        if isinstance(value, str):
            out += struct.pack(order + "I", 8) + string(value)
        elif isinstance(value, list):
            out += struct.pack(order + "II", 9, 8) + struct.pack(order + count, len(value))
            out += b"".join(string(v) for v in value)
        else:
            out += struct.pack(order + "IIxxxx", 4, value)[:8]
    # one tensor info and a blob the analyser must never need
    return out + string("token_embd.weight") + struct.pack(order + "I", 1) + b"\0" * 4096


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% set ns = namespace(found=false) %}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] | trim %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/...') }}{% endif %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.first %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% if message.tool_calls is defined %}"
    "{{ message.tool_calls | map(attribute='function') | list | tojson }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    "{% generation %}{{ messages | selectattr('role', 'equalto', 'user') | list | length }}"
    "{% endgeneration %}{% for m in messages %}"
    "{% if m.content.strip().startswith('x') %}{% break %}{% endif %}{% endfor %}"
)
VOCAB = ["<s>", "</s>", "hello"] * 100


@pytest.mark.parametrize("template", [CHATML, LLAMA3])
@pytest.mark.parametrize(("version", "order"), [(3, "<"), (2, ">"), (1, "<")])
def test_gguf_benign_templates_are_clean(template: str, version: int, order: str) -> None:
    data = gguf(
        {
            "general.architecture": "llama",
            "tokenizer.ggml.tokens": VOCAB,
            "llama.block_count": 32,
            "tokenizer.chat_template": template,
        },
        version=version,
        order=order,
    )
    assert gguffile.detect(data[:65536], "x.bin")
    [(key, found, _)] = gguffile.chat_templates(BytesSource(data))
    assert (key, found) == ("tokenizer.chat_template", template)
    result = gguffile.analyse(BytesSource(data), name="model.gguf", ctx=CTX)
    assert result.findings == []


@pytest.mark.parametrize(
    ("template", "rule", "severity"),
    [
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "private_attribute", Severity.CRITICAL),
        (
            "{{ lipsum.__globals__['os'].popen('echo pwned').read() }}",
            "private_attribute",
            Severity.CRITICAL,
        ),
        ("{{ cycler.next }}", "dangerous_global", Severity.CRITICAL),
        ("{{ messages | attr('__cl' ~ 'ass__') }}", "dynamic_attribute", Severity.HIGH),
        ("{{ x | attr('__class__') }}", "private_attribute", Severity.CRITICAL),
        (
            "{% set u = '_' %}{% set k = u ~ u ~ 'class' ~ u ~ u %}{{ messages[k] }}",
            "dynamic_attribute",
            Severity.HIGH,
        ),
        ("{{ messages.mro }}", "private_attribute", Severity.CRITICAL),
        ("{{ '{0.__class__}'.format(messages) }}", "private_attribute", Severity.CRITICAL),
        ("{{ '{0}'.format(messages) }}", "unknown_call", Severity.HIGH),
        ("{{ messages | map('shell') | list }}", "unknown_call", Severity.HIGH),
        ("{{ messages | evil_filter }}", "unknown_call", Severity.HIGH),
        ("{% if x is sandboxed %}{% endif %}", "unknown_call", Severity.HIGH),
        ("{{ open('/etc/passwd') }}", "unknown_call", Severity.HIGH),
        ("{% include 'other.j2' %}", "include", Severity.HIGH),
        ("{% import 'macros.j2' as m %}", "include", Severity.HIGH),
    ],
)
def test_gguf_templates_that_call_out_are_found(
    template: str, rule: str, severity: Severity
) -> None:
    data = gguf({"tokenizer.ggml.tokens": VOCAB, "tokenizer.chat_template.tool_use": template})
    result = gguffile.analyse(BytesSource(data), name="model.gguf", ctx=CTX)
    assert f"gguf.chat_template.{rule}" in rules(result)
    assert worst(result) == severity
    finding = next(f for f in result.findings if f.rule == f"gguf.chat_template.{rule}")
    assert finding.offset is not None
    assert data[finding.offset :].startswith(template.encode())


def test_gguf_malformed_is_unanalysable() -> None:
    data = gguf({"tokenizer.chat_template": CHATML})
    for broken in (
        data[:40],
        data[:4] + b"\x09\x00\x00\x00" + data[8:],
        b"GGUF\x03\0\0\0" + b"\xff" * 16,
    ):
        result = gguffile.analyse(BytesSource(broken), name="model.gguf", ctx=CTX)
        assert rules(result) == {"gguf.unanalysable"}
    syntax = gguf({"tokenizer.chat_template": "{% for m in messages %}{{ m"})
    assert rules(gguffile.analyse(BytesSource(syntax), name="m.gguf", ctx=CTX)) == {
        "gguf.unanalysable"
    }
    assert not gguffile.detect(b"GGML", "model.gguf")


# --- safetensors ---------------------------------------------------------------------------


def safetensors_bytes(
    tensors: dict[str, Any],
    data: bytes,
    *,
    metadata: dict[str, str] | None = None,
    pad: bool = True,
) -> bytes:
    header = dict(tensors)
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)  # the reference writer aligns the data area to 8
    return struct.pack("<Q", len(raw)) + raw + data


VALID_TENSORS = {
    "embed.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
    "embed.bias": {"dtype": "BF16", "shape": [3], "data_offsets": [24, 30]},
    "step": {"dtype": "I64", "shape": [], "data_offsets": [30, 38]},
    "empty": {"dtype": "U8", "shape": [0, 4], "data_offsets": [38, 38]},
}


def test_safetensors_valid_file_is_clean_and_summarised() -> None:
    data = safetensors_bytes(VALID_TENSORS, bytes(38), metadata={"format": "pt"})
    source = BytesSource(data)
    assert safetensorsfile.detect(data[:65536], "weights.bin")
    assert safetensorsfile.analyse(source, name="model.safetensors", ctx=CTX).findings == []
    assert safetensorsfile.safetensors_summary(source) == {
        "tensors": 4,
        "dtypes": {"F32": 1, "BF16": 1, "I64": 1, "U8": 1},
        "parameters": 10,
        "metadata": {"format": "pt"},
    }


def test_safetensors_gap_is_medium() -> None:
    tensors = {"a": {"dtype": "U8", "shape": [4], "data_offsets": [8, 12]}}
    result = safetensorsfile.analyse(
        BytesSource(safetensors_bytes(tensors, b"PK\x03\x04" * 4)), name="m.safetensors", ctx=CTX
    )
    assert [f.rule for f in result.findings] == ["safetensors.gap", "safetensors.gap"]
    assert worst(result) is Severity.MEDIUM


def _with(name: str, **changes: Any) -> dict[str, Any]:
    return {**VALID_TENSORS, name: {**VALID_TENSORS[name], **changes}}


@pytest.mark.parametrize(
    "data",
    [
        b"\x05\x00",
        struct.pack("<Q", 1 << 40) + b"{}",
        struct.pack("<Q", 200) + b'{"a": 1}',
        struct.pack("<Q", 4) + b"[1] ",
        struct.pack("<Q", 2) + b"\xff}",
        struct.pack("<Q", 9) + b'{"a":1,}x',
        struct.pack("<Q", 17) + b'{"x":{},"x":{}}  ',
        safetensors_bytes(_with("step", dtype="PICKLE"), bytes(38)),
        safetensors_bytes(_with("step", shape=[-1]), bytes(38)),
        safetensors_bytes(_with("step", shape=[True]), bytes(38)),
        safetensors_bytes(_with("embed.weight", data_offsets=[0, 20]), bytes(38)),
        safetensors_bytes(_with("embed.bias", data_offsets=[20, 26]), bytes(38)),
        safetensors_bytes(_with("step", data_offsets=[30, 4000]), bytes(38)),
        safetensors_bytes(_with("step", data_offsets=[38, 30]), bytes(38)),
        safetensors_bytes(_with("step", extra=1), bytes(38)),
        safetensors_bytes(VALID_TENSORS, bytes(38), metadata={"n": 1}),  # type: ignore[dict-item]
    ],
)
def test_safetensors_malformed_header_is_high(data: bytes) -> None:
    result = safetensorsfile.analyse(BytesSource(data), name="m.safetensors", ctx=CTX)
    assert rules(result) == {"safetensors.malformed"}
    assert worst(result) is Severity.HIGH
    with pytest.raises(safetensorsfile.Malformed):
        safetensorsfile.safetensors_summary(BytesSource(data))


def test_safetensors_detect() -> None:
    data = safetensors_bytes(VALID_TENSORS, bytes(38))
    assert safetensorsfile.detect(data, "blob")
    assert not safetensorsfile.detect(b"PK\x03\x04" + bytes(20), "model.bin")
    assert not safetensorsfile.detect(b'{"class_name": "x"}', "config.json")


# --- every analyser turns any exception into a finding ---------------------------------------


class BrokenSource:
    size = 1 << 20

    def read(self, start: int, end: int) -> bytes:
        raise OSError("decryption failed")


@pytest.mark.parametrize(
    ("module", "name"),
    [
        (keras, "config.json"),
        (savedmodel, "saved_model.pb"),
        (onnxfile, "m.onnx"),
        (gguffile, "m.gguf"),
        (safetensorsfile, "m.safetensors"),
    ],
)
def test_exceptions_become_unanalysable_findings(module: Any, name: str) -> None:
    result = module.analyse(BrokenSource(), name=name, ctx=ScanContext(member="outer.zip!" + name))
    [finding] = result.findings
    assert finding.rule.endswith(".unanalysable")
    assert finding.severity is Severity.HIGH
    assert finding.member == "outer.zip!" + name


def test_mutated_samples_never_raise(tmp_path: Path) -> None:
    """Bounded random mutation of one sample per format: detect and analyse never raise."""
    import random

    save_external(onnx_model(with_if=True), tmp_path)
    samples = [
        (keras, "config.json", json.dumps(keras3_config(DENSE, KERAS3_LAMBDA)).encode()),
        (savedmodel, "saved_model.pb", saved_model(BENIGN_NODES, [[node("r", "ReadFile")]])),
        (onnxfile, "model.onnx", (tmp_path / "model.onnx").read_bytes()),
        (gguffile, "model.gguf", gguf({"tokenizer.chat_template": LLAMA3, "v": VOCAB})),
        (safetensorsfile, "m.safetensors", safetensors_bytes(VALID_TENSORS, bytes(38))),
    ]
    rng = random.Random(7)
    for module, name, data in samples:
        for _ in range(150):
            mutated = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                position = rng.randrange(len(mutated))
                choice = rng.random()
                if choice < 0.6:
                    mutated[position] = rng.randrange(256)
                elif choice < 0.8:
                    del mutated[position : position + rng.randint(1, 64)]
                else:
                    mutated[position:position] = rng.randbytes(rng.randint(1, 16))
            blob = bytes(mutated)
            module.detect(blob[:65536], name)
            result = module.analyse(BytesSource(blob), name=name, ctx=CTX)
            assert all(isinstance(f.severity, Severity) for f in result.findings)

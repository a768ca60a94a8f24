"""Our csi.proto against an independent description of the CSI spec.

The reference is the csi.v1 file descriptor that the ember-csi wheel carries in its
generated module for CSI v1.1.0. The module is read as text, never imported (it was
generated for an older protobuf, and importing it would register a second csi.v1 in
the default pool): the serialized FileDescriptorProto is taken out of it with ``ast``.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    json_format,
    message_factory,
    timestamp_pb2,
    wrappers_pb2,
)

from cachefs.csi.proto import csi_pb2

SPEC_PACKAGE = "ember_csi"
SPEC_MODULE = ("v1_1_0", "csi_pb2.py")
INSTALL = "pip install --no-deps ember-csi==0.9.1"

FileDescriptorProto = descriptor_pb2.FileDescriptorProto
DescriptorProto = descriptor_pb2.DescriptorProto
EnumDescriptorProto = descriptor_pb2.EnumDescriptorProto

# What the plugin serves: Identity, and the Node calls of an unstaged node plugin.
OUR_RPCS = {
    "Identity": {"GetPluginInfo", "GetPluginCapabilities", "Probe"},
    "Node": {"NodeGetInfo", "NodeGetCapabilities", "NodePublishVolume", "NodeUnpublishVolume"},
}


def serialized_descriptor(source: str) -> bytes:
    """The serialized FileDescriptorProto in a generated ``*_pb2.py`` module's text.

    Old generators pass it as ``serialized_pb=b'...'`` to ``FileDescriptor``, newer
    ones as the argument of ``AddSerializedFile(b'...')``.
    """
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.keyword) and node.arg == "serialized_pb":
            value = ast.literal_eval(node.value)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "AddSerializedFile"
            and node.args
        ):
            value = ast.literal_eval(node.args[0])
        else:
            continue
        if isinstance(value, bytes):
            return value
    raise ValueError("no serialized file descriptor in this module")


def ours() -> FileDescriptorProto:
    proto = FileDescriptorProto()
    csi_pb2.DESCRIPTOR.CopyToProto(proto)
    return proto


@pytest.fixture(scope="module")
def spec() -> FileDescriptorProto:
    found = importlib.util.find_spec(SPEC_PACKAGE)
    if found is None or not found.submodule_search_locations:
        pytest.fail(f"the CSI spec reference is not installed: run `{INSTALL}`")
    module = Path(next(iter(found.submodule_search_locations)), *SPEC_MODULE)
    if not module.is_file():
        pytest.fail(f"{SPEC_PACKAGE} has no {'/'.join(SPEC_MODULE)}: run `{INSTALL}`")
    proto = FileDescriptorProto.FromString(serialized_descriptor(module.read_text()))
    assert proto.package == "csi.v1"
    return proto


def _messages(
    prefix: str, messages: list[DescriptorProto]
) -> dict[str, tuple[DescriptorProto, str]]:
    """Every message, nested ones included, by full name (with a leading dot)."""
    found = {}
    for message in messages:
        name = f"{prefix}.{message.name}"
        found[name] = (message, name)
        found.update(_messages(name, list(message.nested_type)))
    return found


def _enums(file: FileDescriptorProto) -> dict[str, EnumDescriptorProto]:
    prefix = f".{file.package}"
    found = {f"{prefix}.{enum.name}": enum for enum in file.enum_type}
    for message, name in _messages(prefix, list(file.message_type)).values():
        found.update({f"{name}.{enum.name}": enum for enum in message.enum_type})
    return found


def _field_shape(message: DescriptorProto, field: descriptor_pb2.FieldDescriptorProto) -> dict:
    return {
        "number": field.number,
        "type": descriptor_pb2.FieldDescriptorProto.Type.Name(field.type),
        "label": descriptor_pb2.FieldDescriptorProto.Label.Name(field.label),
        "type_name": field.type_name,
        "oneof": (
            message.oneof_decl[field.oneof_index].name if field.HasField("oneof_index") else None
        ),
    }


def differences(mine: FileDescriptorProto, reference: FileDescriptorProto) -> list[str]:
    """What we define that the reference defines otherwise, or not at all.

    Checked: package, imports, every message (nested ones and map entries included),
    every field's number, type, label, type name and oneof, every enum value's number,
    every RPC's request and response types and streaming flags.
    """
    problems = []
    if mine.package != reference.package:
        problems.append(f"package {mine.package!r} is {reference.package!r} in the spec")
    for dependency in set(mine.dependency) - set(reference.dependency):
        problems.append(f"import {dependency!r} is not one of the spec's")

    prefix = f".{mine.package}"
    theirs = _messages(f".{reference.package}", list(reference.message_type))
    for name, (message, _) in _messages(prefix, list(mine.message_type)).items():
        if name not in theirs:
            problems.append(f"message {name} is not in the spec")
            continue
        other = theirs[name][0]
        if message.options.map_entry != other.options.map_entry:
            problems.append(f"message {name}: map_entry differs from the spec")
        their_fields = {field.name: field for field in other.field}
        for field in message.field:
            if field.name not in their_fields:
                problems.append(f"field {name}.{field.name} is not in the spec")
                continue
            have = _field_shape(message, field)
            want = _field_shape(other, their_fields[field.name])
            for key in have:
                if have[key] != want[key]:
                    problems.append(
                        f"field {name}.{field.name}: {key} {have[key]!r}, spec {want[key]!r}"
                    )

    their_enums = _enums(reference)
    for name, enum in _enums(mine).items():
        if name not in their_enums:
            problems.append(f"enum {name} is not in the spec")
            continue
        their_values = {value.name: value.number for value in their_enums[name].value}
        for value in enum.value:
            if value.name not in their_values:
                problems.append(f"enum value {name}.{value.name} is not in the spec")
            elif value.number != their_values[value.name]:
                problems.append(
                    f"enum value {name}.{value.name}: {value.number}, "
                    f"spec {their_values[value.name]}"
                )

    their_services = {service.name: service for service in reference.service}
    for service in mine.service:
        if service.name not in their_services:
            problems.append(f"service {service.name} is not in the spec")
            continue
        their_methods = {method.name: method for method in their_services[service.name].method}
        for method in service.method:
            other = their_methods.get(method.name)
            if other is None:
                problems.append(f"rpc {service.name}.{method.name} is not in the spec")
                continue
            for key in ("input_type", "output_type", "client_streaming", "server_streaming"):
                if getattr(method, key) != getattr(other, key):
                    problems.append(
                        f"rpc {service.name}.{method.name}: {key} {getattr(method, key)!r}, "
                        f"spec {getattr(other, key)!r}"
                    )
    return problems


def omissions(mine: FileDescriptorProto, reference: FileDescriptorProto) -> list[str]:
    """The spec's fields, nested types and enum values missing from what we define."""
    missing = []
    theirs = _messages(f".{reference.package}", list(reference.message_type))
    for name, (message, _) in _messages(f".{mine.package}", list(mine.message_type)).items():
        if name not in theirs:
            continue
        other = theirs[name][0]
        missing += [
            f"field {name}.{field}"
            for field in sorted({f.name for f in other.field} - {f.name for f in message.field})
        ]
        missing += [
            f"type {name}.{nested}"
            for nested in sorted(
                {n.name for n in [*other.nested_type, *other.enum_type]}
                - {n.name for n in [*message.nested_type, *message.enum_type]}
            )
        ]
    their_enums = _enums(reference)
    for name, enum in _enums(mine).items():
        if name in their_enums:
            missing += [
                f"enum value {name}.{value}"
                for value in sorted(
                    {v.name for v in their_enums[name].value} - {v.name for v in enum.value}
                )
            ]
    return missing


def test_our_messages_and_rpcs_are_the_specs(spec: FileDescriptorProto) -> None:
    assert differences(ours(), spec) == []


def test_our_messages_carry_every_field_the_spec_gives_them(spec: FileDescriptorProto) -> None:
    assert omissions(ours(), spec) == []


def test_we_define_exactly_the_rpcs_we_serve() -> None:
    served = {service.name: {m.name for m in service.method} for service in ours().service}
    assert served == OUR_RPCS


def _mutate_field(proto: FileDescriptorProto, message: str, field: str, **changes) -> None:
    for candidate in next(m for m in proto.message_type if m.name == message).field:
        if candidate.name == field:
            for key, value in changes.items():
                if value is None:
                    candidate.ClearField(key)
                else:
                    setattr(candidate, key, value)


def _number_4_to_9(proto: FileDescriptorProto) -> None:
    _mutate_field(proto, "NodePublishVolumeRequest", "target_path", number=9)


def _string_to_bytes(proto: FileDescriptorProto) -> None:
    _mutate_field(
        proto,
        "NodeUnpublishVolumeRequest",
        "volume_id",
        type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
    )


def _out_of_the_oneof(proto: FileDescriptorProto) -> None:
    volume_capability = next(m for m in proto.message_type if m.name == "VolumeCapability")
    for field in volume_capability.field:
        if field.name == "mount":
            field.ClearField("oneof_index")


def _map_to_list(proto: FileDescriptorProto) -> None:
    _mutate_field(
        proto,
        "NodePublishVolumeRequest",
        "secrets",
        type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
        type_name=None,
    )


def _renumbered_enum_value(proto: FileDescriptorProto) -> None:
    capability = next(m for m in proto.message_type if m.name == "NodeServiceCapability")
    capability.nested_type[0].enum_type[0].value[1].number = 7


def _extra_field(proto: FileDescriptorProto) -> None:
    response = next(m for m in proto.message_type if m.name == "NodeGetInfoResponse")
    response.field.add(
        name="zone",
        number=4,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )


def _streaming_rpc(proto: FileDescriptorProto) -> None:
    node = next(s for s in proto.service if s.name == "Node")
    node.method[0].server_streaming = True


def _wrong_response(proto: FileDescriptorProto) -> None:
    identity = next(s for s in proto.service if s.name == "Identity")
    identity.method[0].output_type = ".csi.v1.ProbeResponse"


@pytest.mark.parametrize(
    ("mutate", "reported"),
    [
        (_number_4_to_9, "field .csi.v1.NodePublishVolumeRequest.target_path: number 9, spec 4"),
        (_string_to_bytes, "field .csi.v1.NodeUnpublishVolumeRequest.volume_id: type"),
        (_out_of_the_oneof, "field .csi.v1.VolumeCapability.mount: oneof None, spec 'access_type'"),
        (_map_to_list, "field .csi.v1.NodePublishVolumeRequest.secrets: type"),
        (_renumbered_enum_value, "STAGE_UNSTAGE_VOLUME: 7, spec 1"),
        (_extra_field, "field .csi.v1.NodeGetInfoResponse.zone is not in the spec"),
        (_streaming_rpc, "server_streaming True, spec False"),
        (_wrong_response, "rpc Identity.GetPluginInfo: output_type '.csi.v1.ProbeResponse'"),
    ],
)
def test_the_comparison_notices_a_difference(spec, mutate, reported) -> None:
    mutated = ours()
    mutate(mutated)
    problems = differences(mutated, spec)
    assert any(problem.startswith(reported) or reported in problem for problem in problems), (
        problems
    )


def test_the_completeness_check_notices_a_missing_field(spec: FileDescriptorProto) -> None:
    mutated = ours()
    request = next(m for m in mutated.message_type if m.name == "NodePublishVolumeRequest")
    del request.field[2]  # staging_target_path
    assert omissions(mutated, spec) == [
        "field .csi.v1.NodePublishVolumeRequest.staging_target_path"
    ]


def test_serialized_descriptor_reads_both_generator_styles() -> None:
    data = ours().SerializeToString()
    old = f"DESCRIPTOR = _descriptor.FileDescriptor(name='csi.proto', serialized_pb={data!r})\n"
    new = f"DESCRIPTOR = _pool.Default().AddSerializedFile({data!r})\n"
    assert serialized_descriptor(old) == data
    assert serialized_descriptor(new) == data
    with pytest.raises(ValueError):
        serialized_descriptor("x = 1\n")


def _spec_classes(spec: FileDescriptorProto):
    """Message classes built from the spec's descriptor, in a pool of their own."""
    pool = descriptor_pool.DescriptorPool()
    for module in (descriptor_pb2, timestamp_pb2, wrappers_pb2):
        dependency = FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(dependency)
        pool.Add(dependency)
    pool.Add(spec)
    return lambda name: message_factory.GetMessageClass(pool.FindMessageTypeByName(name))


def test_a_kubelet_publish_request_decodes_the_same(spec: FileDescriptorProto) -> None:
    request = {
        "volumeId": "csi-0123",
        "targetPath": "/var/lib/kubelet/pods/uid/volumes/kubernetes.io~csi/weights/mount",
        "volumeCapability": {
            "mount": {"fsType": "ext4", "mountFlags": ["ro"]},
            "accessMode": {"mode": "SINGLE_NODE_READER_ONLY"},
        },
        "readonly": True,
        "secrets": {"token": "t"},
        "volumeContext": {"source": "s3://bucket/model/", "csi.storage.k8s.io/ephemeral": "true"},
    }
    spec_class = _spec_classes(spec)("csi.v1.NodePublishVolumeRequest")
    wire = json_format.ParseDict(request, spec_class()).SerializeToString()
    decoded = csi_pb2.NodePublishVolumeRequest.FromString(wire)
    assert json_format.MessageToDict(decoded) == request

    probe = _spec_classes(spec)("csi.v1.ProbeResponse")
    answer = csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=False))
    assert probe.FromString(answer.SerializeToString()).HasField("ready")

"""Our csi.v1 protobuf: the CSI messages and services the node plugin serves.

``csi.proto`` is compiled with ``python -m cachefs.proto.generate``; the generated
modules are committed and tests/test_csi_proto.py holds them to the CSI spec.
"""

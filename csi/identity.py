"""The CSI Identity service: who the plugin is, and whether it can serve (Probe)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import wrappers_pb2

import cachefs
from cachefs.csi.proto import csi_pb2 as csi
from cachefs.csi.proto import csi_pb2_grpc as csi_grpc

DRIVER_NAME = "csi.cachefs.dev"


class IdentityService(csi_grpc.IdentityServicer):
    def __init__(self, node_ready: Callable[[], bool]) -> None:
        self._node_ready = node_ready

    def GetPluginInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        return csi.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=cachefs.__version__)

    def GetPluginCapabilities(self, request: Any, context: grpc.ServicerContext) -> Any:
        return csi.GetPluginCapabilitiesResponse()  # a node plugin: no controller service

    def Probe(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Ready only while the local cachefs node answers: publishing needs it."""
        return csi.ProbeResponse(ready=wrappers_pb2.BoolValue(value=self._node_ready()))

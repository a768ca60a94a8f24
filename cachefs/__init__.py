"""cachefs: a model-weight cache. Read any fsspec URL at local-disk speed.

``fsspec.open("cachefs::s3://bucket/model.safetensors")`` reads through the cache;
``cachefs prefetch SOURCE`` warms it ahead of time.

One package, in layers (docs/architecture.md): the contract at the bottom (errors,
types, messages, URLs, units, ranges, auth, the proto), the gRPC client, the node
(``cachefs.node``), the CSI plugin (``cachefs.csi``), then what user code imports
(``connect``, ``filesystem``, ``loaders``) and the CLI.
"""

__version__ = "0.1.0"

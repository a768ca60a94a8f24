"""The cachefs node (``cachefs.node``, the folder ``node/``): engine, store, origins,
cluster, the service layer, and its two adapters: the gRPC server of the daemon and
embedded mode, where the library runs the same service in its own process.

It imports the contract (``cachefs``'s errors, types, URLs, proto) and the gRPC
client (to reach peers), never the filesystem, the loaders or the CLI above it.
"""

"""The cachefs node: engine (read path), store (tiers), origins, configuration.

In embedded mode the ``cachefs`` library runs this engine in-process; on a cluster
node the daemon runs it and serves clients over gRPC.
"""

"""CachedModel objects (``cachedmodels.cachefs.io``), reconciled by the node daemons.

``spec``: a model's spec checked and its manifest named; ``api``: the Kubernetes
calls; ``lease``: the leader election; ``controller``: the loop every node runs.
"""

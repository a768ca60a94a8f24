"""The cachefs CSI node plugin (Identity and Node services).

Kubernetes mounts a cachefs view into a pod through this plugin; see
``docs/architecture.md``.
"""

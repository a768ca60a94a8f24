"""The cachefs CSI node plugin (Identity and Node services), run as ``cachefs csi``.

Kubernetes mounts a cachefs view into a pod through this plugin; see ``docs/csi.md``.
"""

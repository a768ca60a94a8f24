"""The node API (``cachefs.v1``): ``cachefs.proto``, its generated modules (committed),
and ``generate`` to make them again (``--check`` for drift).
"""

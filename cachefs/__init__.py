"""cachefs: a model-weight cache. Read any fsspec URL at local-disk speed.

``fsspec.open("cachefs::s3://bucket/model.safetensors")`` reads through the cache;
``cachefs prefetch SOURCE`` warms it ahead of time.
"""

__version__ = "0.1.0"

"""The cluster: nodes that share blocks, so the origin serves each block about once.

``membership`` says who the nodes are, ``hashing`` which of them owns a block,
``peers`` how a node asks another for a block.
"""

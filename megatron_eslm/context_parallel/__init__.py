"""Context parallelism (--context-parallel-size C): every sequence of a micro-batch is cut into 2C chunks
and rank r of the context-parallel group holds chunks r and 2C-1-r, so that causal attention's work is
balanced (an early chunk attends to few keys, a late one to many).

  sharding.py   which tokens a rank holds: the batch's shard and the tokens' global positions
  attention.py  causal attention of the local queries over the whole sequence's keys and values, all-gathered
                or (ring.py) passed around the ring (--cp-comm-type)
"""

"""Capture: the Dynamo entry point `fuse`, AOT autograd, the decomposition table; wires graph -> passes ->
emit -> runtime. Imported lazily (it imports Dynamo): `fusebackend.fuse` resolves to capture.backend.fuse."""

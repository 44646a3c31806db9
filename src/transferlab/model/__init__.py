"""The network stage: backbone facts (zoo), weights found offline first, and the backbone with its head
and its freeze and BatchNorm policy."""

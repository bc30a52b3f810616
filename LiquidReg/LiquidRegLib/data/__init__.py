"""Training material: real brains from pip packages, a shared label scheme, image synthesis from
label maps, random deformations and the pair sampler.

Modules: ``sources`` (pinned wheels, provenance), ``volumes`` (standard form I/O), ``labels``
(shared scheme), ``subjects`` (one builder per source), ``sample`` (the shipped sample pair).
"""
